-- require that can be retried: a failed require leaves a sentinel in
-- package.loaded, and the next require of that name only says "loop or
-- previous error". Clearing it makes every attempt explain what is missing
-- (e.g. the load_module line). Requires nothing itself, so it always loads.

return function(name)
    local ok, mod = pcall(require, name)
    if not ok then
        package.loaded[name] = nil
        error(mod, 0)
    end
    return mod
end
