--- Routes by method and path. Patterns are split into segments: a literal
-- ("users"), a parameter (":id") or a splat ("*", last only, matching the
-- rest of the path). The most specific route wins whatever the order of
-- definition: at each segment a literal beats a parameter, which beats a
-- splat.
local router = {}
local router_methods = {}
local router_mt = { __index = router_methods }

local function decode(segment)
  return (segment:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

--- Splits a path into its non-empty segments, percent-decoded. (find, not
-- gmatch: every request comes here, and a gmatch state is half a kilobyte)
function router.segments(path)
  local out, at = {}, 1
  while true do
    local first, last = path:find("[^/]+", at)
    if not first then return out end
    local segment = path:sub(first, last)
    out[#out + 1] = segment:find("%", 1, true) and decode(segment) or segment
    at = last + 1
  end
end

local function new_node()
  return { literal = {}, param = nil, param_name = nil, splat = nil, splat_name = nil, handlers = nil }
end

function router.new()
  return setmetatable({ root = new_node() }, router_mt)
end

--- Adds a route; errors name the argument at fault.
function router_methods:add(method, pattern, handler)
  if type(method) ~= "string" or not method:match("^[A-Z]+$") then
    error("route: method must be an upper-case HTTP method name, got " .. tostring(method), 3)
  end
  if type(pattern) ~= "string" or pattern:sub(1, 1) ~= "/" then
    error("route: path must be a string starting with '/', got " .. tostring(pattern), 3)
  end
  if type(handler) ~= "function" and not (type(handler) == "table" and getmetatable(handler)
      and getmetatable(handler).__call) then
    error("route: handler must be a function", 3)
  end
  local node, parts = self.root, {}
  for segment in pattern:gmatch("[^/]+") do parts[#parts + 1] = segment end
  for i, segment in ipairs(parts) do
    local first = segment:sub(1, 1)
    if first == ":" then
      local name = segment:sub(2)
      if not name:match("^[%a_][%w_]*$") then
        error("route: bad parameter name in " .. pattern, 3)
      end
      if node.param and node.param_name ~= name then
        error(("route: %s names parameter ':%s' where another route has ':%s'")
          :format(pattern, name, node.param_name), 3)
      end
      node.param = node.param or new_node()
      node.param_name = name
      node = node.param
    elseif first == "*" then
      if i ~= #parts then error("route: '*' must be the last segment of " .. pattern, 3) end
      local name = segment:sub(2)
      if name == "" then name = "splat" end
      if node.splat and node.splat_name ~= name then
        error(("route: %s names splat '*%s' where another route has '*%s'")
          :format(pattern, name, node.splat_name), 3)
      end
      node.splat = node.splat or new_node()
      node.splat_name = name
      node = node.splat
    else
      local key = decode(segment)
      node.literal[key] = node.literal[key] or new_node()
      node = node.literal[key]
    end
  end
  node.handlers = node.handlers or {}
  if node.handlers[method] then
    error(("route: %s %s is defined twice"):format(method, pattern), 3)
  end
  node.handlers[method] = handler
end

-- Depth-first, most specific branch first. Calls visit(node, params) for each
-- node whose pattern matches the whole path, most specific first; stops when
-- visit returns true.
local function walk(node, segments, i, params, visit)
  if i > #segments then
    if node.handlers and visit(node, params) then return true end
    -- a splat also matches nothing after its prefix ("/static/*" matches "/static")
    if node.splat and node.splat.handlers then
      params[node.splat_name] = ""
      if visit(node.splat, params) then return true end
      params[node.splat_name] = nil
    end
    return false
  end
  local segment = segments[i]
  local child = node.literal[segment]
  if child and walk(child, segments, i + 1, params, visit) then return true end
  if node.param then
    params[node.param_name] = segment
    if walk(node.param, segments, i + 1, params, visit) then return true end
    params[node.param_name] = nil
  end
  if node.splat and node.splat.handlers then
    params[node.splat_name] = table.concat(segments, "/", i)
    if visit(node.splat, params) then return true end
    params[node.splat_name] = nil
  end
  return false
end

--- Finds the handler for method and path. Returns handler, params; or nil
-- and the list of methods the path does allow (empty: no route matches).
function router_methods:match(method, path)
  local segments = router.segments(path)
  local found, found_params
  local allowed = {}
  walk(self.root, segments, 1, {}, function(node, params)
    local handler = node.handlers[method] or (method == "HEAD" and node.handlers.GET)
    if handler then
      found = handler
      found_params = {}
      for k, v in pairs(params) do found_params[k] = v end
      return true
    end
    for m in pairs(node.handlers) do allowed[m] = true end
    return false
  end)
  if found then return found, found_params end
  local list = {}
  for m in pairs(allowed) do list[#list + 1] = m end
  if allowed.GET and not allowed.HEAD then list[#list + 1] = "HEAD" end
  table.sort(list)
  return nil, list
end

return router
