--- Topic rules: app:topic(pattern, opts). A pattern is an exact name, a
-- prefix ending in "*" ("room:*"), or "*" alone; the most specific rule
-- wins (exact, then the longest prefix, then "*"), and what it leaves out
-- comes from the app's defaults.
local options = require "herald.options"

local topics = {}

local rule_schema = {
  history = { type = "integer", min = 0, max = 1000000 },
  max_age = { type = "number", min = 0, max = 31536000 },
  policy = { type = "string" },
  allow = { type = "function" },
  join = { type = "function" },
  leave = { type = "function" },
}

local policies = { close = true, conflate = true }

local registry_methods = {}
local registry_mt = { __index = registry_methods }

--- defaults: { history, max_age (s), policy }
function topics.new(defaults)
  return setmetatable({ exact = {}, prefixes = {}, defaults = defaults }, registry_mt)
end

local function check_pattern(pattern, level)
  if type(pattern) ~= "string" or pattern == "" or #pattern > 1024 then
    error("topic: pattern must be a string of 1 to 1024 bytes", level + 1)
  end
  local star = pattern:find("*", 1, true)
  if star and star ~= #pattern then
    error("topic: '*' may only end a pattern: " .. pattern, level + 1)
  end
  return star and pattern:sub(1, -2) or nil
end

local function resolved(self, given)
  local d = self.defaults
  local history = given.history or d.history
  local max_age = given.max_age or d.max_age
  return {
    history = history,
    max_age_ms = math.floor(max_age * 1000 + 0.5),
    conflate = (given.policy or d.policy) == "conflate",
    allow = given.allow, join = given.join, leave = given.leave,
  }
end

--- Adds (or replaces) the rule for pattern.
function registry_methods:add(pattern, opts, level)
  level = (level or 1) + 1
  local prefix = check_pattern(pattern, level)
  local given = options.check(rule_schema, opts, "topic", level)
  if given.policy and not policies[given.policy] then
    error("topic: option 'policy' must be \"close\" or \"conflate\", got " .. given.policy, level)
  end
  local rule = resolved(self, given)
  if not prefix then
    self.exact[pattern] = rule
    return
  end
  for _, p in ipairs(self.prefixes) do
    if p.prefix == prefix then
      p.rule = rule
      return
    end
  end
  table.insert(self.prefixes, { prefix = prefix, rule = rule })
  table.sort(self.prefixes, function(a, b) return #a.prefix > #b.prefix end)
end

--- The rule for a topic name.
function registry_methods:resolve(name)
  local rule = self.exact[name]
  if rule then return rule end
  for _, p in ipairs(self.prefixes) do
    if name:sub(1, #p.prefix) == p.prefix then return p.rule end
  end
  if not self.default_rule then self.default_rule = resolved(self, {}) end
  return self.default_rule
end

return topics
