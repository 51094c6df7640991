-- Scale-out through a real redis-server: herald nodes (apps, each its own
-- hub and Redis connections, in this process or in one of their own) share
-- topics, ids, history and presence.
local herald = require "herald"
local t = require "herald.test"
local redis = require "spec.support.redis"
local proc = require "spec.support.process"

local function json(s) return require("cjson").decode(s) end

-- A node: SSE at /events?topic=, WebSocket (envelope) at /ws?topic=,
-- publisher at POST /pub/:topic; the user is ?user=.
local function node(url, opts)
  local o = { broker = { redis = url, presence_ttl = 3 } }
  for k, v in pairs(opts or {}) do o[k] = v end
  local app = herald.new(o)
  app:auth(function(req) return req.query.user or true end)
  app:topic("short/*", { history = 2 })
  app:topic("aged/*", { history = 10, max_age = 0.3 })
  local function join(s, req) return s:subscribe(req.query.topic or "news") end
  app:sse("/events", join)
  app:ws("/ws", { open = join, format = "envelope" })
  app:publisher("/pub/:topic")
  app._test_port = assert(app:listen { host = "127.0.0.1", port = 0 }) -- herald.test's port
  return app
end

-- Publishes through app and waits for Redis's id.
local function publish(app, topic, data, event)
  local id, err
  assert(app:publish(topic, data, { event = event, done = function(i, e) id, err = i, e end }))
  t.wait(function() return id or err end, 3, "the publish's id")
  return assert(id, err)
end

local function seq(id) return tonumber(id:match("%-(%d+)$")) end

-- Waits until node's subscription to topic reaches Redis (a SUBSCRIBE is
-- under way when the stream opened).
local function settle() t.sleep(150) end

describe("broker (Redis)", function()
  local server, apps = nil, {}
  local function new_node(opts)
    local app = node(server.url, opts)
    apps[#apps + 1] = app
    return app
  end

  -- Two nodes, and an SSE subscriber to "news" on the first that got one
  -- message from the second.
  local function subscribed_pair()
    local a, b = new_node(), new_node()
    local sse = t.sse(a, "/events?topic=news")
    settle()
    local first = publish(b, "news", "first")
    assert.equal("first", sse:next(3).data)
    return a, b, sse, first
  end

  local logged
  before_each(function()
    server = redis.start { persist = true }
    logged = {}
    herald.on_error(function(message) logged[#logged + 1] = message end)
  end)
  after_each(function()
    for _, app in ipairs(apps) do app:close() end
    apps = {}
    t.sleep(20)
    server:remove()
    herald.on_error(function(message) io.stderr:write(message, "\n") end)
  end)

  it("a message published on one node reaches SSE and WebSocket subscribers on another, once each", function()
    local a, b = new_node(), new_node()
    local sse = t.sse(a, "/events?topic=news")
    local ws = t.ws(a, "/ws?topic=news")
    local local_sse = t.sse(b, "/events?topic=news")
    settle()
    local ids = {}
    for i = 1, 20 do ids[i] = publish(b, "news", "m" .. i, i % 2 == 0 and "even" or nil) end
    for i = 2, 20 do assert.equal(seq(ids[i - 1]) + 1, seq(ids[i])) end
    local got = sse:take(20, 3)
    local got_local = local_sse:take(20, 3)
    for i = 1, 20 do
      assert.equal("m" .. i, got[i].data)
      assert.equal(ids[i], got[i].id)
      assert.equal(i % 2 == 0 and "even" or "message", got[i].event)
      assert.equal(ids[i], got_local[i].id)
      local frame = json(ws:receive(3).data)
      assert.same({ topic = "news", id = ids[i], data = "m" .. i, event = i % 2 == 0 and "even" or nil }, frame)
    end
    assert.is_nil(sse:next(0.2)) -- nothing twice
  end)

  it("a message published as soon as Redis has a node's subscription reaches its subscriber", function()
    local a, b = new_node(), new_node()
    for i = 1, 10 do
      local topic = "fresh/" .. i
      local sse = t.sse(a, "/events?topic=" .. topic)
      -- Redis has the SUBSCRIBE; node a may not have read its answer yet
      t.wait(function() return server:cli("PUBSUB", "NUMSUB", "herald:ch:" .. topic):match("(%d+)$") == "1" end,
        3, "the subscription in Redis")
      publish(b, topic, "first")
      local ev = sse:next(3)
      assert.equal("first", ev and ev.data, "message " .. i)
      sse:close()
    end
  end)

  it("ids are shared: messages published on both nodes come to a subscriber in one order", function()
    local a, b = new_node(), new_node()
    local sse = t.sse(a, "/events?topic=mixed")
    settle()
    local ids = {}
    for i = 1, 10 do ids[i] = publish(i % 2 == 0 and a or b, "mixed", tostring(i)) end
    local got = sse:take(10, 3)
    for i = 1, 10 do assert.equal(ids[i], got[i].id) end
  end)

  it("a client cut from node A resumes on node B without loss or repeat", function()
    local a, b = new_node(), new_node()
    local sse = t.sse(a, "/events?topic=news")
    settle()
    for i = 1, 3 do publish(b, "news", "before" .. i) end
    local seen = sse:take(3, 3)
    sse:close()
    for i = 1, 4 do publish(a, "news", "after" .. i) end
    local resumed = t.sse(b, "/events?topic=news", { last_event_id = seen[3].id })
    local got = resumed:take(4, 3)
    for i = 1, 4 do assert.equal("after" .. i, got[i].data) end
    publish(a, "news", "live")
    assert.equal("live", resumed:next(3).data)
    assert.is_nil(resumed:next(0.2))
  end)

  it("a node that drains sends its clients elsewhere; they resume on another node without loss", function()
    local a, b, sse, first = subscribed_pair()
    a:close() -- as SIGTERM does under herald.run: stop accepting, tell streams to come back
    local retry = sse:next(3)
    t.wait(function() return sse:closed() end, 3, "the drained stream's end")
    assert.is_nil(retry, "no message, only the retry field")
    assert.equal(1000, sse.retry)
    local missed = {}
    for i = 1, 3 do missed[i] = publish(b, "news", "meanwhile " .. i) end
    local resumed = t.sse(b, "/events?topic=news", { last_event_id = first })
    local got = resumed:take(3, 3)
    for i = 1, 3 do assert.same({ missed[i], "meanwhile " .. i }, { got[i].id, got[i].data }) end
    assert.is_nil(resumed:next(0.2))
  end)

  it("a resume past what history keeps gets a gap event, then what is left", function()
    local a, b = new_node(), new_node()
    local sse = t.sse(a, "/events?topic=short/1")
    settle()
    local first = publish(b, "short/1", "one")
    assert.equal(first, sse:next(3).id)
    sse:close()
    for i = 2, 6 do publish(b, "short/1", tostring(i)) end -- history = 2 keeps 5 and 6
    local resumed = t.sse(b, "/events?topic=short/1", { last_event_id = first })
    local got = resumed:take(3, 3)
    assert.equal("herald-gap", got[1].event)
    assert.same({ topic = "short/1" }, json(got[1].data))
    assert.same({ "5", "6" }, { got[2].data, got[3].data })

    -- an id from no epoch of this Redis: a gap, then all there is
    local stranger = t.sse(a, "/events?topic=short/1", { last_event_id = "0badcafe-3" })
    local all = stranger:take(3, 3)
    assert.equal("herald-gap", all[1].event)
    assert.same({ "5", "6" }, { all[2].data, all[3].data })
  end)

  it("history is bounded by age in Redis too; a resume past it gets a gap", function()
    local a, b = new_node(), new_node()
    local first = publish(a, "aged/1", "old 1")
    publish(a, "aged/1", "old 2")
    t.sleep(400)
    publish(a, "aged/1", "new")
    assert.equal("1", server:cli("XLEN", "herald:h:aged/1")) -- the old entries trimmed by the publish
    local resumed = t.sse(b, "/events?topic=aged/1", { last_event_id = first })
    local got = resumed:take(2, 3)
    assert.equal("herald-gap", got[1].event)
    assert.equal("new", got[2].data)
  end)

  it("app:history reads Redis from any node; the publisher endpoint answers with the id", function()
    local a, b = new_node(), new_node()
    local res = t.post(a, "/pub/hist", "via http")
    assert.equal(200, res.status)
    local id = json(res.body).id
    assert.truthy(id:match("^%x+%-%d+$"))
    publish(a, "hist", "second", "ev")
    local list, gap
    b:history("hist", nil, function(l, g) list, gap = l, g end)
    t.wait(function() return list end, 3, "history")
    assert.equal(2, #list)
    assert.same({ id, "via http" }, { list[1].id, list[1].data })
    assert.same({ "second", "ev" }, { list[2].data, list[2].event })
    assert.is_false(gap)
    list = nil
    b:history("hist", id, function(l, g) list, gap = l, g end)
    t.wait(function() return list end, 3, "history after an id")
    assert.same({ "second" }, { list[1].data })
    assert.equal(1, #list)
    assert.is_false(gap)
    assert.has_error(function() b:history("hist") end,
      "history: with a broker, pass fn(list, gap): Redis answers later")
  end)

  it("presence spans nodes, and a node that dies drops out within presence_ttl", function()
    local a, b = new_node(), new_node()
    local ann = t.sse(a, "/events?topic=room&user=ann")
    local bob = t.sse(b, "/events?topic=room&user=bob")
    local bob2 = t.sse(b, "/events?topic=room&user=bob")
    -- a node in a process of its own, killed without a word
    local other = proc.spawn_lua([[
      local herald = require "herald"
      local app = herald.new { broker = { redis = arg[1], presence_ttl = 3 } }
      app:auth(function(req) return req.query.user end)
      app:sse("/events", function(s) s:subscribe("room") end)
      local port = assert(app:listen { port = 0 })
      print("port " .. port)
      io.stdout:flush()
      herald.run()
    ]], { server.url })
    local port = tonumber(other:expect("^port (%d+)$"))
    local cid = t.connect(port)
    cid:send("GET /events?user=cid HTTP/1.1\r\nHost: x\r\n\r\n")
    cid:read_until("\r\n\r\n", 3)
    settle()
    local function users(app)
      local list
      app:presence("room", function(u, err) list = u or err end)
      t.wait(function() return list end, 3, "presence")
      return list
    end
    assert.same({ "ann", "bob", "cid" }, users(a))
    assert.same({ "ann", "bob", "cid" }, users(b))
    -- and a message from this process reaches the other one's subscriber
    local id = publish(a, "room", "hello cid")
    cid:read_until("data: hello cid\n\n", 3)
    assert.truthy(cid.buffer:find("id: " .. id .. "\n", 1, true))

    bob:close()
    t.sleep(100)
    assert.same({ "ann", "bob", "cid" }, users(a)) -- bob is still there once
    bob2:close()
    t.wait(function()
      local u = users(a)
      return #u == 2 and u[1] == "ann" and u[2] == "cid"
    end, 3, "bob gone")

    other:stop(2000, "KILL")
    cid:close()
    local started = herald.now()
    t.wait(function() return #users(a) == 1 end, 6, "the dead node's user gone")
    assert.is_true(herald.now() - started <= 4500) -- presence_ttl 3 s and a read's slack
    assert.same({ "ann" }, users(b))
    ann:close()
  end)

  it("a node cut from Redis's pub/sub catches up from history, without a gap", function()
    local _, b, sse = subscribed_pair()
    -- every pub/sub connection cut: node a misses what b publishes meanwhile
    server:cli("CLIENT", "KILL", "TYPE", "pubsub")
    for i = 2, 5 do publish(b, "news", tostring(i)) end
    local got = sse:take(4, 5)
    for i = 1, 4 do assert.equal(tostring(i + 1), got[i].data) end
    assert.is_nil(sse:next(0.3))
  end)

  it("Redis killed and restarted: publishes fail meanwhile, streams stay, and catch up after", function()
    local a, b, sse, first = subscribed_pair()
    local ws = t.ws(a, "/ws?topic=news")
    settle()

    server:kill()
    t.wait(function() return not b:stats().broker.up end, 3, "the broker down")
    local ok, err = b:publish("news", "lost?")
    assert.is_nil(ok)
    assert.matches("^broker unavailable", err)
    local res = t.post(b, "/pub/news", "via http")
    assert.equal(503, res.status)
    assert.equal(0, #sse.events)
    assert.is_false(sse:closed())

    assert.truthy(logged[1] and logged[1]:match("^broker: Redis: "), "the loss is logged")
    server:start() -- its data kept on disk: history and the epoch survive
    t.wait(function() return a:stats().broker.up and b:stats().broker.up end, 8, "the broker back")
    local after = publish(b, "news", "after")
    assert.equal(seq(first) + 1, seq(after))
    local ev = sse:next(3)
    assert.same({ after, "after" }, { ev.id, ev.data })
    assert.same({ topic = "news", id = after, data = "after" }, json(ws:receive(3).data))
    assert.is_false(sse:closed())
  end)

  it("Redis restarted without its data: subscribers hear of a gap, then get new messages", function()
    local a, b, sse = subscribed_pair()
    server:forget() -- killed, and its files gone
    t.wait(function() return not a:stats().broker.up and not b:stats().broker.up end, 3, "the broker down")
    server:start()
    t.wait(function() return a:stats().broker.up and b:stats().broker.up end, 8, "the broker back")
    publish(b, "news", "new")
    local got = sse:take(2, 3)
    assert.equal("herald-gap", got[1].event)
    assert.equal("new", got[2].data)
  end)

  it("refuses workers and bad broker options with clear errors", function()
    assert.has_error(function() herald.new { broker = { prefix = "x" } } end,
      'herald.new: broker needs redis = "redis://host:port/db"')
    assert.has_error(function() herald.new { broker = { redis = server.url, nope = 1 } } end,
      "herald.new: broker: unknown option 'nope'")
    assert.has_error(function() herald.new { broker = { redis = "http://x" } } end)
  end)
end)
