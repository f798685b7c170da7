-- resty.workerbus.cluster: worker events for every worker of every node
-- sharing the PostgreSQL database (docs/postgres.md). resty.worker.events
-- (post_cluster) and resty.events (publish_cluster) call this; the event
-- arrives in each node's event ring like a local one, so handlers receive
-- it with their usual signature (the poster's pid is 0, its worker id nil:
-- it came from another machine).

local ffi = require "ffi"
local need = require "resty.workerbus.need"

local wb = need "resty.workerbus"
need "resty.workerbus.pg"  -- declares the FFI functions
local cjson = require("cjson.safe").new()

local C = ffi.C
local type = type
local tostring = tostring

local KIND_RAW, KIND_JSON, KIND_NIL = 0, 1, 2

local _M = { _VERSION = "0.1.0" }

-- api: 0 (resty.worker.events) or events_core.FLAG_EVENTS (resty.events).
function _M.post(source, event, data, api)
    if type(source) ~= "string" or source == "" then
        return nil, "source must be a non-empty string"
    end
    if type(event) ~= "string" or event == "" then
        return nil, "event must be a non-empty string"
    end
    local d, kind
    local t = type(data)
    if t == "string" then
        d, kind = data, KIND_RAW
    elseif t == "nil" then
        d, kind = "", KIND_NIL
    else
        local err
        d, err = cjson.encode(data)
        if not d then
            return nil, "cannot encode data as JSON: " .. tostring(err)
        end
        kind = KIND_JSON
    end
    local rc = C.workerbus_pg_post_event(source, #source, event, #event, d, #d, kind + (api or 0))
    if rc ~= 0 then
        return nil, wb.last_error()
    end
    return true
end

return _M
