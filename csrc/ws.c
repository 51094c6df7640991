#include "ws.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <wslay/wslay.h>

#include "conn.h"
#include "hub.h"
#include "server.h"
#include "utf8.h"

/* How long we wait for the peer's close after sending ours. */
#define CLOSE_WAIT_MS 5000
#define MAX_CONTROL 125

/* What reading needs only while a frame or a message is partly read, or
 * input is held back: made when input comes, freed when it ends on a
 * message boundary, so that an idle conn keeps only its ws_conn_t. */
typedef struct ws_read {
  wslay_frame_context_ptr frames;
  const char *in; /* input not yet taken by wslay */
  size_t in_len;
  /* Bytes given to wslay, and bytes of frames it has returned (headers and
   * payload): equal, wslay holds nothing and its context (4 KiB of buffer)
   * is freed until the next input. */
  uint64_t given, parsed;
  char *held_input;        /* input not given to wslay while reading is paused */
  size_t held_len;
  uint8_t tail[14]; /* the last bytes given to wslay: at most one frame head */
  /* the frame being read */
  uint64_t frame_len, frame_off;
  uint8_t frame_opcode, frame_fin;
  /* the message being assembled (opcode 0: none) */
  uint8_t msg_opcode;
  hstr_t msg;
  utf8_state_t utf8;
  uint8_t *control; /* a control frame's payload while it is read */
} ws_read_t;

/* A WebSocket conn's state for as long as it lives: 40 bytes (48 with
 * malloc's header), as most conns are idle most of the time; ws_options_t
 * packed in. */
struct ws_conn {
  ws_read_t *rd;   /* NULL between messages */
  char *reason;    /* the close reason, once there is one */
  uint32_t max_message; /* options: at most 1 GiB */
  uint32_t ping_ms, max_rate;
  /* the rate limit: a bucket of max_rate tokens, refilled each second */
  uint32_t tokens;
  uint32_t refilled_ms; /* loop time (wrapping at 49 days) of the last refill */
  uint16_t close_code;  /* the peer's, or ours if it sent none */
  uint8_t reason_len;
  uint8_t envelope : 1, rate_drop : 1, /* options */
      heard : 1, ping_due : 1, close_sent : 1, close_received : 1; /* keepalive and close */
};

void *ws_sha1_new(void) {
  return EVP_MD_fetch(NULL, "SHA1", NULL);
}

void ws_sha1_free(void *sha1) {
  EVP_MD_free(sha1);
}

int ws_accept_key(const void *sha1, const char *key, size_t len, char out[29]) {
  static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int dlen = 0;
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  int ok = md && EVP_DigestInit_ex(md, sha1 ? sha1 : EVP_sha1(), NULL) && EVP_DigestUpdate(md, key, len) &&
           EVP_DigestUpdate(md, guid, sizeof guid - 1) && EVP_DigestFinal_ex(md, digest, &dlen);
  EVP_MD_CTX_free(md);
  if (!ok || dlen != 20) return -1;
  EVP_EncodeBlock((unsigned char *)out, digest, 20); /* 28 chars and a NUL */
  return 0;
}

/* ---- frames out ---- */

static hbuf_t *frame(int opcode, const void *a, size_t alen, const void *b, size_t blen) {
  size_t len = alen + blen;
  size_t head = len < 126 ? 2 : len <= 0xFFFF ? 4 : 10;
  hbuf_t *f = hbuf_new(head + len);
  if (!f) return NULL;
  uint8_t *p = (uint8_t *)f->data;
  p[0] = (uint8_t)(0x80 | opcode);
  if (head == 2) {
    p[1] = (uint8_t)len;
  } else if (head == 4) {
    p[1] = 126;
    p[2] = (uint8_t)(len >> 8), p[3] = (uint8_t)len;
  } else {
    p[1] = 127;
    for (int i = 0; i < 8; i++) p[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
  }
  if (alen) memcpy(p + head, a, alen);
  if (blen) memcpy(p + head + alen, b, blen);
  return f;
}

static int send_frame(conn_t *c, int opcode, const void *a, size_t alen, const void *b,
                      size_t blen) {
  hbuf_t *f = frame(opcode, a, alen, b, blen);
  if (!f) return -1;
  int rc = hub_member_send(c, f);
  hbuf_unref(f);
  return rc;
}

static void keep_reason(ws_conn_t *ws, const void *reason, size_t len) {
  free(ws->reason);
  ws->reason = len ? malloc(len) : NULL;
  ws->reason_len = ws->reason ? (uint8_t)len : 0;
  if (ws->reason) memcpy(ws->reason, reason, len);
}

static int send_close(conn_t *c, int code, const char *reason, size_t len) {
  ws_conn_t *ws = c->ws;
  ws->close_sent = 1;
  if (!ws->close_received) {
    ws->close_code = (uint16_t)code;
    keep_reason(ws, reason, len);
  }
  if (code == WS_NO_STATUS) return send_frame(c, WS_CLOSE, NULL, 0, NULL, 0);
  uint8_t status[2] = {(uint8_t)(code >> 8), (uint8_t)code};
  return send_frame(c, WS_CLOSE, status, 2, reason, len);
}

/* A protocol error: say why and end the conn without waiting for the peer. */
static void fail(conn_t *c, int code, const char *why) {
  if (c->closing || c->ending) return;
  server_count_error(c->server, code);
  if (!c->ws->close_sent) send_close(c, code, why, strlen(why));
  conn_end(c);
}

/* ---- frames in ---- */

static ssize_t wslay_recv(uint8_t *buf, size_t len, int flags, void *ud) {
  (void)flags;
  ws_read_t *r = ((conn_t *)ud)->ws->rd;
  if (r->in_len == 0) return 0; /* wslay: want read */
  if (len > r->in_len) len = r->in_len;
  memcpy(buf, r->in, len);
  /* keep the last bytes given: at a frame boundary they hold the next head */
  size_t keep = len < sizeof r->tail ? len : sizeof r->tail;
  memmove(r->tail, r->tail + keep, sizeof r->tail - keep);
  memcpy(r->tail + sizeof r->tail - keep, buf + len - keep, keep);
  r->in += len;
  r->in_len -= len;
  r->given += len;
  return (ssize_t)len;
}

static ssize_t wslay_send_unused(const uint8_t *data, size_t len, int flags, void *ud) {
  (void)data, (void)len, (void)flags, (void)ud;
  return -1; /* frames out are built by frame() */
}

static int valid_close_code(unsigned code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
         (code >= 3000 && code <= 4999);
}

static void on_close_frame(conn_t *c, const uint8_t *p, size_t len) {
  ws_conn_t *ws = c->ws;
  if (len == 1) {
    fail(c, WS_PROTOCOL_ERROR, "close frame of one byte");
    return;
  }
  unsigned code = len ? (unsigned)(p[0] << 8 | p[1]) : WS_NO_STATUS;
  if (len && !valid_close_code(code)) {
    fail(c, WS_PROTOCOL_ERROR, "invalid close code");
    return;
  }
  if (len > 2 && !utf8_valid(p + 2, len - 2)) {
    fail(c, WS_INVALID_DATA, "close reason is not UTF-8");
    return;
  }
  ws->close_received = 1;
  ws->close_code = (uint16_t)code;
  keep_reason(ws, len > 2 ? p + 2 : NULL, len > 2 ? len - 2 : 0); /* p is NULL for an empty close */
  /* Echo the code, unless we closed first: then this is the answer. */
  if (!ws->close_sent) send_close(c, (int)code, "", 0);
  conn_end(c);
}

/* Whether the peer may send one more message now; over the limit, drops
 * it or closes with 1008 (policy violation). */
static int within_rate(conn_t *c) {
  ws_conn_t *ws = c->ws;
  if (!ws->max_rate) return 1;
  uint32_t now = (uint32_t)uv_now(&c->rt->loop);
  if ((uint32_t)(now - ws->refilled_ms) >= 1000) {
    ws->tokens = ws->max_rate;
    ws->refilled_ms = now;
  }
  if (ws->tokens > 0) {
    ws->tokens--;
    return 1;
  }
  if (!ws->rate_drop) fail(c, WS_POLICY, "message rate exceeded");
  return 0;
}

static void on_control(conn_t *c, int opcode, const uint8_t *p, size_t len) {
  if (opcode == WS_PING) {
    if (!within_rate(c)) return;
    if (!c->ws->close_sent && send_frame(c, WS_PONG, p, len, NULL, 0) != 0) conn_close(c);
  } else if (opcode == WS_CLOSE) {
    on_close_frame(c, p, len);
  } else {
    within_rate(c); /* a pong: hearing it was the point, but a flood of them is abuse */
  }
}

static void on_message(conn_t *c) {
  ws_conn_t *ws = c->ws;
  ws_read_t *r = ws->rd;
  int binary = r->msg_opcode == WS_BINARY;
  r->msg_opcode = 0;
  if (!binary && r->utf8.need) {
    fail(c, WS_INVALID_DATA, "text message is not UTF-8");
    return;
  }
  if (ws->close_sent) return; /* closing: late messages are dropped */
  if (!within_rate(c)) {
    r->msg.len = 0;
    return;
  }
  if (c->server->on_message)
    c->server->on_message(c, r->msg.data ? r->msg.data : "", r->msg.len, binary, c->server->ud);
  r->msg.len = 0; /* r outlives a close the handler made (release_read) */
}

/* What RFC 6455 forbids in a client frame's head that wslay lets through,
 * or NULL; *code is the close code. len is UINT64_MAX while unknown. */
static const char *frame_problem(const ws_conn_t *ws, int masked, int rsv, int op, uint64_t len,
                                 int *code) {
  const ws_read_t *r = ws->rd;
  *code = WS_PROTOCOL_ERROR;
  if (!masked) return "client frames must be masked";
  if (rsv) return "reserved bits set";
  if (op >= 8 && op != WS_CLOSE && op != WS_PING && op != WS_PONG) return "unknown opcode";
  if (op > WS_BINARY && op < 8) return "unknown opcode";
  if (op == 0 && !r->msg_opcode) return "continuation without a message";
  if ((op == WS_TEXT || op == WS_BINARY) && r->msg_opcode)
    return "new message inside a fragmented one";
  size_t so_far = op == 0 ? r->msg.len : 0;
  if (op < 8 && len != UINT64_MAX && len > ws->max_message - so_far) {
    *code = WS_TOO_BIG;
    return "message too big";
  }
  return NULL;
}

/* The first bytes of a frame, as wslay returns them with its first payload. */
static int frame_start(conn_t *c, const struct wslay_frame_iocb *f) {
  ws_read_t *r = c->ws->rd;
  int code, op = f->opcode;
  const char *why = frame_problem(c->ws, f->mask, f->rsv, op, f->payload_length, &code);
  if (why) {
    fail(c, code, why);
    return -1;
  }
  if (op == WS_TEXT || op == WS_BINARY) {
    r->msg_opcode = (uint8_t)op;
    r->utf8 = (utf8_state_t){0};
    r->msg.len = 0;
  }
  if (op >= 8 && f->payload_length && !r->control && !(r->control = malloc(MAX_CONTROL))) {
    conn_close(c);
    return -1;
  }
  r->parsed += 2 + (f->payload_length > 0xFFFF ? 8 : f->payload_length > 125 ? 2 : 0) + 4;
  r->frame_opcode = (uint8_t)op;
  r->frame_fin = f->fin;
  r->frame_len = f->payload_length;
  r->frame_off = 0;
  return 0;
}

/* wslay returns a frame only with payload; a head alone (a client announcing
 * a huge message, say) is checked here from the bytes wslay holds, which at
 * a frame boundary are at most one head: the last given - parsed bytes. */
static void precheck_head(conn_t *c) {
  ws_read_t *r = c->ws->rd;
  uint64_t held = r->given - r->parsed;
  if (held < 2 || held > sizeof r->tail) return;
  const uint8_t *h = r->tail + sizeof r->tail - held;
  uint64_t len = h[1] & 0x7f;
  if (len == 126)
    len = held >= 4 ? (uint64_t)h[2] << 8 | h[3] : UINT64_MAX;
  else if (len == 127 && held >= 10) {
    len = 0;
    for (int i = 2; i < 10; i++) len = len << 8 | h[i];
  } else if (len == 127) {
    len = UINT64_MAX;
  }
  int code;
  const char *why = frame_problem(c->ws, h[1] >> 7, (h[0] >> 4) & 7, h[0] & 0xf, len, &code);
  if (why) fail(c, code, why);
}

static void frame_data(conn_t *c, const struct wslay_frame_iocb *f) {
  ws_read_t *r = c->ws->rd;
  if (r->frame_opcode >= 8) {
    if (f->data_length) memcpy(r->control + r->frame_off, f->data, f->data_length);
  } else {
    if (r->msg_opcode == WS_TEXT && utf8_feed(&r->utf8, f->data, f->data_length) != 0) {
      fail(c, WS_INVALID_DATA, "text message is not UTF-8");
      return;
    }
    if (hstr_append(&r->msg, f->data, f->data_length) != 0) {
      conn_close(c);
      return;
    }
  }
  r->frame_off += f->data_length;
  r->parsed += f->data_length;
}

/* What we owe a peer that sends faster than it reads (pongs to a ping flood,
 * echoes) is bounded: past max_queued its input waits, unread, until it has
 * read. A peer that never reads then stays silent and keepalive drops it. */
static int hold_input(conn_t *c) {
  ws_read_t *r = c->ws->rd;
  if (c->backed_up) { /* and the kernel already refuses: it does not read */
    c->server->stats.slow_closed++;
    conn_close(c);
    return -1;
  }
  conn_pause_reading(c);
  c->input_held = 1;
  if (r->in_len == 0) return 0;
  char *p = realloc(r->held_input, r->held_len + r->in_len);
  if (!p) {
    conn_close(c);
    return -1;
  }
  memcpy(p + r->held_len, r->in, r->in_len);
  r->held_input = p;
  r->held_len += r->in_len;
  r->in_len = 0;
  return 0;
}

static const struct wslay_frame_callbacks wslay_callbacks = {wslay_send_unused, wslay_recv, NULL};

/* Frees the reading state's buffers; the struct stays, as on_data may be
 * running under a callback that closed the conn. */
static void release_read(ws_read_t *r) {
  if (r->frames) wslay_frame_context_free(r->frames);
  r->frames = NULL;
  hstr_free(&r->msg);
  free(r->control);
  r->control = NULL;
  free(r->held_input);
  r->held_input = NULL;
  r->held_len = 0;
}

static void on_data(conn_t *c, const char *data, size_t len) {
  ws_conn_t *ws = c->ws;
  if (!ws->rd && !(ws->rd = calloc(1, sizeof *ws->rd))) {
    conn_close(c);
    return;
  }
  ws_read_t *r = ws->rd; /* freed here, or with the conn */
  if (!r->frames && wslay_frame_context_init(&r->frames, &wslay_callbacks, c) != 0) {
    conn_close(c);
    return;
  }
  r->in = data;
  r->in_len = len;
  ws->heard = 1;
  while (!c->closing && !c->ending) {
    if (c->queued_bytes >= c->server->limits.max_queued) { /* owes too much: hold the rest */
      if (hold_input(c) != 0) return;
      break;
    }
    struct wslay_frame_iocb f;
    int at_start = r->frame_off == r->frame_len; /* the last frame is done */
    ssize_t n = wslay_frame_recv(r->frames, &f);
    if (n == WSLAY_ERR_WANT_READ) break;
    if (n < 0) {
      fail(c, WS_PROTOCOL_ERROR, "malformed frame");
      return;
    }
    if (at_start && frame_start(c, &f) != 0) return;
    frame_data(c, &f);
    if (c->closing || c->ending || r->frame_off < r->frame_len) continue;
    if (r->frame_opcode >= 8) {
      on_control(c, r->frame_opcode, r->control, (size_t)r->frame_len);
      free(r->control);
      r->control = NULL;
    } else if (r->frame_fin)
      on_message(c);
  }
  r->in = NULL;
  r->in_len = 0;
  if (c->closing || c->ending || r->frame_off != r->frame_len) return;
  if (r->given != r->parsed) {
    precheck_head(c);
    return;
  }
  /* At a frame boundary with nothing in wslay: its context goes, and
   * between messages the whole reading state, unless input is held. */
  wslay_frame_context_free(r->frames);
  r->frames = NULL;
  if (r->msg_opcode) return;
  if (r->held_input) {
    hstr_free(&r->msg);
    return;
  }
  release_read(r);
  free(r);
  ws->rd = NULL;
}

/* ---- the conn ---- */

static void on_eof(conn_t *c) {
  conn_close(c);
}

/* Keepalive: a conn we have not heard from for a ping interval is pinged;
 * silent for another, it is gone. After our close, the wait for the peer's. */
static void on_timeout(conn_t *c) {
  ws_conn_t *ws = c->ws;
  if (ws->close_sent) {
    conn_close(c);
    return;
  }
  if (ws->heard) {
    ws->heard = 0;
    ws->ping_due = 0;
  } else if (ws->ping_due) {
    {
      conn_close(c);
      return;
    }
  } else {
    ws->ping_due = 1;
    if (send_frame(c, WS_PING, NULL, 0, NULL, 0) != 0) {
      conn_close(c);
      return;
    }
  }
  conn_set_timer(c, ws->ping_ms);
}

static void on_writable(conn_t *c) {
  hub_member_catch_up(c);
  ws_conn_t *ws = c->ws;
  if (c->reading || c->closing || c->ending || c->queued_bytes >= c->server->limits.max_queued / 2)
    return;
  char *held = ws->rd ? ws->rd->held_input : NULL;
  size_t len = held ? ws->rd->held_len : 0;
  if (held) {
    ws->rd->held_input = NULL;
    ws->rd->held_len = 0;
  }
  c->input_held = 0;
  if (held) on_data(c, held, len); /* may hold some again */
  free(held);
  if (!(ws->rd && ws->rd->held_input) && !c->closing && !c->ending) conn_resume_reading(c);
}

static void on_drain(conn_t *c) {
  fail(c, WS_GOING_AWAY, "server shutting down");
}

static void on_close(conn_t *c) {
  if (c->ws->rd) release_read(c->ws->rd);
  /* the rest stays until the conn is freed: Lua asks how it ended */
}

void ws_conn_free(conn_t *c) {
  if (!c->ws) return;
  if (c->ws->rd) release_read(c->ws->rd);
  free(c->ws->rd);
  free(c->ws->reason);
  free(c->ws);
  c->ws = NULL;
}

/* The format is the conn's: raw payloads (text if they are UTF-8) or the
 * envelope. Either is built at its first use and shared from then on. */
static void deliver(conn_t *c, hub_msg_t *m) {
  if (c->ws->close_sent) return;
  hbuf_t **slot = c->ws->envelope ? &m->ws_envelope : &m->ws_raw;
  if (!*slot && !c->ws->envelope) {
    int op = utf8_valid(m->data, m->data_len) ? WS_TEXT : WS_BINARY;
    *slot = frame(op, m->data, m->data_len, NULL, 0);
  } else if (!*slot) {
    char id[HUB_ID_SIZE];
    hub_format_id(c->member.hub, m->seq, id);
    hstr_t json = {0};
    int rc = hstr_append(&json, "{\"topic\":", 9) |
             json_append_string(&json, m->topic, m->topic_len) | hstr_append(&json, ",\"id\":", 6) |
             json_append_string(&json, id, strlen(id));
    if (m->event)
      rc |= hstr_append(&json, ",\"event\":", 9) |
            json_append_string(&json, m->event, strlen(m->event));
    rc |= hstr_append(&json, ",\"data\":", 8) | json_append_string(&json, m->data, m->data_len) |
          hstr_append(&json, "}", 1);
    if (rc == 0) *slot = frame(WS_TEXT, json.data, json.len, NULL, 0);
    hstr_free(&json);
  }
  if (!*slot || conn_deliver(c, *slot) != 0) conn_close(c);
}

static void gap(conn_t *c, const char *name, size_t len) {
  /* Only the envelope can say it: raw payloads have no room for it. */
  if (!c->ws->envelope) return;
  hstr_t json = {0};
  int rc = hstr_append(&json, "{\"topic\":", 9) | json_append_string(&json, name, len) |
           hstr_append(&json, ",\"event\":\"herald-gap\"}", 22);
  if (rc || send_frame(c, WS_TEXT, json.data, json.len, NULL, 0) != 0) conn_close(c);
  hstr_free(&json);
}

static const conn_proto_t ws_proto = {
    .name = "ws",
    .on_data = on_data,
    .on_eof = on_eof,
    .on_timeout = on_timeout,
    .on_writable = on_writable,
    .on_drain = on_drain,
    .on_close = on_close,
    .deliver = deliver,
    .gap = gap,
};

int ws_start(conn_t *c, const http_header_t *headers, size_t nheaders, const ws_options_t *o,
             const char *last_id, const char **err) {
  ws_conn_t *ws = calloc(1, sizeof *ws);
  if (!ws) {
    *err = "out of memory";
    return -1;
  }
  ws->max_message = o->max_message < UINT32_MAX ? (uint32_t)o->max_message : UINT32_MAX;
  ws->ping_ms = o->ping_ms;
  ws->max_rate = o->max_rate;
  ws->envelope = o->envelope != 0;
  ws->rate_drop = o->rate_drop != 0;
  ws->tokens = o->max_rate;
  ws->refilled_ms = (uint32_t)uv_now(&c->rt->loop);
  if (http_takeover(c, 101, headers, nheaders, &ws_proto, err) != 0) {
    free(ws);
    return -1;
  }
  c->ws = ws;
  c->notify_close = 1;
  if (hub_member_start(c, last_id) != 0) {
    *err = "out of memory";
    conn_close(c);
    return -1;
  }
  if (o->ping_ms) conn_set_timer(c, o->ping_ms);
  return 0;
}

int ws_send(conn_t *c, const char *data, size_t len, int opcode, const char **err) {
  if (opcode == WS_TEXT && !utf8_valid(data, len)) {
    *err = "text must be valid UTF-8";
    return -1;
  }
  if (opcode == WS_PING && len > MAX_CONTROL) {
    *err = "ping data must be at most 125 bytes";
    return -1;
  }
  if (c->ws && c->ws->close_sent) {
    *err = "closing";
    return -1;
  }
  if (send_frame(c, opcode, data, len, NULL, 0) != 0) {
    *err = "out of memory";
    return -1;
  }
  return 0;
}

int ws_close(conn_t *c, int code, const char *reason, size_t len, const char **err) {
  /* what a server may send: 1010 is the client's, 1004-1006 and 1015 never go on the wire */
  if (!((code >= WS_NORMAL && code <= 1003) || (code >= 1007 && code <= 1014 && code != 1010) ||
        (code >= 3000 && code <= 4999))) {
    *err = "code must be 1000-1003, 1007-1009, 1011-1014 or 3000-4999";
    return -1;
  }
  if (len > MAX_CONTROL - 2 || !utf8_valid(reason, len)) {
    *err = "reason must be UTF-8 of at most 123 bytes";
    return -1;
  }
  if (!c->ws || c->ws->close_sent) return 0;
  if (send_close(c, code, reason, len) != 0) {
    conn_close(c);
    return 0;
  }
  conn_set_timer(c, CLOSE_WAIT_MS); /* for the peer's answer */
  return 0;
}

int ws_close_status(const conn_t *c, const char **reason, size_t *len) {
  const ws_conn_t *ws = c->ws;
  *reason = "";
  *len = 0;
  if (!ws || !ws->close_code) return WS_ABNORMAL;
  *reason = ws->reason ? ws->reason : "";
  *len = ws->reason_len;
  return ws->close_code;
}
