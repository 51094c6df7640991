-- A chat over WebSocket: rooms, nicknames, join and leave notices, the last
-- 50 messages of a room on arrival, and reconnection without losing or
-- repeating a message (the browser uses /herald.js, which resumes with
-- ?last_event_id=).
--
--   PORT=8080 HOST=127.0.0.1 lua5.4 examples/chat/chat.lua
--
-- Each room is the topic "room:<name>" (history 50). A browser connects to
-- /ws/<room>?nick=<nickname> with format = "envelope", so every message
-- carries its id. Published messages (JSON in the envelope's data):
--   {"type":"message","nick":..,"text":..,"time":<unix s>}      event "message"
--   {"type":"join"|"leave","nick":..,"users":[..],"time":..}     event "join" | "leave"
-- and for one connection alone (plain JSON, no envelope):
--   {"type":"users","users":[..]}   the room's users, right after the history
--   {"type":"error","error":".."}   a message refused (too long, too fast...)
-- A client sends {"text": ".."} (or the text itself).
--
-- Routes: GET / (the page), GET /ws/:room (the WebSocket), GET
-- /rooms/:room/users (JSON from app:presence). With CHAT_ADMIN=1 (the
-- browser spec sets it): POST /admin/drop?nick=x[&hold=ms] closes that
-- user's connections and refuses their reconnections for hold ms.
--
-- Run as a script it listens; loaded with dofile (examples/demo.lua) it
-- returns { new = fn(opts) -> app, main = fn() }.
local herald = require "herald"
local cjson = require "cjson"
local cjson_safe = require "cjson.safe"

local chat = {
  HISTORY = 50,        -- messages a room keeps, and shows on arrival
  MAX_TEXT = 500,      -- characters in a message
  RATE = 5,            -- messages a user may send...
  RATE_WINDOW_MS = 5000, -- ...in this long
  MAX_HOLD_MS = 60000, -- the longest admin hold
}

local dir = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "."

-- 1 to 24 characters of UTF-8, none of them a control character (C0, DEL
-- or C1), not blank, no space at either end.
function chat.valid_nick(nick)
  if type(nick) ~= "string" then return false end
  local n = utf8.len(nick)
  if not n or n < 1 or n > 24 or nick:find("%c") or nick:find("^%s") or nick:find("%s$") then
    return false
  end
  for _, cp in utf8.codes(nick) do
    if cp >= 0x80 and cp <= 0x9F then return false end
  end
  return true
end

function chat.valid_room(room)
  return type(room) == "string" and #room >= 1 and #room <= 32 and room:find("^[%w_%-]+$") ~= nil
end

local function json_array(list)
  local out = {}
  for i, v in ipairs(list) do out[i] = cjson.encode(v) end
  return "[" .. table.concat(out, ",") .. "]"
end

--- Builds the chat app. opts { admin = true: the /admin routes }.
function chat.new(opts)
  opts = opts or {}
  -- 500 characters are at most 2000 bytes of UTF-8; JSON escapes add some
  local app = herald.new { max_message = 16384 }
  local online = {} -- topic -> nick -> streams of that nick in the room
  local recent = {} -- nick -> times (ms) of the messages in the rate window
  local streams = {} -- nick -> open streams, all rooms (to forget recent)
  local holds = {} -- nick -> until (ms): reconnections refused (admin)

  local function users(topic)
    local list = app:presence(topic)
    table.sort(list)
    return list
  end

  local function notice(topic, kind, nick)
    app:publish(topic, ('{"type":"%s","nick":%s,"users":%s,"time":%d}')
      :format(kind, cjson.encode(nick), json_array(users(topic)), os.time()), { event = kind })
  end

  local function refuse(ws, why)
    ws:send(cjson.encode { type = "error", error = why })
  end

  -- Presence: a notice when a nick's first stream joins a room and when its
  -- last one leaves (a second tab, or a reconnection racing the old
  -- connection's close, says nothing).
  app:topic("room:*", {
    history = chat.HISTORY,
    max_age = 86400, -- messages expire after a day: a room left idle is forgotten
    join = function(topic, nick)
      local room = online[topic] or {}
      online[topic] = room
      room[nick] = (room[nick] or 0) + 1
      if room[nick] == 1 then notice(topic, "join", nick) end
    end,
    leave = function(topic, nick)
      local room = online[topic]
      if not room or not room[nick] then return end
      room[nick] = room[nick] - 1
      if room[nick] > 0 then return end
      room[nick] = nil
      if next(room) == nil then online[topic] = nil end
      notice(topic, "leave", nick)
    end,
  })

  -- The nickname is the connection's user (what presence lists).
  app:auth(function(req)
    local nick = req.query.nick
    if not chat.valid_nick(nick) then return nil, 400, "bad nickname\n" end
    return nick
  end)

  app:get("/", function(_, res) res:file("index.html", { root = dir }) end)

  app:ws("/ws/:room", {
    format = "envelope",
    open = function(ws)
      local room, nick = ws.params.room, ws.user
      if not chat.valid_room(room) then return false, 400, "bad room name\n" end
      if holds[nick] then
        if herald.now() < holds[nick] then return false, 503, "try again later\n" end
        holds[nick] = nil
      end
      local topic = "room:" .. room
      local ok, err = ws:subscribe(topic) -- our join notice is published here
      if not ok then return false, 503, "cannot join: " .. tostring(err) .. "\n" end
      -- A first visit starts from the room's history, merged with what is
      -- published meanwhile, in id order and each message once. A
      -- reconnection brings its own ?last_event_id= and resumes from it.
      ws:replay()
      streams[nick] = (streams[nick] or 0) + 1
      ws:on_close(function()
        streams[nick] = streams[nick] - 1
        if streams[nick] == 0 then streams[nick], recent[nick] = nil, nil end
      end)
      -- sent after the history: the users as of now; notices keep it fresh
      ws:send(('{"type":"users","users":%s}'):format(json_array(users(topic))))
    end,
    message = function(ws, data, kind)
      if kind ~= "text" then return refuse(ws, "text messages only") end
      local msg = cjson_safe.decode(data)
      local text = data
      if type(msg) == "table" then text = msg.text end
      if type(text) ~= "string" then return refuse(ws, "a message is {\"text\": \"...\"}") end
      -- no control characters but newlines and tabs; no blank ends
      text = text:gsub("\r\n?", "\n"):gsub("[\0-\8\11-\31\127]", ""):match("^%s*(.-)%s*$")
      if text == "" then return refuse(ws, "empty message") end
      local n = utf8.len(text)
      if not n then return refuse(ws, "not UTF-8") end -- a JSON \u escape of a lone surrogate
      if n > chat.MAX_TEXT then
        return refuse(ws, ("too long: %d characters, at most %d"):format(n, chat.MAX_TEXT))
      end
      local nick, now = ws.user, herald.now()
      local times, kept = recent[nick] or {}, {}
      for _, t in ipairs(times) do
        if now - t < chat.RATE_WINDOW_MS then kept[#kept + 1] = t end
      end
      if #kept >= chat.RATE then
        recent[nick] = kept
        return refuse(ws, ("slow down: at most %d messages in %d s"):format(chat.RATE, chat.RATE_WINDOW_MS // 1000))
      end
      kept[#kept + 1] = now
      recent[nick] = kept
      ws:publish("room:" .. ws.params.room,
        cjson.encode { type = "message", nick = nick, text = text, time = os.time() }, { event = "message" })
    end,
  })

  app:get("/rooms/:room/users", function(req, res)
    local room = req.params.room
    if not chat.valid_room(room) then return res:status(400):send("bad room name\n") end
    res:header("Content-Type", "application/json")
      :send(('{"room":%s,"users":%s}'):format(cjson.encode(room), json_array(users("room:" .. room))))
  end)

  if opts.admin then
    app:post("/admin/drop", function(req, res)
      local nick, hold = req.query.nick, math.tointeger(tonumber(req.query.hold or "0"))
      if not chat.valid_nick(nick) then return res:status(400):send("bad nickname\n") end
      if not hold or hold < 0 or hold > chat.MAX_HOLD_MS then return res:status(400):send("bad hold\n") end
      if hold > 0 then holds[nick] = herald.now() + hold end
      local mine = {}
      for _, s in pairs(app.streams) do
        if s.user == nick then mine[#mine + 1] = s end
      end
      for _, s in ipairs(mine) do s:close(4000, "dropped by the server") end
      res:header("Content-Type", "application/json"):send(('{"dropped":%d}'):format(#mine))
    end)
  end
  return app
end

--- Listens on HOST:PORT (127.0.0.1:8080), prints the URL, serves.
function chat.main()
  local app = chat.new { admin = os.getenv("CHAT_ADMIN") == "1" }
  local host = os.getenv("HOST") or "127.0.0.1"
  local port = assert(app:listen { host = host, port = tonumber(os.getenv("PORT") or "8080") })
  print(("herald chat: http://%s:%d/"):format(host:find(":", 1, true) and "[" .. host .. "]" or host, port))
  io.stdout:flush()
  herald.run()
end

if arg and arg[0] and debug.getinfo(1, "S").source == "@" .. arg[0] then chat.main() end
return chat
