-- The chat example (examples/chat): its rules spoken to over herald.test in
-- this process (nicknames, rooms, history on arrival, limits, presence,
-- resume), then a real browser: examples/chat/chat.lua runs as a subprocess
-- (on the build under test: under the ASan run it keeps the LD_PRELOAD and
-- sanitizer options), and spec/browser/chat.mjs drives two pages in
-- Debian's headless Chromium through playwright-core; the server drops one
-- page's WebSocket and keeps it out while the other talks, and herald.js
-- must resume it so that the page shows every missed message exactly once.
--
-- Bounded: the browser script gives up after 45 s (and `timeout` kills it
-- at 50 s); the chat has a watchdog that kills it after 58 s should the
-- spec not get to it; it is stopped with SIGTERM and must exit 0 (under
-- ASan: no leak, no report) within 5 s.
local t = require "herald.test"
local core = require "herald.core"
local cjson = require "cjson"
local cjson_safe = require "cjson.safe"

local chat = dofile("examples/chat/chat.lua")

local flavor = os.getenv("HERALD_BUILD") or "dev"
local chromium = os.getenv("CHROMIUM") or "/usr/bin/chromium"

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function escape(s)
  return (s:gsub("[^%w%-_.~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

local function new_chat(opts)
  local app = chat.new(opts)
  app.logged = {}
  app:on_error(function(message) app.logged[#app.logged + 1] = message end)
  finally(function() app:close() end)
  return app
end

local function join(app, room, nick, last_id)
  local path = ("/ws/%s?nick=%s"):format(room, escape(nick))
  if last_id then path = path .. "&last_event_id=" .. last_id end
  local w = t.ws(app, path)
  finally(function() w:abort() end)
  assert.equal(101, w.status, w.body)
  return w
end

-- The next text frame, decoded: an envelope (its data decoded too, as .msg)
-- or the server's word to this connection alone.
local function next_json(w, timeout)
  local f, err = w:receive(timeout or 2)
  assert(f, "no frame: " .. tostring(err))
  assert.equal("text", f.kind, f.data)
  local value = cjson.decode(f.data)
  if value.id and value.data then value.msg = cjson.decode(value.data) end
  return value
end

-- What comes before the users message (history or replay): { envelopes,
-- gaps, users }.
local function arrival(w)
  local got = { envelopes = {}, gaps = 0 }
  while true do
    local v = next_json(w)
    if v.type == "users" then
      got.users = v.users
      return got
    elseif v.event == "herald-gap" then
      got.gaps = got.gaps + 1
    else
      assert.is_string(v.id)
      got.envelopes[#got.envelopes + 1] = v
    end
  end
end

local function seq(id) return tonumber(id:match("%-(%d+)$")) end

local function ids_of(list)
  local ids = {}
  for i, v in ipairs(list) do ids[i] = v.id end
  return ids
end

-- Frames until none comes for quiet seconds, decoded.
local function drain(w, quiet)
  local list = {}
  while true do
    local f = w:receive(quiet or 0.15)
    if not f then return list end
    if f.kind == "text" then
      local v = cjson.decode(f.data)
      if v.id and v.data then v.msg = cjson.decode(v.data) end
      list[#list + 1] = v
    else
      list[#list + 1] = { kind = f.kind, code = f.code }
    end
  end
end

describe("chat example", function()
  it("refuses a bad nickname or room name with 400 and takes good ones", function()
    local app = new_chat()
    for _, nick in ipairs { "", string.rep("n", 25), "a\1b", "tab\tbed", "del\127", "nel\194\133",
      " lead", "trail ", "   ", "\255\254" } do
      local w = t.ws(app, "/ws/lobby?nick=" .. escape(nick))
      assert.equal(400, w.status, ("nick %q"):format(nick))
      assert.equal("bad nickname\n", w.body)
    end
    local w = t.ws(app, "/ws/lobby")
    assert.equal(400, w.status)
    for _, room in ipairs { "a.b", "a%20b", string.rep("r", 33) } do
      w = t.ws(app, "/ws/" .. room .. "?nick=ok")
      assert.equal(400, w.status, room)
      assert.equal("bad room name\n", w.body)
    end
    for _, nick in ipairs { "x", string.rep("n", 24), "Zoë", "a b", "日本語のニックネーム" } do
      join(app, "lobby", nick)
    end
    assert.same({}, app.logged)
  end)

  it("gives a newcomer the room's last 50 messages in id order, no gap, then the users", function()
    local app = new_chat()
    local alice = join(app, "r1", "alice")
    local first = arrival(alice)
    assert.equal(0, first.gaps)
    assert.same({ "alice" }, first.users)
    assert.equal(1, #first.envelopes) -- her own join notice
    for i = 1, 60 do
      app:publish("room:r1", cjson.encode { type = "message", nick = "seed", text = "m" .. i, time = 0 },
        { event = "message" })
    end
    local bob = join(app, "r1", "bob")
    local got = arrival(bob)
    assert.equal(0, got.gaps)
    assert.same({ "alice", "bob" }, got.users)
    assert.equal(chat.HISTORY, #got.envelopes)
    local history = app:history("room:r1")
    assert.same(ids_of(history), ids_of(got.envelopes))
    assert.equal("m12", got.envelopes[1].msg.text) -- 60 seeded + bob's join: the last 50
    assert.same({ type = "join", nick = "bob", users = { "alice", "bob" }, time = got.envelopes[50].msg.time },
      got.envelopes[50].msg)
    assert.equal("join", got.envelopes[50].event)
    for i = 2, #got.envelopes do assert.is_true(seq(got.envelopes[i].id) > seq(got.envelopes[i - 1].id)) end
    -- alice got all of it live, bob's join last
    local live = drain(alice)
    assert.equal(61, #live)
    assert.equal(got.envelopes[50].id, live[61].id)
  end)

  it("publishes messages as JSON, and refuses bad ones to their sender alone", function()
    local app = new_chat()
    local alice, bob = join(app, "r2", "alice"), join(app, "r2", "bob")
    arrival(alice)
    arrival(bob)
    drain(alice)
    alice:send('{"text":"  hello\\r\\nworld\\u0007  "}')
    local v = next_json(bob)
    assert.equal("message", v.event)
    assert.equal("room:r2", v.topic)
    assert.same({ type = "message", nick = "alice", text = "hello\nworld", time = v.msg.time }, v.msg)
    assert.equal(v.id, next_json(alice).id)
    alice:send("plain text works too")
    assert.equal("plain text works too", next_json(bob).msg.text)
    drain(alice)

    local function refused(data, kind, pattern)
      alice:send(data, kind)
      local e = next_json(alice)
      assert.equal("error", e.type)
      assert.matches(pattern, e.error)
    end
    refused(string.rep("é", chat.MAX_TEXT + 1), "text", "too long: 501 characters")
    refused("   ", "text", "empty message")
    refused('{"text": 5}', "text", "a message is")
    refused("\1\2", "binary", "text messages only")
    alice:send(string.rep("é", chat.MAX_TEXT)) -- 500 characters (1000 bytes): fine
    assert.equal(chat.MAX_TEXT, utf8.len(next_json(bob).msg.text))
    -- bob heard none of the refusals
    assert.same({}, drain(bob))
    assert.same({}, app.logged)
  end)

  it("lets a user send 5 messages in 5 s; the excess is refused to them alone", function()
    local app = new_chat()
    local alice, bob = join(app, "r3", "alice"), join(app, "r3", "bob")
    arrival(alice)
    arrival(bob)
    drain(alice)
    for i = 1, 7 do alice:send("n" .. i) end
    local errors, texts = 0, {}
    for _, v in ipairs(drain(alice)) do
      if v.type == "error" then
        errors = errors + 1
        assert.matches("slow down", v.error)
      else
        texts[#texts + 1] = v.msg.text
      end
    end
    assert.equal(2, errors)
    assert.same({ "n1", "n2", "n3", "n4", "n5" }, texts)
    local heard = {}
    for _, v in ipairs(drain(bob)) do heard[#heard + 1] = v.msg.text end
    assert.same(texts, heard)
    -- the limit is the user's, whatever the connection; bob has his own
    local alice2 = join(app, "r3b", "alice")
    arrival(alice2)
    alice2:send("elsewhere")
    assert.equal("error", next_json(alice2).type)
    bob:send("bob speaks")
    assert.equal("bob speaks", next_json(bob).msg.text)
  end)

  it("announces a user's first join and last leave in a room, with the users; GET /rooms/:room/users", function()
    local app = new_chat()
    local alice = join(app, "r4", "alice")
    arrival(alice)
    local bob = join(app, "r4", "bob")
    arrival(bob)
    local v = next_json(alice)
    assert.same({ "join", "bob", { "alice", "bob" } }, { v.msg.type, v.msg.nick, v.msg.users })
    local res = t.get(app, "/rooms/r4/users")
    assert.equal(200, res.status)
    assert.equal("application/json", res.headers["content-type"])
    assert.same({ room = "r4", users = { "alice", "bob" } }, cjson.decode(res.body))
    assert.same({ room = "empty", users = {} }, cjson.decode(t.get(app, "/rooms/empty/users").body))
    assert.equal(400, t.get(app, "/rooms/a.b/users").status)

    -- a second tab says nothing; its close neither
    local bob2 = join(app, "r4", "bob")
    arrival(bob2)
    bob2:close()
    assert.same({}, drain(alice))
    -- bob's last connection goes: he left
    bob:close()
    v = next_json(alice)
    assert.same({ "leave", "bob", { "alice" } }, { v.msg.type, v.msg.nick, v.msg.users })
    assert.equal("leave", v.event)
    assert.same({ room = "r4", users = { "alice" } }, cjson.decode(t.get(app, "/rooms/r4/users").body))
  end)

  it("resumes a dropped user with exactly what was missed; the admin drop holds reconnections", function()
    local app = new_chat { admin = true }
    local alice, bob = join(app, "r5", "alice"), join(app, "r5", "bob")
    arrival(alice)
    arrival(bob)
    local seen = drain(alice)
    local last = seen[#seen].id
    local res = t.post(app, "/admin/drop?nick=alice&hold=300")
    assert.equal(200, res.status)
    assert.same({ dropped = 1 }, cjson.decode(res.body))
    local f = alice:receive(2)
    assert.same({ "close", 4000 }, { f.kind, f.code })
    alice:close(4000) -- answer the close as a browser does: her stream ends
    local v = next_json(bob)
    assert.same({ "leave", "alice" }, { v.msg.type, v.msg.nick })
    for i = 1, 3 do bob:send("missed " .. i) end
    drain(bob)
    local refused = t.ws(app, "/ws/r5?nick=alice&last_event_id=" .. last)
    assert.equal(503, refused.status)
    t.sleep(350)
    local back = join(app, "r5", "alice", last)
    local got = arrival(back)
    assert.equal(0, got.gaps)
    local kinds = {}
    for i, e in ipairs(got.envelopes) do
      kinds[i] = e.msg.type .. ":" .. (e.msg.text or e.msg.nick)
      assert.is_true(seq(e.id) > seq(i == 1 and last or got.envelopes[i - 1].id))
    end
    assert.same({ "leave:alice", "message:missed 1", "message:missed 2", "message:missed 3", "join:alice" }, kinds)
    assert.same({ "alice", "bob" }, got.users)

    assert.equal(400, t.post(app, "/admin/drop?nick=alice&hold=-1").status)
    assert.equal(400, t.post(app, "/admin/drop?nick=").status)
    assert.same({ dropped = 0 }, cjson.decode(t.post(app, "/admin/drop?nick=nobody").body))
    -- without admin, no such route
    assert.equal(404, t.post(new_chat(), "/admin/drop?nick=alice").status)
    assert.same({}, app.logged)
  end)

  it("serves its page and herald.js", function()
    local app = new_chat()
    local res = t.get(app, "/")
    assert.equal(200, res.status)
    assert.matches("^text/html", res.headers["content-type"])
    assert.matches('<script src="/herald.js"></script>', res.body, 1, true)
    res = t.get(app, "/herald.js")
    assert.equal(200, res.status)
    assert.matches("javascript", res.headers["content-type"])
    assert.matches("Herald.Socket", res.body, 1, true)
  end)
end)

-- ---- the browser ----

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local data = f:read("a")
  f:close()
  return data
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- Whether process pid runs (a zombie, not reaped yet, does not).
local function running(pid)
  local stat = slurp("/proc/" .. pid .. "/stat")
  local state = stat:match("^%d+ %(.*%) (%S)")
  return state ~= nil and state ~= "Z"
end

-- Starts the chat on a free port (PORT=0: it prints the one it got) in a
-- session of its own, whose process group is the chat and its watchdog.
-- Returns { pid, url, pipe, err_file }, or raises with what it printed.
local function start_chat()
  local err_file = os.tmpname()
  local script = table.concat({
    "echo $$",
    "(sleep 58; kill -KILL -$$) >/dev/null 2>&1 &",
    ("PORT=0 HOST=127.0.0.1 CHAT_ADMIN=1 LUA_PATH=%s LUA_CPATH=%s exec lua5.4 examples/chat/chat.lua 2>%s"):format(
      quote("lua/?.lua;lua/?/init.lua;;"), quote("build/" .. flavor .. "/?.so;;"), quote(err_file)),
  }, "\n")
  local pipe = assert(io.popen("exec setsid sh -c " .. quote(script)))
  local server = { pid = tonumber(pipe:read("l")), pipe = pipe, err_file = err_file }
  local line = pipe:read("l")
  server.url = line and line:match("^herald chat: (http://%S+)$")
  if not server.pid or not server.url then
    if server.pid then os.execute(("kill -KILL -%d 2>/dev/null"):format(server.pid)) end
    pipe:close()
    local err = slurp(err_file)
    os.remove(err_file)
    error(("the chat did not start: %s\n%s"):format(tostring(line), err))
  end
  return server
end

-- SIGTERM to the chat's group; waits up to 5 s for it to exit. Returns
-- whether it exited in time, its exit status (true when 0) and its stderr.
local function stop_chat(server)
  if server.stopped then return end
  server.stopped = true
  os.execute(("kill -TERM -%d 2>/dev/null"):format(server.pid))
  local deadline = core.now() + 5000
  while running(server.pid) and core.now() < deadline do t.sleep(50) end
  local in_time = not running(server.pid)
  if not in_time then os.execute(("kill -KILL -%d 2>/dev/null"):format(server.pid)) end
  local exited = server.pipe:close()
  local err = slurp(server.err_file)
  os.remove(server.err_file)
  return in_time, exited == true, err
end

describe("browser", function()
  it("two chat pages talk; a dropped page resumes and shows what it missed exactly once", function()
    assert(exists(chromium), chromium .. " is missing: run make deps (it installs Debian's chromium)")
    assert(exists("node_modules/playwright-core/package.json"),
      "node_modules/playwright-core is missing: run make deps (npm ci)")

    local server = start_chat()
    finally(function() stop_chat(server) end)

    -- node and Chromium are not ours to sanitize: the ASan run's
    -- LD_PRELOAD and options stay with the chat
    local err_file = os.tmpname()
    finally(function() os.remove(err_file) end)
    local node = assert(io.popen(("env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS " ..
      "CHROMIUM=%s timeout -k 5 50 node spec/browser/chat.mjs %s 2>%s")
      :format(quote(chromium), quote(server.url), quote(err_file))))
    local out = node:read("a")
    local node_ok = node:close()
    local report = out .. slurp(err_file)

    local result = cjson_safe.decode(out:match("[^\n]*") or "")
    assert(type(result) == "table", "the browser script printed no result:\n" .. report)
    assert(result.ok == true and node_ok == true, "the browser run failed: " .. tostring(result.failure) ..
      "\n" .. report)
    assert.equal(2, result.alice.opens)
    assert.equal(0, result.alice.dups)
    assert.equal(7, #result.alice.texts)

    local in_time, exited, err = stop_chat(server)
    assert(in_time, "the chat outlived SIGTERM by 5 s; its stderr:\n" .. err)
    assert(exited, "the chat did not exit 0 after SIGTERM; its stderr:\n" .. err)
    assert.equal("", err)
  end)
end)
