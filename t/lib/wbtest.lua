-- Lua helpers the block-format suites share: `local T = require "wbtest"`.
-- Workerbus::TestCore puts t/lib on every block's lua_package_path.
-- Every wait is a deadline loop on a condition, never a fixed sleep.

local ffi = require "ffi"

ffi.cdef [[
int kill(int pid, int sig);
]]

local C = ffi.C

local _M = {}

-- Calls f until it returns a true value or `secs` (default 10) have passed;
-- returns what f returned last.
function _M.wait(f, secs)
    ngx.update_time()
    local deadline = ngx.now() + (secs or 10)
    while not f() and ngx.now() < deadline do
        ngx.sleep(0.005)
        ngx.update_time()
    end
    return f()
end

-- The same, but raises "timed out waiting for <what>" when f never
-- returned a true value.
function _M.wait_for(what, f, secs)
    if not _M.wait(f, secs) then
        error("timed out waiting for " .. what, 2)
    end
end

-- The workers the status shows running (any generation), as status() lists
-- them.
function _M.running()
    local r = {}
    for _, w in ipairs(require("resty.workerbus").status().workers) do
        if w.state == "running" then
            r[#r + 1] = w
        end
    end
    return r
end

-- How many lines of the error log match the Lua pattern `pat`. The runner
-- appends every block of a file to one error.log: a pattern for this
-- block's lines names something of this nginx (its master's pid, say).
function _M.count_logged(pat)
    local f = io.open(ngx.config.prefix() .. "logs/error.log")
    if not f then
        return 0
    end
    local n = 0
    for line in f:lines() do
        if line:find(pat) then
            n = n + 1
        end
    end
    f:close()
    return n
end

-- Whether a line of this nginx's error log matches the Lua pattern `pat`.
-- For a multi-request block whose later request expects a line: the real
-- Test::Nginx checks `--- error_log` after every request of the block, so
-- such a line is asserted in the last response instead.
function _M.logged(pat)
    return _M.count_logged(pat) > 0
end

-- How many event pollers of the first zone sleep (their readers flagged
-- idle), of generation `g` only when it is given.
function _M.sleeping(g)
    local k = 0
    for _, w in ipairs(require("resty.workerbus").status().zones[1].events.workers) do
        if w.idle == true and (g == nil or w.generation == g) then k = k + 1 end
    end
    return k
end

-- Whether the first zone's event ring has `n` readers and each has read
-- every event posted so far (lag 0). A worker's poller runs an event's
-- handlers (and its unique claim) right after reading it, in the same turn:
-- for handlers that do not yield, every worker has handled all of it.
function _M.caught_up(n)
    local readers = require("resty.workerbus").status().zones[1].events.workers
    if #readers ~= n then
        return false
    end
    for _, r in ipairs(readers) do
        if r.lag ~= 0 then
            return false
        end
    end
    return true
end

-- GET `path` from this nginx over a new connection (so that any worker may
-- serve it); returns the response body.
function _M.get(path)
    local sock = ngx.socket.tcp()
    assert(sock:connect("127.0.0.1", ngx.var.server_port))
    assert(sock:send("GET " .. path .. " HTTP/1.0\r\nHost: x\r\n\r\n"))
    local res = assert(sock:receive("*a"))
    sock:close()
    return res:match("\r\n\r\n(.*)$")
end

-- Sends signal `sig` (a number: 1 for SIGHUP, 9 for SIGKILL) to `pid`;
-- returns kill(2)'s result.
function _M.kill(pid, sig)
    return C.kill(pid, sig)
end

-- For blocks that list calls and what they returned, one line each:
-- `local try, out = T.recorder()`; try(what, f(...)) appends
-- "<what>: <first value>, <second value>" to the list out.
function _M.recorder()
    local out = {}
    local function try(what, ...)
        local r, err = ...
        out[#out + 1] = what .. ": " .. tostring(r) .. ", " .. tostring(err)
    end
    return try, out
end

return _M
