-- TLS with real peers: herald apps in this process listen with tls on
-- port 0, and curl, `openssl s_client` and Python's websockets (over wss)
-- talk to them as background processes while the spec runs the loop; one
-- app runs as a subprocess under herald.run() for SIGHUP. Certificates (EC
-- P-256, self-signed, names in subjectAltName) are made at run time with the
-- openssl CLI in a temporary folder, removed at the end.
--
-- Under the ASan run the apps in this process are the ASan build, and so is
-- the subprocess (it keeps the run's LD_PRELOAD and sanitizer options);
-- curl, openssl and python run without them. Every client runs under
-- timeout(1) in a process group of its own, is killed after each spec if it
-- is still there, and its exit is reaped.
local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"

local flavor = os.getenv("HERALD_BUILD") or "dev"
local PYTHON = "/usr/bin/python3" -- Debian's, with python3-websockets
local SANITIZER_VARS = { "LD_PRELOAD", "ASAN_OPTIONS", "LSAN_OPTIONS", "UBSAN_OPTIONS" }
-- clients are not ours to sanitize
local CLEAN = "exec env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS "

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = f:read("a")
  f:close()
  return data
end

local function write(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

local function copy(from, to) write(to, assert(slurp(from))) end

-- A Lua pattern matching s literally.
local function literal(s) return (s:gsub("%p", "%%%0")) end

local dir -- the temporary folder: certificates, scripts, clients' output

-- Runs a command to its end without the loop (for what needs no server).
local function run(cmd)
  local p = assert(io.popen(CLEAN .. "sh -c " .. quote(cmd .. " 2>&1")))
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

-- ---- background processes ----

local jobs = {} -- started and not reaped yet
local job_count = 0
local job_methods = {}
local job_mt = { __index = job_methods }

-- Starts the shell command cmd in the background under timeout(1) (opts.limit
-- seconds, 10 unless given; SIGKILL 1 s after its SIGTERM), which puts it in
-- a process group of its own; stdin is opts.input (or nothing), stdout and
-- stderr go to files. opts.env: "NAME=value ..." for cmd (the sanitizer
-- variables are removed before).
local function spawn(cmd, opts)
  opts = opts or {}
  job_count = job_count + 1
  local base = ("%s/job%d"):format(dir, job_count)
  local j = setmetatable({ cmd = cmd, out = base .. ".out", err = base .. ".err", done = base .. ".done" },
    job_mt)
  local stdin = "/dev/null"
  if opts.input then
    stdin = base .. ".in"
    write(stdin, opts.input)
  end
  local script = ("exec 2>/dev/null; %s timeout -k 1 %g sh -c %s <%s >%s 2>%s & " ..
    "echo $!; wait $!; echo $? >%s; mv %s %s"):format(opts.env and ("env " .. opts.env) or "",
      opts.limit or 10, quote(cmd), quote(stdin), quote(j.out), quote(j.err),
      quote(j.done .. ".tmp"), quote(j.done .. ".tmp"), quote(j.done))
  j.pipe = assert(io.popen(CLEAN .. "sh -c " .. quote(script)))
  j.pid = assert(tonumber(j.pipe:read("l")), "no pid from the job's shell")
  jobs[j] = true
  return j
end

function job_methods:finished()
  return slurp(self.done) ~= nil
end

function job_methods:output()
  return slurp(self.out) or ""
end

function job_methods:errors()
  return slurp(self.err) or ""
end

function job_methods:reap()
  if self.pipe then
    self.pipe:close()
    self.pipe = nil
  end
  jobs[self] = nil
end

-- Runs the loop until the job ends (raises after limit seconds); returns its
-- exit status (124 when timeout(1) ended it), stdout and stderr.
function job_methods:wait(limit)
  t.wait(function() return self:finished() end, limit or 15, "`" .. self.cmd .. "` to end")
  self:reap()
  return tonumber(slurp(self.done)), self:output(), self:errors()
end

-- SIGKILL to the job's process group (to timeout(1) alone if it has not made
-- its group yet), then reaps the job's shell.
function job_methods:kill()
  if not self.pipe then return end
  os.execute(("kill -KILL -%d 2>/dev/null || kill -KILL %d 2>/dev/null"):format(self.pid, self.pid))
  local deadline = core.now() + 3000
  while not self:finished() and core.now() < deadline do t.sleep(20) end
  self:reap()
end

local function kill_jobs()
  for j in pairs(jobs) do j:kill() end
end

-- ---- clients ----

local function curl(port, args, limit)
  limit = limit or 8
  return spawn(("curl -sS -k --max-time %d --resolve a.test:%d:127.0.0.1 --resolve b.test:%d:127.0.0.1 %s")
    :format(limit, port, port, args), { limit = limit + 2 })
end

local PING = "GET /ping HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"

-- openssl s_client on 127.0.0.1:port sending input (a GET /ping unless
-- given) and reading until the server closes.
local function s_client(port, args, input)
  return spawn(("openssl s_client -connect 127.0.0.1:%d -ign_eof %s"):format(port, args),
    { input = input or PING })
end

-- Runs s_client to its end; returns its status and everything it printed.
local function handshake(port, args, input)
  local code, out, err = s_client(port, args, input):wait()
  return code, out .. err
end

-- The certificate's subject as s_client prints it: "CN = b.test" -> "b.test".
local function subject(output)
  return output:match("\nsubject=CN%s*=%s*([^\n]*)")
end

-- The data lines of an event stream, in order.
local function sse_data(text)
  local list = {}
  for line in text:gmatch("([^\n]*)\n") do
    local data = line:match("^data: ?(.*)$")
    if data then list[#list + 1] = data end
  end
  return list
end

-- ---- apps ----

local apps = {}

-- The certificates made in setup: cert[name] = { cert = file, key = file }.
local certs = {}

local function tls_options(extra)
  local tls = { { cert = certs.a.cert, key = certs.a.key }, { cert = certs.b.cert, key = certs.b.key },
    { cert = certs.c.cert, key = certs.c.key } }
  for k, v in pairs(extra or {}) do tls[k] = v end
  return tls
end

-- An app listening with TLS on a free port; returns it and the port.
-- tls: the listen's tls table (a, b, and c by default).
local function new_app(tls, app_opts)
  local app = herald.new(app_opts)
  apps[#apps + 1] = app
  app:get("/ping", function(_, res) res:send("pong") end)
  app:get("/peer", function(req, res)
    local _, port = req:peer()
    res:send(tostring(port) .. "\n")
  end)
  local big = {}
  for i = 1, 1024 * 1024 / 64 do big[i] = ("%063d\n"):format(i) end
  big = table.concat(big)
  app:get("/big", function(_, res) res:send(big) end)
  app:sse("/events", function(stream) assert(stream:subscribe("news")) end)
  app:ws("/ws", { message = function(ws, data, kind) ws:send(data, kind) end })
  local port = assert(app:listen { host = "127.0.0.1", port = 0, tls = tls or tls_options() })
  return app, port
end

local function close_apps()
  for i = #apps, 1, -1 do
    local app = apps[i]
    apps[i] = nil
    app:close()
    pcall(t.wait, function() return app:connections() == 0 end, 5)
  end
end

-- The app answers a GET over https (a new connection).
local function assert_serves(port)
  local code, out, err = curl(port, "https://a.test:" .. port .. "/ping"):wait()
  assert.equal(0, code, "curl: " .. err)
  assert.equal("pong", out)
end

local function make_cert(name, names)
  local san = {}
  for i, n in ipairs(names) do san[i] = "DNS:" .. n end
  local cert, key = ("%s/%s.pem"):format(dir, name), ("%s/%s.key"):format(dir, name)
  local ok, out = run(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 " ..
    "-subj %s -addext %s -keyout %s -out %s"):format(quote("/CN=" .. names[1]),
      quote("subjectAltName=" .. table.concat(san, ",")), quote(key), quote(cert)))
  assert(ok, "openssl req failed:\n" .. out)
  certs[name] = { cert = cert, key = key }
end

describe("tls", function()
  setup(function()
    dir = os.tmpname() -- a unique name: made into a folder
    os.remove(dir)
    assert(os.execute("mkdir -m 700 " .. quote(dir)))
    make_cert("a", { "a.test" })
    make_cert("b", { "b.test" })
    make_cert("c", { "c.test", "*.c.test" })
    write(dir .. "/garbage.pem", "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n" ..
      "-----END CERTIFICATE-----\n")
    write(dir .. "/junk", "not PEM at all\n")
  end)

  teardown(function()
    kill_jobs()
    close_apps()
    if dir and dir:match("^/tmp/") then os.execute("rm -rf " .. quote(dir)) end
  end)

  after_each(function()
    close_apps() -- streams end cleanly first
    kill_jobs()
  end)

  describe("https", function()
    it("answers GETs, two on one kept-alive connection, with ALPN http/1.1", function()
      local _, port = new_app()
      local url = "https://a.test:" .. port
      local code, out, err = curl(port, ("-w '%%{num_connects} %%{http_version}\\n' %s/peer %s/peer")
        :format(url, url)):wait()
      assert.equal(0, code, "curl: " .. err)
      local peer1, connects1, version1, peer2, connects2, version2 =
        out:match("^(%d+)\n(%d) (%S+)\n(%d+)\n(%d) (%S+)\n$")
      assert(peer1, "unexpected output: " .. out)
      assert.equal("1", connects1)
      assert.equal("0", connects2) -- the second reused the connection
      assert.equal(peer1, peer2)   -- as the server saw it: the same client port
      assert.equal("1.1", version1) -- curl offered h2 and http/1.1
      assert.equal("1.1", version2)
    end)

    it("sends a 1 MiB answer and reads a 300 KiB body whole", function()
      local app, port = new_app()
      local body = {}
      for i = 1, 300 * 1024 / 32 do body[i] = ("%031d\n"):format(i * 7) end
      body = table.concat(body)
      write(dir .. "/body", body)
      local got
      app:post("/check", function(req, res)
        got = req.body
        res:send(tostring(#req.body))
      end)
      local url = "https://a.test:" .. port
      local big = curl(port, ("-o %s %s/big"):format(quote(dir .. "/big"), url))
      local post = curl(port, ("--data-binary @%s %s/check"):format(quote(dir .. "/body"), url))
      local code, _, err = big:wait()
      assert.equal(0, code, "curl: " .. err)
      local code2, out2, err2 = post:wait()
      assert.equal(0, code2, "curl: " .. err2)
      assert.equal(tostring(#body), out2)
      assert.is_true(got == body, "the body arrived changed")
      local data = assert(slurp(dir .. "/big"))
      assert.equal(1024 * 1024, #data)
      assert.equal(("%063d\n"):format(1), data:sub(1, 64))
      assert.equal(("%063d\n"):format(16384), data:sub(-64))
    end)

    it("answers pipelined requests in order while big answers hold the input back", function()
      local app, port = new_app()
      local pad = ("p"):rep(300 * 1024) -- each answer alone is over the 256 KiB pause mark
      app:get("/blob/:n", function(req, res) res:send(req.params.n .. "\n" .. pad) end)
      local requests = {}
      for i = 1, 16 do
        requests[i] = ("GET /blob/%d HTTP/1.1\r\nHost: a.test\r\nX-Pad: %s\r\n\r\n"):format(i, ("x"):rep(3000))
      end
      requests[17] = PING -- Connection: close
      -- 48 KB of requests at once: several records, most of them read (and
      -- held) while the first answers wait
      local code, out, err = s_client(port, "-tls1_3 -noservername -quiet", table.concat(requests)):wait()
      assert.equal(0, code, err)
      local seen = {}
      for n in out:gmatch("\r\n\r\n(%d+)\n") do seen[#seen + 1] = tonumber(n) end
      local expected = {}
      for i = 1, 16 do expected[i] = i end
      assert.same(expected, seen)
      local _, answers = out:gsub("HTTP/1%.1 200 OK\r\n", "")
      assert.equal(17, answers)
      assert.equal("\r\n\r\npong", out:sub(-8)) -- then the server closed
      -- the app's total of queued bytes counts plaintext until it is encrypted, then ciphertext
      t.wait(function() return app:stats().queued_bytes == 0 end, 2, "nothing queued")
    end)

    it("streams SSE events as they are published; a shutdown ends the stream cleanly", function()
      local app, port = new_app()
      local j = curl(port, "-N https://a.test:" .. port .. "/events")
      t.wait(function() return app:subscribers("news") == 1 end, 8, "curl's subscription")
      app:publish("news", "first")
      t.wait(function() return #sse_data(j:output()) == 1 end, 5, "the first event")
      for i = 2, 5 do app:publish("news", "event " .. i, { event = "n" }) end
      t.wait(function() return #sse_data(j:output()) == 5 end, 5, "five events")
      assert.same({ "first", "event 2", "event 3", "event 4", "event 5" }, sse_data(j:output()))
      -- shutting the app down ends the stream: curl sees the end of a
      -- close-delimited body, not an error
      app:close()
      local code, _, err = j:wait()
      assert.equal(0, code, "curl: " .. err)
    end)
  end)

  describe("openssl s_client", function()
    it("negotiates TLS 1.3 and TLS 1.2, and serves over each", function()
      local _, port = new_app()
      for _, v in ipairs { { "-tls1_3", "TLSv1.3" }, { "-tls1_2", "TLSv1.2" } } do
        local code, out = handshake(port, v[1] .. " -servername a.test")
        assert.equal(0, code, out)
        assert.matches("Protocol%s*: " .. literal(v[2]), out)
        assert.matches("New, " .. literal(v[2]) .. ", Cipher is ", out)
        assert.matches("HTTP/1%.1 200 OK\r\n.*\r\n\r\npong", out)
      end
      -- TLS 1.2 uses the forward-secret AEAD list
      local _, out = handshake(port, "-tls1_2 -servername a.test")
      assert.matches("Cipher is ECDHE%-ECDSA%-[%w%-]*GCM", out)
    end)

    it("refuses TLS 1.1 and TLS 1.0 with a protocol_version alert", function()
      local _, port = new_app()
      for _, v in ipairs { "-tls1_1", "-tls1" } do
        -- security level 0: the client really offers the old version
        local code, out = handshake(port, v .. " -cipher DEFAULT:@SECLEVEL=0 -servername a.test")
        assert.are_not.equal(0, code, out)
        assert.matches("alert protocol version", out)
        assert.not_matches("pong", out)
      end
      assert_serves(port)
    end)

    it("selects ALPN http/1.1 when offered, and goes on without ALPN otherwise", function()
      local _, port = new_app()
      local code, out = handshake(port, "-alpn h2,http/1.1 -servername a.test")
      assert.equal(0, code, out)
      assert.matches("ALPN protocol: http/1.1", out)
      code, out = handshake(port, "-alpn h2 -servername a.test")
      assert.equal(0, code, out)
      assert.matches("No ALPN negotiated", out)
      assert.matches("\r\n\r\npong", out)
    end)

    it("picks the certificate by SNI, the first one by default", function()
      local _, port = new_app()
      for _, case in ipairs {
        { "-servername b.test", "b.test" },
        { "-servername a.test", "a.test" },
        { "-servername B.TEST", "b.test" },  -- names match without regard to case
        { "-servername x.c.test", "c.test" }, -- a wildcard name
        { "-servername c.test", "c.test" },
        { "-servername other.test", "a.test" },
        { "-servername y.x.c.test", "a.test" }, -- a wildcard covers one label
        { "-noservername", "a.test" },
      } do
        local code, out = handshake(port, "-tls1_3 " .. case[1])
        assert.equal(0, code, out)
        assert.equal(case[2], subject(out), case[1])
        code, out = handshake(port, "-tls1_2 " .. case[1])
        assert.equal(0, code, out)
        assert.equal(case[2], subject(out), "TLS 1.2 " .. case[1])
      end
    end)

    it("resumes sessions from tickets on TLS 1.2 and TLS 1.3", function()
      local _, port = new_app()
      for _, v in ipairs { { "-tls1_2", "TLSv1.2" }, { "-tls1_3", "TLSv1.3" } } do
        local session = ("%s/session%s"):format(dir, v[1])
        local code, out = handshake(port, ("%s -servername b.test -sess_out %s"):format(v[1], quote(session)))
        assert.equal(0, code, out)
        assert.matches("New, " .. literal(v[2]), out)
        code, out = handshake(port, ("%s -servername b.test -sess_in %s"):format(v[1], quote(session)))
        assert.equal(0, code, out)
        assert.matches("Reused, " .. literal(v[2]), out)
        assert.equal("b.test", subject(out))
        assert.matches("\r\n\r\npong", out)
      end
    end)

    it("sends close_notify before closing: after a Connection: close answer, and when a drain ends a stream",
      function()
        local app, port = new_app()
        for _, v in ipairs { "-tls1_3", "-tls1_2" } do
          local code, out = handshake(port, v .. " -noservername")
          assert.equal(0, code, out)
          assert.matches("\r\n\r\npong", out)
          assert.matches("closed\n", out) -- s_client's word for a close_notify
          assert.not_matches("unexpected eof", out)
        end
        local j = s_client(port, "-tls1_3 -noservername", "GET /events HTTP/1.1\r\nHost: a.test\r\n\r\n")
        t.wait(function() return app:subscribers("news") == 1 end, 8, "s_client's subscription")
        app:publish("news", "one")
        t.wait(function() return j:output():match("data: one\n") end, 5, "the event")
        app:close()
        local code, out, err = j:wait()
        assert.equal(0, code, out .. err)
        assert.matches("closed\n", out)
        assert.not_matches("unexpected eof", out .. err)
      end)

    it("answers a request the client follows at once with its close_notify, then sends its own", function()
      local _, port = new_app()
      for _, v in ipairs { "1.3", "1.2" } do
        local code, out, err = spawn(("%s spec/tls/half_close.py %d %s"):format(PYTHON, port, v)):wait()
        assert.equal(0, code, out .. err)
        local version, rest = out:match("^(%S+)\n(.*)$")
        assert.equal("TLSv" .. v, version)
        assert.matches("^HTTP/1%.1 200 OK\r\n.*\r\n\r\npong<close_notify><eof>\n$", rest)
      end
    end)

    it("gathers what one loop turn queues into few records", function()
      local app, port = new_app()
      local j = s_client(port, "-tls1_2 -noservername -msg", "GET /events HTTP/1.1\r\nHost: a.test\r\n\r\n")
      t.wait(function() return app:subscribers("news") == 1 end, 8, "s_client's subscription")
      t.wait(function() return j:output():match("X%-Accel%-Buffering: no\r?\n") end, 5, "the stream's head")
      for i = 1, 100 do app:publish("news", "m" .. i) end -- one turn: one flush
      t.wait(function() return j:output():match("data: m100\n") end, 5, "the 100 events")
      app:close()
      local _, out = j:wait()
      -- application data records (type 0x17) the server sent
      local records, bytes = 0, 0
      for hi, lo in out:gmatch("<<< TLS 1%.2, RecordHeader[^\n]*\n%s*17 03 03 (%x%x) (%x%x)") do
        records = records + 1
        bytes = bytes + tonumber(hi .. lo, 16)
      end
      assert.equal(100, #sse_data(out))
      -- the head's record, then the burst's (about 2.7 KB): not one per event
      assert.is_true(records >= 2 and records <= 3, records .. " records of data")
      assert.is_true(bytes > 100 * 20, bytes .. " bytes of data")
    end)

    it("refuses a renegotiation on TLS 1.2 and keeps serving", function()
      local app, port = new_app()
      -- another client, streaming, while it happens
      local stream = curl(port, "-N https://b.test:" .. port .. "/events")
      t.wait(function() return app:subscribers("news") == 1 end, 8, "curl's subscription")
      -- "R" asks s_client to renegotiate; then a request that must not be answered
      local j = spawn(("(printf 'R\\n'; sleep 1; printf %s; sleep 1) | " ..
        "openssl s_client -connect 127.0.0.1:%d -tls1_2 -servername a.test"):format(quote(PING), port))
      local code, out = j:wait()
      out = out .. j:errors()
      assert.matches("RENEGOTIATING", out)
      assert.are_not.equal(0, code, out)
      assert.matches("no renegotiation", out) -- the server's no_renegotiation alert
      assert.not_matches("pong", out)
      app:publish("news", "still here")
      t.wait(function() return sse_data(stream:output())[1] == "still here" end, 5, "the stream's event")
      assert_serves(port)
      t.wait(function() return app:connections() == 1 end, 5, "the renegotiating connection to go")
    end)
  end)

  describe("wss", function()
    it("echoes text, binary, 64 KiB and fragmented messages", function()
      local _, port = new_app()
      local code, out, err = spawn(("%s spec/tls/wss_echo.py wss://127.0.0.1:%d/ws b.test"):format(PYTHON, port))
        :wait()
      assert.equal(0, code, out .. err)
      assert.matches("^tls TLSv1%.3 http/1%.1\n", out)
      local oks = 0
      for _ in out:gmatch("\nok ") do oks = oks + 1 end
      assert.equal(8, oks, out)
      assert.matches("\nclosed 1000\n$", out)
    end)
  end)

  describe("reload", function()
    it("app:reload_tls() serves new certificates to new connections; open streams go on", function()
      local live = { cert = dir .. "/live.pem", key = dir .. "/live.key" }
      copy(certs.a.cert, live.cert)
      copy(certs.a.key, live.key)
      local app, port = new_app { cert = live.cert, key = live.key }
      local stream = curl(port, "-N https://a.test:" .. port .. "/events", 15)
      t.wait(function() return app:subscribers("news") == 1 end, 8, "curl's subscription")
      local code, out = handshake(port, "-noservername")
      assert.equal(0, code, out)
      assert.equal("a.test", subject(out))

      -- new files: new connections get them, the stream goes on
      copy(certs.b.cert, live.cert)
      copy(certs.b.key, live.key)
      assert.is_true(app:reload_tls())
      code, out = handshake(port, "-noservername")
      assert.equal(0, code, out)
      assert.equal("b.test", subject(out))
      app:publish("news", "after the reload")
      t.wait(function() return #sse_data(stream:output()) == 1 end, 5, "the stream's first event")

      -- a bad certificate: nil and the message; the last good one stays
      write(live.cert, "garbage\n")
      local ok, err = app:reload_tls()
      assert.is_nil(ok)
      assert.matches("^tls: certificate " .. literal(live.cert) .. ": ", err)
      code, out = handshake(port, "-noservername")
      assert.equal(0, code, out)
      assert.equal("b.test", subject(out))

      -- a key that does not go with the certificate: the same
      copy(certs.a.cert, live.cert)
      ok, err = app:reload_tls()
      assert.is_nil(ok)
      assert.matches(literal(live.key), err)
      code, out = handshake(port, "-noservername")
      assert.equal(0, code, out)
      assert.equal("b.test", subject(out))

      app:publish("news", "after the failed reloads")
      t.wait(function() return #sse_data(stream:output()) == 2 end, 5, "the stream's second event")
      assert.same({ "after the reload", "after the failed reloads" }, sse_data(stream:output()))
      assert.equal(1, app:subscribers("news"))
    end)

    it("is all or nothing across an app's listeners; plain listeners are left alone", function()
      local files = {}
      for i = 1, 2 do
        files[i] = { cert = ("%s/multi%d.pem"):format(dir, i), key = ("%s/multi%d.key"):format(dir, i) }
        copy(certs.a.cert, files[i].cert)
        copy(certs.a.key, files[i].key)
      end
      local app, port1 = new_app { cert = files[1].cert, key = files[1].key }
      local port2 = assert(app:listen { host = "127.0.0.1", port = 0,
        tls = { cert = files[2].cert, key = files[2].key } })
      local plain = assert(app:listen { host = "127.0.0.1", port = 0 })
      local function subjects()
        local _, out1 = handshake(port1, "-noservername")
        local _, out2 = handshake(port2, "-noservername")
        return { subject(out1), subject(out2) }
      end
      -- either one bad: neither listener changes, whichever is read first
      for bad = 1, 2 do
        for i = 1, 2 do
          copy(certs.b.cert, files[i].cert)
          copy(certs.b.key, files[i].key)
        end
        write(files[bad].cert, "garbage\n")
        local ok, err = app:reload_tls()
        assert.is_nil(ok)
        assert.matches(literal(files[bad].cert), err)
        assert.same({ "a.test", "a.test" }, subjects())
      end
      copy(certs.b.cert, files[2].cert)
      assert.is_true(app:reload_tls())
      assert.same({ "b.test", "b.test" }, subjects())
      assert.equal("pong", t.get(plain, "/ping").body)
    end)

    it("SIGHUP under herald.run reloads; a bad certificate is logged and the old one kept", function()
      local live = { cert = dir .. "/hup.pem", key = dir .. "/hup.key" }
      copy(certs.a.cert, live.cert)
      copy(certs.a.key, live.key)
      local script = dir .. "/hup_app.lua"
      write(script, ([[
local herald = require "herald"
local app = herald.new()
app:get("/ping", function(_, res) res:send("pong") end)
app:sse("/events", function(stream) assert(stream:subscribe("news")) end)
app:publisher("/pub/:topic")
local port = assert(app:listen { host = "127.0.0.1", port = 0, tls = { cert = %q, key = %q } })
local pid = assert(io.open("/proc/self/stat")):read("l"):match("^%%d+")
print(("%%s %%d %%s %%s"):format(pid, port, package.searchpath("herald.core", package.cpath),
  tostring(os.getenv("LD_PRELOAD") ~= nil)))
io.stdout:flush()
herald.run()
print("stopped")
]]):format(live.cert, live.key))
      local env = { quote("LUA_PATH=lua/?.lua;lua/?/init.lua;;"), quote("LUA_CPATH=build/" .. flavor .. "/?.so;;") }
      for _, name in ipairs(SANITIZER_VARS) do
        local value = os.getenv(name)
        if value then env[#env + 1] = quote(name .. "=" .. value) end
      end
      local server = spawn("exec lua5.4 " .. quote(script), { env = table.concat(env, " "), limit = 40 })
      local pid, port, core_file, preloaded
      t.wait(function()
        pid, port, core_file, preloaded = server:output():match("^(%d+) (%d+) (%S+) (%a+)\n")
        return pid or server:finished()
      end, 10, "the app to start")
      assert(pid, "the app did not start: " .. server:output() .. server:errors())
      port = tonumber(port)
      -- the build under test, with the run's sanitizer preload when there is one
      assert.equal("build/" .. flavor .. "/herald/core.so", core_file)
      assert.equal(tostring(os.getenv("LD_PRELOAD") ~= nil), preloaded)

      local stream = curl(port, "-N https://a.test:" .. port .. "/events", 20)
      local function publish(data)
        local code, out, err = curl(port, ("--data-binary %s https://a.test:%d/pub/news"):format(quote(data), port))
          :wait()
        assert.equal(0, code, "curl: " .. err)
        return out
      end
      -- subscribed once a publish reaches one subscriber
      t.wait(function() return publish("hello"):match('"subscribers":1') end, 8, "the stream")
      local code, out = handshake(port, "-noservername")
      assert.equal(0, code, out)
      assert.equal("a.test", subject(out))

      copy(certs.b.cert, live.cert)
      copy(certs.b.key, live.key)
      assert(os.execute("kill -HUP " .. pid))
      t.wait(function()
        code, out = handshake(port, "-noservername")
        return subject(out) == "b.test"
      end, 8, "the new certificate")
      assert.equal(0, code, out)

      write(live.cert, "garbage\n")
      assert(os.execute("kill -HUP " .. pid))
      t.wait(function() return server:errors():match("\n") end, 5, "the log of the failed reload")
      -- through the default logger: "<time> herald: <message>"
      assert.truthy(server:errors():find(("herald: SIGHUP: tls: certificate %s: "):format(live.cert), 1, true),
        server:errors())
      assert.matches("%(kept the old certificates%)\n$", server:errors())
      code, out = handshake(port, "-noservername")
      assert.equal(0, code, out)
      assert.equal("b.test", subject(out))

      publish("after the reloads")
      t.wait(function() return sse_data(stream:output())[2] == "after the reloads" end, 5, "the stream's events")
      assert.equal("hello", sse_data(stream:output())[1])

      -- SIGTERM: the stream is ended cleanly and the app exits 0 (under
      -- ASan: with no report)
      local errors_before = server:errors()
      assert(os.execute("kill -TERM " .. pid))
      local status, sout, serr = server:wait(10)
      assert.equal(0, status, serr)
      assert.matches("\nstopped\n$", sout)
      assert.equal(errors_before, serr)
      code = stream:wait()
      assert.equal(0, code, stream:errors())
    end)
  end)

  describe("listen errors", function()
    local function listen(tls)
      local app = herald.new()
      apps[#apps + 1] = app
      return app:listen { host = "127.0.0.1", port = 0, tls = tls }
    end

    local function assert_fails(tls, pattern)
      local port, err = listen(tls)
      assert.is_nil(port)
      assert.is_string(err)
      assert.matches("^listen on 127%.0%.0%.1 port 0: tls: ", err)
      assert.matches(pattern, err)
      return err
    end

    it("return nil and a message naming the file", function()
      local a, b = certs.a, certs.b
      local missing = dir .. "/missing.pem"
      assert_fails({ cert = missing, key = a.key }, "tls: certificate " .. literal(missing) .. ": .*No such file")
      assert_fails({ cert = a.cert, key = missing }, "tls: key " .. literal(missing) .. ": .*No such file")
      -- a key that is not the certificate's
      local err = assert_fails({ cert = a.cert, key = b.key }, literal(b.key))
      assert.matches("mismatch", err)
      assert_fails({ cert = dir .. "/garbage.pem", key = a.key }, "tls: certificate " .. literal(dir .. "/garbage.pem"))
      assert_fails({ cert = dir .. "/junk", key = a.key }, "tls: certificate " .. literal(dir .. "/junk") .. ": .")
      assert_fails({ cert = a.cert, key = dir .. "/junk" }, "tls: key " .. literal(dir .. "/junk") .. ": .")
      assert_fails({ cert = a.key, key = a.key }, "tls: certificate " .. literal(a.key) .. ": .")
      assert_fails({ cert = dir, key = a.key }, "tls: certificate " .. literal(dir) .. ": .")
      -- in a list: the bad one is named
      assert_fails({ { cert = a.cert, key = a.key }, { cert = missing, key = b.key } },
        "tls: certificate " .. literal(missing) .. ": ")
      assert_fails({ { cert = a.cert, key = a.key }, { cert = b.cert, key = a.key } }, literal(a.key))
    end)

    it("return nil and a message for bad cipher lists", function()
      local a = certs.a
      assert_fails({ cert = a.cert, key = a.key, ciphers = "NOT-A-CIPHER" }, "tls: ciphers NOT%-A%-CIPHER: .")
      assert_fails({ cert = a.cert, key = a.key, ciphersuites = "TLS_NOT_A_SUITE" },
        "tls: ciphersuites TLS_NOT_A_SUITE: .")
    end)

    it("raise an error naming a bad option", function()
      local a = certs.a
      local function fails(tls, pattern)
        local ok, err = pcall(listen, tls)
        assert.is_false(ok)
        assert.matches(pattern, tostring(err))
      end
      fails("cert.pem", "option 'tls' must be a table")
      fails({ cert = 1, key = a.key }, "option 'cert' must be a string")
      fails({ cert = a.cert, key = true }, "option 'key' must be a string")
      fails({ cert = a.cert, key = a.key, ciphers = 1 }, "option 'ciphers' must be a string")
      fails({ cert = a.cert, key = a.key, ciphersuites = {} }, "option 'ciphersuites' must be a string")
      fails({ cert = a.cert, key = a.key, handshake_timeout = "1" }, "option 'handshake_timeout' must be a number")
      fails({ cert = a.cert, key = a.key, handshake_timeout = 0 }, "option 'handshake_timeout' must be from")
      fails({ cert = a.cert, key = a.key, handshake_timeout = 0 / 0 }, "option 'handshake_timeout' must be from")
      fails({ cert = a.cert, key = a.key, bogus = 1 }, "unknown option 'bogus'")
      fails({}, "tls needs cert and key")
      fails({ cert = a.cert }, "tls needs cert and key")
      fails({ { cert = a.cert, key = a.key }, cert = a.cert, key = a.key }, "not both")
      fails({ a.cert }, "tls%[1%] must be")
      fails({ { cert = a.cert, key = a.key }, { cert = a.cert } }, "tls%[2%] must be")
    end)

    it("leave the app able to listen with good settings", function()
      local app = herald.new()
      apps[#apps + 1] = app
      app:get("/ping", function(_, res) res:send("pong") end)
      local a = certs.a
      assert.is_nil((app:listen { host = "127.0.0.1", port = 0, tls = { cert = dir .. "/junk", key = a.key } }))
      assert.is_nil((app:listen { host = "127.0.0.1", port = 0,
        tls = { cert = a.cert, key = a.key, ciphers = "NOPE" } }))
      assert.is_false(pcall(app.listen, app, { host = "127.0.0.1", port = 0, tls = { cert = 1, key = a.key } }))
      local port = assert(app:listen { host = "127.0.0.1", port = 0,
        tls = { cert = a.cert, key = a.key, ciphers = "ECDHE-ECDSA-CHACHA20-POLY1305",
          ciphersuites = "TLS_CHACHA20_POLY1305_SHA256" } })
      assert_serves(port)
      local code, out = handshake(port, "-tls1_2 -noservername")
      assert.equal(0, code, out)
      assert.matches("Cipher is ECDHE%-ECDSA%-CHACHA20%-POLY1305", out)
      code, out = handshake(port, "-tls1_3 -noservername")
      assert.equal(0, code, out)
      assert.matches("Cipher is TLS_CHACHA20_POLY1305_SHA256", out)
      t.wait(function() return app:connections() == 0 end, 3, "no connection left")
    end)
  end)

  describe("hostile clients", function()
    it("a client that sends nothing is closed after handshake_timeout", function()
      local app, port = new_app(tls_options { handshake_timeout = 0.3 })
      local silent = {}
      local started = core.now()
      for i = 1, 20 do silent[i] = t.connect(port) end
      -- meanwhile a real client is served
      assert_serves(port)
      for _, c in ipairs(silent) do c:wait_closed(2) end
      local elapsed = core.now() - started
      assert.is_true(elapsed >= 250 and elapsed < 1000, "closed after " .. elapsed .. " ms")
      for _, c in ipairs(silent) do assert.equal("", c.buffer) end
      t.wait(function() return app:connections() == 0 end, 3, "no connection left")
    end)

    it("a client that stops in the middle of its ClientHello is closed after handshake_timeout", function()
      local app, port = new_app(tls_options { handshake_timeout = 0.3 })
      -- a record header announcing 512 bytes of handshake, and 45 of them
      local hello = "\x16\x03\x01\x02\x00" .. "\x01\x00\x01\xfc\x03\x03" .. ("\x5a"):rep(32) ..
        "\x00\x00\x08\x13\x01\x13\x02"
      assert.equal(50, #hello)
      local c = t.connect(port)
      local started = core.now()
      c:send(hello)
      c:wait_closed(2)
      local elapsed = core.now() - started
      assert.is_true(elapsed >= 250 and elapsed < 1000, "closed after " .. elapsed .. " ms")
      -- trickled a byte at a time: the handshake's time still runs from the connect
      c = t.connect(port)
      started = core.now()
      for i = 1, 30 do
        if c.closed then break end
        c:send(hello:sub(i, i))
        t.sleep(50)
      end
      c:wait_closed(2)
      elapsed = core.now() - started
      assert.is_true(elapsed >= 250 and elapsed < 1000, "trickled: closed after " .. elapsed .. " ms")
      assert_serves(port)
      t.wait(function() return app:connections() == 0 end, 3, "no connection left")
    end)

    it("plain HTTP or random bytes on the TLS port are closed at once", function()
      local app, port = new_app() -- handshake_timeout 10 s: a close now is for the bytes
      local random = { "\xff" }
      for i = 2, 2048 do random[i] = string.char(math.random(0, 255)) end
      for _, bytes in ipairs {
        "GET /ping HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        table.concat(random),
        "\x16\x03\x03\x00\x05\x00\x00\x00\x00\x00", -- a handshake record with a bad message
        "\x17\x03\x03\x00\x10" .. ("\x00"):rep(16), -- application data before any handshake
      } do
        local c = t.connect(port)
        local started = core.now()
        c:send(bytes)
        c:wait_closed(2)
        local elapsed = core.now() - started
        assert.is_true(elapsed < 1000, ("closed after %d ms for %q"):format(elapsed, bytes:sub(1, 20)))
        -- at most an alert record, never a plaintext answer
        assert.is_true(c.buffer == "" or c.buffer:sub(1, 1) == "\x15", ("got %q"):format(c.buffer))
      end
      assert_serves(port)
      t.wait(function() return app:connections() == 0 end, 5, "no connection left")
    end)

    it("after the handshake, header_timeout applies: 408 over TLS", function()
      local _, port = new_app(nil, { header_timeout = 0.3 })
      local started = core.now()
      local code, out = handshake(port, "-noservername", "")
      local elapsed = core.now() - started
      assert.equal(0, code, out)
      assert.matches("HTTP/1%.1 408 ", out)
      assert.is_true(elapsed < 3000, "408 after " .. elapsed .. " ms")
    end)
  end)

  describe("fan-out", function()
    it("20 SSE subscribers over https each get all of 50 messages in order", function()
      local app, port = new_app()
      local clients = {}
      for i = 1, 20 do
        local name = i % 2 == 0 and "a.test" or "b.test"
        clients[i] = curl(port, ("-N https://%s:%d/events"):format(name, port), 20)
      end
      t.wait(function() return app:subscribers("news") == 20 end, 15, "20 subscriptions")
      local expected = {}
      for i = 1, 50 do
        expected[i] = ("message %d %s"):format(i, ("x"):rep(i * 20))
        app:publish("news", expected[i])
        if i % 10 == 0 then t.sleep(10) end
      end
      t.wait(function()
        for _, j in ipairs(clients) do
          if #sse_data(j:output()) < 50 then return false end
        end
        return true
      end, 15, "every subscriber's 50 messages")
      for i, j in ipairs(clients) do assert.same(expected, sse_data(j:output()), "subscriber " .. i) end
      app:close()
      for _, j in ipairs(clients) do
        local code, _, err = j:wait()
        assert.equal(0, code, "curl: " .. err)
      end
    end)
  end)
end)
