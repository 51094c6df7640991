-- app:publisher: the POST endpoint that publishes its body to the topic in
-- its path, over real sockets: the JSON answer, auth, allow, limits.
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

-- A stream endpoint at /s subscribing to ?topic=.
local function stream_endpoint(app)
  app:sse("/s", function(s, req) assert(s:subscribe(req.query.topic)) end)
end

local saved_timeout
before_each(function() saved_timeout = t.timeout; t.timeout = 2 end)
after_each(function() t.timeout = saved_timeout end)

describe("app:publisher", function()
  it("publishes the body and answers JSON {id, subscribers}", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    stream_endpoint(app)
    local a = open(app, "/s?topic=news")
    local b = open(app, "/s?topic=news")
    local res = t.post(app, "/pub/news", "hello\nworld")
    assert.equal(200, res.status)
    assert.matches("^application/json", res.headers["content-type"])
    local answer = cjson.decode(res.body)
    assert.matches("^%x%x%x%x%x%x%x%x%-%d+$", answer.id)
    assert.equal(2, answer.subscribers)
    for _, s in ipairs { a, b } do
      assert.same({ id = answer.id, event = "message", data = "hello\nworld" }, assert(s:next(1)))
    end
    local list = app:history("news")
    assert.equal(1, #list)
    assert.equal(answer.id, list[1].id)
    assert.equal("hello\nworld", list[1].data)
  end)

  it("answers subscribers 0 when nobody listens, and keeps the message for resume", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    stream_endpoint(app)
    local answer = cjson.decode(t.post(app, "/pub/quiet", "kept").body)
    assert.equal(0, answer.subscribers)
    local s = open(app, "/s?topic=quiet", { last_event_id = "garbage" })
    local ev = assert(s:next(1))
    assert.equal("herald-gap", ev.event)
    ev = assert(s:next(1))
    assert.same({ id = answer.id, event = "message", data = "kept" }, ev)
  end)

  it("publishes an empty body as an event with empty data", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    stream_endpoint(app)
    local s = open(app, "/s?topic=t")
    local res = t.post(app, "/pub/t", "")
    assert.equal(200, res.status)
    assert.equal("", assert(s:next(1)).data)
  end)

  it("gives ids that grow with each publish", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    local last = 0
    for _ = 1, 5 do
      local id = cjson.decode(t.post(app, "/pub/t", "x").body).id
      local seq = tonumber(id:match("%-(%d+)$"))
      assert.is_true(seq > last)
      last = seq
    end
  end)

  it("?event= sets the event name", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    stream_endpoint(app)
    local s = open(app, "/s?topic=t")
    assert.equal(200, t.post(app, "/pub/t?event=price%20update", "42").status)
    local ev = assert(s:next(1))
    assert.equal("price update", ev.event)
    assert.equal("42", ev.data)
    assert.equal("price update", app:history("t")[1].event)
  end)

  it("refuses an event name with CR, LF or NUL, an empty one or one over 256 bytes with 400", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    for _, bad in ipairs { "a%0Ab", "a%0Db", "a%00b", "", ("e"):rep(257) } do
      local res = t.post(app, "/pub/t?event=" .. bad, "x")
      assert.equal(400, res.status, bad)
      assert.equal("bad event name\n", res.body)
    end
    assert.equal(0, app:stats().published)
    assert.equal(200, t.post(app, "/pub/t?event=" .. ("e"):rep(256), "x").status)
  end)

  it("reads the topic percent-decoded from the path", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    local res = t.post(app, "/pub/room%3A%C3%A4%201", "x")
    assert.equal(200, res.status)
    assert.equal(1, #app:history("room:ä 1"))
  end)

  it("refuses a topic with control characters or over 1024 bytes with 400", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    for _, bad in ipairs { "a%0Ab", "a%00b", "a%09b", "a%7Fb", ("x"):rep(1025) } do
      local res = t.post(app, "/pub/" .. bad, "x")
      assert.equal(400, res.status, bad)
      assert.equal("bad topic name\n", res.body)
    end
    assert.equal(0, app:stats().published)
    assert.equal(200, t.post(app, "/pub/" .. ("x"):rep(1024), "x").status)
  end)

  it("answers GET with 405 and Allow: POST", function()
    local app = new_app()
    app:publisher("/pub/:topic")
    local res = t.get(app, "/pub/t")
    assert.equal(405, res.status)
    assert.equal("POST", res.headers.allow)
    assert.equal(0, app:stats().published)
  end)

  it("answers a body over max_body_size with 413 and publishes nothing", function()
    local app = new_app { max_body_size = 1000 }
    app:publisher("/pub/:topic")
    stream_endpoint(app)
    local s = open(app, "/s?topic=t")
    local res = t.post(app, "/pub/t", ("x"):rep(1001))
    assert.equal(413, res.status)
    assert.equal(0, app:stats().published)
    assert.same({ nil, "timeout" }, { s:next(0.1) })
    res = t.post(app, "/pub/t", ("y"):rep(1000))
    assert.equal(200, res.status)
    assert.equal(("y"):rep(1000), assert(s:next(1)).data)
  end)

  describe("auth", function()
    it("gets the request; nil answers 401, nil, 403 answers 403, with the given body", function()
      local app = new_app()
      local seen
      app:publisher("/pub/:topic", {
        auth = function(req)
          seen = req
          local key = req.headers["x-key"]
          if key == "secret" then return { name = "publisher" } end
          if key == "banned" then return nil, 403 end
          if key == "expired" then return nil, 401, "key expired\n" end
          return nil
        end,
      })
      local res = t.post(app, "/pub/t", "x")
      assert.equal(401, res.status)
      assert.equal("unauthorized\n", res.body)
      assert.equal("/pub/t", seen.path)
      res = t.post(app, "/pub/t", "x", { ["X-Key"] = "banned" })
      assert.equal(403, res.status)
      assert.equal("forbidden\n", res.body)
      res = t.post(app, "/pub/t", "x", { ["X-Key"] = "expired" })
      assert.equal(401, res.status)
      assert.equal("key expired\n", res.body)
      assert.equal(0, app:stats().published)
      res = t.post(app, "/pub/t", "x", { ["X-Key"] = "secret" })
      assert.equal(200, res.status)
      assert.equal(1, app:stats().published)
    end)

    it("an auth that raises answers 500, logged with a traceback", function()
      local app = new_app()
      app:publisher("/pub/:topic", { auth = function() error("key store down") end })
      local res = t.post(app, "/pub/t", "x")
      assert.equal(500, res.status)
      assert.equal(0, app:stats().published)
      assert.equal(1, #app.logged)
      assert.matches("key store down", app.logged[1], 1, true)
      assert.matches("stack traceback:", app.logged[1], 1, true)
    end)
  end)

  describe("allow", function()
    it("refuses with 403 when the topic's allow(user, topic, 'publish') says no", function()
      local app = new_app()
      local asked = {}
      local alice = { name = "alice" }
      app:topic("admin:*", {
        allow = function(user, topic, action)
          asked[#asked + 1] = { user, topic, action }
          if action == "subscribe" then return true end
          return user ~= nil and user.name == "root"
        end,
      })
      app:publisher("/pub/:topic", { auth = function() return alice end })
      stream_endpoint(app)
      local s = open(app, "/s?topic=admin:x")
      local res = t.post(app, "/pub/admin:x", "x")
      assert.equal(403, res.status)
      assert.equal("forbidden\n", res.body)
      -- the stream has no user (no app:auth); the publisher's is what its auth returned
      assert.same({ { nil, "admin:x", "subscribe" }, { alice, "admin:x", "publish" } }, asked)
      assert.equal(alice, asked[2][1])
      assert.equal(0, app:stats().published)
      assert.same({}, (app:history("admin:x")))
      assert.same({ nil, "timeout" }, { s:next(0.1) })
      -- topics outside the rule are open
      assert.equal(200, t.post(app, "/pub/news", "x").status)
    end)

    it("passes a nil user when the publisher has no auth", function()
      local app = new_app()
      local got = {}
      app:topic("*", { allow = function(user, topic, action) got = { user, topic, action }; return true end })
      app:publisher("/pub/:topic")
      assert.equal(200, t.post(app, "/pub/t", "x").status)
      assert.same({ nil, "t", "publish" }, got)
    end)
  end)

  it("refuses a path without :topic and unknown options", function()
    local app = new_app()
    assert.has_error(function() app:publisher("/pub") end, "publisher: path must contain a :topic parameter")
    assert.has_error(function() app:publisher(42) end, "publisher: path must contain a :topic parameter")
    assert.has_error(function() app:publisher("/p/:topic", { atuh = function() end }) end,
      "publisher: unknown option 'atuh'")
    assert.has_error(function() app:publisher("/p/:topic", { auth = "yes" }) end)
  end)
end)
