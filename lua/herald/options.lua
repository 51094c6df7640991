--- Validates option tables against a schema: every option has a type, a
-- default and bounds; an unknown option or a bad value raises an error that
-- names it.
local options = {}

--- schema: { name = { default = v, type = "number"|"integer"|"string"|"boolean"|"function"|"table",
--                     min = n, max = n } }
function options.check(schema, given, what, level)
  level = (level or 1) + 1
  if given == nil then given = {} end
  if type(given) ~= "table" then
    error(("%s: options must be a table, got %s"):format(what, type(given)), level)
  end
  for k in pairs(given) do
    if schema[k] == nil then
      error(("%s: unknown option '%s'"):format(what, tostring(k)), level)
    end
  end
  local out = {}
  for name, rule in pairs(schema) do
    local v = given[name]
    if v == nil then
      v = rule.default
    else
      local ok = (rule.type == "integer" and math.type(v) == "integer")
        or (rule.type ~= "integer" and type(v) == rule.type)
      if not ok then
        error(("%s: option '%s' must be a%s %s, got %s"):format(what, name,
          rule.type == "integer" and "n" or "", rule.type, type(v)), level)
      end
      if v ~= v or (rule.min and v < rule.min) or (rule.max and v > rule.max) then
        error(("%s: option '%s' must be from %s to %s, got %s"):format(what, name,
          tostring(rule.min), tostring(rule.max), tostring(v)), level)
      end
    end
    out[name] = v
  end
  return out
end

return options
