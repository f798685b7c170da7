-- Helpers of the resty.sync suites (t/500, t/501):
-- `local T = require "wbtest.sync"`. They keep their records in the
-- lua_shared_dict "runs", which a block that uses them declares
-- (`--- shared_dicts: runs 4m`, with `src 1m` when its callbacks read a
-- source from the dict "src").

local wbtest = require "wbtest"

local _M = {}

-- the deadline loop of wbtest: wait(cond, secs)
_M.wait = wbtest.wait

local function now()
    ngx.update_time()
    return ngx.now()
end

-- Run records: s<id> = "pid start generation", e<id> = end, n = last id.
-- Records a run around fn() and returns what fn returned; sleeps `pause`
-- before and inside it (raises in init_worker, where ngx.sleep does not
-- exist, before anything is recorded: the run is retried).
function _M.run(pause, fn)
    local d = ngx.shared.runs
    if pause and pause > 0 then
        ngx.sleep(pause)
    end
    local id = d:incr("n", 1, 0)
    local start = now()
    d:set("s" .. id, ngx.worker.pid() .. " " .. start .. " "
          .. require("resty.workerbus").generation())
    if pause and pause > 0 then
        ngx.sleep(pause)
    end
    local r = fn and fn()
    d:set("e" .. id, now())
    return r
end

-- The recorded runs, oldest start first: { id, pid, start, gen, stop }.
function _M.runs()
    local d = ngx.shared.runs
    local out = {}
    for id = 1, d:get("n") or 0 do
        local s = d:get("s" .. id)
        if s then
            local pid, start, gen = s:match("^(%d+) (%S+) (%d+)$")
            out[#out + 1] = { id = id, pid = tonumber(pid), start = tonumber(start),
                              gen = tonumber(gen), stop = d:get("e" .. id) }
        end
    end
    table.sort(out, function(a, b) return a.start < b.start end)
    return out
end

-- nil when no two runs overlapped, or what overlapped; runs of `dead`
-- without an end ended when it was killed, at `killed`.
function _M.overlap(dead, killed)
    local runs = _M.runs()
    for i = 2, #runs do
        local prev, cur = runs[i - 1], runs[i]
        local stop = prev.stop or (prev.pid == dead and killed)
        if not stop then
            return "run " .. prev.id .. " (pid " .. prev.pid .. ") never ended but run "
                   .. cur.id .. " (pid " .. cur.pid .. ") started"
        end
        if cur.start < stop then
            return "run " .. cur.id .. " (pid " .. cur.pid .. ") started at " .. cur.start
                   .. " before run " .. prev.id .. " (pid " .. prev.pid .. ") ended at " .. stop
        end
    end
    return nil
end

-- A task of syncer s whose version is src's "v:<tag>" (default "v1") and
-- whose data is "data of <version>". Counts its version checks
-- ("checks:<tag>"), the checks under way ("active:<tag>") and the most ever
-- under way at once ("max:<tag>"), records the coroutine of check c
-- ("co:<tag>:<c>"), and calls hold(runs) inside each check when given. Its
-- on_update marks "upd:<tag>:<version>:<pid>" (see seen()).
function _M.task(s, tag, hold)
    local sync = require "resty.sync"
    assert(s:register(function(mode)
        local src, d = ngx.shared.src, ngx.shared.runs
        local v = src:get("v:" .. tag) or "v1"
        if mode == sync.ACTION_DATA then
            return "data of " .. v
        end
        local n = d:incr("active:" .. tag, 1, 0)
        if n > (d:get("max:" .. tag) or 0) then
            d:set("max:" .. tag, n)
        end
        local c = d:incr("checks:" .. tag, 1, 0)
        d:set("co:" .. tag .. ":" .. c, tostring(coroutine.running()))
        if hold then hold(d) end
        d:incr("active:" .. tag, -1)
        return v
    end, tag))
    assert(s:on_update(tag, function(data, version)
        assert(data == "data of " .. version)
        ngx.shared.runs:set("upd:" .. tag .. ":" .. version .. ":" .. ngx.worker.pid(), true)
    end))
end

-- How many workers' on_update saw `version` of a task() `tag`.
function _M.seen(tag, version)
    local n = 0
    local prefix = "upd:" .. tag .. ":" .. version .. ":"
    for _, k in ipairs(ngx.shared.runs:get_keys(0)) do
        if k:sub(1, #prefix) == prefix then
            n = n + 1
        end
    end
    return n
end

-- From a timer every `period` s in every worker: once runs' "kill" is set,
-- a worker that is not s's runner kills the runner with SIGKILL, once, when
-- ready(victim) holds (always, without ready). The killer stores the pid as
-- "victim" and the time as "killed" before the kill, then calls
-- after(victim).
function _M.kill_runner(s, period, ready, after)
    ngx.timer.every(period, function()
        local d = ngx.shared.runs
        local victim = s:runner()
        if not d:get("kill") or victim == ngx.worker.pid() or victim == 0 then
            return
        end
        if (not ready or ready(victim)) and d:add("victim", victim) then
            d:set("killed", now())
            wbtest.kill(victim, 9)
            if after then after(victim) end
        end
    end)
end

return _M
