-- The server under test of spec/chaos_spec.lua, in a process of its own so
-- that its RSS is its own: lua5.4 spec/chaos/server.lua CERT KEY
-- Prints "ports <plain> <tls>" once it listens on both (port 0: free ports).
--
-- Topic "feed" gets every published message, and only it, so the ids a
-- subscriber sees are consecutive; each message's data starts with its
-- number n (1, 2, ...), then padding. Routes:
--   GET  /events   SSE on "feed"        GET /ws   WebSocket on "feed" (envelope)
--   GET  /big      a 1 MiB answer       GET /wsbig, /ssebig: 1 MiB sent in open
--   GET  /stats    app:stats() as JSON, plus "published_n" (the last n)
--   POST /flow?ms=M          one message every M ms from now on (0: stop)
--   POST /burst?n=N&size=S&per=P&ms=M   N more messages of S bytes, P (50) every M ms (2)
--   POST /end                stops the flow and publishes "end <last n>"
local herald = require "herald"
local cjson = require "cjson"

local cert, key = arg[1], arg[2]
local app = herald.new {
  -- small enough that a client that stops reading trips it within a burst
  max_queued = 65536,
  -- watchers and chaos clients all come from loopback; trust_loopback
  -- (the default) keeps the per-address limits out of the way
}
app:on_error(function(message) io.stderr:write("app error: ", message, "\n") end)

local n = 0
local function publish(size)
  n = n + 1
  local head = tostring(n) .. " "
  app:publish("feed", head .. ("x"):rep(math.max(0, size - #head)))
end

local flow
local function set_flow(ms)
  if flow then flow:cancel() end
  flow = ms > 0 and herald.every(ms, function() publish(100) end) or nil
end

app:sse("/events", function(stream) assert(stream:subscribe("feed")) end)
app:ws("/ws", {
  format = "envelope",
  open = function(ws) assert(ws:subscribe("feed")) end,
  message = function() end,
})

local MIB = 1024 * 1024
local big = ("b"):rep(MIB)
local chunk = ("c"):rep(64 * 1024)
local event = ("e"):rep(4096)
app:get("/big", function(_, res) res:send(big) end)
app:ws("/wsbig", {
  open = function(ws) for _ = 1, MIB // #chunk do ws:send(chunk, "binary") end end,
  message = function() end,
})
app:sse("/ssebig", function(stream) for _ = 1, MIB // #event do stream:send(event) end end)

app:get("/stats", function(_, res)
  local s = app:stats()
  s.published_n = n
  res:header("Content-Type", "application/json"):send(cjson.encode(s))
end)
app:post("/flow", function(req, res)
  set_flow(tonumber(req.query.ms) or 0)
  res:send("ok")
end)
app:post("/burst", function(req, res)
  local left, size = tonumber(req.query.n) or 0, tonumber(req.query.size) or 1024
  local per = tonumber(req.query.per) or 50
  local timer
  timer = herald.every(tonumber(req.query.ms) or 2, function()
    for _ = 1, math.min(per, left) do publish(size) end
    left = left - per
    if left <= 0 then timer:cancel() end
  end)
  res:send("ok")
end)
app:post("/end", function(_, res)
  set_flow(0)
  app:publish("feed", "end " .. n)
  res:send(tostring(n))
end)

-- a deep backlog: a wave of 1,000 connects at once is not dropped by the kernel
local port = assert(app:listen { host = "127.0.0.1", port = 0, backlog = 4096 })
local tls_port = assert(app:listen { host = "127.0.0.1", port = 0, backlog = 4096,
  tls = { cert = cert, key = key } })
io.stdout:write(("ports %d %d\n"):format(port, tls_port))
io.stdout:flush()
herald.run()
