-- The Redis broker's connection: URL forms (password, ACL user, database,
-- prefix) and bad URLs; startup (Redis down, refusing, full, not Redis, not
-- answering; broker.wait); rediss:// (the server's certificate checked,
-- client certificates, bad files); Redis lost at run time (killed and
-- restarted on the same port, stopped, its connections cut with CLIENT KILL).
--
-- Real redis-server processes on free ports (spec/support/redis.lua); the
-- herald nodes are apps in this process driven with herald.test (two apps
-- with the same Redis are two nodes). Certificates are made with the openssl
-- CLI in a temporary folder (spec/support/certs.lua).
local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"
local proc = require "spec.support.process"
local redis = require "spec.support.redis"
local certs = require "spec.support.certs"

local nodes = {}   -- apps a spec made: closed after it, their brokers too
local servers = {} -- redis-servers a spec started: killed after it

-- A Lua pattern matching s literally.
local function literal(s) return (s:gsub("%p", "%%%0")) end

-- A node: an app with the broker options given (connect_timeout 2 s unless
-- set, times t.scale: a TLS handshake under valgrind takes seconds) and an
-- SSE route /s/:topic that subscribes to the topic.
local function node(broker)
  if broker.connect_timeout == nil then broker.connect_timeout = 2 * t.scale end
  local app = herald.new { broker = broker }
  app:sse("/s/:topic", function(stream, req) assert(stream:subscribe(req.params.topic)) end)
  nodes[#nodes + 1] = app
  return app
end

local function server(opts)
  local s = redis.start(opts)
  servers[#servers + 1] = s
  return s
end

-- app:listen on a free port (the port herald.test then uses) or nil, message.
local function listen(app)
  local port, err = app:listen { host = "127.0.0.1", port = 0 }
  app._test_port = port
  return port, err
end

-- Milliseconds fn takes, and its results.
local function timed(fn)
  local start = core.now()
  local r = table.pack(fn())
  return core.now() - start, table.unpack(r, 1, r.n)
end

-- Publishes through app without waiting: app:publish's results, and a
-- table that done fills with { id, err }.
local function publish_async(app, topic, data)
  local answer = {}
  local ok, why = app:publish(topic, data, { done = function(id, err) answer[1], answer[2] = id, err end })
  return ok, why, answer
end

-- Waits for done(id, err) to fill answer (see publish_async): id, err.
local function answered(answer, timeout)
  t.wait(function() return answer[1] or answer[2] end, timeout, "Redis's answer to a publish")
  return answer[1], answer[2]
end

-- Publishes through app and waits for Redis's answer: returns the id, or
-- nil and why.
local function publish(app, topic, data)
  local ok, why, answer = publish_async(app, topic, data)
  if not ok then return nil, why end
  return answered(answer)
end

-- Waits until n clients of Redis subscribe to the topic's channel, and the
-- nodes have taken in Redis's confirmation: a node newly watching a topic
-- reads the topic's newest id, and a message published meanwhile can be
-- lost (hub.c's topic_synced; reported, not this spec's subject).
local function watched(srv, topic, n, prefix)
  local channel = (prefix or "herald:") .. "ch:" .. topic
  t.wait(function()
    return tonumber(srv:cli("PUBSUB", "NUMSUB", channel):match("(%d+)$")) == n
  end, nil, n .. " subscriber(s) of " .. channel .. " in Redis")
  t.sleep(100)
end

-- The next event on stream s whose data is data (others are skipped).
local function receive(s, data, timeout)
  local deadline = core.now() + (timeout or t.timeout) * 1000
  local seen = {}
  while core.now() < deadline do
    local ev = s:next(math.max(deadline - core.now(), 1) / 1000)
    if ev and ev.data == data then return ev end
    if not ev then break end
    seen[#seen + 1] = ev.data
  end
  error(("no event %q on the stream (saw: %s)"):format(data, table.concat(seen, ", ")), 2)
end

-- An SSE subscriber of topic on app, once Redis has the topic watched.
local function subscriber(srv, app, topic, prefix)
  local s = t.sse(app, "/s/" .. topic)
  assert.equal(200, s.status)
  watched(srv, topic, 1, prefix)
  return s
end

-- Once the topic is watched again, what node b publishes reaches stream s.
local function assert_delivers(srv, s, b, topic, data)
  watched(srv, topic, 1)
  local id, err = publish(b, topic, data)
  assert(id, err)
  assert.equal(id, receive(s, data).id)
end

-- A subscriber on node a gets what node b publishes.
local function assert_fanout(srv, a, b, topic, prefix)
  local s = subscriber(srv, a, topic, prefix)
  local data = "from b: " .. topic .. " " .. core.now()
  local id, err = publish(b, topic, data)
  assert(id, err)
  assert.equal(id, receive(s, data).id)
  s:close()
end

-- Two nodes with these broker options, listening.
local function two_nodes(broker)
  local apps = {}
  for i = 1, 2 do
    local o = {}
    for k, v in pairs(broker) do o[k] = v end
    apps[i] = node(o)
    assert.truthy(listen(apps[i]))
  end
  return apps[1], apps[2]
end

-- Waits until every app's broker is up; returns how long it took (ms).
local function wait_up(apps, timeout)
  return (timed(function()
    t.wait(function()
      for _, app in ipairs(apps) do
        if not app:stats().broker.up then return false end
      end
      return true
    end, timeout, "the brokers up")
  end))
end

-- Keys matching pattern in database db, sorted.
local function keys(srv, db, pattern)
  local list = {}
  for k in srv:cli("-n", tostring(db), "--raw", "KEYS", pattern):gmatch("[^\n]+") do list[#list + 1] = k end
  table.sort(list)
  return list
end

-- The users Redis lists for its clients, e.g. { herald = 4 } (redis-cli itself aside).
local function client_users(srv)
  local users = {}
  for line in srv:cli("CLIENT", "LIST"):gmatch("[^\n]+") do
    local user, cmd = line:match(" user=(%S+)"), line:match(" cmd=(%S+)")
    if user and cmd ~= "client|list" then users[user] = (users[user] or 0) + 1 end
  end
  return users
end

local function close_nodes()
  for i = #nodes, 1, -1 do
    local app = nodes[i]
    nodes[i] = nil
    app:close()
    pcall(t.wait, function() return app:connections() == 0 end, 2)
  end
  -- what the closes started (the sockets' handles) ends here
  t.sleep(10)
end

local function kill_servers()
  for i = #servers, 1, -1 do
    servers[i]:kill()
    servers[i] = nil
  end
end

describe("broker connection", function()
  after_each(function()
    close_nodes()
    kill_servers()
  end)

  describe("URLs", function()
    it("authenticates with the password in the URL (requirepass), %-escapes decoded", function()
      local password = "s3:cr@t/%"
      local srv = server { password = password }
      local a, b = two_nodes { redis = ("redis://:%s@127.0.0.1:%d/0"):format("s3%3Acr%40t%2F%25", srv.port) }
      assert_fanout(srv, a, b, "news")
      assert.same({ default = 4 }, client_users(srv)) -- two connections a node
    end)

    it("logs in as an ACL user (user:password)", function()
      local srv = server()
      assert.equal("OK", srv:cli("ACL", "SETUSER", "hrld", "on", ">pass word", "~*", "&*", "+@all"))
      local a, b = two_nodes { redis = ("redis://hrld:pass%%20word@127.0.0.1:%d/0"):format(srv.port) }
      assert_fanout(srv, a, b, "news")
      assert.same({ hrld = 4 }, client_users(srv))

      local wrong = node { redis = ("redis://hrld:nope@127.0.0.1:%d/0"):format(srv.port) }
      local port, err = listen(wrong)
      assert.is_nil(port)
      assert.matches("^listen: broker: Redis at redis://%*%*%*@127%.0%.0%.1:%d+/0: WRONGPASS", err)
    end)

    it("selects the database in the URL: herald's keys are there, not in db 0", function()
      local srv = server()
      local a, b = two_nodes { redis = ("redis://127.0.0.1:%d/3"):format(srv.port) }
      assert_fanout(srv, a, b, "news")
      assert.same({ "herald:epoch", "herald:h:news", "herald:last:news", "herald:seq" }, keys(srv, 3, "*"))
      assert.same({}, keys(srv, 0, "*"))
    end)

    it("keeps keys and channels under a custom prefix, apart from other prefixes", function()
      local srv = server()
      local a, b = two_nodes { redis = srv.url, prefix = "app1:" }
      local other = node { redis = srv.url } -- "herald:"
      assert.truthy(listen(other))
      local elsewhere = subscriber(srv, other, "news")
      assert_fanout(srv, a, b, "news", "app1:")
      assert.same({ "app1:epoch", "app1:h:news", "app1:last:news", "app1:seq" }, keys(srv, 0, "app1:*"))
      assert.same({ "herald:epoch" }, keys(srv, 0, "herald:*")) -- the other node's, and no message
      local ev, why = elsewhere:next(0.2)
      assert.is_nil(ev, "the other prefix's subscriber got a message")
      assert.equal("timeout", why)
    end)

    it("refuses a bad URL in herald.new, saying why, the password hidden", function()
      local format = "the URL must be redis://[[user]:password@]host[:port][/db]"
      local scheme = "the URL must start with redis:// or rediss://"
      local bad = { -- the URL, the reason, the URL as the message shows it
        { "http://x", scheme, "http://x" },
        { "http://u:secret@x", scheme, "http://***@x" },
        { "redis://", format, "redis://" },
        { "redis://h:99999", format, "redis://h:99999" },
        { "redis://h:0", format, "redis://h:0" },
        { "redis://h:", format, "redis://h:" },
        { "redis://h/abc", format, "redis://h/abc" },
        { "redis://h/-1", format, "redis://h/-1" },
        { "redis://[::1/0", format, "redis://[::1/0" },
        { "redis://:secret@h:port/0", format, "redis://***@h:port/0" },
        { "rediss://u:se@cret@h:1/x", format, "rediss://***@h:1/x" },
      }
      for _, case in ipairs(bad) do
        local ok, err = pcall(herald.new, { broker = { redis = case[1] } })
        assert.is_false(ok, case[1])
        assert.equal(("herald.new: broker: option 'redis': %s, got %q"):format(case[2], case[3]), err)
      end
      -- raised at the caller's line, as the other broker options' errors
      local here = "^spec/broker_connect_spec%.lua:%d+: "
      for broker, message in pairs {
        [{ redis = "redis://h:0" }] = "herald.new: broker: option 'redis': the URL must be",
        [{ redis = 6379 }] = "herald.new: broker: option 'redis' must be a string, got number",
        [{}] = "herald.new: broker needs redis = ",
        [{ redis = "redis://h", tls = { ca = 1 } }] = "herald.new: broker.tls: option 'ca' must be a string",
      } do
        local ok, err = pcall(function() local app = herald.new { broker = broker } return app end)
        assert.is_false(ok)
        assert.matches(here .. literal(message), err)
      end
    end)
  end)

  describe("startup", function()
    it("Redis down: listen fails at once, naming the URL (no password) and why #timing", function()
      local port = proc.free_port()
      local app = node { redis = ("redis://:secret@127.0.0.1:%d/0"):format(port), connect_timeout = 5 }
      local ms, bound, err = timed(function() return listen(app) end)
      assert.is_nil(bound)
      assert.equal(("listen: broker: Redis at redis://***@127.0.0.1:%d/0: connection refused"):format(port), err)
      assert.is_true(ms < 1000, ms .. " ms")
      assert.same({ up = false, error = "connection refused" }, app:stats().broker)
      assert.same({ nil, "broker unavailable: connection refused" }, { app:publish("news", "x") })
    end)

    it("a wrong or missing password: listen fails with Redis's answer", function()
      local srv = server { password = "right" }
      local wrong = node { redis = ("redis://:wrong@127.0.0.1:%d/0"):format(srv.port) }
      local port, err = listen(wrong)
      assert.is_nil(port)
      assert.matches("^listen: broker: Redis at redis://%*%*%*@127%.0%.0%.1:%d+/0: WRONGPASS", err)
      local none = node { redis = ("redis://127.0.0.1:%d/0"):format(srv.port) }
      port, err = listen(none)
      assert.is_nil(port)
      assert.matches("NOAUTH", err, nil, true)
    end)

    it("a Redis that accepts and never answers: listen gives up after connect_timeout #timing", function()
      local srv = server()
      srv.process:signal("STOP") -- the kernel still accepts connections
      local app = node { redis = srv.url, connect_timeout = 0.3 }
      local ms, port, err = timed(function() return listen(app) end)
      srv.process:signal("CONT")
      assert.is_nil(port)
      assert.matches("^listen: broker: Redis at redis://127%.0%.0%.1:%d+/0: .*tim", err)
      assert.is_true(ms >= 250 and ms < 2000, ms .. " ms")
      -- once Redis answers, the node is up without another listen
      t.wait(function() return app:stats().broker.up end, nil, "the broker up")
    end)

    it("Redis full (maxclients): listen fails with Redis's refusal", function()
      local srv = server()
      assert.equal("OK", srv:cli("CONFIG", "SET", "maxclients", "1"))
      local app = node { redis = srv.url }
      local port, err = listen(app)
      assert.is_nil(port)
      assert.matches("^listen: broker: Redis at redis://127%.0%.0%.1:%d+/0: ERR max number of clients reached$", err)
    end)

    it("something else on the port: listen fails, and the attempts back off #timing", function()
      local impostor = herald.new {} -- an HTTP server
      nodes[#nodes + 1] = impostor
      local app = node { redis = ("redis://127.0.0.1:%d/0"):format(listen(impostor)) }
      local port, err = listen(app)
      assert.is_nil(port)
      assert.matches(": protocol error from Redis$", err)
      t.sleep(1000)
      -- two connections, each tried again after 100, 200, 400 ms...: not every 100 ms
      local attempts = impostor:stats().errors.http_400
      assert.is_true(attempts >= 4 and attempts <= 10, attempts .. " attempts")
    end)

    it("wait = true: listen waits until a Redis started later answers #timing", function()
      local srv = redis.new()
      servers[#servers + 1] = srv
      local app = node { redis = srv.url, wait = true, connect_timeout = 0.2 }
      srv:start_later(1)
      local ms, port, err = timed(function() return listen(app) end)
      assert(port, err)
      assert.is_true(ms >= 700 and ms < 4000, ms .. " ms")
      assert.same({ up = true }, app:stats().broker)
      assert.truthy(publish(app, "news", "hello"))
    end)
  end)

  describe("rediss://", function()
    local dir, ca, other_ca, client, tls_server
    setup(function()
      dir = certs.dir()
      ca = certs.ca(dir, "ca")
      other_ca = certs.ca(dir, "other-ca")
      local cert = certs.issue(dir, ca, "redis", { "localhost", "127.0.0.1" })
      client = certs.issue(dir, ca, "client", { "herald-node" })
      tls_server = redis.start { tls = { cert = cert.cert, key = cert.key, ca = ca.cert } }
    end)
    teardown(function()
      if tls_server then tls_server:kill() end
      certs.remove(dir)
    end)

    it("a node subscribes and another publishes over TLS (by name and by address)", function()
      local a = node { redis = tls_server.url, tls = { ca = ca.cert } }
      local b = node { redis = tls_server.url:gsub("localhost", "127.0.0.1"), tls = { ca = ca.cert } }
      for _, app in ipairs { a, b } do assert.truthy(listen(app)) end
      assert_fanout(tls_server, a, b, "news")
      assert_fanout(tls_server, b, a, "sport")
    end)

    it("a certificate from another CA: listen fails, saying so; verify = false accepts it", function()
      local app = node { redis = tls_server.url, tls = { ca = other_ca.cert } }
      local port, err = listen(app)
      assert.is_nil(port)
      assert.matches("^listen: broker: Redis at rediss://localhost:%d+/0: TLS: certificate: ", err)
      local trusting = node { redis = tls_server.url, tls = { ca = other_ca.cert, verify = false } }
      assert.truthy(listen(trusting))
    end)

    it("a certificate for another name: listen fails", function()
      local cert = certs.issue(dir, ca, "elsewhere", { "elsewhere.test" })
      local srv = server { tls = { cert = cert.cert, key = cert.key, ca = ca.cert } }
      for _, host in ipairs { "localhost", "127.0.0.1" } do
        local app = node { redis = srv.url:gsub("localhost", host), tls = { ca = ca.cert } }
        local port, err = listen(app)
        assert.is_nil(port)
        assert.matches("TLS: certificate: .*mismatch", err)
      end
    end)

    it("tls-auth-clients yes: a client certificate is needed, and works", function()
      local cert = certs.issue(dir, ca, "redis2", { "localhost" })
      local srv = server { tls = { cert = cert.cert, key = cert.key, ca = ca.cert, auth_clients = true } }
      -- Redis refuses with an alert after the handshake (TLS 1.3) and closes.
      -- A node much slower than usual (valgrind: t.scale > 1) may find the
      -- reset before the alert, and the reset can take the alert with it.
      local function refused(err, alert)
        if t.scale > 1 and err:find(": connection reset by peer$") then return end
        assert.matches("^listen: broker: Redis at rediss://localhost:%d+/0: TLS: .*" .. alert, err)
      end
      local bare = node { redis = srv.url, tls = { ca = ca.cert } }
      local port, err = listen(bare)
      assert.is_nil(port)
      refused(err, "certificate required")
      local foreign = node { redis = srv.url, tls = { ca = ca.cert, cert = other_ca.cert, key = other_ca.key } }
      port, err = listen(foreign)
      assert.is_nil(port)
      refused(err, "unknown ca")
      local a, b = two_nodes { redis = srv.url, tls = { ca = ca.cert, cert = client.cert, key = client.key } }
      assert_fanout(srv, a, b, "news")
    end)

    it("an unreadable or mismatched CA, certificate or key: herald.new says which file", function()
      local missing = dir .. "/missing.pem"
      local cases = {
        { { ca = missing }, "tls.ca " .. missing },
        { { ca = ca.cert, cert = missing, key = client.key }, "tls.cert " .. missing },
        { { ca = ca.cert, cert = client.cert, key = missing }, "tls.key " .. missing },
        { { ca = ca.cert, cert = client.cert, key = ca.key }, "tls.key " .. ca.key },
        { { ca = ca.cert, key = client.key }, "tls.key " .. client.key .. " without tls.cert" },
      }
      for _, case in ipairs(cases) do
        local ok, err = pcall(herald.new, { broker = { redis = tls_server.url, tls = case[1] } })
        assert.is_false(ok)
        assert.matches("herald.new: broker: " .. case[2], err, nil, true)
      end
    end)
  end)

  describe("at run time", function()
    it("Redis killed: the broker goes down and publish is refused; back after a restart #timing", function()
      local srv = server()
      local a, b = two_nodes { redis = srv.url }
      local s = subscriber(srv, a, "news")
      assert_delivers(srv, s, b, "news", "before")

      srv:kill()
      t.wait(function() return not a:stats().broker.up and not b:stats().broker.up end, nil, "the brokers down")
      local st = b:stats().broker
      assert.is_false(st.up)
      assert.is_string(st.error)
      local ok, err = b:publish("news", "lost")
      assert.is_nil(ok)
      assert.matches("^broker unavailable: .+", err)
      t.sleep(500) -- a few reconnect attempts
      assert.is_false(a:stats().broker.up)
      assert.equal("connection refused", a:stats().broker.error)
      assert.same({ nil, "broker unavailable: connection refused" }, { b:publish("news", "lost") })
      assert.is_false(s:closed(), "the subscriber stays connected")

      srv:start()
      local ms = wait_up({ a, b }, 6)
      assert.is_true(ms < 3000, ms .. " ms") -- the backoff was at most 800 ms
      assert.same({ up = true }, a:stats().broker)
      assert_delivers(srv, s, b, "news", "after")
    end)

    it("a long outage: the retries back off to 5 s, not more, and delivery resumes #timing", function()
      local srv = server()
      local a, b = two_nodes { redis = srv.url }
      local s = subscriber(srv, a, "news")
      local killed = core.now()
      srv:kill()
      -- attempts 0.1, 0.3, 0.7, 1.5, 3.1 and 6.3 s after the loss; then every 5 s
      t.sleep(6500 - (core.now() - killed))
      srv:start()
      local ms = wait_up({ a, b }, 8)
      assert.is_true(ms < 5500, ms .. " ms after the restart")
      assert.is_false(s:closed(), "the subscriber stays connected")
      assert_delivers(srv, s, b, "news", "after")
    end)

    it("a Redis that stops answering is lost after 5 s, and found again when it answers #timing", function()
      local srv = server()
      local a, b = two_nodes { redis = srv.url }
      local s = subscriber(srv, a, "news")
      srv.process:signal("STOP") -- as a network partition: no close, no reset
      local ok, _, answer = publish_async(b, "news", "x")
      assert.is_true(ok)
      local ms, id, err = timed(function() return answered(answer, 8) end)
      assert.is_true(ms >= 4000 and ms < 7000, ms .. " ms")
      assert.is_nil(id)
      assert.equal("no answer from Redis in 5 s", err)
      assert.same({ up = false, error = "no answer from Redis in 5 s" }, b:stats().broker)
      assert.same({ nil, "broker unavailable: no answer from Redis in 5 s" }, { b:publish("news", "y") })
      -- a sent nothing: the PINGs on its quiet connections go unanswered
      t.wait(function() return not a:stats().broker.up end, 8, "a's broker down")
      srv.process:signal("CONT")
      wait_up({ a, b }, 8)
      assert_delivers(srv, s, b, "news", "after")
    end)

    it("a publish under way when Redis dies: done(nil, why)", function()
      local srv = server()
      local app = node { redis = srv.url }
      assert.truthy(listen(app))
      srv.process:signal("STOP")
      local ok, _, answer = publish_async(app, "news", "x")
      assert.is_true(ok)
      t.sleep(50)
      assert.same({}, answer)
      srv:kill()
      local id, err = answered(answer)
      assert.is_nil(id)
      assert.is_string(err)
    end)

    it("writes to a connection Redis dropped fail as errors, without SIGPIPE (no listen either)", function()
      local srv = server()
      -- in a process of its own: SIGPIPE would end it, not this run; it
      -- publishes and never listens (herald ignored SIGPIPE when a server listened)
      local p = proc.spawn_lua([[
        local herald = require "herald"
        local t = require "herald.test"
        local app = herald.new { broker = { redis = arg[1] } }
        t.wait(function() return app:stats().broker.up end)
        assert(os.execute(arg[2] .. " >/dev/null"))
        -- the node has not read Redis's close yet: each write meets a reset socket
        local answers = 0
        for i = 1, 5 do
          local ok, err = app:publish("news", "x" .. i, { done = function() answers = answers + 1 end })
          print("publish", tostring(ok), tostring(err))
        end
        t.wait(function() return answers == 5 end)
        print("alive", answers)
        io.stdout:flush()
      ]], { srv.url, ("%sredis-cli -p %d CLIENT KILL TYPE normal"):format(proc.unsanitized, srv.port) })
      local said, answers = pcall(p.expect, p, "^alive%s(%d+)")
      repeat until not p:line() -- its end
      local in_time, exited, stderr = p:stop()
      assert(said, "the node ended early (killed by SIGPIPE?); stderr:\n" .. stderr)
      assert.equal("5", answers)
      assert.is_true(in_time)
      assert.is_true(exited, stderr)
    end)

    it("CLIENT KILL TYPE pubsub: the node subscribes again and catches up", function()
      local srv = server()
      local a, b = two_nodes { redis = srv.url }
      local s = subscriber(srv, a, "news") -- no message yet: the catch-up starts from the id when watched
      assert.equal("1", srv:cli("CLIENT", "KILL", "TYPE", "pubsub"))
      -- published before a subscribes again: a reads it from the history
      assert.truthy(publish(b, "news", "meanwhile"))
      receive(s, "meanwhile")
      assert_delivers(srv, s, b, "news", "after")
      assert.same({ up = true }, a:stats().broker)
    end)

    it("CLIENT KILL TYPE normal: the nodes reconnect and keep delivering", function()
      local srv = server()
      local a, b = two_nodes { redis = srv.url }
      local s = subscriber(srv, a, "news")
      -- commands of both, and b's pub/sub connection (it watches nothing)
      assert.equal("3", srv:cli("CLIENT", "KILL", "TYPE", "normal"))
      -- the nodes have not seen it yet: these publishes are sent, and answered with an error
      local answers = {}
      for i, app in ipairs { a, b } do
        local ok, why
        ok, why, answers[i] = publish_async(app, "news", "lost")
        assert.is_true(ok, why)
      end
      for _, answer in ipairs(answers) do
        local id, err = answered(answer)
        assert.is_nil(id)
        assert.is_string(err)
      end
      wait_up { a, b }
      assert_delivers(srv, s, b, "news", "from b")
      assert_delivers(srv, s, a, "news", "from a")
      assert_fanout(srv, b, a, "sport")
    end)
  end)
end)
