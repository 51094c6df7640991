-- What a user runs, run for real: the rock built and installed into a tree
-- by luarocks, then loaded by a lua5.4 started elsewhere that serves one
-- request; and `make demo` serving its page at the URL it prints.
--
-- Only in the dev run: these build and start programs of their own, which
-- load neither build under test, and under the ASan run the LD_PRELOAD it
-- sets would leak into them. Nothing is declared there (a pending spec would
-- be counted as passed by scripts/test).
if (os.getenv("HERALD_BUILD") or "dev") == "asan" then return end

local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Runs a shell command; returns whether it exited 0, and its output.
local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

local function write(path, data)
  local f = assert(io.open(path, "w"))
  f:write(data)
  f:close()
end

-- A port nothing listens on right now.
local function free_port()
  local app = herald.new()
  local port = assert(app:listen { host = "127.0.0.1", port = 0 })
  app:close()
  return port
end

-- Whether any process of process group pgid is still there (a zombie
-- too: one not reaped yet).
local function group_exists(pgid)
  return os.execute(("kill -0 -%d 2>/dev/null"):format(pgid)) == true
end

-- Whether a process of process group pgid still runs (zombies aside), from
-- /proc/<pid>/stat: "pid (comm) state ppid pgrp ...".
local function group_running(pgid)
  local p = assert(io.popen("cat /proc/[0-9]*/stat 2>/dev/null"))
  local running = false
  for line in p:lines() do
    local state, group = line:match("^.*%) (%S) %d+ (%d+) ")
    if group and tonumber(group) == pgid and state ~= "Z" then running = true end
  end
  p:close()
  return running
end

-- The server in the installed tree: serves one request, telling which files
-- it loaded, then stops (or stops by itself after 30 s without one).
local SERVER = [[
local herald = require "herald"
local app = herald.new()
local give_up = herald.after(30000, function()
  io.stderr:write("no request within 30 s\n")
  herald.stop()
end)
app:get("/where", function(_, res)
  res:send(debug.getinfo(herald.new, "S").source:sub(2) .. "\n" ..
    assert(package.searchpath("herald.core", package.cpath)) .. "\n")
  give_up:cancel()
  herald.after(0, herald.stop)
end)
print(assert(app:listen { host = "127.0.0.1", port = 0 }))
io.stdout:flush()
herald.run()
print("stopped")
]]

describe("install", function()
  local saved_timeout
  before_each(function() saved_timeout = t.timeout; t.timeout = 10 end)
  after_each(function() t.timeout = saved_timeout end)

  it("luarocks make installs a rock that serves from another folder", function()
    local tree = os.tmpname() -- a unique name: made into a folder
    os.remove(tree)
    finally(function()
      if tree:match("^/tmp/") then os.execute("rm -rf " .. quote(tree)) end
    end)
    assert(os.execute("mkdir " .. quote(tree)))

    local ok, out = run("luarocks --lua-version=5.4 make --tree " .. quote(tree) ..
      " rockspecs/herald-scm-1.rockspec")
    assert(ok, "luarocks make failed:\n" .. out)

    local lua_dir, lib_dir = tree .. "/share/lua/5.4", tree .. "/lib/lua/5.4"
    write(tree .. "/server.lua", SERVER)
    -- only the tree, then the defaults (for lua-cjson); the checkout is not on the path
    local server = assert(io.popen(("cd /tmp && LUA_PATH=%s LUA_CPATH=%s exec timeout 60 lua5.4 %s 2>&1")
      :format(quote(lua_dir .. "/?.lua;" .. lua_dir .. "/?/init.lua;;"), quote(lib_dir .. "/?.so;;"),
        quote(tree .. "/server.lua"))))
    local first = server:read("l")
    local port = tonumber(first)
    if not port then
      local rest = server:read("a")
      server:close()
      error("the installed herald did not start: " .. tostring(first) .. "\n" .. rest)
    end

    local res = t.get(port, "/where")
    local rest = server:read("a")
    local exited = server:close()
    assert.equal(200, res.status)
    local lua_file, core_file = res.body:match("^([^\n]*)\n([^\n]*)\n$")
    assert.equal(lua_dir .. "/herald/init.lua", lua_file)
    assert.equal(lib_dir .. "/herald/core.so", core_file)
    assert.equal("stopped\n", rest)
    assert.is_true(exited == true, "the installed server did not exit cleanly")
  end)

  for _, tls in ipairs { false, true } do
    local how = tls and "make demo TLS=1" or "make demo"
    it(how .. " serves the demo page at the URL it prints", function()
      local port = free_port()
      -- A session of its own, so that its process group is the demo's whole
      -- tree (make, the script, lua5.4); a watchdog in it ends everything
      -- after 60 s should the spec not get to it.
      local demo = assert(io.popen(("exec setsid sh -c %s 2>&1"):format(quote(
        -- the chat's port too: PORT + 1 may be taken
        "echo $$; (sleep 60; kill -TERM -$$) >/dev/null 2>&1 & PORT=" .. port .. " CHAT_PORT=" ..
          free_port() .. " exec " .. how))))
      local pgid = assert(tonumber(demo:read("l")), "no process group id")
      local output, url, closed = {}, nil, false
      finally(function()
        if group_running(pgid) then os.execute(("kill -KILL -%d 2>/dev/null"):format(pgid)) end
        if not closed then demo:close() end
      end)
      for line in demo:lines() do
        output[#output + 1] = line
        url = line:match("^herald %a+: (https?://%S+)$")
        if url then break end
      end
      assert(url, how .. " printed no URL:\n" .. table.concat(output, "\n"))
      local scheme, host, url_port, path = url:match("^(https?)://([^/:]+):(%d+)(/.*)$")
      assert.equal(tls and "https" or "http", scheme)
      assert.equal(port, tonumber(url_port))

      local res
      if tls then -- over TLS: curl, accepting the self-signed certificate
        local curl = assert(io.popen(("timeout 10 curl -sSk -D - %s 2>&1"):format(quote(url))))
        local out = curl:read("a")
        curl:close()
        res = out:match("^HTTP/") and t.parse_response(out, nil, true)
        assert(res, "curl: " .. out)
      else
        local c = t.connect(port, host)
        c:send(t.encode_request("GET", path))
        res = c:response()
        c:close()
      end
      assert(res, "no response from the demo")
      assert.equal(200, res.status)
      assert.matches("^text/html", res.headers["content-type"])
      assert.matches("^<!doctype html>", res.body:lower())
      assert.matches("</html>%s*$", res.body)

      -- stop it: SIGTERM to the group, then nothing of it may be left
      assert(os.execute(("kill -TERM -%d"):format(pgid)))
      local deadline = core.now() + 5000
      while group_running(pgid) and core.now() < deadline do t.sleep(50) end
      assert.is_false(group_running(pgid), "the demo's processes outlived SIGTERM by 5 s")
      demo:close() -- reaps make, the group's leader; orphans (the watchdog) go to init
      closed = true
      deadline = core.now() + 5000
      while group_exists(pgid) and core.now() < deadline do t.sleep(50) end
      assert.is_false(group_exists(pgid), "a process of the demo is left")
    end)
  end
end)
