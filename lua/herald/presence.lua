--- Presence shared through the broker. Each node keeps, in a Redis hash per
-- topic (<prefix>p:<topic>), one field "<node>|<user>" per user it has
-- subscribed there, valued with when it expires (ms since the epoch). The
-- node's heartbeat renews its fields every ttl/3; a node that crashed stops
-- renewing, and its users drop out within ttl.
local core = require "herald.core"

local presence = {}
local methods = {}
methods.__index = methods

local function now_ms() return os.time() * 1000 end

local function read_hostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local name = f and f:read("l")
  if f then f:close() end
  return name or os.getenv("HOSTNAME") or "host"
end
local hostname = read_hostname()

--- How a user shows in shared presence: a string, a number, or a table's
-- id; other users are not listed across nodes.
function presence.name(user)
  local kind = type(user)
  if kind == "string" or kind == "number" then return tostring(user) end
  if kind == "table" and (type(user.id) == "string" or type(user.id) == "number") then
    return tostring(user.id)
  end
end

--- broker: core's broker handle; ttl_ms: how long a node's entries outlive
-- its last heartbeat.
function presence.new(broker, ttl_ms)
  local self = setmetatable({ broker = broker, ttl = ttl_ms, counts = {}, pid = core.pid() }, methods)
  self.node = ("%s:%d"):format(hostname, self.pid)
  self.timer = core.timer(ttl_ms // 3, ttl_ms // 3, function() self:_beat() end)
  return self
end

function methods:_key(topic) return self.broker:prefix() .. "p:" .. topic end

-- A forked worker is a node of its own, starting with nobody.
function methods:_check_process()
  local pid = core.pid()
  if pid ~= self.pid then
    self.pid, self.counts = pid, {}
    self.node = ("%s:%d"):format(hostname, pid)
  end
end

function methods:_write(topic, name)
  local key = self:_key(topic)
  self.broker:command(nil, "HSET", key, self.node .. "|" .. name, tostring(now_ms() + self.ttl))
  self.broker:command(nil, "PEXPIRE", key, tostring(self.ttl * 2))
end

--- A stream of user subscribed to topic.
function methods:join(topic, user)
  local name = presence.name(user)
  if not name then return end
  self:_check_process()
  local users = self.counts[topic] or {}
  self.counts[topic] = users
  users[name] = (users[name] or 0) + 1
  if users[name] == 1 then self:_write(topic, name) end
end

function methods:leave(topic, user)
  local name = presence.name(user)
  local users = name and self.counts[topic]
  if not users or not users[name] then return end
  users[name] = users[name] - 1
  if users[name] > 0 then return end
  users[name] = nil
  if next(users) == nil then self.counts[topic] = nil end
  self.broker:command(nil, "HDEL", self:_key(topic), self.node .. "|" .. name)
end

-- Renews every entry of this node (and puts them back after Redis lost them).
function methods:_beat()
  self:_check_process()
  for topic, users in pairs(self.counts) do
    for name in pairs(users) do self:_write(topic, name) end
  end
end

--- fn(users) with the users present on topic on every node (each once), or
-- fn(nil, why). Returns true, or nil and why when Redis is unreachable.
function methods:list(topic, fn)
  local key = self:_key(topic)
  return self.broker:command(function(reply, err)
    if not reply then return fn(nil, err) end
    local users, seen, now, stale = {}, {}, now_ms(), {}
    for i = 1, #reply - 1, 2 do
      local field, expires = reply[i], tonumber(reply[i + 1]) or 0
      local name = field:match("^[^|]*|(.*)$")
      if expires < now then
        stale[#stale + 1] = field
      elseif name and not seen[name] then
        seen[name] = true
        users[#users + 1] = name
      end
    end
    if #stale > 0 then self.broker:command(nil, "HDEL", key, table.unpack(stale, 1, math.min(#stale, 60))) end
    table.sort(users)
    fn(users)
  end, "HGETALL", key)
end

function methods:close()
  self.timer:cancel()
end

return presence
