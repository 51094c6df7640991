-- herald.new and app:listen option validation, and herald.defaults.
local herald = require "herald"
local t = require "herald.test"

local function error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

-- herald.new(opts) must fail with a message containing each of the texts;
-- an app it makes anyway is closed.
local function new_fails(opts, ...)
  local ok, app_or_err = pcall(herald.new, opts)
  if ok then app_or_err:close() end
  assert.is_false(ok, "herald.new accepted the options")
  for _, text in ipairs { ... } do assert.matches(text, tostring(app_or_err), 1, true) end
  return tostring(app_or_err)
end

local ranges = {
  max_header_size = { "integer", 1024, 1048576 },
  max_body_size = { "integer", 0, 1073741824 },
  header_timeout = { "number", 0.05, 3600 },
  idle_timeout = { "number", 0.05, 86400 },
  shutdown_timeout = { "number", 0, 3600 },
  max_connections = { "integer", 1, 1000000 },
  history = { "integer", 0, 1000000 },
  max_age = { "number", 0, 31536000 },
  heartbeat = { "number", 0, 3600 },
  max_queued = { "integer", 1024, 1073741824 },
  max_subscriptions = { "integer", 1, 100000 },
  max_message = { "integer", 1, 1073741824 },
  ping_interval = { "number", 0, 86400 },
}

describe("herald.new options", function()
  it("has the documented defaults in herald.defaults", function()
    assert.same({
      max_header_size = 16384,
      max_body_size = 1048576,
      header_timeout = 10,
      idle_timeout = 60,
      shutdown_timeout = 5,
      max_connections = 10000,
      history = 100,
      max_age = 300,
      policy = "close",
      heartbeat = 15,
      max_queued = 1048576,
      max_subscriptions = 100,
      max_message = 1048576,
      ping_interval = 30,
      client_js = true,
      max_connections_per_ip = 1000,
      max_connects_per_ip = 200,
      trust_loopback = true,
      max_total_queued = 268435456,
      max_message_rate = 100,
      message_rate_policy = "close",
      drain_retry = 1000,
    }, herald.defaults)
  end)

  it("applies the defaults when no options or an empty table is given", function()
    for _, opts in ipairs { {}, false } do
      local app = herald.new(opts or nil)
      finally(function() app:close() end)
      assert.same(herald.defaults, app.config)
    end
  end)

  it("keeps the given options and defaults the others", function()
    local app = herald.new { max_body_size = 10, header_timeout = 0.5 }
    finally(function() app:close() end)
    local expected = {}
    for k, v in pairs(herald.defaults) do expected[k] = v end
    expected.max_body_size = 10
    expected.header_timeout = 0.5
    assert.same(expected, app.config)
  end)

  it("rejects options that are not a table", function()
    new_fails("fast", "herald.new: options must be a table, got string")
    new_fails(16384, "herald.new: options must be a table, got number")
  end)

  it("rejects an unknown option, naming it", function()
    new_fails({ max_headers_size = 1 }, "herald.new: unknown option 'max_headers_size'")
    -- the error points at the caller
    local err = error_of(function() herald.new { max_headers_size = 1 } end)
    assert.matches("^[^:]*options_spec%.lua:%d+: herald.new: unknown option", err)
    new_fails({ header_timeout = 1, port = 80 }, "unknown option 'port'")
    new_fails({ 1 }, "unknown option '1'")
  end)

  it("rejects a value of the wrong type, naming the option", function()
    new_fails({ max_header_size = "16384" },
      "herald.new: option 'max_header_size' must be an integer, got string")
    new_fails({ max_connections = 10.5 }, "option 'max_connections' must be an integer, got number")
    new_fails({ max_body_size = true }, "option 'max_body_size' must be an integer, got boolean")
    new_fails({ header_timeout = "10" }, "herald.new: option 'header_timeout' must be a number, got string")
    new_fails({ idle_timeout = {} }, "option 'idle_timeout' must be a number, got table")
    new_fails({ shutdown_timeout = print }, "option 'shutdown_timeout' must be a number, got function")
  end)

  it("accepts integers and fractions for the timeouts", function()
    local app = herald.new { header_timeout = 2, idle_timeout = 0.25, shutdown_timeout = 0 }
    finally(function() app:close() end)
    assert.equal(2, app.config.header_timeout)
    assert.equal(0.25, app.config.idle_timeout)
    assert.equal(0, app.config.shutdown_timeout)
  end)

  for name, rule in pairs(ranges) do
    local kind, min, max = rule[1], rule[2], rule[3]
    it("bounds " .. name .. " to " .. min .. ".." .. max, function()
      local step = kind == "integer" and 1 or 0.01
      local range = ("from %s to %s"):format(tostring(min), tostring(max))
      new_fails({ [name] = min - step },
        ("herald.new: option '%s' must be %s, got %s"):format(name, range, tostring(min - step)))
      new_fails({ [name] = max + step },
        ("herald.new: option '%s' must be %s, got %s"):format(name, range, tostring(max + step)))
      for _, v in ipairs { min, max } do
        local app = herald.new { [name] = v }
        assert.equal(v, app.config[name])
        app:close()
      end
    end)
  end

  it("rejects NaN for a number option, naming it", function()
    for _, name in ipairs { "header_timeout", "idle_timeout", "shutdown_timeout" } do
      new_fails({ [name] = 0 / 0 }, "option '" .. name .. "'")
    end
  end)

  it("rejects infinity", function()
    new_fails({ idle_timeout = math.huge }, "option 'idle_timeout' must be from")
    new_fails({ header_timeout = -math.huge }, "option 'header_timeout' must be from")
  end)

  it("uses the options: a body over max_body_size is refused", function()
    local app = herald.new { max_body_size = 4 }
    finally(function() app:close() end)
    local got
    app:post("/", function(req, res) got = req.body; res:send("ok") end)
    assert.equal("ok", t.post(app, "/", "four").body)
    assert.equal("four", got)
    got = nil
    -- chunked: counted as it arrives
    local c = t.connect(app)
    finally(function() c:close() end)
    c:send("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfives\r\n0\r\n\r\n")
    local res = assert(c:response())
    assert.equal(413, res.status)
    assert.equal("request body too large\n", res.body)
    -- announced by Content-Length: refused before the body is read
    res = t.post(app, "/", "fives")
    assert.equal(413, res.status)
    assert.equal("request body too large\n", res.body)
    assert.is_nil(got)
  end)
end)

describe("app:listen options", function()
  local app
  before_each(function()
    app = herald.new()
    app:get("/", function(_, res) res:send("here") end)
  end)
  after_each(function() app:close() end)

  it("rejects an unknown option, naming it", function()
    local err = error_of(app.listen, app, { prot = 8080 })
    assert.matches("listen: unknown option 'prot'", err, 1, true)
    err = error_of(function() app:listen { port = 0, reuse = true } end)
    assert.matches("^[^:]*options_spec%.lua:%d+: listen: unknown option 'reuse'", err)
  end)

  it("rejects options that are not a table", function()
    assert.matches("listen: options must be a table, got number", error_of(app.listen, app, 8080), 1, true)
  end)

  it("rejects a bad port", function()
    assert.matches("listen: option 'port' must be from 0 to 65535, got 65536",
      error_of(app.listen, app, { port = 65536 }), 1, true)
    assert.matches("listen: option 'port' must be from 0 to 65535, got -1",
      error_of(app.listen, app, { port = -1 }), 1, true)
    assert.matches("listen: option 'port' must be an integer, got string",
      error_of(app.listen, app, { port = "8080" }), 1, true)
    assert.matches("listen: option 'port' must be an integer, got number",
      error_of(app.listen, app, { port = 80.5 }), 1, true)
  end)

  it("rejects a bad host or backlog", function()
    assert.matches("listen: option 'host' must be a string, got number",
      error_of(app.listen, app, { host = 127 }), 1, true)
    assert.matches("listen: option 'backlog' must be from 1 to 65535, got 0",
      error_of(app.listen, app, { port = 0, backlog = 0 }), 1, true)
  end)

  it("returns nil and a message when it cannot listen", function()
    local port, err = app:listen { host = "not-an-address", port = 0 }
    assert.is_nil(port)
    assert.matches("listen on not-an-address port 0: ", err, 1, true)
  end)

  it("binds port 0 to a free port and serves on it", function()
    local port = app:listen { host = "127.0.0.1", port = 0 }
    assert.equal("integer", math.type(port))
    assert.is_true(port > 0 and port < 65536)
    local res = t.get(port, "/")
    assert.equal(200, res.status)
    assert.equal("here", res.body)
  end)

  it("reports a port already in use", function()
    local port = assert(app:listen { port = 0 })
    local other = herald.new()
    finally(function() other:close() end)
    local got, err = other:listen { port = port }
    assert.is_nil(got)
    assert.matches("listen on 127.0.0.1 port " .. port .. ": ", err, 1, true)
  end)
end)

describe("herald.new policy option", function()
  it("accepts close and conflate and refuses anything else, naming the option", function()
    for _, p in ipairs { "close", "conflate" } do
      local app = herald.new { policy = p }
      assert.equal(p, app.config.policy)
      app:close()
    end
    new_fails({ policy = "drop" }, "policy", "drop")
    new_fails({ policy = 1 }, "policy", "string")
  end)
end)
