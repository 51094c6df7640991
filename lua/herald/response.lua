--- The response a handler fills: res:status(n):header(k, v):send(body), or
-- res:json(value), or res:file(path). A handler that returns without
-- sending gets its response sent as it stands (by default 200, empty).
local response = {}

local cjson_ok, cjson = pcall(require, "cjson.safe")

local content_types = {
  html = "text/html; charset=utf-8", htm = "text/html; charset=utf-8",
  css = "text/css; charset=utf-8", js = "text/javascript; charset=utf-8",
  mjs = "text/javascript; charset=utf-8", json = "application/json",
  txt = "text/plain; charset=utf-8", md = "text/markdown; charset=utf-8",
  xml = "application/xml", svg = "image/svg+xml", png = "image/png",
  jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif", webp = "image/webp",
  ico = "image/x-icon", wasm = "application/wasm", woff = "font/woff",
  woff2 = "font/woff2", pdf = "application/pdf", map = "application/json",
}
response.content_types = content_types

--- Largest file res:file serves: the whole file is read into memory.
response.max_file_size = 64 * 1024 * 1024

-- Headers herald computes itself, so a handler cannot contradict them.
local managed = { ["content-length"] = true, ["transfer-encoding"] = true, date = true }

local response_methods = {}
local response_mt = { __index = response_methods }

function response.new(conn, req)
  return setmetatable({ conn = conn, req = req, code = 200, headers = {}, sent = false },
    response_mt)
end

local function check_open(self, what)
  if self.sent then error(what .. ": the response was already sent", 3) end
end

--- The handler answers later (from a callback: Redis, a timer): herald
-- sends nothing when it returns. The connection's idle timeout still bounds
-- the wait.
function response_methods:defer()
  check_open(self, "defer")
  if not self.conn:defer() then error("defer: only inside the handler, before answering", 2) end
  self.deferred = true
  return self
end

function response_methods:status(code)
  check_open(self, "status")
  if math.type(code) ~= "integer" or code < 100 or code > 999 then
    error("status: code must be an integer from 100 to 999, got " .. tostring(code), 2)
  end
  self.code = code
  return self
end

--- Sets a header, replacing one of the same name; a list value sends the
-- header once per item (Set-Cookie).
function response_methods:header(name, value)
  check_open(self, "header")
  if type(name) ~= "string" or not name:match("^[!#$%%&'*+%-.^_`|~%w]+$") then
    error("header: name must be an HTTP token, got " .. tostring(name), 2)
  end
  if managed[name:lower()] then
    error("header: " .. name .. " is set by herald", 2)
  end
  local values = type(value) == "table" and value or { value }
  for i, v in ipairs(values) do
    if type(v) == "number" then v = tostring(v) end
    if type(v) ~= "string" or v:find("[\r\n%z]") then
      error("header: value for " .. name .. " must be a string without CR, LF or NUL", 2)
    end
    values[i] = v
  end
  local key = name:lower()
  for i = #self.headers, 1, -1 do
    if self.headers[i][1]:lower() == key then table.remove(self.headers, i) end
  end
  for _, v in ipairs(values) do self.headers[#self.headers + 1] = { name, v } end
  return self
end

function response_methods:get_header(name)
  local key = name:lower()
  for _, h in ipairs(self.headers) do
    if h[1]:lower() == key then return h[2] end
  end
end

--- Sends the response with body (a string, default empty). Returns true, or
-- nil and a message when the connection is already gone.
function response_methods:send(body)
  check_open(self, "send")
  if body == nil then body = "" end
  if type(body) ~= "string" then error("send: body must be a string, got " .. type(body), 2) end
  if body ~= "" and not self:get_header("content-type") then
    self:header("Content-Type", "text/plain; charset=utf-8")
  end
  self.sent = true
  local flat = {}
  for _, h in ipairs(self.headers) do
    flat[#flat + 1] = h[1]
    flat[#flat + 1] = h[2]
  end
  return self.conn:respond(self.code, flat, body)
end

--- Sends value encoded as JSON (lua-cjson).
function response_methods:json(value)
  check_open(self, "json")
  if not cjson_ok then error("json: lua-cjson is not installed", 2) end
  local body, err = cjson.encode(value)
  if not body then error("json: cannot encode: " .. tostring(err), 2) end
  if not self:get_header("content-type") then self:header("Content-Type", "application/json") end
  return self:send(body)
end

--- Sends a file with a content type from its extension. A path with a ".."
-- segment or a NUL byte, a missing file or a directory gets 404. With
-- opts.root the path is taken below that folder.
function response_methods:file(path, opts)
  check_open(self, "file")
  if type(path) ~= "string" then error("file: path must be a string", 2) end
  opts = opts or {}
  local escapes = path:find("%z") or ("/" .. path .. "/"):find("/%.%./")
  local full = opts.root and (opts.root:gsub("/+$", "") .. "/" .. path:gsub("^/+", "")) or path
  local f = not escapes and io.open(full, "rb")
  local dir = f and io.open(full .. "/") -- only a directory opens with a trailing slash
  if dir then dir:close() end
  local size = f and not dir and f:seek("end")
  if size and size > response.max_file_size then
    f:close()
    error(("file: %s is larger than response.max_file_size (%d bytes)")
      :format(full, response.max_file_size), 2)
  end
  local data = size and f:seek("set") and f:read("a") -- nil for a directory
  if f then f:close() end
  if not data then
    self.code = 404
    self.headers = {}
    return self:send("not found\n")
  end
  if not self:get_header("content-type") then
    local ext = full:match("%.([%w]+)$")
    self:header("Content-Type", content_types[ext and ext:lower()] or "application/octet-stream")
  end
  return self:send(data)
end

return response
