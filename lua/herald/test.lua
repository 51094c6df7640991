--- herald.test: drive a herald app from busted specs over real sockets.
--
--   local t = require "herald.test"
--   local res = t.get(app, "/hello/x")
--   assert.equal(200, res.status)
--
-- The app listens on 127.0.0.1, port 0, the first time a spec speaks to it;
-- every wait runs the loop in the spec's process and is bounded by
-- t.timeout seconds (5 unless set), times t.scale.
local core = require "herald.core"

-- t.scale multiplies every wait's bound: HERALD_TIME_SCALE (default 1) gives
-- slow runs (valgrind) more time without editing the specs.
local t = { timeout = 5, scale = tonumber(os.getenv("HERALD_TIME_SCALE")) or 1 }

--- The app's test port, listening on first use.
function t.port(app)
  if type(app) == "number" then return app end
  if not app._test_port then
    app._test_port = assert(app:listen { host = "127.0.0.1", port = 0 })
  end
  return app._test_port
end

--- Runs the loop until done() returns a true value, which it returns.
-- Raises "timed out waiting for <what>" after timeout (times t.scale) seconds.
function t.wait(done, timeout, what)
  local deadline = core.now() + (timeout or t.timeout) * t.scale * 1000
  while true do
    local v = done()
    if v then return v end
    local left = deadline - core.now()
    if left <= 0 then error("timed out waiting for " .. (what or "a condition"), 2) end
    core.run_once(math.min(left, 50))
  end
end

--- Runs the loop for ms milliseconds.
function t.sleep(ms)
  local deadline = core.now() + ms
  while core.now() < deadline do core.run_once(deadline - core.now()) end
end

local client_methods = {}
local client_mt = { __index = client_methods }

--- Starts a raw TCP connection without waiting for it: for use inside
-- herald.run(), where the spec cannot drive the loop. Bytes sent before the
-- connection is up are sent once it is.
function t.open(app, host)
  local c = setmetatable({ buffer = "", connected = false, closed = false }, client_mt)
  c.socket = assert(core.connect(host or "127.0.0.1", t.port(app), function(event, data)
    if event == "connect" then
      c.connected = true
    elseif event == "data" then
      c.buffer = c.buffer .. data
    else -- eof or error: like a browser, close our side too
      c.closed = true
      c.error = event == "error" and data or nil
      if event == "eof" then c.socket:close() end
    end
  end))
  return c
end

--- A raw TCP connection to the app (or a port): c:send(bytes),
-- c:read_until(pattern), c:response(), c:wait_closed(), c.buffer, c.closed.
function t.connect(app, host)
  local c = t.open(app, host)
  t.wait(function() return c.connected or c.closed end, nil, "connect")
  if not c.connected then error("connect failed: " .. tostring(c.error), 2) end
  return c
end

function client_methods:send(bytes)
  assert(self.socket:write(bytes))
  return self
end

--- Waits until the buffer matches pattern (a Lua pattern), and returns the
-- captures (or the match).
function client_methods:read_until(pattern, timeout)
  local result
  t.wait(function()
    result = table.pack(self.buffer:find(pattern))
    return result[1] ~= nil or self.closed
  end, timeout, "data matching " .. pattern)
  if result[1] == nil then return nil, "closed" end
  if result.n > 2 then return table.unpack(result, 3, result.n) end
  return self.buffer:sub(result[1], result[2])
end

--- Waits for the server to close the connection; returns everything read.
function client_methods:wait_closed(timeout)
  t.wait(function() return self.closed end, timeout, "the server to close")
  return self.buffer
end

--- Takes one complete response off the buffer, waiting for it; nil, "closed"
-- if the connection closed first. opts.head: the request was HEAD.
function client_methods:response(opts)
  local res, rest
  t.wait(function()
    res, rest = t.parse_response(self.buffer, opts, self.closed)
    return res or self.closed
  end, opts and opts.timeout, "a response")
  if not res then return nil, "closed" end
  self.buffer = rest
  return res
end

function client_methods:close()
  self.socket:close()
  self.closed = true
end

--- Drops the connection with a RST (SO_LINGER 0) instead of a FIN, as a
-- peer that crashes or closes with unread data does.
function client_methods:reset()
  self.socket:reset()
  self.closed = true
end

function client_methods:shutdown()
  self.socket:shutdown()
end

--- Parses one HTTP/1.1 response at the start of buffer: returns the
-- response { status, reason, headers (lowercased names), body } and the
-- rest of the buffer, or nil when it is not complete yet. eof: the
-- connection closed, so a body without a length ends here.
function t.parse_response(buffer, opts, eof)
  local head_end = buffer:find("\r\n\r\n", 1, true)
  if not head_end then return nil end
  local head = buffer:sub(1, head_end - 1)
  local status_line, header_lines = head:match("^([^\r\n]*)\r\n?(.*)$")
  local version, status, reason = status_line:match("^(HTTP/%d%.%d) (%d%d%d) ?(.*)$")
  if not version then error("not an HTTP response: " .. status_line, 2) end
  local res = { version = version, status = tonumber(status), reason = reason, headers = {} }
  for line in (header_lines .. "\r\n"):gmatch("([^\r\n]*)\r\n") do
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then
      name = name:lower()
      res.headers[name] = res.headers[name] and (res.headers[name] .. ", " .. value) or value
    end
  end
  local body_start = head_end + 4
  local bodiless = (opts and opts.head) or res.status < 200 or res.status == 204 or res.status == 304
  local length = tonumber(res.headers["content-length"])
  if bodiless then
    res.body = ""
  elseif length then
    if #buffer - body_start + 1 < length then return nil end
    res.body = buffer:sub(body_start, body_start + length - 1)
    body_start = body_start + length
  elseif eof then
    res.body = buffer:sub(body_start)
    body_start = #buffer + 1
  else
    return nil
  end
  return res, buffer:sub(body_start)
end

local function encode_request(method, path, headers, body)
  headers = headers or {}
  local lines = { ("%s %s HTTP/1.1"):format(method, path) }
  local has = {}
  for k, v in pairs(headers) do
    lines[#lines + 1] = k .. ": " .. v
    has[k:lower()] = true
  end
  if not has.host then lines[#lines + 1] = "Host: test" end
  if body and not has["content-length"] and not has["transfer-encoding"] then
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  return table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
end
t.encode_request = encode_request

--- One request on a new connection: opts { method, path, headers, body,
-- timeout }. Returns the response.
function t.request(app, opts)
  local method = opts.method or "GET"
  local c = t.connect(app)
  c:send(encode_request(method, opts.path or "/", opts.headers, opts.body))
  local res, err = c:response { head = method == "HEAD", timeout = opts.timeout }
  c:close()
  if not res then error("no response: connection " .. err, 2) end
  return res
end

function t.get(app, path, headers)
  return t.request(app, { method = "GET", path = path, headers = headers })
end

function t.head(app, path, headers)
  return t.request(app, { method = "HEAD", path = path, headers = headers })
end

function t.post(app, path, body, headers)
  return t.request(app, { method = "POST", path = path, body = body, headers = headers })
end

function t.put(app, path, body, headers)
  return t.request(app, { method = "PUT", path = path, body = body, headers = headers })
end

function t.delete(app, path, headers)
  return t.request(app, { method = "DELETE", path = path, headers = headers })
end

-- ---- Server-Sent Events ----

local sse_methods = {}
local sse_mt = { __index = sse_methods }

--- Opens an SSE stream: opts { headers, last_event_id, query, timeout }.
-- Returns the stream once the response head arrived: s.status, s.headers;
-- for a refusal (not 200) s.body holds the answer. Then s:next() reads
-- events as the HTML standard's parser does.
function t.sse(app, path, opts)
  opts = opts or {}
  local headers = { Accept = "text/event-stream" }
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  if opts.last_event_id then headers["Last-Event-ID"] = opts.last_event_id end
  local c = t.connect(app)
  c:send(encode_request("GET", path, headers))
  local s = setmetatable({ app = app, path = path, opts = opts, client = c, events = {},
    last_id = opts.last_event_id, comments = 0, pending = { data = {}, event = nil } }, sse_mt)
  local head_end
  t.wait(function()
    head_end = c.buffer:find("\r\n\r\n", 1, true)
    return head_end or c.closed
  end, opts.timeout, "an SSE response head")
  if not head_end then error("SSE: connection closed before a response", 2) end
  if c.buffer:match("^HTTP/1%.1 200 ") then
    local res = t.parse_response(c.buffer:sub(1, head_end + 3) , { head = true })
    s.status, s.headers = res.status, res.headers
    c.buffer = c.buffer:sub(head_end + 4)
  else
    local res = c:response()
    s.status, s.headers, s.body = res.status, res.headers, res.body
    c:close()
  end
  return s
end

-- Feeds the stream's buffered bytes through the event-stream parser.
function sse_methods:_parse()
  local c = self.client
  while true do
    local buf = c.buffer
    local i = buf:find("[\r\n]")
    if not i then return end
    local eol = i
    if buf:sub(i, i) == "\r" then
      if i == #buf and not c.closed then return end -- a \n may follow
      if buf:sub(i + 1, i + 1) == "\n" then eol = i + 1 end
    end
    local line = buf:sub(1, i - 1)
    c.buffer = buf:sub(eol + 1)
    self:_line(line)
  end
end

function sse_methods:_line(line)
  local p = self.pending
  if line == "" then
    if #p.data > 0 then
      self.events[#self.events + 1] = { id = self.last_id, event = p.event or "message",
        data = table.concat(p.data, "\n") }
    end
    self.pending = { data = {} }
    return
  end
  if line:sub(1, 1) == ":" then
    self.comments = self.comments + 1
    return
  end
  local field, value = line:match("^([^:]*):? ?(.*)$")
  if not line:find(":", 1, true) then field, value = line, "" end
  if field == "data" then
    p.data[#p.data + 1] = value
  elseif field == "event" then
    p.event = value
  elseif field == "id" then
    if not value:find("%z") then self.last_id = value end
  elseif field == "retry" then
    if value:match("^%d+$") then self.retry = tonumber(value) end
  end
end

--- The next event { id, event, data }, waiting up to timeout seconds;
-- nil, "closed" or nil, "timeout".
function sse_methods:next(timeout)
  local ok = pcall(t.wait, function()
    self:_parse()
    return #self.events > 0 or self.client.closed
  end, timeout, "an SSE event")
  self:_parse()
  if #self.events > 0 then return table.remove(self.events, 1) end
  return nil, self.client.closed and "closed" or (ok and "closed" or "timeout")
end

--- The next n events (raises if they do not all arrive in time).
function sse_methods:take(n, timeout)
  local list = {}
  for i = 1, n do
    local ev, err = self:next(timeout)
    if not ev then error(("SSE: event %d of %d: %s"):format(i, n, err), 2) end
    list[i] = ev
  end
  return list
end

--- Whether the server closed the stream.
function sse_methods:closed()
  return self.client.closed
end

function sse_methods:close()
  self.client:close()
end

--- Closes this stream and opens the same one again, resuming with the last
-- id seen (Last-Event-ID), as a browser's EventSource does.
function sse_methods:reconnect(opts)
  if not self.client.closed then self:close() end
  local o = {}
  for k, v in pairs(self.opts) do o[k] = v end
  for k, v in pairs(opts or {}) do o[k] = v end
  o.last_event_id = self.last_id
  return t.sse(self.app, self.path, o)
end

-- ---- WebSocket ----

local ws_methods = {}
local ws_mt = { __index = ws_methods }
local opcodes = { continuation = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 }
local kinds = {}
for k, v in pairs(opcodes) do kinds[v] = k end

local function mask(payload, key)
  local out, k = {}, { key:byte(1, 4) }
  for i = 1, #payload, 4096 do
    local chunk = { payload:byte(i, math.min(i + 4095, #payload)) }
    for j = 1, #chunk do chunk[j] = chunk[j] ~ k[(i + j - 2) % 4 + 1] end
    out[#out + 1] = string.char(table.unpack(chunk))
  end
  return table.concat(out)
end

--- One client frame: opts { fin = true, rsv = 0, masked = true, length =
-- override of the length field }. kind: a name or an opcode number.
function t.ws_frame(kind, payload, opts)
  opts = opts or {}
  payload = payload or ""
  local opcode = type(kind) == "number" and kind or opcodes[kind]
  local fin = opts.fin == false and 0 or 0x80
  local len = opts.length or #payload
  local masked = opts.masked ~= false
  local head = string.char(fin | ((opts.rsv or 0) << 4) | opcode)
  local mbit = masked and 0x80 or 0
  if len < 126 then
    head = head .. string.char(mbit | len)
  elseif len <= 0xFFFF then
    head = head .. string.char(mbit | 126) .. string.pack(">I2", len)
  else
    head = head .. string.char(mbit | 127) .. string.pack(">I8", len)
  end
  if not masked then return head .. payload end
  local key = string.char(math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255))
  return head .. key .. mask(payload, key)
end

--- Opens a WebSocket: opts { headers, protocols = {...}, query, timeout }.
-- Returns the client once the handshake's answer arrived: w.status (101 when
-- open), w.headers, w.protocol; a refusal's body in w.body.
function t.ws(app, path, opts)
  opts = opts or {}
  local headers = {
    Upgrade = "websocket", Connection = "Upgrade", ["Sec-WebSocket-Version"] = "13",
    ["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ==",
  }
  if opts.protocols then headers["Sec-WebSocket-Protocol"] = table.concat(opts.protocols, ", ") end
  for k, v in pairs(opts.headers or {}) do headers[k] = v or nil end
  local c = t.connect(app)
  c:send(encode_request("GET", path, headers))
  local w = setmetatable({ client = c, app = app, path = path, opts = opts }, ws_mt)
  local head_end
  t.wait(function()
    head_end = c.buffer:find("\r\n\r\n", 1, true)
    return head_end or c.closed
  end, opts.timeout, "a WebSocket handshake answer")
  if not head_end then error("WebSocket: connection closed before an answer", 2) end
  if c.buffer:match("^HTTP/1%.1 101 ") then
    local res = t.parse_response(c.buffer:sub(1, head_end + 3), { head = true })
    w.status, w.headers = res.status, res.headers
    w.protocol = res.headers["sec-websocket-protocol"]
    c.buffer = c.buffer:sub(head_end + 4)
  else
    local res = c:response()
    w.status, w.headers, w.body = res.status, res.headers, res.body
    c:close()
  end
  return w
end

--- Sends a message (one frame): kind "text" (default), "binary", "ping",
-- "pong", or any frame made with t.ws_frame via w:send_raw.
function ws_methods:send(data, kind)
  self.client:send(t.ws_frame(kind or "text", data))
  return self
end

function ws_methods:send_raw(bytes)
  self.client:send(bytes)
  return self
end

--- Takes one whole frame off the buffer: { kind, data, fin, opcode, code, reason }.
local function take_frame(c)
  local buf = c.buffer
  if #buf < 2 then return nil end
  local b1, b2 = buf:byte(1, 2)
  local len, pos = b2 & 0x7F, 3
  if len == 126 then
    if #buf < 4 then return nil end
    len, pos = string.unpack(">I2", buf, 3)
  elseif len == 127 then
    if #buf < 10 then return nil end
    len, pos = string.unpack(">I8", buf, 3)
  end
  if b2 & 0x80 ~= 0 then error("WebSocket: the server sent a masked frame") end
  if #buf < pos + len - 1 then return nil end
  local payload = buf:sub(pos, pos + len - 1)
  c.buffer = buf:sub(pos + len)
  local f = { opcode = b1 & 0x0F, fin = b1 & 0x80 ~= 0, rsv = (b1 >> 4) & 7, data = payload }
  f.kind = kinds[f.opcode] or "unknown"
  if f.kind == "close" and #payload >= 2 then
    f.code = string.unpack(">I2", payload)
    f.reason = payload:sub(3)
  end
  return f
end

--- The next frame from the server, waiting up to timeout seconds; nil,
-- "closed" or nil, "timeout".
function ws_methods:receive(timeout)
  local f
  local ok = pcall(t.wait, function()
    f = take_frame(self.client)
    return f or self.client.closed
  end, timeout, "a WebSocket frame")
  f = f or take_frame(self.client)
  if f then return f end
  return nil, self.client.closed and "closed" or (ok and "closed" or "timeout")
end

--- Sends a close frame (code 1000 unless given) and waits for the server's
-- answer; returns the server's close frame (or nil, why).
function ws_methods:close(code, reason)
  local payload = code == false and "" or string.pack(">I2", code or 1000) .. (reason or "")
  self.client:send(t.ws_frame("close", payload))
  while true do
    local f, err = self:receive()
    if not f then return nil, err end
    if f.kind == "close" then return f end
  end
end

--- Whether the server closed the TCP connection.
function ws_methods:closed()
  return self.client.closed
end

--- Waits for the server to close the TCP connection.
function ws_methods:wait_closed(timeout)
  return pcall(t.wait, function() return self.client.closed end, timeout, "the server to close")
end

function ws_methods:abort()
  self.client:close()
end

return t
