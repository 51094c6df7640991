-- The demo: the stock ticker (examples/ticker, Server-Sent Events) and the
-- chat (examples/chat, WebSocket) served by one process on one loop, each
-- app on its own port: the ticker on PORT (default 8080), the chat on
-- PORT + 1 (CHAT_PORT overrides it; with PORT=0 both take a free port).
-- HOST defaults to 127.0.0.1. `make demo` runs it; it prints both URLs, the
-- ticker's first:
--
--   herald ticker: http://127.0.0.1:8080/
--   herald chat: http://127.0.0.1:8081/
--
-- With TLS_CERT and TLS_KEY (PEM files; `make demo TLS=1` makes a
-- self-signed pair) both are served over https and wss instead.
local herald = require "herald"

local here = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "."
local ticker = dofile(here .. "/ticker/ticker.lua")
local chat = dofile(here .. "/chat/chat.lua")

local host = os.getenv("HOST") or "127.0.0.1"
local port = tonumber(os.getenv("PORT") or "8080")
local chat_port = tonumber(os.getenv("CHAT_PORT") or (port == 0 and 0 or port + 1))
local shown = host:find(":", 1, true) and "[" .. host .. "]" or host

math.randomseed(os.time())
local apps = {
  { "ticker", ticker.new(), port },
  { "chat", chat.new(), chat_port },
}
local cert, key = os.getenv("TLS_CERT"), os.getenv("TLS_KEY")
local tls = cert and key and { cert = cert, key = key } or nil
for _, a in ipairs(apps) do
  local bound = assert(a[2]:listen { host = host, port = a[3], tls = tls })
  print(("herald %s: %s://%s:%d/"):format(a[1], tls and "https" or "http", shown, bound))
end
io.stdout:flush()
herald.run()
