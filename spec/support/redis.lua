--- A real redis-server for the specs: on a free port, no persistence, in a
-- process group of its own (spec/support/process.lua).
local proc = require "spec.support.process"

local redis = {}

local server_methods = {}
server_methods.__index = server_methods

--- redis-cli against this server; returns its output (trimmed).
function server_methods:cli(...)
  local args = { proc.unsanitized .. "redis-cli", "-p", tostring(self.port) }
  if self.password then args[#args + 1] = "-a " .. proc.quote(self.password) .. " --no-auth-warning" end
  for _, a in ipairs { ... } do args[#args + 1] = proc.quote(a) end
  local p = assert(io.popen(table.concat(args, " ") .. " 2>&1"))
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

--- Starts (or starts again, on the same port) the server.
function server_methods:start()
  local args = { "redis-server", "--port", self.port, "--bind", "127.0.0.1", "--save", "''",
    "--daemonize", "no", "--loglevel", "warning" }
  if self.dir then -- every write on disk before it is answered: a SIGKILL loses nothing
    args[#args + 1] = "--appendonly yes --appendfsync always --dir " .. proc.quote(self.dir)
  else
    args[#args + 1] = "--appendonly no"
  end
  if self.password then args[#args + 1] = "--requirepass " .. proc.quote(self.password) end
  self.process = proc.spawn(table.concat(args, " "), { watchdog = self.watchdog })
  for _ = 1, 200 do
    if self:cli("PING") == "PONG" then return self end
    proc.sleep(25)
  end
  local _, _, err = self.process:stop()
  error("redis-server did not start on port " .. self.port .. ": " .. err)
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

--- redis.start { password = ..., persist = true, watchdog = seconds }: a
-- running server, with .port and .url; persist keeps its data across kill
-- and start.
function redis.start(opts)
  opts = opts or {}
  local s = setmetatable({ port = proc.free_port(), password = opts.password,
    watchdog = opts.watchdog or 300 }, server_methods)
  if opts.persist then
    local p = assert(io.popen("mktemp -d"))
    s.dir = p:read("l")
    p:close()
  end
  s.url = ("redis://%s127.0.0.1:%d/0"):format(s.password and (":" .. s.password .. "@") or "", s.port)
  return s:start()
end

function redis.available()
  return os.execute("command -v redis-server >/dev/null 2>&1") == true
end

return redis
