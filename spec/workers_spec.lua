-- herald.run { workers = N }: a master and N worker processes sharing the
-- port (SO_REUSEPORT). The servers run as subprocesses (spec/support/
-- process.lua) with a broker on a real redis-server (spec/support/redis.lua),
-- since workers > 1 needs one; the spec's own loop drives the clients.
-- Under the ASan run the subprocesses are the ASan build too (they keep the
-- run's LD_PRELOAD and sanitizer options), workers included: every spec
-- checks their stderr for sanitizer reports.
local herald = require "herald"
local core = require "herald.core"
local t = require "herald.test"
local proc = require "spec.support.process"
local redis = require "spec.support.redis"

-- arg: redis url, workers, and "crash" (worker 2 kills itself as it
-- starts), "tls" (cert and key files follow) or nothing.
local SERVER = [[
local herald = require "herald"
local url, workers, mode = arg[1], tonumber(arg[2]), arg[3]
local app = herald.new { broker = { redis = url }, shutdown_timeout = 2, drain_retry = 1234 }
app:get("/who", function(_, res)
  local index, pid, n = herald.worker()
  res:send(("%d %d %d"):format(index, pid, n))
end)
app:get("/stop", function(_, res)
  res:send("stopping")
  herald.stop()
end)
app:post("/pub", function(req, res)
  assert(app:publish("news", req.body .. " from worker " .. herald.worker()))
  res:send(tostring(herald.worker()))
end)
app:sse("/events", function(stream)
  assert(stream:subscribe("news"))
  stream:send("worker " .. herald.worker(), { event = "hello" })
end)
app:ws("/ws", { open = function(ws) assert(ws:subscribe("news")) end })
local tls = mode == "tls" and { cert = arg[4], key = arg[5] } or nil
local port = assert(app:listen { host = "127.0.0.1", port = 0, tls = tls })
if mode == "crash" then
  herald.after(0, function()
    local index, pid = herald.worker()
    if index == 2 then os.execute("kill -KILL " .. pid) end
  end)
end
print("port " .. port)
io.stdout:flush()
herald.run { workers = workers, max_restarts = mode == "crash" and 2 or nil }
print("master returned " .. herald.worker())
]]

local CLEAN = proc.unsanitized

-- Whether any thread of process pid runs. Not the main thread alone: it is
-- a zombie while a broker's resolver thread still exits, holding the
-- process's sockets open.
local function alive(pid)
  local p = assert(io.popen(("cat /proc/%d/task/*/stat 2>/dev/null"):format(pid)))
  local running = false
  for line in p:lines() do
    if line:match("^%d+ %(.*%) (%S)") ~= "Z" then running = true end
  end
  p:close()
  return running
end

-- Waits (bounded by ms) until done() is true; returns whether it became so.
local function wait_for(done, ms)
  local deadline = core.now() + ms
  while not done() do
    if core.now() > deadline then return false end
    proc.sleep(10)
  end
  return true
end

-- How many sockets listen on port (each worker has its own).
local function listening_sockets(port)
  local n = 0
  for line in io.lines("/proc/net/tcp") do
    local local_port, state = line:match("^%s*%d+: %x+:(%x+) %x+:%x+ (%x+)")
    if local_port and tonumber(local_port, 16) == port and state == "0A" then n = n + 1 end
  end
  return n
end

local function who(port)
  local res = t.get(port, "/who")
  assert.equal(200, res.status)
  local index, pid, n = res.body:match("^(%d+) (%d+) (%d+)$")
  return { index = tonumber(index), pid = tonumber(pid), n = tonumber(n) }
end

-- Asks on fresh connections until every worker of n answered; returns
-- { [index] = pid }.
local function workers_of(port, n)
  local pids, found = {}, 0
  for _ = 1, 400 do
    local w = who(port)
    assert.equal(n, w.n)
    if not pids[w.index] then found = found + 1 end
    pids[w.index] = w.pid
    if found == n then break end
  end
  assert.equal(n, found, "workers that answered")
  return pids
end

-- Waits (bounded by ms) until none of the processes runs.
local function ended(pids, ms)
  return wait_for(function()
    for _, pid in pairs(pids) do
      if alive(pid) then return false end
    end
    return true
  end, ms)
end

-- An SSE stream on /events, past the event its worker greets it with.
local function events(port)
  local stream = t.sse(port, "/events")
  assert.equal("hello", assert(stream:next(5)).event)
  return stream
end

local function no_sanitizer_reports(stderr)
  assert.is_nil(stderr:match("Sanitizer"), stderr)
  assert.is_nil(stderr:match("runtime error:"), stderr)
end

-- What the master printed after the last line read, once every process of
-- it is gone (else this would wait for the watchdog).
local function rest_of_output(p)
  local lines = {}
  for line in p.pipe:lines() do lines[#lines + 1] = line end
  return table.concat(lines, "\n")
end

describe("herald.run { workers }", function()
  local r, p

  setup(function() r = redis.start() end)
  teardown(function() r:stop() end)

  local function start(workers, ...)
    p = proc.spawn_lua(SERVER, { r.url, workers, ... }, { watchdog = 60 })
    return tonumber(p:expect("^port (%d+)$"))
  end

  after_each(function()
    if p then
      local in_time, _, stderr = p:stop(5000) -- SIGTERM to the group: a drain, sanitizers' checks at exit
      p = nil
      assert.is_true(in_time, "stopped in time")
      no_sanitizer_reports(stderr)
    end
  end)

  it("serves one port from two worker processes", function()
    local port = start(2)
    local pids = workers_of(port, 2)
    assert.are_not.equal(pids[1], pids[2])
    assert.are_not.equal(p.pid, pids[1])
    assert.are_not.equal(p.pid, pids[2])
    assert.equal(2, listening_sockets(port)) -- SO_REUSEPORT: one each
    -- and keeps doing so: over fresh connections, both answer
    local seen = {}
    for _ = 1, 60 do seen[who(port).pid] = true end
    assert.is_true(seen[pids[1]] and seen[pids[2]], "both workers answered")
  end)

  it("shares topics between workers through the broker", function()
    local port = start(2)
    workers_of(port, 2)
    local stream = t.sse(port, "/events")
    local hello = assert(stream:next(5))
    local here = assert(tonumber(hello.data:match("^worker (%d)$")))
    -- publish on fresh connections until one from the other worker arrives
    -- (those from this worker arrive too, and do not count)
    local wanted, got = "news from worker " .. (3 - here), false
    for _ = 1, 100 do
      assert.equal(200, t.post(port, "/pub", "news").status)
      local ev = stream:next(0.2)
      while ev and not got do
        got = ev.data == wanted
        ev = not got and stream:next(0.05)
      end
      if got then break end
    end
    assert.is_true(got, "a publish from the other worker arrived")
  end)

  it("replaces a worker killed with SIGKILL, and the port keeps answering", function()
    local port = start(2)
    local pids = workers_of(port, 2)
    for _, index in ipairs { 1, 2 } do -- worker 1 holds the master's socket; 2 its own
      local old = pids[index]
      os.execute("kill -KILL " .. old)
      assert.is_true(ended({ old }, 3000), "the worker died")
      local new
      assert.is_true(wait_for(function()
        local w = who(port) -- every request is answered meanwhile
        if w.index == index and w.pid ~= old then new = w.pid end
        return new
      end, 5000), "worker " .. index .. " answers again")
      pids[index] = new
      assert.matches(("worker %d %%(pid %d%%) killed by signal 9 %%(Killed%%): restarting it")
        :format(index, old), proc.slurp(p.err_file))
    end
    local seen = {}
    for _ = 1, 60 do seen[who(port).pid] = true end
    assert.is_true(seen[pids[1]] and seen[pids[2]], "both new workers answered")
    assert.equal(2, listening_sockets(port)) -- the dead ones' sockets went with them
  end)

  it("drains every worker on SIGTERM to the master, which exits 0", function()
    local port = start(2)
    local pids = workers_of(port, 2)
    local stream = events(port)
    local ws = t.ws(port, "/ws")
    assert.equal(101, ws.status)
    local start_ms = core.now()
    os.execute("kill -TERM " .. p.pid) -- the master alone: it hands SIGTERM on
    assert.same({ nil, "closed" }, { stream:next(5) })
    assert.equal(1234, stream.retry)
    local frame = assert(ws:receive(5))
    assert.equal("close", frame.kind)
    assert.equal(1001, frame.code)
    assert.is_true(ended({ p.pid, pids[1], pids[2] }, 4000), "master and workers ended")
    local took = core.now() - start_ms
    assert.is_true(took < 2000, "drain took " .. took .. " ms") -- shutdown_timeout = 2
    assert.equal("master returned 0", rest_of_output(p)) -- once: the workers print nothing
    local in_time, exited, stderr = p:stop()
    p = nil
    assert.is_true(in_time)
    assert.is_true(exited, stderr)
    no_sanitizer_reports(stderr)
    assert.is_nil(stderr:match("herald: worker"), stderr) -- nothing died unasked
  end)

  it("stops them all when a worker calls herald.stop()", function()
    local port = start(2)
    local pids = workers_of(port, 2)
    assert.equal("stopping", t.get(port, "/stop").body)
    assert.is_true(ended({ p.pid, pids[1], pids[2] }, 4000), "master and workers ended")
    assert.equal("master returned 0", rest_of_output(p))
    local _, exited, stderr = p:stop()
    p = nil
    assert.is_true(exited, stderr)
    no_sanitizer_reports(stderr)
  end)

  it("drains the workers when the master is killed", function()
    local port = start(2)
    local pids = workers_of(port, 2)
    local stream = events(port)
    os.execute("kill -KILL " .. p.pid)
    assert.same({ nil, "closed" }, { stream:next(5) })
    assert.equal(1234, stream.retry) -- PR_SET_PDEATHSIG: SIGTERM, a drain
    assert.is_true(ended(pids, 4000), "the workers ended")
  end)

  it("gives up on a worker that keeps dying past max_restarts, and fails", function()
    local start_ms = core.now()
    start(2, "crash")
    assert.is_true(ended({ p.pid }, 10000), "the master ended")
    assert.is_true(core.now() - start_ms < 8000)
    local _, exited, stderr = p:stop()
    p = nil
    assert.is_false(exited)
    -- restarted at once, then after 100 ms, then no more
    assert.matches("worker 2 %(pid %d+%) killed by signal 9 %(Killed%): restarting it\n", stderr)
    assert.matches("worker 2 %(pid %d+%) killed by signal 9 %(Killed%): restarting it in 100 ms", stderr)
    assert.matches("herald.run: worker 2 %(pid %d+%) killed by signal 9 %(Killed%) after 2 restarts "
      .. "within a minute %(max_restarts = 2%): gave up", stderr)
    no_sanitizer_reports(stderr)
  end)

  describe("over TLS", function()
    local dir, cert, key

    -- A self-signed certificate for workers.test, under name in dir.
    local function make_cert(name)
      local c, k = ("%s/%s.pem"):format(dir, name), ("%s/%s.key"):format(dir, name)
      assert(os.execute(CLEAN .. "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
        .. "-days 2 -subj /CN=workers.test -addext subjectAltName=DNS:workers.test -keyout " .. proc.quote(k)
        .. " -out " .. proc.quote(c) .. " >/dev/null 2>&1"))
      return c, k
    end

    local function install(from_cert, from_key)
      assert(os.execute(("cp %s %s && cp %s %s"):format(proc.quote(from_cert), proc.quote(cert),
        proc.quote(from_key), proc.quote(key))))
    end

    -- GET /who over https trusting only ca: { index, pid }, or nil and curl's complaint.
    local function who_tls(port, ca)
      local curl = assert(io.popen(CLEAN .. ("curl -sS --max-time 5 --cacert %s --resolve workers.test:%d:127.0.0.1 "
        .. "https://workers.test:%d/who 2>&1"):format(proc.quote(ca), port, port)))
      local body = curl:read("a")
      curl:close()
      local index, pid = body:match("^(%d+) (%d+) 2$")
      if not index then return nil, body end
      return { index = tonumber(index), pid = tonumber(pid) }
    end

    -- Asks until every index in want answered (trusting ca), within ms.
    local function until_answered(port, ca, want, ms)
      local last
      return wait_for(function()
        local w, err = who_tls(port, ca)
        last = err
        if w and want[w.index] and want[w.index](w) then want[w.index] = nil end
        return next(want) == nil
      end, ms), last
    end

    before_each(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. proc.quote(dir)))
      cert, key = dir .. "/cert.pem", dir .. "/key.pem"
    end)
    after_each(function() os.execute("rm -r " .. proc.quote(dir)) end)

    it("serves from every worker with the listener's certificate, and SIGHUP reloads it in all", function()
      local old_cert, old_key = make_cert("old")
      local new_cert, new_key = make_cert("new")
      install(old_cert, old_key)
      local port = start(2, "tls", cert, key)
      local any = function() return true end
      local pids = {}
      local function remember(w)
        pids[w.index] = w.pid
        return true
      end
      assert.is_true(until_answered(port, old_cert, { remember, remember }, 5000), "both workers over TLS")
      assert.is_nil(who_tls(port, new_cert)) -- not trusted yet
      install(new_cert, new_key)
      os.execute("kill -HUP " .. p.pid) -- the master hands it on
      local ok, err = until_answered(port, new_cert, { any, any }, 5000)
      assert.is_true(ok, "both workers with the new certificate: " .. tostring(err))
      -- a worker forked after the reload starts with the new certificate too
      os.execute("kill -KILL " .. pids[1])
      ok, err = until_answered(port, new_cert, { function(w) return w.pid ~= pids[1] end }, 5000)
      assert.is_true(ok, "the restarted worker with the new certificate: " .. tostring(err))
      for _ = 1, 10 do assert.is_nil(who_tls(port, old_cert)) end
    end)
  end)

  it("refuses workers > 1 when no app listens", function()
    local q = proc.spawn_lua([[
      local herald = require "herald"
      herald.new { broker = { redis = "redis://127.0.0.1:1/0" } }
      print(select(2, pcall(herald.run, { workers = 2 })))
    ]])
    local line = q:line()
    assert.is_true(ended({ q.pid }, 5000), "it ended")
    local _, exited, stderr = q:stop()
    assert.is_true(exited, stderr)
    assert.equal("herald.run: workers = 2 but no app listens (call app:listen before herald.run)", line)
  end)
end)

describe("herald.run options", function()
  it("refuses workers > 1 without a broker, naming why", function()
    local app = herald.new {}
    assert(app:listen { port = 0 })
    assert.error_matches(function() herald.run { workers = 2 } end,
      "herald.run: workers = 2 needs a broker on every app that listens %(herald.new { broker = "
      .. "{ redis = url } }%): without one each worker would keep topics of its own", nil, false)
    local cores = core.parallelism()
    if cores > 1 then -- the default is the number of cores
      assert.error_matches(function() herald.run {} end, "workers = " .. cores .. " needs a broker")
    end
    app:close()
  end)

  it("raises on bad values, naming the option", function()
    local cases = {
      { { workers = 0 }, "option 'workers' must be from 1 to 1024, got 0" },
      { { workers = 1025 }, "option 'workers' must be from 1 to 1024, got 1025" },
      { { workers = 1.5 }, "option 'workers' must be an integer, got number" },
      { { workers = "2" }, "option 'workers' must be an integer, got string" },
      { { max_restarts = -1 }, "option 'max_restarts' must be from 0 to 1000000, got %-1" },
      { { worker = 2 }, "unknown option 'worker'" },
      { 2, "options must be a table, got number" },
    }
    for _, case in ipairs(cases) do
      assert.error_matches(function() herald.run(case[1]) end, "herald.run: " .. case[2])
    end
  end)

  it("serves in this process with workers = 1", function()
    local app = herald.new {}
    app:get("/who", function(_, res)
      res:send(table.concat({ herald.worker() }, " "))
      herald.stop() -- after this answer
    end)
    local port = assert(app:listen { port = 0 })
    local c = t.open(port)
    c:send(t.encode_request("GET", "/who"))
    local bound = herald.after(5000, herald.stop)
    herald.run { workers = 1 }
    bound:cancel()
    app:close()
    local f = assert(io.open("/proc/self/stat"))
    local pid = f:read("n")
    f:close()
    assert.equal(("1 %d 1"):format(pid), assert(t.parse_response(c.buffer)).body)
  end)
end)
