-- A WebSocket echo server at ws://HOST:PORT/ (PORT default 9001): every
-- message comes back as it came, text as text, binary as binary. Conformance
-- suites (Autobahn's fuzzingclient, python3-websockets) test against it.
local herald = require "herald"

-- No message rate limit: conformance suites send bursts of thousands.
local app = herald.new { max_message = 16 * 1024 * 1024, max_body_size = 16 * 1024 * 1024,
                         max_message_rate = 0 }
app:ws("/", {
  message = function(ws, data, kind) ws:send(data, kind) end,
})

local host = os.getenv("HOST") or "127.0.0.1"
local port = assert(app:listen { host = host, port = tonumber(os.getenv("PORT") or "9001") })
print(("herald echo: ws://%s:%d/"):format(host, port))
io.stdout:flush()
herald.run()
