/* HTTP request parsing up to the handler, and on through a takeover: the
 * input is what a client sends on one connection, in chunks; the handler
 * (fz_handler in harness.c) answers most requests and hands /ws and /sse
 * to WebSocket and SSE, so upgrades and what follows them run too.
 *
 * Input: three bytes of settings, then the client's bytes.
 *   byte 0: bits 0-1 chunk style (harness.h), bit 2 the client ends its side
 *           at the end, bit 3 slow reader (small socket buffers, the client
 *           reads only when it must: backpressure), bits 4-5 max_header_size
 *           (16384, 1024, 2048, 4096), bits 6-7 max_body_size (1 MiB, 0, 16, 4096)
 *   byte 1: chunk seed
 *   byte 2: bit 0 the conn's timer fires at the end, bit 1 the server drains
 *           at the end, bit 2 the timer fires once more, bit 3 the server is
 *           at its connection limit (max_connections 0: the conn is answered
 *           503 at once), bits 4-7: if not 0, the timer also fires after that
 *           many chunks */
#include "harness.h"

static const size_t header_limits[] = {16384, 1024, 2048, 4096};
static const size_t body_limits[] = {1048576, 0, 16, 4096};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    fz_setup(NULL);
    ready = 1;
  }
  fz_in_t in = {data, size};
  uint8_t f0 = fz_byte(&in), seed = fz_byte(&in), f2 = fz_byte(&in);
  fz_chunker_t ch;
  fz_chunker_init(&ch, f0 & 3, seed);
  fz.slow_reader = fz.small_buffers = (f0 >> 3) & 1;
  fz.hub_max_queued = fz.slow_reader ? 8192 : 0;
  fz.srv->limits.max_queued = fz.slow_reader ? 65536 : 1048576;
  fz.srv->limits.max_connections = (f2 & 8) ? 0 : 1000; /* 0: every conn is answered 503 */
  fz.srv->limits.max_header_size = header_limits[(f0 >> 4) & 3];
  fz.srv->limits.max_body_size = body_limits[(f0 >> 6) & 3];
  fz.ws = (fz_ws_config_t){.opt = {.max_message = 1024, .ping_ms = 1000}};

  fz_open();
  unsigned chunks = 0, timer_at = f2 >> 4;
  const uint8_t *p = in.p;
  size_t left = in.len;
  while (left) {
    size_t k = fz_chunk_len(&ch, left);
    if (fz_feed(p, k) != 0) break;
    p += k;
    left -= k;
    if (++chunks == timer_at) fz_fire_timer();
  }
  if (f2 & 1) fz_fire_timer();
  if (f2 & 2) fz_drain();
  if (f2 & 4) fz_fire_timer();
  if (f0 & 4) fz_client_eof();
  fz_close();
  return 0;
}
