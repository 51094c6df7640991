--- The request a handler receives: method, url, path, query, headers (read
-- case-insensitively), params, body, version, keep_alive, and peer().
local request = {}

local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

--- Decodes "a=1&b=x%20y" into { a = "1", b = "x y" }; a repeated key keeps
-- its first value, a key without "=" maps to "".
function request.parse_query(qs)
  local query = {}
  if qs == "" then return query end -- most requests: no gmatch state made
  for pair in qs:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k = unescape(k)
    if k ~= "" and query[k] == nil then query[k] = unescape(v) end
  end
  return query
end

local headers_mt = {
  __index = function(t, k)
    if type(k) == "string" then return rawget(t, k:lower()) end
  end,
}

--- Splits a request target into path and query string. Origin form
-- ("/p?q") and absolute form ("http://host/p?q") are accepted; anything
-- else returns nil.
function request.split_target(url)
  if url == "*" then return "*", "" end
  local rest = url:match("^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]*(.*)$")
  -- an empty path is "/": "http://host", "http://host?q" (RFC 9112 3.2.2)
  if rest then url = rest:sub(1, 1) == "/" and rest or "/" .. rest end
  if url:sub(1, 1) ~= "/" then return nil end
  url = url:gsub("#.*$", "")
  local path, qs = url:match("^([^?]*)%??(.*)$")
  return path, qs
end

local request_methods = {}
local request_mt = { __index = request_methods }

--- Makes the request object from the table the C server hands over; nil
-- when the target is not one herald serves.
function request.new(raw, conn)
  local path, qs = request.split_target(raw.url)
  if not path then return nil end
  raw.path = path
  raw.query_string = qs
  raw.query = request.parse_query(qs)
  raw.params = {}
  raw.conn = conn
  setmetatable(raw.headers, headers_mt)
  return setmetatable(raw, request_mt)
end

--- The client's address: ip, port.
function request_methods:peer()
  return self.conn:peer()
end

return request
