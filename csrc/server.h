/* server: one app's listeners and connections, with its limits. It accepts
 * connections and hands each complete request to its handler. */
#ifndef HERALD_SERVER_H
#define HERALD_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "http.h"
#include "limits.h"
#include "runtime.h"

typedef struct server_limits {
  size_t max_header_size;
  size_t max_body_size;
  uint64_t header_timeout_ms;
  uint64_t idle_timeout_ms;
  uint64_t shutdown_timeout_ms;
  unsigned max_connections;
  unsigned max_connections_per_ip;  /* 0: none */
  unsigned max_connects_per_ip;     /* new connections per second per address; 0: none */
  size_t max_queued;                /* per conn: bytes waiting for a peer that does not read */
  uint32_t drain_retry_ms;           /* SSE on shutdown: reconnect (elsewhere) after this */
  int trust_loopback;               /* loopback addresses (a local proxy) are not limited per address */
} server_limits_t;

typedef void (*server_request_fn)(conn_t *c, const http_request_t *req, void *ud);
/* Runs when a conn that the handler knew of (it made a Lua handle) goes away. */
typedef void (*server_conn_closed_fn)(conn_t *c, void *ud);
/* A complete WebSocket message from a conn. */
typedef void (*server_message_fn)(conn_t *c, const char *data, size_t len, int binary, void *ud);

typedef struct tls_config tls_config_t;

/* What an operator watches (app:stats, app:metrics). Protocol errors are
 * counted by the answer they got: an HTTP status or a WebSocket close code. */
#define SERVER_ERROR_KINDS 12
typedef struct server_stats {
  uint64_t bytes_in, bytes_out;
  uint64_t writes;        /* writes to sockets: fewer than deliveries when messages share them */
  uint64_t slow_closed;   /* conns closed for not reading what they were sent */
  uint64_t errors[SERVER_ERROR_KINDS];
} server_stats_t;

/* The kinds, in the order of errors[]. */
extern const int server_error_codes[SERVER_ERROR_KINDS];
void server_count_error(server_t *s, int status_or_close_code);

/* Ignores SIGPIPE unless the program handles it: a peer that resets must
 * not end the process. Called before any socket of ours is written to. */
void server_ignore_sigpipe(void);

typedef struct listener {
  uv_tcp_t tcp;
  server_t *server;
  tls_config_t *tls;      /* NULL: plain TCP */
  int backlog;            /* as listen was given it: a worker binds the address again with it */
  struct listener *next;
} listener_t;

struct server {
  runtime_t *rt;
  server_limits_t limits;
  server_request_fn on_request;
  server_conn_closed_fn on_conn_closed;
  server_message_fn on_message;
  void *ud;
  listener_t *listeners;
  conn_t *conns;
  unsigned nconns;
  unsigned rejecting;     /* conns being answered 503/429 for a connection limit */
  ip_table_t ips;         /* per client address: connections and connection rate */
  server_stats_t stats;
  size_t queued_bytes;    /* its conns' queued_bytes, summed (every stream's open checks it) */
  int draining;
  int orphaned;           /* its Lua owner is gone: free it once it is empty */
  server_t *next_in_rt, *prev_in_rt;
};

server_t *server_new(runtime_t *rt, const server_limits_t *limits, server_request_fn on_request,
                     server_conn_closed_fn on_conn_closed, void *ud);

/* Binds and listens (with TLS when tls is not NULL: on success the listener
 * owns the caller's reference); returns the bound port, or a negative libuv
 * error. */
int server_listen(server_t *s, const char *host, int port, int backlog, tls_config_t *tls);
/* The same on an address; with reuseport, the socket gets SO_REUSEPORT
 * before it binds, so that it shares the address with other such sockets
 * (the workers of herald.run { workers = N }). */
int server_listen_addr(server_t *s, const struct sockaddr *addr, int backlog, tls_config_t *tls,
                       int reuseport);
/* Sets SO_REUSEPORT on every listener (bound without it): other sockets
 * with it may then bind their addresses. 0 or a negative libuv error. */
int server_share_listeners(server_t *s);
/* Closes the listeners only: conns and the server's state stay as they are. */
void server_close_listeners(server_t *s);

/* Reads every TLS listener's certificates again; on any error keeps them all
 * as they were and returns -1 with err filled. New conns get the new ones. */
int server_reload_tls(server_t *s, char *err, size_t errlen);

/* Stops accepting and finishes every conn: idle ones close now, busy ones
 * after their response. */
void server_close(server_t *s);

/* The owner lets go: freed now if empty, else closed and freed once empty. */
void server_release(server_t *s);

/* For the drain: close conns still open past the shutdown timeout. */
void server_force_close(server_t *s);

/* A conn joined or left (called by conn). */
void server_add_conn(server_t *s, conn_t *c);
void server_remove_conn(server_t *s, conn_t *c);

#endif
