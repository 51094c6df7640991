-- Well-behaved clients for spec/chaos_spec.lua, in a process of their own
-- (so the chaos in busted's process cannot slow them down):
--   lua5.4 spec/chaos/watcher.lua PORT NSSE NWS [SECONDS]
-- opens NSSE Server-Sent Events streams (/events) and NWS WebSockets (/ws,
-- envelope format), prints "ready" once every one has its answer's head,
-- then reads as fast as it can until each has seen the message "end N".
-- Each must see the message numbers 1, 2, ..., N in order with consecutive
-- ids, then "end N". Prints one line per client:
--   result sse|ws I ok COUNT      or      result sse|ws I bad REASON
-- then "done", and exits; after SECONDS (default 150) it gives up on the
-- clients still waiting, which count as bad.
local core = require "herald.core"
local cjson = require "cjson"

local port, nsse, nws = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3])
local deadline = core.now() + (tonumber(arg[4]) or 150) * 1000
local clients = {}

-- Checks one message (id "epoch-seq", data "n ..." or "end N") against
-- what the client saw before.
local function message(cl, id, data)
  if cl.finished then return end
  local seq = tonumber(tostring(id):match("%-(%d+)$"))
  if not seq then return cl:fail("an id that is not epoch-seq: " .. tostring(id)) end
  if cl.seq and seq ~= cl.seq + 1 then
    return cl:fail(("id seq %d after %d"):format(seq, cl.seq))
  end
  cl.seq = seq
  local last = data:match("^end (%d+)$")
  if last then
    if tonumber(last) ~= cl.count then
      return cl:fail(("end %s after %d messages"):format(last, cl.count))
    end
    cl.finished = true
    return
  end
  local n = tonumber(data:match("^(%d+) "))
  if n ~= cl.count + 1 then
    return cl:fail(("message %s after %d"):format(tostring(n), cl.count))
  end
  cl.count = n
end

-- "id: X\ndata: Y\n\n" blocks; comments (heartbeats) and other fields skipped.
local function parse_sse(cl)
  local buf, pos = cl.buf, 1
  while true do
    local e = buf:find("\n\n", pos, true)
    if not e then break end
    local block = buf:sub(pos, e)
    pos = e + 2
    local id = block:match("^id: ([^\n]*)\n") or block:match("\nid: ([^\n]*)\n")
    local data = block:match("^data: ([^\n]*)\n") or block:match("\ndata: ([^\n]*)\n")
    if data then message(cl, id, data) end
  end
  cl.buf = buf:sub(pos)
end

-- Unmasked server frames; envelope text frames carry {topic, id, data}.
local function parse_ws(cl)
  local buf, pos = cl.buf, 1
  while #buf - pos + 1 >= 2 do
    local b1, b2 = buf:byte(pos, pos + 1)
    local len, at = b2 & 0x7F, pos + 2
    if len == 126 then
      if #buf - pos + 1 < 4 then break end
      len, at = string.unpack(">I2", buf, pos + 2)
    elseif len == 127 then
      if #buf - pos + 1 < 10 then break end
      len, at = string.unpack(">I8", buf, pos + 2)
    end
    if #buf < at + len - 1 then break end
    local payload = buf:sub(at, at + len - 1)
    pos = at + len
    local opcode = b1 & 0x0F
    if opcode == 1 then
      local ok, m = pcall(cjson.decode, payload)
      if not ok or type(m) ~= "table" then cl:fail("not an envelope: " .. payload:sub(1, 80))
      else message(cl, m.id, m.data) end
    elseif opcode == 9 then -- ping: pong with the same payload (masked, key 0)
      if len < 126 then cl.sock:write(string.char(0x8A, 0x80 | len) .. "\0\0\0\0" .. payload) end
    elseif opcode == 8 then
      cl:fail("closed by the server")
    end
  end
  cl.buf = buf:sub(pos)
end

local function open(kind, i)
  local cl = { kind = kind, i = i, buf = "", count = 0 }
  function cl.fail(self, why)
    if not self.finished then self.finished, self.bad = true, why end
  end
  local request = kind == "sse"
    and "GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    or ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
  local want = kind == "sse" and "^HTTP/1%.1 200 " or "^HTTP/1%.1 101 "
  cl.sock = assert(core.connect("127.0.0.1", port, function(event, data)
    if event == "connect" then
      cl.sock:write(request)
    elseif event == "data" then
      cl.buf = cl.buf .. data
      if not cl.head then
        local e = cl.buf:find("\r\n\r\n", 1, true)
        if not e then return end
        if not cl.buf:match(want) then return cl:fail("answer: " .. cl.buf:match("^[^\r\n]*")) end
        cl.head = true
        cl.buf = cl.buf:sub(e + 4)
      end
      if kind == "sse" then parse_sse(cl) else parse_ws(cl) end
    else
      cl:fail("connection " .. event .. " " .. tostring(data))
    end
  end))
  clients[#clients + 1] = cl
end

for i = 1, nsse do open("sse", i) end
for i = 1, nws do open("ws", i) end

local function all(pred)
  for _, cl in ipairs(clients) do if not pred(cl) then return false end end
  return true
end

while not all(function(cl) return cl.head or cl.finished end) do
  core.run_once(50)
  if core.now() > deadline then
    for _, cl in ipairs(clients) do cl:fail("no answer in time") end
  end
end
print("ready")
io.stdout:flush()
while not all(function(cl) return cl.finished end) do
  core.run_once(50)
  if core.now() > deadline then
    for _, cl in ipairs(clients) do cl:fail("no end in time") end
  end
end
for _, cl in ipairs(clients) do
  if cl.bad then
    print(("result %s %d bad %s (after %d messages)"):format(cl.kind, cl.i, cl.bad, cl.count))
  else
    print(("result %s %d ok %d"):format(cl.kind, cl.i, cl.count))
  end
  cl.sock:close()
end
print("done")
io.stdout:flush()
