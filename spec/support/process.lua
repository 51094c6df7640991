--- Programs the specs start beside busted: each in a session (process
-- group) of its own with a watchdog that kills the group if the spec never
-- stops it, so a failed spec leaves nothing running.
local core = require "herald.core"

local proc = {}

function proc.quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local quote = proc.quote

--- Prefix for programs that are not herald: the ASan run's preload and
-- options stay with herald (see scripts/test).
proc.unsanitized = "env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS "

function proc.slurp(path)
  local f = io.open(path)
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

function proc.sleep(ms)
  local deadline = core.now() + ms
  while core.now() < deadline do core.run_once(deadline - core.now()) end
end

--- A TCP port nothing listens on right now (bound once by the kernel's choice).
function proc.free_port()
  local p = assert(io.popen(proc.unsanitized .. "/usr/bin/python3 -c " .. quote(
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')))
  local port = tonumber(p:read("l"))
  p:close()
  return assert(port, "no free port")
end

--- Whether a process of group pgid still runs (zombies aside), from
-- /proc/<pid>/stat: "pid (comm) state ppid pgrp ...".
function proc.group_running(pgid)
  local p = assert(io.popen("cat /proc/[0-9]*/stat 2>/dev/null"))
  local running = false
  for line in p:lines() do
    local state, group = line:match("^.*%) (%S) %d+ (%d+) ")
    if group and tonumber(group) == pgid and state ~= "Z" then running = true end
  end
  p:close()
  return running
end

local process_methods = {}
process_methods.__index = process_methods

--- Starts sh command cmd in a new session, killed after opts.watchdog
-- seconds (default 120). Its stdout is p.pipe, its stderr goes to p.err_file.
-- Unless opts.herald, it runs without the ASan run's preload.
-- Returns { pid = the group's id, pipe, err_file }.
function proc.spawn(cmd, opts)
  opts = opts or {}
  if not opts.herald then cmd = proc.unsanitized .. cmd end
  local err_file = os.tmpname()
  local script = table.concat({
    "echo $$",
    ("(sleep %d; kill -KILL -$$) >/dev/null 2>&1 &"):format(opts.watchdog or 120),
    ("exec %s 2>>%s"):format(cmd, quote(err_file)),
  }, "\n")
  local pipe = assert(io.popen("exec setsid sh -c " .. quote(script)))
  local p = setmetatable({ pipe = pipe, err_file = err_file }, process_methods)
  p.pid = tonumber(pipe:read("l"))
  assert(p.pid, "could not start: " .. cmd)
  return p
end

--- Environment that makes lua5.4 load this checkout's herald (the build
-- under test: HERALD_BUILD).
function proc.lua_env()
  local build = os.getenv("HERALD_BUILD") or "dev"
  return ("LUA_PATH=%s LUA_CPATH=%s"):format(quote("lua/?.lua;lua/?/init.lua;;"),
    quote("build/" .. build .. "/?.so;;"))
end

--- Runs Lua source code in a lua5.4 of its own (see proc.spawn), with args
-- as arg[1..n].
function proc.spawn_lua(code, args, opts)
  local file = os.tmpname()
  local f = assert(io.open(file, "w"))
  f:write(code)
  f:close()
  local argv = {}
  for i, a in ipairs(args or {}) do argv[i] = quote(a) end
  local o = { herald = true }
  for k, v in pairs(opts or {}) do o[k] = v end
  local p = proc.spawn(("env %s lua5.4 %s %s"):format(proc.lua_env(), quote(file), table.concat(argv, " ")), o)
  p.script = file
  return p
end

--- The next line the program printed (nil at its end).
function process_methods:line()
  return self.pipe:read("l")
end

--- The first printed line matching pattern (its captures), or raises with
-- what the program wrote to stderr.
function process_methods:expect(pattern)
  while true do
    local line = self:line()
    if not line then
      error(("expected a line like %q; stderr:\n%s"):format(pattern, proc.slurp(self.err_file)), 2)
    end
    local captures = { line:match(pattern) }
    if captures[1] then return table.unpack(captures) end
  end
end

function process_methods:running()
  return not self.ended and proc.group_running(self.pid)
end

--- Whether the program itself (the group's leader) still runs: the
-- watchdog aside, which keeps the group running.
function process_methods:alive()
  local f = not self.ended and io.open("/proc/" .. self.pid .. "/stat")
  if not f then return false end
  local state = (f:read("l") or ""):match("^.*%) (%S)")
  f:close()
  return state ~= nil and state ~= "Z"
end

function process_methods:signal(sig)
  os.execute(("kill -%s -%d 2>/dev/null"):format(sig, self.pid))
end

--- SIGTERM (or sig) to the group, then SIGKILL if it still runs after
-- timeout ms (default 5000). Returns whether it ended in time, whether it
-- exited 0, and its stderr.
function process_methods:stop(timeout, sig)
  if self.ended then return self.in_time, self.exited, self.stderr end
  self:signal(sig or "TERM")
  local deadline = core.now() + (timeout or 5000)
  while proc.group_running(self.pid) and core.now() < deadline do proc.sleep(20) end
  self.in_time = not proc.group_running(self.pid)
  if not self.in_time then self:signal("KILL") end
  self.exited = self.pipe:close() == true
  self.ended = true
  self.stderr = proc.slurp(self.err_file)
  os.remove(self.err_file)
  if self.script then os.remove(self.script) end
  return self.in_time, self.exited, self.stderr
end

return proc
