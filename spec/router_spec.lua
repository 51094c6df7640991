-- herald.router: literal, parameter and splat segments, most-specific-wins
-- with backtracking, methods, HEAD -> GET, 405 information, argument errors.
local router = require "herald.router"
local herald = require "herald"
local t = require "herald.test"

-- A handler that can be told apart from the others by identity.
local function handler() return function() end end

-- The message of the error fn(...) raises (fails when it does not raise).
local function error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function add_error(r, method, path, h)
  return error_of(r.add, r, method, path, h)
end

-- Every ordering of list (for definition-order independence).
local function permutations(list)
  if #list <= 1 then return { list } end
  local out = {}
  for i = 1, #list do
    local rest = {}
    for j = 1, #list do if j ~= i then rest[#rest + 1] = list[j] end end
    for _, p in ipairs(permutations(rest)) do
      table.insert(p, 1, list[i])
      out[#out + 1] = p
    end
  end
  return out
end

describe("router", function()
  describe("literal routes", function()
    it("matches whole paths only", function()
      local r = router.new()
      local root, users, new = handler(), handler(), handler()
      r:add("GET", "/", root)
      r:add("GET", "/users", users)
      r:add("GET", "/users/new", new)
      local h, params = r:match("GET", "/")
      assert.equal(root, h)
      assert.same({}, params)
      h, params = r:match("GET", "/users")
      assert.equal(users, h)
      assert.same({}, params)
      assert.equal(new, (r:match("GET", "/users/new")))
      h, params = r:match("GET", "/users/new/extra")
      assert.is_nil(h)
      assert.same({}, params)
      h, params = r:match("GET", "/nope")
      assert.is_nil(h)
      assert.same({}, params)
      assert.is_nil((r:match("GET", "/user")))
    end)

    it("is case-sensitive", function()
      local r = router.new()
      r:add("GET", "/Users", handler())
      assert.is_nil((r:match("GET", "/users")))
      assert.is_not_nil((r:match("GET", "/Users")))
    end)

    it("compares percent-decoded segments", function()
      local r = router.new()
      local h = handler()
      r:add("GET", "/a%20b/c", h)
      assert.equal(h, (r:match("GET", "/a%20b/c")))
      assert.equal(h, (r:match("GET", "/a%20b/%63")))
    end)

    it("ignores empty segments in patterns and paths", function()
      local r = router.new()
      local h = handler()
      r:add("GET", "//a/", h)
      assert.equal(h, (r:match("GET", "/a")))
      assert.equal(h, (r:match("GET", "/a/")))
      assert.equal(h, (r:match("GET", "//a//")))
      -- "//a/" and "/a" are the same route
      assert.matches("defined twice", add_error(r, "GET", "/a", handler()), 1, true)
      local r2 = router.new()
      local root = handler()
      r2:add("GET", "/", root)
      assert.equal(root, (r2:match("GET", "//")))
      assert.matches("defined twice", add_error(r2, "GET", "///", handler()), 1, true)
    end)
  end)

  describe(":name parameters", function()
    it("captures one segment each", function()
      local r = router.new()
      local one, two = handler(), handler()
      r:add("GET", "/users/:id", one)
      r:add("GET", "/users/:id/posts/:post_id", two)
      local h, params = r:match("GET", "/users/42")
      assert.equal(one, h)
      assert.same({ id = "42" }, params)
      h, params = r:match("GET", "/users/7/posts/abc")
      assert.equal(two, h)
      assert.same({ id = "7", post_id = "abc" }, params)
    end)

    it("does not match an empty or a missing segment", function()
      local r = router.new()
      r:add("GET", "/users/:id", handler())
      assert.is_nil((r:match("GET", "/users")))
      assert.is_nil((r:match("GET", "/users/")))
      assert.is_nil((r:match("GET", "/users/1/2")))
    end)

    it("percent-decodes the value, %2F staying inside the parameter", function()
      local r = router.new()
      local h = handler()
      r:add("GET", "/users/:id", h)
      local found, params = r:match("GET", "/users/J%C3%BCrgen%20X")
      assert.equal(h, found)
      assert.same({ id = "Jürgen X" }, params)
      found, params = r:match("GET", "/users/a%2Fb")
      assert.equal(h, found)
      assert.same({ id = "a/b" }, params)
      found, params = r:match("GET", "/users/a%2fb%3F%25")
      assert.equal(h, found)
      assert.same({ id = "a/b?%" }, params)
      -- an undecodable escape stays as it is
      assert.same({ id = "%zz" }, select(2, r:match("GET", "/users/%zz")))
    end)

    it("returns a fresh params table on every match", function()
      local r = router.new()
      r:add("GET", "/u/:id", handler())
      local _, p1 = r:match("GET", "/u/1")
      local _, p2 = r:match("GET", "/u/2")
      assert.are_not.equal(p1, p2)
      assert.same({ id = "1" }, p1)
      assert.same({ id = "2" }, p2)
    end)
  end)

  describe("* splats", function()
    it("captures the rest of the path as params.splat", function()
      local r = router.new()
      local h = handler()
      r:add("GET", "/static/*", h)
      local found, params = r:match("GET", "/static/css/site.css")
      assert.equal(h, found)
      assert.same({ splat = "css/site.css" }, params)
      assert.same({ splat = "a" }, select(2, r:match("GET", "/static/a")))
      -- empty segments are dropped from the rest too
      assert.same({ splat = "a/b" }, select(2, r:match("GET", "/static//a//b/")))
    end)

    it("matches the empty rest", function()
      local r = router.new()
      local h = handler()
      r:add("GET", "/static/*", h)
      local found, params = r:match("GET", "/static")
      assert.equal(h, found)
      assert.same({ splat = "" }, params)
      found, params = r:match("GET", "/static/")
      assert.equal(h, found)
      assert.same({ splat = "" }, params)
      assert.is_nil((r:match("GET", "/")))
      assert.is_nil((r:match("GET", "/staticx")))
    end)

    it("takes a name: *rest", function()
      local r = router.new()
      local h = handler()
      r:add("GET", "/files/*rest", h)
      local found, params = r:match("GET", "/files/a/b/c.txt")
      assert.equal(h, found)
      assert.same({ rest = "a/b/c.txt" }, params)
      assert.same({ rest = "" }, select(2, r:match("GET", "/files")))
    end)

    it("at the root matches every path", function()
      local r = router.new()
      local h = handler()
      r:add("GET", "/*", h)
      assert.same({ splat = "" }, select(2, r:match("GET", "/")))
      assert.same({ splat = "x/y/z" }, select(2, r:match("GET", "/x/y/z")))
      assert.equal(h, (r:match("GET", "/x")))
    end)

    it("follows parameters and percent-decodes its segments", function()
      local r = router.new()
      r:add("GET", "/u/:id/*", handler())
      assert.same({ id = "9", splat = "a b/c" }, select(2, r:match("GET", "/u/9/a%20b/c")))
      assert.same({ id = "9", splat = "" }, select(2, r:match("GET", "/u/9")))
    end)
  end)

  describe("most specific route wins", function()
    -- Defines routes in every order, and checks each case { path, pattern
    -- expected to serve it, params expected } against each order.
    local function check_every_order(routes, cases)
      for _, order in ipairs(permutations(routes)) do
        local r = router.new()
        local handlers = {}
        for _, pattern in ipairs(order) do
          handlers[pattern] = handler()
          r:add("GET", pattern, handlers[pattern])
        end
        local label = table.concat(order, " ")
        for _, case in ipairs(cases) do
          local h, params = r:match("GET", case[1])
          assert.equal(handlers[case[2]], h, label .. " " .. case[1])
          assert.same(case[3], params, label .. " " .. case[1])
        end
      end
    end

    it("literal > parameter > splat whatever the definition order", function()
      check_every_order({ "/u/*", "/u/:id", "/u/me" }, {
        { "/u/me", "/u/me", {} },
        { "/u/42", "/u/:id", { id = "42" } },
        { "/u/42/x", "/u/*", { splat = "42/x" } },
        { "/u", "/u/*", { splat = "" } },
      })
    end)

    it("backtracks when the literal branch fails deeper", function()
      check_every_order({ "/a/b/x", "/a/:p/c", "/a/*" }, {
        { "/a/b/x", "/a/b/x", {} },
        { "/a/b/c", "/a/:p/c", { p = "b" } },
        -- neither the literal nor the parameter branch: the splat, without
        -- the parameter the failed branch had captured
        { "/a/b/d", "/a/*", { splat = "b/d" } },
        { "/a/z/c/more", "/a/*", { splat = "z/c/more" } },
      })
    end)

    it("prefers a literal to a parameter at the first segment too", function()
      local r = router.new()
      local lit, param = handler(), handler()
      r:add("GET", "/:a/:b", param)
      r:add("GET", "/x/:b", lit)
      assert.same({ b = "y" }, select(2, r:match("GET", "/x/y")))
      assert.equal(lit, (r:match("GET", "/x/y")))
      assert.equal(param, (r:match("GET", "/w/y")))
      assert.same({ a = "w", b = "y" }, select(2, r:match("GET", "/w/y")))
    end)

    it("falls through to a less specific route that has the method", function()
      local r = router.new()
      local post_me, get_id = handler(), handler()
      r:add("POST", "/u/me", post_me)
      r:add("GET", "/u/:id", get_id)
      local h, params = r:match("GET", "/u/me")
      assert.equal(get_id, h)
      assert.same({ id = "me" }, params)
      assert.equal(post_me, (r:match("POST", "/u/me")))
    end)
  end)

  describe("methods", function()
    it("keeps one handler per method on a path", function()
      local r = router.new()
      local get, post, delete = handler(), handler(), handler()
      r:add("GET", "/items", get)
      r:add("POST", "/items", post)
      r:add("DELETE", "/items", delete)
      assert.equal(get, (r:match("GET", "/items")))
      assert.equal(post, (r:match("POST", "/items")))
      assert.equal(delete, (r:match("DELETE", "/items")))
    end)

    it("serves HEAD with the GET handler, an explicit HEAD handler first", function()
      local r = router.new()
      local get, head = handler(), handler()
      r:add("GET", "/a", get)
      r:add("GET", "/b/:id", get)
      r:add("HEAD", "/b/:id", head)
      assert.equal(get, (r:match("HEAD", "/a")))
      assert.equal(head, (r:match("HEAD", "/b/1")))
      assert.same({ id = "1" }, select(2, r:match("HEAD", "/b/1")))
      assert.equal(get, (r:match("GET", "/b/1")))
    end)

    it("does not serve GET with a HEAD handler", function()
      local r = router.new()
      r:add("HEAD", "/only-head", handler())
      local h, allowed = r:match("GET", "/only-head")
      assert.is_nil(h)
      assert.same({ "HEAD" }, allowed)
    end)

    it("returns nil and the allowed methods, sorted, when the path matches", function()
      local r = router.new()
      r:add("PUT", "/x", handler())
      r:add("POST", "/x", handler())
      local h, allowed = r:match("GET", "/x")
      assert.is_nil(h)
      assert.same({ "POST", "PUT" }, allowed)
    end)

    it("lists HEAD among the allowed methods when GET is there, once", function()
      local r = router.new()
      r:add("GET", "/g", handler())
      r:add("GET", "/gh", handler())
      r:add("HEAD", "/gh", handler())
      r:add("DELETE", "/gh", handler())
      assert.same({ "GET", "HEAD" }, select(2, r:match("POST", "/g")))
      assert.same({ "DELETE", "GET", "HEAD" }, select(2, r:match("POST", "/gh")))
    end)

    it("collects the allowed methods of every route the path matches", function()
      local r = router.new()
      r:add("GET", "/u/:id", handler())
      r:add("DELETE", "/u/*", handler())
      r:add("PATCH", "/u/me", handler())
      assert.same({ "DELETE", "GET", "HEAD", "PATCH" }, select(2, r:match("POST", "/u/me")))
      assert.same({ "DELETE", "GET", "HEAD" }, select(2, r:match("POST", "/u/1")))
      assert.same({ "DELETE" }, select(2, r:match("POST", "/u/1/2")))
    end)

    it("returns an empty list when no route matches the path", function()
      local r = router.new()
      r:add("GET", "/a", handler())
      local h, allowed = r:match("GET", "/b")
      assert.is_nil(h)
      assert.same({}, allowed)
      assert.same({}, select(2, router.new():match("GET", "/")))
    end)
  end)

  describe("route errors", function()
    it("rejects a method that is not an upper-case name", function()
      for _, bad in ipairs { "get", "", "G ET", 42 } do
        assert.matches("route: method must be an upper-case HTTP method name, got " .. tostring(bad),
          add_error(router.new(), bad, "/", handler()), 1, true)
      end
      assert.matches("method must be", add_error(router.new(), nil, "/", handler()), 1, true)
    end)

    it("rejects a path that does not start with '/'", function()
      for _, bad in ipairs { "users", "", " /x", "*" } do
        assert.matches("route: path must be a string starting with '/', got " .. bad,
          add_error(router.new(), "GET", bad, handler()), 1, true)
      end
      assert.matches("path must be a string", add_error(router.new(), "GET", nil, handler()), 1, true)
      assert.matches("path must be a string", add_error(router.new(), "GET", 12, handler()), 1, true)
    end)

    it("rejects a handler that is not callable", function()
      for _, bad in ipairs { "f", 1, {}, true } do
        assert.matches("route: handler must be a function",
          add_error(router.new(), "GET", "/", bad), 1, true)
      end
      assert.matches("handler must be a function", add_error(router.new(), "GET", "/", nil), 1, true)
      -- a callable table is a handler
      local r = router.new()
      local callable = setmetatable({}, { __call = function() end })
      r:add("GET", "/c", callable)
      assert.equal(callable, (r:match("GET", "/c")))
    end)

    it("rejects a route defined twice", function()
      local r = router.new()
      local first = handler()
      r:add("GET", "/users/:id", first)
      assert.matches("route: GET /users/:id is defined twice",
        add_error(r, "GET", "/users/:id", handler()), 1, true)
      assert.equal(first, (r:match("GET", "/users/1")))
      r:add("POST", "/users/:id", handler()) -- another method is another route
    end)

    it("rejects '*' anywhere but last", function()
      assert.matches("route: '*' must be the last segment of /a/*/b",
        add_error(router.new(), "GET", "/a/*/b", handler()), 1, true)
      assert.matches("'*' must be the last segment of /*rest/x",
        add_error(router.new(), "GET", "/*rest/x", handler()), 1, true)
    end)

    it("rejects a bad parameter name", function()
      assert.matches("route: bad parameter name in /u/:",
        add_error(router.new(), "GET", "/u/:", handler()), 1, true)
      assert.matches("bad parameter name in /u/:1x",
        add_error(router.new(), "GET", "/u/:1x", handler()), 1, true)
      assert.matches("bad parameter name in /u/:a-b",
        add_error(router.new(), "GET", "/u/:a-b", handler()), 1, true)
    end)

    it("rejects a parameter named differently from another route's at the same place", function()
      local r = router.new()
      r:add("GET", "/u/:id", handler())
      r:add("GET", "/u/:id/posts", handler()) -- the same name is fine
      local err = add_error(r, "POST", "/u/:name", handler())
      assert.matches("/u/:name names parameter ':name' where another route has ':id'", err, 1, true)
      -- the earlier routes still capture :id
      assert.same({ id = "3" }, select(2, r:match("GET", "/u/3")))
      assert.is_nil((r:match("POST", "/u/3")))
    end)

    it("rejects a splat named differently from another route's at the same place", function()
      local r = router.new()
      r:add("GET", "/files/*path", handler())
      local ok, err = pcall(r.add, r, "POST", "/files/*rest", handler())
      -- whatever happens, the GET route keeps its own name for the rest
      assert.same({ path = "a/b" }, select(2, r:match("GET", "/files/a/b")))
      assert.is_false(ok, "a conflicting splat name must be an error, as for :params")
      assert.matches("/files/*rest names splat '*rest' where another route has '*path'", err, 1, true)
      -- "*" is "*splat": the same name
      r:add("GET", "/any/*", handler())
      r:add("POST", "/any/*splat", handler())
      assert.matches("where another route has '*splat'", add_error(r, "PUT", "/any/*x", handler()), 1, true)
    end)

    it("blames the caller of app:get / app:route", function()
      local app = herald.new()
      finally(function() app:close() end)
      local err = error_of(function() app:get("nope", handler()) end)
      assert.matches("^[^:]*router_spec%.lua:%d+: route: path must be", err)
      err = error_of(function() app:route("get", "/", handler()) end)
      assert.matches("^[^:]*router_spec%.lua:%d+: route: method must be", err)
      err = error_of(function() app:post("/", "handler") end)
      assert.matches("^[^:]*router_spec%.lua:%d+: route: handler must be", err)
    end)
  end)

  describe("through an app", function()
    local app
    before_each(function()
      app = herald.new()
      app:get("/hello/:name", function(req, res) res:send("hello " .. req.params.name) end)
        :post("/items", function(_, res) res:status(201):send("made") end)
        :route("PUT", "/items", function(_, res) res:send("put") end)
      app:get("/files/*", function(req, res) res:send("file " .. req.params.splat) end)
      app:get("/files/readme", function(_, res) res:send("readme") end)
    end)
    after_each(function() app:close() end)

    it("dispatches to the most specific route with params", function()
      local res = t.get(app, "/hello/w%C3%B6rld")
      assert.equal(200, res.status)
      assert.equal("hello wörld", res.body)
      assert.equal("readme", t.get(app, "/files/readme").body)
      assert.equal("file readme/x", t.get(app, "/files/readme/x").body)
      assert.equal("file ", t.get(app, "/files").body)
      local made = t.post(app, "/items", "")
      assert.equal(201, made.status)
      assert.equal("made", made.body)
      assert.equal("put", t.put(app, "/items", "x").body)
    end)

    it("answers 404 when no route matches", function()
      local res = t.get(app, "/nothing/here")
      assert.equal(404, res.status)
      assert.equal("not found\n", res.body)
      assert.is_nil(res.headers.allow)
    end)

    it("answers 405 with an Allow header", function()
      local res = t.get(app, "/items")
      assert.equal(405, res.status)
      assert.equal("POST, PUT", res.headers.allow)
      assert.equal("method not allowed\n", res.body)
      res = t.delete(app, "/hello/x")
      assert.equal(405, res.status)
      assert.equal("GET, HEAD", res.headers.allow)
    end)

    it("answers HEAD with the GET route, without a body", function()
      local seen
      app:get("/len", function(req, res) seen = req.method; res:send("twelve bytes") end)
      local res = t.head(app, "/len")
      assert.equal(200, res.status)
      assert.equal("HEAD", seen)
      assert.equal("12", res.headers["content-length"])
      assert.equal("", res.body)
    end)
  end)
end)
