-- The topic hub over real sockets: publish and subscribe, message ids,
-- history bounded by count and by age, resume with Last-Event-ID (header or
-- query) across topics, gap events, topic rules, allow/join/leave, presence.
local herald = require "herald"
local t = require "herald.test"
local cjson = require "cjson"

local function new_app(opts)
  local app = herald.new(opts)
  app.logged = {}
  app:on_error(function(message) app.logged[#app.logged + 1] = message end)
  finally(function() app:close() end)
  return app
end

local function open(app, path, opts)
  local s = t.sse(app, path, opts)
  finally(function() s:close() end)
  assert.equal(200, s.status, s.body)
  return s
end

-- An SSE endpoint at /s that subscribes each stream to the topics listed in
-- ?topics=a,b,c; the streams are recorded in the returned list.
local function topics_endpoint(app, fn)
  local streams = {}
  app:sse("/s", function(s, req)
    streams[#streams + 1] = s
    for topic in (req.query.topics or ""):gmatch("[^,]+") do assert(s:subscribe(topic)) end
    if fn then return fn(s, req) end
  end)
  return streams
end

-- The sequence number of an id "<8 hex epoch>-<seq>", and its epoch.
local function seq_of(id)
  local epoch, seq = tostring(id):match("^(%x%x%x%x%x%x%x%x)%-(%d+)$")
  assert(epoch, "not an id: " .. tostring(id))
  return tonumber(seq), epoch
end

-- Reads events until none arrives for quiet seconds; returns them all.
local function drain(s, quiet)
  local list = {}
  while true do
    local ev = s:next(quiet or 0.15)
    if not ev then return list end
    list[#list + 1] = ev
  end
end

-- The data of each event, and of the gap events "gap:<topic>".
local function summary(events)
  local out = {}
  for i, ev in ipairs(events) do
    if ev.event == "herald-gap" then
      out[i] = "gap:" .. cjson.decode(ev.data).topic
    else
      out[i] = ev.data
    end
  end
  return out
end

local function datas(list)
  local out = {}
  for i, m in ipairs(list) do out[i] = m.data end
  return out
end

local saved_timeout
before_each(function() saved_timeout = t.timeout; t.timeout = 2 end)
after_each(function() t.timeout = saved_timeout end)

describe("hub publish and subscribe", function()
  it("delivers each message of a topic to its subscribers, with id, event name and data", function()
    local app = new_app()
    topics_endpoint(app)
    local a = open(app, "/s?topics=news")
    local b = open(app, "/s?topics=news")
    local other = open(app, "/s?topics=sport")
    local id1, n1 = app:publish("news", "first")
    local id2, n2 = app:publish("news", "second", { event = "update" })
    assert.equal(2, n1)
    assert.equal(2, n2)
    for _, s in ipairs { a, b } do
      assert.same({ { id = id1, event = "message", data = "first" }, { id = id2, event = "update", data = "second" } },
        s:take(2, 1))
    end
    assert.same({}, drain(other, 0.1))
    assert.same({}, drain(a, 0.1))
  end)

  it("gives ids '<8 hex epoch>-<seq>' that grow with each publish, across topics", function()
    local app = new_app()
    local last, epoch
    for i = 1, 30 do
      local topic = ({ "a", "b", "c" })[i % 3 + 1]
      local id = app:publish(topic, tostring(i))
      local seq, e = seq_of(id)
      if last then
        assert.is_true(seq > last, ("id %s after seq %d"):format(id, last))
        assert.equal(epoch, e)
      end
      last, epoch = seq, e
    end
  end)

  it("gives each app (each hub) its own epoch", function()
    local a, b = new_app(), new_app()
    local _, ea = seq_of((a:publish("t", "x")))
    local _, eb = seq_of((b:publish("t", "x")))
    assert.are_not.equal(ea, eb)
  end)

  it("puts the id app:publish returned on the wire, and the client's last id follows it", function()
    local app = new_app()
    topics_endpoint(app)
    local s = open(app, "/s?topics=t")
    local ids = {}
    for i = 1, 5 do ids[i] = app:publish("t", "m" .. i) end
    local got = s:take(5, 1)
    for i = 1, 5 do assert.equal(ids[i], got[i].id) end
    assert.equal(ids[5], s.last_id)
  end)

  it("delivers a stream's several topics in publish order", function()
    local app = new_app()
    topics_endpoint(app)
    local s = open(app, "/s?topics=a,b,c")
    local sent = {}
    for i = 1, 12 do
      local topic = ({ "a", "b", "c", "x" })[i % 4 + 1]
      app:publish(topic, topic .. i)
      if topic ~= "x" then sent[#sent + 1] = topic .. i end
    end
    assert.same(sent, summary(drain(s)))
  end)

  it("delivers a message published while the stream opens once, after the head", function()
    local app = new_app()
    local id
    topics_endpoint(app, function() id = app:publish("t", "during open") end)
    local s = open(app, "/s?topics=t")
    local got = drain(s)
    assert.equal(1, #got)
    assert.same({ id = id, event = "message", data = "during open" }, got[1])
  end)
end)

describe("hub history", function()
  it("keeps the last `history` messages of a topic", function()
    local app = new_app { history = 3 }
    for i = 1, 7 do app:publish("t", "m" .. i) end
    local list, gap = app:history("t")
    assert.same({ "m5", "m6", "m7" }, datas(list))
    assert.is_false(gap)
  end)

  it("keeps nothing with history = 0", function()
    local app = new_app { history = 0 }
    for i = 1, 3 do app:publish("t", "m" .. i) end
    assert.same({}, (app:history("t")))
  end)

  it("drops messages older than max_age", function()
    local app = new_app { max_age = 0.1 }
    app:publish("t", "old")
    t.sleep(150)
    app:publish("t", "new")
    assert.same({ "new" }, datas((app:history("t"))))
    t.sleep(150)
    assert.same({}, (app:history("t")))
  end)

  it("bounds by count and by age together", function()
    local app = new_app { history = 2, max_age = 0.15 }
    for i = 1, 5 do app:publish("t", "m" .. i) end
    assert.same({ "m4", "m5" }, datas((app:history("t"))))
    t.sleep(200)
    app:publish("t", "m6")
    assert.same({ "m6" }, datas((app:history("t"))))
  end)

  it("app:history gives id, data, event and time, oldest first", function()
    local app = new_app()
    local before = herald.now()
    local id1 = app:publish("t", "one")
    local id2 = app:publish("t", "two\nlines", { event = "e" })
    local list, gap = app:history("t")
    assert.is_false(gap)
    assert.equal(2, #list)
    assert.equal(id1, list[1].id)
    assert.equal("one", list[1].data)
    assert.is_nil(list[1].event)
    assert.equal(id2, list[2].id)
    assert.equal("two\nlines", list[2].data)
    assert.equal("e", list[2].event)
    for _, m in ipairs(list) do
      assert.is_true(math.type(m.time) == "integer")
      assert.is_true(m.time >= before - 1 and m.time <= herald.now())
    end
  end)

  it("app:history(topic, since_id) gives what came after since_id, and whether some was lost", function()
    local app = new_app { history = 4 }
    local ids = {}
    for i = 1, 6 do ids[i] = app:publish("t", "m" .. i) end -- keeps m3..m6
    local list, gap = app:history("t", ids[4])
    assert.same({ "m5", "m6" }, datas(list))
    assert.is_false(gap)
    list, gap = app:history("t", ids[6])
    assert.same({}, list)
    assert.is_false(gap)
    list, gap = app:history("t", ids[2]) -- m3 is kept: nothing after m2 was lost
    assert.same({ "m3", "m4", "m5", "m6" }, datas(list))
    assert.is_false(gap)
    list, gap = app:history("t", ids[1]) -- m2 is gone
    assert.same({ "m3", "m4", "m5", "m6" }, datas(list))
    assert.is_true(gap)
  end)

  it("app:history with an id that is not this hub's gives everything kept and a gap", function()
    local app = new_app()
    local other = new_app()
    local foreign = other:publish("t", "x")
    for i = 1, 3 do app:publish("t", "m" .. i) end
    for _, since in ipairs { foreign, "garbage", "", "00000000", "abcdefgh-1", "1-1" } do
      local list, gap = app:history("t", since)
      assert.same({ "m1", "m2", "m3" }, datas(list), since)
      assert.is_true(gap, since)
    end
    -- an id of this epoch from the future is not one we gave out
    local epoch = select(2, seq_of((app:publish("u", "y"))))
    local list, gap = app:history("t", epoch .. "-999999")
    assert.equal(3, #list)
    assert.is_true(gap)
  end)

  it("app:history of an unknown topic is empty", function()
    local app = new_app()
    local list, gap = app:history("nothing here")
    assert.same({}, list)
    assert.is_false(gap)
    assert.has_error(function() app:history("t", 42) end, "history: since_id must be a string")
  end)
end)

describe("hub resume", function()
  it("with a Last-Event-ID header replays exactly the missed messages", function()
    local app = new_app()
    topics_endpoint(app)
    local s = open(app, "/s?topics=t")
    for i = 1, 3 do app:publish("t", "m" .. i) end
    local seen = s:take(3, 1)
    s:close()
    t.wait(function() return app:subscribers("t") == 0 end, 1, "the stream to go")
    for i = 4, 6 do app:publish("t", "m" .. i) end
    local again = s:reconnect()
    finally(function() again:close() end)
    assert.equal(200, again.status)
    assert.equal(seen[3].id, again.opts.last_event_id)
    assert.same({ "m4", "m5", "m6" }, summary(drain(again)))
    -- and live messages follow
    app:publish("t", "m7")
    assert.equal("m7", assert(again:next(1)).data)
  end)

  it("with ?last_event_id= replays exactly the missed messages", function()
    local app = new_app()
    topics_endpoint(app)
    local ids = {}
    for i = 1, 5 do ids[i] = app:publish("t", "m" .. i) end
    local s = open(app, "/s?topics=t&last_event_id=" .. ids[2])
    assert.same({ "m3", "m4", "m5" }, summary(drain(s)))
  end)

  it("prefers the Last-Event-ID header to ?last_event_id= (a browser reconnecting keeps the URL)", function()
    local app = new_app()
    topics_endpoint(app)
    local ids = {}
    for i = 1, 5 do ids[i] = app:publish("t", "m" .. i) end
    local s = open(app, "/s?topics=t&last_event_id=" .. ids[1], { last_event_id = ids[3] })
    assert.same({ "m4", "m5" }, summary(drain(s)))
  end)

  it("replays nothing without a last id, and nothing when the client saw everything", function()
    local app = new_app()
    topics_endpoint(app)
    local last
    for i = 1, 3 do last = app:publish("t", "m" .. i) end
    assert.same({}, drain(open(app, "/s?topics=t")))
    assert.same({}, drain(open(app, "/s?topics=t", { last_event_id = last })))
  end)

  it("across several topics, replays the missed ones in id order with no duplicates and no gap", function()
    local app = new_app()
    topics_endpoint(app)
    local s = open(app, "/s?topics=a,b,c")
    app:publish("a", "a1"); app:publish("b", "b1"); app:publish("c", "c1")
    assert.same({ "a1", "b1", "c1" }, summary(s:take(3, 1)))
    s:close()
    t.wait(function() return app:subscribers("a") == 0 end, 1, "the stream to go")
    local missed = {}
    for _, m in ipairs { { "b", "b2" }, { "a", "a2" }, { "x", "x1" }, { "c", "c2" }, { "b", "b3" },
      { "a", "a3" }, { "c", "c3" }, { "b", "b4" } } do
      app:publish(m[1], m[2])
      if m[1] ~= "x" then missed[#missed + 1] = m[2] end
    end
    local again = s:reconnect()
    finally(function() again:close() end)
    local got = drain(again)
    assert.same(missed, summary(got))
    for i = 2, #got do assert.is_true(seq_of(got[i].id) > seq_of(got[i - 1].id)) end
  end)

  it("merges the replay with what is published while the stream opens: in id order, each once", function()
    local app = new_app()
    local during = {}
    topics_endpoint(app, function(_, req)
      if req.headers["last-event-id"] then
        during[#during + 1] = app:publish("b", "b-during")
        during[#during + 1] = app:publish("a", "a-during")
      end
    end)
    local s = open(app, "/s?topics=a,b")
    app:publish("a", "a1")
    assert.equal("a1", assert(s:next(1)).data)
    s:close()
    t.wait(function() return app:subscribers("a") == 0 end, 1, "the stream to go")
    app:publish("b", "b-missed")
    app:publish("a", "a-missed")
    local again = s:reconnect()
    finally(function() again:close() end)
    local got = drain(again)
    assert.same({ "b-missed", "a-missed", "b-during", "a-during" }, summary(got))
    assert.equal(during[2], got[4].id)
  end)

  it("sends a herald-gap event for a topic whose history no longer reaches the last id", function()
    local app = new_app()
    app:topic("news", { history = 3 })
    topics_endpoint(app)
    local s = open(app, "/s?topics=news")
    app:publish("news", "n1")
    local seen = assert(s:next(1))
    s:close()
    t.wait(function() return app:subscribers("news") == 0 end, 1, "the stream to go")
    for i = 2, 6 do app:publish("news", "n" .. i) end
    local again = s:reconnect()
    finally(function() again:close() end)
    local gap = assert(again:next(1))
    assert.equal("herald-gap", gap.event)
    assert.same({ topic = "news" }, cjson.decode(gap.data))
    assert.equal(seen.id, gap.id) -- the gap event carries no id of its own
    assert.same({ "n4", "n5", "n6" }, summary(drain(again)))
  end)

  it("sends the gap only for the topic that lost messages, before the replay", function()
    local app = new_app()
    app:topic("news", { history = 2 })
    topics_endpoint(app)
    local ids = {}
    ids[1] = app:publish("news", "n1")
    app:publish("chat", "c1")
    app:publish("news", "n2")
    app:publish("news", "n3")
    app:publish("news", "n4")
    app:publish("chat", "c2")
    local s = open(app, "/s?topics=news,chat", { last_event_id = ids[1] })
    assert.same({ "gap:news", "c1", "n3", "n4", "c2" }, summary(drain(s)))
  end)

  it("counts messages dropped by max_age as lost", function()
    local app = new_app()
    app:topic("t", { max_age = 0.1 })
    topics_endpoint(app)
    local id1 = app:publish("t", "m1")
    app:publish("t", "m2")
    t.sleep(150)
    app:publish("t", "m3")
    local s = open(app, "/s?topics=t", { last_event_id = id1 })
    assert.same({ "gap:t", "m3" }, summary(drain(s)))
  end)

  it("sends a gap and the whole history for an id from another epoch", function()
    local app = new_app()
    local previous = new_app() -- a server before a restart
    topics_endpoint(app)
    local old_id = previous:publish("t", "old")
    for i = 1, 3 do app:publish("t", "m" .. i) end
    local s = open(app, "/s?topics=t", { last_event_id = old_id })
    assert.same({ "gap:t", "m1", "m2", "m3" }, summary(drain(s)))
  end)

  for _, garbage in ipairs { "garbage", "42", "zzzzzzzz-1", "0-0", "-1", "ffffffff-", "ffffffff-x" } do
    it(("sends a gap and the whole history for the last id %q"):format(garbage), function()
      local app = new_app()
      topics_endpoint(app)
      for i = 1, 2 do app:publish("t", "m" .. i) end
      local s = open(app, "/s?topics=t,u", { last_event_id = garbage })
      local got = summary(drain(s))
      -- one gap per subscribed topic (order between them free), then the history
      assert.equal(4, #got)
      local gaps = { got[1], got[2] }
      table.sort(gaps)
      assert.same({ "gap:t", "gap:u" }, gaps)
      assert.same({ "m1", "m2" }, { got[3], got[4] })
    end)
  end

  it("sends a gap for an id of this epoch that was never given out", function()
    local app = new_app()
    topics_endpoint(app)
    local epoch = select(2, seq_of((app:publish("t", "m1"))))
    local s = open(app, "/s?topics=t", { last_event_id = epoch .. "-1000" })
    assert.same({ "gap:t", "m1" }, summary(drain(s)))
  end)

  it("escapes the topic name in the gap event's JSON", function()
    local app = new_app()
    local topic = [[say "hi" \ ünï]]
    app:publish(topic, "m")
    app:sse("/q", function(stream) assert(stream:subscribe(topic)) end)
    local q = open(app, "/q", { last_event_id = "garbage" })
    local gap = assert(q:next(1))
    assert.equal("herald-gap", gap.event)
    assert.same({ topic = topic }, cjson.decode(gap.data))
    assert.equal("m", assert(q:next(1)).data)
  end)

  it("sends no gap when nothing was lost", function()
    local app = new_app { history = 5 }
    topics_endpoint(app)
    local ids = {}
    for i = 1, 5 do ids[i] = app:publish("t", "m" .. i) end
    local s = open(app, "/s?topics=t", { last_event_id = ids[1] })
    assert.same({ "m2", "m3", "m4", "m5" }, summary(drain(s)))
  end)

  it("sends no gap for a topic that never had a message", function()
    local app = new_app()
    app:topic("ephemeral", { history = 0 })
    topics_endpoint(app)
    local s = open(app, "/s?topics=a,quiet")
    app:publish("a", "a1")
    assert.equal("a1", assert(s:next(1)).data)
    s:close()
    t.wait(function() return app:subscribers("quiet") == 0 end, 1, "the stream to go")
    app:publish("ephemeral", "nobody listens") -- another topic, kept by no history
    app:publish("a", "a2")
    local again = s:reconnect()
    finally(function() again:close() end)
    assert.same({ "a2" }, summary(drain(again)))
  end)
end)

describe("topic rules", function()
  local function kept(app, topic)
    for i = 1, 10 do app:publish(topic, tostring(i)) end
    return #app:history(topic)
  end

  local rules = {
    { "*", { history = 4 } },
    { "room:*", { history = 3 } },
    { "room:vip:*", { history = 2 } },
    { "room:vip:1", { history = 1 } },
  }
  local expected = {
    ["other"] = 4, ["room"] = 4, ["room:"] = 3, ["room:1"] = 3, ["room:vip"] = 3,
    ["room:vip:"] = 2, ["room:vip:2"] = 2, ["room:vip:10"] = 2, ["room:vip:1"] = 1, ["xroom:vip:1"] = 4,
  }

  it("the most specific rule wins: exact name, then the longest prefix, then '*'", function()
    local app = new_app { history = 5 }
    for _, r in ipairs(rules) do app:topic(r[1], r[2]) end
    for topic, n in pairs(expected) do assert.equal(n, kept(app, topic), topic) end
  end)

  it("whatever the order the rules were added in", function()
    local app = new_app { history = 5 }
    for i = #rules, 1, -1 do app:topic(rules[i][1], rules[i][2]) end
    for topic, n in pairs(expected) do assert.equal(n, kept(app, topic), topic) end
  end)

  it("takes what a rule leaves out from the app's options", function()
    local app = new_app { history = 2 }
    app:topic("a*", { allow = function() return true end })
    assert.equal(2, kept(app, "abc"))
    assert.equal(2, kept(app, "zzz"))
  end)

  it("adding a pattern again replaces its rule", function()
    local app = new_app { history = 5 }
    app:topic("x", { history = 1 })
    app:topic("x", { history = 3 })
    app:topic("p*", { history = 1 })
    app:topic("p*", { history = 2 })
    assert.equal(3, kept(app, "x"))
    assert.equal(2, kept(app, "pq"))
  end)

  it("applies a rule's max_age to its topics only", function()
    local app = new_app()
    app:topic("fast:*", { max_age = 0.1 })
    app:publish("fast:1", "x")
    app:publish("slow", "y")
    t.sleep(150)
    assert.same({}, (app:history("fast:1")))
    assert.same({ "y" }, datas((app:history("slow"))))
  end)

  it("refuses bad patterns and options, naming them", function()
    local app = new_app()
    assert.has_error(function() app:topic("a*b", {}) end, "topic: '*' may only end a pattern: a*b")
    assert.has_error(function() app:topic("", {}) end, "topic: pattern must be a string of 1 to 1024 bytes")
    assert.has_error(function() app:topic(42, {}) end, "topic: pattern must be a string of 1 to 1024 bytes")
    assert.has_error(function() app:topic("a", { histroy = 1 }) end, "topic: unknown option 'histroy'")
    assert.has_error(function() app:topic("a", { policy = "drop" }) end,
      'topic: option \'policy\' must be "close" or "conflate", got drop')
    assert.has_error(function() app:topic("a", { history = -1 }) end)
    assert.has_error(function() app:topic("a", { allow = true }) end)
    assert.has_error(function() herald.new { policy = "drop" } end)
  end)

  describe("allow", function()
    it("decides subscriptions with (user, topic, 'subscribe')", function()
      local app = new_app()
      local asked = {}
      app:auth(function(req) return req.headers["x-user"] end)
      app:topic("private:*", {
        allow = function(user, topic, action)
          asked[#asked + 1] = { user, topic, action }
          return topic == "private:" .. user
        end,
      })
      local results = {}
      app:sse("/s", function(s)
        results[#results + 1] = { s:subscribe("private:ann") }
        results[#results + 1] = { s:subscribe("private:bob") }
        results[#results + 1] = { s:subscribe("public") }
      end)
      local s = open(app, "/s", { headers = { ["X-User"] = "ann" } })
      assert.same({ { true }, { nil, "forbidden" }, { true } }, results)
      assert.same({ { "ann", "private:ann", "subscribe" }, { "ann", "private:bob", "subscribe" } }, asked)
      assert.equal(1, app:subscribers("private:ann"))
      assert.equal(0, app:subscribers("private:bob"))
      app:publish("private:bob", "secret")
      app:publish("private:ann", "mine")
      assert.same({ "mine" }, summary(drain(s)))
    end)

    it("decides stream:publish with (user, topic, 'publish'); app:publish is not checked", function()
      local app = new_app()
      local asked = {}
      app:auth(function() return "carol" end)
      app:topic("ro:*", {
        allow = function(user, topic, action)
          asked[#asked + 1] = { user, topic, action }
          return action == "subscribe"
        end,
      })
      local results = {}
      topics_endpoint(app, function(st)
        results[1] = { st:publish("ro:news", "from the client") }
        results[2] = { st:publish("open", "fine") }
      end)
      local s = open(app, "/s?topics=ro:news,open")
      assert.same({ nil, "forbidden" }, results[1])
      assert.matches("^%x+%-%d+$", results[2][1])
      assert.same({ "carol", "ro:news", "publish" }, asked[2])
      local id = app:publish("ro:news", "from the server")
      assert.is_string(id)
      assert.same({ "fine", "from the server" }, summary(drain(s)))
    end)

    it("is not asked again for a topic the stream is already in", function()
      local app = new_app()
      local n = 0
      app:topic("t", { allow = function() n = n + 1; return true end })
      app:sse("/s", function(s)
        assert(s:subscribe("t"))
        assert(s:subscribe("t"))
      end)
      open(app, "/s")
      assert.equal(1, n)
      assert.equal(1, app:subscribers("t"))
    end)
  end)

  describe("join and leave", function()
    it("join runs once per subscription with (topic, user, stream)", function()
      local app = new_app()
      local joins = {}
      app:auth(function() return "ann" end)
      app:topic("room:*", { join = function(topic, user, s) joins[#joins + 1] = { topic, user, s } end })
      local streams = topics_endpoint(app, function(s) assert(s:subscribe("room:1")) end)
      open(app, "/s?topics=room:1,room:2,other")
      assert.equal(2, #joins)
      assert.same({ "room:1", "ann" }, { joins[1][1], joins[1][2] })
      assert.same({ "room:2", "ann" }, { joins[2][1], joins[2][2] })
      assert.equal(streams[1], joins[1][3])
    end)

    it("leave runs on unsubscribe and, for each topic left, when the client goes", function()
      local app = new_app()
      local leaves = {}
      app:topic("*", { leave = function(topic, user, s) leaves[#leaves + 1] = { topic, user, s } end })
      app:auth(function() return "bob" end)
      local streams = topics_endpoint(app)
      local s = open(app, "/s?topics=a,b,c")
      assert.is_true(streams[1]:unsubscribe("b"))
      assert.equal(1, #leaves)
      assert.same({ "b", "bob" }, { leaves[1][1], leaves[1][2] })
      s:close()
      t.wait(function() return #leaves >= 3 end, 1, "the leave callbacks")
      t.sleep(50)
      assert.equal(3, #leaves)
      local topics = { leaves[2][1], leaves[3][1] }
      table.sort(topics)
      assert.same({ "a", "c" }, topics)
      assert.equal(streams[1], leaves[3][3])
    end)

    -- A stream records only the topics it needs again at its end (those
    -- with a leave callback); the hub knows the others.
    it("topics with and without a leave rule: unsubscribe, subscribe again and the end", function()
      local app = new_app()
      local leaves, allowed = {}, 0
      app:topic("l:*", { leave = function(topic) leaves[#leaves + 1] = topic end })
      app:topic("plain", { allow = function() allowed = allowed + 1; return true end })
      local streams = topics_endpoint(app)
      local s = open(app, "/s?topics=l:1,plain,l:2")
      local st = streams[1]
      assert.equal(1, allowed)
      assert.is_true(st:subscribe("plain")) -- already in: allow is not asked again
      assert.equal(1, allowed)
      assert.is_true(st:unsubscribe("plain"))
      assert.is_false(st:unsubscribe("plain"))
      assert.same({}, leaves)
      assert.equal(0, app:subscribers("plain"))
      assert.is_true(st:subscribe("plain"))
      assert.equal(2, allowed)
      assert.equal(1, app:subscribers("plain"))
      assert.is_true(st:unsubscribe("l:1"))
      assert.same({ "l:1" }, leaves)
      assert.is_false(st:unsubscribe("l:1"))
      s:close()
      t.wait(function() return #leaves >= 2 end, 1, "the leave callbacks")
      t.sleep(50)
      assert.same({ "l:1", "l:2" }, leaves)
      assert.equal(0, app:subscribers("plain"))
    end)

    it("leave runs when the server closes the stream", function()
      local app = new_app()
      local left = {}
      app:topic("t", { leave = function(topic) left[#left + 1] = topic end })
      local streams = topics_endpoint(app)
      open(app, "/s?topics=t")
      streams[1]:close()
      t.wait(function() return #left > 0 end, 1, "leave")
      assert.same({ "t" }, left)
    end)

    it("a join that raises is logged and the subscription stands", function()
      local app = new_app()
      app:topic("t", { join = function() error("join failed") end })
      topics_endpoint(app)
      local s = open(app, "/s?topics=t")
      assert.equal(1, #app.logged)
      assert.matches("join failed", app.logged[1], 1, true)
      app:publish("t", "still here")
      assert.equal("still here", assert(s:next(1)).data)
    end)
  end)
end)

describe("presence and subscribers", function()
  it("app:subscribers counts the streams in a topic, and drops them when they close", function()
    local app = new_app()
    topics_endpoint(app)
    assert.equal(0, app:subscribers("t"))
    local a = open(app, "/s?topics=t")
    local b = open(app, "/s?topics=t,u")
    assert.equal(2, app:subscribers("t"))
    assert.equal(1, app:subscribers("u"))
    a:close()
    t.wait(function() return app:subscribers("t") == 1 end, 1, "one subscriber left")
    assert.equal(1, app:subscribers("u"))
    b:close()
    t.wait(function() return app:subscribers("t") == 0 end, 1, "no subscriber left")
    assert.equal(0, app:subscribers("u"))
    assert.equal(0, select(2, app:publish("t", "x")))
  end)

  it("app:presence lists each user once, as auth returned them, and forgets them when they go", function()
    local app = new_app()
    local users = { ann = { name = "ann" }, bob = { name = "bob" } }
    app:auth(function(req) return users[req.headers["x-user"]] end)
    topics_endpoint(app)
    local ann1 = open(app, "/s?topics=room", { headers = { ["X-User"] = "ann" } })
    local ann2 = open(app, "/s?topics=room", { headers = { ["X-User"] = "ann" } })
    local bob = open(app, "/s?topics=room,other", { headers = { ["X-User"] = "bob" } })
    local function names(topic)
      local out = {}
      for i, u in ipairs(app:presence(topic)) do out[i] = u.name end
      table.sort(out)
      return out
    end
    assert.equal(3, app:subscribers("room"))
    assert.same({ "ann", "bob" }, names("room"))
    assert.same({ "bob" }, names("other"))
    assert.same({}, names("nobody"))
    ann1:close()
    t.wait(function() return app:subscribers("room") == 2 end, 1, "ann's first stream to go")
    assert.same({ "ann", "bob" }, names("room"))
    ann2:close()
    bob:close()
    t.wait(function() return app:subscribers("room") == 0 end, 1, "everyone to go")
    assert.same({}, names("room"))
    assert.same({}, names("other"))
  end)

  it("app:presence leaves out streams without a user", function()
    local app = new_app()
    topics_endpoint(app)
    open(app, "/s?topics=room")
    assert.equal(1, app:subscribers("room"))
    assert.same({}, app:presence("room"))
  end)

  it("app:stats counts streams, topics, published and delivered", function()
    local app = new_app()
    topics_endpoint(app)
    local base = app:stats()
    assert.same({ 0, 0, 0, 0, 0 }, { base.streams, base.published, base.delivered, base.conflated, base.slow_closed })
    local a = open(app, "/s?topics=t")
    open(app, "/s?topics=t,u")
    app:publish("t", "1")
    app:publish("u", "2")
    app:publish("nobody", "3")
    t.sleep(50)
    local st = app:stats()
    assert.equal(2, st.streams)
    assert.equal(2, st.connections)
    assert.equal(3, st.published)
    assert.equal(3, st.delivered)
    assert.is_true(st.topics >= 2)
    a:close()
    t.wait(function() return app:stats().streams == 1 end, 1, "one stream to go")
  end)
end)
