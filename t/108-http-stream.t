# vim:set ft= ts=4 sw=4 et:
# http and stream in one nginx, each with its own resty.events instance
# (Kong's layout: two `listening` sockets, two buses). Each Lua VM has its
# own reader and its own semaphore (posted through its own subsystem's
# function): each side gets its own bus's events, none of the other's;
# an instance given the other side's `listening` path is on that bus (the
# documented cross-subsystem post). Needs stream-lua-nginx-module;
# skipped elsewhere (Debian's nginx).

use lib 't/lib';
use Workerbus::OpenResty ();
my $why;
BEGIN { $why = Workerbus::OpenResty::no_stream_lua() }
use Workerbus::TestCore $why ? (skip_all => $why) : ('no_plan');

workers(2);
master_on();
no_long_string();

# The stream side: its own instance on `listening` STREAM_PATH (and, when
# given, a second one on HTTP_PATH), counting what it receives in a stream
# shared dict, and a server on a unix socket that publishes ("post N") or
# reports ("get KEY") for the http side's requests.
sub stream_block {
    my ($second) = @_;
    my $html = $ENV{TEST_NGINX_HTML_DIR};
    my $extra = $second ? qq{
            _G.ev2 = require("resty.events").new { listening = "unix:$html/http_events.sock" }
            ev2:subscribe("*", "*", function(data, event, source) d:incr("cross:" .. source, 1, 0) end)
            assert(ev2:init_worker())} : "";
    return qq{
stream {
    lua_package_path "$Workerbus::TestCore::LuaPath";
    lua_shared_dict sgot 1m;
    init_by_lua_block {
        _G.ev = require("resty.events").new { listening = "unix:$html/stream_events.sock" }
    }
    init_worker_by_lua_block {
        local d = ngx.shared.sgot
        ev:subscribe("*", "*", function(data, event, source) d:incr(source, 1, 0) end)
        assert(ev:init_worker())$extra
    }
    server {
        listen unix:$html/stream.sock;
        content_by_lua_block {
            local sock = assert(ngx.req.socket())
            local line = assert(sock:receive())
            local cmd, arg = line:match("^(%S+) (.*)\$")
            if cmd == "post" then
                local n, source = arg:match("^(%d+) (%S+)\$")
                for i = 1, tonumber(n) do assert(ev:publish("all", source, "e", i)) end
                ngx.say("ok")
            elseif cmd == "post2" then
                assert(ev2:publish("all", arg, "e", 1))
                ngx.say("ok")
            else
                ngx.say(ngx.shared.sgot:get(arg) or 0)
            end
        }
    }
}
};
}

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value(main_config => stream_block($block->cross_stream ? 1 : 0))
        unless defined $block->main_config;
});

run_tests();

__DATA__

=== TEST 1: two instances, two buses: http and stream each receive their own side's events and none of the other's, woken without polling
--- http_config
    lua_shared_dict got 1m;
    init_by_lua_block {
        _G.ev = require("resty.events").new { listening = "unix:$TEST_NGINX_HTML_DIR/http_events.sock" }
    }
    init_worker_by_lua_block {
        local d = ngx.shared.got
        ev:subscribe("*", "*", function(data, event, source) d:incr(source, 1, 0) end)
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local wait = require("wbtest").wait
            local d = ngx.shared.got
            local function stream(cmd)
                local s = ngx.socket.tcp()
                assert(s:connect("unix:$TEST_NGINX_HTML_DIR/stream.sock"))
                assert(s:send(cmd .. "\n"))
                local r = assert(s:receive())
                s:close()
                return r
            end
            for i = 1, 2 do assert(ev:publish("all", "from-http", "e", i)) end
            ngx.say("stream posts: ", stream("post 2 from-stream"))
            -- markers last: once both sides have theirs, everything posted
            -- before them (one total order) has been read on both sides
            assert(ev:publish("all", "http-marker", "e"))
            ngx.say("stream marker: ", stream("post 1 stream-marker"))
            ngx.say("http side has its marker: ", wait(function() return d:get("http-marker") == 2 end))
            ngx.say("stream side has its marker: ", wait(function()
                return stream("get stream-marker") == "2"
            end))
            ngx.say("http side got: http ", d:get("from-http"), ", stream ", d:get("from-stream") or 0)
            ngx.say("stream side got: stream ", stream("get from-stream"),
                    ", http ", stream("get from-http"))
            local readers = 0
            for _, r in ipairs(require("resty.workerbus").status().zones[1].events.workers) do
                if r.subsystem == "stream" and r.poller then readers = readers + 1 end
            end
            ngx.say("stream readers with a poller: ", readers)
        }
    }
--- request
GET /t
--- response_body
stream posts: ok
stream marker: ok
http side has its marker: true
stream side has its marker: true
http side got: http 4, stream 0
stream side got: stream 4, http 0
stream readers with a poller: 2
--- no_error_log
[error]



=== TEST 2: an instance in stream given the http side's listening path is on the http bus: the documented cross-subsystem post, both ways
--- cross_stream: 1
--- http_config
    lua_shared_dict got 1m;
    init_by_lua_block {
        _G.ev = require("resty.events").new { listening = "unix:$TEST_NGINX_HTML_DIR/http_events.sock" }
    }
    init_worker_by_lua_block {
        local d = ngx.shared.got
        ev:subscribe("*", "*", function(data, event, source) d:incr(source, 1, 0) end)
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local wait = require("wbtest").wait
            local d = ngx.shared.got
            local function stream(cmd)
                local s = ngx.socket.tcp()
                assert(s:connect("unix:$TEST_NGINX_HTML_DIR/stream.sock"))
                assert(s:send(cmd .. "\n"))
                local r = assert(s:receive())
                s:close()
                return r
            end
            assert(ev:publish("all", "from-http", "e"))
            ngx.say("stream posts on the http bus: ", stream("post2 from-stream-on-http"))
            ngx.say("the stream instance on the http bus got the http post: ", wait(function()
                return stream("get cross:from-http") == "2"
            end))
            ngx.say("the http side got the stream post on its bus: ", wait(function()
                return d:get("from-stream-on-http") == 2
            end))
            ngx.say("the stream side's own instance got: ", stream("get from-http"))
        }
    }
--- request
GET /t
--- response_body
stream posts on the http bus: ok
the stream instance on the http bus got the http post: true
the http side got the stream post on its bus: true
the stream side's own instance got: 0
--- no_error_log
[error]
