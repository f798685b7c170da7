-- resty.workerbus.tail: watch the event bus as Server-Sent Events, for
-- debugging. `require("resty.workerbus").tail(opts)` in a content handler
-- streams every event of the zone's ring as it is read by this worker:
--
--   id: <seq>
--   data: {"seq":..,"source":..,"event":..,"pid":..,"size":..,"unique":false}
--
-- ("payload" is added only with opts.payload = true: payloads may be
-- private). The worker's own event poller feeds the stream through a tap
-- (resty.workerbus.events_core): posters never see the tail, and every
-- worker, this one included, still gets every event. The events waiting for
-- a client are bounded (opts.max_pending events, opts.max_bytes bytes): a
-- client that does not keep up is sent an `event: cutoff` message, after what
-- it already has, and the stream ends, rather than the worker holding memory.

local ffi = require "ffi"
local cjson = require("cjson.safe").new()
local semaphore = require "ngx.semaphore"
local need = require "resty.workerbus.need"

local core = need "resty.workerbus.events_core"
local record = need "resty.workerbus.record"

local ffi_string = ffi.string
local concat = table.concat
local type = type
local pairs = pairs
local pcall = pcall
local tostring = tostring
local ngx = ngx
local log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local INFO = ngx.INFO

local encode = cjson.encode

local _M = { _VERSION = "0.1.0" }

-- The poller hands this worker up to 8192 events per pass before the stream
-- can write: the defaults let a client that keeps up take such a burst.
local DEFAULTS = { max_pending = 10000, max_bytes = 4 * 1024 * 1024, keepalive = 15 }

local function check_opts(opts)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        return nil, "tail: opts must be a table"
    end
    local o = { payload = opts.payload, zone = opts.zone }
    if o.payload ~= nil and type(o.payload) ~= "boolean" then
        return nil, "tail: opts.payload must be a boolean"
    end
    if o.zone ~= nil and type(o.zone) ~= "string" then
        return nil, "tail: opts.zone must be a string"
    end
    for name, default in pairs(DEFAULTS) do
        local v = opts[name]
        if v == nil then
            v = default
        elseif type(v) ~= "number" or v <= 0 or (name ~= "keepalive" and v % 1 ~= 0) then
            return nil, "tail: opts." .. name .. " must be a positive "
                        .. (name == "keepalive" and "number of seconds" or "integer")
                        .. ", not " .. tostring(v)
        end
        o[name] = v
    end
    return o
end

-- Sources and event names repeat: their JSON text is kept (a bounded cache).
local names, nnames = {}, 0
local function name_json(s)
    local j = names[s]
    if not j then
        if nnames >= 1024 then
            names, nnames = {}, 0
        end
        j = encode(s)
        names[s] = j
        nnames = nnames + 1
    end
    return j
end

-- One SSE frame for a record; its JSON fields in a fixed order, for people.
local function frame(seq, pid, source, event, ulen, dlen, p, kind, api, with_payload)
    local payload = ""
    if with_payload then
        if kind == record.KIND_SBUF and api == 0 then
            -- a resty.worker.events table that cjson gives back unchanged
            -- (record.encode): shown as the JSON text it would have been
            local ok, data = record.decode(kind, p, dlen)
            local json = ok and encode(data)
            payload = json and ',"payload":' .. encode(json)
                      or ',"payload_base64":"' .. ngx.encode_base64(ffi_string(p, dlen)) .. '"'
        elseif kind == record.KIND_SBUF then   -- LuaJIT string.buffer serialization: binary
            payload = ',"payload_base64":"' .. ngx.encode_base64(ffi_string(p, dlen)) .. '"'
        elseif kind == record.KIND_NIL then
            payload = ',"payload":null'
        else                       -- a raw string, or JSON text
            payload = ',"payload":' .. encode(ffi_string(p, dlen))
        end
    end
    return "id: " .. seq .. '\ndata: {"seq":' .. seq .. ',"source":' .. name_json(source)
           .. ',"event":' .. name_json(event) .. ',"pid":' .. pid .. ',"size":' .. dlen
           .. ',"unique":' .. (ulen > 0 and "true" or "false") .. payload .. "}\n\n"
end

-- Streams events until the client goes away, is too slow, or the worker exits.
-- Returns nil, err for bad options or when events cannot be read here.
function _M.tail(opts)
    local o, err = check_opts(opts)
    if not o then
        return nil, err
    end
    if ngx.get_phase() ~= "content" then
        return nil, "tail: call it from a content handler (content_by_lua*), not in "
                    .. ngx.get_phase()
    end
    local zone, aerr = core.attach(o.zone, o.zone ~= nil)
    if not zone then
        return nil, "tail: " .. tostring(aerr)
    end
    -- Events posted from now on: a worker whose poller had nothing to do
    -- may still hold older ones, which are not what "tail" means.
    local _, from_seq = core.position()
    from_seq = from_seq or 0
    local who = ngx.var.remote_addr .. ":" .. tostring(ngx.var.remote_port)
    local sema = semaphore.new(0)
    local q, qn, qbytes, qfirst = {}, 0, 0, nil
    local waiting, cut = false, nil
    local tap = {}
    function tap.record(seq, pid, source, event, ulen, dlen, p, kind, api)
        if cut or seq < from_seq then
            return
        end
        local f = frame(seq, pid, source, event, ulen, dlen, p, kind, api, o.payload)
        if qn + 1 > o.max_pending or qbytes + #f > o.max_bytes then
            cut = { seq = qfirst or seq, pending = qn, bytes = qbytes }
            q, qn, qbytes, qfirst = {}, 0, 0, nil   -- let the memory go now
            log(WARN, "workerbus tail: ", who, " cutting off a slow client: ", cut.pending,
                      " events (", cut.bytes, " bytes) wait to be sent; the stream ends after them")
        else
            qn = qn + 1
            q[qn] = f
            qbytes = qbytes + #f
            qfirst = qfirst or seq
        end
        if waiting then
            waiting = false
            sema:post(1)
        end
    end
    function tap.lagged(n)
        if cut then
            return
        end
        qn = qn + 1
        q[qn] = "event: lagged\ndata: " .. encode({ missed = n }) .. "\n\n"
        if waiting then
            waiting = false
            sema:post(1)
        end
    end

    local owner = {}
    core.add_tap(tap)
    local ok, lerr = core.want_loop(owner, 1)
    if not ok then
        core.remove_tap(tap)
        return nil, "tail: " .. tostring(lerr)
    end

    local reason = "client closed the stream"
    local function stream()
        ngx.status = 200
        ngx.header["Content-Type"] = "text/event-stream"
        ngx.header["Cache-Control"] = "no-cache"
        ngx.header["X-Accel-Buffering"] = "no"
        local sent = ngx.print(": workerbus tail of zone \"", core.zone_name(), "\", worker ",
                               ngx.worker.pid(), "; payloads ", o.payload and "shown" or "hidden",
                               "\nretry: 3000\n\n")
        if sent then
            sent = ngx.flush(true)
        end
        log(INFO, "workerbus tail: ", who, " started (zone \"", core.zone_name(), "\")")
        local last_write = ngx.now()
        while sent do
            if qn == 0 and not cut then
                -- Wake at least every second: a reload or stop must not wait
                -- for the keep-alive period to end this stream.
                waiting = true
                sema:wait(1)
                waiting = false
                if ngx.worker.exiting() then
                    reason = "worker exiting"
                    ngx.print("event: end\ndata: {\"reason\":\"the nginx worker is exiting\"}\n\n")
                    ngx.flush(true)
                    return
                end
                if qn == 0 and not cut and ngx.now() - last_write >= o.keepalive then
                    q[1], qn = ": keep-alive\n\n", 1   -- also finds a client that left
                end
            end
            if qn > 0 then
                local batch = concat(q, "", 1, qn)
                q, qn, qbytes, qfirst = {}, 0, 0, nil
                sent = ngx.print(batch)
                if sent then
                    sent = ngx.flush(true)   -- waits while the client reads; the tap keeps counting
                end
                ngx.update_time()
                last_write = ngx.now()
            elseif cut then
                reason = "client too slow"
                local msg = "client too slow: more than " .. (cut.pending >= o.max_pending
                            and (o.max_pending .. " events") or (o.max_bytes .. " bytes"))
                            .. " were waiting to be sent; events from seq " .. cut.seq
                            .. " on were not sent and the stream ends here"
                log(WARN, "workerbus tail: ", who, " cut off: ", msg)
                ngx.print("event: cutoff\ndata: ", encode({ reason = msg, first_unsent_seq = cut.seq }),
                          "\n\n")
                ngx.flush(true)
                return
            end
        end
    end
    local sok, serr = pcall(stream)
    if not sok then
        reason = "error: " .. tostring(serr)
        log(ERR, "workerbus tail: ", who, " failed: ", serr)
    end
    core.remove_tap(tap)
    core.want_loop(owner, 0)
    log(INFO, "workerbus tail: ", who, " ended: ", reason)
    return true
end

return _M
