-- Abuse limits over real sockets: connections and new connections per
-- second per client address, subscriptions per connection, messages (and
-- pings) per second per WebSocket, the total bytes queued across the app,
-- trickled heads and bodies, and a ping flood from a peer that never reads.
-- Each case checks the answer herald owes (a status, a close code, the
-- connection closed) and that what is within the limit still works.
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

-- An app with /ping and /body (echoes the body's length); errors logged
-- are kept in app.logged; closed when the test ends.
local function new_app(opts)
  local app = herald.new(opts)
  app.logged = {}
  app:on_error(function(message) app.logged[#app.logged + 1] = message end)
  app:get("/ping", function(_, res) res:send("pong") end)
  app:post("/body", function(req, res)
    app.bodies = (app.bodies or 0) + 1
    res:send(tostring(#req.body))
  end)
  defer(function() app:close() end)
  return app
end

-- A raw connection to port (or app) on host, closed when the test ends.
local function connect(target, host)
  local c = t.connect(target, host)
  defer(function() c:close() end)
  return c
end

-- A connection that was admitted: one request answered 200, kept open.
local function admitted(target, host)
  local c = connect(target, host)
  c:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
  local res, err = c:response { timeout = 2 }
  assert(res, "no answer on an admitted connection: " .. tostring(err))
  assert.equal(200, res.status, res.body)
  assert.equal("pong", res.body)
  return c
end

-- A connection refused for its address: 429 unprompted, Connection:
-- close, then the server closes it. Returns the response.
local function refused(target, host)
  local c = connect(target, host)
  local res, err = c:response { timeout = 2 }
  assert(res, "no answer on a connection over the limit: " .. tostring(err))
  assert.equal(429, res.status, res.body)
  assert.equal("close", (res.headers.connection or ""):lower())
  assert.equal(tostring(#res.body), res.headers["content-length"])
  c:wait_closed(3)
  assert.equal("", c.buffer, "bytes after the 429")
  return res
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

describe("connections per client address", function()
  it("trust_loopback = false, max_connections_per_ip = 3: the 4th gets 429; a freed slot admits again", function()
    local app = new_app { max_connections_per_ip = 3, trust_loopback = false }
    local held = {}
    for i = 1, 3 do held[i] = admitted(app) end
    local res = refused(app)
    assert.matches("too many connections from your address", res.body, 1, true)
    -- the three are still served
    for _, c in ipairs(held) do
      c:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equal(200, assert(c:response()).status)
    end
    -- one leaves: the next is admitted, and then the address is full again
    held[1]:close()
    t.wait(function() return app:connections() == 2 end, 2, "the server to drop the closed connection")
    held[4] = admitted(app)
    refused(app)
    assert.equal(2, app:stats().errors.http_429)
  end)

  it("with trust_loopback (the default) loopback is not limited", function()
    local app = new_app { max_connections_per_ip = 3 }
    for _ = 1, 10 do admitted(app) end
    assert.equal(10, app:connections())
    assert.equal(0, app:stats().errors.http_429)
  end)

  it("IPv6 ::1 is limited the same way, apart from 127.0.0.1", function()
    local app = new_app { max_connections_per_ip = 2, trust_loopback = false }
    local port6 = app:listen { host = "::1", port = 0 }
    if not port6 then pending("no IPv6 loopback on this machine") end
    local v6 = { admitted(port6, "::1"), admitted(port6, "::1") }
    refused(port6, "::1")
    -- another address, another count
    admitted(app)
    admitted(app)
    refused(app)
    -- freeing a ::1 slot admits a ::1 connection again
    v6[1]:close()
    t.wait(function() return app:connections() == 3 end, 2, "the server to drop the closed connection")
    admitted(port6, "::1")
    refused(port6, "::1")
  end)

  it("with trust_loopback, a non-loopback address is still limited", function()
    local ip = outside_address()
    if not ip then pending("no non-loopback IPv4 address on this machine") end
    local app = new_app { max_connections_per_ip = 2 }
    local port = app:listen { host = ip, port = 0 }
    if not port then pending("cannot listen on " .. ip) end
    admitted(port, ip)
    admitted(port, ip)
    refused(port, ip)
    -- loopback is trusted meanwhile
    for _ = 1, 4 do admitted(app) end
  end)
end)

describe("new connections per second per client address", function()
  it("max_connects_per_ip = 5, trust_loopback = false: the 6th in a second gets 429; a second later, in", function()
    local app = new_app { max_connects_per_ip = 5, trust_loopback = false }
    local started = core.now()
    -- closing them does not give the attempts back
    for _ = 1, 5 do admitted(app):close() end
    local res = refused(app)
    assert.matches("too many new connections from your address", res.body, 1, true)
    refused(app) -- still within the second
    assert.is_true(core.now() - started < 1000, "the connections took a second: the spec is too slow")
    -- the next second: five more, and the sixth is refused again
    t.sleep(math.max(0, 1200 - (core.now() - started)))
    local again = core.now()
    for _ = 1, 5 do admitted(app):close() end
    refused(app)
    assert.is_true(core.now() - again < 1000, "the connections took a second: the spec is too slow")
    assert.equal(3, app:stats().errors.http_429)
  end)

  it("with trust_loopback (the default) loopback opens as fast as it likes", function()
    local app = new_app { max_connects_per_ip = 5 }
    for _ = 1, 20 do admitted(app):close() end
    assert.equal(0, app:stats().errors.http_429)
  end)
end)

describe("subscriptions per connection (max_subscriptions = 3)", function()
  it("a WebSocket's 4th subscription returns nil, 'too many subscriptions'; a freed place can be taken", function()
    local app = new_app { max_subscriptions = 3 }
    local in_open = {}
    app:ws("/w", {
      open = function(ws)
        for _, topic in ipairs { "a", "b", "c", "d" } do in_open[#in_open + 1] = { ws:subscribe(topic) } end
      end,
      message = function(ws, data)
        local topic = data:match("^%-(.*)$")
        if topic then
          ws:send(tostring(ws:unsubscribe(topic)))
        else
          local ok, err = ws:subscribe(data)
          ws:send(ok and "ok" or ("nil, " .. tostring(err)))
        end
      end,
    })
    local w = t.ws(app, "/w")
    defer(function() w:abort() end)
    assert.equal(101, w.status, w.body)
    assert.same({ { true }, { true }, { true }, { nil, "too many subscriptions" } }, in_open)
    local function ask(text)
      w:send(text)
      return assert(w:receive(2)).data
    end
    assert.equal("nil, too many subscriptions", ask("e"))
    assert.equal("ok", ask("a")) -- already in it: not a new one
    assert.equal("true", ask("-b"))
    assert.equal("ok", ask("e"))
    assert.equal("nil, too many subscriptions", ask("f"))
    assert.equal(0, app:subscribers("d"))
    assert.equal(1, app:subscribers("e"))
    assert.equal(3, app:stats().subscriptions)
  end)
end)

describe("messages per second per WebSocket (max_message_rate = 10)", function()
  -- An app whose /w echoes each message as "echo <data>" and records it in
  -- app.got; close callbacks' { code, reason } in app.closes.
  local function rate_app(policy)
    local app = new_app { max_message_rate = 10, message_rate_policy = policy }
    app.got, app.closes = {}, {}
    app:ws("/w", {
      message = function(ws, data)
        app.got[#app.got + 1] = data
        ws:send("echo " .. data)
      end,
      close = function(_, code, reason) app.closes[#app.closes + 1] = { code, reason } end,
    })
    return app
  end

  local function open(app)
    local w = t.ws(app, "/w")
    defer(function() w:abort() end)
    assert.equal(101, w.status, w.body)
    return w
  end

  -- frames of kind, "<prefix>1" .. "<prefix>n", in one write
  local function burst(w, n, prefix, kind)
    local frames = {}
    for i = 1, n do frames[i] = t.ws_frame(kind or "text", (prefix or "m") .. i) end
    w:send_raw(table.concat(frames))
  end

  -- The frames the server sends until it closes (its close frame last, if
  -- any) or until nothing comes for quiet seconds.
  local function frames_until_quiet(w, quiet)
    local got = {}
    while true do
      local f = w:receive(quiet or 0.3)
      if not f then return got end
      got[#got + 1] = f
      if f.kind == "close" then return got end
    end
  end

  local function datas(frames, kind)
    local out = {}
    for _, f in ipairs(frames) do
      if f.kind == kind then out[#out + 1] = f.data end
    end
    return out
  end

  local function echoes(prefix, from, to)
    local out = {}
    for i = from, to do out[#out + 1] = "echo " .. prefix .. i end
    return out
  end

  describe("policy close", function()
    it("11 messages in a burst: 10 reach the handler, then close 1008 'message rate exceeded'", function()
      local app = rate_app("close")
      local w = open(app)
      burst(w, 11)
      local got = frames_until_quiet(w, 2)
      local last = table.remove(got)
      assert.same(echoes("m", 1, 10), datas(got, "text"))
      assert.equal(#got, 10)
      assert(last and last.kind == "close", "no close frame")
      assert.equal(1008, last.code)
      assert.equal("message rate exceeded", last.reason)
      assert.is_true((w:wait_closed(3)), "the server did not close the TCP connection")
      assert.equal(10, #app.got)
      t.wait(function() return #app.closes == 1 end, 2, "the close callback")
      assert.same({ 1008, "message rate exceeded" }, app.closes[1])
      assert.equal(1, app:stats().errors.ws_1008)
    end)

    it("the budget refills after a second: 10, a pause, 10 more are all served; the 11th of a second closes"
      .. " #timing", function()
      local app = rate_app("close")
      local w = open(app)
      burst(w, 10, "a")
      assert.same(echoes("a", 1, 10), datas(frames_until_quiet(w), "text"))
      t.sleep(1100)
      burst(w, 10, "b")
      assert.same(echoes("b", 1, 10), datas(frames_until_quiet(w), "text"))
      assert.is_false(w:closed())
      w:send("c1")
      local f = assert(w:receive(2), "no answer to the 11th message of the second")
      assert.equal("close", f.kind)
      assert.equal(1008, f.code)
      assert.equal(20, #app.got)
    end)

    it("pings count: a flood of 50 gets at most 10 pongs, then close 1008", function()
      local app = rate_app("close")
      local w = open(app)
      burst(w, 50, "p", "ping")
      local got = frames_until_quiet(w, 2)
      local last = table.remove(got)
      local pongs = datas(got, "pong")
      assert.is_true(#pongs <= 10, #pongs .. " pongs")
      for i, data in ipairs(pongs) do assert.equal("p" .. i, data) end
      assert.equal(#got, #pongs, "frames other than pongs")
      assert(last and last.kind == "close", "no close frame after the pongs")
      assert.equal(1008, last.code)
      assert.is_true((w:wait_closed(3)))
    end)

    it("pings and messages share the budget: 5 pings and 6 messages close on the 6th", function()
      local app = rate_app("close")
      local w = open(app)
      local frames = {}
      for i = 1, 5 do frames[#frames + 1] = t.ws_frame("ping", "p" .. i) end
      for i = 1, 6 do frames[#frames + 1] = t.ws_frame("text", "m" .. i) end
      w:send_raw(table.concat(frames))
      local got = frames_until_quiet(w, 2)
      local last = table.remove(got)
      assert.same({ "p1", "p2", "p3", "p4", "p5" }, datas(got, "pong"))
      assert.same(echoes("m", 1, 5), datas(got, "text"))
      assert(last and last.kind == "close", "no close frame")
      assert.equal(1008, last.code)
      assert.equal(5, #app.got)
    end)
  end)

  describe("policy drop", function()
    it("messages over the rate are dropped, the connection stays open, the budget refills after a second", function()
      local app = rate_app("drop")
      local w = open(app)
      burst(w, 15, "a")
      local got = frames_until_quiet(w, 0.5)
      assert.same(echoes("a", 1, 10), datas(got, "text"))
      assert.equal(10, #got, "frames other than the echoes")
      assert.same(echoes("a", 1, 10), (function()
        local out = {}
        for i, d in ipairs(app.got) do out[i] = "echo " .. d end
        return out
      end)())
      assert.is_false(w:closed())
      t.sleep(1100)
      burst(w, 12, "b")
      assert.same(echoes("b", 1, 10), datas(frames_until_quiet(w, 0.5), "text"))
      assert.equal(20, #app.got)
      -- still open and well: a normal close
      t.sleep(1100)
      w:send("last")
      assert.equal("echo last", assert(w:receive(2)).data)
      local f = assert(w:close(1000, "bye"))
      assert.equal(1000, f.code)
      assert.equal(0, app:stats().errors.ws_1008)
      assert.same({}, app.logged)
    end)

    it("a ping flood of 50 gets at most 10 pongs and the connection stays open", function()
      local app = rate_app("drop")
      local w = open(app)
      burst(w, 50, "p", "ping")
      local got = frames_until_quiet(w, 0.5)
      local pongs = datas(got, "pong")
      assert.is_true(#pongs <= 10, #pongs .. " pongs")
      assert.equal(#got, #pongs, "frames other than pongs")
      assert.is_false(w:closed())
      t.sleep(1100)
      w:send("after")
      assert.equal("echo after", assert(w:receive(2)).data)
    end)
  end)
end)

describe("total queued bytes (max_total_queued = 64 KiB)", function()
  local LIMIT = 64 * 1024
  local MSG = 64 * 1024

  -- An app with the topic "big" on SSE (/s; ?slow marks app.slow) and on
  -- WebSocket (/w).
  local function queued_app()
    local app = new_app { max_total_queued = LIMIT }
    app:sse("/s", function(s, req)
      assert(s:subscribe("big"))
      if req.query.slow then app.slow = s end
    end)
    app:ws("/w", { open = function(ws) assert(ws:subscribe("big")) end })
    return app
  end

  -- A subscriber that never reads, and messages published to it over many
  -- loop turns until the app owes more than twice the limit (the kernel's
  -- buffers hold megabytes first). Returns the raw client.
  local function backlog(app)
    local c = connect(app)
    c.socket:pause()
    c:send(t.encode_request("GET", "/s?slow=1", { Accept = "text/event-stream" }))
    t.wait(function() return app.slow ~= nil end, 2, "the slow stream to open")
    local data = ("q"):rep(MSG)
    local published = 0
    while app:stats().queued_bytes <= 2 * LIMIT do
      assert(published < 32 * 1024 * 1024, "32 MiB published and still nothing queued")
      app:publish("big", data)
      published = published + MSG
      t.sleep(2)
    end
    assert.is_true(app.slow:alive(), "the slow stream was closed while the backlog grew")
    return c
  end

  local function assert_busy(app)
    local s = t.sse(app, "/s")
    defer(function() s:close() end)
    assert.equal(503, s.status)
    assert.matches("server busy", s.body, 1, true)
    local w = t.ws(app, "/w")
    defer(function() w:abort() end)
    assert.equal(503, w.status)
    assert.matches("server busy", w.body, 1, true)
    -- plain requests are still served
    assert.equal(200, t.get(app, "/ping").status)
  end

  local function assert_admits(app)
    local s = t.sse(app, "/s")
    defer(function() s:close() end)
    assert.equal(200, s.status)
    local w = t.ws(app, "/w")
    defer(function() w:abort() end)
    assert.equal(101, w.status)
  end

  it("while a subscriber's backlog exceeds it, new SSE and WebSocket streams get 503; drained, 200/101", function()
    local app = queued_app()
    local slow = backlog(app)
    assert_busy(app)
    assert.is_true(app.slow:alive())
    -- the slow reader catches up: the backlog drains and streams open again
    slow.socket:resume()
    t.wait(function() return app:stats().queued_bytes == 0 end, 10, "the backlog to drain")
    assert.is_true(app.slow:alive(), "the slow reader was closed")
    assert_admits(app)
  end)

  it("once the slow subscriber is gone, new streams are admitted again", function()
    local app = queued_app()
    local slow = backlog(app)
    assert_busy(app)
    slow:close()
    t.wait(function() return app:stats().queued_bytes <= LIMIT end, 5, "the slow stream's backlog to go")
    assert_admits(app)
  end)
end)

describe("slowloris (header_timeout = 0.3 s)", function()
  -- Sends bytes a piece every gap ms until the server closes or all is
  -- sent; returns the connection, how many pieces went and the ms from the
  -- first piece to the close.
  local function trickle(app, pieces, gap, prelude)
    local c = connect(app)
    if prelude then c:send(prelude) end
    local started = core.now()
    local sent = 0
    for _, piece in ipairs(pieces) do
      if c.closed then break end
      c:send(piece)
      sent = sent + 1
      t.sleep(gap)
    end
    c:wait_closed(3)
    return c, sent, core.now() - started
  end

  local function bytes_of(s)
    local out = {}
    for i = 1, #s do out[i] = s:sub(i, i) end
    return out
  end

  it("a head sent a byte every 20 ms gets 408 after header_timeout", function()
    local app = new_app { header_timeout = 0.3 }
    local head = "GET /ping HTTP/1.1\r\nHost: x\r\nX-Pad: " .. ("a"):rep(200) .. "\r\n\r\n"
    local c, sent, elapsed = trickle(app, bytes_of(head), 20)
    assert.is_true(sent < #head, "the whole head went through")
    local res = assert(t.parse_response(c.buffer, nil, true), "closed without an answer")
    assert.equal(408, res.status)
    assert.is_true(elapsed >= 250 and elapsed < 1500, "closed after " .. elapsed .. " ms")
    assert.equal(1, app:stats().errors.http_408)
    assert.equal(200, t.get(app, "/ping").status)
  end)

  it("a body sent a byte every 50 ms gets 408 after header_timeout although each byte is in time", function()
    local app = new_app { header_timeout = 0.3 }
    local c, sent, elapsed = trickle(app, bytes_of(("b"):rep(100)), 50,
      "POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    assert.is_true(sent < 100, "the whole body went through: " .. sent .. " bytes")
    local res = assert(t.parse_response(c.buffer, nil, true), "closed without an answer")
    assert.equal(408, res.status)
    assert.is_true(elapsed >= 250 and elapsed < 1500, "closed after " .. elapsed .. " ms")
    assert.is_nil(app.bodies, "the handler ran")
    assert.equal(1, app:stats().errors.http_408)
  end)

  it("a chunked body trickled a chunk of one byte every 50 ms gets 408 too", function()
    local app = new_app { header_timeout = 0.3 }
    local pieces = {}
    for i = 1, 60 do pieces[i] = "1\r\nb\r\n" end
    local c, sent = trickle(app, pieces, 50,
      "POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert.is_true(sent < 60, "the whole body went through")
    local res = assert(t.parse_response(c.buffer, nil, true), "closed without an answer")
    assert.equal(408, res.status)
    assert.is_nil(app.bodies, "the handler ran")
  end)

  it("a big body in one go (900 KB) is served", function()
    local app = new_app { header_timeout = 0.3 }
    local body = ("z"):rep(900 * 1000)
    local res = t.post(app, "/body", body)
    assert.equal(200, res.status)
    assert.equal(tostring(#body), res.body)
  end)

  it("a body that keeps moving (20 KiB every 200 ms, 1.6 s in all) is served", function()
    local app = new_app { header_timeout = 0.3 }
    local pieces = {}
    for i = 1, 8 do pieces[i] = ("m"):rep(20 * 1024) end
    local c = connect(app)
    c:send("POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: " .. (8 * 20 * 1024) .. "\r\n\r\n")
    for _, piece in ipairs(pieces) do
      t.sleep(200)
      assert.is_false(c.closed, "closed while the body was moving: " .. c.buffer)
      c:send(piece)
    end
    local res = assert(c:response { timeout = 2 })
    assert.equal(200, res.status)
    assert.equal(tostring(8 * 20 * 1024), res.body)
  end)
end)

describe("a ping flood from a peer that never reads (max_message_rate = 0, max_queued = 16 KiB)", function()
  local MAX_QUEUED = 16 * 1024
  local PONG = 127 -- a pong frame for a 125-byte ping
  local PING = t.ws_frame("ping", ("p"):rep(125))

  -- An echo app with only the queue bound (no rate limit), and a WebSocket
  -- to it that stops reading. app.closes gets each close code.
  local function flooded()
    local app = new_app { max_message_rate = 0, max_queued = MAX_QUEUED }
    app.closes = {}
    app:ws("/w", {
      message = function(ws, data) ws:send(data) end,
      close = function(_, code) app.closes[#app.closes + 1] = code end,
    })
    local w = t.ws(app, "/w")
    defer(function() w:abort() end)
    assert.equal(101, w.status)
    w.client.socket:pause()
    return app, w
  end

  -- Runs the loop for ms, returning the most bytes the app had queued
  -- between two loop turns.
  local function watch_queue(app, ms, until_fn)
    local most = 0
    local deadline = core.now() + ms
    while core.now() < deadline and not (until_fn and until_fn()) do
      core.run_once(1)
      most = math.max(most, app:stats().queued_bytes)
    end
    return most
  end

  -- After the close: the queue is gone, the flooder sees the end once it
  -- reads, and another client is served.
  local function assert_recovered(app, w)
    t.wait(function() return app:stats().queued_bytes == 0 and app:connections() == 0 end, 3,
      "the flooder's connection and queue to go")
    w.client.socket:resume()
    assert.is_true((w:wait_closed(5)), "the flooder's connection is still open")
    local other = t.ws(app, "/w")
    defer(function() other:abort() end)
    assert.equal(101, other.status)
    other:send("still here")
    assert.equal("still here", assert(other:receive(2)).data)
  end

  it("a flood read 100 pings at a time is closed once max_queued waits; the queue stays within max_queued + a pong",
    function()
    local app, w = flooded()
    -- 100 pings owe 12,700 bytes of pongs, less than max_queued; the next
    -- batch goes once the server has read the last
    local batch = PING:rep(100)
    local pings, most = 0, 0
    local read_before = app:stats().bytes_in
    while #app.closes == 0 do
      assert(pings < 200000, pings .. " pings and the peer is still served")
      w:send_raw(batch)
      pings = pings + 100
      local want = read_before + pings * #PING
      t.wait(function() return app:stats().bytes_in >= want or #app.closes > 0 end, 3, "the server to read the pings")
      most = math.max(most, watch_queue(app, 1))
    end
    t.wait(function() return #app.closes == 1 end, 3, "the server to close the flooder")
    assert.is_true(most <= MAX_QUEUED + PONG,
      ("%d bytes were queued for a peer that does not read (max_queued %d, after %d pings)"):format(
        most, MAX_QUEUED, pings))
    assert.is_true(most > 0, "nothing ever waited: the kernel took every pong")
    assert_recovered(app, w)
  end)

  it("a burst of 40,000 pings in one write: once the loop has written what the kernel takes, the peer is closed " ..
    "or no more than max_queued waits", function()
    local app, w = flooded()
    local read_before = app:stats().bytes_in
    w.client:send(PING:rep(40000)) -- 5.2 MB: pongs of 5 MB, more than the kernel's buffers hold
    local want = read_before + 40000 * #PING
    local most = watch_queue(app, 5000, function() return app:stats().bytes_in >= want or #app.closes > 0 end)
    -- the loop writes what the kernel takes; the rest waits for the peer
    for _, ms in ipairs { 200, 1000 } do
      t.sleep(ms)
      local left = app:stats().queued_bytes
      assert(#app.closes > 0 or left <= MAX_QUEUED + PONG,
        ("%d ms after the flood was read, %d bytes wait for a peer that does not read (max_queued %d) " ..
         "and it is still open (the most queued between two loop turns: %d)"):format(ms, left, MAX_QUEUED, most))
    end
    if #app.closes > 0 then assert_recovered(app, w) end
  end)
end)
