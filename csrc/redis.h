/* redis: one client connection to a Redis server on the loop, plain or TLS
 * (rediss://). hiredis parses and formats the protocol; the socket, the
 * reconnects and TLS are ours, because Debian's hiredis (0.14) has no TLS and
 * its libuv adapter would hide the socket from our fork and close paths.
 *
 * Commands are answered in order; in push mode (after SUBSCRIBE) every reply
 * goes to on_push instead (but the answers to our own PINGs). When the
 * connection is lost (closed, or no answer in REDIS_REPLY_TIMEOUT_MS) every
 * waiting command is answered with an error, and it reconnects with backoff. */
#ifndef HERALD_REDIS_H
#define HERALD_REDIS_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <uv.h>

typedef struct redis_url {
  char *host;
  int port;
  char *user, *password; /* NULL when the URL has none */
  int db;
  int tls;
} redis_url_t;

/* redis://[[user]:password@]host[:port][/db] or rediss://...; 0 or -1 with *err. */
int redis_url_parse(const char *url, redis_url_t *out, const char **err);
void redis_url_free(redis_url_t *u);

typedef struct redis_tls_options {
  const char *ca_file;   /* NULL: the system's trust store */
  const char *cert_file, *key_file; /* client certificate, when the server asks */
  int verify;            /* check the server's certificate and name */
} redis_tls_options_t;

typedef struct redis_conn redis_conn_t;

/* reply is NULL when err says why (connection lost, or an error reply's text
 * when the command failed: then reply is the error reply). */
typedef void (*redis_reply_fn)(void *ud, redisReply *reply, const char *err);

typedef struct redis_events {
  /* Connected, authenticated, database selected: commands go through. */
  void (*on_ready)(redis_conn_t *r, void *ud);
  /* Lost (or a connect attempt failed); it retries after a backoff. */
  void (*on_lost)(redis_conn_t *r, const char *why, void *ud);
  /* A reply in push mode (pub/sub messages and subscription replies). */
  void (*on_push)(redis_conn_t *r, redisReply *reply, void *ud);
  void *ud;
} redis_events_t;

/* Starts connecting; NULL and *err when the TLS setup fails. */
redis_conn_t *redis_open(uv_loop_t *loop, const redis_url_t *url, const redis_tls_options_t *tls,
                         const redis_events_t *ev, char *err, size_t errlen);
/* Answers what waits with an error and frees it once its handles closed. */
void redis_close(redis_conn_t *r);
/* In a forked child: the socket belongs to the parent; let go of it (without
 * a word on it) and connect anew. */
void redis_after_fork(redis_conn_t *r);

int redis_ready(const redis_conn_t *r);
/* Replies go to on_push from now on (after the first SUBSCRIBE). */
void redis_push_mode(redis_conn_t *r, int on);

/* Sends a command; fn (may be NULL) gets its reply (in push mode on_push
 * does, and fn must be NULL). -1 when not connected or
 * out of memory: fn is not called. */
int redis_command(redis_conn_t *r, int argc, const char **argv, const size_t *lens,
                  redis_reply_fn fn, void *ud);
/* Commands sent and not answered yet. */
size_t redis_waiting(const redis_conn_t *r);

/* The delay before the next reconnect: doubles from 100 ms to 5 s. */
#define REDIS_BACKOFF_MIN_MS 100
#define REDIS_BACKOFF_MAX_MS 5000
#define REDIS_CONNECT_TIMEOUT_MS 5000
/* Once ready: a command (or our PING) unanswered this long loses the
 * connection; a connection quiet for REDIS_PING_IDLE_MS is sent a PING; both
 * checked every REDIS_CHECK_MS. */
#define REDIS_REPLY_TIMEOUT_MS 5000
#define REDIS_PING_IDLE_MS 5000
#define REDIS_CHECK_MS 1000
/* A reply bigger than this closes the connection (a history fetch is bounded
 * by count; this bounds it by bytes). */
#define REDIS_MAX_PENDING_INPUT (512u << 20)

#endif
