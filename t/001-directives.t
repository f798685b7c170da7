# vim:set ft= ts=4 sw=4 et:
# The module loads, and every bad directive value stops `nginx -t` with an
# [emerg] that names the directive and the value.

use Workerbus::TestCore 'no_plan';


no_long_string();
run_tests();

__DATA__

=== TEST 1: the module loads and makes the default zone by itself
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local st = wb.status()
            local z = st.zones[1]
            ngx.say(#st.zones, " zone: ", z.name, " ", z.size, " bytes, used + free = size: ",
                    z.used + z.free == z.size, ", event ring: ", z.events.capacity, " bytes")
        }
    }
--- request
GET /t
--- response_body
1 zone: workerbus 33554432 bytes, used + free = size: true, event ring: 16777216 bytes
--- no_error_log
[error]



=== TEST 2: several zones, in declaration order
--- main_config
    workerbus_zone first 1m;
    workerbus_zone second 512k;
--- config
    location = /t {
        content_by_lua_block {
            local st = require("resty.workerbus").status()
            for _, z in ipairs(st.zones) do ngx.say(z.name, " ", z.size) end
        }
    }
--- request
GET /t
--- response_body
first 1048576
second 524288
--- no_error_log
[error]



=== TEST 3: size that is not a size
--- main_config
    workerbus_zone bad 1x;
--- must_die
--- error_log
"workerbus_zone" directive: invalid zone size "1x" for zone "bad"



=== TEST 4: size missing
--- main_config
    workerbus_zone lonely;
--- must_die
--- error_log
invalid number of arguments in "workerbus_zone" directive



=== TEST 5: size below the minimum
--- main_config
    workerbus_zone tiny 64k;
--- must_die
--- error_log
"workerbus_zone" directive: zone "tiny" is too small: "64k", the minimum is 256k



=== TEST 6: duplicate zone name
--- main_config
    workerbus_zone twice 1m;
    workerbus_zone twice 2m;
--- must_die
--- error_log
"workerbus_zone" directive: duplicate zone "twice"



=== TEST 7: zone directive in the wrong context
--- http_config
    workerbus_zone inside 1m;
--- must_die
--- error_log
"workerbus_zone" directive is not allowed here



=== TEST 8: zone name with characters nginx logs cannot carry
--- main_config
    workerbus_zone "a b" 1m;
--- must_die
--- error_log
"workerbus_zone" directive: invalid zone name "a b": use letters, digits, '_', '-' and '.'



=== TEST 8b: zone option other than overflow=refuse or overflow=overwrite
--- main_config
    workerbus_zone ring 1m overflow=drop;
--- must_die
--- error_log
"workerbus_zone" directive: invalid parameter "overflow=drop" for zone "ring": use overflow=refuse (the default) or overflow=overwrite



=== TEST 8c: overflow=overwrite and overflow=refuse are taken, and the status says which
--- main_config
    workerbus_zone a 1m overflow=overwrite;
    workerbus_zone b 1m overflow=refuse;
    workerbus_zone c 1m;
--- config
    location = /t {
        content_by_lua_block {
            for _, z in ipairs(require("resty.workerbus").status().zones) do
                ngx.say(z.name, ": ", z.events.overflow)
            end
        }
    }
--- request
GET /t
--- response_body
a: overwrite
b: refuse
c: refuse
--- no_error_log
[error]



=== TEST 9: heartbeat that is not a time
--- main_config
    workerbus_heartbeat soon;
--- must_die
--- error_log
"workerbus_heartbeat" directive: invalid time "soon"



=== TEST 10: heartbeat too short
--- main_config
    workerbus_heartbeat 10ms;
--- must_die
--- error_log
"workerbus_heartbeat" directive: time below 100ms "10ms"



=== TEST 11: hang timeout given twice
--- main_config
    workerbus_hang_timeout 5s;
    workerbus_hang_timeout 6s;
--- must_die
--- error_log
"workerbus_hang_timeout" directive: is duplicate



=== TEST 12: status location takes no arguments
--- config
    location = /status {
        workerbus_status on;
    }
--- must_die
--- error_log
invalid number of arguments in "workerbus_status" directive



=== TEST 13: status answers GET with JSON and refuses POST
--- config
    location = /status {
        workerbus_status;
    }
--- request eval
["GET /status", "POST /status\r\n\r\nx"]
--- response_body_like eval
[qr/"module": "workerbus"/, qr/405 Not Allowed/]
--- error_code eval
[200, 405]
--- no_error_log
[error]
