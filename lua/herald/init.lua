--- herald: real-time push for Lua. This is the friendly half of the module;
-- herald.core (C) holds the loop, the sockets and the protocols.
local core = require "herald.core"
local options = require "herald.options"
local router = require "herald.router"
local request = require "herald.request"
local response = require "herald.response"

local herald = { _VERSION = "herald scm" }

local app_schema = {
  max_header_size = { type = "integer", default = 16384, min = 1024, max = 1048576 },
  max_body_size = { type = "integer", default = 1048576, min = 0, max = 1073741824 },
  header_timeout = { type = "number", default = 10, min = 0.05, max = 3600 },
  idle_timeout = { type = "number", default = 60, min = 0.05, max = 86400 },
  shutdown_timeout = { type = "number", default = 5, min = 0, max = 3600 },
  max_connections = { type = "integer", default = 10000, min = 1, max = 1000000 },
}
herald.defaults = {}
for name, rule in pairs(app_schema) do herald.defaults[name] = rule.default end

local listen_schema = {
  host = { type = "string", default = "127.0.0.1" },
  port = { type = "integer", default = 8080, min = 0, max = 65535 },
  backlog = { type = "integer", default = 511, min = 1, max = 65535 },
}

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

local function seconds_to_ms(s) return math.floor(s * 1000 + 0.5) end

--- herald.new(opts): an app. Options and defaults: herald.defaults.
function herald.new(opts)
  local o = options.check(app_schema, opts, "herald.new", 2)
  local app = setmetatable({ config = o, router = router.new(), logger = default_logger }, app_mt)
  app.server = core.server({
    max_header_size = o.max_header_size,
    max_body_size = o.max_body_size,
    header_timeout_ms = seconds_to_ms(o.header_timeout),
    idle_timeout_ms = seconds_to_ms(o.idle_timeout),
    shutdown_timeout_ms = seconds_to_ms(o.shutdown_timeout),
    max_connections = o.max_connections,
  }, function(conn, raw) app:_dispatch(conn, raw) end)
  return app
end

--- Replaces the app's error logger: fn(message_with_traceback, req).
function app_methods:on_error(fn)
  if type(fn) ~= "function" then error("on_error: fn must be a function", 2) end
  self.logger = fn
end

function app_methods:_log(message, req)
  local ok, err = pcall(self.logger, message, req)
  if not ok then default_logger("error in the app's on_error: " .. tostring(err) .. "\n" .. message) end
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
    if not res.sent then return plain(res, 500, "internal server error\n") end
  elseif not res.sent and conn:awaiting() then
    return res:send()
  end
end

--- app:listen { host = "127.0.0.1", port = 8080, backlog = 511 }: returns
-- the bound port (port 0 picks a free one), or nil and a message.
function app_methods:listen(opts)
  local o = options.check(listen_schema, opts, "listen", 2)
  local port, err = self.server:listen(o.host, o.port, o.backlog)
  if not port then return nil, ("listen on %s port %d: %s"):format(o.host, o.port, err) end
  return port
end

--- Stops accepting; open connections finish their request and close.
function app_methods:close()
  self.server:close()
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

--- Serves until SIGINT, SIGTERM or herald.stop(); then stops accepting,
-- lets responses under way finish (each app's shutdown_timeout bounds it),
-- closes the rest and returns.
herald.run = core.run
herald.stop = core.stop

return herald
