-- HTTP/1.1 protocol behaviour of herald's server, over real sockets:
-- keep-alive, pipelining, HTTP/1.0, Connection, Date and Content-Length,
-- HEAD, chunked bodies, Expect: 100-continue, request targets, default
-- answers, handler errors, large responses, backpressure, IPv6, listeners,
-- close and listen errors.
local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"

local DAYS = { Mon = true, Tue = true, Wed = true, Thu = true, Fri = true, Sat = true, Sun = true }
local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8,
  Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

-- Seconds since the epoch of a UTC civil date (no time zone involved).
local function utc_epoch(y, m, d, hh, mm, ss)
  if m <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = (153 * mp + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  local days = era * 146097 + doe - 719468
  return days * 86400 + hh * 3600 + mm * 60 + ss
end

-- Every response carries an IMF-fixdate Date close to now and, unless it
-- cannot have a body, a Content-Length.
local function check_common(res)
  local date = res.headers.date
  assert.is_string(date, "no Date header")
  local wd, d, mon, y, hh, mm, ss =
    date:match("^(%a%a%a), (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
  assert.is_truthy(wd, "Date is not an IMF-fixdate: " .. date)
  assert.is_true(DAYS[wd], "bad day name in " .. date)
  assert.is_truthy(MONTHS[mon], "bad month in " .. date)
  local when = utc_epoch(tonumber(y), MONTHS[mon], tonumber(d), tonumber(hh), tonumber(mm),
    tonumber(ss))
  assert.is_true(math.abs(when - os.time()) <= 3, "Date is not now: " .. date)
  if res.status >= 200 and res.status ~= 204 and res.status ~= 304 then
    assert.is_truthy(res.headers["content-length"], "no Content-Length")
    assert.equal(tostring(#res.body), res.headers["content-length"])
  end
  return res
end

-- The app answers a plain request on a new connection.
local function assert_serves(app, port, host)
  local c = t.connect(port or app, host)
  c:send("GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
  local res = assert(c:response { timeout = 1 })
  c:close()
  assert.equal(200, res.status)
  assert.equal("pong", res.body)
  check_common(res)
end

local function new_app(opts)
  local app = herald.new(opts)
  app:get("/ping", function(_, res) res:send("pong") end)
  app:get("/echo/:x", function(req, res) res:send(req.params.x) end)
  app:post("/body", function(req, res) res:send(req.body) end)
  return app
end

local CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"

describe("http", function()
  local saved_timeout
  before_each(function() saved_timeout = t.timeout; t.timeout = 2 end)
  after_each(function() t.timeout = saved_timeout end)

  describe("keep-alive and pipelining", function()
    it("serves several requests on one connection", function()
      local app = new_app()
      finally(function() app:close() end)
      local c = t.connect(app)
      for i = 1, 5 do
        c:send("GET /echo/" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        local res = check_common(assert(c:response()))
        assert.equal(200, res.status)
        assert.equal(tostring(i), res.body)
        assert.is_nil(res.headers.connection)
      end
      assert.is_false(c.closed)
      assert.equal(1, app:connections())
      c:close()
      assert_serves(app)
    end)

    it("answers 20 requests sent in one write, in order", function()
      local app = new_app()
      finally(function() app:close() end)
      local parts = {}
      for i = 1, 20 do parts[i] = "GET /echo/r" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n" end
      local c = t.connect(app)
      c:send(table.concat(parts))
      for i = 1, 20 do
        local res = check_common(assert(c:response()))
        assert.equal(200, res.status)
        assert.equal("r" .. i, res.body)
      end
      t.sleep(50)
      assert.equal("", c.buffer)
      assert.is_false(c.closed)
      c:close()
      assert_serves(app)
    end)

    it("answers pipelined requests split at odd byte boundaries, in order", function()
      local app = new_app()
      finally(function() app:close() end)
      local parts = {}
      for i = 1, 20 do
        if i % 4 == 0 then
          parts[i] = ("POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nb%d")
            :format(#tostring(i) + 1, i)
        else
          parts[i] = "GET /echo/s" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n"
        end
      end
      local bytes = table.concat(parts)
      local sizes = { 1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37 }
      local c = t.connect(app)
      local pos, k = 1, 0
      while pos <= #bytes do
        k = k % #sizes + 1
        c:send(bytes:sub(pos, pos + sizes[k] - 1))
        pos = pos + sizes[k]
        t.sleep(2) -- separate reads on the server
      end
      for i = 1, 20 do
        local res = check_common(assert(c:response()))
        assert.equal(200, res.status)
        assert.equal(i % 4 == 0 and "b" .. i or "s" .. i, res.body)
      end
      c:close()
      assert_serves(app)
    end)

    it("answers pipelined requests that span several reads larger than max_header_size", function()
      -- Each write is ~33 KB of complete requests plus the start of the next
      -- one: the part of the head read so far is small, the read is not.
      local app = new_app()
      finally(function() app:close() end)
      local n = 500
      local parts = {}
      for i = 1, n do
        local line = ("GET /echo/%04d HTTP/1.1\r\nHost: x\r\nX-Pad: "):format(i)
        parts[i] = line .. ("p"):rep(201 - #line - 4) .. "\r\n\r\n"
        assert(#parts[i] == 201)
      end
      local bytes = table.concat(parts)
      local c = t.connect(app)
      for pos = 1, #bytes, 33333 do
        if c.closed then break end
        c:send(bytes:sub(pos, pos + 33332))
        t.sleep(20)
      end
      for i = 1, n do
        local res = assert(c:response(), "connection closed before response " .. i)
        assert.equal(200, res.status, "response " .. i .. ": " .. res.status .. " " .. res.body)
        assert.equal(("%04d"):format(i), res.body)
      end
      c:close()
      assert_serves(app)
    end)
  end)

  describe("connection management", function()
    it("closes an HTTP/1.0 connection without keep-alive, saying Connection: close", function()
      local app = new_app()
      finally(function() app:close() end)
      local c = t.connect(app)
      c:send("GET /echo/old HTTP/1.0\r\n\r\n")
      local res = check_common(assert(c:response()))
      assert.equal(200, res.status)
      assert.equal("old", res.body)
      assert.equal("close", res.headers.connection:lower())
      c:wait_closed(1)
      assert.equal("", c.buffer)
      assert_serves(app)
    end)

    it("keeps an HTTP/1.0 connection with Connection: keep-alive open", function()
      local app = new_app()
      finally(function() app:close() end)
      local c = t.connect(app)
      for i = 1, 3 do
        c:send("GET /echo/k" .. i .. " HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        local res = check_common(assert(c:response()))
        assert.equal(200, res.status)
        assert.equal("k" .. i, res.body)
        assert.equal("keep-alive", res.headers.connection:lower())
      end
      t.sleep(100)
      assert.is_false(c.closed)
      assert.equal(1, app:connections())
      c:close()
      assert_serves(app)
    end)

    it("honours a client's Connection: close and ignores what follows it", function()
      local app = new_app()
      finally(function() app:close() end)
      local c = t.connect(app)
      c:send("GET /echo/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" ..
        "GET /echo/b HTTP/1.1\r\nHost: x\r\n\r\n")
      local res = check_common(assert(c:response()))
      assert.equal("a", res.body)
      assert.equal("close", res.headers.connection:lower())
      c:wait_closed(1)
      assert.equal("", c.buffer)
      assert_serves(app)
    end)
  end)

  describe("headers every response carries", function()
    it("sends Date (IMF-fixdate) and Content-Length on 200, 404, 405, 500 and 400", function()
      local app = new_app()
      finally(function() app:close() end)
      app:on_error(function() end)
      app:get("/boom", function() error("boom") end)
      app:get("/empty", function() end)
      for _, case in ipairs {
        { "GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", 200 },
        { "GET /empty HTTP/1.1\r\nHost: x\r\n\r\n", 200 },
        { "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404 },
        { "DELETE /ping HTTP/1.1\r\nHost: x\r\n\r\n", 405 },
        { "GET /boom HTTP/1.1\r\nHost: x\r\n\r\n", 500 },
        { "BREW /ping HTTP/1.1\r\nHost: x\r\n\r\n", 400 },
      } do
        local c = t.connect(app)
        c:send(case[1])
        local res = assert(c:response())
        c:close()
        assert.equal(case[2], res.status, case[1])
        check_common(res)
      end
      assert_serves(app)
    end)
  end)

  describe("HEAD", function()
    it("answers with GET's headers and Content-Length, and no body", function()
      local app = new_app()
      finally(function() app:close() end)
      app:get("/doc", function(_, res) res:header("X-Doc", "1"):send(("d"):rep(1234)) end)
      local c = t.connect(app)
      c:send("GET /doc HTTP/1.1\r\nHost: x\r\n\r\n")
      local get = check_common(assert(c:response()))
      c:send("HEAD /doc HTTP/1.1\r\nHost: x\r\n\r\n")
      local head = assert(c:response { head = true })
      check_common(get)
      assert.equal(200, head.status)
      assert.equal("1234", head.headers["content-length"])
      for name, value in pairs(get.headers) do
        if name ~= "date" then assert.equal(value, head.headers[name], name) end
      end
      for name in pairs(head.headers) do assert.is_truthy(get.headers[name], name) end
      t.sleep(50)
      assert.equal("", c.buffer, "HEAD response had a body")
      -- The connection is still in step: the next answer parses.
      c:send("GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equal("after", assert(c:response()).body)
      -- A HEAD to a missing path: 404 with its length, still no body.
      c:send("HEAD /missing HTTP/1.1\r\nHost: x\r\n\r\n")
      local missing = assert(c:response { head = true })
      assert.equal(404, missing.status)
      assert.equal(tostring(#"not found\n"), missing.headers["content-length"])
      c:send("GET /echo/again HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equal("again", assert(c:response()).body)
      c:close()
      assert_serves(app)
    end)
  end)

  describe("request bodies", function()
    it("assembles a chunked request body sent in pieces", function()
      local app = new_app()
      finally(function() app:close() end)
      local c = t.connect(app)
      c:send("POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
      t.sleep(20)
      c:send("5\r\nhello\r\n")
      t.sleep(20)
      c:send("1;ext=1\r\n \r\n10\r\n")
      t.sleep(20)
      c:send("0123456789abcdef\r\n0\r\n\r\n")
      local res = check_common(assert(c:response()))
      assert.equal(200, res.status)
      assert.equal("hello 0123456789abcdef", res.body)
      -- and a Content-Length body on the same connection
      c:send("POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
      assert.equal("abc", assert(c:response()).body)
      c:close()
      assert_serves(app)
    end)

    it("sends 100 Continue before the final response to Expect: 100-continue", function()
      local app = new_app()
      finally(function() app:close() end)
      local c = t.connect(app)
      c:send("POST /body HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
      assert.is_truthy(c:read_until(CONTINUE, 1))
      assert.equal(1, c.buffer:find(CONTINUE, 1, true))
      t.sleep(50)
      -- (t.parse_response cannot parse a response without header lines)
      assert.equal(CONTINUE, c.buffer, "final response before the body was sent")
      c.buffer = ""
      c:send("data")
      local res = check_common(assert(c:response()))
      assert.equal(200, res.status)
      assert.equal("data", res.body)
      c:close()
      assert_serves(app)
    end)

    it("sends 100 Continue to Expect: 100-continue with a chunked body", function()
      local app = new_app()
      finally(function() app:close() end)
      local c = t.connect(app)
      c:send("POST /body HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" ..
        "Transfer-Encoding: chunked\r\n\r\n")
      local got = pcall(c.read_until, c, CONTINUE, 0.5)
      assert.is_true(got, "no 100 Continue for a chunked body")
      assert.equal(1, c.buffer:find(CONTINUE, 1, true))
      c.buffer = c.buffer:sub(#CONTINUE + 1)
      c:send("4\r\ndata\r\n0\r\n\r\n")
      local res = assert(c:response())
      assert.equal(200, res.status)
      assert.equal("data", res.body)
      c:close()
      assert_serves(app)
    end)
  end)

  describe("targets and default answers", function()
    it("accepts an absolute-form target", function()
      local app = new_app()
      finally(function() app:close() end)
      local seen
      app:get("/abs/:x", function(req, res)
        seen = req
        res:send(req.params.x .. "|" .. (req.query.q or ""))
      end)
      local c = t.connect(app)
      c:send("GET http://example.com:8080/abs/one?q=2 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
      local res = check_common(assert(c:response()))
      assert.equal(200, res.status)
      assert.equal("one|2", res.body)
      assert.equal("/abs/one", seen.path)
      c:close()
      assert_serves(app)
    end)

    it("answers 404 to an unknown path and 405 with Allow to a wrong method", function()
      local app = new_app()
      finally(function() app:close() end)
      app:put("/thing", function(_, res) res:send("put") end)
      local res = check_common(t.get(app, "/no/such/thing"))
      assert.equal(404, res.status)
      res = check_common(t.post(app, "/ping", "x"))
      assert.equal(405, res.status)
      assert.equal("GET, HEAD", res.headers.allow)
      res = check_common(t.delete(app, "/thing"))
      assert.equal(405, res.status)
      assert.equal("PUT", res.headers.allow)
      assert_serves(app)
    end)

    it("answers 500 when a handler raises, logs it, and keeps serving", function()
      local app = new_app()
      finally(function() app:close() end)
      local logged = {}
      app:on_error(function(message) logged[#logged + 1] = message end)
      app:get("/boom", function() error("kaboom") end)
      local c = t.connect(app)
      c:send("GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
      local res = check_common(assert(c:response()))
      assert.equal(500, res.status)
      assert.equal(1, #logged)
      assert.is_truthy(logged[1]:find("kaboom", 1, true))
      -- the same connection goes on
      c:send("GET /echo/next HTTP/1.1\r\nHost: x\r\n\r\n")
      res = assert(c:response())
      assert.equal(200, res.status)
      assert.equal("next", res.body)
      c:close()
      assert_serves(app)
    end)
  end)

  describe("large output", function()
    it("delivers a 5 MiB response whole", function()
      local app = new_app()
      finally(function() app:close() end)
      local big = ("0123456789abcdef"):rep(5 * 1024 * 1024 // 16)
      app:get("/big", function(_, res) res:send(big) end)
      local c = t.connect(app)
      c:send("GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/tail HTTP/1.1\r\nHost: x\r\n\r\n")
      local res = check_common(assert(c:response { timeout = 5 }))
      assert.equal(200, res.status)
      assert.equal(#big, #res.body)
      assert.is_true(res.body == big)
      assert.equal("tail", assert(c:response()).body)
      c:close()
      assert_serves(app)
    end)

    it("stops reading a pipelining client that does not read, and still serves others", function()
      local app = new_app()
      finally(function() app:close() end)
      local calls = 0
      local chunk = ("y"):rep(64 * 1024)
      app:get("/n/:i", function(req, res)
        calls = calls + 1
        res:header("X-I", req.params.i):send(chunk)
      end)
      local n = 2000
      local parts = {}
      for i = 1, n do parts[i] = "GET /n/" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n" end
      local c = t.connect(app)
      c.socket:pause() -- read nothing
      c:send(table.concat(parts))
      t.sleep(300)
      local handled_while_paused = calls
      assert.equal(1, app:connections())
      assert.is_true(handled_while_paused < n / 4,
        ("the server answered %d of %d requests to a client that reads nothing")
          :format(handled_while_paused, n))
      -- another client is served promptly
      local started = core.now()
      assert_serves(app)
      assert.is_true(core.now() - started < 500, "another client waited")
      assert.equal(handled_while_paused, calls)
      -- now read everything, in order
      c.socket:resume()
      for i = 1, n do
        local res = assert(c:response { timeout = 5 }, "closed before response " .. i)
        assert.equal(200, res.status)
        assert.equal(tostring(i), res.headers["x-i"])
        assert.equal(#chunk, #res.body)
      end
      assert.equal(n, calls)
      c:close()
      assert_serves(app)
    end)
  end)

  describe("listeners", function()
    it("serves over IPv6 on ::1", function()
      local app = new_app()
      finally(function() app:close() end)
      local port = assert(app:listen { host = "::1", port = 0 })
      assert.is_true(port > 0)
      local c = t.connect(port, "::1")
      c:send("GET /echo/six HTTP/1.1\r\nHost: [::1]\r\n\r\n")
      local res = check_common(assert(c:response()))
      assert.equal(200, res.status)
      assert.equal("six", res.body)
      c:close()
      assert_serves(app, port, "::1")
    end)

    it("serves on every listener of one app", function()
      local app = new_app()
      finally(function() app:close() end)
      local p1 = assert(app:listen { host = "127.0.0.1", port = 0 })
      local p2 = assert(app:listen { host = "127.0.0.1", port = 0 })
      local p6 = assert(app:listen { host = "::1", port = 0 })
      assert.are_not.equal(p1, p2)
      assert_serves(app, p1)
      assert_serves(app, p2)
      assert_serves(app, p6, "::1")
      -- open on all three at once
      local cs = { t.connect(p1), t.connect(p2), t.connect(p6, "::1") }
      for i, c in ipairs(cs) do c:send("GET /echo/l" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n") end
      for i, c in ipairs(cs) do
        assert.equal("l" .. i, assert(c:response()).body)
        c:close()
      end
    end)

    it("app:close() stops accepting and closes an open keep-alive connection", function()
      local app = new_app()
      finally(function() app:close() end)
      local port = t.port(app)
      local c = t.connect(app)
      c:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equal("pong", assert(c:response()).body)
      app:close()
      c:wait_closed(1)
      assert.equal("", c.buffer)
      local ok, other = pcall(t.connect, port)
      if ok then
        -- accepted by nobody: it must not be answered and must close
        other:send("GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        other:wait_closed(1)
        assert.equal("", other.buffer)
      else
        assert.is_truthy(tostring(other):find("connect failed", 1, true), other)
      end
      t.wait(function() return app:connections() == 0 end, 1, "no connections")
    end)

    it("listen on a port in use returns nil and EADDRINUSE", function()
      local app = new_app()
      local other = new_app()
      finally(function() app:close(); other:close() end)
      local port = t.port(app)
      local p, err = other:listen { host = "127.0.0.1", port = port }
      assert.is_nil(p)
      assert.is_string(err)
      assert.is_truthy(err:find("EADDRINUSE", 1, true), err)
      p, err = app:listen { host = "127.0.0.1", port = port }
      assert.is_nil(p)
      assert.is_truthy(err:find("EADDRINUSE", 1, true), err)
      -- the failed listens did not disturb the working one
      assert_serves(app)
      -- and the other app can still listen elsewhere
      local p2 = assert(other:listen { host = "127.0.0.1", port = 0 })
      assert_serves(other, p2)
    end)
  end)
end)
