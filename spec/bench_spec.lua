-- The benchmark harness, run for real in its quick mode: `make bench QUICK=1`
-- installs nginx+nchan if missing, builds the release and loadgen, runs every
-- scenario against herald and nginx+nchan with small N (the two-node ones
-- also as two nodes of each sharing a redis-server), and writes
-- build/bench/quick.json and its report. A benchmark is not a test: this
-- asserts only that every run completed cleanly on both servers and that the
-- results have every field, not any figure.
--
-- Only in the dev run: it builds and starts programs of its own (the release
-- build, nginx), which load neither build under test, and under the ASan run
-- the LD_PRELOAD it sets would leak into them. Nothing is declared there (a
-- pending spec would be counted as passed by scripts/test).
if (os.getenv("HERALD_BUILD") or "dev") == "asan" then return end

local cjson = require "cjson"

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

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

local function exists(path)
  return os.execute("test -e " .. quote(path)) == true
end

local SCENARIOS = { "s100", "a", "s3000", "b", "b5", "c", "d", "f1k", "f16k", "g", "a-2", "b-2", "c-2", "r", "r5", "rc",
  "a-3", "b-3", "c-3" }
local SERVERS = { "herald", "nchan" }
-- the two-node scenarios: each server alone, and two nodes and Redis
local CLUSTER_SCENARIOS = { r = true, r5 = true, rc = true }
local CLUSTER = { "herald", "nchan", "herald-redis", "nchan-redis" }

-- What every loadgen line holds.
local FIELDS = { "label", "mode", "subscribers", "connected", "failed", "connect_seconds", "messages", "size",
  "rate", "burst", "expected", "delivered", "lost", "duplicated", "out_of_order", "seconds",
  "throughput_msgs_per_s", "latency_us", "server", "loadgen_cpu_s", "timed_out" }
local LATENCY = { "p50", "p90", "p99", "max" }
local SERVER = { "cpu_user_us_per_msg", "cpu_sys_us_per_msg", "cpu_total_us_per_msg", "writes_per_msg",
  "rss_kib_per_conn", "rss_kib_before", "rss_kib_after" }

describe("make bench QUICK=1", function()
  it("runs every scenario on herald and nginx+nchan (two-node ones also on Redis): all delivered once, in order, " ..
    "nothing left running", function()
    local results = "build/bench/quick.json"
    os.remove(results)
    local started = os.time()
    -- A session of its own, so that its process group is the whole run
    -- (make, bench/run, the servers, loadgen); a watchdog in it ends
    -- everything after 85 s should the run hang.
    local run = assert(io.popen(("exec setsid sh -c %s 2>&1"):format(quote(
      "echo $$; (sleep 85; kill -TERM -$$) >/dev/null 2>&1 & exec make --no-print-directory bench QUICK=1"))))
    local pgid = assert(tonumber(run:read("l")), "no process group id")
    local output = run:read("a")
    local exited = run:close()
    local elapsed = os.time() - started
    -- the watchdog's sleep is the only process left of the group: end it
    os.execute(("kill -TERM -%d 2>/dev/null"):format(pgid))

    assert(exited == true, "make bench QUICK=1 failed:\n" .. output)
    assert(elapsed < 85, "make bench QUICK=1 took " .. elapsed .. " s")
    for _ = 1, 50 do
      if not group_running(pgid) then break end
      os.execute("sleep 0.1")
    end
    assert.is_false(group_running(pgid), "a process of the bench run is left:\n" .. output)
    local tmp = output:match("bench: temporary folder (%S+),")
    assert(tmp, "bench/run named no temporary folder:\n" .. output)
    assert.is_false(exists(tmp), "bench/run left its temporary folder " .. tmp)

    local f = assert(io.open(results))
    local data = cjson.decode(f:read("a"))
    f:close()
    assert.is_true(data.meta.quick)
    assert.equal(0, data.meta.failed_runs)
    for _, key in ipairs { "date", "command", "cpu", "cores", "kernel", "herald_commit", "nginx", "nchan", "redis" } do
      assert(data.meta[key] ~= nil, "meta has no " .. key)
    end

    local seen = {}
    for _, r in ipairs(data.runs) do
      local name = r.scenario .. "/" .. r.server
      seen[name] = true
      assert.equal(cjson.null, r.error, name .. ": " .. tostring(r.error))
      local res = r.result
      assert.is_table(res, name .. " has no result")
      for _, key in ipairs(FIELDS) do assert(res[key] ~= nil, name .. ": no field " .. key) end
      for _, key in ipairs(LATENCY) do assert(res.latency_us[key] ~= nil, name .. ": no latency_us." .. key) end
      for _, key in ipairs(SERVER) do assert(res.server[key] ~= nil, name .. ": no server." .. key) end
      assert.equal(res.subscribers, res.connected, name .. ": connected")
      assert.equal(0, res.failed, name .. ": failed connections")
      assert.equal(res.subscribers * res.messages, res.expected, name .. ": expected")
      assert.equal(res.expected, res.delivered, name .. ": delivered")
      assert.equal(0, res.lost, name .. ": lost")
      assert.equal(0, res.duplicated, name .. ": duplicated")
      assert.equal(0, res.out_of_order, name .. ": out of order")
      assert.is_false(res.timed_out, name .. ": timed out")
      for _, key in ipairs { "disconnected", "malformed", "protocol_errors", "publish_errors" } do
        assert(res[key] == nil or res[key] == 0, name .. ": " .. key .. " " .. tostring(res[key]))
      end
      if res.messages > 0 then
        assert(type(res.server.cpu_total_us_per_msg) == "number", name .. ": no CPU per message")
      else
        assert(type(res.server.rss_kib_per_conn) == "number", name .. ": no memory per connection")
      end
      -- every process measured apart: the server alone, or both nodes and Redis
      local names = {}
      for _, p in ipairs(res.server.processes) do
        names[#names + 1] = p.name
        if res.messages > 0 then
          assert(type(p.cpu_total_us_per_msg) == "number", name .. ": no CPU per message for " .. p.name)
        end
      end
      table.sort(names)
      local want = r.server:match("%-redis$") and "node-a node-b redis" or "server"
      assert.equal(want, table.concat(names, " "), name .. ": processes")
    end
    for _, s in ipairs(SCENARIOS) do
      for _, server in ipairs(CLUSTER_SCENARIOS[s] and CLUSTER or SERVERS) do
        assert(seen[s .. "/" .. server], "no run " .. s .. "/" .. server)
      end
    end

    -- the report of a quick run goes to build/bench/, never over the committed one
    assert(exists("build/bench/RESULTS-quick.md"), "no quick report")
  end)
end)
