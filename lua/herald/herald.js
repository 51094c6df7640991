/* herald.js: the browser client of herald (served by every app at /herald.js).
 * A classic script with no dependencies: it defines window.Herald. It also
 * works when loaded with <script type="module"> (it still sets the global).
 *
 *   <script src="/herald.js"></script>
 *   <script>
 *     const h = new Herald.Socket("/chat/lobby", {
 *       onmessage(msg) { ... },   // {topic, id, event, data}: a hub message
 *                                 // {data}: anything else (a direct ws:send)
 *       ongap(topic) { ... },     // messages of topic were lost while away
 *     });
 *     h.send("hello");
 *   </script>
 *
 * Herald.Socket(url, opts) speaks WebSocket to an app:ws endpoint with
 * format = "envelope". url may be relative ("/ws/x") or http(s):; it is
 * turned into ws(s):. opts:
 *   topics          list of names, sent as ?topics=a,b (the server decides
 *                   what to do with it; herald itself does not read it)
 *   protocols       WebSocket subprotocols to offer
 *   lastEventId     resume from this id on the first connection
 *   minDelay        500 ms, maxDelay 30000 ms: reconnection backoff, doubled
 *                   per failed attempt, with full jitter (a random wait
 *                   between 0 and the bound)
 *   connectTimeout  10000 ms: a handshake that takes longer is abandoned
 *   maxQueue        100: messages h.send keeps while disconnected
 *   onmessage(msg), onopen(), onclose(ev), ongap(topic), onerror(ev)
 * After every close that h.close() did not ask for, it reconnects with
 * ?last_event_id=<newest id seen>, and the server replays what was missed
 * (or says herald-gap first when its history no longer reaches back).
 * h.state: "connecting" | "open" | "reconnecting" (waiting to retry) |
 * "closed". h.lastEventId: the newest id seen. h.send(data) → true if sent or
 * queued (queued messages go out in order on the next open), false if the
 * queue is full or h is closed. A message sent just before a drop may be
 * lost: delivery to the server is at most once.
 *
 * Herald.EventStream(url, opts) is the receive-only fallback over
 * EventSource (app:sse endpoints): the same onmessage({id, event, data}),
 * ongap(topic), onopen(), onerror(ev), state, lastEventId and close().
 * EventSource only reports named events it listens for: list them in
 * opts.events (unnamed "message" events always come). EventSource resumes by
 * itself with Last-Event-ID; when it gives up (an error status: CLOSED),
 * EventStream reopens it after a backoff with ?last_event_id=. Other opts:
 * lastEventId, minDelay, maxDelay, withCredentials.
 *
 * Ids are "<8 hex digits: the server's epoch>-<sequence>"; the sequence
 * grows across the whole app, so one id resumes every topic at once.
 */
(function (global) {
  "use strict";

  var STABLE_MS = 5000; // a connection up this long starts the backoff afresh

  function call(fn, self, arg) {
    if (typeof fn === "function") fn.call(self, arg);
  }

  // url resolved against the page, with params set in its query; ws: turns
  // http(s) into ws(s).
  function withQuery(url, params, ws) {
    var base = global.location ? global.location.href : undefined;
    var u = new URL(url, base);
    if (ws && u.protocol === "http:") u.protocol = "ws:";
    if (ws && u.protocol === "https:") u.protocol = "wss:";
    for (var k in params) {
      if (params[k] != null) u.searchParams.set(k, params[k]);
    }
    return u.href;
  }

  // Whether id a is newer than b. Another epoch means the server restarted
  // (and forgot its history): its ids are the ones to resume from.
  function newer(a, b) {
    if (!b) return true;
    var ma = /^([0-9a-f]{8})-(\d+)$/.exec(a), mb = /^([0-9a-f]{8})-(\d+)$/.exec(b);
    if (!ma || !mb || ma[1] !== mb[1]) return true;
    return Number(ma[2]) > Number(mb[2]);
  }

  // Full jitter: a random wait up to min * 2^attempt, capped at max.
  function backoff(opts, attempt) {
    var min = opts.minDelay != null ? opts.minDelay : 500;
    var max = opts.maxDelay != null ? opts.maxDelay : 30000;
    return Math.floor(Math.random() * Math.min(max, min * Math.pow(2, Math.min(attempt, 30))));
  }

  // ---- WebSocket ----

  function Socket(url, opts) {
    if (!(this instanceof Socket)) return new Socket(url, opts);
    this.url = url;
    this.opts = opts || {};
    this.lastEventId = this.opts.lastEventId || null;
    this.state = "connecting";
    this.attempts = 0; // failed connections in a row
    this._queue = [];
    this._ws = null;
    this._timer = null;
    this._closed = false;
    var self = this;
    // Back online: no point waiting out the backoff.
    this._online = function () {
      if (self.state === "reconnecting") self._connect();
    };
    if (global.addEventListener) global.addEventListener("online", this._online);
    this._connect();
  }

  Socket.prototype._connect = function () {
    var self = this, o = this.opts, opened = 0;
    clearTimeout(this._timer);
    this._timer = null;
    this.state = "connecting";
    var params = {};
    if (o.topics && o.topics.length) params.topics = o.topics.join(",");
    if (this.lastEventId) params.last_event_id = this.lastEventId;
    var ws = new WebSocket(withQuery(this.url, params, true), o.protocols);
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    var timeout = setTimeout(function () {
      if (ws.readyState === WebSocket.CONNECTING) ws.close(); // fails it: onclose follows
    }, o.connectTimeout || 10000);

    ws.onopen = function () {
      clearTimeout(timeout);
      opened = Date.now();
      self.state = "open";
      while (self._queue.length && ws.readyState === WebSocket.OPEN) ws.send(self._queue.shift());
      call(o.onopen, self);
    };
    ws.onmessage = function (ev) {
      if (self._ws === ws) self._receive(ev.data);
    };
    ws.onerror = function (ev) {
      call(o.onerror, self, ev);
    };
    ws.onclose = function (ev) {
      clearTimeout(timeout);
      if (self._ws !== ws) return;
      self._ws = null;
      if (self._closed) {
        self.state = "closed";
      } else {
        if (opened && Date.now() - opened >= STABLE_MS) self.attempts = 0;
        self.state = "reconnecting";
        self._timer = setTimeout(function () { self._connect(); }, backoff(o, self.attempts++));
      }
      call(o.onclose, self, ev);
    };
  };

  // Envelopes are JSON {topic, id, event?, data}; a gap is {topic, event:
  // "herald-gap"} with no id. Anything else is the server's own word.
  Socket.prototype._receive = function (data) {
    var o = this.opts, m = null;
    if (typeof data === "string" && data.charAt(0) === "{") {
      try { m = JSON.parse(data); } catch (e) { m = null; }
    }
    if (m && typeof m.topic === "string" && m.event === "herald-gap" && m.id === undefined) {
      call(o.ongap, this, m.topic);
    } else if (m && typeof m.topic === "string" && typeof m.id === "string" && typeof m.data === "string") {
      if (newer(m.id, this.lastEventId)) this.lastEventId = m.id;
      call(o.onmessage, this, { topic: m.topic, id: m.id, event: m.event, data: m.data });
    } else {
      call(o.onmessage, this, { data: data });
    }
  };

  Socket.prototype.send = function (data) {
    if (this._closed) return false;
    if (this._ws && this._ws.readyState === WebSocket.OPEN && !this._queue.length) {
      this._ws.send(data);
      return true;
    }
    if (this._queue.length >= (this.opts.maxQueue || 100)) return false;
    this._queue.push(data);
    return true;
  };

  // Closes for good: no reconnection. code: 1000 or 3000-4999.
  Socket.prototype.close = function (code, reason) {
    if (this._closed) return;
    this._closed = true;
    this._queue = [];
    clearTimeout(this._timer);
    this._timer = null;
    if (global.removeEventListener) global.removeEventListener("online", this._online);
    if (this._ws) this._ws.close(code || 1000, reason); // onclose sets the state
    else this.state = "closed";
  };

  // ---- EventSource ----

  function EventStream(url, opts) {
    if (!(this instanceof EventStream)) return new EventStream(url, opts);
    this.url = url;
    this.opts = opts || {};
    this.lastEventId = this.opts.lastEventId || null;
    this.state = "connecting";
    this.attempts = 0;
    this._es = null;
    this._timer = null;
    this._open();
  }

  EventStream.prototype._open = function () {
    var self = this, o = this.opts;
    this._timer = null;
    this.state = "connecting";
    var params = {};
    if (this.lastEventId) params.last_event_id = this.lastEventId;
    var es = new EventSource(withQuery(this.url, params, false), { withCredentials: !!o.withCredentials });
    this._es = es;

    function deliver(ev) {
      if (self._es !== es) return;
      var id = ev.lastEventId || undefined;
      if (id && newer(id, self.lastEventId)) self.lastEventId = id;
      call(o.onmessage, self, { id: id, event: ev.type, data: ev.data });
    }
    var names = ["message"].concat(o.events || []);
    for (var i = 0; i < names.length; i++) es.addEventListener(names[i], deliver);
    es.addEventListener("herald-gap", function (ev) {
      var topic = null;
      try { topic = JSON.parse(ev.data).topic; } catch (e) { /* no topic */ }
      call(o.ongap, self, topic);
    });
    es.onopen = function () {
      self.attempts = 0;
      self.state = "open";
      call(o.onopen, self);
    };
    es.onerror = function (ev) {
      if (self._es !== es) return;
      self.state = "reconnecting";
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (an error status, say): reopen it ourselves,
        // after a backoff, resuming after the newest id seen.
        self._es = null;
        self._timer = setTimeout(function () { self._open(); }, backoff(o, self.attempts++));
      } // else CONNECTING: the browser retries by itself with Last-Event-ID
      call(o.onerror, self, ev);
    };
  };

  EventStream.prototype.close = function () {
    clearTimeout(this._timer);
    this._timer = null;
    if (this._es) this._es.close();
    this._es = null;
    this.state = "closed";
  };

  var Herald = { Socket: Socket, EventStream: EventStream };
  global.Herald = Herald;
  if (typeof module === "object" && module && module.exports) module.exports = Herald;
})(typeof globalThis !== "undefined" ? globalThis : typeof window !== "undefined" ? window : this);
