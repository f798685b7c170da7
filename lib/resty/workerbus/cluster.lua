-- resty.workerbus.cluster: worker events for every worker of every node
-- sharing the PostgreSQL database (docs/postgres.md). resty.worker.events
-- (post_cluster) and resty.events (publish_cluster) call this; the event
-- arrives in each node's event ring like a local one, so handlers receive
-- it with their usual signature (the poster's pid is 0, its worker id nil:
-- it came from another machine).

local ffi = require "ffi"
local need = require "resty.workerbus.need"

local wb = need "resty.workerbus"
local record = need "resty.workerbus.record"
need "resty.workerbus.pg"  -- the bridge must be there

local C = ffi.C
local type = type

local _M = { _VERSION = "0.1.0" }

-- api: 0 (resty.worker.events) or record.FLAG_EVENTS (resty.events).
-- Tables travel as JSON whatever the API (nodes never send string.buffer data).
function _M.post(source, event, data, api)
    if type(source) ~= "string" or source == "" then
        return nil, "source must be a non-empty string"
    end
    if type(event) ~= "string" or event == "" then
        return nil, "event must be a non-empty string"
    end
    local d, dlen, kind = record.encode(data, false)
    if not dlen then
        return nil, kind
    end
    local rc = C.workerbus_pg_post_event(source, #source, event, #event, d, dlen,
                                        record.flags(kind, api or 0))
    if rc ~= 0 then
        return nil, wb.last_error()
    end
    return true
end

return _M
