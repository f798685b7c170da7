-- The `?/init.lua` entry of resty.events.compat. Requiring resty.events
-- through the same path runs resty/events/init.lua, which puts this tree's
-- `?.lua` pattern on package.path; then resty/events/compat.lua is loaded.

require "resty.events"
local dir = debug.getinfo(1, "S").source:match("^@(.*)/init%.lua$")   -- .../resty/events/compat
return assert(loadfile(dir .. ".lua"))(...)
