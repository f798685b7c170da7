# vim:set ft= ts=4 sw=4 et:
# The C ABI's argument rule (src/abi.rs), called as a careless FFI user
# would: NULL out-pointers, NULL with a length, impossible lengths, negative
# or unknown indexes and bad periods return the error result with the exact
# reason in workerbus_last_error, and no worker crashes.

use Workerbus::TestCore 'no_plan';

no_long_string();
run_tests();

__DATA__

=== TEST 1: every bad argument is an error with its reason, never a crash
--- http_config
    init_worker_by_lua_block {
        -- the declarations of every exported function
        require "resty.worker.events"
        require "resty.sync"
        require "resty.worker.manager"
    }
--- config
    location = /t {
        content_by_lua_block {
            local ffi = require "ffi"
            local wb = require "resty.workerbus"
            local C = ffi.C
            local NULL = nil
            local huge = ffi.cast("size_t", 0) - 1   -- SIZE_MAX
            local len = ffi.new("size_t[1]")
            local buf = ffi.new("unsigned char[64]")
            local function say(name, r)
                ngx.say(name, ": ", tostring(tonumber(r)), " ", wb.last_error())
            end
            local zone = C.workerbus_zone(NULL, 0)
            ngx.say("primary zone: ", zone)

            say("last_error(NULL) is NULL", C.workerbus_last_error(NULL) == nil and 1 or 0)
            say("constants(NULL) is NULL", C.workerbus_constants(NULL) == nil and 1 or 0)
            say("zone(NULL, 3)", C.workerbus_zone(NULL, 3))
            say("zone(name, SIZE_MAX)", C.workerbus_zone("x", huge))
            say("status_json(NULL, 10)", C.workerbus_status_json(NULL, 10))
            say("metrics_text(NULL, 10)", C.workerbus_metrics_text(NULL, 10))
            say("kv_set(key NULL, 2)", C.workerbus_kv_set(zone, NULL, 2, "v", 1))
            say("kv_set(value NULL, 2)", C.workerbus_kv_set(zone, "k", 1, NULL, 2))
            say("kv_get(vlen NULL)", C.workerbus_kv_get(zone, "k", 1, buf, 64, NULL))
            say("kv_get(buf NULL, 64)", C.workerbus_kv_get(zone, "k", 1, NULL, 64, len))
            say("kv_get(zone 99)", C.workerbus_kv_get(99, "k", 1, buf, 64, len))
            say("kv_get(zone -1)", C.workerbus_kv_get(-1, "k", 1, buf, 64, len))

            local rec = ffi.new("workerbus_record_t")
            say("ev_post(data NULL, 5)", C.workerbus_ev_post(zone, "s", 1, "e", 1, NULL, 0, NULL, 5, 0))
            say("ev_post(source, SIZE_MAX)", C.workerbus_ev_post(zone, "s", huge, "e", 1, NULL, 0, NULL, 0, 0))
            say("ev_next(out NULL)", C.workerbus_ev_next(zone, 0, NULL, buf, 64, len))
            say("ev_next(buf NULL, 64)", C.workerbus_ev_next(zone, 0, rec, NULL, 64, len))
            say("ev_next(need NULL)", C.workerbus_ev_next(zone, 0, rec, buf, 64, NULL))
            say("ev_next(zone 7)", C.workerbus_ev_next(7, 0, rec, buf, 64, len))
            say("ev_next(vm 2)", C.workerbus_ev_next(zone, 2, rec, buf, 64, len))
            say("ev_idle(vm -1)", C.workerbus_ev_idle(zone, -1))
            say("ev_set_sema(vm 5)", C.workerbus_ev_set_sema(5, NULL))
            say("ev_cursor(vm 9)", C.workerbus_ev_cursor(zone, 9))
            say("ev_claim(ttl NaN)", C.workerbus_ev_claim(zone, "k", 1, 0/0))
            say("ev_claim(ttl -1)", C.workerbus_ev_claim(zone, "k", 1, -1))
            say("ev_claim(ttl 1e300)", C.workerbus_ev_claim(zone, "k", 1, 1e300))
            say("ev_claim(key NULL, 1)", C.workerbus_ev_claim(zone, NULL, 1, 1))
            say("ev_head(zone 42)", C.workerbus_ev_head(42))

            say("lc_counts(out NULL)", C.workerbus_lc_counts(1, 0, NULL))
            local counts = ffi.new("int64_t[3]")
            say("lc_counts(failed inf)", C.workerbus_lc_counts(1, 1/0, counts))
            say("lc_set_hang_timeout(-5)", C.workerbus_lc_set_hang_timeout(-5))
            say("lc_master_counts(id NULL)", C.workerbus_lc_master_counts(NULL, counts))

            say("sync_instance(key NULL, 4)", C.workerbus_sync_instance(zone, NULL, 4, 1000))
            say("sync_instance(interval huge)", C.workerbus_sync_instance(zone, "k", 1, ffi.cast("uint64_t", -1)))
            local inst = C.workerbus_sync_instance(zone, "args", 4, 1000)
            ngx.say("instance: ", inst)
            say("sync_task(inst -1)", C.workerbus_sync_task(zone, -1, "t", 1))
            say("sync_task(inst 9999)", C.workerbus_sync_task(zone, 9999, "t", 1))
            local task = C.workerbus_sync_task(zone, inst, "t", 1)
            ngx.say("task: ", task)
            say("sync_seq_ptr(task -3) is NULL", C.workerbus_sync_seq_ptr(zone, -3) == nil and 1 or 0)
            say("sync_seq_ptr(task 100000) is NULL", C.workerbus_sync_seq_ptr(zone, 100000) == nil and 1 or 0)
            say("sync_tick(lease huge)", C.workerbus_sync_tick(zone, inst, ffi.cast("uint64_t", -1), 0))
            say("sync_runner(inst -2)", C.workerbus_sync_runner(zone, -2))
            say("sync_publish(data NULL, 3)", C.workerbus_sync_publish(zone, task, 1, "v", 1, 1, NULL, 3))
            local head = ffi.new("workerbus_sync_head_t")
            say("sync_read(head NULL)", C.workerbus_sync_read(zone, task, NULL, buf, 64))
            say("sync_read(buf NULL, 64)", C.workerbus_sync_read(zone, task, head, NULL, 64))
            say("sync_read(task 77777)", C.workerbus_sync_read(zone, 77777, head, buf, 64))
            C.workerbus_sync_record_run(zone, task, 0, 0, NULL, 9)
            say("sync_record_run(err NULL, 9)", 0)

            local name = C.workerbus_zone_name(zone, len)
            ngx.say("zone_name(primary): ", ffi.string(name, len[0]))
            say("zone_name(5) is NULL", C.workerbus_zone_name(5, len) == nil and 1 or 0)
            say("zone_name(len NULL) is NULL", C.workerbus_zone_name(zone, NULL) == nil and 1 or 0)

            -- still healthy: a good call works
            ngx.say("kv_set ok: ", C.workerbus_kv_set(zone, "k", 1, "v", 1))
        }
    }
--- request
GET /t
--- response_body
primary zone: 0
last_error(NULL) is NULL: 1 
constants(NULL) is NULL: 1 
zone(NULL, 3): -1 zone name is NULL but its length is 3
zone(name, SIZE_MAX): -1 zone name has an impossible length 18446744073709551615
status_json(NULL, 10): 0 buf is NULL but its length is 10
metrics_text(NULL, 10): 0 buf is NULL but its length is 10
kv_set(key NULL, 2): -1 key is NULL but its length is 2
kv_set(value NULL, 2): -1 value is NULL but its length is 2
kv_get(vlen NULL): -1 vlen is NULL
kv_get(buf NULL, 64): -1 buf is NULL but its length is 64
kv_get(zone 99): -1 bad zone index 99
kv_get(zone -1): -1 bad zone index -1
ev_post(data NULL, 5): -1 data is NULL but its length is 5
ev_post(source, SIZE_MAX): -1 source has an impossible length 18446744073709551615
ev_next(out NULL): -1 out is NULL
ev_next(buf NULL, 64): -1 buf is NULL but its length is 64
ev_next(need NULL): -1 need is NULL
ev_next(zone 7): -1 bad zone index 7
ev_next(vm 2): -1 bad vm 2 (0: http, 1: stream)
ev_idle(vm -1): -1 bad vm -1 (0: http, 1: stream)
ev_set_sema(vm 5): -1 bad vm 5 (0: http, 1: stream)
ev_cursor(vm 9): 0 bad vm 9 (0: http, 1: stream)
ev_claim(ttl NaN): -1 timeout must be a number from 0 to 3153600000 seconds
ev_claim(ttl -1): -1 timeout must be a number from 0 to 3153600000 seconds
ev_claim(ttl 1e300): -1 timeout must be a number from 0 to 3153600000 seconds
ev_claim(key NULL, 1): -1 unique key is NULL but its length is 1
ev_head(zone 42): 0 bad zone index 42
lc_counts(out NULL): -1 out is NULL
lc_counts(failed inf): -1 failed must be a number from 0 to 3153600000 seconds
lc_set_hang_timeout(-5): -1 hang timeout must be a number from 0 to 3153600000 seconds
lc_master_counts(id NULL): -1 id is NULL
sync_instance(key NULL, 4): -1 key is NULL but its length is 4
sync_instance(interval huge): -1 interval must be a number from 0 to 3153600000 seconds
instance: 0
sync_task(inst -1): -1 bad sync instance index -1
sync_task(inst 9999): -1 bad sync instance index 9999
task: 0
sync_seq_ptr(task -3) is NULL: 1 bad sync task index -3
sync_seq_ptr(task 100000) is NULL: 1 bad sync task index 100000
sync_tick(lease huge): -1 lease must be a number from 0 to 3153600000 seconds
sync_runner(inst -2): 0 bad sync instance index -2
sync_publish(data NULL, 3): -1 data is NULL but its length is 3
sync_read(head NULL): -1 head is NULL
sync_read(buf NULL, 64): -1 buf is NULL but its length is 64
sync_read(task 77777): -1 bad sync task index 77777
sync_record_run(err NULL, 9): 0 error is NULL but its length is 9
zone_name(primary): workerbus
zone_name(5) is NULL: 1 bad zone index 5
zone_name(len NULL) is NULL: 1 len is NULL
kv_set ok: 0
--- no_error_log
[alert]
[crit]
exited on signal
