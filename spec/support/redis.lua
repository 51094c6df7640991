--- A real redis-server for the specs: on a free port, no persistence unless
-- asked, in a process group of its own (spec/support/process.lua).
local proc = require "spec.support.process"

local redis = {}

local server_methods = {}
server_methods.__index = server_methods

--- redis-cli against this server; returns its output (trimmed).
function server_methods:cli(...)
  local args = { proc.unsanitized .. "timeout 10 redis-cli", "-p", tostring(self.port) }
  if self.password then args[#args + 1] = "-a " .. proc.quote(self.password) .. " --no-auth-warning" end
  local tls = self.tls
  if tls then
    args[#args + 1] = "-h localhost --tls --cacert " .. proc.quote(tls.ca)
    if tls.auth_clients then
      args[#args + 1] = ("--cert %s --key %s"):format(proc.quote(tls.cert), proc.quote(tls.key))
    end
  end
  for _, a in ipairs { ... } do args[#args + 1] = proc.quote(a) end
  local p = assert(io.popen(table.concat(args, " ") .. " 2>&1"))
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

--- The redis-server command line.
function server_methods:command()
  -- a TLS server is reached as localhost (its certificate's name), which may
  -- resolve to ::1 first: it listens there too when the host has IPv6 (the
  -- broker tries the first address only)
  local args = { "redis-server", "--bind", self.tls and "'127.0.0.1 -::1'" or "127.0.0.1", "--save", "''",
    "--daemonize", "no", "--loglevel", "warning", "--logfile", "/dev/stderr" }
  local tls = self.tls
  if tls then -- TLS only: the plain port is off
    args[#args + 1] = ("--port 0 --tls-port %d --tls-cert-file %s --tls-key-file %s --tls-ca-cert-file %s " ..
      "--tls-auth-clients %s"):format(self.port, proc.quote(tls.cert), proc.quote(tls.key),
      proc.quote(tls.ca), tls.auth_clients and "yes" or "no")
  else
    args[#args + 1] = "--port " .. self.port
  end
  if self.dir then -- every write on disk before it is answered: a SIGKILL loses nothing
    args[#args + 1] = "--appendonly yes --appendfsync always --dir " .. proc.quote(self.dir)
  else
    args[#args + 1] = "--appendonly no"
  end
  if self.password then args[#args + 1] = "--requirepass " .. proc.quote(self.password) end
  return table.concat(args, " ")
end

--- Starts (or starts again, on the same port) the server; nil and its
-- log when it does not answer in 5 s or ends (e.g. the port was taken).
function server_methods:try_start()
  self.process = proc.spawn(self:command(), { watchdog = self.watchdog })
  for i = 1, 200 do
    if self:cli("PING") == "PONG" then return self end
    if i % 4 == 0 and not self.process:alive() then break end
    proc.sleep(25)
  end
  local _, _, err = self.process:stop()
  self.process = nil
  return nil, err
end

function server_methods:start()
  local ok, err = self:try_start()
  if not ok then error("redis-server did not start on port " .. self.port .. ": " .. err, 2) end
  return self
end

--- Starts the server after `seconds` without waiting for it (for a spec
-- that blocks meanwhile); :kill() stops it as usual.
function server_methods:start_later(seconds)
  self.process = proc.spawn("sh -c " .. proc.quote(("sleep %s; exec %s"):format(seconds, self:command())),
    { watchdog = self.watchdog })
  return self
end

--- Stops the server (SIGKILL: a crash, nothing saved).
function server_methods:kill()
  if self.process then self.process:stop(2000, "KILL") end
  self.process = nil
end

server_methods.stop = server_methods.kill

--- Stops the server and deletes its data: it starts again empty.
function server_methods:forget()
  self:kill()
  if self.dir then os.execute("rm -rf " .. proc.quote(self.dir) .. "/*") end
end

--- Stops the server and removes its files.
function server_methods:remove()
  self:kill()
  if self.dir then os.execute("rm -rf " .. proc.quote(self.dir)) end
end

--- redis.new { password = ..., persist = true, watchdog = seconds, tls = {
-- cert, key, ca, auth_clients } }: a server not started yet, with .port and
-- .url; persist keeps its data across kill and start. With tls it listens
-- on TLS only (its certificate must name localhost: .url and :cli use that
-- name); with auth_clients, clients need a certificate that ca signed (:cli
-- uses the server's own).
function redis.new(opts)
  opts = opts or {}
  local s = setmetatable({ port = proc.free_port(), password = opts.password, tls = opts.tls,
    watchdog = opts.watchdog or 300 }, server_methods)
  if opts.persist then
    local p = assert(io.popen("mktemp -d"))
    s.dir = p:read("l")
    p:close()
  end
  s.url = ("%s://%s%s:%d/0"):format(s.tls and "rediss" or "redis",
    s.password and (":" .. s.password .. "@") or "", s.tls and "localhost" or "127.0.0.1", s.port)
  return s
end

--- redis.start(opts): redis.new(opts), running. A port taken between
-- free_port and the server's bind (by another program's connection) costs
-- another port, not the spec.
function redis.start(opts)
  local err
  for _ = 1, 3 do
    local s = redis.new(opts)
    local ok, why = s:try_start()
    if ok then return s end
    if s.dir then os.execute("rm -rf " .. proc.quote(s.dir)) end
    err = ("port %d: %s"):format(s.port, why)
  end
  error("redis-server did not start: " .. err, 2)
end

function redis.available()
  return os.execute("command -v redis-server >/dev/null 2>&1") == true
end

return redis
