-- Reached only through a `?/init.lua` package path, the layout
-- lua-resty-events documents (`lua_package_path ".../lib/?/init.lua;;"`).
-- The modules of this tree are `?.lua` files: this file puts its tree's
-- `?.lua` pattern first on package.path and loads resty/events.lua. With a
-- `?.lua` path (or both) resty/events.lua is found first and this file is
-- never read. See docs/events.md, "Module layout".

local dir = debug.getinfo(1, "S").source:match("^@(.*)/init%.lua$")   -- .../resty/events
local root = dir and dir:match("^(.*)/resty/events$")
if not root then
    error("resty.events: cannot tell this tree's directory from " .. debug.getinfo(1, "S").source)
end
if not package.path:find(root .. "/?.lua", 1, true) then
    package.path = root .. "/?.lua;" .. package.path
end
return assert(loadfile(dir .. ".lua"))(...)
