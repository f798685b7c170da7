# The nginx.conf that the event benchmarks (bench/run, bench/hops,
# bench/instructions) start: configured as the original's users do
# (`lua_shared_dict process_events 64m`; bench.lua's init_worker calls
# `configure{ shm = "process_events", interval = 0.01 }`), with every
# location bench.lua serves. Sourced, not run.
# event_conf MODULE WORKERS PORT [MAIN_LINE]: prints it; MAIN_LINE goes
# into the main context (bench/instructions: `daemon off;`).
event_conf() {
    local mods=/usr/lib/nginx/modules top
    top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cat <<CONF
load_module $mods/ndk_http_module.so;
load_module $mods/ngx_http_lua_module.so;
load_module $1;
worker_processes $2;
${4:-}
pid logs/nginx.pid;
error_log logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    lua_package_path "$top/lib/?.lua;$top/bench/?.lua;;";
    lua_shared_dict bench_stats 16m;
    lua_shared_dict process_events 64m;
    init_worker_by_lua_block { require("bench").init_worker() }
    server {
        listen 127.0.0.1:$3;
        location = /burst   { content_by_lua_block { require("bench").burst() } }
        location = /collect { content_by_lua_block { require("bench").collect() } }
        location = /poster  { content_by_lua_block { ngx.say(ngx.shared.bench_stats:get("poster")) } }
        location = /instr   { content_by_lua_block { require("bench").instr() } }
        location = /latency { content_by_lua_block { require("bench").latency() } }
        location = /latency_timer { content_by_lua_block { require("bench").latency_timer() } }
    }
}
CONF
}
