/* conn: one TCP connection. It owns the socket, its timeout, the out queue of
 * shared chunks and its own lifetime; the protocol spoken on it (HTTP now,
 * SSE and WebSocket after an upgrade) is a table of functions it calls. */
#ifndef HERALD_CONN_H
#define HERALD_CONN_H

#include <stddef.h>
#include <uv.h>

#include "buf.h"
#include "http.h"
#include "hub.h"
#include "runtime.h"

typedef struct ws_conn ws_conn_t;

typedef struct conn_proto {
  const char *name;
  /* Bytes from the peer. */
  void (*on_data)(conn_t *c, const char *data, size_t len);
  /* The peer closed its side, or the socket failed. */
  void (*on_eof)(conn_t *c);
  /* The conn's timeout came (the protocol set it with conn_set_timer). */
  void (*on_timeout)(conn_t *c);
  /* The out queue fell below the resume mark after the protocol paused input. */
  void (*on_writable)(conn_t *c);
  /* The server is shutting down: finish or say goodbye. */
  void (*on_drain)(conn_t *c);
  /* The conn is going away: release the protocol's state. */
  void (*on_close)(conn_t *c);
  /* A hub message for a subscribed conn; NULL while the protocol cannot
   * take messages (HTTP: the stream is still opening). */
  void (*deliver)(conn_t *c, hub_msg_t *m);
  /* Messages of topic newer than what the client last saw were lost. */
  void (*gap)(conn_t *c, const char *topic, size_t len);
} conn_proto_t;

typedef struct out_item {
  hbuf_t *buf;
} out_item_t;

typedef struct tls_conn tls_conn_t;

/* A conn's place in a conn_list_t (runtime.h). */
typedef struct conn_link {
  conn_t *prev, *next;
} conn_link_t;

/* Every connection has one, idle ones too: 440 bytes on x86-64 (448 with
 * malloc's header), of which libuv's uv_tcp_t is 248; mind the padding.
 * tcp comes first: libuv's callbacks get the conn from the handle itself,
 * and its data field holds the conn's Lua handle (conn_lua_handle). */
struct conn {
  uv_tcp_t tcp;
  runtime_t *rt;
  server_t *server;
  const conn_proto_t *proto;
  conn_t *prev, *next;     /* the server's list */
  conn_link_t dirty_link;  /* its place in the runtime's replies or deliveries */
  /* The out queue: out1 until a second chunk waits (an idle conn has
   * had one, its 101 or its SSE head), then an array that it keeps. */
  out_item_t *outq;
  out_item_t out1;
  uint32_t out_off;        /* bytes of the head chunk already written (chunks < 4 GiB) */
  uint32_t delivery_turn;  /* the loop turn (runtime_t.turn) it joined the deliveries */
  size_t queued_bytes;     /* bytes queued and not yet written */
  unsigned out_head, out_len, out_cap;
  uint32_t tq_due;         /* loop time (ms, wrapping) of its timeout */
  conn_link_t tq_link;     /* its place in the runtime's timeout list (runtime.h) */
  int lua_ref;             /* registry ref of the Lua handle, if one was made */
  unsigned dirty : 2,       /* in no list, the replies or the deliveries (conn.c) */
      writing : 1, closing : 1, ending : 1, shut : 1, reading : 1, rejected : 1,
      notify_close : 1,    /* tell Lua when it goes: it held a stream */
      backed_up : 1,       /* the kernel refused part of the last write: the peer reads slowly */
      http_done : 1,       /* another protocol took over from HTTP */
      input_held : 1,      /* the protocol holds input back until the peer reads */
      out_inflight : 8,    /* chunks in the uv_write under way (at most MAX_WRITE_BATCH) */
      tq : 12;             /* its timeout list's index + 1; 0: no timeout set */
  http_conn_t *http;       /* the HTTP parser's state; freed once another protocol took over */
  hub_member_t member;
  ws_conn_t *ws;           /* WebSocket state after a 101; freed with the conn */
  tls_conn_t *tls;         /* NULL on a plain listener */
  struct ip_entry *ip;     /* its address's entry in the server's table, if counted */
};

/* The userdata of the conn's Lua handle (lua_server.c), NULL if none was
 * made or once the conn is gone. */
#define conn_lua_handle(c) ((c)->tcp.data)

/* Accepts a pending connection on listener into a new conn of server. */
conn_t *conn_accept(server_t *server, uv_stream_t *listener);

/* Queues a chunk (takes one reference of its own), written at the end of
 * this loop turn (unless a write is under way: then when it ends). */
int conn_send(conn_t *c, hbuf_t *b);
int conn_send_bytes(conn_t *c, const void *bytes, size_t len);
/* Queues a topic message: written in its turn among the deliveries, with
 * whatever else the conn has been sent by then (conn_flush_all). */
int conn_deliver(conn_t *c, hbuf_t *b);

/* Flushes what is queued, then sends FIN and closes after a short linger
 * (reading and discarding), so the peer sees the last response, not a reset. */
void conn_end(conn_t *c);

/* Closes now; queued output is dropped. */
void conn_close(conn_t *c);

/* The conn's one timeout: on_timeout (or the linger's or TLS handshake's
 * end) after ms; setting it again replaces it. The conn is closed if the
 * timeout cannot be kept (no memory for a new duration's list, or 4,095
 * distinct durations already). */
void conn_set_timer(conn_t *c, uint64_t ms);
void conn_stop_timer(conn_t *c);
/* In on_timeout: sets the timeout again, as long as the one that came. */
void conn_repeat_timer(conn_t *c);
/* The runtime's timeout lists: with the loop, and once its handles are closed. */
void conn_timeouts_init(runtime_t *rt);
void conn_timeouts_free(runtime_t *rt);
void conn_pause_reading(conn_t *c);
void conn_resume_reading(conn_t *c);

/* Writes this conn's queue at the end of the loop turn. */
void conn_mark_dirty(conn_t *c);

/* TLS: queues ciphertext after the ciphertext already queued (and before the
 * plaintext that waits for the handshake). */
int conn_queue_cipher(conn_t *c, hbuf_t *b);

/* Before the loop polls (the runtime's prepare handle): writes every reply,
 * and the deliveries for a slice of time. */
void conn_flush_all(runtime_t *rt);

/* Pausing input while this much output waits keeps a pipelining client that
 * never reads from growing our memory. */
#define CONN_PAUSE_MARK (256 * 1024)

#endif
