-- Node-to-node benchmark of the PostgreSQL bus (bench/pg_run): the bridge
-- ("bus": resty.workerbus post/subscribe, one connection per node) beside a
-- one-connection-per-worker client doing the same work ("base": as the
-- lapis proposal does: each worker LISTENs on its own connection, each post
-- is its own pg_notify query and transaction). Node B posts, every worker
-- of node A records when each notification arrives.

local ffi = require "ffi"
local wb = require "resty.workerbus"

ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } wbb_timespec;
    int clock_gettime(int clk, wbb_timespec *ts);
]]
local ts = ffi.new("wbb_timespec")
local function now_us()
    ffi.C.clock_gettime(0, ts)  -- CLOCK_REALTIME: both nodes run on this machine
    return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local _M = {}
-- Channels: BENCH_CHANNEL's stem (bench/pg_run: bench_<port>), so that two
-- runs on one server do not hear each other.
local STEM = os.getenv("BENCH_CHANNEL") or "bench"
local CH = STEM .. "_bus"
local BASE_CH = STEM .. "_base"
local stats = ngx.shared.bench_stats

-- ---- a minimal PostgreSQL client over cosockets (trust auth only) ---------

local function int32(n)
    return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
                       bit.band(bit.rshift(n, 8), 255), bit.band(n, 255))
end
local function get32(s, i)
    local a, b, c, d = s:byte(i, i + 3)
    return ((a * 256 + b) * 256 + c) * 256 + d
end

local function read_msg(sock)
    local head, err = sock:receive(5)
    if not head then return nil, err end
    local len = get32(head, 2)
    local body = ""
    if len > 4 then
        body, err = sock:receive(len - 4)
        if not body then return nil, err end
    end
    return head:sub(1, 1), body
end

local function pg_connect(conf)
    local sock = ngx.socket.tcp()
    sock:settimeout(5000)
    local ok, err = sock:connect(conf.host, conf.port)
    if not ok then return nil, err end
    local body = int32(196608) .. "user\0" .. conf.user .. "\0database\0" .. conf.db .. "\0\0"
    sock:send(int32(#body + 4) .. body)
    while true do
        local t, b = read_msg(sock)
        if not t then return nil, b end
        if t == "E" then return nil, "server error: " .. b end
        if t == "R" and get32(b, 1) ~= 0 then return nil, "the baseline client supports trust auth only" end
        if t == "Z" then return sock end
    end
end

local function pg_query(sock, sql, on_notify)
    sock:send("Q" .. int32(#sql + 5) .. sql .. "\0")
    while true do
        local t, b = read_msg(sock)
        if not t then return nil, b end
        if t == "A" and on_notify then on_notify(b) end
        if t == "Z" then return true end
    end
end

local function literal(s) return "'" .. s:gsub("'", "''") .. "'" end

local function base_conf()
    return { host = os.getenv("BENCH_PG_HOST") or "127.0.0.1", port = tonumber(os.getenv("BENCH_PG_PORT") or 5432),
             user = os.getenv("BENCH_PG_USER") or "postgres", db = os.getenv("BENCH_PG_DB") or "test" }
end

-- ---- receiving side (node A) ------------------------------------------------

local function record(mode, payload)
    local now = now_us()
    local sent = tonumber(payload:match("^(%d+)"))
    if sent then
        stats:rpush("lat:" .. mode, now - sent)
    end
    stats:incr("n:" .. mode, 1, 0)
    stats:set("last:" .. mode .. ":" .. ngx.worker.pid(), now)
end

-- Every worker: subscribe through the bridge, and run its own LISTEN connection.
function _M.init_worker(role)
    if role ~= "receiver" then return end
    wb.subscribe(CH, function(payload) record("bus", payload) end)
    local function listener(premature)
        if premature then return end
        local sock, err = pg_connect(base_conf())
        if not sock then
            ngx.log(ngx.ERR, "baseline listener: ", err)
            return ngx.timer.at(1, listener)
        end
        pg_query(sock, "LISTEN " .. BASE_CH)
        stats:incr("base_ready", 1, 0)
        -- Woken once a second with nothing read, to see whether the worker
        -- is shutting down: a read that waited longer would hold it up.
        sock:settimeout(1000)
        while not ngx.worker.exiting() do
            local head, err, partial = sock:receive(5)
            if not head and err == "timeout" and partial == "" then
                goto continue
            end
            if not head then break end
            local t, b = head:sub(1, 1), ""
            local len = get32(head, 2)
            if len > 4 then
                b = sock:receive(len - 4)
                if not b then break end
            end
            if t == "A" then
                -- pid (4 bytes), channel\0, payload\0
                local z = b:find("\0", 5, true)
                record("base", b:sub(z + 1, -2))
            end
            ::continue::
        end
        sock:close()
    end
    ngx.timer.at(0, listener)
end

-- ---- sending side (node B) --------------------------------------------------

local base_sock
local function base_post(payload)
    if not base_sock then
        local err
        base_sock, err = pg_connect(base_conf())
        if not base_sock then return nil, err end
    end
    local ok, err = pg_query(base_sock, "SELECT pg_notify(" .. literal(BASE_CH) .. ", " .. literal(payload) .. ")")
    if not ok then base_sock = nil end
    return ok, err
end

local function post(mode, payload)
    if mode == "bus" then
        while true do
            local ok, err = wb.post(CH, payload)
            if ok then return true end
            if not err:find("queue full", 1, true) then return nil, err end
            ngx.sleep(0.001)  -- the database is behind: wait as a caller would
        end
    end
    return base_post(payload)
end

-- /send?mode=bus|base&n=N&rate=R (R = 0: as fast as possible). Says t0.
function _M.send()
    local mode, n, rate = ngx.var.arg_mode, tonumber(ngx.var.arg_n), tonumber(ngx.var.arg_rate)
    local pad = string.rep("x", 48)
    base_sock = nil  -- a cosocket lives as long as its request: one connection per /send
    local t0 = now_us()
    for i = 1, n do
        local ok, err = post(mode, string.format("%d %d ", now_us(), i) .. pad)
        if not ok then ngx.say("error ", err) return end
        if rate > 0 then ngx.sleep(1 / rate) end
    end
    if base_sock then base_sock:close() base_sock = nil end
    ngx.say(string.format("%d", t0))
end

-- /stats?mode=...&reset=1 on node A: received count, p50/p99 us, last arrival.
function _M.stats()
    local mode = ngx.var.arg_mode
    local lats = {}
    local key = "lat:" .. mode
    local n = stats:llen(key) or 0
    for i = 1, n do lats[i] = stats:lpop(key) end
    table.sort(lats)
    local function pct(p) return lats[math.max(1, math.ceil(#lats * p))] or 0 end
    local last = 0
    for _, k in ipairs(stats:get_keys(0)) do
        if k:sub(1, #("last:" .. mode .. ":")) == "last:" .. mode .. ":" then
            last = math.max(last, stats:get(k))
            stats:delete(k)
        end
    end
    ngx.say(string.format('{"received": %d, "p50": %d, "p99": %d, "last": %d}', stats:get("n:" .. mode) or 0, pct(0.5), pct(0.99), last))
    stats:delete("n:" .. mode)
end

function _M.count()
    ngx.say(stats:get("n:" .. ngx.var.arg_mode) or 0, " ", stats:get("base_ready") or 0)
end

return _M
