-- WebSocket conformance (RFC 6455), organized like the Autobahn testsuite's
-- cases: 1 framing, 2 pings and pongs, 3 reserved bits, 4 opcodes, 5
-- fragmentation, 6 UTF-8, 7 close, 9 limits (reduced), 10 misc; then the
-- opening handshake, the app's callbacks and keepalive. Each case speaks to
-- an echo app over a real socket with herald.test's client, which builds any
-- frame (t.ws_frame) and raises if the server ever sends a masked one.
local herald = require "herald"
local t = require "herald.test"
local core = require "herald.core"

local MAX = 64 * 1024 -- max_message of "/": the limits cases are on it
local BIG_MAX = 256 * 1024 -- "/big" takes larger messages

-- An app whose endpoint "/" (and "/big") echoes every message as it came;
-- spec adds to or replaces the endpoint's spec. Errors are kept in
-- app.logged, close callbacks' (code, reason) in app.closes.
local function echo_app(spec, opts)
  opts = opts or {}
  if opts.max_message == nil then opts.max_message = MAX end
  -- the conformance cases send bursts; the rate limit has its own specs
  if opts.max_message_rate == nil then opts.max_message_rate = 0 end
  local app = herald.new(opts)
  app.logged, app.closes = {}, {}
  app:on_error(function(message) app.logged[#app.logged + 1] = message end)
  finally(function() app:close() end)
  local s = {
    message = function(ws, data, kind) ws:send(data, kind) end,
    close = function(_, code, reason) app.closes[#app.closes + 1] = { code, reason } end,
  }
  for k, v in pairs(spec or {}) do s[k] = v end
  app:ws("/", s)
  app:ws("/big", { message = s.message, max_message = BIG_MAX })
  return app
end

-- An open WebSocket to app (101 asserted), aborted when the test ends.
local function open(app, path, opts)
  local w = t.ws(app, path or "/", opts)
  finally(function() w:abort() end)
  assert.equal(101, w.status, w.body)
  return w
end

-- n bytes of text (ASCII) or of binary (every byte value) that differ from
-- one position to the next.
local function text_of(n)
  local unit = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
  return unit:rep(n // #unit + 1):sub(1, n)
end

local function binary_of(n)
  local unit = {}
  for i = 0, 255 do unit[#unit + 1] = string.char((i * 167 + 13) % 256) end
  unit = table.concat(unit)
  return unit:rep(n // 256 + 1):sub(1, n)
end

-- Compares payloads without printing megabytes when they differ.
local function check_bytes(expected, actual, what)
  if expected == actual then return end
  local i = 1
  while i <= #expected and expected:byte(i) == (actual or ""):byte(i) do i = i + 1 end
  error(("%s: expected %d bytes, got %s; first difference at byte %d"):format(
    what or "payload", #expected, actual and (#actual .. " bytes") or "nothing", i), 2)
end

-- The next frame, which must be a final frame of kind with payload data.
local function expect_frame(w, kind, data, timeout)
  local f, err = w:receive(timeout)
  assert(f, ("expected a %s frame, got none (%s)"):format(kind, tostring(err)))
  assert.equal(kind, f.kind)
  assert.is_true(f.fin, "the server sent a fragment")
  assert.equal(0, f.rsv)
  check_bytes(data, f.data, kind .. " payload")
  return f
end

local function echo(w, data, kind)
  w:send(data, kind)
  return expect_frame(w, kind or "text", data)
end

-- "kind:data" for each frame, short enough to read in a failure.
local function summary(frames)
  local out = {}
  for i, f in ipairs(frames) do
    out[i] = f.kind .. ":" .. (#f.data <= 40 and f.data or (#f.data .. " bytes"))
  end
  return out
end

-- Reads frames up to the server's close frame: returns the frames before
-- it and the close frame (nil and why if the connection ended without one).
local function until_close(w, timeout)
  local before = {}
  while true do
    local f, err = w:receive(timeout or 2)
    if not f then return before, nil, err end
    if f.kind == "close" then return before, f end
    before[#before + 1] = f
  end
end

-- The server fails (or closes) the connection: the frames listed in before
-- (as summary() gives them), then a close frame with code (nil: a close
-- frame without payload), then the TCP close.
local function expect_close(w, code, before)
  local got, f, err = until_close(w)
  assert.same(before or {}, summary(got))
  assert(f, "no close frame from the server: " .. tostring(err))
  if code then
    assert.equal(code, f.code)
  else
    assert.equal("", f.data)
  end
  assert.is_true((w:wait_closed(2)), "the server did not close the TCP connection after its close frame")
  return f
end

-- Whether nothing arrives for ms milliseconds (the connection may be open).
local function quiet(w, ms)
  local f = w:receive(ms / 1000)
  return f == nil, f and summary { f }[1]
end

-- Writes bytes in chunks of size (1 by default), letting the loop turn
-- between writes so that the server reads them apart.
local function trickle(w, bytes, size)
  size = size or 1
  for i = 1, #bytes, size do
    w:send_raw(bytes:sub(i, i + size - 1))
    core.run_once(0)
  end
end

local F = t.ws_frame
local function close_payload(code, reason) return string.pack(">I2", code) .. (reason or "") end

describe("ws conformance", function()
  local saved_timeout
  before_each(function() saved_timeout = t.timeout; t.timeout = 5 end)
  after_each(function() t.timeout = saved_timeout end)

  describe("1.x framing", function()
    local lengths = { 0, 125, 126, 127, 128, 65535, 65536 }
    for _, kind in ipairs { "text", "binary" } do
      it(("1.%d: echoes %s messages of lengths 0 to 65536 (the 7-, 16- and 64-bit lengths)"):format(
        kind == "text" and 1 or 2, kind), function()
        local app = echo_app()
        local w = open(app)
        local make = kind == "text" and text_of or binary_of
        for _, n in ipairs(lengths) do echo(w, make(n), kind) end
        -- and the frames the server sent use the minimal length encoding
        w:send_raw(F(kind, make(126)) .. F(kind, make(65536)))
        t.wait(function() return #w.client.buffer >= 4 + 126 + 10 + 65536 end, 2, "two echoes")
        local b = w.client.buffer
        assert.same({ 126, 0, 126 }, { b:byte(2), b:byte(3), b:byte(4) })
        assert.same({ 127, 0, 0, 0, 0, 0, 1, 0, 0 }, { b:byte(4 + 126 + 2, 4 + 126 + 10) })
      end)
    end

    it("1.3: echoes 200 KiB text and binary messages where max_message allows them", function()
      local app = echo_app()
      local w = open(app, "/big")
      echo(w, text_of(200 * 1024), "text")
      echo(w, binary_of(200 * 1024), "binary")
      echo(w, binary_of(BIG_MAX), "binary")
    end)

    it("1.4: reads a frame written one byte at a time, the loop turning between writes", function()
      local app = echo_app()
      local w = open(app)
      local msg = text_of(200) -- a 16-bit length
      local frame = F("text", msg)
      trickle(w, frame:sub(1, -2))
      assert.is_true(quiet(w, 20), "an echo before the frame was complete")
      trickle(w, frame:sub(-1))
      expect_frame(w, "text", msg)
      trickle(w, F("binary", "\0\1\2"))
      expect_frame(w, "binary", "\0\1\2")
      -- a 64-bit length: the head a byte at a time, the payload in 997-byte writes
      local big = binary_of(65536)
      frame = F("binary", big)
      trickle(w, frame:sub(1, 14))
      trickle(w, frame:sub(15), 997)
      expect_frame(w, "binary", big)
    end)

    it("1.5: reads frames that share a write, and a frame split across writes", function()
      local app = echo_app()
      local w = open(app)
      local a, b, c = F("text", "one"), F("binary", "two"), F("text", text_of(300))
      w:send_raw(a .. b .. c:sub(1, 7))
      expect_frame(w, "text", "one")
      expect_frame(w, "binary", "two")
      w:send_raw(c:sub(8))
      expect_frame(w, "text", text_of(300))
    end)
  end)

  describe("2.x pings and pongs", function()
    it("2.1-2.3: answers a ping with a pong carrying its payload (none, text, binary)", function()
      local app = echo_app()
      local w = open(app)
      for _, payload in ipairs { "", "Hello, world!", "\0\255\254\1\128" } do
        w:send(payload, "ping")
        expect_frame(w, "pong", payload)
      end
    end)

    it("2.4: answers a ping of 125 bytes (the most a control frame carries)", function()
      local app = echo_app()
      local w = open(app)
      w:send(binary_of(125), "ping")
      expect_frame(w, "pong", binary_of(125))
    end)

    it("2.5: fails a ping of 126 bytes with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send(binary_of(126), "ping")
      expect_close(w, 1002)
    end)

    it("2.6: answers a 125-byte ping written one byte at a time", function()
      local app = echo_app()
      local w = open(app)
      trickle(w, F("ping", text_of(125)))
      expect_frame(w, "pong", text_of(125))
    end)

    it("2.7-2.8: ignores unsolicited pongs, with or without payload", function()
      local app = echo_app()
      local w = open(app)
      w:send("", "pong")
      w:send("unsolicited", "pong")
      echo(w, "after the pongs")
      assert.is_true(quiet(w, 50))
    end)

    it("2.9: answers only the ping after an unsolicited pong", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("pong", "unsolicited") .. F("ping", "solicited"))
      expect_frame(w, "pong", "solicited")
      assert.is_true(quiet(w, 50))
    end)

    it("2.10: answers 10 pings sent in one write with 10 pongs, in order", function()
      local app = echo_app()
      local w = open(app)
      local frames = {}
      for i = 1, 10 do frames[i] = F("ping", "payload " .. i) end
      w:send_raw(table.concat(frames))
      for i = 1, 10 do expect_frame(w, "pong", "payload " .. i) end
      assert.is_true(quiet(w, 50))
    end)

    it("2.11: answers 10 pings sent one by one", function()
      local app = echo_app()
      local w = open(app)
      for i = 1, 10 do
        w:send("ping " .. i, "ping")
        core.run_once(0)
      end
      for i = 1, 10 do expect_frame(w, "pong", "ping " .. i) end
    end)

    it("2.12: ws:ping(data) from the app sends a ping; more than 125 bytes raises", function()
      local errors = {}
      local app = echo_app {
        message = function(ws, data)
          assert(ws:ping(data))
          errors[#errors + 1] = select(2, pcall(ws.ping, ws, ("x"):rep(126)))
        end,
      }
      local w = open(app)
      w:send("are you there?")
      expect_frame(w, "ping", "are you there?")
      assert.is_true(quiet(w, 20))
      assert.equal(1, #errors)
      assert.matches("125", errors[1])
    end)
  end)

  describe("3.x reserved bits", function()
    local cases = {
      { "3.1", "text", 1 }, { "3.2", "text", 2 }, { "3.3", "text", 3 }, { "3.4", "binary", 4 },
      { "3.5", "binary", 5 }, { "3.6", "ping", 6 }, { "3.7", "close", 7 },
    }
    for _, case in ipairs(cases) do
      local name, kind, rsv = case[1], case[2], case[3]
      it(("%s: fails a %s frame with RSV = %d with 1002, after echoing what came before"):format(
        name, kind, rsv), function()
        local app = echo_app()
        local w = open(app)
        local payload = kind == "close" and close_payload(1000) or "reserved"
        w:send_raw(F("text", "before") .. F(kind, payload, { rsv = rsv }) .. F("ping", "after"))
        expect_close(w, 1002, { "text:before" })
      end)
    end

    it("3.8: fails an RSV frame written apart, after the earlier echo was read", function()
      local app = echo_app()
      local w = open(app)
      echo(w, "before")
      w:send_raw(F("binary", "x", { rsv = 1 }))
      expect_close(w, 1002)
    end)
  end)

  describe("4.x opcodes", function()
    for _, op in ipairs { 3, 4, 5, 6, 7, 11, 12, 13, 14, 15 } do
      local control = op >= 8
      it(("4.%d: fails a frame of reserved %s opcode %d with 1002"):format(
        control and 2 or 1, control and "control" or "non-control", op), function()
        local app = echo_app()
        local w = open(app)
        local payload = op % 2 == 0 and "" or "payload"
        w:send_raw(F("text", "before") .. F(op, payload) .. F("ping", "after"))
        expect_close(w, 1002, { "text:before" })
      end)
    end
  end)

  describe("5.x fragmentation", function()
    it("5.1-5.2: fails a fragmented ping or pong (fin = 0 on a control frame) with 1002", function()
      for _, kind in ipairs { "ping", "pong" } do
        local app = echo_app()
        local w = open(app)
        w:send_raw(F(kind, "frag", { fin = false }) .. F("continuation", "ment"))
        expect_close(w, 1002)
      end
    end)

    it("5.3-5.4: joins a text message of 2 fragments, in one write or two", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "frag", { fin = false }) .. F("continuation", "ment"))
      expect_frame(w, "text", "fragment")
      w:send_raw(F("text", "frag", { fin = false }))
      assert.is_true(quiet(w, 20), "an echo before the last fragment")
      w:send_raw(F("continuation", "ment"))
      expect_frame(w, "text", "fragment")
    end)

    it("5.5: joins a text message sent in 100 fragments, written one by one", function()
      local app = echo_app()
      local w = open(app)
      local msg = text_of(1000)
      for i = 1, 100 do
        local part = msg:sub(i * 10 - 9, i * 10)
        w:send_raw(F(i == 1 and "text" or "continuation", part, { fin = i == 100 }))
        core.run_once(0)
      end
      expect_frame(w, "text", msg)
    end)

    it("5.6-5.8: answers pings between fragments at once, and ignores pongs there", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "frag", { fin = false }) .. F("ping", "in between")
        .. F("continuation", "men", { fin = false })
        .. F("pong", "ignored") .. F("ping", "again"))
      expect_frame(w, "pong", "in between")
      expect_frame(w, "pong", "again")
      w:send_raw(F("continuation", "t"))
      expect_frame(w, "text", "fragment")
    end)

    it("5.8b: joins a binary message of 3 fragments", function()
      local app = echo_app()
      local w = open(app)
      local msg = binary_of(3000)
      w:send_raw(F("binary", msg:sub(1, 1000), { fin = false })
        .. F("continuation", msg:sub(1001, 2000), { fin = false })
        .. F("continuation", msg:sub(2001)))
      expect_frame(w, "binary", msg)
    end)

    it("5.9: fails a final continuation frame with no message started with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("continuation", "orphan") .. F("text", "after"))
      expect_close(w, 1002)
    end)

    it("5.10: fails a non-final continuation frame with no message started with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("continuation", "orphan", { fin = false }) .. F("continuation", "tail"))
      expect_close(w, 1002)
    end)

    it("5.11: fails a continuation after a complete message with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "complete") .. F("continuation", "extra"))
      expect_close(w, 1002, { "text:complete" })
    end)

    it("5.15: fails a new text frame in the middle of a fragmented message with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "first", { fin = false }) .. F("text", "second") .. F("continuation", "end"))
      expect_close(w, 1002)
    end)

    it("5.16: fails a new binary frame in the middle of a fragmented text message with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "first", { fin = false }) .. F("continuation", "more", { fin = false })
        .. F("binary", "second", { fin = false }) .. F("continuation", "end"))
      expect_close(w, 1002)
    end)

    it("5.19: joins messages made of empty fragments", function()
      local app = echo_app()
      local w = open(app)
      -- all empty
      w:send_raw(F("text", "", { fin = false }) .. F("continuation", "", { fin = false }) .. F("continuation", ""))
      expect_frame(w, "text", "")
      -- empty first, data in the middle, empty last
      w:send_raw(F("text", "", { fin = false }) .. F("continuation", "middle", { fin = false })
        .. F("continuation", ""))
      expect_frame(w, "text", "middle")
      w:send_raw(F("binary", "", { fin = false }) .. F("continuation", "\0"))
      expect_frame(w, "binary", "\0")
    end)
  end)

  describe("6.x UTF-8", function()
    local valid = {
      { "2-byte", "κόσμε" },
      { "3-byte", "€ ≠ ∞ 日本語" },
      { "4-byte", "𝄞 😀 𐍈" },
      { "boundaries", "\u{7F}\u{80}\u{7FF}\u{800}\u{D7FF}\u{E000}\u{FFFD}\u{FFFF}\u{10000}\u{10FFFF}" },
      { "a NUL", "nul\0inside" },
    }
    it("6.1-6.3: echoes valid text of 1- to 4-byte characters, in one frame", function()
      local app = echo_app()
      local w = open(app)
      for _, case in ipairs(valid) do
        local f = echo(w, case[2])
        assert.equal(case[2], f.data, case[1])
      end
    end)

    it("6.2: accepts fragment boundaries anywhere inside a code point", function()
      local app = echo_app()
      local w = open(app)
      local msg = "Hello-µ@ßöäüàá-€-𝄞-UTF-8!!"
      -- split at every byte position into two fragments
      for i = 1, #msg - 1 do
        w:send_raw(F("text", msg:sub(1, i), { fin = false }) .. F("continuation", msg:sub(i + 1)))
      end
      for _ = 1, #msg - 1 do expect_frame(w, "text", msg) end
      -- and one byte per fragment
      local frames = {}
      for i = 1, #msg do frames[i] = F(i == 1 and "text" or "continuation", msg:sub(i, i), { fin = i == #msg }) end
      w:send_raw(table.concat(frames))
      expect_frame(w, "text", msg)
      -- and with a ping between the halves of a code point
      w:send_raw(F("text", "\xE2", { fin = false }) .. F("ping", "p") .. F("continuation", "\x82\xAC"))
      expect_frame(w, "pong", "p")
      expect_frame(w, "text", "€")
    end)

    local invalid = {
      { "overlong '/' in 2 bytes", "\xC0\xAF" },
      { "overlong '/' in 3 bytes", "\xE0\x80\xAF" },
      { "overlong '/' in 4 bytes", "\xF0\x80\x80\xAF" },
      { "overlong U+07FF in 3 bytes", "\xE0\x9F\xBF" },
      { "overlong U+FFFF in 4 bytes", "\xF0\x8F\xBF\xBF" },
      { "C1 lead", "\xC1\xBF" },
      { "surrogate U+D800", "\xED\xA0\x80" },
      { "surrogate U+DFFF", "\xED\xBF\xBF" },
      { "surrogate pair", "\xED\xA0\x80\xED\xB0\x80" },
      { "U+110000", "\xF4\x90\x80\x80" },
      { "lead byte F5", "\xF5\x80\x80\x80" },
      { "byte FE", "\xFE" },
      { "byte FF", "\xFF" },
      { "lone continuation 80", "\x80" },
      { "lone continuation BF", "a\xBFb" },
      { "lead then ASCII", "\xC3a" },
      { "truncated 2-byte at the end", "abc\xC3" },
      { "truncated 3-byte at the end", "€\xE2\x82" },
      { "truncated 4-byte at the end", "\xF0\x9F\x98" },
      { "valid then a surrogate", "κόσμε\xED\xA0\x80edited" },
    }
    for _, case in ipairs(invalid) do
      it("6.3+: fails text with " .. case[1] .. " with 1007", function()
        local app = echo_app()
        local w = open(app)
        w:send_raw(F("text", "fine") .. F("text", case[2]) .. F("text", "after"))
        expect_close(w, 1007, { "text:fine" })
      end)
    end

    it("6.3b: fails invalid UTF-8 split over fragments, or in the last fragment, with 1007", function()
      for _, parts in ipairs {
        { "\xF4", "\x90\x80\x80" }, -- > U+10FFFF across the boundary
        { "\xED", "\xA0\x80" },     -- a surrogate across the boundary
        { "valid ", "\x80" },       -- a lone continuation in the last fragment
        { "abc", "\xE2\x82" },      -- truncated at the end of the message
      } do
        local app = echo_app()
        local w = open(app)
        w:send_raw(F("text", parts[1], { fin = false }) .. F("continuation", parts[2]))
        expect_close(w, 1007)
      end
    end)

    it("6.4: fails fast: an invalid byte in the first fragment closes with 1007 before the last is sent", function()
      for _, first in ipairs {
        "κόσμε\xED\xA0\x80edited", -- a surrogate in the middle of the first fragment
        "\xCE\xBA\xE1\xBD\xB9\xCF\x83\xCE\xBC\xCE\xB5\xF4\x90", -- > U+10FFFF at its end
      } do
        local app = echo_app()
        local w = open(app)
        w:send_raw(F("text", first, { fin = false }))
        expect_close(w, 1007)
      end
      -- and in a later fragment, before the final one
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "good ", { fin = false }) .. F("continuation", "bad \xFF", { fin = false }))
      expect_close(w, 1007)
    end)

    it("6.5: does not check binary messages for UTF-8", function()
      local app = echo_app()
      local w = open(app)
      echo(w, "\xED\xA0\x80\xFF\xC0\xAF", "binary")
    end)

    it("6.6: never sends invalid UTF-8 as text: ws:send raises, and sends it as binary", function()
      local results = {}
      local app = echo_app {
        message = function(ws, data)
          results[#results + 1] = table.pack(pcall(ws.send, ws, data .. "\xFF", "text"))
          assert(ws:send(data .. "\xFF", "binary"))
        end,
      }
      local w = open(app)
      w:send("bad")
      expect_frame(w, "binary", "bad\xFF")
      assert.is_false(results[1][1])
      assert.matches("UTF%-8", results[1][2])
    end)
  end)

  describe("7.x close", function()
    it("7.1.1: answers a close 1000 with a reason by a close 1000, then closes TCP", function()
      local app = echo_app()
      local w = open(app)
      echo(w, "hello")
      local f = assert(w:close(1000, "done"))
      assert.equal(1000, f.code)
      assert.is_true(f.fin)
      assert.is_true((w:wait_closed(2)))
      t.wait(function() return #app.closes == 1 end, 2, "the close callback")
      assert.same({ { 1000, "done" } }, app.closes)
    end)

    it("7.1.2-7.1.4: ignores a second close, pings and data sent after the close", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("close", close_payload(1000)) .. F("close", close_payload(1001)) .. F("ping", "late")
        .. F("text", "late"))
      expect_close(w, 1000)
    end)

    it("7.1.5: closes in the middle of a fragmented message and ignores the rest", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "frag", { fin = false }) .. F("close", close_payload(1000)) .. F("continuation", "ment"))
      expect_close(w, 1000)
    end)

    it("7.3.1: answers a close without payload by a close without payload", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("close", ""))
      expect_close(w, nil)
      t.wait(function() return #app.closes == 1 end, 2, "the close callback")
      assert.same({ { 1005, "" } }, app.closes)
    end)

    it("7.3.2: fails a close with a 1-byte payload with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("close", "\3"))
      expect_close(w, 1002)
    end)

    it("7.3.3-7.3.5: answers a close with a code, and with a reason of up to 123 bytes", function()
      for _, reason in ipairs { "", "Hello World!", text_of(123) } do
        local app = echo_app()
        local w = open(app)
        local f = assert(w:close(1000, reason))
        assert.equal(1000, f.code)
        assert.is_true((w:wait_closed(2)))
      end
    end)

    it("7.3.6: fails a close with a 124-byte reason (a 126-byte control frame) with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("close", close_payload(1000, text_of(124))))
      expect_close(w, 1002)
    end)

    it("7.5.1: fails a close whose reason is not UTF-8 with 1007", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("close", close_payload(1000, "bad \xED\xA0\x80 reason")))
      expect_close(w, 1007)
    end)

    for _, code in ipairs { 1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999 } do
      it(("7.7: echoes the valid close code %d"):format(code), function()
        local app = echo_app()
        local w = open(app)
        local f = assert(w:close(code, "bye"))
        assert.equal(code, f.code)
        assert.is_true((w:wait_closed(2)))
        t.wait(function() return #app.closes == 1 end, 2, "the close callback")
        assert.same({ { code, "bye" } }, app.closes)
      end)
    end

    for _, code in ipairs { 0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535 } do
      it(("7.9: fails the invalid close code %d with 1002"):format(code), function()
        local app = echo_app()
        local w = open(app)
        w:send_raw(F("close", close_payload(code)))
        expect_close(w, 1002)
      end)
    end

    it("7.13: a server-initiated ws:close(4000, 'bye') reaches the client; later data is dropped", function()
      local app = echo_app {
        message = function(ws, data, kind)
          if data == "close me" then
            assert(ws:close(4000, "bye"))
            -- sending after our close is refused, not sent
            assert.same({ nil, "closing" }, { ws:send("too late") })
          else
            ws:send(data, kind)
          end
        end,
      }
      local w = open(app)
      echo(w, "first")
      w:send("close me")
      local f = assert(w:receive(2))
      assert.equal("close", f.kind)
      assert.equal(4000, f.code)
      assert.equal("bye", f.reason)
      -- the client may still send until it answers: the server drops it
      w:send("late")
      w:send_raw(F("close", close_payload(4000, "ack")))
      local rest = until_close(w, 0.5)
      assert.same({}, summary(rest))
      assert.is_true((w:wait_closed(2)), "the server did not close TCP after the client's answer")
      t.wait(function() return #app.closes == 1 end, 2, "the close callback")
      assert.same({ { 4000, "ack" } }, app.closes)
    end)

    it("7.15: the app may close with any code an endpoint may send (1003 too); reserved ones raise", function()
      local app = echo_app {
        message = function(ws, data)
          local code, reason = data:match("^(%d+) ?(.*)$")
          local ok, err = pcall(ws.close, ws, tonumber(code), reason)
          if not ok then ws:send("refused " .. code .. ": " .. tostring(err)) end
        end,
      }
      -- 1003: "an endpoint is terminating the connection because it has
      -- received a type of data it cannot accept" (RFC 6455 7.4.1)
      for _, code in ipairs { 1000, 1001, 1003, 1007, 1008, 1009, 1011, 3000, 4999 } do
        local w = open(app)
        w:send(code .. " why")
        local f = assert(w:receive(2))
        assert.same({ "close", code, "why" }, { f.kind, f.code or f.data, f.reason }, "code " .. code)
        w:abort()
      end
      for _, code in ipairs { 999, 1004, 1005, 1006, 1015, 2000, 5000 } do
        local w = open(app)
        w:send(tostring(code))
        local f = assert(w:receive(2))
        assert.equal("text", f.kind, "code " .. code)
        assert.matches("^refused " .. code, f.data)
        w:abort()
      end
    end)

    it("7.16: app:close() says 1001 (going away) to its open WebSockets", function()
      local app = echo_app()
      local w = open(app)
      echo(w, "before")
      app:close()
      expect_close(w, 1001)
      t.wait(function() return #app.closes == 1 end, 2, "the close callback")
      assert.equal(1001, app.closes[1][1])
    end)

    it("7.14: the close callback gets (code, reason): 1006 for a connection lost, ours for a failure", function()
      local app = echo_app()
      local a = open(app)
      echo(a, "x")
      a:abort()
      t.wait(function() return #app.closes == 1 end, 2, "the close callback")
      assert.same({ 1006, "" }, app.closes[1])
      local b = open(app)
      b:send_raw(F("text", "x", { rsv = 1 }))
      expect_close(b, 1002)
      t.wait(function() return #app.closes == 2 end, 2, "the close callback")
      assert.equal(1002, app.closes[2][1])
    end)
  end)

  describe("9.x limits (max_message 64 KiB)", function()
    it("9.1: echoes a message of exactly max_message, text and binary, one frame or fragmented", function()
      local app = echo_app()
      local w = open(app)
      echo(w, text_of(MAX), "text")
      echo(w, binary_of(MAX), "binary")
      local msg = binary_of(MAX)
      w:send_raw(F("binary", msg:sub(1, 30000), { fin = false }) .. F("continuation", msg:sub(30001)))
      expect_frame(w, "binary", msg)
    end)

    it("9.2: fails a frame of max_message + 1 bytes with 1009", function()
      for _, kind in ipairs { "text", "binary" } do
        local app = echo_app()
        local w = open(app)
        w:send(text_of(MAX + 1), kind)
        expect_close(w, 1009)
      end
    end)

    it("9.3: fails a message over max_message in fragments with 1009, before its end", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("binary", binary_of(40000), { fin = false }) .. F("continuation", binary_of(40000), { fin = false }))
      expect_close(w, 1009)
    end)

    it("9.4: fails a frame announcing 2^62 bytes with 1009 at its first bytes, not at its end", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("binary", "", { length = 1 << 62 }) .. binary_of(1000))
      expect_close(w, 1009)
    end)

    it("9.4b: fails a frame head announcing max_message + 1 bytes with 1009 before any payload", function()
      -- README: "a message over max_message → 1009, as soon as a frame header says so"
      for _, length in ipairs { MAX + 1, 1 << 62 } do
        local app = echo_app()
        local w = open(app)
        w:send_raw(F("binary", "", { length = length })) -- the head (and mask key) alone
        expect_close(w, 1009)
      end
    end)

    it("9.5: echoes 1,000 small messages written at once, in order", function()
      local app = echo_app()
      local w = open(app)
      local frames, want = {}, {}
      for i = 1, 1000 do
        local kind = i % 3 == 0 and "binary" or "text"
        want[i] = kind .. ":" .. ("m%d%s"):format(i, ("."):rep(i % 17))
        frames[i] = F(kind, want[i]:match(":(.*)"))
      end
      w:send_raw(table.concat(frames))
      local got = {}
      for i = 1, 1000 do
        local f = assert(w:receive(5))
        got[i] = f.kind .. ":" .. f.data
      end
      assert.same(want, got)
    end)

    it("9.6: echoes 64 messages of 64 KiB written back to back", function()
      local app = echo_app()
      local w = open(app)
      local msg = binary_of(MAX)
      local frames = {}
      for i = 1, 64 do frames[i] = F("binary", msg) end
      w:send_raw(table.concat(frames))
      for _ = 1, 64 do expect_frame(w, "binary", msg) end
    end)
  end)

  describe("10.x misc", function()
    it("10.1: never masks a frame it sends (echo, pong, close)", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "a") .. F("ping", "b") .. F("close", close_payload(1000)))
      assert.is_true((w:wait_closed(2)))
      local b = w.client.buffer
      -- three frames of 2-byte heads: text "a", pong "b", close 1000
      assert.equal("\x81\x01a\x8A\x01b\x88\x02\x03\xE8", b)
    end)

    it("10.2: fails an unmasked client frame with 1002", function()
      local app = echo_app()
      local w = open(app)
      w:send_raw(F("text", "not masked", { masked = false }))
      expect_close(w, 1002)
    end)

    it("10.3: fails lengths not in their minimal form, or with the top bit set, with 1002", function()
      local function raw_frame(len_bytes, payload)
        return "\x82" .. len_bytes .. "\0\0\0\0" .. payload -- masked with a zero key
      end
      for _, frame in ipairs {
        raw_frame("\xFE\x00\x05", "hello"), -- 16-bit length for 5 bytes
        raw_frame("\xFF" .. string.pack(">I8", 200), ("x"):rep(200)), -- 64-bit length for 200 bytes
        raw_frame("\xFF" .. string.pack(">I8", 1 << 63), ""), -- the top bit
      } do
        local app = echo_app()
        local w = open(app)
        w:send_raw(frame)
        expect_close(w, 1002)
      end
    end)
  end)

  describe("handshake", function()
    -- A raw handshake request with headers (a name mapped to false is left
    -- out); returns the response.
    local function handshake(app, headers, path, version)
      local h = {
        Upgrade = "websocket", Connection = "Upgrade", ["Sec-WebSocket-Version"] = "13",
        ["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ==", Host = "test",
      }
      for k, v in pairs(headers or {}) do h[k] = v or nil end
      local lines = { ("GET %s HTTP/%s"):format(path or "/", version or "1.1") }
      for k, v in pairs(h) do lines[#lines + 1] = k .. ": " .. v end
      local c = t.connect(app)
      finally(function() c:close() end)
      c:send(table.concat(lines, "\r\n") .. "\r\n\r\n")
      local head = c:read_until("^HTTP/1%.1 %d%d%d[^\r\n]*\r\n.-\r\n\r\n", 2)
      assert(head, "no answer to the handshake")
      local res = t.parse_response(head, { head = true })
      res.client = c
      return res
    end

    it("answers 101 with Upgrade, Connection and the RFC 6455 sample's Sec-WebSocket-Accept", function()
      local app = echo_app()
      local w = open(app)
      assert.equal("websocket", w.headers.upgrade:lower())
      assert.equal("upgrade", w.headers.connection:lower())
      assert.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", w.headers["sec-websocket-accept"])
      assert.is_nil(w.headers["sec-websocket-protocol"])
      assert.is_nil(w.headers["sec-websocket-extensions"])
      assert.is_nil(w.headers["content-length"])
      assert.equal(core.ws_accept("x3JJHMbDL1EzLkh9GBhXDw=="), "HSmrc0sMlYUkAGmm5OPpG2HaGWk=")
    end)

    it("declines extensions it does not speak (permessage-deflate)", function()
      local app = echo_app()
      local w = open(app, "/", {
        headers = { ["Sec-WebSocket-Extensions"] = "permessage-deflate; client_max_window_bits" },
      })
      assert.is_nil(w.headers["sec-websocket-extensions"])
      echo(w, "uncompressed")
    end)

    it("answers 426 without Upgrade, naming the upgrade it wants", function()
      local app = echo_app()
      local w = t.ws(app, "/", { headers = { Upgrade = false } })
      assert.equal(426, w.status)
      assert.equal("websocket", w.headers.upgrade)
      -- a plain GET too
      assert.equal(426, t.get(app, "/").status)
    end)

    it("answers 400 to Upgrade: foo", function()
      local app = echo_app()
      assert.equal(400, t.ws(app, "/", { headers = { Upgrade = "foo" } }).status)
    end)

    it("answers 400 when Connection lacks the upgrade token", function()
      local app = echo_app()
      assert.equal(400, t.ws(app, "/", { headers = { Connection = "keep-alive" } }).status)
      assert.equal(400, t.ws(app, "/", { headers = { Connection = false } }).status)
      assert.equal(400, t.ws(app, "/", { headers = { Connection = "upgrades" } }).status)
    end)

    it("accepts Connection: keep-alive, Upgrade and tokens in any case", function()
      local app = echo_app()
      for _, h in ipairs {
        { Connection = "keep-alive, Upgrade" },
        { Connection = "Upgrade,keep-alive" },
        { Connection = "UPGRADE", Upgrade = "WebSocket" },
        { Connection = "upgrade", Upgrade = "WEBSOCKET" },
      } do
        local w = open(app, "/", { headers = h })
        echo(w, "ok")
        w:abort()
      end
    end)

    it("answers 426 with Sec-WebSocket-Version: 13 to another version", function()
      local app = echo_app()
      for _, v in ipairs { "8", "12", "14", false } do
        local w = t.ws(app, "/", { headers = { ["Sec-WebSocket-Version"] = v } })
        assert.equal(426, w.status)
        assert.equal("13", w.headers["sec-websocket-version"])
      end
    end)

    it("answers 400 to a missing or malformed Sec-WebSocket-Key", function()
      local app = echo_app()
      for _, key in ipairs {
        false, "", "short==", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ=",
        "dGhlIHNhbXBsZSBub25jZQ===", "dGhlIHNhbXBsZSBub25jZ!==", "dGhlIHNhbXBsZSBub25jZQdGhl",
      } do
        local w = t.ws(app, "/", { headers = { ["Sec-WebSocket-Key"] = key } })
        assert.equal(400, w.status, "key " .. tostring(key))
      end
    end)

    it("answers 400 to a handshake over HTTP/1.0", function()
      local app = echo_app()
      assert.equal(400, handshake(app, {}, "/", "1.0").status)
    end)

    it("chooses the subprotocol in the server's order among those offered", function()
      local opened = {}
      local app = echo_app { protocols = { "chat.v2", "chat.v1" }, open = function(ws) opened[#opened + 1] = ws end }
      local cases = {
        { { "chat.v1", "chat.v2" }, "chat.v2" },
        { { "chat.v1" }, "chat.v1" },
        { { "other", "chat.v1" }, "chat.v1" },
        { { "other" }, nil },
        { nil, nil },
        -- the header repeated: its values join
        { { "other" }, "chat.v1", { ["sec-websocket-protocol"] = "chat.v1" } },
      }
      for i, case in ipairs(cases) do
        local w = open(app, "/", { protocols = case[1], headers = case[3] })
        assert.equal(case[2], w.protocol)
        assert.equal(case[2], w.headers["sec-websocket-protocol"])
        t.wait(function() return opened[i] end, 2, "the open callback")
        assert.equal(case[2], opened[i].protocol)
        w:abort()
      end
      -- an endpoint without protocols never sends the header
      local plain = open(app, "/big", { protocols = { "chat.v1" } })
      assert.is_nil(plain.headers["sec-websocket-protocol"])
    end)

    it("checks Origin against a string, a list or a function (403)", function()
      local rules = {
        "https://a.example",
        { "https://a.example", "https://b.example" },
        function(origin) return origin == "https://a.example" end,
      }
      for _, rule in ipairs(rules) do
        local app = echo_app { origin = rule }
        local ok = open(app, "/", { headers = { Origin = "https://a.example" } })
        echo(ok, "allowed")
        local bad = t.ws(app, "/", { headers = { Origin = "https://evil.example" } })
        assert.equal(403, bad.status)
        local none = t.ws(app, "/")
        assert.equal(403, none.status)
      end
    end)

    it("applies app:auth (401) and gives the user as ws.user", function()
      local users = { good = { name = "ada" } }
      local app = echo_app {
        message = function(ws) ws:send(ws.user.name) end,
      }
      app:auth(function(req) return users[req.query.token], 401 end)
      assert.equal(401, t.ws(app, "/?token=bad").status)
      assert.equal(401, t.ws(app, "/").status)
      local w = open(app, "/?token=good")
      w:send("who am I?")
      expect_frame(w, "text", "ada")
    end)

    it("answers 404 when open returns false, 404", function()
      local app = echo_app { open = function() return false, 404 end }
      local w = t.ws(app, "/")
      assert.equal(404, w.status)
    end)

    it("answers 403 when open calls ws:close()", function()
      local app = echo_app { open = function(ws) ws:close() end }
      assert.equal(403, t.ws(app, "/").status)
      assert.same({}, app.closes)
    end)

    it("answers 500 and logs when open raises", function()
      local app = echo_app { open = function() error("open failed") end }
      assert.equal(500, t.ws(app, "/").status)
      assert.equal(1, #app.logged)
      assert.matches("open failed", app.logged[1])
      assert.matches("stack traceback", app.logged[1])
    end)

    it("closes with 1011 and logs with a traceback when the message handler raises", function()
      local app = echo_app { message = function() error("handler failed") end }
      local w = open(app)
      w:send("boom")
      local f = assert(w:receive(2))
      assert.equal("close", f.kind)
      assert.equal(1011, f.code)
      w:send_raw(F("close", close_payload(1011)))
      assert.is_true((w:wait_closed(2)))
      assert.equal(1, #app.logged)
      assert.matches("handler failed", app.logged[1])
      assert.matches("stack traceback", app.logged[1])
    end)
  end)

  describe("keepalive (ping_interval = 0.1 s)", function()
    it("pings a silent client and closes the connection if it never answers", function()
      local app = echo_app { ping_interval = 0.1 }
      local w = open(app)
      local start = core.now()
      local f = assert(w:receive(0.5))
      assert.equal("ping", f.kind)
      assert.is_true((w:wait_closed(0.5)), "the silent client was not closed")
      local elapsed = core.now() - start
      assert.is_true(elapsed <= 500, ("closed after %d ms"):format(elapsed))
      t.wait(function() return #app.closes == 1 end, 2, "the close callback")
    end)

    it("keeps a client that answers its pings", function()
      local app = echo_app { ping_interval = 0.1 }
      local w = open(app)
      local pings = 0
      local deadline = core.now() + 700
      while core.now() < deadline do
        local f = w:receive(0.05)
        if f then
          assert.equal("ping", f.kind)
          pings = pings + 1
          w:send(f.data, "pong")
        end
        assert.is_false(w:closed(), "the client that answered was closed")
      end
      assert.is_true(pings >= 2, pings .. " pings in 0.7 s")
      -- and it still echoes (past the pings that keep coming)
      w:send("still here")
      local f
      repeat
        f = assert(w:receive(1))
        if f.kind == "ping" then w:send(f.data, "pong") end
      until f.kind ~= "ping"
      assert.same({ "text:still here" }, summary { f })
      assert.same({}, app.closes)
    end)
  end)
end)
