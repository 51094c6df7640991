--- The WebSocket opening handshake (RFC 6455 4.2): what a request must
-- carry, and the subprotocol choice. Frames are C's (csrc/ws.c).
local core = require "herald.core"

local websocket = {}

-- (find, not gmatch: a handshake makes no garbage here; each gmatch's
-- state is a userdata of half a kilobyte)
local function has_token(list, token)
  if not list then return false end
  local at = 1
  while at <= #list do
    local comma = list:find(",", at, true) or #list + 1
    local first, last = list:find("[^%s]", at) or comma, comma - 1 -- the item without its spaces
    while last >= first and list:find("^%s", last) do last = last - 1 end
    if last - first + 1 == #token and list:sub(first, last):lower() == token then return true end
    at = comma + 1
  end
  return false
end

--- Checks req as a handshake. Returns the accept key, or nil, status,
-- reason, extra response headers (a flat list).
function websocket.check(req)
  local h = req.headers
  if not h.upgrade then
    return nil, 426, "this is a WebSocket endpoint: send Upgrade: websocket\n",
      { "Upgrade", "websocket", "Connection", "Upgrade" }
  end
  if not has_token(h.upgrade, "websocket") then return nil, 400, "Upgrade must be websocket\n" end
  if not has_token(h.connection, "upgrade") then return nil, 400, "Connection must include upgrade\n" end
  if req.version ~= "1.1" then return nil, 400, "WebSocket needs HTTP/1.1\n" end
  if h["sec-websocket-version"] ~= "13" then
    return nil, 426, "unsupported Sec-WebSocket-Version: this server speaks 13\n",
      { "Sec-WebSocket-Version", "13" }
  end
  local key = h["sec-websocket-key"]
  -- 16 random bytes in base64: 22 characters and "=="
  if not key or not key:match("^[%w+/]+==$") or #key ~= 24 then
    return nil, 400, "Sec-WebSocket-Key must be 16 bytes in base64\n"
  end
  return core.ws_accept(key)
end

--- The first of ours (in our order of preference) that the client offered.
function websocket.choose_protocol(ours, offered)
  if not ours or not offered then return nil end
  for _, p in ipairs(ours) do
    if has_token(offered, p:lower()) then return p end
  end
end

--- Whether origin passes the endpoint's rule: a string, a list, or a function.
function websocket.origin_allowed(rule, origin)
  if rule == nil then return true end
  if type(rule) == "function" then return rule(origin) and true or false end
  if not origin then return false end
  if type(rule) == "string" then return rule == origin end
  for _, o in ipairs(rule) do
    if o == origin then return true end
  end
  return false
end

return websocket
