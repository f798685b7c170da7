-- resty.workerbus.mlcache: an `ipc` for lua-resty-mlcache on the workerbus
-- event bus (docs/mlcache.md).
--
--   local mlcache = require "resty.mlcache"
--   local cache = mlcache.new("users", "cache_dict", {
--       ipc = require("resty.workerbus.mlcache").ipc(),   -- or ipc { cluster = true }
--   })
--
-- Built only on resty.worker.events' public API (register, post,
-- post_cluster, poll). Invalidations are worker events: the bus's own
-- background poller runs them in every worker as soon as they are posted, so
-- no one has to call cache:update(); update() (ipc.poll) still handles what
-- is pending at once, for code that calls it.
--
-- Semantics kept from mlcache's own shm ipc (resty.mlcache.ipc): a worker
-- never handles its own broadcasts (set/delete/purge already changed its L1
-- before broadcasting), every other worker does.
--
-- With cluster = true a broadcast goes twice: to this node's workers through
-- its event ring (so update() on this node sees it as soon as broadcast()
-- returned), and to every node through PostgreSQL (post_cluster). The copy
-- that comes back to this node through PostgreSQL carries this node's id and
-- is ignored here; the other nodes clear the entry from their own L2
-- (opts.shm, opts.shm_miss) and then run mlcache's handler (their L1).

local need = require "resty.workerbus.need"

local ev = need "resty.worker.events"

local ngx = ngx
local log = ngx.log
local WARN = ngx.WARN
local worker_pid = ngx.worker.pid
local get_phase = ngx.get_phase
local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local tonumber = tonumber
local find = string.find
local sub = string.sub

local DEFAULT_SOURCE = "workerbus.mlcache"
local KNOWN = { cluster = true, source = true, shm = true, shm_miss = true }
local INVALIDATIONS = "^mlcache:invalidations:(.*)$"   -- mlcache's channels
local PURGE = "^mlcache:purge:(.*)$"

local _M = { _VERSION = "0.1.0", DEFAULT_SOURCE = DEFAULT_SOURCE }

-- This node's id (status().node.id: host/master pid/start), read once per
-- worker. nil, err when it cannot be read (then nothing from the cluster is
-- taken for this node's own: an extra invalidation is harmless, a missed
-- one is not).
local node_id
local function this_node()
    if node_id then
        return node_id
    end
    local st, err = require("resty.workerbus").status()
    if not st then
        return nil, err
    end
    local node = st.node
    if type(node) ~= "table" or type(node.id) ~= "string" then
        return nil, "the status document has no node id"
    end
    node_id = node.id
    return node_id
end

-- Whether this node runs the PostgreSQL bridge. nil, err in init_by_lua
-- (the status is not readable there: the check is left to later calls).
local bridge_checked
local function check_bridge()
    if bridge_checked or get_phase() == "init" then
        return true
    end
    local st = require("resty.workerbus").status()
    if st and type(st.postgres) ~= "table" then
        return nil, "opts.cluster is true but the PostgreSQL bridge is not configured"
            .. " (no workerbus_postgres directive in nginx.conf)"
    end
    bridge_checked = true
    return true
end

-- Cluster payload: "<#node>:<node><data>".
local function cluster_payload(data)
    local node, err = this_node()
    if not node then
        return nil, "cannot read this node's id: " .. tostring(err)
    end
    return #node .. ":" .. node .. data
end

local function split_cluster(payload)
    if type(payload) ~= "string" then
        return nil
    end
    local colon = find(payload, ":", 1, true)
    local n = colon and tonumber(sub(payload, 1, colon - 1))
    if not n or n < 0 or n % 1 ~= 0 or colon + n > #payload then
        return nil
    end
    return sub(payload, colon + 1, colon + n), sub(payload, colon + n + 1)
end

-- Another node's broadcast reaches this node's L1s, but this node's L2 (its
-- own lua_shared_dict) still holds the old value, which the next get() would
-- put back in L1. So before a worker runs mlcache's handler for it, it
-- clears the entry from L2 itself, as mlcache's delete() or purge() on this
-- node would have done (every worker does it, so none can read the stale
-- entry after its L1 was cleared: deleting twice is harmless).
-- mlcache keys its L2 entries name .. key, the name being in the channel.
local function clear_l2(dicts, channel, data)
    local name = channel:match(INVALIDATIONS)
    if name then
        for i = 1, #dicts do
            dicts[i]:delete(name .. data)
        end
        return
    end
    if channel:match(PURGE) then
        for i = 1, #dicts do
            dicts[i]:flush_all()
        end
    end
end

local function listener(handler, channel, dicts)
    return function(data, _, _, pid)
        if pid == 0 then
            -- from PostgreSQL: another node's broadcast, or this node's own
            -- (already delivered here through the ring)
            local node, rest = split_cluster(data)
            if not node then
                log(WARN, "workerbus: mlcache ipc: ignored a cluster event on channel \"",
                    channel, "\" that no node sent (not <length>:<node><data>)")
                return
            end
            if node == this_node() then
                return
            end
            data = rest
            clear_l2(dicts, channel, data)
        elseif pid == worker_pid() then
            return   -- our own broadcast: our L1 is already up to date
        end
        handler(data)
    end
end

local function check_opts(opts)
    if opts == nil then
        return false, DEFAULT_SOURCE, {}
    end
    if type(opts) ~= "table" then
        error("opts must be a table, got " .. type(opts), 3)
    end
    for k in pairs(opts) do
        if not KNOWN[k] then
            error("unknown option " .. (type(k) == "string" and "opts." .. k
                  or "[" .. tostring(k) .. "]") .. " (known: cluster, source, shm, shm_miss)", 3)
        end
    end
    local cluster = opts.cluster
    if cluster ~= nil and type(cluster) ~= "boolean" then
        error("opts.cluster must be a boolean, got " .. type(cluster), 3)
    end
    local source = opts.source
    if source ~= nil then
        if type(source) ~= "string" then
            error("opts.source must be a string, got " .. type(source), 3)
        end
        if source == "" then
            error("opts.source must not be empty", 3)
        end
    end
    local dicts = {}
    for _, k in ipairs { "shm", "shm_miss" } do
        local name = opts[k]
        if name ~= nil then
            if type(name) ~= "string" then
                error("opts." .. k .. " must be a string, got " .. type(name), 3)
            end
            local dict = ngx.shared[name]
            if not dict then
                error("opts." .. k .. ": no such lua_shared_dict: " .. name, 3)
            end
            dicts[#dicts + 1] = dict
        end
    end
    if cluster and opts.shm == nil then
        error("opts.shm is required with opts.cluster = true: the lua_shared_dict"
              .. " of the mlcache instances (their L2), which broadcasts from other"
              .. " nodes must clear too", 3)
    end
    return cluster == true, source or DEFAULT_SOURCE, dicts
end

-- The table mlcache's `ipc` option takes.
function _M.ipc(opts)
    local cluster, source, dicts = check_opts(opts)
    if cluster then
        local ok, err = check_bridge()
        if not ok then
            error(err, 2)
        end
    end

    local ipc = { cluster = cluster, source = source }

    -- events: mlcache's self.events, { name = { channel = ..., handler = ... } }
    function ipc.register_listeners(events)
        if type(events) ~= "table" then
            return nil, "events must be a table, got " .. type(events)
        end
        for name, e in pairs(events) do
            local what = "events[" .. (type(name) == "string" and '"' .. name .. '"' or tostring(name)) .. "]"
            if type(e) ~= "table" then
                return nil, what .. " must be a table, got " .. type(e)
            end
            if type(e.channel) ~= "string" or e.channel == "" then
                return nil, what .. ".channel must be a non-empty string, got "
                    .. (e.channel == "" and "\"\"" or type(e.channel))
            end
            if type(e.handler) ~= "function" then
                return nil, what .. ".handler must be a function, got " .. type(e.handler)
            end
        end
        if cluster then
            local ok, err = check_bridge()
            if not ok then
                return nil, err
            end
        end
        for _, e in pairs(events) do
            ev.register(listener(e.handler, e.channel, dicts), source, e.channel)
        end
        return true
    end

    function ipc.broadcast(channel, data)
        if type(channel) ~= "string" or channel == "" then
            error("channel must be a non-empty string, got "
                  .. (channel == "" and "\"\"" or type(channel)), 2)
        end
        if type(data) ~= "string" then
            error("data must be a string, got " .. type(data), 2)
        end
        local ok, err, payload
        if cluster then
            ok, err = check_bridge()
            if not ok then
                return nil, err
            end
            payload, err = cluster_payload(data)
            if not payload then
                return nil, err
            end
        end
        ok, err = ev.post(source, channel, data)
        if not ok then
            return nil, err
        end
        if cluster then
            ok, err = ev.post_cluster(source, channel, payload)
            if not ok then
                return nil, "not sent to the other nodes (this node's workers have it): " .. tostring(err)
            end
        end
        return true
    end

    function ipc.poll(timeout)
        if timeout ~= nil and type(timeout) ~= "number" then
            error("timeout must be a number, got " .. type(timeout), 2)
        end
        local res, err = ev.poll()
        if not res then
            return nil, err
        end
        return true
    end

    return ipc
end

return _M
