-- Interoperability with an independent, strict client: examples/echo.lua
-- runs as a subprocess (on the build under test: under the ASan run it keeps
-- the LD_PRELOAD and sanitizer options) and spec/interop/ws_client.py, with
-- Debian's python3-websockets (installed by `make deps`), sends text,
-- binary, fragmented and 1 MiB messages and pings, checks every echo and
-- closes normally; it exits 0 only if all of it went right.
--
-- Bounded: the client gives up after 30 s (`timeout` kills it at 40 s); the
-- echo server has a watchdog that kills it after 55 s should the spec not
-- get to it; it is stopped with SIGTERM and must exit 0 (under ASan: no
-- leak, no report) within 5 s, having written nothing to stderr.
local t = require "herald.test"
local core = require "herald.core"

local flavor = os.getenv("HERALD_BUILD") or "dev"
local python = "/usr/bin/python3" -- Debian's, where python3-websockets is installed
-- python is not ours to sanitize: the ASan run's LD_PRELOAD and options
-- stay with the echo server
local CLEAN_ENV = "env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS "

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local data = f:read("a")
  f:close()
  return data
end

-- Whether process pid runs (a zombie, not reaped yet, does not).
local function running(pid)
  local stat = slurp("/proc/" .. pid .. "/stat")
  local state = stat:match("^%d+ %(.*%) (%S)")
  return state ~= nil and state ~= "Z"
end

-- Starts examples/echo.lua on a port of its choosing (PORT=0: it prints the
-- one it got) in a session of its own, whose process group is the server
-- and its watchdog. Returns { pid, url, pipe, err_file }, or raises with
-- what it printed.
local function start_echo()
  local err_file = os.tmpname()
  local script = table.concat({
    "echo $$",
    "(sleep 55; kill -KILL -$$) >/dev/null 2>&1 &",
    ("PORT=0 HOST=127.0.0.1 LUA_PATH=%s LUA_CPATH=%s exec lua5.4 examples/echo.lua 2>%s"):format(
      quote("lua/?.lua;lua/?/init.lua;;"), quote("build/" .. flavor .. "/?.so;;"), quote(err_file)),
  }, "\n")
  local pipe = assert(io.popen("exec setsid sh -c " .. quote(script)))
  local server = { pid = tonumber(pipe:read("l")), pipe = pipe, err_file = err_file }
  local line = pipe:read("l")
  server.url = line and line:match("^herald echo: (ws://%S+)$")
  if not server.pid or not server.url then
    if server.pid then os.execute(("kill -KILL -%d 2>/dev/null"):format(server.pid)) end
    pipe:close()
    local err = slurp(err_file)
    os.remove(err_file)
    error(("the echo server did not start: %s\n%s"):format(tostring(line), err))
  end
  return server
end

-- SIGTERM to the server's group; waits up to 5 s for it to exit. Returns
-- whether it exited in time, its exit status (true when 0) and its stderr.
local function stop_echo(server)
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

describe("ws interop", function()
  it("python3-websockets talks to examples/echo.lua: text, binary, fragments, 1 MiB, pings, close", function()
    local f = io.open(python, "rb")
    assert(f, python .. " is missing: run make deps")
    f:close()
    assert(os.execute(CLEAN_ENV .. python .. " -c 'import websockets' 2>/dev/null"),
      "python3-websockets is missing: run make deps (it installs it)")

    local server = start_echo()
    finally(function() stop_echo(server) end)

    local client = assert(io.popen(("%stimeout -k 5 40 %s spec/interop/ws_client.py %s 2>&1"):format(
      CLEAN_ENV, python, quote(server.url))))
    local out = client:read("a")
    local client_ok = client:close()
    assert(client_ok == true and out == "ok\n", "the python client failed:\n" .. out)

    local in_time, exited, err = stop_echo(server)
    assert(in_time, "the echo server outlived SIGTERM by 5 s; its stderr:\n" .. err)
    assert(exited, "the echo server did not exit 0 after SIGTERM; its stderr:\n" .. err)
    assert.equal("", err)
  end)
end)
