-- The live stock ticker: a dozen made-up quotes on a random walk, pushed to
-- browsers over Server-Sent Events. Every quote is published to the topic
-- "prices" (event "quote"); the topic keeps a history, so a browser whose
-- stream drops resumes with Last-Event-ID and misses nothing.
--
--   PORT=8080 HOST=127.0.0.1 lua5.4 examples/ticker/ticker.lua
--
-- Routes: GET / (the page), GET /ticker (the stream), GET /stats (the hub's
-- counters), POST /admin/drop (closes every open stream: the browsers
-- reconnect and resume; the browser spec uses it to force a drop).
--
-- Run as a script it listens; loaded with dofile (examples/demo.lua) it
-- returns { new = fn() -> app, main = fn() }.
local herald = require "herald"

local ticker = {}

local dir = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "."

-- ---- the market ----

local symbols = {
  { "AAPL", 189.50 }, { "MSFT", 415.20 }, { "GOOG", 141.80 }, { "AMZN", 178.30 },
  { "NVDA", 875.40 }, { "META", 492.10 }, { "TSLA", 172.60 }, { "NFLX", 610.90 },
  { "AMD", 164.70 }, { "INTC", 31.20 }, { "ORCL", 125.40 }, { "IBM", 183.10 },
}

-- A standard normal draw (Box-Muller).
local function gaussian()
  local u = 1 - math.random() -- (0, 1]: log(0) is out
  return math.sqrt(-2 * math.log(u)) * math.cos(2 * math.pi * math.random())
end

local function cents(x) return math.floor(x * 100 + 0.5) / 100 end

local function quote_json(q)
  local change = q.price - q.open
  return ('{"symbol":"%s","price":%.2f,"open":%.2f,"change":%.2f,"percent":%.3f}')
    :format(q.symbol, q.price, q.open, change, change / q.open * 100)
end

--- Builds the ticker app and starts its market (timers on herald's loop).
function ticker.new()
  local app = herald.new()
  -- 500 messages is about ten seconds of quotes: enough to resume after a drop
  -- (the browser reconnects after retry = 1000 ms). A client too slow to keep
  -- up gets the newest quote instead of being cut off.
  app:topic("prices", { history = 500, max_age = 300, policy = "conflate" })

  for _, s in ipairs(symbols) do
    local q = { symbol = s[1], price = s[2], open = s[2] }
    -- Each symbol ticks on its own timer, 3 to 5 times a second.
    herald.every(200 + math.random(0, 130), function()
      -- about 0.1% a tick, with a faint pull back towards the open price
      local drift = (q.open - q.price) / q.open * 0.002
      q.price = math.max(0.01, cents(q.price * math.exp(drift + 0.001 * gaussian())))
      app:publish("prices", quote_json(q), { event = "quote" })
    end)
  end

  -- ---- the routes ----

  app:get("/", function(_, res) res:file("index.html", { root = dir }) end)

  app:sse("/ticker", function(stream)
    local ok, err = stream:subscribe("prices")
    if not ok then return false, 503, "cannot subscribe: " .. tostring(err) .. "\n" end
  end, { retry = 1000 })

  app:get("/stats", function(_, res)
    local st, fields = app:stats(), {}
    for name, value in pairs(st) do
      if type(value) == "number" then fields[#fields + 1] = ('"%s":%s'):format(name, value) end
    end
    table.sort(fields)
    res:header("Content-Type", "application/json"):send("{" .. table.concat(fields, ",") .. "}")
  end)

  app:post("/admin/drop", function(_, res)
    local open = {}
    for _, stream in pairs(app.streams) do open[#open + 1] = stream end
    for _, stream in ipairs(open) do stream:close() end
    res:header("Content-Type", "application/json"):send(('{"dropped":%d}'):format(#open))
  end)
  return app
end

--- Listens on HOST:PORT (127.0.0.1:8080), prints the URL, serves.
function ticker.main()
  math.randomseed(os.time())
  local app = ticker.new()
  local host = os.getenv("HOST") or "127.0.0.1"
  local port = assert(app:listen { host = host, port = tonumber(os.getenv("PORT") or "8080") })
  print(("herald ticker: http://%s:%d/"):format(host:find(":", 1, true) and "[" .. host .. "]" or host, port))
  io.stdout:flush()
  herald.run()
end

if arg and arg[0] and debug.getinfo(1, "S").source == "@" .. arg[0] then ticker.main() end
return ticker
