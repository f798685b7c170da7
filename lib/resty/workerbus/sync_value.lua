-- resty.workerbus.sync_value: how resty.sync keeps a version or data value
-- in the zone (a type tag and bytes: strings as they are, numbers in %.17g,
-- booleans as "1"/"0", tables as JSON), and the copy of a task's update out
-- of the zone into Lua values.

local ffi = require "ffi"
local wb = require "resty.workerbus"
local cjson = require("cjson.safe").new()

local C = ffi.C
local ffi_string = ffi.string
local type = type
local tostring = tostring
local tonumber = tonumber
local str_format = string.format

-- Lua type tags of versions and data (src/module/sync.rs's, through K).
local K = wb.K
local T_STRING, T_NUMBER, T_BOOLEAN, T_TABLE =
    K.SYNC_T_STRING, K.SYNC_T_NUMBER, K.SYNC_T_BOOLEAN, K.SYNC_T_TABLE

local head = wb.sync_head   -- the scratch set's (resty.workerbus)
local get_buf = wb.get_buf
local copies = 0            -- updates copied out of the zone by this worker

local _M = {}

-- The type tag and bytes of v, or nil, err. Tables only when allow_table.
function _M.encode(v, allow_table)
    local t = type(v)
    if t == "string" then
        return T_STRING, v
    elseif t == "number" then
        return T_NUMBER, str_format("%.17g", v)
    elseif t == "boolean" then
        return T_BOOLEAN, v and "1" or "0"
    elseif t == "table" and allow_table then
        local s, err = cjson.encode(v)
        if not s then
            return nil, "table cannot be serialized: " .. tostring(err)
        end
        return T_TABLE, s
    end
    return nil, "a value of type " .. t .. " is not supported (string, number, boolean"
                .. (allow_table and ", table)" or ")")
end

local function decode(t, p, n)
    local s = ffi_string(p, n)
    if t == T_NUMBER then
        return tonumber(s)
    elseif t == T_BOOLEAN then
        return s == "1"
    elseif t == T_TABLE then
        return cjson.decode(s)
    end
    return s
end

-- Copies the task's update out of the zone when its sequence changed.
-- Returns true when the task has data.
function _M.refresh(task)
    local s = task.seqp[0]
    if s == task.seq then
        return s ~= 0
    end
    local z = task.zone
    local buf, cap = get_buf(0)
    local rc = C.workerbus_sync_read(z, task.idx, head, buf, cap)
    while rc == -2 do   -- again if a larger update landed between the two reads
        buf, cap = get_buf(tonumber(head.vlen + head.dlen))
        rc = C.workerbus_sync_read(z, task.idx, head, buf, cap)
    end
    if rc ~= 1 then
        return false
    end
    local vlen, dlen = tonumber(head.vlen), tonumber(head.dlen)
    task.version = decode(head.vtype, buf, vlen)
    task.data = decode(head.dtype, buf + vlen, dlen)
    task.modified = tonumber(head.modified_ms) / 1000
    task.seq = tonumber(head.seq)
    copies = copies + 1
    return true
end

-- How many updates this worker copied out of the zone (all instances).
function _M.copies()
    return copies
end

return _M
