-- Whether nginx's error log takes debug lines at all: a hot path (every
-- event handled, every event posted) skips building a debug line nobody
-- keeps. ngx.log is a plain C function, which also cuts LuaJIT's traces
-- in two. The level is the error_log directive's, fixed for the cycle:
-- read once, on first use; unknown (no ngx.errlog), lines are logged.

local on

return function()
    if on == nil then
        local ok, errlog = pcall(require, "ngx.errlog")
        local level = ok and errlog.get_sys_filter_level and errlog.get_sys_filter_level()
        on = not level or level >= ngx.DEBUG
    end
    return on
end
