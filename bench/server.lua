-- herald's side of the benchmarks (bench/run drives it with build/bench/loadgen):
-- the same shape as bench/nchan.conf.
--
--   GET  /ws/:topic     WebSocket subscriber (raw format: one frame per message)
--   GET  /sse/:topic    Server-Sent Events subscriber
--   POST /pub/:topic    publishes the body to the topic
--   POST /burst/:topic?n=20&count=1000&size=64
--                       publishes count messages of size bytes from a 1 ms
--                       Lua timer, n per tick (loadgen --trigger); answers at
--                       once, before the first tick
--
-- No history (nchan stores nothing either), no heartbeats or pings (they
-- would be extra writes), max_queued large enough that no subscriber is
-- closed as slow. PORT (default 8080) and HOST (default 127.0.0.1) from the
-- environment, as the examples; BROKER=redis://host:port/db makes it a node of
-- a cluster sharing topics through that Redis (the two-node scenarios: publish
-- on one node, subscribers on both).
--
--   LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/release/?.so;;" lua5.4 bench/server.lua
local herald = require "herald"
local core = require "herald.core"

-- Lua's collector: a cycle starts once the heap is 1.2 times what the last
-- one left live (Lua's default, 2 times, keeps up to a live heap's worth of
-- garbage resident: the handshakes of thousands of connections). See the
-- README's "Memory per connection" for what it costs.
collectgarbage("incremental", 120)

local broker = os.getenv("BROKER")
if broker == "" then broker = nil end

local app = herald.new {
  max_connections = 200000,
  max_queued = 16 * 1024 * 1024,
  max_body_size = 1048576,
  ping_interval = 0,
  heartbeat = 0,
  history = 0,
  idle_timeout = 300,
  broker = broker and { redis = broker } or nil,
}
app:topic("*", { history = 0 })

app:ws("/ws/:topic", {
  format = "raw",
  open = function(ws, req) assert(ws:subscribe(req.params.topic)) end,
})
app:sse("/sse/:topic", function(stream, req) assert(stream:subscribe(req.params.topic)) end)
app:publisher("/pub/:topic")

-- The payload loadgen expects: "%08x %016x " (sequence number, the send time
-- in CLOCK_MONOTONIC ns: core.hrtime() is libuv's uv_hrtime, that clock on
-- Linux), padded with 'x' to size bytes.
local HEADER = 26
local function int_arg(q, name, default, min, max)
  local v = q[name]
  if v == nil then return default end
  v = math.tointeger(tonumber(v))
  if not v or v < min or v > max then return nil end
  return v
end

app:post("/burst/:topic", function(req, res)
  local topic = req.params.topic
  local n = int_arg(req.query, "n", 20, 1, 1000000)
  local count = int_arg(req.query, "count", 1000, 1, 0x7fffffff)
  local size = int_arg(req.query, "size", 64, HEADER + 6, 16 * 1024 * 1024)
  if not n or not count or not size then
    return res:status(400):send("n, count and size must be integers (size >= 32)\n")
  end
  local pad = string.rep("x", size - HEADER)
  local seq = 0
  local timer
  timer = herald.every(1, function()
    for _ = 1, math.min(n, count - seq) do
      app:publish(topic, string.format("%08x %016x ", seq, core.hrtime()) .. pad)
      seq = seq + 1
    end
    if seq >= count then timer:cancel() end
  end)
  res:header("Content-Type", "application/json")
  res:send(('{"topic":"%s","n":%d,"count":%d,"size":%d}'):format(topic, n, count, size))
end)

local host = os.getenv("HOST") or "127.0.0.1"
local port = assert(app:listen { host = host, port = tonumber(os.getenv("PORT") or "8080"), backlog = 4096 })
print(("herald bench: http://%s:%d/%s"):format(host, port, broker and " (broker " .. broker .. ")" or ""))
io.stdout:flush()
herald.run()
