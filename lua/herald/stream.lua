--- The objects handed to app:sse and app:ws handlers: one per connection.
-- Topic rules (allow, join, leave) run here, once per subscription; the
-- messages themselves never pass through Lua.
local stream = {}

local stream_methods = {}                                 -- both transports
local sse_methods = setmetatable({}, { __index = stream_methods })
local ws_methods = setmetatable({}, { __index = stream_methods })

-- A stream lives as long as its connection, and an idle server holds many,
-- so each holds only what is its own: conn, params, user and its topics, at
-- most 4 fields (a table of 4 slots; 2 for a stream without user or
-- recorded topics). What the streams of one route share is in its class
-- (app, message and close callbacks, methods); what only opening needs (the
-- request, the opening flag, ws:close's refusal, stream:replay's id) is in
-- `pending` until the stream has started.
local pending = setmetatable({}, { __mode = "k" }) -- stream -> { req, opening, refused, replay_from, accepted }

--- The metatable of a route's streams: kind "sse" or "ws", the app, and the
-- route's message (WebSocket) and close callbacks (either may be nil).
function stream.class(kind, app, message, close)
  local shared = setmetatable({ app = app, message_fn = message, close_fn = close },
    { __index = kind == "sse" and sse_methods or ws_methods })
  return {
    __index = function(self, k)
      local v = shared[k]
      if v == nil then
        local p = pending[self]
        if p then v = p[k] end
      end
      return v
    end,
  }
end

--- A stream of class for req's connection; open runs until stream.opened.
function stream.new(class, conn, req, user)
  local self = setmetatable(user == nil and { conn = conn, params = req.params }
    or { conn = conn, params = req.params, user = user }, class)
  pending[self] = { req = req, opening = true }
  return self
end

--- open returned: no more replay, and close refuses no more.
function stream.opened(self)
  pending[self].opening = nil
end

--- open accepted the stream: from now on, its closing runs the route's close.
function stream.accepted(self)
  pending[self].accepted = true
end

--- The stream started (or was let go): it keeps its params, not the request.
function stream.started(self)
  pending[self] = nil
end

local no_topics = setmetatable({}, { __newindex = function() error("no_topics is read-only") end })
-- The rule kept for a topic joined under a rule without a leave callback.
local no_leave = setmetatable({}, { __newindex = function() error("no_leave is read-only") end })

-- The hub (C) knows the topics a stream joined; the stream keeps them too
-- only when it needs them at its end: for a rule with a leave callback, or
-- for presence shared through a broker (app.presence_board). self.topics:
-- nil; the name of its one such topic when the rule has no leave callback;
-- or a table topic -> rule. The rule a topic was joined with, or nil.
local function joined(self, topic)
  local t = self.topics
  if type(t) == "table" then
    if t[topic] then return t[topic] end
  elseif t ~= nil and t == topic then
    return no_leave
  end
  return self.app.hub:joined(self.conn, topic) and no_leave or nil
end

local function check_topic(topic, what)
  if type(topic) ~= "string" then error(what .. ": topic must be a string", 3) end
end

--- Joins a topic: true, or nil and why (a rule refused, too many, closed).
function stream_methods:subscribe(topic)
  check_topic(topic, "subscribe")
  if joined(self, topic) then return true end
  local rule = self.app.topic_rules:resolve(topic)
  if rule.allow and not rule.allow(self.user, topic, "subscribe") then
    return nil, "forbidden"
  end
  local ok, err = self.app.hub:subscribe(self.conn, topic, rule.history, rule.max_age_ms, rule.conflate)
  if not ok then return nil, err end
  if rule.leave or self.app.presence_board then
    local t = self.topics
    if t == nil and not rule.leave then
      self.topics = topic
    else
      if type(t) ~= "table" then
        t = t and { [t] = no_leave } or {}
        self.topics = t
      end
      t[topic] = rule
    end
  end
  self.app:_joined(topic, self.user)
  if rule.join then self.app:_callback(rule.join, topic, self.user, self) end
  return true
end

--- In open: unless the client resumes (Last-Event-ID, ?last_event_id=),
-- start from since_id, or from all that the topics' histories hold when
-- nil. The replay comes before live messages, merged in id order, once each.
function stream_methods:replay(since_id)
  if since_id ~= nil and type(since_id) ~= "string" then error("replay: since_id must be a string", 2) end
  if not self.opening then error("replay: only inside open", 2) end
  pending[self].replay_from = since_id or ""
end

--- Leaves a topic; true if the stream was in it.
function stream_methods:unsubscribe(topic)
  check_topic(topic, "unsubscribe")
  local rule = joined(self, topic)
  if not rule then return false end
  local t = self.topics
  if type(t) == "table" then
    t[topic] = nil
  elseif t == topic then
    self.topics = nil
  end
  self.app.hub:unsubscribe(self.conn, topic)
  self.app:_left(topic, self.user)
  if rule.leave then self.app:_callback(rule.leave, topic, self.user, self) end
  return true
end

--- Publishes to a topic as this connection's user: the topic's
-- allow(user, topic, "publish") applies. Returns the id and the count
-- reached, or nil, "forbidden".
function stream_methods:publish(topic, data, opts)
  check_topic(topic, "publish")
  local rule = self.app.topic_rules:resolve(topic)
  if rule.allow and not rule.allow(self.user, topic, "publish") then return nil, "forbidden" end
  return self.app:publish(topic, data, opts)
end

--- An event for this client alone: opts { event, id, retry (ms) }.
function sse_methods:send(data, opts)
  if type(data) ~= "string" then error("send: data must be a string", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("send: opts must be a table", 2) end
  opts = opts or {}
  if opts.retry ~= nil and (math.type(opts.retry) ~= "integer" or opts.retry < 0) then
    error("send: opts.retry must be an integer >= 0 (ms)", 2)
  end
  return self.conn:sse_send(data, opts.event, opts.id, opts.retry)
end

--- A comment line: clients ignore it.
function sse_methods:comment(text)
  if text ~= nil and type(text) ~= "string" then error("comment: text must be a string", 2) end
  return self.conn:sse_comment(text)
end

--- Closes the stream once what was sent before has gone out; the client
-- reconnects unless told otherwise.
function sse_methods:close()
  self.conn:finish()
end

--- A message for this client alone: kind "text" (default) or "binary".
function ws_methods:send(data, kind)
  if type(data) ~= "string" then error("send: data must be a string", 2) end
  if kind ~= nil and kind ~= "text" and kind ~= "binary" then
    error("send: kind must be \"text\" or \"binary\"", 2)
  end
  return self.conn:ws_send(data, kind)
end

function ws_methods:ping(data)
  if data ~= nil and type(data) ~= "string" then error("ping: data must be a string", 2) end
  return self.conn:ws_send(data or "", "ping")
end

--- Starts the close handshake (code 1000 unless given); inside open, refuses
-- the connection instead.
function ws_methods:close(code, reason)
  if code ~= nil and math.type(code) ~= "integer" then error("close: code must be an integer", 2) end
  if reason ~= nil and type(reason) ~= "string" then error("close: reason must be a string", 2) end
  if self.opening then
    pending[self].refused = true
    return true
  end
  return self.conn:ws_close(code, reason)
end

function stream_methods:alive()
  return not self.closed and self.conn:alive()
end

--- fn(stream, code, reason) runs once when the stream closes, whoever
-- closes it (WebSocket: the close code and reason, 1006 if there was none).
-- (self.closers: the one function, or a list from the second on)
function stream_methods:on_close(fn)
  if type(fn) ~= "function" then error("on_close: fn must be a function", 2) end
  local closers = self.closers
  if closers == nil then
    self.closers = fn
  elseif type(closers) == "function" then
    self.closers = { closers, fn }
  else
    closers[#closers + 1] = fn
  end
end

--- Leaves every topic (leave callbacks run) and runs the close callbacks:
-- those given to on_close, then the route's.
function stream_methods:_finish(code, reason)
  if self.closed then return end
  self.closed = true
  local t = self.topics
  if type(t) == "string" then
    self.app:_left(t, self.user)
  else
    for topic, rule in pairs(t or no_topics) do
      self.app:_left(topic, self.user)
      if rule.leave then self.app:_callback(rule.leave, topic, self.user, self) end
    end
  end
  self.topics = nil
  local closers = self.closers
  if type(closers) == "function" then
    self.app:_callback(closers, self, code, reason)
  else
    for _, fn in ipairs(closers or no_topics) do self.app:_callback(fn, self, code, reason) end
  end
  local p = pending[self]
  if self.close_fn and (p == nil or p.accepted) then self.app:_callback(self.close_fn, self, code, reason) end
end

return stream
