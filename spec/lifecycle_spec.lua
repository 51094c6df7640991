-- Timers, herald.run / herald.stop, signals and the graceful drain.
local herald = require "herald"
local t = require "herald.test"

local function own_pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("n")
  f:close()
  return pid
end

describe("timers", function()
  it("after fires once, every repeats until cancelled", function()
    local once, many = 0, 0
    herald.after(10, function() once = once + 1 end)
    local h
    h = herald.every(5, function()
      many = many + 1
      if many == 3 then h:cancel() end
    end)
    t.sleep(120)
    assert.equal(1, once)
    assert.equal(3, many)
    assert.is_false(h:active())
  end)

  it("a cancelled timer never fires", function()
    local fired = false
    local h = herald.after(20, function() fired = true end)
    assert.is_true(h:active())
    h:cancel()
    h:cancel() -- twice is harmless
    t.sleep(60)
    assert.is_false(fired)
  end)

  it("keeps running a timer whose handle was dropped", function()
    local n = 0
    local weak = setmetatable({}, { __mode = "v" })
    weak[1] = herald.every(5, function() n = n + 1 end)
    collectgarbage()
    collectgarbage()
    t.sleep(60)
    assert.is_true(n >= 3)
    assert.is_not_nil(weak[1], "the running timer's handle was collected")
    weak[1]:cancel()
  end)

  it("herald.now is a monotonic clock in ms", function()
    local a = herald.now()
    t.sleep(30)
    local b = herald.now()
    assert.is_true(b - a >= 25, "elapsed " .. (b - a))
    assert.equal("integer", math.type(b))
  end)

  it("logs an error raised in a timer with a traceback and keeps going", function()
    local logged
    herald.on_error(function(msg) logged = msg end)
    local after = false
    herald.after(1, function() error("tick failed") end)
    herald.after(20, function() after = true end)
    t.sleep(60)
    assert.matches("tick failed", logged)
    assert.matches("stack traceback", logged)
    assert.is_true(after)
    herald.on_error(function(msg) io.stderr:write(msg, "\n") end)
  end)

  it("rejects bad arguments naming them", function()
    assert.error_matches(function() herald.after(-1, function() end) end, "ms must be")
    assert.error_matches(function() herald.every(0, function() end) end, "ms must be")
    assert.error_matches(function() herald.every(10, "x") end, "fn must be a function")
  end)
end)

describe("run and stop", function()
  local app, port
  before_each(function()
    app = herald.new { shutdown_timeout = 1 }
    app:get("/", function(_, res) res:send("up") end)
    port = assert(app:listen { port = 0 })
  end)
  after_each(function() app:close() end)

  it("returns at once when there is nothing to serve", function()
    app:close()
    local start = herald.now()
    herald.run()
    assert.is_true(herald.now() - start < 1000)
  end)

  it("serves until herald.stop(), then returns", function()
    local c = t.open(port)
    c:send(t.encode_request("GET", "/"))
    herald.after(100, herald.stop)
    herald.run()
    local res = assert(t.parse_response(c.buffer))
    assert.equal(200, res.status)
    assert.equal("up", res.body)
  end)

  it("refuses to drive the loop from inside run", function()
    local err
    herald.after(1, function()
      err = select(2, pcall(t.sleep, 10))
      herald.stop()
    end)
    herald.run()
    assert.matches("inside run", err)
  end)

  for _, signal in ipairs { "TERM", "INT" } do
    it("drains and returns on SIG" .. signal, function()
      local pid = own_pid()
      -- not os.execute: system() ignores SIGINT in the caller while it waits
      herald.after(20, function() io.popen(("kill -%s %d"):format(signal, pid)):close() end)
      local start = herald.now()
      herald.run()
      assert.is_true(herald.now() - start < 1000)
      -- the listener is closed: nothing answers any more
      local c = t.open(port)
      t.wait(function() return c.closed or c.connected end)
      assert.is_false(c.connected)
    end)
  end

  it("finishes a request under way, closes idle keep-alive conns, then returns", function()
    local idle = t.open(port)
    idle:send(t.encode_request("GET", "/"))
    local busy = t.open(port)
    app:post("/upload", function(req, res) res:send("got " .. #req.body) end)
    busy:send("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    herald.after(50, herald.stop)
    herald.after(150, function() busy:send("67890") end)
    local start = herald.now()
    herald.run()
    assert.is_true(herald.now() - start < 900, "drain took " .. (herald.now() - start))
    local first = assert(t.parse_response(idle.buffer))
    assert.equal("up", first.body)
    t.wait(function() return idle.closed end)
    local res = assert(t.parse_response(busy.buffer))
    assert.equal("got 10", res.body)
    assert.equal("close", res.headers.connection)
  end)

  it("closes what is still open when shutdown_timeout runs out #timing", function()
    local stuck = t.open(port)
    stuck:send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
    herald.after(20, herald.stop)
    local start = herald.now()
    herald.run()
    local took = herald.now() - start
    assert.is_true(took >= 900 and took < 2500, "drain took " .. took)
    t.wait(function() return stuck.closed end)
  end)
end)
