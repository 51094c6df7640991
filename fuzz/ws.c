/* The WebSocket frame and message path: a conn taken over by ws_start
 * through a real upgrade request (fz_handler), then the input as the
 * client's frames, in chunks: wslay's frame parser, ws.c's checks (mask,
 * RSV, opcodes, lengths, fragmentation, UTF-8 as it arrives, close codes
 * and reasons, control frames), the rate limit, pings and the close
 * handshake. The app echoes messages, publishes ("p..." to the topic it is
 * subscribed to), pings ("i...") or closes ("c..."); the harness checks
 * every frame the server sends back (fz_check_ws_frames).
 *
 * Input: four bytes of settings, then frames.
 *   byte 0: bit 0 structured mode (below; else the rest is raw client bytes),
 *           bits 1-2 chunk style, bit 3 envelope format, bits 4-5
 *           max_message (125, 1024, 65536, 16), bit 6 rate limit (3 a second),
 *           bit 7 over the rate: drop (else close 1008)
 *   byte 1: chunk seed
 *   byte 2: bit 0 the client ends its side at the end, bit 1 subscribe to
 *           "a" and "b", bit 2 publish and send while opening, bit 3 resume
 *           from 0000abcd-2, bit 4 resume everything (""), bit 5 the first
 *           frames come in the upgrade request's chunk, bit 6 the timer fires
 *           at the end, bit 7 the server drains at the end
 *   byte 3: bit 0 small socket buffers (writes back up soon), bit 1 the client
 *           does not read (until the end, or a record says so), bits 2-3 the
 *           hub's slow-consumer bound (1 MiB, 4 KiB, 16 KiB, 64 KiB): a
 *           subscriber that does not read gets "a" conflated and is closed
 *           for "b"; bit 4 the server's max_queued 16 KiB (else 1 MiB)
 *
 * Structured mode: records, each starting with a byte k:
 *   k & 7 in 0-3: a frame the harness encodes and masks:
 *       then h0 (FIN, RSV, opcode as on the wire) and a length byte n;
 *       k & 3: mask key (0: zero, else from the chunk seed),
 *       k & 0x08: not masked, k & 0x10: non-minimal length encoding,
 *       k & 0x20: a cut (chunk boundary and loop turn) after the frame,
 *       k & 0x40: a cut between head and payload, k & 0x80: a long filler payload
 *       of n KiB + another byte of a pattern byte (else n bytes of input)
 *   4: the conn's timer fires (ping, or the close wait); k & 8: instead,
 *      the client stops reading, or starts again
 *   5: a publish to "a" (k & 8: "b"; k & 16: with an event) of n bytes of input
 *   6: the app acts, (k >> 3) & 3: 0 ws_close(code: 2 bytes, reason: n bytes),
 *      1 ws_send ping (n bytes), 2 ws_send text or binary (n bytes), 3 drain
 *   7: n raw bytes, as they are */
#include <string.h>

#include "harness.h"

#define MAX_STREAM (256u << 10) /* client bytes per input, at most */

static const size_t max_messages[] = {125, 1024, 65536, 16};

static const char upgrade[] =
    "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

typedef struct stream {
  hstr_t bytes;         /* encoded, not yet fed */
  fz_chunker_t *ch;
  int first_with_upgrade; /* the upgrade request goes with the first feed */
  int dead;             /* the conn is gone or lingering: stop */
  int full;             /* MAX_STREAM reached: read no more records */
} stream_t;

static void put(stream_t *s, const void *p, size_t n) {
  if (s->bytes.len + n > MAX_STREAM) {
    s->full = 1;
    return;
  }
  FZ_CHECK(hstr_append(&s->bytes, p, n) == 0, "oom");
}

static void feed(stream_t *s) {
  if (s->dead || !s->bytes.len) {
    s->bytes.len = 0;
    return;
  }
  if (fz_feed_chunked(s->bytes.data, s->bytes.len, s->ch) != 0) s->dead = 1;
  s->bytes.len = 0;
  fz_turn(); /* a cut is also a loop turn: what was queued is written (or backs up) */
}

static conn_t *open_conn(void) {
  conn_t *c = fz_conn();
  return c && !c->closing && !c->ending ? c : NULL; /* as Lua's bind_check_conn */
}

static void encode_frame(stream_t *s, fz_in_t *in, uint8_t k, fz_rng_t *rng) {
  uint8_t h0 = fz_byte(in), n = fz_byte(in);
  uint8_t *payload;
  size_t len;
  const uint8_t *src;
  if (k & 0x80) {
    len = (size_t)n * 1024 + fz_byte(in);
    uint8_t pattern = fz_byte(in);
    if (s->bytes.len + len + 14 > MAX_STREAM) { /* enough: the rest of the input is not read */
      s->full = 1;
      return;
    }
    payload = malloc(len ? len : 1);
    FZ_CHECK(payload, "oom");
    memset(payload, pattern, len);
  } else {
    len = fz_take(in, n, &src);
    payload = malloc(len ? len : 1);
    FZ_CHECK(payload, "oom");
    if (len) memcpy(payload, src, len);
  }
  uint8_t head[14];
  size_t hl = 2;
  int masked = !(k & 0x08), longer = (k & 0x10) != 0;
  head[0] = h0;
  if (len < 126 && !longer) {
    head[1] = (uint8_t)len;
  } else if (len <= 0xFFFF && !(longer && len >= 126)) {
    head[1] = 126;
    head[2] = (uint8_t)(len >> 8), head[3] = (uint8_t)len;
    hl = 4;
  } else {
    head[1] = 127;
    for (int i = 0; i < 8; i++) head[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    hl = 10;
  }
  if (masked) {
    head[1] |= 0x80;
    uint32_t key = (k & 3) ? fz_rand(rng) : 0;
    memcpy(head + hl, &key, 4);
    for (size_t i = 0; i < len; i++) payload[i] ^= head[hl + (i & 3)];
    hl += 4;
  }
  put(s, head, hl);
  if (k & 0x40) feed(s);
  put(s, payload, len);
  free(payload);
  if (k & 0x20) feed(s);
}

static void app_acts(stream_t *s, fz_in_t *in, uint8_t k) {
  feed(s); /* what came before the act */
  int what = (k >> 3) & 3;
  const uint8_t *data;
  const char *err = NULL;
  if (what == 0) {
    int code = fz_byte(in) << 8;
    code |= fz_byte(in);
    size_t len = fz_take(in, fz_byte(in), &data);
    conn_t *c = open_conn();
    if (!c) return;
    int rc = ws_close(c, code, (const char *)data, len, &err);
    int valid = (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014 && code != 1010) ||
                (code >= 3000 && code <= 4999);
    FZ_CHECK(rc == 0 || !valid || len > 123 || !utf8_valid(data, len), "ws_close(%d) refused: %s",
             code, err);
    FZ_CHECK(rc != 0 || (valid && len <= 123 && utf8_valid(data, len)),
             "ws_close(%d, %zu bytes) accepted", code, len);
  } else if (what == 1 || what == 2) {
    size_t len = fz_take(in, fz_byte(in), &data);
    conn_t *c = open_conn();
    if (!c) return;
    int op = what == 1 ? WS_PING : utf8_valid(data, len) && !(k & 0x20) ? WS_TEXT : WS_BINARY;
    int rc = ws_send(c, (const char *)data, len, op, &err);
    /* a peer that does not read is closed instead (hub_member_send): that
     * comes back as "out of memory" */
    FZ_CHECK(rc == 0 || (op == WS_PING && len > 125) || strcmp(err, "closing") == 0 ||
                 (strcmp(err, "out of memory") == 0 && c->closing),
             "ws_send refused: %s", err);
  } else {
    fz_drain();
  }
  fz_turn();
}

static void structured(stream_t *s, fz_in_t *in, fz_rng_t *rng) {
  while (in->len && !s->dead && !s->full) {
    uint8_t k = fz_byte(in);
    switch (k & 7) {
      case 4:
        feed(s);
        if (k & 8) {
          fz.slow_reader = !fz.slow_reader;
          fz.may_reorder = 1;
          if (!fz.slow_reader) fz_turn();
        } else {
          fz_fire_timer();
        }
        break;
      case 5: {
        feed(s);
        const uint8_t *data;
        size_t len = fz_take(in, fz_byte(in), &data);
        const char *topic = k & 8 ? "b" : "a";
        unsigned reached;
        hub_publish(fz.hub, topic, 1, fz_topic_config(topic, 1), k & 16 ? "ev" : NULL,
                    (const char *)data, len, &reached);
        fz_turn();
        break;
      }
      case 6:
        app_acts(s, in, k);
        break;
      case 7: {
        const uint8_t *data;
        size_t len = fz_take(in, fz_byte(in), &data);
        put(s, data, len);
        break;
      }
      default:
        encode_frame(s, in, k, rng);
        break;
    }
  }
  feed(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    fz_setup(NULL);
    ready = 1;
  }
  fz_in_t in = {data, size};
  uint8_t f0 = fz_byte(&in), seed = fz_byte(&in), f2 = fz_byte(&in), f3 = fz_byte(&in);
  fz_chunker_t ch;
  fz_chunker_init(&ch, (f0 >> 1) & 3, seed);
  fz_rng_t rng;
  fz_rng_seed(&rng, seed ^ 0x5a);
  static const size_t bounds[] = {0, 4096, 16384, 65536};
  fz.small_buffers = f3 & 1;
  fz.slow_reader = (f3 >> 1) & 1;
  fz.hub_max_queued = bounds[(f3 >> 2) & 3];
  fz.srv->limits.max_queued = (f3 & 16) ? 16384 : 1048576;
  fz.srv->limits.max_header_size = 16384;
  fz.srv->limits.max_body_size = 1048576;
  fz.ws = (fz_ws_config_t){
      .opt = {.max_message = max_messages[(f0 >> 4) & 3],
              .ping_ms = 1000,
              .envelope = (f0 >> 3) & 1,
              .max_rate = (f0 & 0x40) ? 3 : 0,
              .rate_drop = (f0 >> 7) & 1},
      .subscribe = (f2 >> 1) & 1,
      .open_sends = (f2 >> 2) & 1,
      .last_id = (f2 & 0x10) ? "" : (f2 & 0x08) ? FZ_EPOCH_STR "-2" : NULL,
  };

  fz_open();
  stream_t s = {.ch = &ch};
  if (f2 & 0x20) {
    /* the request and the first frames in one read: http.c hands the rest
     * of that input to the new protocol */
    put(&s, upgrade, sizeof upgrade - 1);
    fz_chunker_t whole;
    fz_chunker_init(&whole, 0, 0);
    s.ch = &whole;
    if (f0 & 1) {
      if (in.len && (in.p[0] & 7) < 4) encode_frame(&s, &in, fz_byte(&in) & ~0x60, &rng); /* no cut inside */
    } else {
      const uint8_t *first;
      size_t n = fz_take(&in, fz_chunk_len(&ch, in.len), &first);
      put(&s, first, n);
    }
    feed(&s);
    s.ch = &ch;
  } else {
    put(&s, upgrade, sizeof upgrade - 1);
    fz_chunker_t whole;
    fz_chunker_init(&whole, 0, 0);
    s.ch = &whole;
    feed(&s);
    s.ch = &ch;
  }
  FZ_CHECK(fz.takeover == 'w', "the upgrade request was not taken over");
  if (f0 & 1) structured(&s, &in, &rng);
  else if (!s.dead) fz_feed_chunked(in.p, in.len, &ch);
  if (f2 & 0x40) fz_fire_timer();
  if (f2 & 0x80) fz_drain();
  if (f2 & 1) fz_client_eof();
  fz_close();
  hstr_free(&s.bytes);
  return 0;
}
