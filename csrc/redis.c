#include "redis.h"

#include "server.h" /* server_ignore_sigpipe */

#include <arpa/inet.h>
#include <ctype.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Past this much unwritten output, commands are refused: Redis is not
 * keeping up, and the caller must know rather than queue without end. */
#define MAX_UNWRITTEN (64u << 20)
/* After a failed write, how long the read side has to report the loss. */
#define WRITE_FAILED_GRACE_MS 100

enum { DOWN, RESOLVING, CONNECTING, HANDSHAKE, READY };

typedef struct waiter {
  redis_reply_fn fn;
  void *ud;
  uint64_t sent_ms;        /* loop time it was sent */
} waiter_t;

struct redis_conn {
  uv_loop_t *loop;
  redis_url_t url;
  redis_events_t ev;
  SSL_CTX *ssl_ctx;        /* NULL for redis:// */
  SSL *ssl;
  BIO *rbio, *wbio;        /* ciphertext from and to the socket */
  uv_tcp_t *tcp;           /* the current socket; NULL between attempts */
  uv_timer_t *timer;       /* connect timeout, then the backoff */
  redisReader *reader;
  waiter_t *waiting;       /* a ring of what the commands sent wait for */
  size_t head, nwaiting, cap;
  size_t unwritten;        /* bytes handed to uv_write, not written yet */
  unsigned backoff_ms;
  unsigned generation;     /* renewed at each loss: callbacks check it */
  int state, push, closing, handles;
  int write_failed;        /* a write's error (libuv's), until the read side ends the socket */
  int ping_waiting;        /* push mode: a PING of ours not answered yet */
  uint64_t ping_sent_ms, last_read_ms;
  char read_buf[65536];
};

/* ---- URLs ---- */

static char *dup_n(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (d) {
    memcpy(d, s, n);
    d[n] = '\0';
  }
  return d;
}

/* %XX escapes in the user and password. */
static char *unescape(const char *s, size_t n) {
  char *d = malloc(n + 1), *o = d;
  if (!d) return NULL;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '%' && i + 2 < n && isxdigit((unsigned char)s[i + 1]) &&
        isxdigit((unsigned char)s[i + 2])) {
      char hex[3] = {s[i + 1], s[i + 2], 0};
      *o++ = (char)strtol(hex, NULL, 16);
      i += 2;
    } else {
      *o++ = s[i];
    }
  }
  *o = '\0';
  return d;
}

void redis_url_free(redis_url_t *u) {
  free(u->host);
  free(u->user);
  free(u->password);
  memset(u, 0, sizeof *u);
}

int redis_url_parse(const char *url, redis_url_t *out, const char **err) {
  memset(out, 0, sizeof *out);
  out->port = 6379;
  const char *p;
  if (strncmp(url, "redis://", 8) == 0) p = url + 8;
  else if (strncmp(url, "rediss://", 9) == 0) p = url + 9, out->tls = 1;
  else return *err = "the URL must start with redis:// or rediss://", -1;
  const char *end = p + strcspn(p, "/?#");
  const char *at = NULL;
  for (const char *q = p; q < end; q++)
    if (*q == '@') at = q;
  if (at) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (colon) {
      if (colon > p) out->user = unescape(p, (size_t)(colon - p));
      out->password = unescape(colon + 1, (size_t)(at - colon - 1));
    } else {
      out->password = unescape(p, (size_t)(at - p)); /* redis://secret@host */
    }
    p = at + 1;
  }
  const char *host_end = end;
  if (*p == '[') { /* [::1]:6379 */
    const char *close = memchr(p, ']', (size_t)(end - p));
    if (!close) goto bad;
    out->host = dup_n(p + 1, (size_t)(close - p - 1));
    host_end = close + 1;
  } else {
    const char *colon = memchr(p, ':', (size_t)(end - p));
    if (colon) host_end = colon;
    out->host = dup_n(p, (size_t)(host_end - p));
  }
  if (!out->host || !*out->host) goto bad;
  if (host_end < end) {
    if (*host_end != ':' || host_end + 1 == end) goto bad;
    char *e;
    long port = strtol(host_end + 1, &e, 10);
    if (e != end || port < 1 || port > 65535) goto bad;
    out->port = (int)port;
  }
  if (*end == '/' && end[1]) {
    char *e;
    long db = strtol(end + 1, &e, 10);
    if ((*e && *e != '?') || db < 0 || db > 1000000 || e == end + 1) goto bad;
    out->db = (int)db;
  }
  return 0;
bad:
  redis_url_free(out);
  *err = "the URL must be redis://[[user]:password@]host[:port][/db]";
  return -1;
}

/* ---- the connection ---- */

static void connect_now(redis_conn_t *r);
static void on_timer(uv_timer_t *t);

static void release(redis_conn_t *r) {
  if (r->handles) return;
  free(r->waiting);
  if (r->ssl_ctx) SSL_CTX_free(r->ssl_ctx);
  redis_url_free(&r->url);
  free(r);
}

static void on_handle_closed(uv_handle_t *h) {
  redis_conn_t *r = h->data;
  free(h);
  if (r) {
    r->handles--;
    if (r->closing) release(r);
  }
}

static waiter_t pop_waiter(redis_conn_t *r) {
  waiter_t w = r->waiting[r->head];
  r->head = (r->head + 1) % r->cap;
  r->nwaiting--;
  return w;
}

/* Drops the socket and what belongs to it. */
static void drop_socket(redis_conn_t *r) {
  if (r->tcp) {
    uv_close((uv_handle_t *)r->tcp, on_handle_closed);
    r->tcp = NULL;
  }
  if (r->ssl) SSL_free(r->ssl); /* frees both BIOs */
  r->ssl = NULL;
  r->rbio = r->wbio = NULL;
  if (r->reader) redisReaderFree(r->reader);
  r->reader = NULL;
  r->unwritten = 0;
  r->write_failed = 0;
}

/* The connection is gone: every waiting command learns it, the owner
 * learns it, and a reconnect is scheduled. */
static void lose(redis_conn_t *r, const char *why) {
  int was_up = r->state != DOWN;
  drop_socket(r);
  r->state = DOWN;
  r->push = 0;
  r->generation++;
  unsigned gen = r->generation;
  while (r->nwaiting && !r->closing && gen == r->generation) {
    waiter_t w = pop_waiter(r);
    if (w.fn) w.fn(w.ud, NULL, why);
  }
  if (r->closing) return;
  r->nwaiting = 0;
  if (was_up && r->ev.on_lost) r->ev.on_lost(r, why, r->ev.ud);
  if (r->closing || r->state != DOWN) return; /* closed, or reconnected, by on_lost */
  uv_timer_start(r->timer, on_timer, r->backoff_ms, 0);
  r->backoff_ms = r->backoff_ms * 2 > REDIS_BACKOFF_MAX_MS ? REDIS_BACKOFF_MAX_MS : r->backoff_ms * 2;
}

static int send_command(redis_conn_t *r, int argc, const char **argv, const size_t *lens,
                        redis_reply_fn fn, void *ud);

/* Every REDIS_CHECK_MS while ready: a Redis that stopped answering (hung,
 * or cut off without a reset: a network partition) is lost once what we
 * sent waited REDIS_REPLY_TIMEOUT_MS, like one that closed the connection;
 * a quiet connection is asked a PING, so that a pub/sub connection that
 * hears nothing is known to be alive, not assumed to be. */
static void check_alive(redis_conn_t *r) {
  uint64_t now = uv_now(r->loop);
  int waiting = r->nwaiting > 0 || r->ping_waiting;
  uint64_t since = r->nwaiting ? r->waiting[r->head].sent_ms : r->ping_sent_ms;
  if (waiting && now - since >= REDIS_REPLY_TIMEOUT_MS) {
    char why[64];
    snprintf(why, sizeof why, "no answer from Redis in %u s", REDIS_REPLY_TIMEOUT_MS / 1000);
    return lose(r, why);
  }
  if (waiting || now - r->last_read_ms < REDIS_PING_IDLE_MS) return;
  const char *ping[] = {"PING"};
  if (send_command(r, 1, ping, NULL, NULL, NULL) == 0 && r->push) {
    r->ping_waiting = 1; /* its answer comes in push mode: see take_replies */
    r->ping_sent_ms = now;
  }
}

static void on_timer(uv_timer_t *t) {
  redis_conn_t *r = t->data;
  if (r->write_failed) lose(r, uv_strerror(r->write_failed));
  else if (r->state == DOWN) connect_now(r);
  else if (r->state != READY) lose(r, "connect timed out");
  else check_alive(r);
}

typedef struct write_req {
  uv_write_t req;
  redis_conn_t *r;
  unsigned generation;
  size_t len;
  char data[];
} write_req_t;

static void on_written(uv_write_t *req, int status) {
  write_req_t *w = (write_req_t *)req;
  redis_conn_t *r = w->r;
  if (r && w->generation == r->generation && !r->closing) {
    r->unwritten -= w->len;
    if (status < 0 && !r->write_failed) {
      /* The peer has gone. What it said before it went (an error reply,
       * "max number of clients reached", a TLS alert) may wait to be read,
       * and says more than "connection reset": the read side, which now
       * sees it and the end, loses the connection; this timer only if it
       * does not. Commands meanwhile wait for that loss's answer. */
      r->write_failed = status;
      uv_timer_start(r->timer, on_timer, WRITE_FAILED_GRACE_MS, 0);
    }
  }
  free(w);
}

static int write_raw(redis_conn_t *r, const char *data, size_t len) {
  if (r->write_failed) return 0; /* the socket is dead: see on_written */
  write_req_t *w = malloc(sizeof *w + len);
  if (!w) return -1;
  w->r = r;
  w->generation = r->generation;
  w->len = len;
  memcpy(w->data, data, len);
  uv_buf_t buf = uv_buf_init(w->data, (unsigned)len);
  int rc = uv_write(&w->req, (uv_stream_t *)r->tcp, &buf, 1, on_written);
  if (rc < 0) {
    free(w);
    return -1;
  }
  r->unwritten += len;
  return 0;
}

/* Whatever TLS produced goes to the socket. */
static int flush_tls(redis_conn_t *r) {
  char buf[16384];
  int n;
  while ((n = BIO_read(r->wbio, buf, sizeof buf)) > 0)
    if (write_raw(r, buf, (size_t)n) != 0) return -1;
  return 0;
}

static int write_bytes(redis_conn_t *r, const char *data, size_t len) {
  if (!r->ssl) return write_raw(r, data, len);
  if (SSL_write(r->ssl, data, (int)len) <= 0) return -1; /* memory BIO: never partial */
  return flush_tls(r);
}

static int push_waiter(redis_conn_t *r, redis_reply_fn fn, void *ud) {
  if (r->nwaiting == r->cap) {
    size_t cap = r->cap ? r->cap * 2 : 16;
    waiter_t *w = malloc(cap * sizeof *w);
    if (!w) return -1;
    for (size_t i = 0; i < r->nwaiting; i++) w[i] = r->waiting[(r->head + i) % r->cap];
    free(r->waiting);
    r->waiting = w;
    r->head = 0;
    r->cap = cap;
  }
  r->waiting[(r->head + r->nwaiting) % r->cap] = (waiter_t){fn, ud, uv_now(r->loop)};
  r->nwaiting++;
  return 0;
}

static int send_command(redis_conn_t *r, int argc, const char **argv, const size_t *lens,
                        redis_reply_fn fn, void *ud) {
  char *cmd;
  int len = redisFormatCommandArgv(&cmd, argc, argv, lens);
  if (len < 0) return -1;
  int waits = !r->push; /* in push mode replies go to on_push */
  int rc = waits ? push_waiter(r, fn, ud) : 0;
  if (rc == 0 && write_bytes(r, cmd, (size_t)len) != 0) {
    if (waits) r->nwaiting--; /* the waiter just pushed */
    rc = -1;
  }
  redisFreeCommand(cmd);
  return rc;
}

int redis_command(redis_conn_t *r, int argc, const char **argv, const size_t *lens,
                  redis_reply_fn fn, void *ud) {
  if (r->state != READY || r->closing || r->unwritten > MAX_UNWRITTEN) return -1;
  return send_command(r, argc, argv, lens, fn, ud);
}

static void become_ready(redis_conn_t *r) {
  r->state = READY;
  r->backoff_ms = REDIS_BACKOFF_MIN_MS;
  r->ping_waiting = 0;
  r->last_read_ms = uv_now(r->loop);
  uv_timer_start(r->timer, on_timer, REDIS_CHECK_MS, REDIS_CHECK_MS);
  if (r->ev.on_ready) r->ev.on_ready(r, r->ev.ud);
}

/* AUTH, SELECT and PING answered: the last one makes the connection ready. */
static void on_handshake_reply(void *ud, redisReply *reply, const char *err) {
  redis_conn_t *r = ud;
  if (err) {
    if (reply) { /* an error reply: the connection itself is fine, the settings are not */
      char why[256];
      snprintf(why, sizeof why, "%s", err);
      lose(r, why);
    }
    return;
  }
  if (r->nwaiting == 0) become_ready(r);
}

/* The transport is up: authenticate, pick the database, and have Redis
 * answer a PING before the connection counts as ready (and the backoff
 * starts again from its minimum): a server that accepts and then refuses
 * (maxclients: an error and a close), something else on the port, or a
 * Redis that does not answer (the connect timeout) is a failed attempt,
 * not a connection that comes and goes at once. */
static void start_session(redis_conn_t *r) {
  r->state = HANDSHAKE;
  char db[16];
  snprintf(db, sizeof db, "%d", r->url.db);
  const char *auth[] = {"AUTH", r->url.user, r->url.password};
  const char *select[] = {"SELECT", db};
  const char *ping[] = {"PING"};
  int rc = 0;
  if (r->url.password && r->url.user)
    rc |= send_command(r, 3, auth, NULL, on_handshake_reply, r);
  else if (r->url.password) {
    auth[1] = r->url.password;
    rc |= send_command(r, 2, auth, NULL, on_handshake_reply, r);
  }
  if (r->url.db) rc |= send_command(r, 2, select, NULL, on_handshake_reply, r);
  rc |= send_command(r, 1, ping, NULL, on_handshake_reply, r);
  if (rc) lose(r, "out of memory");
}

static void tls_failed(redis_conn_t *r) {
  char why[300];
  long verify = SSL_get_verify_result(r->ssl);
  unsigned long e = ERR_get_error();
  if (verify != X509_V_OK)
    snprintf(why, sizeof why, "TLS: certificate: %s", X509_verify_cert_error_string(verify));
  else if (e) {
    char reason[256];
    ERR_error_string_n(e, reason, sizeof reason);
    snprintf(why, sizeof why, "TLS: %s", reason);
  } else
    snprintf(why, sizeof why, "TLS handshake failed");
  ERR_clear_error();
  lose(r, why);
}

static void tls_handshake(redis_conn_t *r) {
  int rc = SSL_do_handshake(r->ssl);
  if (flush_tls(r) != 0) return lose(r, "out of memory");
  if (rc == 1) return start_session(r);
  if (SSL_get_error(r->ssl, rc) != SSL_ERROR_WANT_READ) tls_failed(r);
}

/* PING's answer: "+PONG", or ["pong", ""] once subscribed. */
static int is_pong(const redisReply *rep) {
  if (rep->type == REDIS_REPLY_STATUS) return strcmp(rep->str, "PONG") == 0;
  return rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1 &&
         rep->element[0]->type == REDIS_REPLY_STRING && strcmp(rep->element[0]->str, "pong") == 0;
}

/* Hands each complete reply to whoever waits for it. */
static void take_replies(redis_conn_t *r) {
  unsigned gen = r->generation;
  while (gen == r->generation && !r->closing) {
    void *reply = NULL;
    if (redisReaderGetReply(r->reader, &reply) != REDIS_OK) return lose(r, "protocol error from Redis");
    if (!reply) return;
    redisReply *rep = reply;
    if (r->push && r->state == READY) {
      if (is_pong(rep)) r->ping_waiting = 0; /* ours (check_alive) */
      else if (r->ev.on_push) r->ev.on_push(r, rep, r->ev.ud);
    } else if (r->nwaiting) {
      waiter_t w = pop_waiter(r);
      if (w.fn) w.fn(w.ud, rep, rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
    } else {
      freeReplyObject(rep);
      return lose(r, "a reply nobody asked for");
    }
    freeReplyObject(rep);
  }
}

static int feed(redis_conn_t *r, const char *data, size_t len) {
  if (redisReaderFeed(r->reader, data, len) != REDIS_OK) return -1;
  /* hiredis keeps what it has not parsed yet: bound it */
  return r->reader->len - r->reader->pos > REDIS_MAX_PENDING_INPUT ? -1 : 0;
}

static void on_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  (void)size;
  redis_conn_t *r = h->data;
  *buf = uv_buf_init(r->read_buf, sizeof r->read_buf);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  redis_conn_t *r = s->data;
  if (n == 0) return;
  if (n < 0) return lose(r, n == UV_EOF ? "Redis closed the connection" : uv_strerror((int)n));
  r->last_read_ms = uv_now(r->loop);
  if (!r->ssl) {
    if (feed(r, buf->base, (size_t)n) != 0) return lose(r, "reply too large");
    return take_replies(r);
  }
  BIO_write(r->rbio, buf->base, (int)n);
  if (r->state == CONNECTING) {
    tls_handshake(r);
    if (r->state == CONNECTING || r->state == DOWN) return;
  }
  char plain[16384];
  int got = 0;
  unsigned gen = r->generation;
  while (gen == r->generation && r->ssl && (got = SSL_read(r->ssl, plain, sizeof plain)) > 0) {
    if (feed(r, plain, (size_t)got) != 0) return lose(r, "reply too large");
    take_replies(r);
  }
  if (gen != r->generation || !r->ssl) return;
  int e = SSL_get_error(r->ssl, got);
  if (e == SSL_ERROR_ZERO_RETURN) return lose(r, "Redis closed the connection");
  if (e != SSL_ERROR_WANT_READ) return tls_failed(r);
  if (flush_tls(r) != 0) lose(r, "out of memory");
}

static int start_tls(redis_conn_t *r) {
  r->ssl = SSL_new(r->ssl_ctx);
  if (!r->ssl) return -1;
  r->rbio = BIO_new(BIO_s_mem());
  r->wbio = BIO_new(BIO_s_mem());
  if (!r->rbio || !r->wbio) {
    BIO_free(r->rbio);
    BIO_free(r->wbio);
    r->rbio = r->wbio = NULL;
    return -1;
  }
  SSL_set_bio(r->ssl, r->rbio, r->wbio);
  SSL_set_connect_state(r->ssl);
  /* no SNI for an address (RFC 6066, 3); SSL_set1_host checks either */
  struct in6_addr ip;
  if (inet_pton(AF_INET, r->url.host, &ip) != 1 && inet_pton(AF_INET6, r->url.host, &ip) != 1)
    SSL_set_tlsext_host_name(r->ssl, r->url.host);
  if (SSL_CTX_get_verify_mode(r->ssl_ctx) & SSL_VERIFY_PEER) SSL_set1_host(r->ssl, r->url.host);
  return 0;
}

/* One connect attempt: a timeout or a close may have moved on since. */
typedef struct attempt {
  union {
    uv_getaddrinfo_t resolve;
    uv_connect_t connect;
  } req;
  redis_conn_t *r;
  unsigned generation;
} attempt_t;

static int stale(const attempt_t *a) {
  return a->r->closing || a->generation != a->r->generation;
}

static void on_connected(uv_connect_t *req, int status) {
  attempt_t *a = (attempt_t *)req;
  redis_conn_t *r = a->r;
  int old = stale(a);
  free(a);
  if (old) return;
  if (status < 0) return lose(r, uv_strerror(status));
  uv_tcp_nodelay(r->tcp, 1);
  uv_read_start((uv_stream_t *)r->tcp, on_alloc, on_read);
  if (!r->ssl_ctx) return start_session(r);
  if (start_tls(r) != 0) return lose(r, "out of memory");
  tls_handshake(r);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  attempt_t *a = (attempt_t *)req;
  redis_conn_t *r = a->r;
  r->handles--; /* the request counted as one: r lives until it ends */
  if (stale(a)) {
    free(a);
    uv_freeaddrinfo(res);
    if (r->closing) release(r);
    return;
  }
  if (status < 0) {
    free(a);
    return lose(r, uv_strerror(status));
  }
  r->tcp = malloc(sizeof *r->tcp);
  if (!r->tcp || !(r->reader = redisReaderCreate())) {
    free(a);
    uv_freeaddrinfo(res);
    free(r->tcp);
    r->tcp = NULL;
    return lose(r, "out of memory");
  }
  uv_tcp_init(r->loop, r->tcp);
  r->tcp->data = r;
  r->handles++;
  r->state = CONNECTING;
  int rc = uv_tcp_connect(&a->req.connect, r->tcp, res->ai_addr, on_connected);
  uv_freeaddrinfo(res);
  if (rc < 0) {
    free(a);
    lose(r, uv_strerror(rc));
  }
}

static void connect_now(redis_conn_t *r) {
  attempt_t *a = malloc(sizeof *a);
  if (!a) return lose(r, "out of memory");
  a->r = r;
  a->generation = r->generation;
  char port[8];
  snprintf(port, sizeof port, "%d", r->url.port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
  r->state = RESOLVING;
  r->handles++;
  uv_timer_start(r->timer, on_timer, REDIS_CONNECT_TIMEOUT_MS, 0);
  int rc = uv_getaddrinfo(r->loop, &a->req.resolve, on_resolved, r->url.host, port, &hints);
  if (rc < 0) {
    r->handles--;
    free(a);
    lose(r, uv_strerror(rc));
  }
}

/* "broker: tls.<what> FILE: OpenSSL's reason" in err ("broker: TLS: ..."
 * without what). */
static void tls_file_failed(char *err, size_t errlen, const char *what, const char *file) {
  char reason[256] = "unknown error";
  unsigned long e = ERR_get_error();
  if (e) ERR_error_string_n(e, reason, sizeof reason);
  ERR_clear_error();
  if (what) snprintf(err, errlen, "broker: tls.%s %s: %s", what, file, reason);
  else snprintf(err, errlen, "broker: TLS: %s", reason);
}

static SSL_CTX *client_tls(const redis_tls_options_t *o, char *err, size_t errlen) {
  if (o && o->key_file && !o->cert_file) {
    snprintf(err, errlen, "broker: tls.key %s without tls.cert", o->key_file);
    return NULL;
  }
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) {
    tls_file_failed(err, errlen, NULL, NULL);
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  if (o && o->verify) {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (o->ca_file ? !SSL_CTX_load_verify_locations(ctx, o->ca_file, NULL)
                   : !SSL_CTX_set_default_verify_paths(ctx)) {
      tls_file_failed(err, errlen, "ca", o->ca_file ? o->ca_file : "(the system's trust store)");
      goto fail;
    }
  }
  if (o && o->cert_file) {
    /* the key may be in the certificate's file */
    const char *key = o->key_file ? o->key_file : o->cert_file;
    if (SSL_CTX_use_certificate_chain_file(ctx, o->cert_file) != 1) {
      tls_file_failed(err, errlen, "cert", o->cert_file);
      goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
      tls_file_failed(err, errlen, "key", key);
      goto fail;
    }
  }
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

redis_conn_t *redis_open(uv_loop_t *loop, const redis_url_t *url, const redis_tls_options_t *tls,
                         const redis_events_t *ev, char *err, size_t errlen) {
  /* Our writes too meet peers that reset (Redis killed, CLIENT KILL), and an
   * app with a broker writes before it listens, or never does. */
  server_ignore_sigpipe();
  redis_conn_t *r = calloc(1, sizeof *r);
  if (!r) return snprintf(err, errlen, "out of memory"), NULL;
  r->loop = loop;
  r->ev = *ev;
  r->backoff_ms = REDIS_BACKOFF_MIN_MS;
  r->url = (redis_url_t){dup_n(url->host, strlen(url->host)), url->port,
                         url->user ? strdup(url->user) : NULL,
                         url->password ? strdup(url->password) : NULL, url->db, url->tls};
  r->timer = malloc(sizeof *r->timer);
  if (!r->url.host || !r->timer || (url->user && !r->url.user) || (url->password && !r->url.password)) {
    free(r->timer);
    redis_url_free(&r->url);
    free(r);
    return snprintf(err, errlen, "out of memory"), NULL;
  }
  if (url->tls && !(r->ssl_ctx = client_tls(tls, err, errlen))) {
    free(r->timer);
    redis_url_free(&r->url);
    free(r);
    return NULL;
  }
  uv_timer_init(loop, r->timer);
  r->timer->data = r;
  r->handles = 1;
  connect_now(r);
  return r;
}

void redis_close(redis_conn_t *r) {
  if (!r || r->closing) return;
  r->closing = 1;
  r->generation++;
  while (r->nwaiting) {
    waiter_t w = pop_waiter(r);
    if (w.fn) w.fn(w.ud, NULL, "broker closed");
  }
  drop_socket(r);
  uv_close((uv_handle_t *)r->timer, on_handle_closed);
  r->timer = NULL;
  /* a getaddrinfo under way ends in on_resolved, which finishes the release */
}

void redis_after_fork(redis_conn_t *r) {
  if (r->closing) return;
  if (r->ssl) SSL_free(r->ssl); /* without a close_notify: the session is the parent's */
  r->ssl = NULL;
  /* Closing our copy of the parent's socket sends nothing on it. */
  r->state = CONNECTING;
  r->backoff_ms = 0; /* reconnect at once */
  lose(r, "forked: reconnecting");
  r->backoff_ms = REDIS_BACKOFF_MIN_MS;
}

int redis_ready(const redis_conn_t *r) {
  return r->state == READY && !r->closing;
}

void redis_push_mode(redis_conn_t *r, int on) {
  r->push = on;
}

size_t redis_waiting(const redis_conn_t *r) {
  return r->nwaiting;
}
