-- herald.request and herald.response: the pure helpers, then the request a
-- handler sees and the response it builds, over a real server.
local herald = require "herald"
local request = require "herald.request"
local t = require "herald.test"
local cjson = require "cjson"

-- A fresh app, closed when the current test ends. Errors the app logs are
-- collected in app.logged (message, req) instead of going to stderr.
local function new_app(opts)
  local app = herald.new(opts)
  app.logged = {}
  app:on_error(function(message, req) app.logged[#app.logged + 1] = { message = message, req = req } end)
  finally(function() app:close() end)
  return app
end

-- One raw request on a new connection; returns the response.
local function raw(app, bytes, opts)
  local c = t.connect(app)
  finally(function() c:close() end)
  c:send(bytes)
  return assert(c:response(opts))
end

describe("request.parse_query", function()
  local parse = request.parse_query

  it("decodes pairs", function()
    assert.same({ a = "1", b = "x y" }, parse("a=1&b=x%20y"))
    assert.same({}, parse(""))
    assert.same({ a = "b=c" }, parse("a=b=c"))
  end)

  it("keeps the first value of a repeated key", function()
    assert.same({ a = "1", b = "2" }, parse("a=1&b=2&a=3&a="))
    assert.same({ k = "" }, parse("k&k=late"))
  end)

  it("reads '+' as a space, in keys and values, and %2B as '+'", function()
    assert.same({ q = "a b+c" }, parse("q=a+b%2Bc"))
    assert.same({ ["my key"] = "v" }, parse("my+key=v"))
  end)

  it("decodes %XX in keys and values, either case", function()
    assert.same({ key = "✓", ["a=1"] = "2" }, parse("%6B%65%79=%E2%9C%93&a%3D1=2"))
    assert.same({ x = "/?&" }, parse("x=%2f%3F%26"))
    -- a bad escape is left as it is
    assert.same({ x = "%zz%4" }, parse("x=%zz%4"))
  end)

  it("maps a key without '=' to the empty string", function()
    assert.same({ flag = "", x = "", y = "1" }, parse("flag&x=&y=1"))
  end)

  it("skips empty keys and empty pairs", function()
    assert.same({ k = "1" }, parse("=v&&k=1&"))
  end)
end)

describe("request.split_target", function()
  local split = request.split_target

  local function both(url) return { split(url) } end

  it("splits the origin form into path and query string", function()
    assert.same({ "/p", "q=1" }, both("/p?q=1"))
    assert.same({ "/p", "" }, both("/p"))
    assert.same({ "/", "" }, both("/"))
    assert.same({ "/p", "" }, both("/p?"))
    assert.same({ "/p", "a=1?b" }, both("/p?a=1?b"))
    assert.same({ "/a/b/", "x" }, both("/a/b/?x"))
  end)

  it("takes the path and query of the absolute form", function()
    assert.same({ "/p", "q=1" }, both("http://example.com/p?q=1"))
    assert.same({ "/a/b", "" }, both("HTTPS://example.com:8443/a/b"))
    assert.same({ "/", "" }, both("http://example.com"))
    assert.same({ "/", "" }, both("http://example.com/"))
  end)

  it("takes the query of an absolute form with an empty path", function()
    assert.same({ "/", "x=1" }, both("http://example.com?x=1"))
  end)

  it("accepts the asterisk form", function()
    assert.same({ "*", "" }, both("*"))
  end)

  it("returns nil for other targets", function()
    for _, bad in ipairs { "", "p", "example.com/p", "ftp://host/p", "?q=1", "**", "http:/x" } do
      assert.is_nil(split(bad), bad)
    end
  end)

  it("strips a fragment", function()
    assert.same({ "/p", "" }, both("/p#frag"))
    assert.same({ "/p", "q=1" }, both("/p?q=1#frag"))
    assert.same({ "/p", "" }, both("/p#frag?not=query"))
    assert.same({ "/p", "" }, both("http://h/p#f?x"))
  end)
end)

describe("the request a handler sees", function()
  it("has method, url, path, query, params, body and version", function()
    local app = new_app()
    local seen
    app:post("/items/:id", function(req, res)
      seen = {
        method = req.method, url = req.url, path = req.path, query_string = req.query_string,
        query = req.query, params = req.params, body = req.body, version = req.version,
      }
      res:send("ok")
    end)
    local res = t.post(app, "/items/a%20b?a=1&a=2&b=x+y&flag", "a\0b\r\nc")
    assert.equal(200, res.status)
    assert.same({
      method = "POST",
      url = "/items/a%20b?a=1&a=2&b=x+y&flag",
      path = "/items/a%20b",
      query_string = "a=1&a=2&b=x+y&flag",
      query = { a = "1", b = "x y", flag = "" },
      params = { id = "a b" },
      body = "a\0b\r\nc",
      version = "1.1",
    }, seen)
  end)

  it("has an empty body and query when there are none", function()
    local app = new_app()
    local seen
    app:get("/", function(req, res) seen = req; res:send() end)
    t.get(app, "/")
    assert.equal("", seen.body)
    assert.same({}, seen.query)
    assert.same({}, seen.params)
    assert.equal("GET", seen.method)
  end)

  it("names each method", function()
    local app = new_app()
    local seen = {}
    local function record(req, res) seen[#seen + 1] = req.method; res:send() end
    app:get("/m", record)
    app:post("/m", record)
    app:put("/m", record)
    app:delete("/m", record)
    app:patch("/m", record)
    app:route("OPTIONS", "/m", record)
    t.get(app, "/m")
    t.post(app, "/m", "")
    t.put(app, "/m", "")
    t.delete(app, "/m")
    t.request(app, { method = "PATCH", path = "/m", body = "" })
    t.request(app, { method = "OPTIONS", path = "/m" })
    t.head(app, "/m")
    assert.same({ "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD" }, seen)
  end)

  it("app:options adds an OPTIONS route", function()
    local app = new_app()
    -- the method, not a table of settings under the same name
    assert.equal("function", type(app.options))
    local seen
    app:options("/o", function(req, res) seen = req.method; res:header("Allow", "GET"):send() end)
    local res = t.request(app, { method = "OPTIONS", path = "/o" })
    assert.equal(200, res.status)
    assert.equal("GET", res.headers.allow)
    assert.equal("OPTIONS", seen)
  end)

  it("reads HTTP/1.0 requests", function()
    local app = new_app()
    local version
    app:get("/", function(req, res) version = req.version; res:send("old") end)
    local res = raw(app, "GET / HTTP/1.0\r\n\r\n")
    assert.equal("old", res.body)
    assert.equal("1.0", version)
  end)

  it("reads headers case-insensitively", function()
    local app = new_app()
    local got, names
    app:get("/", function(req, res)
      got = { req.headers["X-Foo"], req.headers["x-foo"], req.headers["X-FOO"], req.headers["Host"] }
      names = {}
      for k, v in pairs(req.headers) do names[k] = v end
      res:send()
    end)
    t.get(app, "/", { ["X-Foo"] = "Bar Baz", Host = "example.test" })
    assert.same({ "Bar Baz", "Bar Baz", "Bar Baz", "example.test" }, got)
    -- stored under lower-case names, values as sent
    assert.equal("Bar Baz", names["x-foo"])
    assert.equal("example.test", names.host)
    assert.is_nil(names["X-Foo"])
  end)

  it("joins repeated headers with ', '", function()
    local app = new_app()
    local dup, single
    app:get("/", function(req, res) dup = req.headers["x-dup"]; single = req.headers["X-One"]; res:send() end)
    raw(app, "GET / HTTP/1.1\r\nHost: x\r\nX-Dup: a\r\nX-One: 1\r\nx-dup: b\r\nX-DUP: c, d\r\n\r\n")
    assert.equal("a, b, c, d", dup)
    assert.equal("1", single)
  end)

  it("gives the peer's address and port", function()
    local app = new_app()
    local ip, port
    app:get("/", function(req, res) ip, port = req:peer(); res:send() end)
    t.get(app, "/")
    assert.equal("127.0.0.1", ip)
    assert.equal("integer", math.type(port))
    assert.is_true(port > 0 and port < 65536)
    assert.are_not.equal(t.port(app), port)
  end)

  it("answers 400 for a target herald does not serve", function()
    local app = new_app()
    local called = false
    app:get("/*", function(_, res) called = true; res:send() end)
    local res = raw(app, "GET http://example.com/p HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, res.status) -- the absolute form is served
    assert.is_true(called)
    called = false
    res = raw(app, "GET ftp://example.com/p HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(400, res.status)
    assert.is_false(called)
  end)
end)

describe("the response a handler builds", function()
  it("chains status, header and send", function()
    local app = new_app()
    local returned = {}
    app:get("/", function(_, res)
      local a = res:status(201)
      local b = a:header("X-A", "1")
      returned = { a == res, b == res, b:send("made") }
    end)
    local res = t.get(app, "/")
    assert.same({ true, true, true }, returned)
    assert.equal(201, res.status)
    assert.equal("1", res.headers["x-a"])
    assert.equal("made", res.body)
    assert.equal("4", res.headers["content-length"])
    assert.equal("text/plain; charset=utf-8", res.headers["content-type"])
  end)

  it("replaces a header of the same name, whatever its case", function()
    local app = new_app()
    app:get("/", function(_, res) res:header("X-A", "1"):header("x-a", "2"):send("x") end)
    local c = t.connect(app)
    finally(function() c:close() end)
    c:send(t.encode_request("GET", "/"))
    local head = c:read_until("^(.-\r\n)\r\n")
    local _, count = head:lower():gsub("\r\nx%-a:", "")
    assert.equal(1, count)
    assert.matches("\r\nx%-a: 2\r\n", head)
  end)

  it("sends a header once per item of a list, numbers as text", function()
    local app = new_app()
    app:get("/", function(_, res)
      res:header("Set-Cookie", { "a=1", "b=2" }):header("X-N", 42):send()
    end)
    local c = t.connect(app)
    finally(function() c:close() end)
    c:send(t.encode_request("GET", "/"))
    local head = c:read_until("^(.-\r\n)\r\n")
    assert.matches("\r\nSet%-Cookie: a=1\r\n", head)
    assert.matches("\r\nSet%-Cookie: b=2\r\n", head)
    assert.matches("\r\nX%-N: 42\r\n", head)
  end)

  it("keeps a Content-Type the handler set", function()
    local app = new_app()
    app:get("/", function(_, res) res:header("Content-Type", "text/csv"):send("a,b") end)
    local res = t.get(app, "/")
    assert.equal("text/csv", res.headers["content-type"])
    assert.equal("a,b", res.body)
  end)

  it("sends an empty body without a Content-Type", function()
    local app = new_app()
    app:get("/", function(_, res) res:send() end)
    local res = t.get(app, "/")
    assert.equal(200, res.status)
    assert.equal("0", res.headers["content-length"])
    assert.is_nil(res.headers["content-type"])
    assert.equal("", res.body)
  end)

  it("sends JSON with content-type application/json", function()
    local app = new_app()
    app:get("/", function(_, res) res:status(202):json({ a = 1, list = { 1, 2, "x" }, s = "é" }) end)
    app:get("/typed", function(_, res)
      res:header("Content-Type", "application/vnd.herald+json"):json({ ok = true })
    end)
    local res = t.get(app, "/")
    assert.equal(202, res.status)
    assert.equal("application/json", res.headers["content-type"])
    assert.same({ a = 1, list = { 1, 2, "x" }, s = "é" }, cjson.decode(res.body))
    res = t.get(app, "/typed")
    assert.equal("application/vnd.herald+json", res.headers["content-type"])
    assert.same({ ok = true }, cjson.decode(res.body))
  end)

  it("gives a handler that returns without sending 200 with an empty body", function()
    local app = new_app()
    app:get("/", function() end)
    app:get("/set", function(_, res) res:status(202):header("X-Kept", "yes") end)
    local res = t.get(app, "/")
    assert.equal(200, res.status)
    assert.equal("", res.body)
    assert.equal("0", res.headers["content-length"])
    res = t.get(app, "/set")
    assert.equal(202, res.status)
    assert.equal("yes", res.headers["x-kept"])
    assert.equal("", res.body)
    assert.same({}, app.logged)
  end)

  it("validates arguments, naming the fault", function()
    local app = new_app()
    local errors = {}
    local function try(label, fn)
      local ok, err = pcall(fn)
      errors[label] = ok and "no error" or tostring(err)
    end
    app:get("/", function(_, res)
      try("name with space", function() res:header("Bad Name", "x") end)
      try("empty name", function() res:header("", "x") end)
      try("nil name", function() res:header(nil, "x") end)
      try("name with colon", function() res:header("X-A:", "x") end)
      try("CRLF value", function() res:header("X-A", "a\r\nInjected: 1") end)
      try("LF value", function() res:header("X-A", "a\nb") end)
      try("CR value", function() res:header("X-A", "a\rb") end)
      try("NUL value", function() res:header("X-A", "a\0b") end)
      try("boolean value", function() res:header("X-A", true) end)
      try("bad list item", function() res:header("X-A", { "fine", "bad\n" }) end)
      try("Content-Length", function() res:header("Content-Length", "5") end)
      try("content-length", function() res:header("content-length", "5") end)
      try("Transfer-Encoding", function() res:header("Transfer-Encoding", "chunked") end)
      try("Date", function() res:header("Date", "today") end)
      try("status 99", function() res:status(99) end)
      try("status 1000", function() res:status(1000) end)
      try("status string", function() res:status("200") end)
      try("status float", function() res:status(200.5) end)
      try("status 100", function() res:status(100) end)
      try("status 999", function() res:status(999) end)
      try("send number", function() res:send(42) end)
      try("json function", function() res:json({ f = print }) end)
      res:status(200):send("still fine")
    end)
    local res = t.get(app, "/")
    assert.equal(200, res.status)
    assert.equal("still fine", res.body)
    assert.is_nil(res.headers["x-a"])
    assert.is_nil(res.headers.injected)
    local token = "header: name must be an HTTP token, got "
    local value = "header: value for X-A must be a string without CR, LF or NUL"
    local code = "status: code must be an integer from 100 to 999, got "
    local expected = {
      ["name with space"] = token .. "Bad Name",
      ["empty name"] = token,
      ["nil name"] = token .. "nil",
      ["name with colon"] = token .. "X-A:",
      ["CRLF value"] = value, ["LF value"] = value, ["CR value"] = value, ["NUL value"] = value,
      ["boolean value"] = value, ["bad list item"] = value,
      ["Content-Length"] = "header: Content-Length is set by herald",
      ["content-length"] = "header: content-length is set by herald",
      ["Transfer-Encoding"] = "header: Transfer-Encoding is set by herald",
      ["Date"] = "header: Date is set by herald",
      ["status 99"] = code .. "99",
      ["status 1000"] = code .. "1000",
      ["status string"] = code .. "200",
      ["status float"] = code .. "200.5",
      ["status 100"] = "no error",
      ["status 999"] = "no error",
      ["send number"] = "send: body must be a string, got number",
      ["json function"] = "json: cannot encode",
    }
    for label, text in pairs(expected) do
      assert.is_not_nil(errors[label], label)
      assert.matches(text, errors[label], 1, true)
      if text ~= "no error" then
        -- raised at the handler's line
        assert.matches("^[^:]*request_response_spec%.lua:%d+: ", errors[label], nil, false)
      end
    end
  end)

  describe("a handler that raises", function()
    local cases = {
      { "a bad header name", function(res) res:header("Bad Name", "x") end,
        "header: name must be an HTTP token" },
      { "CR/LF in a header value", function(res) res:header("X-A", "v\r\nX-Evil: 1") end,
        "must be a string without CR, LF or NUL" },
      { "setting Content-Length", function(res) res:header("Content-Length", "0") end,
        "header: Content-Length is set by herald" },
      { "a status out of range", function(res) res:status(600 * 2) end,
        "status: code must be an integer from 100 to 999, got 1200" },
      { "a plain error", function() error("boom") end, "boom" },
    }
    for _, case in ipairs(cases) do
      local label, fail, text = case[1], case[2], case[3]
      it("(" .. label .. ") gets a 500 and the error goes to on_error with a traceback", function()
        local app = new_app()
        app:get("/boom/:x", function(_, res)
          res:status(201):header("X-Before", "1")
          fail(res)
          res:send("not reached")
        end)
        local res = t.get(app, "/boom/1?q")
        assert.equal(500, res.status)
        assert.equal("internal server error\n", res.body)
        assert.is_nil(res.headers["x-before"])
        assert.equal(1, #app.logged)
        local message = app.logged[1].message
        assert.matches("GET /boom/1: ", message, 1, true)
        assert.matches(text, message, 1, true)
        assert.matches("stack traceback", message, 1, true)
        assert.matches("request_response_spec.lua", message, 1, true)
        assert.equal("/boom/1", app.logged[1].req.path)
        assert.same({ x = "1" }, app.logged[1].req.params)
      end)
    end

    it("after sending keeps the response and logs the error", function()
      local app = new_app()
      app:get("/", function(_, res) res:send("partial"); error("late") end)
      local res = t.get(app, "/")
      assert.equal(200, res.status)
      assert.equal("partial", res.body)
      assert.equal(1, #app.logged)
      assert.matches("late", app.logged[1].message, 1, true)
      assert.matches("stack traceback", app.logged[1].message, 1, true)
    end)

    it("still gets its 500 when on_error itself fails", function()
      local app = new_app()
      app:on_error(function() error("logger broke") end)
      app:get("/", function() error("first") end)
      local res = t.get(app, "/")
      assert.equal(500, res.status)
    end)
  end)

  it("on_error takes only a function", function()
    local app = new_app()
    local ok, err = pcall(app.on_error, app, "log")
    assert.is_false(ok)
    assert.matches("on_error: fn must be a function", err, 1, true)
  end)

  it("refuses to send twice, or to change a sent response", function()
    local app = new_app()
    local errors = {}
    app:get("/", function(_, res)
      res:send("one")
      for name, args in pairs { send = { "two" }, json = { {} }, status = { 201 },
        header = { "X-Late", "1" }, file = { "/etc/hostname" } } do
        local ok, err = pcall(res[name], res, table.unpack(args))
        errors[name] = not ok and err or "no error"
      end
    end)
    local res = t.get(app, "/")
    assert.equal(200, res.status)
    assert.equal("one", res.body)
    assert.is_nil(res.headers["x-late"])
    for name in pairs { send = 1, json = 1, status = 1, header = 1, file = 1 } do
      assert.matches(name .. ": the response was already sent", errors[name], 1, true)
    end
  end)

  it("sending twice without catching it logs the error and keeps the first response", function()
    local app = new_app()
    app:get("/", function(_, res) res:send("one"); res:send("two") end)
    local res = t.get(app, "/")
    assert.equal(200, res.status)
    assert.equal("one", res.body)
    assert.equal(1, #app.logged)
    assert.matches("send: the response was already sent", app.logged[1].message, 1, true)
    -- the connection is still good for another request
    local c = t.connect(app)
    finally(function() c:close() end)
    c:send(t.encode_request("GET", "/") .. t.encode_request("GET", "/"))
    assert.equal("one", assert(c:response()).body)
    assert.equal("one", assert(c:response()).body)
  end)

  it("answers HEAD with the length of the GET body and no body", function()
    local app = new_app()
    app:get("/", function(_, res) res:header("X-H", "1"):send("hello") end)
    local res = t.head(app, "/")
    assert.equal(200, res.status)
    assert.equal("5", res.headers["content-length"])
    assert.equal("1", res.headers["x-h"])
    assert.equal("", res.body)
  end)
end)

describe("files", function()
  local base, public
  local files = {
    ["index.html"] = "<h1>hi</h1>\n",
    ["style.css"] = "body { color: red }\n",
    ["app.js"] = "console.log(1)\n",
    ["data.json"] = '{"a":1}',
    ["notes.txt"] = "plain notes\n",
    ["pic.png"] = "\137PNG\r\n\26\n\0\0\0\rIHDR\0\1\0\0",
    ["logo.svg"] = "<svg/>",
    ["UPPER.HTML"] = "<p>upper</p>",
    ["noext"] = "no extension",
    ["odd.xyz"] = "unknown extension",
    ["empty.txt"] = "",
    ["..dots.txt"] = "not a parent segment",
    ["with space.txt"] = "spaced",
    ["sub/deep.txt"] = "deep down",
  }

  local function write(path, data)
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
  end

  local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

  lazy_setup(function()
    base = os.tmpname() -- a unique name: made into a folder
    os.remove(base)
    assert(os.execute("mkdir " .. quote(base)))
    public = base .. "/public"
    assert(os.execute("mkdir -p " .. quote(public .. "/sub/empty-dir")))
    for name, data in pairs(files) do write(public .. "/" .. name, data) end
    write(base .. "/secret.txt", "secret")
  end)

  lazy_teardown(function()
    if base and base:match("^/tmp/") then os.execute("rm -rf " .. quote(base)) end
  end)

  -- The response to GET / on an app whose handler calls res:file(path, opts).
  local function serve(path, opts, before)
    local app = new_app()
    app:get("/", function(_, res)
      if before then before(res) end
      res:file(path, opts)
    end)
    return t.get(app, "/"), app
  end

  describe("res:file", function()
    it("sends the file with a content type from its extension", function()
      local types = {
        ["index.html"] = "text/html; charset=utf-8",
        ["style.css"] = "text/css; charset=utf-8",
        ["app.js"] = "text/javascript; charset=utf-8",
        ["data.json"] = "application/json",
        ["notes.txt"] = "text/plain; charset=utf-8",
        ["pic.png"] = "image/png",
        ["logo.svg"] = "image/svg+xml",
        ["UPPER.HTML"] = "text/html; charset=utf-8",
        ["noext"] = "application/octet-stream",
        ["odd.xyz"] = "application/octet-stream",
        ["..dots.txt"] = "text/plain; charset=utf-8",
      }
      for name, ctype in pairs(types) do
        local res = serve(public .. "/" .. name)
        assert.equal(200, res.status, name)
        assert.equal(ctype, res.headers["content-type"], name)
        assert.equal(files[name], res.body, name)
        assert.equal(tostring(#files[name]), res.headers["content-length"], name)
      end
    end)

    it("sends an empty file", function()
      local res = serve(public .. "/empty.txt")
      assert.equal(200, res.status)
      assert.equal("", res.body)
      assert.equal("text/plain; charset=utf-8", res.headers["content-type"])
    end)

    it("keeps a Content-Type the handler set", function()
      local res = serve(public .. "/noext", nil, function(res) res:header("Content-Type", "text/x-custom") end)
      assert.equal("text/x-custom", res.headers["content-type"])
      assert.equal("no extension", res.body)
    end)

    it("answers 404 for a missing file", function()
      local res = serve(public .. "/missing.txt")
      assert.equal(404, res.status)
      assert.equal("not found\n", res.body)
    end)

    it("answers 404 for a directory", function()
      for _, dir in ipairs { public, public .. "/sub", public .. "/sub/", public .. "/sub/empty-dir" } do
        local res, app = serve(dir)
        assert.equal(404, res.status, dir)
        assert.equal("not found\n", res.body, dir)
        assert.same({}, app.logged, dir)
      end
      local res = serve("sub", { root = public })
      assert.equal(404, res.status)
    end)

    it("answers 404 for a path with a '..' segment, even to a file that exists", function()
      for _, path in ipairs { public .. "/../secret.txt", public .. "/sub/../index.html", "..", "../x" } do
        local res = serve(path)
        assert.equal(404, res.status, path)
        assert.equal("not found\n", res.body, path)
      end
      -- ".." inside a name is not a segment
      assert.equal(200, serve(public .. "/..dots.txt").status)
    end)

    it("answers 404 for a path with a NUL byte", function()
      assert.equal(404, serve(public .. "/index.html\0.png").status)
    end)

    it("takes the path below opts.root without escaping it", function()
      local res = serve("index.html", { root = public })
      assert.equal(200, res.status)
      assert.equal(files["index.html"], res.body)
      assert.equal(files["sub/deep.txt"], serve("sub/deep.txt", { root = public .. "/" }).body)
      -- a leading '/' is still below the root
      assert.equal(files["index.html"], serve("/index.html", { root = public }).body)
      assert.equal(404, serve(base .. "/secret.txt", { root = public }).status)
      assert.equal(404, serve("../secret.txt", { root = public }).status)
      assert.equal(404, serve("sub/../../secret.txt", { root = public }).status)
    end)

    it("takes only a string path", function()
      local app = new_app()
      local err
      app:get("/", function(_, res)
        local ok
        ok, err = pcall(res.file, res, 42)
        res:send(ok and "sent" or "refused")
      end)
      assert.equal("refused", t.get(app, "/").body)
      assert.matches("file: path must be a string", err, 1, true)
    end)
  end)

  describe("app:static", function()
    local app
    before_each(function()
      app = herald.new()
      app.logged = {}
      app:on_error(function(message) app.logged[#app.logged + 1] = message end)
      app:static("/assets", public)
      app:static("/trailing/", public .. "/sub")
    end)
    after_each(function() app:close() end)

    it("serves the files below dir at prefix/...", function()
      local res = t.get(app, "/assets/index.html")
      assert.equal(200, res.status)
      assert.equal("text/html; charset=utf-8", res.headers["content-type"])
      assert.equal(files["index.html"], res.body)
      res = t.get(app, "/assets/sub/deep.txt")
      assert.equal(200, res.status)
      assert.equal("deep down", res.body)
      assert.equal("spaced", t.get(app, "/assets/with%20space.txt").body)
      assert.equal("deep down", t.get(app, "/trailing/deep.txt").body)
    end)

    it("answers 404 for a missing file", function()
      local res = t.get(app, "/assets/missing.txt")
      assert.equal(404, res.status)
      assert.equal("not found\n", res.body)
    end)

    it("does not serve anything above dir", function()
      for _, path in ipairs { "/assets/../secret.txt", "/assets/%2E%2E/secret.txt",
                              "/assets/..%2Fsecret.txt", "/assets/sub/%2e%2e/%2e%2e/secret.txt" } do
        local res = t.get(app, path)
        assert.equal(404, res.status, path)
        assert.equal("not found\n", res.body, path)
      end
    end)

    it("answers 404 for a directory", function()
      for _, path in ipairs { "/assets", "/assets/", "/assets/sub", "/assets/sub/empty-dir" } do
        local res = t.get(app, path)
        assert.equal(404, res.status, path)
      end
      assert.same({}, app.logged)
    end)

    it("answers HEAD and refuses other methods", function()
      local res = t.head(app, "/assets/notes.txt")
      assert.equal(200, res.status)
      assert.equal(tostring(#files["notes.txt"]), res.headers["content-length"])
      assert.equal("", res.body)
      res = t.post(app, "/assets/notes.txt", "")
      assert.equal(405, res.status)
      assert.equal("GET, HEAD", res.headers.allow)
    end)

    it("takes only a string dir", function()
      local ok, err = pcall(app.static, app, "/x", 42)
      assert.is_false(ok)
      assert.matches("static: dir must be a string", err, 1, true)
    end)
  end)
end)
