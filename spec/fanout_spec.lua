-- Fan-out and slow consumers over real sockets: a thousand subscribers on
-- one topic, fan-outs that span loop turns, and one client that stops
-- reading while megabytes are published, under the "close" and the
-- "conflate" policies.
local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"

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

-- Opens n SSE streams on path; all are closed when the test ends.
local function open_many(app, path, n)
  local list = {}
  finally(function()
    for _, s in ipairs(list) do s:close() end
  end)
  for i = 1, n do
    local s = t.sse(app, path)
    list[i] = s
    assert.equal(200, s.status)
  end
  return list
end

-- The ids of the events in raw event-stream bytes, in order.
local function ids_in(bytes)
  local ids = {}
  for id in bytes:gmatch("id: ([^\n]+)\n") do ids[#ids + 1] = id end
  return ids
end

-- A fast reader: a raw client that asks for path and checks every byte
-- it reads against messages (a list of encoded events, shared, which the
-- test extends as it publishes) as they come, without keeping them.
-- r.got counts whole messages; r.error says what went wrong.
local function checking_reader(app, path, messages)
  local r = { idx = 1, off = 0, got = 0, pre = "", closed = false }
  local function take(data)
    local p = 1
    while p <= #data do
      local m = messages[r.idx]
      if not m then
        r.error = ("%d bytes after message %d: %q"):format(#data - p + 1, r.idx - 1, data:sub(p, p + 40))
        return
      end
      local n = math.min(#m - r.off, #data - p + 1)
      if data:sub(p, p + n - 1) ~= m:sub(r.off + 1, r.off + n) then
        r.error = ("message %d differs from byte %d: %q"):format(r.idx, r.off + 1, data:sub(p, p + 40))
        return
      end
      p, r.off = p + n, r.off + n
      if r.off == #m then r.idx, r.off, r.got = r.idx + 1, 0, r.got + 1 end
    end
  end
  r.socket = assert(core.connect("127.0.0.1", t.port(app), function(event, data)
    if event == "connect" then
      r.socket:write(t.encode_request("GET", path, { Accept = "text/event-stream" }))
    elseif event == "data" then
      if r.error then return end
      if not r.head then
        r.pre = r.pre .. data
        local e = r.pre:find("\r\n\r\n", 1, true)
        if not e then return end
        r.head, data = r.pre:sub(1, e + 3), r.pre:sub(e + 4)
      end
      take(data)
    else
      r.closed = true
      if event == "eof" then r.socket:close() end
    end
  end))
  return r
end

-- n checking readers of /s, once their streams are open.
local function fast_readers(app, n, messages)
  local list = {}
  finally(function()
    for _, r in ipairs(list) do r.socket:close() end
  end)
  for i = 1, n do list[i] = checking_reader(app, "/s", messages) end
  t.wait(function()
    for _, r in ipairs(list) do
      if not r.head then return false end
    end
    return true
  end, 5, "the readers' streams to open")
  for _, r in ipairs(list) do assert.matches("^HTTP/1%.1 200 ", r.head) end
  return list
end

-- Waits until every reader has count messages, each exactly as sent.
local function wait_all(readers, count)
  t.wait(function()
    for i, r in ipairs(readers) do
      if r.error then error(("reader %d: %s"):format(i, r.error)) end
      if r.got < count then
        if r.closed then error(("reader %d was closed after %d messages"):format(i, r.got)) end
        return false
      end
    end
    return true
  end, 10, count .. " messages at every reader")
end

local saved_timeout
before_each(function() saved_timeout = t.timeout; t.timeout = 10 end)
after_each(function() t.timeout = saved_timeout end)

describe("fan-out", function()
  it("1,000 subscribers of one topic each receive all 50 messages, in order", function()
    local app = new_app()
    app:sse("/s", function(s) assert(s:subscribe("wide")) end)
    local clients = open_many(app, "/s", 1000)
    assert.equal(1000, app:subscribers("wide"))
    local sent = {}
    for i = 1, 50 do
      local data = ("message %d\nline two of %d"):format(i, i)
      local id, reached = app:publish("wide", data)
      assert.equal(1000, reached)
      sent[i] = { id = id, event = "message", data = data }
      -- let the loop write now and then, as a server would between publishes
      if i % 10 == 0 then t.sleep(1) end
    end
    for n, s in ipairs(clients) do
      local got = s:take(50, 10)
      for i = 1, 50 do
        if got[i].id ~= sent[i].id or got[i].data ~= sent[i].data then
          error(("client %d: event %d is %s %q, expected %s %q"):format(
            n, i, got[i].id, got[i].data, sent[i].id, sent[i].data))
        end
      end
      assert.same({ nil, "timeout" }, { s:next(0) })
    end
    local st = app:stats()
    assert.equal(50, st.published)
    assert.equal(50000, st.delivered)
    assert.equal(0, st.slow_closed)
    assert.equal(1000, st.streams)
  end)

  -- A fan-out to this many conns takes longer than a loop turn's slice of
  -- writing (1 ms: a write to a local socket costs microseconds), so it
  -- spans turns, whatever the machine.
  local WIDE = 2000

  it("spans loop turns: messages published meanwhile join it, each once and in order, in fewer writes", function()
    local app = new_app()
    app:sse("/s", function(s) assert(s:subscribe("wide")) end)
    local messages = {}
    local readers = fast_readers(app, WIDE, messages)
    local before = app:stats()
    for i = 1, 20 do
      local data = "message " .. i
      local id, reached = app:publish("wide", data)
      assert.equal(WIDE, reached)
      messages[i] = "id: " .. id .. "\ndata: " .. data .. "\n\n"
      core.run_once(0) -- one loop turn: a slice of the writing
    end
    wait_all(readers, 20)
    local st = app:stats()
    assert.equal(20 * WIDE, st.delivered - before.delivered)
    local writes = st.writes - before.writes
    assert.is_true(writes < 10 * WIDE, writes .. " writes for " .. 20 * WIDE .. " deliveries")
    t.sleep(20)
    for i, r in ipairs(readers) do
      assert.is_nil(r.error, r.error)
      assert.equal(20, r.got, "reader " .. i)
    end
  end)

  it("answers a request between the slices of a fan-out, not after it", function()
    local app = new_app()
    app:sse("/s", function(s) assert(s:subscribe("wide")) end)
    app:get("/ping", function(_, res) res:send("pong") end)
    local messages = {}
    local readers = fast_readers(app, WIDE, messages)
    local c = t.connect(app)
    finally(function() c:close() end)
    local id = app:publish("wide", "one")
    messages[1] = "id: " .. id .. "\ndata: one\n\n"
    c:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    local reached
    t.wait(function()
      if not c.buffer:find("pong", 1, true) then return false end
      reached = 0
      for _, r in ipairs(readers) do reached = reached + r.got end
      return true
    end, 5, "the answer")
    assert.is_true(reached < WIDE, reached .. " of " .. WIDE .. " readers had the message before the answer")
    wait_all(readers, 1)
  end)
end)

describe("a slow consumer", function()
  local MSG = 64 * 1024
  local COUNT = 128 -- 8 MiB in all
  local MAX_QUEUED = 512 * 1024
  -- what one message may add over max_queued: its data and its id/data lines
  local ONE_MESSAGE = MSG + 64

  -- An app with a topic "big" whose stream endpoint /s marks the stream
  -- opened with ?slow as app.slow_stream; topic_opts for the topic's rule.
  local function slow_app(topic_opts)
    local app = new_app { max_queued = MAX_QUEUED }
    app:topic("big", topic_opts)
    app:sse("/s", function(s, req)
      assert(s:subscribe("big"))
      if req.query.slow then app.slow_stream = s end
    end)
    return app
  end

  -- A raw client that asks for the stream and then never reads.
  local function stalled_client(app)
    local c = t.connect(app)
    finally(function() c:close() end)
    c.socket:pause()
    c:send(t.encode_request("GET", "/s?slow=1", { Accept = "text/event-stream" }))
    t.wait(function() return app.slow_stream ~= nil end, 2, "the slow stream to open")
    return c
  end

  local function payload(i, size)
    return ("%05d"):format(i) .. ("x"):rep((size or MSG) - 5)
  end

  -- Publishes COUNT messages of MSG bytes to "big", letting the readers take
  -- each before the next (as fast readers do); returns the ids and the most
  -- bytes seen queued for the slow stream's connection.
  local function publish_all(app, readers, messages)
    local ids = {}
    local max_seen = 0
    local slow_conn = app.slow_stream.conn
    for i = 1, COUNT do
      local data = payload(i)
      local id, reached = app:publish("big", data)
      ids[i] = id
      messages[i] = "id: " .. id .. "\ndata: " .. data .. "\n\n"
      assert.is_true(reached >= #readers)
      max_seen = math.max(max_seen, slow_conn:queued())
      wait_all(readers, i)
      max_seen = math.max(max_seen, slow_conn:queued())
    end
    return ids, max_seen
  end

  it("is not judged by a burst: 4 x max_queued published in one loop turn closes no fast reader", function()
    local app = slow_app {}
    local messages = {}
    local readers = fast_readers(app, 100, messages)
    for i = 1, 32 do -- 2 MiB before the loop runs again
      local data = payload(i)
      local id = app:publish("big", data)
      messages[i] = "id: " .. id .. "\ndata: " .. data .. "\n\n"
    end
    wait_all(readers, 32)
    local st = app:stats()
    assert.equal(0, st.slow_closed)
    assert.equal(0, st.conflated)
    assert.equal(3200, st.delivered)
    assert.equal(100, app:subscribers("big"))
  end)

  it("is closed under policy 'close' while 100 readers get every message", function()
    local app = slow_app { history = 200 }
    local messages = {}
    local readers = fast_readers(app, 100, messages)
    local slow = stalled_client(app)
    local ids, max_seen = publish_all(app, readers, messages)
    local st = app:stats()
    assert.equal(1, st.slow_closed)
    assert.is_false(app.slow_stream:alive())
    assert.equal(100, app:subscribers("big"))
    assert.equal(0, st.conflated)
    -- the server never held more than max_queued and one message for it
    assert.is_true(max_seen <= MAX_QUEUED + ONE_MESSAGE,
      ("%d bytes were queued for the slow client (max_queued %d)"):format(max_seen, MAX_QUEUED))
    assert.is_true(max_seen >= MAX_QUEUED / 2, "the slow client never fell behind: " .. max_seen)
    -- the readers have nothing more
    t.sleep(50)
    for i, r in ipairs(readers) do
      assert.is_nil(r.error, r.error)
      assert.equal(COUNT, r.got, "reader " .. i)
    end
    -- the slow client, reading again, finds a prefix of the messages, then the close
    slow.socket:resume()
    slow:wait_closed(5)
    local got = ids_in(slow.buffer)
    assert.is_true(#got >= 1 and #got < COUNT, #got .. " messages reached the slow client")
    for i, id in ipairs(got) do assert.equal(ids[i], id) end
    -- and it loses nothing: resuming from its last id replays the rest
    local again = t.sse(app, "/s", { last_event_id = got[#got] })
    finally(function() again:close() end)
    local rest = again:take(COUNT - #got, 5)
    for i, ev in ipairs(rest) do assert.equal(ids[#got + i], ev.id) end
  end)

  it("is kept under policy 'conflate', and ends up with the newest message when it reads again", function()
    local app = slow_app { policy = "conflate" }
    local messages = {}
    local readers = fast_readers(app, 100, messages)
    local slow = stalled_client(app)
    local ids, max_seen = publish_all(app, readers, messages)
    local st = app:stats()
    assert.equal(0, st.slow_closed)
    assert.is_true(st.conflated > 0, "nothing was conflated")
    assert.is_true(app.slow_stream:alive())
    assert.equal(101, app:subscribers("big"))
    assert.is_true(max_seen <= MAX_QUEUED + ONE_MESSAGE,
      ("%d bytes were queued for the slow client (max_queued %d)"):format(max_seen, MAX_QUEUED))
    assert.is_true(max_seen >= MAX_QUEUED / 2, "the slow client never fell behind: " .. max_seen)
    -- reading again, it gets what was queued, then the newest message
    slow.socket:resume()
    t.wait(function() return slow.buffer:find("id: " .. ids[COUNT] .. "\n", 1, true) end, 5,
      "the newest message")
    t.wait(function() return slow.buffer:sub(-2) == "\n\n" end, 5, "the newest message's end")
    local got = ids_in(slow.buffer)
    assert.equal(ids[COUNT], got[#got])
    assert.is_true(#got < COUNT, "nothing was skipped")
    local position = {}
    for i, id in ipairs(ids) do position[id] = i end
    for i = 2, #got do
      assert.is_true(position[got[i]] > position[got[i - 1]], "out of order: " .. got[i])
    end
    assert.equal(("%05d"):format(COUNT) .. ("x"):rep(MSG - 5),
      slow.buffer:match("id: " .. ids[COUNT]:gsub("%-", "%%-") .. "\ndata: ([^\n]*)\n\n$"))
    -- and it is live again: the next message comes straight through
    local id = app:publish("big", "small")
    messages[COUNT + 1] = "id: " .. id .. "\ndata: small\n\n"
    t.wait(function() return slow.buffer:find("id: " .. id .. "\ndata: small\n\n", 1, true) end, 2,
      "the next message")
    wait_all(readers, COUNT + 1)
  end)
end)
