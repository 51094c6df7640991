--- herald: real-time push for Lua. This is the friendly half of the module;
-- herald.core (C) holds the loop, the sockets and the protocols.
local core = require "herald.core"
local options = require "herald.options"
local router = require "herald.router"
local request = require "herald.request"
local response = require "herald.response"
local topics = require "herald.topics"
local stream = require "herald.stream"
local websocket = require "herald.websocket"
local presence = require "herald.presence"

local herald = { _VERSION = "herald scm" }

-- herald.js, the browser client, is installed beside this file.
local module_dir = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."

local app_schema = {
  max_header_size = { type = "integer", default = 16384, min = 1024, max = 1048576 },
  max_body_size = { type = "integer", default = 1048576, min = 0, max = 1073741824 },
  header_timeout = { type = "number", default = 10, min = 0.05, max = 3600 },
  idle_timeout = { type = "number", default = 60, min = 0.05, max = 86400 },
  shutdown_timeout = { type = "number", default = 5, min = 0, max = 3600 },
  max_connections = { type = "integer", default = 10000, min = 1, max = 1000000 },
  -- per client address (0: no limit); loopback (a local proxy) is exempt unless trust_loopback = false
  max_connections_per_ip = { type = "integer", default = 1000, min = 0, max = 1000000 },
  max_connects_per_ip = { type = "integer", default = 200, min = 0, max = 1000000 },
  trust_loopback = { type = "boolean", default = true },
  max_total_queued = { type = "integer", default = 268435456, min = 1024, max = 1 << 40 },
  -- topics and streams
  history = { type = "integer", default = 100, min = 0, max = 1000000 },
  max_age = { type = "number", default = 300, min = 0, max = 31536000 },
  policy = { type = "string", default = "close" },
  heartbeat = { type = "number", default = 15, min = 0, max = 3600 },
  max_queued = { type = "integer", default = 1048576, min = 1024, max = 1073741824 },
  max_subscriptions = { type = "integer", default = 100, min = 1, max = 100000 },
  max_message = { type = "integer", default = 1048576, min = 1, max = 1073741824 },
  ping_interval = { type = "number", default = 30, min = 0, max = 86400 },
  max_message_rate = { type = "integer", default = 100, min = 0, max = 1000000 },
  message_rate_policy = { type = "string", default = "close" },
  drain_retry = { type = "integer", default = 1000, min = 0, max = 86400000 },
  client_js = { type = "boolean", default = true }, -- serve herald.js at /herald.js
  -- shares topics, history and presence with other herald processes: { redis = url, ... }
  broker = { type = "table" },
}
herald.defaults = {}
for name, rule in pairs(app_schema) do herald.defaults[name] = rule.default end

-- broker = { redis = "redis://[[user]:password@]host[:port][/db]" (rediss:// for TLS), ... }
local broker_schema = {
  redis = { type = "string" },
  prefix = { type = "string", default = "herald:" },   -- of every key and channel
  wait = { type = "boolean", default = false },        -- listen waits for Redis instead of failing
  connect_timeout = { type = "number", default = 5, min = 0.1, max = 3600 },
  topic_ttl = { type = "number", default = 86400, min = 1, max = 31536000 }, -- a quiet topic's history and last id
  presence_ttl = { type = "number", default = 30, min = 3, max = 3600 },
  max_pending = { type = "integer", default = 10000, min = 1, max = 10000000 }, -- publishes awaiting Redis
  tls = { type = "table" },
}
local broker_tls_schema = {
  ca = { type = "string" },        -- CA file; default: the system's trust store
  cert = { type = "string" },      -- client certificate, when Redis asks for one
  key = { type = "string" },
  verify = { type = "boolean", default = true },
}

-- The URL without its user and password (up to the last @ before the
-- path, as the parser reads it), for messages.
local function redacted(url)
  local scheme, rest = url:match("^(%a[%w+.-]*://)(.*)$")
  if not scheme then scheme, rest = "", url end
  return scheme .. rest:gsub("^[^/?#]*@", "***@", 1)
end

-- Called by herald.new: its errors are raised at herald.new's caller (level 3).
local function open_broker(hub, given)
  local o = options.check(broker_schema, given, "herald.new: broker", 3)
  if not o.redis then error("herald.new: broker needs redis = \"redis://host:port/db\"", 3) end
  local tls = options.check(broker_tls_schema, o.tls, "herald.new: broker.tls", 3)
  local broker, err, bad_url = core.redis_broker(hub, { url = o.redis, prefix = o.prefix, ca = tls.ca,
    cert = tls.cert, key = tls.key, verify = tls.verify, topic_ttl_ms = math.floor(o.topic_ttl * 1000),
    max_pending = o.max_pending })
  if bad_url then
    error(("herald.new: broker: option 'redis': %s, got %q"):format(err, redacted(o.redis)), 3)
  elseif not broker then
    error("herald.new: " .. err, 3)
  end
  return broker, o
end

local listen_schema = {
  host = { type = "string", default = "127.0.0.1" },
  port = { type = "integer", default = 8080, min = 0, max = 65535 },
  backlog = { type = "integer", default = 511, min = 1, max = 65535 },
  tls = { type = "table" },
}

local tls_schema = {
  cert = { type = "string" },
  key = { type = "string" },
  ciphers = { type = "string" },        -- TLS 1.2 list; default: forward-secret AEAD suites
  ciphersuites = { type = "string" },   -- TLS 1.3; default: OpenSSL's
  handshake_timeout = { type = "number", default = 10, min = 0.05, max = 3600 },
}

-- tls = { cert, key, ... } or { { cert, key }, { cert, key }, ... , options }:
-- the table the C listener takes.
local function check_tls(tls)
  local settings = {}
  for k, v in pairs(tls) do
    if math.type(k) ~= "integer" then settings[k] = v end
  end
  local o = options.check(tls_schema, settings, "listen: tls", 4)
  local certs, keys = {}, {}
  if #tls == 0 then
    if not o.cert or not o.key then error("listen: tls needs cert and key (file names)", 4) end
    certs[1], keys[1] = o.cert, o.key
  else
    if o.cert or o.key then error("listen: tls takes cert and key, or a list of { cert, key }, not both", 4) end
    for i, pair in ipairs(tls) do
      if type(pair) ~= "table" or type(pair.cert) ~= "string" or type(pair.key) ~= "string" then
        error(("listen: tls[%d] must be { cert = file, key = file }"):format(i), 4)
      end
      certs[i], keys[i] = pair.cert, pair.key
    end
  end
  return { certs = certs, keys = keys, ciphers = o.ciphers, ciphersuites = o.ciphersuites,
    handshake_timeout_ms = math.floor(o.handshake_timeout * 1000 + 0.5) }
end

local function default_logger(message)
  io.stderr:write(os.date("!%Y-%m-%dT%H:%M:%SZ"), " herald: ", tostring(message), "\n")
  io.stderr:flush()
end

local global_logger = default_logger
core.on_error(function(message) global_logger(message) end)

--- Replaces the logger for errors raised outside any app (timers).
function herald.on_error(fn)
  if type(fn) ~= "function" then error("on_error: fn must be a function", 2) end
  global_logger = fn
end

local app_methods = {}
local app_mt = { __index = app_methods }
-- Every app made, for herald.run { workers }: it checks the ones that listen.
local apps = setmetatable({}, { __mode = "k" })

local function seconds_to_ms(s) return math.floor(s * 1000 + 0.5) end

--- herald.new(opts): an app. Options and defaults: herald.defaults.
function herald.new(opts)
  local o = options.check(app_schema, opts, "herald.new", 2)
  if o.message_rate_policy ~= "close" and o.message_rate_policy ~= "drop" then
    error("herald.new: option 'message_rate_policy' must be \"close\" or \"drop\", got "
      .. o.message_rate_policy, 2)
  end
  if o.policy ~= "close" and o.policy ~= "conflate" then
    error("herald.new: option 'policy' must be \"close\" or \"conflate\", got " .. o.policy, 2)
  end
  local app = setmetatable({ config = o, router = router.new(), logger = default_logger }, app_mt)
  apps[app] = true
  app.hub = core.hub(o.max_queued, o.max_subscriptions)
  if o.broker then
    app.broker, app.broker_config = open_broker(app.hub, o.broker)
    app.presence_board = presence.new(app.broker, math.floor(app.broker_config.presence_ttl * 1000))
  end
  app.topic_rules = topics.new { history = o.history, max_age = o.max_age, policy = o.policy }
  app.streams = {} -- conn handle -> stream, while the stream is open
  app.server = core.server({
    max_header_size = o.max_header_size,
    max_body_size = o.max_body_size,
    header_timeout_ms = seconds_to_ms(o.header_timeout),
    idle_timeout_ms = seconds_to_ms(o.idle_timeout),
    shutdown_timeout_ms = seconds_to_ms(o.shutdown_timeout),
    max_connections = o.max_connections,
    max_connections_per_ip = o.max_connections_per_ip,
    max_connects_per_ip = o.max_connects_per_ip,
    trust_loopback = o.trust_loopback and 1 or 0,
    max_queued = o.max_queued,
    drain_retry_ms = o.drain_retry,
  }, function(conn, raw) app:_dispatch(conn, raw) end, function(conn, ...) app:_on_event(conn, ...) end)
  if o.client_js then
    app:get("/herald.js", function(_, res) res:file(module_dir .. "/herald.js") end)
  end
  return app
end

--- Replaces the app's error logger: fn(message_with_traceback, req).
function app_methods:on_error(fn)
  if type(fn) ~= "function" then error("on_error: fn must be a function", 2) end
  self.logger = fn
end

function app_methods:_log(message, req)
  self.lua_errors = (self.lua_errors or 0) + 1
  local ok, err = pcall(self.logger, message, req)
  if not ok then default_logger("error in the app's on_error: " .. tostring(err) .. "\n" .. message) end
end

--- Calls fn(...) for the app: an error is logged with its traceback, not
-- raised. Returns whether it succeeded, then fn's results.
function app_methods:_callback(fn, ...)
  local result = table.pack(xpcall(fn, debug.traceback, ...))
  if not result[1] then self:_log(tostring(result[2])) end
  return table.unpack(result, 1, result.n)
end

function app_methods:route(method, path, handler)
  self.router:add(method, path, handler)
  return self
end
for _, method in ipairs { "get", "post", "put", "delete", "patch", "options" } do
  local upper = method:upper()
  app_methods[method] = function(self, path, handler)
    self.router:add(upper, path, handler)
    return self
  end
end

--- Serves the files below dir at prefix/... (no escape above dir).
function app_methods:static(prefix, dir)
  if type(dir) ~= "string" then error("static: dir must be a string", 2) end
  local pattern = prefix:gsub("/+$", "") .. "/*"
  return self:get(pattern, function(req, res) res:file(req.params.splat, { root = dir }) end)
end

local function plain(res, code, text)
  res.code = code
  res.headers = {}
  return res:send(text)
end

-- An error answer from Lua, counted in stats().errors like C's.
function app_methods:_fail(res, code, text)
  local key = "http_" .. code
  self.lua_answered = self.lua_answered or {}
  self.lua_answered[key] = (self.lua_answered[key] or 0) + 1
  return plain(res, code, text)
end

function app_methods:_dispatch(conn, raw)
  local req = request.new(raw, conn)
  local res = response.new(conn, req or raw)
  if not req then return plain(res, 400, "bad request target\n") end
  local handler, params = self.router:match(req.method, req.path)
  if not handler then
    if #params == 0 then return plain(res, 404, "not found\n") end
    res:header("Allow", table.concat(params, ", "))
    res.code = 405
    return res:send("method not allowed\n")
  end
  req.params = params
  local ok, err = xpcall(handler, debug.traceback, req, res)
  if not ok then
    self:_log(("%s %s: %s"):format(req.method, req.path, tostring(err)), req)
    if not res.sent then return self:_fail(res, 500, "internal server error\n") end
  elseif not res.sent and not res.deferred and conn:awaiting() then
    return res:send()
  end
end

-- ---- topics, streams and publishing ----

--- fn(req) runs once before a stream opens and returns the connection's
-- user (any value), or nil/false, status (default 401), body to refuse.
function app_methods:auth(fn)
  if type(fn) ~= "function" then error("auth: fn must be a function", 2) end
  self.auth_fn = fn
  return self
end

--- Rules for topics matching pattern ("name", "prefix*" or "*"): history,
-- max_age (s), policy ("close" | "conflate"), allow(user, topic, action),
-- join(topic, user, stream), leave(topic, user, stream).
function app_methods:topic(pattern, opts)
  self.topic_rules:add(pattern, opts, 2)
  return self
end

local function check_topic(topic, what, level)
  if type(topic) ~= "string" then error(what .. ": topic must be a string", level + 1) end
  if #topic == 0 or #topic > 1024 then error(what .. ": topic must be 1 to 1024 bytes", level + 1) end
  if topic:find("[%c\127]") then error(what .. ": topic must not contain control characters", level + 1) end
end

--- Runs auth for req. Returns the user (true when there is no auth), or
-- nil after answering the refusal.
function app_methods:_authenticate(req, res, fn)
  if not fn then return true end
  local ok, user, status, body = self:_callback(fn, req)
  if not ok then
    self:_fail(res, 500, "internal server error\n")
  elseif user == nil or user == false then
    status = math.type(status) == "integer" and status >= 400 and status <= 599 and status or 401
    plain(res, status, type(body) == "string" and body or (status == 403 and "forbidden\n" or "unauthorized\n"))
  else
    return user
  end
end

-- credentials: browsers refuse "*" on a credentialed request, so the
-- origin is echoed instead.
local function cors_origin(cors, origin, credentials)
  if cors == true or cors == "*" then return credentials and origin or "*" end
  if not origin then return nil end
  if type(cors) == "string" then return cors == origin and origin or nil end
  if type(cors) == "function" then return cors(origin) and origin or nil end
  for _, allowed in ipairs(cors) do
    if allowed == origin then return origin end
  end
end

-- cors is checked apart: true | "*" | origin | { origins } | function(origin) -> bool
local sse_schema = {
  close = { type = "function" },
  credentials = { type = "boolean", default = false },
  retry = { type = "integer", min = 0, max = 86400000 },
  heartbeat = { type = "number", min = 0, max = 3600 },
}

--- An SSE endpoint at path: open(stream, req) subscribes the stream to
-- topics; opts { close = fn(stream), cors, credentials, retry (ms),
-- heartbeat (s) }.
function app_methods:sse(path, open, opts)
  if type(open) ~= "function" then error("sse: open must be a function", 2) end
  local cors = opts and opts.cors
  if cors ~= nil and cors ~= true and type(cors) ~= "string" and type(cors) ~= "table"
    and type(cors) ~= "function" then
    error("sse: option 'cors' must be true, an origin, a list of origins or a function", 2)
  end
  local rest = {}
  for k, v in pairs(opts or {}) do
    if k ~= "cors" then rest[k] = v end
  end
  local o = options.check(sse_schema, rest, "sse", 2)
  o.cors = cors
  o.heartbeat = o.heartbeat or self.config.heartbeat
  o.class = stream.class("sse", self, nil, o.close)
  return self:get(path, function(req, res) self:_open_sse(req, res, open, o) end)
end

--- Opens a stream of class (stream.class: the route's) on req's connection:
-- auth, then open(stream, req), then start(stream) to answer and start it.
-- open may refuse with false, status, body (or, for WebSocket, ws:close()).
function app_methods:_open(class, req, res, open, start)
  local conn = res.conn
  if self.server:queued_bytes() > self.config.max_total_queued then
    return self:_fail(res, 503, "server busy: too much output waiting; try again soon\n")
  end
  local user = self:_authenticate(req, res, self.auth_fn)
  if user == nil then return end
  if user == true and not self.auth_fn then user = nil end
  local s = stream.new(class, conn, req, user)
  self.streams[conn] = s
  local ok, refused, status, body = true, nil, nil, nil
  if open then ok, refused, status, body = self:_callback(open, s, req) end
  stream.opened(s)
  local function abandon()
    self.hub:leave_all(conn)
    self.streams[conn] = nil
    s:_finish()
  end
  if not ok or refused == false or s.refused then
    abandon()
    if not conn:awaiting() then return end
    if not ok then return self:_fail(res, 500, "internal server error\n") end
    status = math.type(status) == "integer" and status >= 400 and status <= 599 and status or 403
    return plain(res, status, type(body) == "string" and body or "refused\n")
  end
  if not conn:alive() then return abandon() end
  stream.accepted(s)
  local ran, started, err = self:_callback(start, s)
  if not ran then
    abandon()
    if conn:awaiting() then return self:_fail(res, 500, "internal server error\n") end
    return
  end
  if not started then
    self:_log(("%s %s: stream failed to start: %s"):format(req.method, req.path, err), req)
    abandon()
  end
  stream.started(s) -- a stream may live for days: it keeps its params, not the whole request
end

local function sse_headers(req, o)
  local headers = {}
  local origin = o.cors and cors_origin(o.cors, req.headers.origin, o.credentials)
  if origin then
    headers = { "Access-Control-Allow-Origin", origin }
    if origin ~= "*" then
      headers[3], headers[4] = "Vary", "Origin"
      if o.credentials then headers[5], headers[6] = "Access-Control-Allow-Credentials", "true" end
    end
  end
  return headers
end

function app_methods:_open_sse(req, res, open, o)
  local headers = sse_headers(req, o) -- an error here is the route's: 500, nothing opened
  if req.method == "HEAD" then -- the head a GET would get, and no stream
    for i = 1, #headers, 2 do res:header(headers[i], headers[i + 1]) end
    res:header("Content-Type", "text/event-stream; charset=utf-8")
    res:header("Cache-Control", "no-cache")
    return res:send()
  end
  self:_open(o.class, req, res, open, function(s)
    local last_id = req.headers["last-event-id"] or req.query.last_event_id or s.replay_from
    return s.conn:sse_start(headers, math.floor(o.heartbeat * 1000 + 0.5), o.retry, last_id)
  end)
end

local ws_schema = {
  open = { type = "function" },
  message = { type = "function" },
  close = { type = "function" },
  protocols = { type = "table" },
  format = { type = "string", default = "raw" },
  max_message = { type = "integer", min = 1, max = 1073741824 },
  ping_interval = { type = "number", min = 0, max = 86400 },
}

--- A WebSocket endpoint at path: spec { open(ws, req), message(ws, data,
-- kind), close(ws, code, reason), protocols = { ... }, origin, format =
-- "raw" | "envelope", max_message (bytes), ping_interval (s) }.
function app_methods:ws(path, spec)
  if type(spec) ~= "table" then error("ws: spec must be a table", 2) end
  local origin = spec.origin
  if origin ~= nil and type(origin) ~= "string" and type(origin) ~= "table" and type(origin) ~= "function" then
    error("ws: option 'origin' must be an origin, a list of origins or a function", 2)
  end
  local rest = {}
  for k, v in pairs(spec) do
    if k ~= "origin" then rest[k] = v end
  end
  local o = options.check(ws_schema, rest, "ws", 2)
  if o.format ~= "raw" and o.format ~= "envelope" then
    error("ws: option 'format' must be \"raw\" or \"envelope\", got " .. o.format, 2)
  end
  for i, p in ipairs(o.protocols or {}) do
    if type(p) ~= "string" or not p:match("^[!#$%%&'*+%-.^_`|~%w]+$") then
      error(("ws: protocols[%d] must be a token"):format(i), 2)
    end
  end
  o.origin = origin
  o.max_message = o.max_message or self.config.max_message
  o.ping_interval = o.ping_interval or self.config.ping_interval
  o.class = stream.class("ws", self, o.message, o.close)
  return self:get(path, function(req, res) self:_open_ws(req, res, o) end)
end

function app_methods:_open_ws(req, res, o)
  local accept, status, reason, headers = websocket.check(req)
  if not accept then
    res.code = status
    for i = 1, #(headers or {}), 2 do res:header(headers[i], headers[i + 1]) end
    return res:send(reason)
  end
  if not websocket.origin_allowed(o.origin, req.headers.origin) then
    return plain(res, 403, "origin not allowed\n")
  end
  self:_open(o.class, req, res, o.open, function(s)
    local answer = { "Upgrade", "websocket", "Connection", "Upgrade", "Sec-WebSocket-Accept", accept }
    local protocol = websocket.choose_protocol(o.protocols, req.headers["sec-websocket-protocol"])
    if protocol then
      answer[7], answer[8] = "Sec-WebSocket-Protocol", protocol
      s.protocol = protocol
    end
    return s.conn:ws_start(answer, o.max_message, math.floor(o.ping_interval * 1000 + 0.5),
      o.format == "envelope", req.query.last_event_id or s.replay_from,
      self.config.max_message_rate, self.config.message_rate_policy == "drop")
  end)
end

--- From C: a WebSocket message, or a stream's connection gone.
function app_methods:_on_event(conn, event, a, b)
  local s = self.streams[conn]
  if not s then return end
  if event == "message" then
    if not s.message_fn then return end
    local ok = self:_callback(s.message_fn, s, a, b)
    if not ok then conn:ws_close(1011, "internal error") end
  elseif event == "closed" then
    self.streams[conn] = nil
    s:_finish(a, b)
  end
end

local publish_schema = { event = { type = "string" }, done = { type = "function" } }

--- Publishes data to topic: every subscriber gets it, and the topic's
-- history keeps it for resume. opts { event, done = fn(id, err) }.
-- Without a broker: returns the message id and how many subscribers here it
-- reached (done, if given, runs first). With one: returns true once the
-- message is on its way to Redis, which assigns the id (done(id) then, or
-- done(nil, why)); nil and why when Redis is unreachable: nothing was sent.
function app_methods:publish(topic, data, opts)
  check_topic(topic, "publish", 2)
  if type(data) ~= "string" then error("publish: data must be a string", 2) end
  local o = options.check(publish_schema, opts, "publish", 2)
  local rule = self.topic_rules:resolve(topic)
  if self.broker then
    return self.broker:publish(topic, data, o.event, rule.history, rule.max_age_ms, o.done)
  end
  local id, reached = self.hub:publish(topic, data, o.event, rule.history, rule.max_age_ms, rule.conflate)
  if o.done then self:_callback(o.done, id) end
  return id, reached
end

--- The topic's history newer than since_id (all of it if nil): a list of
-- { id, data, event, time }, and whether messages after since_id were lost.
-- With fn, fn(list, gap) gets them (or fn(nil, why)); with a broker fn is
-- needed, as Redis answers later.
function app_methods:history(topic, since_id, fn)
  check_topic(topic, "history", 2)
  if since_id ~= nil and type(since_id) ~= "string" then error("history: since_id must be a string", 2) end
  if fn ~= nil and type(fn) ~= "function" then error("history: fn must be a function", 2) end
  if self.broker then
    if not fn then error("history: with a broker, pass fn(list, gap): Redis answers later", 2) end
    local rule = self.topic_rules:resolve(topic)
    local ok, err = self.broker:history(topic, since_id, rule.history, rule.max_age_ms,
      function(...) self:_callback(fn, ...) end)
    if not ok then self:_callback(fn, nil, err) end
    return
  end
  local list, gap = self.hub:history(topic, since_id)
  if fn then return self:_callback(fn, list, gap) end
  return list, gap
end

--- How many connections are subscribed to topic.
function app_methods:subscribers(topic)
  check_topic(topic, "subscribers", 2)
  return self.hub:subscribers(topic)
end

--- The users (as app:auth returned them) subscribed to topic, each once.
-- With a broker, fn(users) gets the users on every node, as strings
-- (presence.name: a string, a number or a table's id), or fn(nil, why).
function app_methods:presence(topic, fn)
  check_topic(topic, "presence", 2)
  if fn ~= nil and type(fn) ~= "function" then error("presence: fn must be a function", 2) end
  if self.broker then
    if not fn then error("presence: with a broker, pass fn(users): Redis answers later", 2) end
    local ok, err = self.presence_board:list(topic, function(...) self:_callback(fn, ...) end)
    if not ok then self:_callback(fn, nil, err) end
    return
  end
  local users, seen = {}, {}
  for _, conn in ipairs(self.hub:members(topic)) do
    local s = self.streams[conn]
    local user = s and s.user
    if user ~= nil and not seen[user] then
      seen[user] = true
      users[#users + 1] = user
    end
  end
  if fn then return self:_callback(fn, users) end
  return users
end

-- From stream.lua: a stream of user joined or left topic.
function app_methods:_joined(topic, user)
  if self.presence_board then self.presence_board:join(topic, user) end
end

function app_methods:_left(topic, user)
  if self.presence_board then self.presence_board:leave(topic, user) end
end

--- Counters: connections, streams, topics, published, delivered,
-- conflated (messages skipped for slow clients), slow_closed.
function app_methods:stats()
  local st = self.hub:stats()
  for k, v in pairs(self.server:stats()) do st[k] = v end
  local n = 0
  for _ in pairs(self.streams) do n = n + 1 end
  st.streams = n
  st.errors.lua = self.lua_errors or 0
  if self.broker then
    local up, why = self.broker:status()
    st.broker = { up = up, error = why ~= "" and why or nil }
  end
  for k, count in pairs(self.lua_answered or {}) do st.errors[k] = (st.errors[k] or 0) + count end
  return st
end

-- name, type, help, and how to read it from stats()
local metric_list = {
  { "herald_connections", "gauge", "Open connections by transport.", "by_transport" },
  { "herald_subscriptions", "gauge", "Topic subscriptions.", "subscriptions" },
  { "herald_topics", "gauge", "Topics with subscribers or history.", "topics" },
  { "herald_messages_published_total", "counter", "Messages published.", "published" },
  { "herald_messages_delivered_total", "counter", "Messages queued to subscribers.", "delivered" },
  { "herald_bytes_in_total", "counter", "Bytes read from clients.", "bytes_in" },
  { "herald_bytes_out_total", "counter", "Bytes written to clients.", "bytes_out" },
  { "herald_writes_total", "counter", "Writes to clients' sockets (messages share them under load).", "writes" },
  { "herald_queued_bytes", "gauge", "Bytes waiting to be written.", "queued_bytes" },
  { "herald_slow_consumer_closes_total", "counter", "Connections closed for reading too slowly.", "slow_closed" },
  { "herald_conflated_messages_total", "counter", "Messages skipped for slow clients (conflate).", "conflated" },
  { "herald_errors_total", "counter", "Errors by kind (HTTP status, WebSocket close code, Lua).", "errors" },
  { "herald_broker_up", "gauge", "1 while the broker (Redis) is connected.", "broker_up" },
}

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

--- app:stats() in the Prometheus text format.
function app_methods:prometheus()
  local st, out = self:stats(), {}
  if st.broker then st.broker_up = st.broker.up and 1 or 0 end
  for _, m in ipairs(metric_list) do
    local name, kind, help, field = m[1], m[2], m[3], m[4]
    local v = st[field]
    if v == nil then goto next_metric end -- broker_up: only with a broker
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s\n"):format(name, help, name, kind)
    if type(v) == "table" then
      local label = field == "errors" and "kind" or "transport"
      for _, k in ipairs(sorted_keys(v)) do out[#out + 1] = ('%s{%s="%s"} %d\n'):format(name, label, k, v[k]) end
    else
      out[#out + 1] = ("%s %d\n"):format(name, v)
    end
    ::next_metric::
  end
  return table.concat(out)
end

local function loopback_only(req)
  local ip = req:peer()
  return ip == "::1" or (ip or ""):match("^127%.") or (ip or ""):match("^::ffff:127%.")
end

--- Serves app:prometheus() at path (GET) to requests allow(req) accepts
-- (default: from loopback only); others get 403.
function app_methods:metrics(path, opts)
  if opts ~= nil and type(opts) ~= "table" then error("metrics: opts must be a table", 2) end
  local allow = opts and opts.allow or loopback_only
  if type(allow) ~= "function" then error("metrics: opts.allow must be a function", 2) end
  return self:get(path, function(req, res)
    if not allow(req) then return plain(res, 403, "forbidden\n") end
    res:header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
    res:send(self:prometheus())
  end)
end

local publisher_schema = { auth = { type = "function" } }

--- A POST endpoint that publishes its body to the topic named by the path's
-- :topic parameter: opts { auth = fn(req) -> user | nil, status }. The
-- topic's allow(user, topic, "publish") rule applies. Answers JSON
-- {"id": ..., "subscribers": N}; ?event=name sets the event name.
function app_methods:publisher(path, opts)
  if type(path) ~= "string" or not path:find("/:topic", 1, true) then
    error("publisher: path must contain a :topic parameter", 2)
  end
  local o = options.check(publisher_schema, opts, "publisher", 2)
  return self:post(path, function(req, res)
    local user = self:_authenticate(req, res, o.auth)
    if user == nil then return end
    local topic = req.params.topic
    if #topic > 1024 or topic:find("%c") then return plain(res, 400, "bad topic name\n") end
    local rule = self.topic_rules:resolve(topic)
    if rule.allow and not rule.allow(user ~= true and user or nil, topic, "publish") then
      return plain(res, 403, "forbidden\n")
    end
    local event = req.query.event
    if event and (event == "" or #event > 256 or event:find("[%z\r\n]")) then
      return plain(res, 400, "bad event name\n")
    end
    if not self.broker then
      local id, reached = self.hub:publish(topic, req.body, event, rule.history, rule.max_age_ms, rule.conflate)
      res:header("Content-Type", "application/json")
      return res:send(('{"id":"%s","subscribers":%d}'):format(id, reached))
    end
    -- Redis assigns the id: the answer waits for it
    local ok, err = self.broker:publish(topic, req.body, event, rule.history, rule.max_age_ms, function(id, why)
      if not id then return plain(res, 503, "broker: " .. tostring(why) .. "\n") end
      res:header("Content-Type", "application/json")
      res:send(('{"id":"%s"}'):format(id))
    end)
    if not ok then return plain(res, 503, tostring(err) .. "\n") end
    res:defer()
  end)
end

--- app:listen { host = "127.0.0.1", port = 8080, backlog = 511, tls = ... }: returns
-- the bound port (port 0 picks a free one), or nil and a message.
function app_methods:listen(opts)
  local o = options.check(listen_schema, opts, "listen", 2)
  local tls = o.tls and check_tls(o.tls)
  if self.broker then
    local b = self.broker_config
    local ok, why = self.broker:wait(b.wait and math.maxinteger or math.floor(b.connect_timeout * 1000), b.wait)
    if not ok then
      return nil, ("listen: broker: Redis at %s: %s"):format(redacted(b.redis), why)
    end
  end
  local port, err = self.server:listen(o.host, o.port, o.backlog, tls)
  if not port then return nil, ("listen on %s port %d: %s"):format(o.host, o.port, err) end
  return port
end

--- Reads every TLS listener's certificate and key files again: new
-- connections get them, open ones keep theirs. On an error the old ones
-- stay and it returns nil and the message. (SIGHUP under herald.run does
-- this for every app.)
function app_methods:reload_tls()
  return self.server:reload_tls()
end

--- Stops accepting; open connections finish their request and close. The
-- broker's connections close too.
function app_methods:close()
  self.server:close()
  if self.presence_board then self.presence_board:close() end
  if self.broker then self.broker:close() end
end

--- How many connections the app has open.
function app_methods:connections()
  return self.server:connections()
end

local function check_ms(ms, fn, what, min)
  if type(ms) ~= "number" or ms < min or ms ~= ms then
    error(("%s: ms must be a number >= %d, got %s"):format(what, min, tostring(ms)), 3)
  end
  if type(fn) ~= "function" then error(what .. ": fn must be a function", 3) end
  return math.floor(ms)
end

--- Calls fn once after ms milliseconds; returns a handle with :cancel().
function herald.after(ms, fn)
  return core.timer(check_ms(ms, fn, "after", 0), 0, fn)
end

--- Calls fn every ms milliseconds; returns a handle with :cancel().
function herald.every(ms, fn)
  local period = check_ms(ms, fn, "every", 1)
  return core.timer(period, period, fn)
end

--- Milliseconds on the loop's monotonic clock.
herald.now = core.now

local function run_schema()
  return {
    workers = { type = "integer", default = math.min(core.parallelism(), 1024), min = 1, max = 1024 },
    -- restarts of one worker within a minute; past them, the master stops them all
    max_restarts = { type = "integer", default = 10, min = 0, max = 1000000 },
  }
end

-- workers > 1: every app that listens must share its topics through a broker.
local function check_workers(n)
  local listening = false
  for app in pairs(apps) do
    if app.server:listeners() > 0 then
      listening = true
      if app.config.broker == nil then
        error(("herald.run: workers = %d needs a broker on every app that listens "
          .. "(herald.new { broker = { redis = url } }): without one each worker would keep topics "
          .. "of its own, and a publish would reach only the subscribers of one worker"):format(n), 3)
      end
    end
  end
  if not listening then
    error(("herald.run: workers = %d but no app listens (call app:listen before herald.run)"):format(n), 3)
  end
end

--- herald.run(): serves until SIGINT, SIGTERM or herald.stop(); then stops
-- accepting, lets responses under way finish (each app's shutdown_timeout
-- bounds it), closes the rest and returns.
-- herald.run { workers = N, max_restarts = 10 }: N processes (default: the
-- number of cores) that each serve every listener (SO_REUSEPORT); this one
-- supervises them and returns once they all drained. Each worker ends its
-- process when it is done: code after herald.run runs in the master only.
function herald.run(opts)
  if opts == nil then return core.run() end
  local o = options.check(run_schema(), opts, "herald.run", 2)
  if o.workers == 1 then return core.run() end
  check_workers(o.workers)
  -- a worker serves once its brokers are connected again (a publish in its
  -- first milliseconds would fail otherwise); connect_timeout bounds the wait
  local function ready()
    for app in pairs(apps) do
      if app.broker then
        local ok, why = app.broker:wait(math.floor(app.broker_config.connect_timeout * 1000), false)
        if not ok then app:_log("worker: broker: " .. tostring(why)) end
      end
    end
  end
  local role, ok = core.workers(o.workers, o.max_restarts, ready)
  if role == "worker" then os.exit(ok, true) end
end
herald.stop = core.stop

--- herald.worker() -> which worker this process is (1..N under herald.run
-- { workers = N }; 1 when one process serves alone; 0 in the master), its
-- pid, and N.
herald.worker = core.worker

return herald
