# vim:set ft= ts=4 sw=4 et:
# resty.workerbus refuses to work without the module, and says which
# load_module line is missing.

BEGIN {
    # This suite runs nginx with every module but ours.
    $ENV{TEST_NGINX_LOAD_MODULES} = join " ",
        grep { !/workerbus/ } split " ", ($ENV{TEST_NGINX_LOAD_MODULES} // "");
}

# after the BEGIN block: the real runner reads TEST_NGINX_* when it is loaded
use Workerbus::TestCore 'no_plan';

no_long_string();
run_tests();

__DATA__

=== TEST 1: require without the module names the missing load_module line
--- config
    location = /t {
        content_by_lua_block {
            local ok, err = pcall(require, "resty.workerbus")
            ngx.say(ok, " ", err)
        }
    }
--- request
GET /t
--- response_body
false resty.workerbus: the workerbus nginx module is not loaded; add "load_module /usr/lib/nginx/modules/ngx_workerbus_module.so;" at the top of nginx.conf (main context, before the http block)



=== TEST 2: the drop-in modules fail the same way
--- config
    location = /t {
        content_by_lua_block {
            for _, name in ipairs { "resty.worker.events", "resty.events", "resty.worker.manager" } do
                local ok, err = pcall(require, name)
                ngx.say(name, ": ", ok, " ", (tostring(err):match("not loaded; add \"load_module [^\"]+\"")))
            end
        }
    }
--- request
GET /t
--- response_body
resty.worker.events: false not loaded; add "load_module /usr/lib/nginx/modules/ngx_workerbus_module.so;"
resty.events: false not loaded; add "load_module /usr/lib/nginx/modules/ngx_workerbus_module.so;"
resty.worker.manager: false not loaded; add "load_module /usr/lib/nginx/modules/ngx_workerbus_module.so;"
