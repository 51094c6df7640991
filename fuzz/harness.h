/* The fuzz targets' shared harness: a real libuv loop, a real server with a
 * real listener on 127.0.0.1 (one for the process), and per input one real
 * TCP connection accepted by server.c's own accept path. The harness holds
 * the client's end: it reads (and checks) everything the server writes.
 *
 * Input goes to the server's conn the way conn.c's on_read hands it over
 * (see fz_feed): each chunk is copied into a heap buffer of exactly its size
 * first, so AddressSanitizer sees any read past a chunk (the real read
 * buffer is 64 KiB: an over-read would land in it unseen), and chunk
 * boundaries are exactly the ones the input asks for (TCP could merge them).
 *
 * Nothing in csrc/ is changed: the two runtime functions that live in
 * lua_core.c (excluded with Lua) are defined in harness.c. */
#ifndef HERALD_FUZZ_HARNESS_H
#define HERALD_FUZZ_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "conn.h"
#include "hub.h"
#include "server.h"
#include "sse.h"
#include "tls.h"
#include "utf8.h"
#include "ws.h"

/* Every hub made here has this epoch, so that a fuzzer can write our ids:
 * "0000abcd-<seq>". */
#define FZ_EPOCH 0x0000abcdu
#define FZ_EPOCH_STR "0000abcd"

/* An invariant the harness checks: a failure aborts, which libFuzzer reports
 * as a crash with this message and the stack. */
#define FZ_CHECK(cond, ...)                                                          \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      fprintf(stderr, "\nFUZZ INVARIANT FAILED (%s:%d): ", __FILE__, __LINE__);     \
      fprintf(stderr, __VA_ARGS__);                                                \
      fputc('\n', stderr);                                                         \
      abort();                                                                     \
    }                                                                              \
  } while (0)

/* The same for a finding already reported and saved in fuzz/regressions/:
 * FUZZ_KNOWN="name,..." in the environment skips it, so a long run can get
 * past it until csrc/ is fixed. make fuzz never sets it. */
int fz_known(const char *name);
#define FZ_CHECK_KNOWN(name, cond, ...)         \
  do {                                          \
    if (!fz_known(name)) FZ_CHECK(cond, __VA_ARGS__); \
  } while (0)

/* ---- input helpers ---- */

typedef struct fz_in {
  const uint8_t *p;
  size_t len;
} fz_in_t;

uint8_t fz_byte(fz_in_t *in);                       /* 0 once the input is used up */
size_t fz_take(fz_in_t *in, size_t n, const uint8_t **out); /* at most n bytes */

typedef struct fz_rng {
  uint64_t s;
} fz_rng_t;
void fz_rng_seed(fz_rng_t *r, uint64_t seed);
uint32_t fz_rand(fz_rng_t *r);

/* Chunk sizes, from a seed in the input: style 0 one chunk, 1 tiny (1-3),
 * 2 small (1-16), 3 mixed (1-512, now and then a single byte). */
typedef struct fz_chunker {
  fz_rng_t rng;
  int style;
} fz_chunker_t;
void fz_chunker_init(fz_chunker_t *ch, int style, uint8_t seed);
size_t fz_chunk_len(fz_chunker_t *ch, size_t left);

/* ---- the server side ---- */

/* What the request handler does for a WebSocket upgrade (fz_handler). */
typedef struct fz_ws_config {
  ws_options_t opt;
  int subscribe;         /* subscribe to "a" and "b" before ws_start */
  int open_sends;        /* publish and send while opening (held, merged by hub_member_start) */
  const char *last_id;   /* resume id (overrides the request's Last-Event-ID); NULL: the request's */
} fz_ws_config_t;

typedef struct fz {
  runtime_t *rt;
  server_t *srv;
  int port;
  int plain;             /* no TLS: the client's bytes are the server's output as is */
  int client;            /* the client's socket, -1 between inputs */
  hub_t *hub;            /* a fresh hub per input */
  hstr_t out;            /* everything the client has read */
  int slow_reader;       /* the client reads only when the harness must */
  int small_buffers;     /* small socket buffers: writes back up soon (set before fz_open) */
  size_t hub_max_queued; /* the hub's slow-consumer bound (0: 1 MiB; set before fz_open) */
  int handler_calls;
  /* the handler's record, for the output checks */
  uint8_t heads[256];    /* per dispatched request: 1 if it was HEAD */
  unsigned nrequests;
  size_t takeover_at;    /* where the takeover's response starts in out, or SIZE_MAX */
  int takeover;          /* 0, 's' (SSE) or 'w' (WebSocket) */
  int may_reorder;       /* conflation may reorder ids across topics */
  int envelope;          /* the WebSocket takeover sends envelopes */
  size_t max_message;    /* and takes messages up to this size */
  fz_ws_config_t ws;
  uint64_t last_seq;     /* WebSocket envelope / SSE ids seen: strictly increasing */
} fz_t;

extern fz_t fz;

/* Once per process: the loop, the server and its listener (TLS when tls is
 * not NULL: the listener takes that reference). */
void fz_setup(tls_config_t *tls);

/* Per input: a fresh hub (with some history), a new client connection and
 * its conn, accepted by server.c. Returns the conn. */
conn_t *fz_open(void);
/* The current conn, or NULL once it is gone. */
conn_t *fz_conn(void);
/* One loop turn (flush, reads, writes, closes); the client then reads what
 * came, unless it is a slow reader. */
void fz_turn(void);
/* Reads what the server wrote into fz.out. */
void fz_read_client(void);
/* Gives the conn n bytes as conn.c's on_read does once reading is on (it
 * waits turns for that). -1 when the conn is gone, closing or lingering:
 * further input would be dropped unread. */
int fz_feed(const void *data, size_t n);
/* fz_feed in chunks chosen by ch. */
int fz_feed_chunked(const void *data, size_t n, fz_chunker_t *ch);
/* The conn's timer fires now (if it is set), as conn.c's on_timer does. */
void fz_fire_timer(void);
/* The server starts shutting down: the conn's on_drain, as server_close does. */
void fz_drain(void);
/* The client ends its side (FIN). */
void fz_client_eof(void);
/* Turns until nothing moves. */
void fz_settle(void);
/* Checks the client's output, closes the conn and the client, frees the hub,
 * and checks that no handle is left behind. */
void fz_close(void);

/* The request handler every target uses (C, no Lua). Routes, by prefix:
 *   /ws...     WebSocket (ws_start); "env" in the URL: envelope format
 *   /sse...    SSE (sse_start); "retry" in the URL: retry 1000
 *   /pub       publish the body to X-Topic (default "a") with X-Event
 *   /big       64 KiB body
 *   /close     answered with Connection: close
 *   /none      not answered (http.c answers 500)
 *   /twice     answered twice (the second must fail)
 *   /status/N  status N
 *   /hdr       echoes X-Echo
 * anything else 404. */
void fz_handler(conn_t *c, const http_request_t *req, void *ud);

/* Topic rules: "a" conflates, "b" closes slow consumers, others close. */
const hub_topic_config_t *fz_topic_config(const char *name, size_t len);

/* Output checks (the plain targets): HTTP responses framed right, then the
 * takeover's stream: WebSocket frames as a server may send them, or SSE
 * events with strictly increasing ids. */
void fz_check_output(void);
void fz_check_ws_frames(const uint8_t *p, size_t n);

#endif
