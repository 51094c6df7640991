-- Chaos: clients that vanish at the worst moments, clients that stop
-- reading, client processes frozen with kill -STOP, all while messages flow
-- to well-behaved clients. Each case runs against its own server
-- (spec/chaos/server.lua) in a process of its own, so its RSS is its own,
-- and ends with the same checks (finish, below): the server is still up and
-- answers; its connection counts (app:stats()) come back exactly to the
-- baseline and its RSS to within RSS_TOLERANCE_KB of it; every well-behaved
-- client (spec/chaos/watcher.lua: SSE and WebSocket in a process of their
-- own, plus curl over https) got every message, numbered 1..N, ids
-- consecutive, then "end N"; on SIGTERM the server exits 0 (under ASan:
-- without a sanitizer report, leaks included) and curl's stream ends.
--
-- The chaos clients run in busted's process on herald.test's raw client
-- (core.connect; reset() closes with SO_LINGER 0, a RST). curl and
-- /usr/bin/python3 (Debian's, with python3-websockets) are the real client
-- processes that get kill -STOP.
--
-- Runs in both flavors (about 30 s in dev, a minute under ASan). Under ASan
-- the RSS figures are reported, not checked: ASan's quarantine holds freed
-- memory back on purpose; LSan's report at the server's exit is the check
-- there. make valgrind runs this file too, with the server (only) under
-- valgrind: HERALD_VALGRIND is the command to put before it; then the
-- vanishing clients are 2,000 (10,000 would take 10 minutes) and the RSS,
-- valgrind's own, is not checked; valgrind's exit status (99 on an error or
-- a definite leak) fails the case.
local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"
local cjson = require "cjson"
local proc = require "spec.support.process"

local flavor = os.getenv("HERALD_BUILD") or "dev"
local VALGRIND = os.getenv("HERALD_VALGRIND")
local WAVE, WAVES = 1000, VALGRIND and 2 or 10 -- vanishing clients: WAVES waves of WAVE at once
local quote = proc.quote
local PYTHON = "/usr/bin/python3"
-- clients are not ours to sanitize
local CLEAN = proc.unsanitized

-- How far over the baseline the server's RSS may stay once the chaos is
-- gone. The baseline is taken once the well-behaved clients are in (and,
-- for the 10,000, after the first wave of 1,000), so one-time growth
-- (OpenSSL's tables, the Lua heap's working size, libuv's) is in it. What
-- remains is the allocator's: glibc keeps some freed memory in its free
-- lists (herald trims after a spike of output chunks, csrc/buf.c, but what
-- is freed after the last trim stays), and Lua's collector holds garbage
-- until its next cycle. Measured: +0.7 to +4.5 MiB after a case (the
-- 10,000: a spike of ~220 MiB). 8 MiB is less than one KiB leaked per
-- connection of the 10,000 (10 MiB); smaller leaks are for the exact
-- counts above, LSan (the ASan run) and valgrind (make valgrind) to find.
local RSS_TOLERANCE_KB = 8192

local cleanups = {}
local function defer(fn) cleanups[#cleanups + 1] = fn end
before_each(function() cleanups = {} end)
after_each(function()
  for i = #cleanups, 1, -1 do pcall(cleanups[i]) end
  cleanups = {}
end)

local dir -- certificate, key, clients' output
local hello -- a real TLS ClientHello (Python's ssl, through memory BIOs)

setup(function()
  -- where the cuts fall is random: the seed is printed, and repeats them
  local seed = tonumber(os.getenv("HERALD_CHAOS_SEED")) or os.time()
  math.randomseed(seed)
  io.stderr:write(("chaos: seed %d (HERALD_CHAOS_SEED=%d repeats the cuts)\n"):format(seed, seed))
  local p = assert(io.popen("mktemp -d /tmp/herald-chaos.XXXXXX"))
  dir = p:read("l")
  p:close()
  assert(os.execute(CLEAN .. ("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes " ..
    "-days 1 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 -keyout %s/key.pem -out %s/cert.pem " ..
    "2>/dev/null"):format(dir, dir)), "openssl req failed")
  local py = assert(io.popen(CLEAN .. PYTHON .. " -c " .. quote(table.concat({
    "import ssl, sys",
    "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)",
    "ctx.check_hostname = False",
    "ctx.verify_mode = ssl.CERT_NONE",
    "i, o = ssl.MemoryBIO(), ssl.MemoryBIO()",
    "s = ctx.wrap_bio(i, o, server_hostname='localhost')",
    "try:\n  s.do_handshake()\nexcept ssl.SSLWantReadError:\n  pass",
    "sys.stdout.buffer.write(o.read())",
  }, "\n"))))
  hello = py:read("a")
  py:close()
  assert(#hello > 100 and hello:byte(1) == 0x16, "no ClientHello from python")
end)

teardown(function()
  if dir and dir:match("^/tmp/herald%-chaos") then os.execute("rm -rf " .. quote(dir)) end
end)

local function report(what, text)
  io.stderr:write(("chaos [%s] %s: %s\n"):format(VALGRIND and "valgrind" or flavor, what, text))
end

-- ---- the world: the server, its stats, the well-behaved clients ----

local function rss_kb(pid)
  local status = proc.slurp(("/proc/%d/status"):format(pid))
  return tonumber(status:match("VmRSS:%s*(%d+)")), tonumber(status:match("VmHWM:%s*(%d+)"))
end

local function stats(w)
  local res = t.get(w.port, "/stats")
  assert.equal(200, res.status, res.body)
  return cjson.decode(res.body)
end

local function post(w, path)
  local res = t.post(w.port, path, "")
  assert.equal(200, res.status, res.body)
  return res.body
end

-- The counts that must come back exactly once the chaos is gone.
local function counts(s)
  return { connections = s.connections, http = s.by_transport.http, sse = s.by_transport.sse,
    ws = s.by_transport.ws, streams = s.streams, subscriptions = s.subscriptions,
    queued_bytes = s.queued_bytes }
end

local function same_counts(a, b)
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  return true
end

local function show_counts(c)
  return ("connections %d (http %d, sse %d, ws %d), streams %d, subscriptions %d, queued %d bytes")
    :format(c.connections, c.http, c.sse, c.ws, c.streams, c.subscriptions, c.queued_bytes)
end

-- Polls the stats until pred(stats) holds; returns them.
local function stats_until(w, pred, timeout, what)
  local s
  local ok, err = pcall(t.wait, function()
    s = stats(w)
    if pred(s) then return true end
    t.sleep(50)
  end, timeout or 20, what)
  if not ok then error(("%s; the last stats: %s"):format(err, s and show_counts(counts(s)) or "none"), 2) end
  return s
end

local function baseline(w)
  local s = stats(w)
  return { counts = counts(s), rss = rss_kb(w.server.pid), stats = s }
end

-- Starts a client process (cmd runs without the sanitizers' variables);
-- its stdout goes to a file, p.out, so it never waits on a pipe.
local function client(w, cmd)
  w.nclients = (w.nclients or 0) + 1
  local out = ("%s/client-%d-%d.out"):format(dir, w.port, w.nclients)
  local p = proc.spawn(("%s%s >%s"):format(CLEAN, cmd, quote(out)), { watchdog = 300 })
  p.out = out
  defer(function() p:stop(1000, "KILL") end)
  return p
end

local function curl_sse(w, url)
  return client(w, ("curl -sSNk --max-time 280 %s"):format(url))
end

-- Starts the server, nsse + nws watchers and a curl over https, all
-- subscribed to "feed"; no message flows yet (flow does that).
local function start_world(nsse, nws)
  local w = { nwatchers = nsse + nws }
  w.server = proc.spawn(("env %s %s lua5.4 spec/chaos/server.lua %s %s"):format(proc.lua_env(), VALGRIND or "",
    quote(dir .. "/cert.pem"), quote(dir .. "/key.pem")), { watchdog = 300, herald = true })
  defer(function()
    local _, exited, stderr = w.server:stop(5000, "KILL")
    if not exited and stderr ~= "" then report("the server's stderr", stderr) end
  end)
  local port, tls_port = w.server:expect("^ports (%d+) (%d+)$")
  w.port, w.tls_port = tonumber(port), tonumber(tls_port)
  w.cold_rss = rss_kb(w.server.pid)
  -- the watchers are clients, not under test: the dev build without the
  -- sanitizers in either flavor, so that they keep up with the bursts
  w.watchers = proc.spawn(("%sLUA_PATH=%s LUA_CPATH=%s lua5.4 spec/chaos/watcher.lua %d %d %d"):format(CLEAN,
    quote("lua/?.lua;lua/?/init.lua;;"), quote("build/dev/?.so;;"), w.port, nsse, nws), { watchdog = 300 })
  defer(function() w.watchers:stop(1000, "KILL") end)
  w.watchers:expect("^ready$")
  w.curl = curl_sse(w, ("https://127.0.0.1:%d/events"):format(w.tls_port))
  w.subscribers = w.nwatchers + 1
  w.complete = { w.curl } -- client processes that must get 1..N and "end N"
  return w
end

-- Once `extra` more clients than the world's are subscribed, a message
-- flows every 5 ms, message 1 first.
local function flow(w, extra)
  w.subscribers = w.subscribers + (extra or 0)
  stats_until(w, function(s) return s.subscriptions == w.subscribers end, 10, "the clients to subscribe")
  post(w, "/flow?ms=5")
end

-- A world with messages flowing, and its baseline.
local function flowing_world(nsse, nws)
  local w = start_world(nsse, nws)
  flow(w)
  return w, baseline(w)
end

-- An SSE client's raw output (head and all): nil if its messages are 1..N
-- in order with consecutive ids then "end N" (total: N; nil: any prefix of
-- a run of consecutive numbers, from any first one), else why not.
local function check_stream(text, total)
  local count, seq = nil, nil
  for block in text:gmatch("(.-)\r?\n\r?\n") do
    local id = block:match("^id: ([^\r\n]*)") or block:match("\nid: ([^\r\n]*)")
    local data = block:match("^data: ([^\r\n]*)") or block:match("\ndata: ([^\r\n]*)")
    if data then
      local s = tonumber((id or ""):match("%-(%d+)$"))
      if not s or (seq and s ~= seq + 1) then return ("id %s after seq %s"):format(id, seq) end
      seq = s
      local last = data:match("^end (%d+)$")
      if last then
        if total and (tonumber(last) ~= count or count ~= total) then
          return ("end %s after %s messages (%d published)"):format(last, count, total)
        end
        return nil
      end
      local n = tonumber(data:match("^(%d+) "))
      if total and not count and n ~= 1 then return ("first message %s"):format(n) end
      if count and n ~= count + 1 then return ("message %s after %d"):format(n, count) end
      count = n
    end
  end
  if total then return ("no end after %s messages"):format(count) end
  return nil
end

-- The checks every case ends with (see the top of the file); base: the
-- baseline. Returns a summary of the figures.
local function finish(w, base)
  assert.is_true(w.server:running(), "the server died")
  -- the counts come back exactly, once the server has closed what vanished
  local s = stats_until(w, function(s) return same_counts(counts(s), base.counts) end, 30,
    "the connection counts to come back to the baseline")
  local rss, hwm = rss_kb(w.server.pid)
  -- the flow ends: every watcher must have seen 1..N then "end N"
  local total = tonumber(post(w, "/end"))
  local results = {}
  while true do
    local line = w.watchers:line()
    if not line or line == "done" then break end
    if line:match("^result ") then results[#results + 1] = line end
  end
  assert.equal(w.nwatchers, #results, "watchers' results")
  for _, line in ipairs(results) do
    assert.matches("^result %a+ %d+ ok " .. total .. "$", line)
  end
  local in_time, exited, stderr = w.server:stop(10000)
  assert.is_true(in_time, "the server did not stop on SIGTERM within 10 s")
  assert.is_true(exited, "the server's exit status was not 0" ..
    (VALGRIND and " (under valgrind: see its log, build/valgrind/chaos-server.*.log)" or "") .. ":\n" .. stderr)
  assert.is_falsy(stderr:find("Sanitizer", 1, true), stderr)
  assert.is_falsy(stderr:find("runtime error", 1, true), stderr)
  -- the server is gone: curl's streams end; each got everything
  for _, p in ipairs(w.complete) do
    p:stop(3000)
    local bad = check_stream(proc.slurp(p.out), total)
    assert.is_nil(bad, "a well-behaved curl: " .. tostring(bad))
  end
  local summary = ("%d messages to %d well-behaved clients; server RSS cold %d KiB, baseline %d KiB, " ..
    "peak %d KiB, after %d KiB (%+d KiB); after: %s"):format(total, w.subscribers, w.cold_rss, base.rss, hwm,
    rss, rss - base.rss, show_counts(counts(s)))
  if flavor ~= "asan" and not VALGRIND then
    assert.is_true(rss - base.rss <= RSS_TOLERANCE_KB, "RSS did not come back: " .. summary)
  end
  return summary
end

-- ---- chaos clients (in this process) ----

local REQ_SSE = "GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
local function upgrade(path)
  return ("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"):format(path)
end
local REQ_WS = upgrade("/ws")
local MID_WRITE = { "GET /big HTTP/1.1\r\nHost: x\r\n\r\n", upgrade("/wsbig"),
  "GET /ssebig HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n" }

-- Each kind: to which port (tls), what to do once connected, and on data
-- (cl.buf holds what came). cl:vanish() drops the connection 0-10 ms later
-- (by then the server has mostly read what was sent): a FIN for odd
-- clients, a RST for even ones.
local kinds = {
  { name = "HTTP head cut", connect = function(cl)
      cl:send(REQ_SSE:sub(1, math.random(0, #REQ_SSE - 1)))
      cl:vanish()
    end },
  { name = "WebSocket upgrade cut", connect = function(cl)
      cl:send(REQ_WS:sub(1, math.random(0, #REQ_WS - 1)))
      cl:vanish()
    end },
  { name = "TLS ClientHello cut or the server's answer unread", tls = true, connect = function(cl)
      if cl.i % 4 < 2 then -- cut the hello
        cl:send(hello:sub(1, math.random(0, #hello - 1)))
        cl:vanish()
      else -- the whole hello; gone as the server's flight arrives
        cl:send(hello)
      end
    end,
    data = function(cl) cl:vanish(0) end },
  { name = "WebSocket frame cut (head or payload)", connect = function(cl) cl:send(REQ_WS) end,
    data = function(cl)
      if cl.framed or not cl.buf:find("\r\n\r\n", 1, true) then return end
      cl.framed = true
      local size = ({ 5, 300, 70000 })[cl.i % 3 + 1] -- each length encoding
      local frame = t.ws_frame(cl.i % 2 == 0 and "text" or "binary", ("a"):rep(size))
      cl:send(frame:sub(1, math.random(1, #frame - 1)))
      cl:vanish()
    end },
  { name = "mid-write (1 MiB HTTP answer, WebSocket or SSE burst)", connect = function(cl)
      cl:send(MID_WRITE[cl.i % 3 + 1])
    end,
    data = function(cl)
      if cl.paused then return end
      cl.paused = true
      cl.sock:pause() -- the rest stays unread: closing then sends a RST too
      cl:vanish()
    end },
}
local MID_WRITE_KIND = kinds[5]

local client_methods = {}
local client_mt = { __index = client_methods }

function client_methods:send(bytes)
  if #bytes > 0 and not self.gone then self.sock:write(bytes) end
end

function client_methods:drop()
  if self.gone then return end
  self.gone = true
  if self.i % 2 == 0 then self.sock:reset() else self.sock:close() end
end

function client_methods:vanish(ms)
  if self.vanishing then return end
  self.vanishing = true
  herald.after(ms or math.random(0, 10), function() self:drop() end)
end

-- One wave: size clients at once, of the kinds in turn (all of them unless
-- given); returns once every one has vanished. tally[kind name]: launched,
-- connected, closed first by the server.
local function wave(w, size, first, tally, only)
  local list = only or kinds
  local clients = {}
  for j = 0, size - 1 do
    local i = first + j
    local kind = list[i % #list + 1]
    local cl = setmetatable({ i = i, kind = kind, buf = "" }, client_mt)
    tally[kind.name] = tally[kind.name] or { launched = 0, connected = 0, server_closed = 0 }
    local k = tally[kind.name]
    k.launched = k.launched + 1
    cl.sock = assert(core.connect("127.0.0.1", kind.tls and w.tls_port or w.port, function(event, data)
      if event == "connect" then
        k.connected = k.connected + 1
        kind.connect(cl)
      elseif event == "data" then
        if cl.gone then return end
        cl.buf = cl.buf .. data
        if kind.data then kind.data(cl) end
      elseif not cl.gone then -- eof or error before we dropped it: the server closed first
        k.server_closed = k.server_closed + 1
        cl.gone = true
        cl.sock:close()
      end
    end))
    clients[#clients + 1] = cl
  end
  t.wait(function()
    for _, cl in ipairs(clients) do if not cl.gone then return false end end
    return true
  end, 60, "a wave of chaos clients to vanish")
end

local function show_tally(tally)
  local lines, launched, connected = {}, 0, 0
  for _, kind in ipairs(kinds) do
    local k = tally[kind.name]
    if k then
      launched, connected = launched + k.launched, connected + k.connected
      lines[#lines + 1] = ("%s %d (closed first by the server: %d)"):format(kind.name, k.launched, k.server_closed)
    end
  end
  return table.concat(lines, ", "), launched, connected
end

-- 2,500 messages of 4 KiB in a second: 10 MiB to each subscriber,
-- well past max_queued (64 KiB) plus what the kernel takes for a peer that
-- does not read (here the server's send buffer grows to 4 MiB: tcp_wmem).
local BURST = "/burst?n=2500&size=4096&per=25&ms=10"

-- A raw client that completes the SSE or WebSocket handshake on /events or
-- /ws and then stops reading; c.chunks: what it read, c.closed: the
-- server closed it (seen once it reads again: c.sock:resume()).
local function stalled(w, kind)
  local c = { kind = kind, chunks = {} }
  c.sock = assert(core.connect("127.0.0.1", w.port, function(event, data)
    if event == "connect" then
      c.sock:write(kind == "sse" and REQ_SSE or REQ_WS)
    elseif event == "data" then
      c.chunks[#c.chunks + 1] = data
      if not c.head and table.concat(c.chunks):find("\r\n\r\n", 1, true) then
        c.head = true
        c.sock:pause()
      end
    else
      c.closed = true
      c.sock:close()
    end
  end))
  defer(function() c.sock:close() end)
  t.wait(function() return c.head or c.closed end, 5, "a slow client's answer head")
  assert(c.head, "a slow client got no answer")
  return c
end

describe("chaos", function()
  local total = ("%d,%03d"):format(WAVE * WAVES // 1000, WAVE * WAVES % 1000)
  it(total .. " clients vanish mid-handshake (HTTP head, WebSocket upgrade, TLS hello), mid-frame, "
    .. "mid-write", function()
    local started = core.now()
    local w = start_world(4, 4)
    flow(w)
    local tally = {}
    -- the first wave warms the server up; the baseline is taken after it
    wave(w, WAVE, 0, tally)
    stats_until(w, function(s)
      return s.connections == w.subscribers + 1 and s.by_transport.http == 1 -- + this request
    end, 30, "the first wave to be gone")
    local base = baseline(w)
    local most = 0
    for n = 2, WAVES do
      wave(w, WAVE, (n - 1) * WAVE, tally)
      most = math.max(most, stats(w).connections) -- a well-behaved request between waves: answered
    end
    local kinds_seen, launched, connected = show_tally(tally)
    assert.equal(WAVE * WAVES, launched)
    assert.equal(WAVE * WAVES, connected)
    local summary = finish(w, base)
    report(total .. " vanishing clients", ("%s; %s; most connections left between waves: %d; %.1f s"):format(
      kinds_seen, summary, most, (core.now() - started) / 1000))
  end)

  it("a peer that resets while the server writes to it does not end the server (no SIGPIPE)", function()
    local w, base = flowing_world(1, 1)
    local tally = {}
    wave(w, 300, 0, tally, { MID_WRITE_KIND })
    assert.equal(300, tally[MID_WRITE_KIND.name].connected)
    report("resets mid-write", finish(w, base))
  end)

  it("clients that stop reading during a burst are cut off by max_queued; the others get everything", function()
    local w, base = flowing_world(4, 4)
    local slow = {}
    for i = 1, 100 do slow[i] = stalled(w, i % 2 == 0 and "sse" or "ws") end
    stats_until(w, function(s) return s.subscriptions == base.counts.subscriptions + 100 end, 10,
      "the slow clients to subscribe")
    local closed_before = base.stats.slow_closed
    post(w, BURST)
    local s = stats_until(w, function(s)
      return s.subscriptions == base.counts.subscriptions and s.slow_closed - closed_before >= 100
    end, 30, "the slow clients to be closed")
    assert.equal(100, s.slow_closed - closed_before)
    -- they read again: what they got is in order, then the end
    for _, c in ipairs(slow) do c.sock:resume() end
    t.wait(function()
      for _, c in ipairs(slow) do if not c.closed then return false end end
      return true
    end, 20, "the slow clients to see their connection closed")
    local received = 0
    for _, c in ipairs(slow) do
      if c.kind == "sse" then
        local text = table.concat(c.chunks)
        assert.is_nil(check_stream(text))
        received = received + #text
      end
    end
    report("slow consumers", ("100 stopped reading, 100 closed (slow_closed), SSE ones had read %d KiB each " ..
      "on average; %s"):format(received // 50 // 1024, finish(w, base)))
  end)

  it("kill -STOP of client processes (curl SSE, python websockets) as messages flow, then -CONT or -KILL", function()
    local w = start_world(2, 2)
    -- B: curl on SSE, stopped 1 s and continued before the burst: must get everything
    local b = curl_sse(w, ("http://127.0.0.1:%d/events"):format(w.port))
    w.complete[#w.complete + 1] = b
    flow(w, 1)
    local base = baseline(w)
    -- A: python websockets, stopped through the burst, then continued;
    -- C: curl on SSE, stopped through the burst, then killed
    local a = client(w, ("%s spec/chaos/ws_reader.py ws://127.0.0.1:%d/ws"):format(PYTHON, w.port))
    local c = curl_sse(w, ("http://127.0.0.1:%d/events"):format(w.port))
    stats_until(w, function(s) return s.subscriptions == base.counts.subscriptions + 2 end, 10,
      "python and curl to subscribe")
    proc.sleep(300)
    for _, p in ipairs { a, b, c } do p:signal("STOP") end
    proc.sleep(1000) -- ~200 messages: the kernel's buffers hold them
    b:signal("CONT")
    proc.sleep(200)
    local closed_before = stats(w).slow_closed
    post(w, BURST)
    local s = stats_until(w, function(s)
      return s.subscriptions == base.counts.subscriptions and s.slow_closed - closed_before >= 2
    end, 30, "the stopped clients to be closed")
    assert.equal(2, s.slow_closed - closed_before)
    a:signal("CONT")
    c:signal("KILL")
    -- python reads what reached it, in order, and sees the connection drop
    local ok = pcall(t.wait, function() return proc.slurp(a.out):find("\nclosed ") end, 20,
      "python to see its connection closed")
    local out = proc.slurp(a.out)
    assert(ok, "python did not see its connection closed; its output ends with: " .. out:sub(-300))
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal("open", lines[1], out:sub(1, 200))
    assert.equal("closed 1006", lines[#lines], out:sub(-200))
    assert.is_true(#lines > 3, "python got no message")
    for i = 3, #lines - 1 do
      local seq, n = lines[i]:match("%-(%d+) (%d+)$")
      local pseq, pn = lines[i - 1]:match("%-(%d+) (%d+)$")
      assert.equal(tonumber(pseq) + 1, tonumber(seq), lines[i])
      assert.equal(tonumber(pn) + 1, tonumber(n), lines[i])
    end
    assert.is_nil(check_stream(proc.slurp(c.out)))
    report("kill -STOP", ("python websockets got %d messages in order, then its connection closed (1006); " ..
      "curl killed; %s"):format(#lines - 2, finish(w, base)))
  end)
end)
