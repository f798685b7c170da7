-- resty.workerbus.handlers: the handler registry resty.worker.events and
-- resty.events share.
--
-- A registry keeps lists by source and by event; `any` is the key that
-- stands for every source or every event (resty.events: "*";
-- resty.worker.events: a key no caller can pass). A list holds strong
-- entries and weak ones (a weak-valued table). An entry is a handler, or
-- an id that the dispatcher looks up in `funcs`. Removed entries (false, or
-- an id no longer in funcs) and collected weak ones are compacted away by
-- the dispatcher; handlers added during a dispatch wait for the next event.
--
-- Log lines: the handler trace keeps the original's "worker-events: "
-- prefix (operators grep it).

local ngx = ngx
local log = ngx.log
local ERR = ngx.ERR
local DEBUG = ngx.DEBUG
local debug_on = require "resty.workerbus.debug_log"
local type = type
local tostring = tostring
local xpcall = xpcall
local traceback = debug.traceback
local setmetatable = setmetatable

local WEAK_MT = { __mode = "v" }

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

function _M.new(any)
    return setmetatable({ any = any, by_source = {} }, mt)
end

-- The list of (source, event); made when `create`.
function _M:list(source, event, create)
    local by_event = self.by_source[source]
    if not by_event then
        if not create then
            return nil
        end
        by_event = {}
        self.by_source[source] = by_event
    end
    local l = by_event[event]
    if not l and create then
        l = { n = 0, list = {}, wn = 0, wlist = setmetatable({}, WEAK_MT) }
        by_event[event] = l
    end
    return l
end

function _M:add(source, event, entry, weak)
    local l = self:list(source, event, true)
    if weak then
        local n = l.wn + 1
        l.wn = n
        l.wlist[n] = entry
    else
        local n = l.n + 1
        l.n = n
        l.list[n] = entry
    end
end

-- Marks every occurrence of entry in the list of (source, event) removed;
-- true when there was one.
function _M:remove(source, event, entry)
    local l = self:list(source, event, false)
    if not l then
        return false
    end
    local found = false
    for i = 1, l.wn do
        if l.wlist[i] == entry then
            l.wlist[i] = nil
            found = true
        end
    end
    for i = 1, l.n do
        if l.list[i] == entry then
            l.list[i] = false
            found = true
        end
    end
    return found
end

-- Calls one handler. Its error is logged with source and event (not the
-- payload, which may be private) and never propagated. `who` names the
-- last argument in the log: "pid" or "wid".
local function call_handler(handler, data, event, source, who, id)
    local ok, err = xpcall(handler, traceback, data, event, source, id)
    if not ok then
        log(ERR, "worker-events: event callback failed; source=", source,
                 ", event=", event, ", ", who, "=", tostring(id),
                 " error='", tostring(err), "'")
    end
end
_M.call_handler = call_handler

local function call_list(l, weak, funcs, data, event, source, who, id)
    local list = weak and l.wlist or l.list
    local key = weak and "wn" or "n"
    local i, stop = 1, l[key]
    while i <= stop do
        local handler = list[i]
        if funcs and handler then
            handler = funcs[handler]
        end
        if type(handler) ~= "function" then
            local n = l[key]
            for j = i, n - 1 do
                list[j] = list[j + 1]
            end
            list[n] = nil
            l[key] = n - 1
            stop = stop - 1
        else
            call_handler(handler, data, event, source, who, id)
            i = i + 1
        end
    end
end

-- Weak entries first, then strong ones, as the original does.
local function call_level(l, funcs, data, event, source, who, id)
    if l then
        if l.wn > 0 then
            call_list(l, true, funcs, data, event, source, who, id)
        end
        if l.n > 0 then
            call_list(l, false, funcs, data, event, source, who, id)
        end
    end
end

-- Calls the handlers of an event: those of every source and event, of
-- every source and this event, of this source, of this source and event.
function _M:dispatch(funcs, data, event, source, who, id)
    if debug_on() then
        log(DEBUG, "worker-events: handling event; source=", source,
                   ", event=", event, ", ", who, "=", id)
    end
    local any, by_source = self.any, self.by_source
    local by_event = by_source[any]
    if by_event then
        call_level(by_event[any], funcs, data, event, source, who, id)
        if event ~= any then
            call_level(by_event[event], funcs, data, event, source, who, id)
        end
    end
    by_event = source ~= any and by_source[source]
    if by_event then
        call_level(by_event[any], funcs, data, event, source, who, id)
        if event ~= any then
            call_level(by_event[event], funcs, data, event, source, who, id)
        end
    end
end

return _M
