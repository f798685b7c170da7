-- Lua helpers the block-format suites share: `local T = require "wbtest"`.
-- Workerbus::TestCore puts t/lib on every block's lua_package_path.
-- Every wait is a deadline loop on a condition, never a fixed sleep.

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

return _M
