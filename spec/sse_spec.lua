-- The SSE transport over real sockets: the response head, the event-stream
-- format of the HTML standard byte for byte, heartbeat comments, retry,
-- CORS, refusals and errors, and the stream object handed to app:sse.
local herald = require "herald"
local t = require "herald.test"

-- A fresh app, closed when the current test ends. Errors the app logs are
-- collected in app.logged instead of going to stderr.
local function new_app(opts)
  local app = herald.new(opts)
  app.logged = {}
  app:on_error(function(message) app.logged[#app.logged + 1] = message end)
  finally(function() app:close() end)
  return app
end

-- An SSE endpoint at path whose open handler records each stream it gets
-- in the returned list (newest last), after running fn(stream, req) if given.
local function recording_sse(app, path, fn, opts)
  local streams = {}
  app:sse(path, function(s, req)
    streams[#streams + 1] = s
    if fn then return fn(s, req) end
  end, opts)
  return streams
end

-- t.sse, closed when the test ends.
local function open(app, path, opts)
  local s = t.sse(app, path, opts)
  finally(function() s:close() end)
  return s
end

-- A raw client that asked for an SSE stream and read the response head:
-- returns the client (its buffer holds what followed the head) and the head.
local function raw_stream(app, path, headers)
  local c = t.connect(app)
  finally(function() c:close() end)
  c:send(t.encode_request("GET", path, headers or { Accept = "text/event-stream" }))
  local head = assert(c:read_until("^(.-\r\n\r\n)"), "no response head")
  c.buffer = c.buffer:sub(#head + 1)
  return c, head
end

-- Waits for #expected bytes on the raw client, checks they are exactly
-- expected, and takes them off its buffer.
local function expect_bytes(c, expected, timeout)
  t.wait(function() return #c.buffer >= #expected or c.closed end, timeout, ("%q"):format(expected))
  assert.equal(expected, c.buffer:sub(1, #expected))
  c.buffer = c.buffer:sub(#expected + 1)
end

-- A readable name for a string with control bytes in a test's title.
local function show(s)
  return '"' .. s:gsub("[%c\\]", { ["\n"] = "\\n", ["\r"] = "\\r", ["\0"] = "\\0", ["\t"] = "\\t",
    ["\\"] = "\\\\" }) .. '"'
end

local saved_timeout
before_each(function() saved_timeout = t.timeout; t.timeout = 2 end)
after_each(function() t.timeout = saved_timeout end)

describe("SSE response head", function()
  it("is 200 with Content-Type text/event-stream, Cache-Control no-cache and X-Accel-Buffering no", function()
    local app = new_app()
    recording_sse(app, "/events")
    local s = open(app, "/events")
    assert.equal(200, s.status)
    assert.matches("^text/event%-stream", s.headers["content-type"])
    assert.equal("no-cache", s.headers["cache-control"])
    assert.equal("no", s.headers["x-accel-buffering"])
    assert.is_truthy(s.headers.date)
    -- a stream has no length and is not chunked: it runs until the connection closes
    assert.is_nil(s.headers["content-length"])
    assert.is_nil(s.headers["transfer-encoding"])
    assert.is_nil(s.headers.connection)
  end)

  it("keeps the connection open with nothing to send", function()
    local app = new_app()
    recording_sse(app, "/events")
    local s = open(app, "/events")
    local ev, err = s:next(0.2)
    assert.is_nil(ev)
    assert.equal("timeout", err)
    assert.is_false(s:closed())
    assert.equal(1, app:stats().streams)
  end)

  it("answers HEAD with the head alone: no retry, no events, nothing published after", function()
    local app = new_app()
    recording_sse(app, "/events", function(s)
      assert(s:subscribe("t"))
      s:send("hello")
    end, { retry = 100 })
    local c = t.connect(app)
    finally(function() c:close() end)
    c:send("HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(c:response { head = true })
    assert.is_true(res.status == 200 or res.status == 405, "HEAD got " .. res.status)
    app:publish("t", "published")
    t.sleep(100)
    assert.equal("", c.buffer)
  end)

  it("reads and discards what the client sends after its request", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    app:get("/ping", function(_, res) res:send("pong") end)
    local c = t.connect(app)
    finally(function() c:close() end)
    c:send("GET /events HTTP/1.1\r\nHost: x\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    local head = assert(c:read_until("^(.-\r\n\r\n)"))
    assert.matches("^HTTP/1%.1 200 ", head)
    c.buffer = c.buffer:sub(#head + 1)
    c:send("more bytes\r\n\r\n")
    t.sleep(50)
    streams[1]:send("still streaming")
    expect_bytes(c, "data: still streaming\n\n")
    assert.equal("", c.buffer)
    assert.is_false(c.closed)
  end)

  it("app:close() ends open streams and runs their close callbacks", function()
    local app = new_app()
    local closed = 0
    recording_sse(app, "/events", nil, { close = function() closed = closed + 1 end })
    local a = open(app, "/events")
    local b = open(app, "/events")
    app:close()
    t.wait(function() return a:closed() and b:closed() end, 2, "the streams to end")
    t.wait(function() return closed == 2 end, 1, "the close callbacks")
    assert.equal(0, app:stats().streams)
  end)

  -- An idle server holds many streams: each keeps only what is its own
  -- (the route's callbacks and the app are its class's; the request went
  -- when it started; topics without a leave rule are the hub's record).
  it("a started stream holds only its conn, params and user", function()
    local function room(app)
      return recording_sse(app, "/rooms/:room", function(st, req)
        assert(st:subscribe("room:" .. req.params.room))
        st:replay()
      end, { close = function() end })
    end
    local function fields(st)
      local keys = {}
      for k in pairs(st) do keys[#keys + 1] = k end
      table.sort(keys)
      return keys
    end
    local with_auth, anonymous = new_app(), new_app()
    with_auth:auth(function(req) return req.query.user end)
    local streams, anonymous_streams = room(with_auth), room(anonymous)
    assert.equal(200, open(with_auth, "/rooms/kitchen?user=ann").status)
    assert.equal(200, open(anonymous, "/rooms/hall").status)
    assert.same({ "conn", "params", "user" }, fields(streams[1]))
    assert.same({ "conn", "params" }, fields(anonymous_streams[1]))
    assert.equal("ann", streams[1].user)
    assert.equal("kitchen", streams[1].params.room)
    assert.equal(with_auth, streams[1].app)
    assert.is_nil(streams[1].req)
    assert.is_true(streams[1]:alive())
    assert.equal(1, with_auth:subscribers("room:kitchen"))
  end)

  it("serves the stream at a route with parameters, which the stream sees", function()
    local app = new_app()
    local query_in_open
    local streams = recording_sse(app, "/rooms/:room/events", function(st) query_in_open = st.req.query.x end)
    local s = open(app, "/rooms/kitchen/events?x=1")
    assert.equal(200, s.status)
    assert.equal("kitchen", streams[1].params.room)
    assert.equal("1", query_in_open)
    assert.is_nil(streams[1].req, "the request is let go once the stream is open")
  end)
end)

describe("SSE serialization (HTML standard event-stream)", function()
  -- data sent, the bytes on the wire, the data a standard parser dispatches
  local cases = {
    { "one line", "hello", "data: hello\n\n", "hello" },
    { "LF line endings", "a\nb\nc", "data: a\ndata: b\ndata: c\n\n", "a\nb\nc" },
    { "CRLF line endings", "a\r\nb\r\nc", "data: a\ndata: b\ndata: c\n\n", "a\nb\nc" },
    { "CR line endings", "a\rb\rc", "data: a\ndata: b\ndata: c\n\n", "a\nb\nc" },
    { "mixed line endings", "a\rb\nc\r\nd", "data: a\ndata: b\ndata: c\ndata: d\n\n", "a\nb\nc\nd" },
    { "CR then LF apart from CRLF (LF CR)", "a\n\rb", "data: a\ndata:\ndata: b\n\n", "a\n\nb" },
    { "two CRs (an empty line between)", "a\r\rb", "data: a\ndata:\ndata: b\n\n", "a\n\nb" },
    { "empty data", "", "data:\n\n", "" },
    { "a trailing LF", "line\n", "data: line\ndata:\n\n", "line\n" },
    { "a trailing CRLF", "line\r\n", "data: line\ndata:\n\n", "line\n" },
    { "a trailing CR", "line\r", "data: line\ndata:\n\n", "line\n" },
    { "a lone LF", "\n", "data:\ndata:\n\n", "\n" },
    { "a leading LF", "\nx", "data:\ndata: x\n\n", "\nx" },
    { "blank lines only", "\r\n\r\n", "data:\ndata:\ndata:\n\n", "\n\n" },
    { "a leading space (kept: only the one after the colon is eaten)", " x", "data:  x\n\n", " x" },
    { "colons and field-like text", "data: id: 1", "data: data: id: 1\n\n", "data: id: 1" },
    { "unicode", "héllo ✓ 日本語 🎉", "data: héllo ✓ 日本語 🎉\n\n", "héllo ✓ 日本語 🎉" },
    { "a NUL byte in data", "a\0b", "data: a\0b\n\n", "a\0b" },
  }

  for _, case in ipairs(cases) do
    local name, data, wire, parsed = case[1], case[2], case[3], case[4]
    it(("stream:send with %s"):format(name), function()
      local app = new_app()
      local streams = recording_sse(app, "/events")
      local c = raw_stream(app, "/events")
      local s = open(app, "/events")
      assert.equal(2, #streams)
      assert.is_true(streams[1]:send(data))
      assert.is_true(streams[2]:send(data))
      expect_bytes(c, wire)
      local ev = assert(s:next(1))
      assert.equal(parsed, ev.data)
      assert.equal("message", ev.event)
    end)

    it(("app:publish with %s"):format(name), function()
      local app = new_app()
      recording_sse(app, "/events", function(s) assert(s:subscribe("news")) end)
      local c = raw_stream(app, "/events")
      local s = open(app, "/events")
      local id, reached = app:publish("news", data)
      assert.equal(2, reached)
      expect_bytes(c, "id: " .. id .. "\n" .. wire)
      local ev = assert(s:next(1))
      assert.equal(parsed, ev.data)
      assert.equal(id, ev.id)
    end)
  end

  it("writes id, then event, then retry, then the data lines", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local c = raw_stream(app, "/events")
    local s = open(app, "/events")
    for _, st in ipairs(streams) do
      assert.is_true(st:send("x\ny", { id = "42", event = "update", retry = 1500 }))
    end
    expect_bytes(c, "id: 42\nevent: update\nretry: 1500\ndata: x\ndata: y\n\n")
    local ev = assert(s:next(1))
    assert.same({ id = "42", event = "update", data = "x\ny" }, ev)
    assert.equal("42", s.last_id)
    assert.equal(1500, s.retry)
  end)

  it("writes a published event's name after its id", function()
    local app = new_app()
    recording_sse(app, "/events", function(s) assert(s:subscribe("t")) end)
    local c = raw_stream(app, "/events")
    local id = app:publish("t", "payload", { event = "tick" })
    expect_bytes(c, ("id: %s\nevent: tick\ndata: payload\n\n"):format(id))
  end)

  it("keeps unicode event names and ids", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    streams[1]:send("d", { event = "änderung", id = "ид-1" })
    local ev = assert(s:next(1))
    assert.same({ id = "ид-1", event = "änderung", data = "d" }, ev)
  end)

  describe("refuses CR, LF and NUL with a clear error", function()
    for _, bad in ipairs { "a\nb", "a\rb", "a\r\nb", "a\0b", "\n", "ab\r" } do
      it("in stream:send's id " .. show(bad), function()
        local app = new_app()
        local streams = recording_sse(app, "/events")
        local c = raw_stream(app, "/events")
        local ok, err = pcall(streams[1].send, streams[1], "data", { id = bad })
        assert.is_false(ok)
        assert.matches("id must not contain CR, LF or NUL", err, 1, true)
        -- nothing went out, and the stream still works
        streams[1]:send("after")
        expect_bytes(c, "data: after\n\n")
      end)

      it("in stream:send's event " .. show(bad), function()
        local app = new_app()
        local streams = recording_sse(app, "/events")
        local c = raw_stream(app, "/events")
        local ok, err = pcall(streams[1].send, streams[1], "data", { event = bad })
        assert.is_false(ok)
        assert.matches("event must not contain CR, LF or NUL", err, 1, true)
        streams[1]:send("after")
        expect_bytes(c, "data: after\n\n")
      end)

      it("in app:publish's event " .. show(bad) .. ", publishing nothing", function()
        local app = new_app()
        recording_sse(app, "/events", function(s) assert(s:subscribe("t")) end)
        local c = raw_stream(app, "/events")
        local ok, err = pcall(app.publish, app, "t", "data", { event = bad })
        assert.is_false(ok)
        assert.matches("event must not contain CR, LF or NUL", err, 1, true)
        assert.equal(0, app:stats().published)
        assert.same({}, (app:history("t")))
        local id = app:publish("t", "after")
        expect_bytes(c, ("id: %s\ndata: after\n\n"):format(id))
      end)
    end

    it("in a comment", function()
      local app = new_app()
      local streams = recording_sse(app, "/events")
      open(app, "/events")
      for _, bad in ipairs { "a\nb", "a\rb", "a\0b" } do
        local ok, err = pcall(streams[1].comment, streams[1], bad)
        assert.is_false(ok)
        assert.matches("must not contain CR, LF or NUL", err, 1, true)
      end
    end)
  end)

  it("refuses event names and ids over 256 bytes", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    open(app, "/events")
    local long = ("e"):rep(257)
    assert.is_true(streams[1]:send("ok", { event = ("e"):rep(256), id = ("i"):rep(256) }))
    assert.has_error(function() streams[1]:send("x", { event = long }) end)
    assert.has_error(function() streams[1]:send("x", { id = long }) end)
    assert.has_error(function() app:publish("t", "x", { event = long }) end)
  end)

  it("refuses data that is not a string and opts that are not a table", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    open(app, "/events")
    local st = streams[1]
    assert.has_error(function() st:send(42) end, "send: data must be a string")
    assert.has_error(function() st:send(nil) end, "send: data must be a string")
    assert.has_error(function() st:send("x", "id") end, "send: opts must be a table")
    assert.has_error(function() st:send("x", { retry = 1.5 }) end, "send: opts.retry must be an integer >= 0 (ms)")
    assert.has_error(function() st:comment(42) end, "comment: text must be a string")
    assert.has_error(function() app:publish("t", 42) end, "publish: data must be a string")
    assert.has_error(function() app:publish("t", "x", { evnt = "typo" }) end, "publish: unknown option 'evnt'")
  end)

  it("writes comments as ': text' lines, which parsers skip", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local c = raw_stream(app, "/events")
    local s = open(app, "/events")
    for _, st in ipairs(streams) do
      assert.is_true(st:comment("hello there"))
      assert.is_true(st:comment())
      assert.is_true(st:send("real"))
    end
    expect_bytes(c, ": hello there\n\n:\n\ndata: real\n\n")
    local ev = assert(s:next(1))
    assert.equal("real", ev.data)
    assert.equal(2, s.comments)
  end)
end)

describe("SSE heartbeat", function()
  it("sends a ':' comment every heartbeat seconds (heartbeat = 0.1)", function()
    local app = new_app { heartbeat = 0.1 }
    recording_sse(app, "/events")
    local c = raw_stream(app, "/events")
    local start = herald.now()
    local beats = {}
    t.wait(function()
      while c.buffer:sub(1, 3) == ":\n\n" do
        c.buffer = c.buffer:sub(4)
        beats[#beats + 1] = herald.now() - start
      end
      return #beats >= 5
    end, 2, "5 heartbeats")
    assert.equal("", c.buffer) -- nothing but heartbeats
    -- five beats take five intervals (give or take the time to read the
    -- head and the loop's clock): not early, and not much late
    assert.is_true(beats[1] >= 50, "first heartbeat after " .. beats[1] .. " ms")
    assert.is_true(beats[5] >= 400, "fifth heartbeat after " .. beats[5] .. " ms")
    assert.is_true(beats[5] <= 1000, "fifth heartbeat after " .. beats[5] .. " ms")
    for i = 2, 5 do
      local gap = beats[i] - beats[i - 1]
      assert.is_true(gap >= 60 and gap <= 300, ("heartbeat %d came %d ms after the one before"):format(i, gap))
    end
  end)

  it("keeps beating while events flow, and the parser skips the beats", function()
    local app = new_app { heartbeat = 0.05 }
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    for i = 1, 4 do
      t.sleep(60)
      streams[1]:send("event " .. i)
    end
    local got = s:take(4, 1)
    for i = 1, 4 do assert.equal("event " .. i, got[i].data) end
    assert.is_true(s.comments >= 2, "only " .. s.comments .. " heartbeats")
  end)

  it("takes the endpoint's heartbeat option over the app's", function()
    local app = new_app { heartbeat = 30 }
    recording_sse(app, "/fast", nil, { heartbeat = 0.05 })
    recording_sse(app, "/slow")
    local fast = open(app, "/fast")
    local slow = open(app, "/slow")
    t.sleep(300)
    fast:next(0); slow:next(0)
    assert.is_true(fast.comments >= 3, "fast stream had " .. fast.comments .. " heartbeats")
    assert.equal(0, slow.comments)
  end)

  it("sends none with heartbeat = 0", function()
    local app = new_app { heartbeat = 0 }
    recording_sse(app, "/events")
    local c = raw_stream(app, "/events")
    t.sleep(250)
    assert.equal("", c.buffer)
    assert.is_false(c.closed)
  end)

  it("refuses a heartbeat out of range", function()
    local app = new_app()
    assert.has_error(function() app:sse("/x", function() end, { heartbeat = -1 }) end)
    assert.has_error(function() app:sse("/x", function() end, { heartbeat = "5" }) end)
    assert.has_error(function() herald.new { heartbeat = 3601 } end)
  end)
end)

describe("SSE retry", function()
  it("starts the stream with the retry option", function()
    local app = new_app()
    recording_sse(app, "/events", nil, { retry = 2500 })
    local c = raw_stream(app, "/events")
    expect_bytes(c, "retry: 2500\n\n")
    local s = open(app, "/events")
    s:next(0.1)
    assert.equal(2500, s.retry)
  end)

  it("sends no retry field without the option", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local c = raw_stream(app, "/events")
    streams[1]:send("first")
    expect_bytes(c, "data: first\n\n")
  end)

  it("sends retry with one event via stream:send", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    streams[1]:send("x", { retry = 0 })
    assert.equal("x", assert(s:next(1)).data)
    assert.equal(0, s.retry)
    streams[1]:send("y", { retry = 86400000 })
    assert.equal("y", assert(s:next(1)).data)
    assert.equal(86400000, s.retry)
  end)

  it("refuses a retry option that is not an integer from 0 to 86400000", function()
    local app = new_app()
    for _, bad in ipairs { -1, 1.5, "100", 86400001 } do
      assert.has_error(function() app:sse("/x", function() end, { retry = bad }) end)
    end
  end)

  it("refuses a negative retry in stream:send instead of silently leaving it out", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    open(app, "/events")
    assert.has_error(function() streams[1]:send("x", { retry = -5 }) end)
  end)
end)

describe("SSE CORS", function()
  local function cors_headers(cors, origin, credentials)
    local app = new_app()
    recording_sse(app, "/events", nil, { cors = cors, credentials = credentials })
    local s = open(app, "/events", { headers = origin and { Origin = origin } or nil })
    assert.equal(200, s.status)
    return s.headers
  end

  it("sends no CORS headers without the option", function()
    local h = cors_headers(nil, "https://a.example")
    assert.is_nil(h["access-control-allow-origin"])
    assert.is_nil(h["access-control-allow-credentials"])
  end)

  it("cors = true allows any origin with *", function()
    assert.equal("*", cors_headers(true, "https://a.example")["access-control-allow-origin"])
    assert.equal("*", cors_headers(true, nil)["access-control-allow-origin"])
    assert.equal("*", cors_headers("*", "https://b.example")["access-control-allow-origin"])
    assert.is_nil(cors_headers(true, "https://a.example")["access-control-allow-credentials"])
  end)

  it("cors = an origin echoes that origin only, with Vary: Origin", function()
    local h = cors_headers("https://a.example", "https://a.example")
    assert.equal("https://a.example", h["access-control-allow-origin"])
    assert.equal("Origin", h.vary)
    h = cors_headers("https://a.example", "https://evil.example")
    assert.is_nil(h["access-control-allow-origin"])
    h = cors_headers("https://a.example", nil)
    assert.is_nil(h["access-control-allow-origin"])
  end)

  it("cors = a list echoes an origin in the list", function()
    local list = { "https://a.example", "https://b.example" }
    assert.equal("https://b.example", cors_headers(list, "https://b.example")["access-control-allow-origin"])
    assert.equal("https://a.example", cors_headers(list, "https://a.example")["access-control-allow-origin"])
    assert.is_nil(cors_headers(list, "https://c.example")["access-control-allow-origin"])
    assert.is_nil(cors_headers({}, "https://a.example")["access-control-allow-origin"])
  end)

  it("cors = a function decides per origin", function()
    local asked = {}
    local function allow(origin)
      asked[#asked + 1] = origin
      return origin:match("%.good%.example$") ~= nil
    end
    assert.equal("https://x.good.example", cors_headers(allow, "https://x.good.example")["access-control-allow-origin"])
    assert.is_nil(cors_headers(allow, "https://x.bad.example")["access-control-allow-origin"])
    assert.same({ "https://x.good.example", "https://x.bad.example" }, asked)
  end)

  it("credentials = true adds Access-Control-Allow-Credentials for an allowed origin", function()
    local h = cors_headers("https://a.example", "https://a.example", true)
    assert.equal("https://a.example", h["access-control-allow-origin"])
    assert.equal("true", h["access-control-allow-credentials"])
    h = cors_headers({ "https://a.example" }, "https://a.example", false)
    assert.is_nil(h["access-control-allow-credentials"])
    h = cors_headers("https://a.example", "https://evil.example", true)
    assert.is_nil(h["access-control-allow-origin"])
    assert.is_nil(h["access-control-allow-credentials"])
  end)

  it("cors = true with credentials = true works for a credentialed browser request or is refused", function()
    -- Browsers reject "Access-Control-Allow-Origin: *" on a request with
    -- credentials, so the combination must either echo the origin with
    -- Access-Control-Allow-Credentials or be refused when the endpoint is made.
    local app = new_app()
    local ok = pcall(app.sse, app, "/events", function() end, { cors = true, credentials = true })
    if not ok then return end
    local s = open(app, "/events", { headers = { Origin = "https://a.example" } })
    assert.equal("https://a.example", s.headers["access-control-allow-origin"])
    assert.equal("true", s.headers["access-control-allow-credentials"])
  end)

  it("refuses a cors option of another type", function()
    local app = new_app()
    assert.has_error(function() app:sse("/x", function() end, { cors = 42 }) end,
      "sse: option 'cors' must be true, an origin, a list of origins or a function")
    assert.has_error(function() app:sse("/x", function() end, { credentials = "yes" }) end)
  end)

  it("a cors function that raises answers 500, logs it and leaves no stream behind", function()
    local app = new_app()
    local closed, left = 0, 0
    app:topic("room", { leave = function() left = left + 1 end })
    recording_sse(app, "/events", function(s)
      assert(s:subscribe("room"))
      s:on_close(function() closed = closed + 1 end)
    end, { cors = function() error("cors check failed") end })
    local s = open(app, "/events", { headers = { Origin = "https://a.example" } })
    assert.equal(500, s.status)
    assert.equal(1, #app.logged)
    assert.matches("cors check failed", app.logged[1], 1, true)
    -- the origin is checked before open: nothing was opened, so nothing to undo
    assert.equal(0, app:subscribers("room"))
    assert.equal(0, app:stats().streams)
    assert.equal(0, closed)
    assert.equal(0, left)
    assert.equal(0, select(2, app:publish("room", "x")))
    -- and once the client has gone, nothing is left of it
    s:close()
    t.sleep(100)
    assert.equal(0, app:stats().streams)
  end)
end)

describe("SSE refusals and errors", function()
  it("a Lua error in the open handler answers 500 and is logged with a traceback", function()
    local app = new_app()
    recording_sse(app, "/events", function() error("open exploded") end)
    local s = open(app, "/events")
    assert.equal(500, s.status)
    assert.equal("internal server error\n", s.body)
    assert.equal(1, #app.logged)
    assert.matches("open exploded", app.logged[1], 1, true)
    assert.matches("stack traceback:", app.logged[1], 1, true)
    assert.matches("sse_spec.lua", app.logged[1], 1, true)
    assert.equal(0, app:stats().streams)
    -- and the app goes on serving streams
    local ok = t.sse(app, "/events")
    ok:close()
    assert.equal(500, ok.status)
    assert.equal(2, #app.logged)
  end)

  it("an error in the open handler after subscribing leaves no subscription", function()
    local app = new_app()
    local closed = 0
    recording_sse(app, "/events", function(s)
      s:on_close(function() closed = closed + 1 end)
      assert(s:subscribe("room"))
      error("after subscribe")
    end)
    local s = open(app, "/events")
    assert.equal(500, s.status)
    assert.equal(0, app:subscribers("room"))
    assert.equal(1, closed)
    assert.equal(0, select(2, app:publish("room", "x")))
  end)

  it("open returning false refuses with 403", function()
    local app = new_app()
    recording_sse(app, "/events", function() return false end)
    local s = open(app, "/events")
    assert.equal(403, s.status)
    assert.equal("refused\n", s.body)
    assert.equal(0, app:stats().streams)
  end)

  it("open returning false, status, body refuses with them", function()
    local app = new_app()
    recording_sse(app, "/rooms/:room", function(_, req)
      if req.params.room ~= "lobby" then return false, 404, "no such room\n" end
    end)
    local s = open(app, "/rooms/cellar")
    assert.equal(404, s.status)
    assert.equal("no such room\n", s.body)
    assert.equal(200, open(app, "/rooms/lobby").status)
    -- a status that is not an error status falls back to 403
    local app2 = new_app()
    recording_sse(app2, "/x", function() return false, 200, "nope\n" end)
    local r = open(app2, "/x")
    assert.equal(403, r.status)
    assert.equal("nope\n", r.body)
  end)

  it("a refused stream drops what open subscribed and runs its close callbacks", function()
    local app = new_app()
    local closed = 0
    recording_sse(app, "/events", function(s)
      assert(s:subscribe("room"))
      s:on_close(function() closed = closed + 1 end)
      return false
    end)
    assert.equal(403, open(app, "/events").status)
    assert.equal(0, app:subscribers("room"))
    assert.equal(1, closed)
  end)

  it("answers 404 for an unknown path and 405 for another method", function()
    local app = new_app()
    recording_sse(app, "/events")
    assert.equal(404, open(app, "/nope").status)
    local res = t.post(app, "/events", "x")
    assert.equal(405, res.status)
    assert.equal("GET, HEAD", res.headers.allow)
  end)

  it("auth returning nil answers 401 unauthorized, and open is not called", function()
    local app = new_app()
    app:auth(function() return nil end)
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    assert.equal(401, s.status)
    assert.equal("unauthorized\n", s.body)
    assert.equal(0, #streams)
  end)

  it("auth returning nil, 403 answers 403 forbidden; a body is sent as given", function()
    local app = new_app()
    app:auth(function(req)
      local token = req.headers["authorization"]
      if token == "Bearer bad" then return nil, 403 end
      if token == "Bearer old" then return nil, 401, "token expired\n" end
      if token == "Bearer weird" then return false, 999 end
      if token == "Bearer good" then return { name = "ann" } end
    end)
    recording_sse(app, "/events")
    local s = open(app, "/events", { headers = { Authorization = "Bearer bad" } })
    assert.equal(403, s.status)
    assert.equal("forbidden\n", s.body)
    s = open(app, "/events", { headers = { Authorization = "Bearer old" } })
    assert.equal(401, s.status)
    assert.equal("token expired\n", s.body)
    s = open(app, "/events", { headers = { Authorization = "Bearer weird" } })
    assert.equal(401, s.status)
    s = open(app, "/events", { headers = { Authorization = "Bearer good" } })
    assert.equal(200, s.status)
  end)

  it("auth that raises answers 500 and is logged with a traceback", function()
    local app = new_app()
    app:auth(function() error("auth backend down") end)
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    assert.equal(500, s.status)
    assert.equal(0, #streams)
    assert.equal(1, #app.logged)
    assert.matches("auth backend down", app.logged[1], 1, true)
    assert.matches("stack traceback:", app.logged[1], 1, true)
  end)

  it("refuses bad arguments to app:sse and app:auth", function()
    local app = new_app()
    assert.has_error(function() app:sse("/x", "open") end, "sse: open must be a function")
    assert.has_error(function() app:sse("/x", function() end, { colse = function() end }) end,
      "sse: unknown option 'colse'")
    assert.has_error(function() app:sse("/x", function() end, { close = true }) end)
    assert.has_error(function() app:auth(42) end, "auth: fn must be a function")
  end)
end)

describe("the SSE stream object", function()
  it("stream.user is what auth returned", function()
    local app = new_app()
    local ann = { name = "ann" }
    app:auth(function(req) return req.headers["x-user"] == "ann" and ann or "someone else" end)
    local streams = recording_sse(app, "/events")
    open(app, "/events", { headers = { ["X-User"] = "ann" } })
    open(app, "/events")
    assert.equal(ann, streams[1].user)
    assert.equal("someone else", streams[2].user)
  end)

  it("stream.user is nil without auth", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    open(app, "/events")
    assert.is_nil(streams[1].user)
  end)

  it("what open sends before the stream starts arrives first, in order", function()
    local app = new_app()
    recording_sse(app, "/events", function(s)
      s:send("one")
      s:comment("note")
      s:send("two", { event = "second" })
    end)
    local c = raw_stream(app, "/events")
    expect_bytes(c, "data: one\n\n: note\n\nevent: second\ndata: two\n\n")
  end)

  it("stream:close() from the server ends the stream", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    assert.is_true(streams[1]:alive())
    streams[1]:close()
    assert.is_false(streams[1]:alive())
    local ev, err = s:next(1)
    assert.is_nil(ev)
    assert.equal("closed", err)
    t.wait(function() return app:stats().streams == 0 end, 1, "the stream to go")
    assert.same({ nil, "connection closed" }, { streams[1]:send("late") })
  end)

  it("stream:close() delivers what was sent before it", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    streams[1]:send("goodbye")
    streams[1]:close()
    local ev = s:next(1)
    assert.is_not_nil(ev, "the event sent just before close was lost")
    assert.equal("goodbye", ev.data)
    assert.same({ nil, "closed" }, { s:next(1) })
  end)

  it("the close callbacks run once, with the stream, when the client goes", function()
    local app = new_app()
    local calls = {}
    local streams = recording_sse(app, "/events", function(s)
      s:on_close(function(st) calls[#calls + 1] = { "on_close", st } end)
    end, { close = function(st) calls[#calls + 1] = { "opts.close", st } end })
    local s = open(app, "/events")
    t.sleep(50)
    assert.same({}, calls)
    s:close()
    t.wait(function() return #calls >= 2 end, 1, "the close callbacks")
    t.sleep(100)
    assert.equal(2, #calls)
    local names = { calls[1][1], calls[2][1] }
    table.sort(names)
    assert.same({ "on_close", "opts.close" }, names)
    assert.equal(streams[1], calls[1][2])
    assert.equal(streams[1], calls[2][2])
    assert.is_false(streams[1]:alive())
    assert.equal(0, app:stats().streams)
  end)

  it("the close callbacks run once when the server closes the stream", function()
    local app = new_app()
    local count = 0
    local streams = recording_sse(app, "/events", nil, { close = function() count = count + 1 end })
    local s = open(app, "/events")
    streams[1]:close()
    streams[1]:close()
    s:next(1)
    t.wait(function() return count > 0 end, 1, "the close callback")
    t.sleep(50)
    assert.equal(1, count)
  end)

  it("a close callback that raises is logged and the others still run", function()
    local app = new_app()
    local ran = false
    recording_sse(app, "/events", function(s)
      s:on_close(function() error("closer failed") end)
      s:on_close(function() ran = true end)
    end)
    local s = open(app, "/events")
    s:close()
    t.wait(function() return ran end, 1, "the second close callback")
    assert.equal(1, #app.logged)
    assert.matches("closer failed", app.logged[1], 1, true)
  end)

  it("subscribing beyond max_subscriptions returns nil and a reason", function()
    local app = new_app { max_subscriptions = 3 }
    local results = {}
    recording_sse(app, "/events", function(s)
      for _, topic in ipairs { "a", "b", "c", "a", "d", "e" } do
        results[#results + 1] = { s:subscribe(topic) }
      end
      assert.is_true(s:unsubscribe("b"))
      results[#results + 1] = { s:subscribe("d") }
    end)
    open(app, "/events")
    assert.same({ { true }, { true }, { true }, { true } }, { results[1], results[2], results[3], results[4] })
    assert.is_nil(results[5][1])
    assert.equal("too many subscriptions", results[5][2])
    assert.is_nil(results[6][1])
    assert.same({ true }, results[7]) -- a freed place can be taken again
    assert.equal(1, app:subscribers("d"))
    assert.equal(0, app:subscribers("e"))
  end)

  it("unsubscribe stops delivery and says whether the stream was in the topic", function()
    local app = new_app()
    local streams = recording_sse(app, "/events", function(s) assert(s:subscribe("a")) end)
    local s = open(app, "/events")
    app:publish("a", "1")
    assert.equal("1", assert(s:next(1)).data)
    assert.is_true(streams[1]:unsubscribe("a"))
    assert.is_false(streams[1]:unsubscribe("a"))
    assert.is_false(streams[1]:unsubscribe("never"))
    local _, reached = app:publish("a", "2")
    assert.equal(0, reached)
    assert.same({ nil, "timeout" }, { s:next(0.2) })
  end)

  it("subscribe after the stream started delivers from then on", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    app:publish("late", "before")
    assert.is_true(streams[1]:subscribe("late"))
    app:publish("late", "after")
    assert.equal("after", assert(s:next(1)).data)
  end)

  it("subscribe on a closed stream returns nil and a reason", function()
    local app = new_app()
    local streams = recording_sse(app, "/events")
    local s = open(app, "/events")
    s:close()
    t.wait(function() return not streams[1]:alive() end, 1, "the stream to close")
    local ok, err = streams[1]:subscribe("x")
    assert.is_nil(ok)
    assert.equal("connection closed", err)
    assert.equal(0, app:subscribers("x"))
  end)

  describe("topic names are checked, and errors name the argument", function()
    local function subscribe_error(topic)
      local app = new_app()
      local err
      recording_sse(app, "/events", function(s)
        local ok
        ok, err = pcall(s.subscribe, s, topic)
        assert(not ok, "subscribe accepted a bad topic")
      end)
      open(app, "/events")
      return err
    end

    it("in stream:subscribe", function()
      assert.matches("subscribe: topic must be a string", subscribe_error(42), 1, true)
      assert.matches("subscribe: topic must be a string", subscribe_error(nil), 1, true)
      assert.matches("topic must be 1 to 1024 bytes", subscribe_error(""), 1, true)
      assert.matches("topic must be 1 to 1024 bytes", subscribe_error(("x"):rep(1025)), 1, true)
      assert.matches("topic must not contain control characters", subscribe_error("a\nb"), 1, true)
      assert.matches("topic must not contain control characters", subscribe_error("a\0b"), 1, true)
      assert.matches("topic must not contain control characters", subscribe_error("tab\there"), 1, true)
    end)

    it("in app:publish, app:history, app:subscribers and app:presence", function()
      local app = new_app()
      for _, fn in ipairs { "publish", "history", "subscribers", "presence" } do
        local ok, err = pcall(app[fn], app, 42, "data")
        assert.is_false(ok)
        assert.matches(fn .. ": topic must be a string", err, 1, true)
        ok, err = pcall(app[fn], app, "", "data")
        assert.is_false(ok)
        assert.matches("topic must be 1 to 1024 bytes", err, 1, true)
        ok, err = pcall(app[fn], app, "a\rb", "data")
        assert.is_false(ok)
        assert.matches("topic must not contain control characters", err, 1, true)
      end
      assert.equal(0, app:stats().published)
      -- 1024 bytes and any printable byte are fine
      local id, reached = app:publish(("x"):rep(1024), "ok")
      assert.is_string(id)
      assert.equal(0, reached)
      assert.is_string((app:publish("room:ä/1 *", "ok")))
    end)

    it("in stream:unsubscribe", function()
      local app = new_app()
      local streams = recording_sse(app, "/events")
      open(app, "/events")
      assert.has_error(function() streams[1]:unsubscribe(42) end, "unsubscribe: topic must be a string")
    end)
  end)

  it("app:publish returns the id and how many subscribers it reached", function()
    local app = new_app()
    recording_sse(app, "/events", function(s) assert(s:subscribe("t")) end)
    local id, reached = app:publish("t", "nobody yet")
    assert.matches("^%x%x%x%x%x%x%x%x%-%d+$", id)
    assert.equal(0, reached)
    local a = open(app, "/events")
    local b = open(app, "/events")
    local id2, reached2 = app:publish("t", "two")
    assert.equal(2, reached2)
    assert.equal(id2, assert(a:next(1)).id)
    assert.equal(id2, assert(b:next(1)).id)
    assert.equal(0, select(2, app:publish("other", "x")))
  end)
end)
