-- The topic hub over WebSocket: fan-out to WebSocket and SSE subscribers
-- alike, the raw and envelope formats, resume with ?last_event_id= and gap
-- reports, the slow-consumer policy, ws:publish under the topic's allow
-- rule, presence and join/leave.
local herald = require "herald"
local t = require "herald.test"
local cjson = require "cjson"

-- These specs count frames and bytes exactly: no keep-alive traffic unless
-- asked for (a slow run, e.g. under valgrind, outlasts heartbeat and ping_interval).
local function new_app(opts)
  local o = { heartbeat = 0, ping_interval = 0 }
  for k, v in pairs(opts or {}) do o[k] = v end
  local app = herald.new(o)
  app.logged = {}
  app:on_error(function(message) app.logged[#app.logged + 1] = message end)
  finally(function() app:close() end)
  return app
end

-- A WebSocket endpoint at path that subscribes each connection to the
-- topics in ?topics=a,b (default "t"); spec adds to the endpoint's spec.
local function ws_endpoint(app, path, spec)
  local s = {
    open = function(ws, req)
      for topic in (req.query.topics or "t"):gmatch("[^,]+") do assert(ws:subscribe(topic)) end
    end,
  }
  for k, v in pairs(spec or {}) do s[k] = v end
  app:ws(path, s)
end

local function open_ws(app, path, opts)
  local w = t.ws(app, path, opts)
  finally(function() w:abort() end)
  assert.equal(101, w.status, w.body)
  return w
end

local function open_sse(app, path, opts)
  local s = t.sse(app, path, opts)
  finally(function() s:close() end)
  assert.equal(200, s.status, s.body)
  return s
end

-- The next frame, which must be a text frame holding a JSON object: decoded.
local function envelope(w, timeout)
  local f, err = w:receive(timeout)
  assert(f, "no frame: " .. tostring(err))
  assert.equal("text", f.kind)
  local ok, value = pcall(cjson.decode, f.data)
  assert(ok and type(value) == "table", "not a JSON object: " .. f.data:sub(1, 200))
  return value
end

-- Frames until none comes for quiet seconds.
local function drain(w, quiet)
  local list = {}
  while true do
    local f = w:receive(quiet or 0.1)
    if not f then return list end
    list[#list + 1] = f
  end
end

local saved_timeout
before_each(function() saved_timeout = t.timeout; t.timeout = 5 end)
after_each(function() t.timeout = saved_timeout end)

describe("ws hub fan-out", function()
  it("a publish reaches 1,000 WebSocket and 1,000 SSE subscribers, each message once and in order", function()
    local app = new_app()
    ws_endpoint(app, "/w")
    app:sse("/s", function(s) assert(s:subscribe("t")) end)
    local wss, sses = {}, {}
    finally(function()
      for _, w in ipairs(wss) do w:abort() end
      for _, s in ipairs(sses) do s:close() end
    end)
    for i = 1, 1000 do
      wss[i] = t.ws(app, "/w")
      assert.equal(101, wss[i].status)
      sses[i] = t.sse(app, "/s")
      assert.equal(200, sses[i].status)
    end
    assert.equal(2000, app:subscribers("t"))
    local ids = {}
    for i = 1, 20 do
      local id, reached = app:publish("t", "message " .. i)
      assert.equal(2000, reached)
      ids[i] = id
      if i % 5 == 0 then t.sleep(1) end
    end
    for n, w in ipairs(wss) do
      for i = 1, 20 do
        local f, err = w:receive(5)
        if not f or f.kind ~= "text" or f.data ~= "message " .. i then
          error(("ws client %d: frame %d is %s %q, expected text %q"):format(n, i,
            f and f.kind or "none", f and f.data or tostring(err), "message " .. i))
        end
      end
    end
    for n, s in ipairs(sses) do
      local got = s:take(20, 5)
      for i = 1, 20 do
        if got[i].id ~= ids[i] or got[i].data ~= "message " .. i then
          error(("sse client %d: event %d is %s %q, expected %s %q"):format(n, i, got[i].id, got[i].data,
            ids[i], "message " .. i))
        end
      end
    end
    -- and nothing twice
    t.sleep(50)
    for n, w in ipairs(wss) do
      local f = w:receive(0)
      assert(f == nil, ("ws client %d got an extra %s frame %q"):format(n, f and f.kind, f and f.data))
    end
    for n, s in ipairs(sses) do
      local ev = s:next(0)
      assert(ev == nil, ("sse client %d got an extra event %s"):format(n, ev and ev.id))
    end
    local st = app:stats()
    assert.equal(20, st.published)
    assert.equal(40000, st.delivered)
    assert.equal(0, st.slow_closed)
    assert.equal(2000, st.streams)
  end)

  it("delivers a message published while open runs once, after the 101; ws:send in open too", function()
    local app = new_app()
    local id
    ws_endpoint(app, "/w", {
      format = "envelope",
      open = function(ws)
        assert(ws:subscribe("t"))
        id = app:publish("t", "during open")
        assert(ws:send("welcome"))
      end,
    })
    local w = open_ws(app, "/w")
    local got = drain(w)
    assert.equal(2, #got, "frames: " .. #got)
    local kinds = {}
    for i, f in ipairs(got) do
      kinds[i] = f.kind
      if f.data ~= "welcome" then
        assert.same({ topic = "t", id = id, data = "during open" }, cjson.decode(f.data))
      end
    end
    assert.same({ "text", "text" }, kinds)
  end)
end)

describe("ws hub formats", function()
  it("envelope: each message is a text frame of JSON {topic, id, event, data}", function()
    local app = new_app()
    ws_endpoint(app, "/w", { format = "envelope" })
    local w = open_ws(app, "/w?topics=news")
    local tricky = 'quote " backslash \\ newline \n tab \t nul \0 κόσμε 😀 </script>'
    local id1 = app:publish("news", "plain")
    local id2 = app:publish("news", tricky, { event = "update" })
    local id3 = app:publish("news", "", { event = "empty" })
    local id4 = app:publish("news", "{}", { event = 'a "quoted" \\ event' })
    assert.same({ topic = "news", id = id1, data = "plain" }, envelope(w))
    assert.same({ topic = "news", id = id2, event = "update", data = tricky }, envelope(w))
    assert.same({ topic = "news", id = id3, event = "empty", data = "" }, envelope(w))
    assert.same({ topic = "news", id = id4, event = 'a "quoted" \\ event', data = "{}" }, envelope(w))
    -- data that is not UTF-8 still makes a valid JSON text frame
    app:publish("news", "\xFF\xFE binary")
    local e = envelope(w)
    assert.equal("news", e.topic)
    assert.matches("binary$", e.data)
    assert.same({}, drain(w))
  end)

  it("envelope: a topic name that needs escaping stays intact", function()
    local app = new_app()
    ws_endpoint(app, "/w", { format = "envelope" })
    local w = open_ws(app, "/w?topics=" .. "room%22x")
    app:publish('room"x', "hi")
    assert.same({ topic = 'room"x', id = (app:history('room"x'))[1].id, data = "hi" }, envelope(w))
  end)

  it("raw: the payload as it was published, a text frame if it is UTF-8, else binary", function()
    local app = new_app()
    ws_endpoint(app, "/w")
    local w = open_ws(app, "/w")
    local cases = {
      { "hello", "text" }, { "héllo 😀", "text" }, { "", "text" }, { "nul\0inside", "text" },
      { "\xFF\x00binary", "binary" }, { "\xED\xA0\x80", "binary" }, { "truncated \xE2\x82", "binary" },
      { ("x"):rep(70000), "text" },
    }
    for _, case in ipairs(cases) do app:publish("t", case[1], { event = "ignored" }) end
    for _, case in ipairs(cases) do
      local f = assert(w:receive(2))
      assert.equal(case[2], f.kind, ("%q"):format(case[1]:sub(1, 20)))
      assert.is_true(f.data == case[1], ("%q"):format(case[1]:sub(1, 20)))
    end
    assert.same({}, drain(w))
  end)

  it("raw and envelope subscribers of one topic each get their own format", function()
    local app = new_app()
    ws_endpoint(app, "/raw")
    ws_endpoint(app, "/env", { format = "envelope" })
    local raw, env = open_ws(app, "/raw"), open_ws(app, "/env")
    local raw2, env2 = open_ws(app, "/raw"), open_ws(app, "/env")
    local id = app:publish("t", "both")
    for _, w in ipairs { raw, raw2 } do
      local f = assert(w:receive(2))
      assert.same({ "text", "both" }, { f.kind, f.data })
    end
    for _, w in ipairs { env, env2 } do assert.same({ topic = "t", id = id, data = "both" }, envelope(w)) end
  end)
end)

describe("ws hub close", function()
  it("sends no hub message after its close frame (server-initiated or answering the client's)", function()
    local app = new_app()
    ws_endpoint(app, "/w", {
      message = function(ws, data)
        if data == "close me" then assert(ws:close(4000, "bye")) end
        app:publish("t", "after the close")
      end,
    })
    -- the server closes first: publishes to the closing connection are not sent
    local w = open_ws(app, "/w")
    app:publish("t", "before")
    assert.equal("before", assert(w:receive(2)).data)
    w:send("close me")
    local f = assert(w:receive(2))
    assert.same({ "close", 4000 }, { f.kind, f.code })
    app:publish("t", "later")
    assert.same({}, drain(w, 0.1))
    -- the client closes first: the same after the server's answer
    local w2 = open_ws(app, "/w")
    w2:send_raw(t.ws_frame("close", string.pack(">I2", 1000)) .. t.ws_frame("text", "publish now"))
    f = assert(w2:receive(2))
    assert.same({ "close", 1000 }, { f.kind, f.code })
    app:publish("t", "later")
    assert.same({}, drain(w2, 0.1))
  end)
end)

describe("ws hub resume", function()
  it("?last_event_id= with the envelope replays exactly the missed messages in order, then live", function()
    local app = new_app()
    ws_endpoint(app, "/w", { format = "envelope" })
    local ids = {}
    for i = 1, 6 do
      local topic = i % 2 == 0 and "a" or "b"
      ids[i] = app:publish(topic, "m" .. i)
    end
    app:publish("other", "not subscribed")
    local w = open_ws(app, "/w?topics=a,b&last_event_id=" .. ids[2])
    for i = 3, 6 do
      assert.same({ topic = i % 2 == 0 and "a" or "b", id = ids[i], data = "m" .. i }, envelope(w))
    end
    assert.same({}, drain(w, 0.05))
    local live = app:publish("a", "live")
    assert.same({ topic = "a", id = live, data = "live" }, envelope(w))
    assert.same({}, drain(w, 0.05))
    -- from the newest id: nothing to replay
    local w2 = open_ws(app, "/w?topics=a,b&last_event_id=" .. live)
    assert.same({}, drain(w2, 0.05))
  end)

  it("a gap with the envelope: {topic, event = herald-gap} first, then what history holds", function()
    local app = new_app { history = 2 }
    ws_endpoint(app, "/w", { format = "envelope" })
    local ids = {}
    for i = 1, 5 do ids[i] = app:publish("t", "m" .. i) end
    local w = open_ws(app, "/w?last_event_id=" .. ids[1])
    assert.same({ topic = "t", event = "herald-gap" }, envelope(w))
    assert.same({ topic = "t", id = ids[4], data = "m4" }, envelope(w))
    assert.same({ topic = "t", id = ids[5], data = "m5" }, envelope(w))
    assert.same({}, drain(w, 0.05))
    -- an id that is not this hub's: a gap, then everything kept
    local w2 = open_ws(app, "/w?last_event_id=00000000-1")
    assert.same({ topic = "t", event = "herald-gap" }, envelope(w2))
    assert.same({ "m4", "m5" }, { envelope(w2).data, envelope(w2).data })
    -- no gap from an id still covered by history
    local w3 = open_ws(app, "/w?last_event_id=" .. ids[3])
    assert.same({ topic = "t", id = ids[4], data = "m4" }, envelope(w3))
  end)

  it("raw format: the replay carries the payloads (no room for a gap report)", function()
    local app = new_app { history = 2 }
    ws_endpoint(app, "/w")
    local ids = {}
    for i = 1, 5 do ids[i] = app:publish("t", "m" .. i) end
    local w = open_ws(app, "/w?last_event_id=" .. ids[1])
    local got = {}
    for i, f in ipairs(drain(w, 0.05)) do got[i] = f.data end
    assert.same({ "m4", "m5" }, got)
  end)
end)

describe("ws hub slow consumer", function()
  local MSG = 64 * 1024
  local COUNT = 128 -- 8 MiB in all
  local MAX_QUEUED = 1024 * 1024

  it("policy close: a WebSocket client that stops reading is closed; the others get everything", function()
    local app = new_app { max_queued = MAX_QUEUED }
    app:topic("big", { history = 200 })
    local closed_with
    ws_endpoint(app, "/w", {
      format = "envelope",
      open = function(ws, req)
        assert(ws:subscribe("big"))
        if req.query.slow then
          app.slow_stream = ws
          ws:on_close(function(_, code) closed_with = code end)
        end
      end,
    })
    app:sse("/s", function(s) assert(s:subscribe("big")) end)
    local readers, sse_readers = {}, {}
    for i = 1, 5 do
      readers[i] = open_ws(app, "/w")
      sse_readers[i] = open_sse(app, "/s")
    end
    local slow = open_ws(app, "/w?slow=1")
    slow.client.socket:pause()
    assert(app.slow_stream, "the slow stream did not open")

    local ids = {}
    for i = 1, COUNT do
      local data = ("%05d"):format(i) .. ("x"):rep(MSG - 5)
      ids[i] = app:publish("big", data)
      -- the readers take each message before the next, as fast readers do
      for r, w in ipairs(readers) do
        local e = envelope(w, 5)
        if e.id ~= ids[i] or e.data ~= data then
          error(("ws reader %d: message %d has id %s, expected %s"):format(r, i, tostring(e.id), ids[i]))
        end
      end
      for r, s in ipairs(sse_readers) do
        local ev = assert(s:next(5))
        if ev.id ~= ids[i] or ev.data ~= data then
          error(("sse reader %d: message %d has id %s, expected %s"):format(r, i, tostring(ev.id), ids[i]))
        end
      end
    end
    local st = app:stats()
    assert.equal(1, st.slow_closed)
    assert.is_false(app.slow_stream:alive())
    assert.equal(1006, closed_with)
    assert.equal(10, app:subscribers("big"))
    for _, w in ipairs(readers) do assert.same({}, drain(w, 0)) end

    -- reading again, the slow client finds a prefix of the messages, then the end
    slow.client.socket:resume()
    local got = {}
    while true do
      local f = slow:receive(5)
      if not f then break end
      assert.equal("text", f.kind)
      got[#got + 1] = cjson.decode(f.data).id
    end
    assert.is_true(slow:closed())
    assert.is_true(#got >= 1 and #got < COUNT, #got .. " messages reached the slow client")
    for i, id in ipairs(got) do assert.equal(ids[i], id) end
    -- and it loses nothing: resuming from its last id replays the rest
    local again = open_ws(app, "/w?last_event_id=" .. got[#got])
    for i = #got + 1, COUNT do assert.equal(ids[i], envelope(again, 5).id) end
  end)
end)

describe("ws hub rules", function()
  it("ws:publish honors the topic's allow(user, topic, 'publish')", function()
    local users = { w = { name = "writer", role = "writer" }, r = { name = "reader", role = "reader" } }
    local app = new_app()
    app:auth(function(req) return users[req.query.as] end)
    local asked = {}
    app:topic("room", {
      allow = function(user, topic, action)
        asked[#asked + 1] = ("%s %s %s"):format(user.name, topic, action)
        return action == "subscribe" or user.role == "writer"
      end,
    })
    ws_endpoint(app, "/w", {
      format = "envelope",
      message = function(ws, data)
        local id, err = ws:publish("room", data, { event = "said" })
        ws:send(id and "published" or "refused: " .. tostring(err))
      end,
    })
    local writer = open_ws(app, "/w?topics=room&as=w")
    local reader = open_ws(app, "/w?topics=room&as=r")
    reader:send("from the reader")
    local f = assert(reader:receive(2))
    assert.equal("refused: forbidden", f.data)
    writer:send("from the writer")
    local answers, messages = {}, {}
    for _, w in ipairs { writer, reader } do
      for _, fr in ipairs(drain(w, 0.1)) do
        if fr.data == "published" then
          answers[#answers + 1] = fr.data
        else
          local e = cjson.decode(fr.data)
          messages[#messages + 1] = e.event .. ":" .. e.data
        end
      end
    end
    assert.same({ "published" }, answers)
    assert.same({ "said:from the writer", "said:from the writer" }, messages)
    assert.same({ "writer room subscribe", "reader room subscribe", "reader room publish", "writer room publish" },
      asked)
    assert.same({}, app.logged)
  end)

  it("presence and subscribers count WebSocket subscribers; join and leave run for them", function()
    local users = { a = { name = "alice" }, b = { name = "bob" }, c = { name = "carol" } }
    local app = new_app()
    app:auth(function(req) return users[req.query.as] end)
    local events = {}
    app:topic("room", {
      join = function(topic, user) events[#events + 1] = "join " .. topic .. " " .. user.name end,
      leave = function(topic, user) events[#events + 1] = "leave " .. topic .. " " .. user.name end,
    })
    ws_endpoint(app, "/w")
    app:sse("/s", function(s) assert(s:subscribe("room")) end)
    local a1 = open_ws(app, "/w?topics=room&as=a")
    local a2 = open_ws(app, "/w?topics=room&as=a")
    local b = open_ws(app, "/w?topics=room&as=b")
    open_sse(app, "/s?as=c")
    local function names()
      local list = {}
      for i, u in ipairs(app:presence("room")) do list[i] = u.name end
      table.sort(list)
      return list
    end
    assert.equal(4, app:subscribers("room"))
    assert.same({ "alice", "bob", "carol" }, names())
    b:abort()
    t.wait(function() return app:subscribers("room") == 3 end, 2, "bob to leave")
    assert.same({ "alice", "carol" }, names())
    a1:close()
    t.wait(function() return app:subscribers("room") == 2 end, 2, "alice's first connection to leave")
    assert.same({ "alice", "carol" }, names())
    assert.is_false(a2:closed())
    assert.same({ "join room alice", "join room alice", "join room bob", "join room carol", "leave room bob",
      "leave room alice" }, events)
  end)

  it("ws:unsubscribe stops deliveries; a refused subscribe says forbidden", function()
    local app = new_app()
    app:topic("secret", { allow = function() return false end })
    local results = {}
    ws_endpoint(app, "/w", {
      message = function(ws, data)
        if data == "leave" then
          results[#results + 1] = ws:unsubscribe("t")
        elseif data == "secret" then
          results[#results + 1] = table.pack(ws:subscribe("secret"))
        end
      end,
    })
    local w = open_ws(app, "/w")
    app:publish("t", "one")
    assert.equal("one", assert(w:receive(2)).data)
    w:send("leave")
    w:send("secret")
    t.wait(function() return #results == 2 end, 2, "the handler")
    assert.is_true(results[1])
    assert.same({ nil, "forbidden", n = 2 }, results[2])
    app:publish("t", "two")
    app:publish("secret", "hidden")
    assert.same({}, drain(w, 0.1))
  end)
end)
