-- What the operator sees and gets: app:stats() after known traffic,
-- app:metrics() in the Prometheus text format with its access rule, and
-- the graceful drain of an app under herald.run() in a subprocess on
-- SIGTERM (SSE told `retry`, WebSocket closed 1001, exit 0 within
-- shutdown_timeout).
--
-- The drain's subprocesses run the build under test (under the ASan run
-- they keep its LD_PRELOAD and options, so a leak fails their exit status),
-- each in a session of its own with a watchdog that kills it after 30 s
-- should the spec not get to it.
local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"

-- busted keeps one finally per test: cleanups are listed and run after each.
local cleanups = {}
local function defer(fn) cleanups[#cleanups + 1] = fn end

local saved_timeout
before_each(function()
  cleanups = {}
  saved_timeout = t.timeout
  t.timeout = 5
end)
after_each(function()
  for i = #cleanups, 1, -1 do pcall(cleanups[i]) end
  cleanups = {}
  t.timeout = saved_timeout
end)

local ERROR_KINDS = { "http_400", "http_408", "http_413", "http_414", "http_429", "http_431", "http_500",
  "http_503", "ws_1002", "ws_1007", "ws_1008", "ws_1009", "lua" }

-- An app with /ping, /echo (POST) and /fail (raises); logged errors kept in
-- app.logged; closed when the test ends.
local function new_app(opts)
  local app = herald.new(opts)
  app.logged = {}
  app:on_error(function(message) app.logged[#app.logged + 1] = message end)
  app:get("/ping", function(_, res) res:send("pong") end)
  app:post("/echo", function(req, res) res:send(req.body) end)
  app:get("/fail", function() error("handler failed on purpose") end)
  defer(function() app:close() end)
  return app
end

local function connect(target, host)
  local c = t.connect(target, host)
  defer(function() c:close() end)
  return c
end

local function sse(app, path, opts)
  local s = t.sse(app, path, opts)
  defer(function() s:close() end)
  return s
end

local function ws(app, path, opts)
  local w = t.ws(app, path, opts)
  defer(function() w:abort() end)
  return w
end

-- errors with every kind at 0 but those given
local function errors_with(counts)
  local e = {}
  for _, kind in ipairs(ERROR_KINDS) do e[kind] = counts[kind] or 0 end
  return e
end

-- Waits until the app holds exactly n connections (closed ones go after
-- their client's FIN).
local function settle(app, n)
  t.wait(function() return app:connections() == (n or 0) end, 3,
    ("the app to hold %d connections"):format(n or 0))
end

-- Sends bytes on a new connection and waits for the server to close it;
-- returns the response.
local function rejected(app, bytes)
  local c = connect(app)
  if bytes then c:send(bytes) end
  c:wait_closed(3)
  return assert(t.parse_response(c.buffer, nil, true), "closed without an answer")
end

-- This machine's first IPv4 address that is not loopback, or nil.
local function outside_address()
  local p = io.popen("hostname -I 2>/dev/null")
  local out = p and p:read("a") or ""
  if p then p:close() end
  for ip in out:gmatch("%S+") do
    if ip:match("^%d+%.%d+%.%d+%.%d+$") and not ip:match("^127%.") then return ip end
  end
end

describe("app:stats()", function()
  it("has every field, all zero on a new app", function()
    local app = new_app()
    local st = app:stats()
    for _, field in ipairs { "connections", "streams", "subscriptions", "topics", "published", "delivered",
      "conflated", "slow_closed", "bytes_in", "bytes_out", "writes", "queued_bytes" } do
      assert.equal(0, st[field], field)
      assert.equal("integer", math.type(st[field]), field)
    end
    assert.same({ http = 0, sse = 0, ws = 0 }, st.by_transport)
    assert.same(errors_with {}, st.errors)
  end)

  it("counts the bytes read and written, exactly", function()
    local app = new_app()
    local c = connect(app)
    local request = "GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    c:send(request)
    t.wait(function() return c.buffer:find("\r\n\r\npong", 1, true) end, 2, "the answer")
    local answer = c.buffer
    local st = app:stats()
    assert.equal(#request, st.bytes_in)
    assert.equal(#answer, st.bytes_out)
    -- a 100 KB body in and out
    c.buffer = ""
    local body = ("b"):rep(100 * 1000)
    local post = t.encode_request("POST", "/echo", nil, body)
    c:send(post)
    t.wait(function() return #c.buffer > #body and c.buffer:sub(-#body) == body end, 3, "the echo")
    st = app:stats()
    assert.equal(#request + #post, st.bytes_in)
    assert.equal(#answer + #c.buffer, st.bytes_out)
    assert.equal(0, st.queued_bytes)
  end)

  it("counts connections by transport, streams, subscriptions, topics, published and delivered", function()
    local app = new_app()
    app:sse("/s", function(s) assert(s:subscribe("news")) end)
    app:ws("/w", { open = function(w) assert(w:subscribe("news")); assert(w:subscribe("chat")) end })
    local s = sse(app, "/s")
    local w = ws(app, "/w")
    local c = connect(app)
    c:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, assert(c:response()).status)
    local st = app:stats()
    assert.equal(3, st.connections)
    assert.same({ http = 1, sse = 1, ws = 1 }, st.by_transport)
    assert.equal(2, st.streams)
    assert.equal(3, st.subscriptions)
    assert.equal(2, st.topics)
    app:publish("news", "one")
    app:publish("news", "two")
    app:publish("chat", "three")
    app:publish("nobody", "four") -- no subscriber: kept in history (default 100), a topic
    st = app:stats()
    assert.equal(4, st.published)
    assert.equal(5, st.delivered)
    assert.equal(3, st.topics)
    assert.same({ "one", "two" }, { s:next(2).data, s:next(2).data })
    assert.same({ "one", "two", "three" }, { w:receive(2).data, w:receive(2).data, w:receive(2).data })
    -- all gone: the transports and subscriptions go back to 0, history keeps its topics
    s:close()
    w:abort()
    c:close()
    settle(app, 0)
    st = app:stats()
    assert.same({ http = 0, sse = 0, ws = 0 }, st.by_transport)
    assert.equal(0, st.streams)
    assert.equal(0, st.subscriptions)
    assert.equal(3, st.topics)
    assert.equal(0, st.queued_bytes)
    assert.equal(0, st.slow_closed)
    assert.equal(0, st.conflated)
  end)

  it("counts protocol errors by the answer they got", function()
    local app = new_app { max_header_size = 1024, max_body_size = 100, header_timeout = 0.2,
      max_message = 1000, max_message_rate = 3 }
    app:ws("/w", { message = function(w, data) w:send(data) end })
    assert.equal(400, rejected(app, "GARBAGE\r\n\r\n").status)
    assert.equal(413, rejected(app, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").status)
    assert.equal(414, rejected(app, "GET /" .. ("a"):rep(2000) .. " HTTP/1.1\r\nHost: x\r\n\r\n").status)
    assert.equal(431, rejected(app, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " .. ("v"):rep(2000) .. "\r\n\r\n").status)
    assert.equal(408, rejected(app).status) -- sends nothing
    local function ws_fails(bytes, code)
      local w = ws(app, "/w")
      assert.equal(101, w.status)
      w:send_raw(bytes)
      local f
      repeat f = assert(w:receive(2)) until f.kind == "close"
      assert.equal(code, f.code)
    end
    ws_fails(t.ws_frame("text", "x", { masked = false }), 1002)
    ws_fails(t.ws_frame("text", "\xff\xfe"), 1007)
    ws_fails(t.ws_frame("binary", ("z"):rep(2000)), 1009)
    ws_fails(t.ws_frame("text", "a"):rep(4), 1008)
    assert.same(errors_with { http_400 = 1, http_408 = 1, http_413 = 1, http_414 = 1, http_431 = 1,
      ws_1002 = 1, ws_1007 = 1, ws_1008 = 1, ws_1009 = 1 }, app:stats().errors)
    -- the limits on connections: 429 per address, 503 for max_connections
    local limited = new_app { max_connections_per_ip = 1, trust_loopback = false }
    local held = connect(limited)
    held:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, assert(held:response()).status)
    assert.equal(429, rejected(limited).status)
    local full = new_app { max_connections = 1 }
    local one = connect(full)
    one:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, assert(one:response()).status)
    assert.equal(503, rejected(full).status)
    assert.same(errors_with { http_429 = 1 }, limited:stats().errors)
    assert.same(errors_with { http_503 = 1 }, full:stats().errors)
  end)

  it("counts errors logged (errors.lua): in a handler, in a stream's open, in a message handler", function()
    local app = new_app()
    app:sse("/s", function() error("open failed on purpose") end)
    app:ws("/w", { message = function() error("message failed on purpose") end })
    assert.equal(500, t.get(app, "/fail").status)
    assert.equal(1, app:stats().errors.lua)
    assert.equal(500, sse(app, "/s").status)
    assert.equal(2, app:stats().errors.lua)
    local w = ws(app, "/w")
    w:send("boom")
    local f = assert(w:receive(2))
    assert.equal("close", f.kind)
    assert.equal(1011, f.code)
    assert.equal(3, app:stats().errors.lua)
    assert.equal(3, #app.logged)
  end)

  it("counts the 500 answered for a handler's error in errors.http_500", function()
    local app = new_app()
    assert.equal(500, t.get(app, "/fail").status)
    local e = app:stats().errors
    assert.equal(1, e.lua)
    assert.equal(1, e.http_500, "a 500 was answered and errors.http_500 is " .. e.http_500)
  end)

  it("counts the 503 answered to a stream refused for max_total_queued in errors.http_503", function()
    local app = new_app { max_total_queued = 1024 }
    app:sse("/s", function(s) assert(s:subscribe("x")) end)
    local big = ("z"):rep(16 * 1024 * 1024)
    app:get("/big", function(_, res) res:send(big) end)
    local c = connect(app)
    c.socket:pause() -- never reads its 16 MiB: most of it waits in the app
    c:send("GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    t.wait(function() return app:stats().queued_bytes > 1024 end, 3, "the big answer to back up")
    t.sleep(50)
    assert.is_true(app:stats().queued_bytes > 1024)
    local s = sse(app, "/s")
    assert.equal(503, s.status)
    local e = app:stats().errors
    assert.equal(1, e.http_503, "a 503 was answered and errors.http_503 is " .. e.http_503)
  end)

  it("counts a peer closed for not reading (a ping flood's pongs) in slow_closed", function()
    local app = new_app { max_message_rate = 0, max_queued = 16 * 1024 }
    local closed = false
    app:ws("/w", { close = function() closed = true end })
    local w = ws(app, "/w")
    assert.equal(101, w.status)
    w.client.socket:pause()
    local batch = t.ws_frame("ping", ("p"):rep(125)):rep(100)
    local pings = 0
    while not closed do
      assert(pings < 200000, pings .. " pings and the peer is still served")
      w:send_raw(batch)
      pings = pings + 100
      t.sleep(1)
    end
    assert.equal(1, app:stats().slow_closed, "the flooder was closed for not reading; slow_closed")
  end)
end)

-- Parses the Prometheus text exposition format (version 0.0.4): returns
-- { [name] = { help, type, samples = { [labels] = value } } }, raising on
-- a line that does not fit the format or a sample before its HELP and TYPE.
local function parse_prometheus(text)
  assert.equal("\n", text:sub(-1), "the exposition does not end with a newline")
  local families, current = {}, nil
  local n = 0
  for line in text:gmatch("([^\n]*)\n") do
    n = n + 1
    local where = ("line %d %q"):format(n, line)
    local name, rest = line:match("^# HELP ([%a_:][%w_:]*) (.+)$")
    if name then
      assert(not families[name], "a second HELP for " .. name)
      families[name] = { help = rest, samples = {}, order = n }
      current = name
    else
      local tname, kind = line:match("^# TYPE ([%a_:][%w_:]*) (%a+)$")
      if tname then
        assert(tname == current, where .. ": TYPE not right after its HELP")
        assert(kind == "counter" or kind == "gauge", where .. ": type " .. kind)
        assert(not families[tname].type, "a second TYPE for " .. tname)
        families[tname].type = kind
      else
        local sname, labels, value = line:match('^([%a_:][%w_:]*)(%b{}) (%S+)$')
        if not sname then
          sname, value = line:match("^([%a_:][%w_:]*) (%S+)$")
          labels = ""
        end
        assert(sname, where .. ": not a sample")
        assert(sname == current and families[sname].type, where .. ": a sample outside its family")
        if labels ~= "" then
          local inner = labels:sub(2, -2)
          assert(inner:match('^[%a_][%w_]*="[^"\\\n]*"$'), where .. ": labels " .. labels)
          labels = inner
        end
        assert(value:match("^%-?%d+$"), where .. ": value " .. value)
        assert(families[sname].samples[labels] == nil, where .. ": a repeated sample")
        families[sname].samples[labels] = tonumber(value)
      end
    end
  end
  return families
end

describe("app:metrics(path)", function()
  it("serves app:stats() in the Prometheus text format to 127.0.0.1", function()
    local app = new_app()
    app:metrics("/metrics")
    app:sse("/s", function(s) assert(s:subscribe("news")) end)
    app:ws("/w", { open = function(w) assert(w:subscribe("news")) end })
    local s = sse(app, "/s")
    local w = ws(app, "/w")
    app:publish("news", "one")
    app:publish("news", "two")
    assert.equal(400, rejected(app, "GARBAGE\r\n\r\n").status)
    assert.equal(500, t.get(app, "/fail").status)
    assert.equal("one", s:next(2).data)
    assert.same({ "one", "two" }, { assert(w:receive(2)).data, assert(w:receive(2)).data })
    settle(app, 2)
    local res = t.get(app, "/metrics")
    assert.equal(200, res.status)
    assert.equal("text/plain; version=0.0.4; charset=utf-8", res.headers["content-type"])
    local m = parse_prometheus(res.body)
    local expected_types = {
      herald_connections = "gauge", herald_subscriptions = "gauge", herald_topics = "gauge",
      herald_queued_bytes = "gauge",
      herald_messages_published_total = "counter", herald_messages_delivered_total = "counter",
      herald_bytes_in_total = "counter", herald_bytes_out_total = "counter", herald_writes_total = "counter",
      herald_slow_consumer_closes_total = "counter", herald_conflated_messages_total = "counter",
      herald_errors_total = "counter",
    }
    for name, kind in pairs(expected_types) do
      assert(m[name], "no family " .. name)
      assert.equal(kind, m[name].type, name)
      assert.is_true(#m[name].help > 0, name .. " has an empty HELP")
    end
    for name, f in pairs(m) do
      assert(expected_types[name], "an unexpected family " .. name)
      if f.type == "counter" then assert.matches("_total$", name) end
    end
    -- the metrics request's own connection is the one HTTP connection
    assert.same({ ['transport="http"'] = 1, ['transport="sse"'] = 1, ['transport="ws"'] = 1 },
      m.herald_connections.samples)
    assert.same({ [""] = 2 }, m.herald_subscriptions.samples)
    assert.same({ [""] = 1 }, m.herald_topics.samples)
    assert.same({ [""] = 2 }, m.herald_messages_published_total.samples)
    assert.same({ [""] = 4 }, m.herald_messages_delivered_total.samples)
    assert.same({ [""] = 0 }, m.herald_slow_consumer_closes_total.samples)
    assert.same({ [""] = 0 }, m.herald_conflated_messages_total.samples)
    assert.same({ [""] = 0 }, m.herald_queued_bytes.samples)
    local errors = {}
    for _, kind in ipairs(ERROR_KINDS) do errors[('kind="%s"'):format(kind)] = 0 end
    errors['kind="http_400"'] = 1
    errors['kind="lua"'] = 1
    local got = m.herald_errors_total.samples
    got['kind="http_500"'] = errors['kind="http_500"'] -- apart: see the errors.http_500 spec
    assert.same(errors, got)
    -- bytes: at least what the spec sent and read before this request
    local st = app:stats()
    assert.is_true(m.herald_bytes_in_total.samples[""] > 0)
    assert.is_true(m.herald_bytes_in_total.samples[""] <= st.bytes_in)
    assert.is_true(m.herald_bytes_out_total.samples[""] > 0)
    assert.is_true(m.herald_bytes_out_total.samples[""] < st.bytes_out) -- the answer itself went out since
    assert.is_true(m.herald_writes_total.samples[""] > 0)
    assert.is_true(m.herald_writes_total.samples[""] < st.writes)
  end)

  it("is served to ::1 by default", function()
    local app = new_app()
    app:metrics("/metrics")
    local port6 = app:listen { host = "::1", port = 0 }
    if not port6 then pending("no IPv6 loopback on this machine") end
    local c = connect(port6, "::1")
    c:send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(c:response())
    assert.equal(200, res.status)
    assert.matches("# TYPE herald_connections gauge\n", res.body, 1, true)
  end)

  it("refuses a peer that is not loopback by default: 403", function()
    local ip = outside_address()
    if not ip then pending("no non-loopback IPv4 address on this machine") end
    local app = new_app()
    app:metrics("/metrics")
    local port = app:listen { host = ip, port = 0 }
    if not port then pending("cannot listen on " .. ip) end
    local c = connect(port, ip)
    c:send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(c:response())
    assert.equal(403, res.status)
    assert.is_nil(res.body:find("herald_", 1, true), "the refusal holds metrics")
    -- the same app serves loopback
    assert.equal(200, t.get(app, "/metrics").status)
  end)

  it("applies a custom allow rule: refused requests get 403, even from loopback", function()
    local app = new_app()
    local asked = 0
    app:metrics("/metrics", { allow = function(req)
      asked = asked + 1
      return req.headers["x-metrics-key"] == "s3cret"
    end })
    app:metrics("/closed", { allow = function() return false end })
    local res = t.get(app, "/metrics")
    assert.equal(403, res.status)
    assert.equal("forbidden\n", res.body)
    res = t.get(app, "/metrics", { ["X-Metrics-Key"] = "wrong" })
    assert.equal(403, res.status)
    res = t.get(app, "/metrics", { ["X-Metrics-Key"] = "s3cret" })
    assert.equal(200, res.status)
    assert.matches("# HELP herald_errors_total ", res.body, 1, true)
    assert.equal(3, asked)
    assert.equal(403, t.get(app, "/closed").status)
    assert.error_matches(function() app:metrics("/bad", { allow = "yes" }) end, "allow must be a function")
  end)

  it("app:prometheus() is the same text", function()
    local app = new_app()
    local m = parse_prometheus(app:prometheus())
    assert.same({ [""] = 0 }, m.herald_messages_published_total.samples)
    app:publish("x", "y")
    m = parse_prometheus(app:prometheus())
    assert.same({ [""] = 1 }, m.herald_messages_published_total.samples)
  end)
end)

-- ---- graceful drain: an app under herald.run() in a subprocess ----

local flavor = os.getenv("HERALD_BUILD") or "dev"

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local data = f:read("a")
  f:close()
  return data
end

-- Whether process pid runs (a zombie, not reaped yet, does not).
local function running(pid)
  local state = slurp("/proc/" .. pid .. "/stat"):match("^%d+ %(.*%) (%S)")
  return state ~= nil and state ~= "Z"
end

-- The app: SSE at /s and WebSocket (envelope) at /w on the topic "news",
-- GET /publish?data=... publishes; options from the environment. It prints
-- its port, then "drained" when herald.run() returns.
local DRAIN_APP = [[
local herald = require "herald"
local app = herald.new {
  shutdown_timeout = tonumber(os.getenv("SHUTDOWN_TIMEOUT") or "5"),
  drain_retry = tonumber(os.getenv("DRAIN_RETRY") or "1000"),
}
app:sse("/s", function(s) assert(s:subscribe("news")) end)
app:ws("/w", { format = "envelope", open = function(ws) assert(ws:subscribe("news")) end })
app:get("/publish", function(req, res) res:send((app:publish("news", req.query.data or "x"))) end)
local port = assert(app:listen { host = "127.0.0.1", port = 0 })
io.stdout:write(port, "\n")
io.stdout:flush()
herald.run()
io.stdout:write("drained\n")
io.stdout:flush()
]]

-- Starts the drain app with env (a table of variables); returns { pid,
-- port, pipe, ... }. Stopped (SIGKILL) when the test ends if still running.
local function start_app(env)
  local script, err_file = os.tmpname(), os.tmpname()
  local f = assert(io.open(script, "w"))
  f:write(DRAIN_APP)
  f:close()
  local vars = {}
  for k, v in pairs(env or {}) do vars[#vars + 1] = k .. "=" .. quote(tostring(v)) end
  local cmd = table.concat({
    "echo $$",
    "(sleep 30; kill -KILL -$$) >/dev/null 2>&1 &",
    ("%s LUA_PATH=%s LUA_CPATH=%s exec lua5.4 %s 2>%s"):format(table.concat(vars, " "),
      quote("lua/?.lua;lua/?/init.lua;;"), quote("build/" .. flavor .. "/?.so;;"), quote(script), quote(err_file)),
  }, "\n")
  local pipe = assert(io.popen("exec setsid sh -c " .. quote(cmd)))
  local app = { pid = tonumber(pipe:read("l")), pipe = pipe, script = script, err_file = err_file }
  app.port = tonumber(pipe:read("l"))
  defer(function()
    if app.pid then os.execute(("kill -KILL -%d 2>/dev/null"):format(app.pid)) end
    if not app.reaped then pipe:close() end
    os.remove(script)
    os.remove(err_file)
  end)
  if not app.pid or not app.port then
    error("the drain app did not start: " .. slurp(err_file))
  end
  return app
end

-- SIGTERM to the app's group (the app and its watchdog).
local function sigterm(app)
  app.sigterm_at = core.now()
  assert(os.execute(("kill -TERM -%d"):format(app.pid)))
end

-- Runs the spec's loop until the app exits (at most ms); returns how long
-- it took after the SIGTERM, whether it exited 0, its stdout and stderr.
local function wait_exit(app, ms)
  local deadline = core.now() + ms
  while running(app.pid) and core.now() < deadline do t.sleep(20) end
  local took = core.now() - app.sigterm_at
  if running(app.pid) then return nil, false, "", slurp(app.err_file) end
  local out = app.pipe:read("a")
  local ok = app.pipe:close()
  app.reaped = true
  return took, ok == true, out, slurp(app.err_file)
end

describe("graceful drain (herald.run in a subprocess, SIGTERM)", function()
  it("SSE gets 'retry: 1000' then its end, WebSocket gets 1001, new connections are refused, exit 0 at once", function()
    local app = start_app { SHUTDOWN_TIMEOUT = 3 }
    local s = sse(app.port, "/s")
    assert.equal(200, s.status)
    local w = ws(app.port, "/w")
    assert.equal(101, w.status)
    local id = t.get(app.port, "/publish?data=one").body
    local ev = assert(s:next(2))
    assert.same({ id, "one" }, { ev.id, ev.data })
    assert.matches('"data":"one"', assert(w:receive(2)).data, 1, true)
    sigterm(app)
    -- SSE: told to come back in drain_retry ms, then the end, and no event
    local none, why = s:next(3)
    assert.is_nil(none, "an event during the drain")
    assert.equal("closed", why)
    assert.equal(1000, s.retry, "no retry before the end")
    -- WebSocket: close 1001, then the end
    local f = assert(w:receive(3), "no close frame")
    assert.equal("close", f.kind)
    assert.equal(1001, f.code)
    assert.is_true((w:wait_closed(3)))
    -- the listener is closed
    local c = t.open(app.port)
    t.wait(function() return c.connected or c.closed end, 2, "the connect to end")
    assert.is_false(c.connected, "a new connection was accepted during the drain")
    local took, exited, out, err = wait_exit(app, 5000)
    assert(took, "still running 5 s after SIGTERM; stderr:\n" .. err)
    assert(exited, "did not exit 0; stderr:\n" .. err)
    assert.equal("drained\n", out)
    assert.is_true(took < 3000, "the drain took " .. took .. " ms, over shutdown_timeout")
    assert.equal("", err)
  end)

  it("clients that never read are closed at shutdown_timeout: exit 0 within it; SSE is told drain_retry", function()
    local app = start_app { SHUTDOWN_TIMEOUT = 1, DRAIN_RETRY = 2500 }
    local s = sse(app.port, "/s")
    assert.equal(200, s.status)
    local w = ws(app.port, "/w")
    assert.equal(101, w.status)
    s.client.socket:pause()
    w.client.socket:pause()
    sigterm(app)
    local took, exited, out, err = wait_exit(app, 5000)
    assert(took, "still running 5 s after SIGTERM; stderr:\n" .. err)
    assert(exited, "did not exit 0; stderr:\n" .. err)
    assert.equal("drained\n", out)
    assert.is_true(took >= 800 and took < 2500, ("exited %d ms after SIGTERM (shutdown_timeout 1 s)"):format(took))
    assert.equal("", err)
    -- reading again, each finds its goodbye
    s.client.socket:resume()
    w.client.socket:resume()
    assert.is_nil(s:next(3))
    assert.equal(2500, s.retry)
    local f = assert(w:receive(3), "no close frame")
    assert.equal(1001, f.code)
  end)

  -- The cross-node part (resume on another node without loss) needs
  -- shared history (Redis), which this checkout does not have: without
  -- it, another instance can only report the gap, which is checked here.
  it("an SSE client resuming on another instance with its Last-Event-ID gets herald-gap, not silence", function()
    local first = start_app { SHUTDOWN_TIMEOUT = 2 }
    local s = sse(first.port, "/s")
    assert.equal(200, s.status)
    t.get(first.port, "/publish?data=one")
    local last = assert(s:next(2)).id
    sigterm(first)
    assert.is_nil(s:next(3))
    assert.equal(1000, s.retry)
    assert(wait_exit(first, 5000), "the first instance did not exit")
    local second = start_app { SHUTDOWN_TIMEOUT = 2 }
    local again = sse(second.port, "/s", { last_event_id = last })
    assert.equal(200, again.status)
    local gap = assert(again:next(2), "nothing on resuming")
    assert.equal("herald-gap", gap.event)
    assert.equal('{"topic":"news"}', gap.data)
    t.get(second.port, "/publish?data=two")
    assert.equal("two", assert(again:next(2)).data)
    again:close()
    sigterm(second)
    local took, exited, _, err = wait_exit(second, 5000)
    assert(took and exited, "the second instance did not exit 0; stderr:\n" .. err)
  end)
end)
