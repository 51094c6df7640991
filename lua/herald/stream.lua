--- The SSE stream object handed to app:sse handlers: one per connection.
-- Topic rules (allow, join, leave) run here, once per subscription; the
-- messages themselves never pass through Lua.
local stream = {}

local stream_methods = {}
stream.mt = { __index = stream_methods }

function stream.new(app, conn, req, user)
  return setmetatable({
    app = app, conn = conn, req = req, params = req.params, user = user,
    topics = {}, closers = {},
  }, stream.mt)
end

local function check_topic(topic, what)
  if type(topic) ~= "string" then error(what .. ": topic must be a string", 3) end
end

--- Joins a topic: true, or nil and why (a rule refused, too many, closed).
function stream_methods:subscribe(topic)
  check_topic(topic, "subscribe")
  if self.topics[topic] then return true end
  local rule = self.app.topic_rules:resolve(topic)
  if rule.allow and not rule.allow(self.user, topic, "subscribe") then
    return nil, "forbidden"
  end
  local ok, err = self.app.hub:subscribe(self.conn, topic, rule.history, rule.max_age_ms, rule.conflate)
  if not ok then return nil, err end
  self.topics[topic] = rule
  if rule.join then self.app:_callback(rule.join, topic, self.user, self) end
  return true
end

--- Leaves a topic; true if the stream was in it.
function stream_methods:unsubscribe(topic)
  check_topic(topic, "unsubscribe")
  local rule = self.topics[topic]
  if not rule then return false end
  self.topics[topic] = nil
  self.app.hub:unsubscribe(self.conn, topic)
  if rule.leave then self.app:_callback(rule.leave, topic, self.user, self) end
  return true
end

--- An event for this client alone: opts { event, id, retry (ms) }.
function stream_methods:send(data, opts)
  if type(data) ~= "string" then error("send: data must be a string", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("send: opts must be a table", 2) end
  opts = opts or {}
  if opts.retry ~= nil and math.type(opts.retry) ~= "integer" then
    error("send: opts.retry must be an integer (ms)", 2)
  end
  return self.conn:sse_send(data, opts.event, opts.id, opts.retry)
end

--- A comment line: clients ignore it.
function stream_methods:comment(text)
  if text ~= nil and type(text) ~= "string" then error("comment: text must be a string", 2) end
  return self.conn:sse_comment(text)
end

--- Closes the stream; the client reconnects unless told otherwise.
function stream_methods:close()
  self.conn:close()
end

function stream_methods:alive()
  return not self.closed and self.conn:alive()
end

--- fn(stream) runs once when the stream closes, whoever closes it.
function stream_methods:on_close(fn)
  if type(fn) ~= "function" then error("on_close: fn must be a function", 2) end
  self.closers[#self.closers + 1] = fn
end

--- Leaves every topic (leave callbacks run) and runs the close callbacks.
function stream_methods:_finish()
  if self.closed then return end
  self.closed = true
  for topic, rule in pairs(self.topics) do
    if rule.leave then self.app:_callback(rule.leave, topic, self.user, self) end
  end
  self.topics = {}
  for _, fn in ipairs(self.closers) do self.app:_callback(fn, self) end
end

return stream
