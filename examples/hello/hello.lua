-- The demo until the chat and ticker examples arrive: a page, a JSON
-- endpoint and an echo. PORT and HOST come from the environment.
local herald = require "herald"
local app = herald.new()
local dir = arg[0]:match("^(.*)/[^/]*$") or "."
app:get("/", function(_, res) res:file(dir .. "/index.html") end)
app:get("/hello/:name", function(req, res) res:send("hi " .. req.params.name .. "\n") end)
app:get("/time", function(_, res) res:json { now_ms = herald.now() } end)
app:post("/echo", function(req, res) res:status(201):send(req.body) end)
local host = os.getenv("HOST") or "127.0.0.1"
local port = assert(app:listen { host = host, port = tonumber(os.getenv("PORT") or "8080") })
print(("herald demo: http://%s:%d/"):format(host, port))
io.stdout:flush()
herald.run()
