-- A real browser on the ticker example: examples/ticker/ticker.lua runs as a
-- subprocess (on the build under test: under the ASan run it keeps the
-- LD_PRELOAD and sanitizer options), and spec/browser/ticker.mjs drives
-- Debian's headless Chromium through playwright-core (both installed by
-- `make deps`): the page gets quotes, the server drops its stream twice
-- (the browser resumes with Last-Event-ID, then the page reopens with
-- ?last_event_id= after a refused reconnection), and every event id the page
-- saw must follow the one before by exactly one: nothing lost, nothing twice.
--
-- Bounded: the browser script gives up after 40 s (and `timeout` kills it
-- at 45 s); the ticker has a watchdog that kills it after 55 s should the
-- spec not get to it; it is stopped with SIGTERM and must exit 0 (under
-- ASan: no leak, no report) within 5 s.
local t = require "herald.test"
local core = require "herald.core"
local cjson = require "cjson.safe"

local flavor = os.getenv("HERALD_BUILD") or "dev"
local chromium = os.getenv("CHROMIUM") or "/usr/bin/chromium"

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

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

-- Starts the ticker on a free port (PORT=0: it prints the one it got) in a
-- session of its own, whose process group is the ticker and its watchdog.
-- Returns { pid, url, pipe, err_file }, or raises with what it printed.
local function start_ticker()
  local err_file = os.tmpname()
  local script = table.concat({
    "echo $$",
    "(sleep 55; kill -KILL -$$) >/dev/null 2>&1 &",
    ("PORT=0 HOST=127.0.0.1 LUA_PATH=%s LUA_CPATH=%s exec lua5.4 examples/ticker/ticker.lua 2>%s"):format(
      quote("lua/?.lua;lua/?/init.lua;;"), quote("build/" .. flavor .. "/?.so;;"), quote(err_file)),
  }, "\n")
  local pipe = assert(io.popen("exec setsid sh -c " .. quote(script)))
  local ticker = { pid = tonumber(pipe:read("l")), pipe = pipe, err_file = err_file }
  local line = pipe:read("l")
  ticker.url = line and line:match("^herald ticker: (http://%S+)$")
  if not ticker.pid or not ticker.url then
    if ticker.pid then os.execute(("kill -KILL -%d 2>/dev/null"):format(ticker.pid)) end
    pipe:close()
    local err = slurp(err_file)
    os.remove(err_file)
    error(("the ticker did not start: %s\n%s"):format(tostring(line), err))
  end
  return ticker
end

-- SIGTERM to the ticker's group; waits up to 5 s for it to exit. Returns
-- whether it exited in time, its exit status (true when 0) and its stderr.
local function stop_ticker(ticker)
  if ticker.stopped then return end
  ticker.stopped = true
  os.execute(("kill -TERM -%d 2>/dev/null"):format(ticker.pid))
  local deadline = core.now() + 5000
  while running(ticker.pid) and core.now() < deadline do t.sleep(50) end
  local in_time = not running(ticker.pid)
  if not in_time then os.execute(("kill -KILL -%d 2>/dev/null"):format(ticker.pid)) end
  local exited = ticker.pipe:close()
  local err = slurp(ticker.err_file)
  os.remove(ticker.err_file)
  return in_time, exited == true, err
end

describe("browser", function()
  it("the ticker page resumes after drops, with no event lost or repeated", function()
    assert(exists(chromium), chromium .. " is missing: run make deps (it installs Debian's chromium)")
    assert(exists("node_modules/playwright-core/package.json"),
      "node_modules/playwright-core is missing: run make deps (npm ci)")

    local ticker = start_ticker()
    finally(function() stop_ticker(ticker) end)

    -- node and Chromium are not ours to sanitize: the ASan run's
    -- LD_PRELOAD and options stay with the ticker
    local err_file = os.tmpname()
    finally(function() os.remove(err_file) end)
    local node = assert(io.popen(("env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS " ..
      "CHROMIUM=%s timeout -k 5 45 node spec/browser/ticker.mjs %s 2>%s")
      :format(quote(chromium), quote(ticker.url), quote(err_file))))
    local out = node:read("a")
    local node_ok = node:close()
    local report = out .. slurp(err_file)

    local result = cjson.decode(out:match("[^\n]*") or "")
    assert(type(result) == "table", "the browser script printed no result:\n" .. report)
    assert(result.ok == true and node_ok == true, "the browser run failed: " .. tostring(result.failure) ..
      "\n" .. report)
    assert.equal(0, result.gaps)
    assert.is_true(result.opens >= 3, "opens: " .. tostring(result.opens))
    assert.is_true(result.events >= 25, "events: " .. tostring(result.events))
    assert.equal(12, result.rows)

    local in_time, exited, err = stop_ticker(ticker)
    assert(in_time, "the ticker outlived SIGTERM by 5 s; its stderr:\n" .. err)
    assert(exited, "the ticker did not exit 0 after SIGTERM; its stderr:\n" .. err)
    assert.equal("", err)
  end)
end)
