#include "harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

fz_t fz;

/* ---- what lua_core.c defines for the rest of csrc/ ---- */

const char *runtime_date(runtime_t *rt) {
  (void)rt;
  return "Thu, 01 Jan 1970 00:00:00 GMT"; /* fixed: inputs replay the same */
}

void runtime_check_drained(runtime_t *rt) {
  (void)rt; /* no run() to stop here */
}

void runtime_log(runtime_t *rt, const char *fmt, ...) {
  (void)rt, (void)fmt; /* nothing the fuzzer reaches logs; stay quiet if it does */
}

int fz_known(const char *name) {
  static const char *known;
  static int read;
  if (!read) {
    known = getenv("FUZZ_KNOWN");
    read = 1;
  }
  if (!known) return 0;
  size_t len = strlen(name);
  for (const char *s = strstr(known, name); s; s = strstr(s + 1, name))
    if ((s == known || s[-1] == ',') && (s[len] == '\0' || s[len] == ',')) return 1;
  return 0;
}

/* ---- input helpers ---- */

uint8_t fz_byte(fz_in_t *in) {
  if (!in->len) return 0;
  in->len--;
  return *in->p++;
}

size_t fz_take(fz_in_t *in, size_t n, const uint8_t **out) {
  if (n > in->len) n = in->len;
  *out = in->p;
  in->p += n;
  in->len -= n;
  return n;
}

void fz_rng_seed(fz_rng_t *r, uint64_t seed) {
  r->s = seed * 0x9E3779B97F4A7C15ull + 0x1234567ull;
}

uint32_t fz_rand(fz_rng_t *r) { /* splitmix64 */
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (uint32_t)((z ^ (z >> 31)) >> 16);
}

void fz_chunker_init(fz_chunker_t *ch, int style, uint8_t seed) {
  fz_rng_seed(&ch->rng, seed);
  ch->style = style & 3;
}

size_t fz_chunk_len(fz_chunker_t *ch, size_t left) {
  size_t n;
  switch (ch->style) {
    case 0: n = left; break;
    case 1: n = 1 + fz_rand(&ch->rng) % 3; break;
    case 2: n = 1 + fz_rand(&ch->rng) % 16; break;
    default: n = fz_rand(&ch->rng) % 8 == 0 ? 1 : 1 + fz_rand(&ch->rng) % 512; break;
  }
  return n < left ? n : left;
}

/* ---- topics ---- */

const hub_topic_config_t *fz_topic_config(const char *name, size_t len) {
  static const hub_topic_config_t a = {2, 0, 1}, b = {8, 0, 0}, other = {4, 0, 0};
  if (len == 1 && name[0] == 'a') return &a;
  if (len == 1 && name[0] == 'b') return &b;
  return &other;
}

static uint64_t publish(const char *topic, const char *event, const char *data, size_t len) {
  unsigned reached;
  size_t tlen = strlen(topic);
  return hub_publish(fz.hub, topic, tlen, fz_topic_config(topic, tlen), event, data, len, &reached);
}

/* ---- the handler ---- */

static const char *header(const http_request_t *req, const char *name) {
  const char *s = req->headers;
  for (unsigned i = 0; i < req->nheaders; i++) {
    const char *value = s + strlen(s) + 1;
    if (strcmp(s, name) == 0) return value;
    s = value + strlen(value) + 1;
  }
  return NULL;
}

static int is_tchar(unsigned char ch) {
  return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

/* What http.c promises a handler (and lua_server.c's push_request relies on). */
static void check_request(const http_request_t *req) {
  FZ_CHECK(req->method && req->url && req->headers && req->body, "request field missing");
  FZ_CHECK(strlen(req->url) == req->url_len, "URL holds a NUL (url_len %zu)", req->url_len);
  FZ_CHECK(req->body[req->body_len] == '\0', "body not NUL-terminated");
  const char *s = req->headers;
  for (unsigned i = 0; i < req->nheaders; i++) {
    size_t nlen = strlen(s);
    FZ_CHECK(nlen > 0, "empty header name");
    for (size_t k = 0; k < nlen; k++) {
      FZ_CHECK(!(s[k] >= 'A' && s[k] <= 'Z'), "header name %u not lowercased: \"%s\"", i, s);
      /* RFC 9112 5.1: a field name is a token. http.c refuses a trailing
       * space, but llhttp 8 also lets one inside a name through ("A b: c"). */
      if (s[k] == ' ')
        FZ_CHECK_KNOWN("header-name-space", 0,
                       "header name %u with a space reached the handler: \"%s\"", i, s);
      else
        FZ_CHECK(is_tchar((unsigned char)s[k]), "header name %u not a token: \"%s\"", i, s);
    }
    const char *value = s + nlen + 1;
    FZ_CHECK(!strpbrk(value, "\r\n"), "header value with CR or LF");
    s = value + strlen(value) + 1;
  }
}

static char *dup_or_null(const char *s) {
  char *d = s ? strdup(s) : NULL;
  FZ_CHECK(!s || d, "oom");
  return d;
}

static void respond(conn_t *c, int status, const http_header_t *h, size_t nh, const char *body,
                    size_t len) {
  const char *err = NULL;
  int rc = http_respond(c, status, h, nh, body, len, &err);
  FZ_CHECK(rc == 0, "http_respond(%d) failed: %s", status, err ? err : "?");
}

static int has(const http_request_t *req, const char *word) {
  return strstr(req->url, word) != NULL;
}

static void mark_takeover(conn_t *c, int kind) {
  /* What the conn wrote, and what waits: the takeover's head comes next. */
  fz.takeover_at = (size_t)(c->server->stats.bytes_out + c->queued_bytes);
  fz.takeover = kind;
}

static void subscribe(conn_t *c, const char *topic) {
  size_t len = strlen(topic);
  const char *err = hub_subscribe(fz.hub, c, topic, len, fz_topic_config(topic, len));
  FZ_CHECK(!err, "subscribe %s: %s", topic, err);
}

static void do_ws(conn_t *c, const http_request_t *req) {
  const char *key = header(req, "sec-websocket-key");
  if (!key) key = "dGhlIHNhbXBsZSBub25jZQ==";
  char accept[29];
  FZ_CHECK(ws_accept_key(NULL, key, strlen(key), accept) == 0, "ws_accept_key");
  FZ_CHECK(strlen(accept) == 28, "accept key length");
  http_header_t h[] = {{"Upgrade", "websocket", 7, 9},
                       {"Connection", "Upgrade", 10, 7},
                       {"Sec-WebSocket-Accept", accept, 20, 28}};
  ws_options_t o = fz.ws.opt;
  if (has(req, "env")) o.envelope = 1;
  if (has(req, "rate")) o.max_rate = 3;
  if (has(req, "drop")) o.rate_drop = 1;
  if (fz.ws.subscribe || has(req, "sub")) {
    subscribe(c, "a");
    subscribe(c, "b");
  }
  const char *err = NULL;
  if (fz.ws.open_sends || has(req, "pub")) { /* what an open callback may do: held until the start */
    publish("a", NULL, "while opening", 13);
    FZ_CHECK(ws_send(c, "hello", 5, WS_TEXT, &err) == 0, "ws_send while opening: %s", err);
  }
  /* A copy, as Lua's string is: the takeover frees the request's buffers
   * before hub_member_start reads the id. */
  char *last_id = dup_or_null(fz.ws.last_id ? fz.ws.last_id : header(req, "last-event-id"));
  mark_takeover(c, 'w');
  fz.envelope = o.envelope;
  fz.max_message = o.max_message;
  if (ws_start(c, h, 3, &o, last_id, &err) != 0) {
    FZ_CHECK(c->closing, "ws_start failed on an open conn: %s", err);
    fz.takeover = 0;
  }
  free(last_id);
}

static void do_sse(conn_t *c, const http_request_t *req) {
  if (!has(req, "nosub")) {
    subscribe(c, "a");
    subscribe(c, "b");
  }
  if (has(req, "pub")) {
    publish("a", "opening", "while\nopening", 13);
    FZ_CHECK(sse_send(c, "direct", 6, NULL, NULL, -1) == 0, "sse_send while opening");
    FZ_CHECK(sse_send(c, "two\nlines", 9, "note", NULL, 500) == 0, "sse_send while opening");
    FZ_CHECK(sse_comment(c, "hi", 2) == 0, "sse_comment while opening");
  }
  static const http_header_t extra[] = {{"Access-Control-Allow-Origin", "*", 27, 1}};
  const char *err = NULL;
  char *last_id = dup_or_null(header(req, "last-event-id")); /* see do_ws */
  int retry = has(req, "retry") ? 1000 : -1;
  mark_takeover(c, 's');
  int rc = sse_start(c, extra, 1, 1000, retry, last_id, &err);
  free(last_id);
  if (rc != 0) {
    FZ_CHECK(c->closing, "sse_start failed on an open conn: %s", err);
    fz.takeover = 0;
    return;
  }
  /* A second takeover must be refused. */
  err = NULL;
  FZ_CHECK(sse_start(c, NULL, 0, 0, -1, NULL, &err) != 0, "second sse_start accepted");
}

static void do_pub(conn_t *c, const http_request_t *req) {
  const char *topic = header(req, "x-topic"), *event = header(req, "x-event");
  if (!topic) topic = "a";
  size_t tlen = strlen(topic);
  if (tlen == 0 || tlen > HUB_MAX_TOPIC ||
      (event && (strlen(event) > HUB_MAX_EVENT || sse_check_field(event, strlen(event))))) {
    respond(c, 400, NULL, 0, "bad topic or event\n", 19);
    return;
  }
  unsigned reached;
  uint64_t seq = hub_publish(fz.hub, topic, tlen, fz_topic_config(topic, tlen), event, req->body,
                             req->body_len, &reached);
  FZ_CHECK(seq == fz.hub->seq, "publish returned %llu, hub at %llu", (unsigned long long)seq,
           (unsigned long long)fz.hub->seq);
  char id[HUB_ID_SIZE];
  hub_format_id(fz.hub, seq, id);
  respond(c, 200, NULL, 0, id, strlen(id));
}

void fz_handler(conn_t *c, const http_request_t *req, void *ud) {
  (void)ud;
  fz.handler_calls++;
  check_request(req);
  FZ_CHECK(http_awaiting_response(c), "handler called with no request waiting");
  int is_head = strcmp(req->method, "HEAD") == 0;
  if (fz.nrequests < sizeof fz.heads) fz.heads[fz.nrequests] = (uint8_t)is_head;
  fz.nrequests++;
  const char *url = req->url, *err = NULL;
  if (strncmp(url, "/ws", 3) == 0 && !is_head) {
    do_ws(c, req);
  } else if (strncmp(url, "/sse", 4) == 0 && !is_head) {
    do_sse(c, req);
  } else if (strncmp(url, "/pub", 4) == 0) {
    do_pub(c, req);
  } else if (strncmp(url, "/big", 4) == 0) {
    static char big[65536];
    if (!big[0]) memset(big, 'x', sizeof big);
    respond(c, 200, NULL, 0, big, sizeof big);
  } else if (strncmp(url, "/close", 6) == 0) {
    http_header_t h[] = {{"Connection", "close", 10, 5}};
    respond(c, 200, h, 1, "bye\n", 4);
  } else if (strncmp(url, "/none", 5) == 0) {
    /* not answered: http.c answers 500 */
  } else if (strncmp(url, "/twice", 6) == 0) {
    respond(c, 200, NULL, 0, "once\n", 5);
    FZ_CHECK(http_respond(c, 200, NULL, 0, "twice\n", 6, &err) != 0, "answered twice");
  } else if (strncmp(url, "/status/", 8) == 0) {
    long status = strtol(url + 8, NULL, 10);
    if (status < 100 || status > 999) {
      FZ_CHECK(http_respond(c, (int)status, NULL, 0, "", 0, &err) != 0, "status %ld accepted", status);
      respond(c, 400, NULL, 0, "bad status\n", 11);
    } else {
      /* 1xx is no final answer: a handler may not give it */
      respond(c, status < 200 ? 204 : (int)status, NULL, 0, req->body, req->body_len);
    }
  } else if (strncmp(url, "/hdr", 4) == 0) {
    const char *echo = header(req, "x-echo");
    http_header_t bad[] = {{"X-Bad", "a\r\nb", 5, 4}};
    FZ_CHECK(http_respond(c, 200, bad, 1, "", 0, &err) != 0, "CRLF in a header value accepted");
    http_header_t h[] = {{"X-Echo", echo ? echo : "", 6, echo ? strlen(echo) : 0},
                         {"Connection", "keep-alive", 10, 10}};
    respond(c, 200, h, 2, req->body, req->body_len);
  } else if (strncmp(url, "/echo", 5) == 0) {
    respond(c, 200, NULL, 0, req->body, req->body_len);
  } else {
    respond(c, 404, NULL, 0, "not found\n", 10);
  }
}

/* A complete WebSocket message. */
static void on_message(conn_t *c, const char *data, size_t len, int binary, void *ud) {
  (void)ud;
  FZ_CHECK(c->ws, "message on a conn without WebSocket");
  FZ_CHECK(binary || utf8_valid(data, len), "text message that is not UTF-8 reached the app");
  FZ_CHECK(len <= fz.max_message, "message of %zu bytes over max_message %zu", len,
           fz.max_message);
  const char *err = NULL;
  if (len && data[0] == 'c') { /* the app closes */
    size_t rlen = len - 1 > 123 ? 123 : len - 1;
    int code = 1000 + (int)(len % 15);
    int rc = ws_close(c, code, data + 1, rlen, &err);
    (void)rc; /* refused for a bad code or reason: fine */
  } else if (len && data[0] == 'p') { /* the app publishes: to itself if subscribed */
    publish("a", NULL, data, len);
  } else if (len && data[0] == 'i') {
    ws_send(c, data, len > 125 ? 125 : len, WS_PING, &err);
  } else {
    /* echoed with a prefix, so the output check can tell echoes from deliveries */
    char *echo = malloc(len + 5);
    FZ_CHECK(echo, "oom");
    memcpy(echo, "echo:", 5);
    if (len) memcpy(echo + 5, data, len);
    int rc = ws_send(c, echo, len + 5, binary ? WS_BINARY : WS_TEXT, &err);
    FZ_CHECK(rc == 0 || strcmp(err, "closing") == 0 || strcmp(err, "out of memory") == 0,
             "ws_send echo: %s", err);
    free(echo);
  }
}

static int valid_close_code(int code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
         (code >= 3000 && code <= 4999);
}

/* server.c's word that a conn the app knew of is gone (as Lua hears it). */
static void on_conn_closed(conn_t *c, void *ud) {
  (void)ud;
  if (c->ws) {
    const char *reason;
    size_t len;
    int code = ws_close_status(c, &reason, &len);
    FZ_CHECK(valid_close_code(code) || code == WS_NO_STATUS || code == WS_ABNORMAL,
             "close status %d", code);
    FZ_CHECK(len <= 123 && utf8_valid(reason, len), "close reason of %zu bytes or not UTF-8", len);
  }
  conn_lua_handle(c) = NULL;
}

/* ---- the loop, the server, the client ---- */

static void on_flush(uv_prepare_t *h) {
  conn_flush_all(h->data);
}

static unsigned baseline_handles;

static void count_handle(uv_handle_t *h, void *arg) {
  if (!uv_is_closing(h)) (*(unsigned *)arg)++;
}

static unsigned live_handles(void) {
  unsigned n = 0;
  uv_walk(&fz.rt->loop, count_handle, &n);
  return n;
}

void fz_setup(tls_config_t *tls) {
  signal(SIGPIPE, SIG_IGN);
  fz.rt = calloc(1, sizeof *fz.rt);
  FZ_CHECK(fz.rt, "oom");
  FZ_CHECK(uv_loop_init(&fz.rt->loop) == 0, "uv_loop_init");
  fz.rt->on_error_ref = -2;
  /* as lua_core.c's runtime_new: the flush runs once per loop turn; the conns' timeouts */
  uv_prepare_init(&fz.rt->loop, &fz.rt->flusher);
  fz.rt->flusher.data = fz.rt;
  uv_prepare_start(&fz.rt->flusher, on_flush);
  uv_idle_init(&fz.rt->loop, &fz.rt->flush_more);
  uv_unref((uv_handle_t *)&fz.rt->flush_more);
  uv_unref((uv_handle_t *)&fz.rt->flusher);
  conn_timeouts_init(fz.rt);
  server_limits_t limits = {
      .max_header_size = 16384,
      .max_body_size = 1048576,
      .header_timeout_ms = 10000,
      .idle_timeout_ms = 60000,
      .shutdown_timeout_ms = 5000,
      .max_connections = 1000,
      .max_queued = 1048576,
      .drain_retry_ms = 1000,
      .trust_loopback = 1,
  };
  fz.srv = server_new(fz.rt, &limits, fz_handler, on_conn_closed, NULL);
  FZ_CHECK(fz.srv, "server_new");
  fz.srv->on_message = on_message;
  fz.port = server_listen(fz.srv, "127.0.0.1", 0, 128, tls);
  FZ_CHECK(fz.port > 0, "listen: %s", uv_strerror(fz.port));
  fz.plain = tls == NULL;
  fz.client = -1;
  fz.ws.opt = (ws_options_t){.max_message = 1024, .ping_ms = 1000};
  baseline_handles = live_handles();
}

conn_t *fz_conn(void) {
  return fz.srv->conns;
}

void fz_read_client(void) {
  if (fz.client < 0) return;
  for (;;) {
    if (fz.out.cap - fz.out.len < 65536) {
      size_t cap = fz.out.cap ? fz.out.cap * 2 : 131072;
      char *data = realloc(fz.out.data, cap);
      FZ_CHECK(data, "oom");
      fz.out.data = data;
      fz.out.cap = cap;
    }
    ssize_t n = read(fz.client, fz.out.data + fz.out.len, fz.out.cap - fz.out.len);
    if (n > 0) {
      fz.out.len += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return; /* EAGAIN, EOF or a reset */
  }
}

static unsigned unturned; /* feeds since the last loop turn */

void fz_turn(void) {
  unturned = 0;
  uv_run(&fz.rt->loop, UV_RUN_NOWAIT);
  if (!fz.slow_reader) fz_read_client();
}

conn_t *fz_open(void) {
  fz.hub = hub_new(&fz.rt->loop);
  FZ_CHECK(fz.hub, "hub_new");
  fz.hub->epoch = FZ_EPOCH;
  fz.hub->max_queued = fz.hub_max_queued ? fz.hub_max_queued : 1 << 20;
  /* Some history: a (2 kept, so 1 is evicted), b (8 kept), c (none kept). */
  publish("a", NULL, "a1", 2);
  publish("b", "quote", "b2\nline", 7);
  publish("a", NULL, "a3", 2);
  publish("c", NULL, "c4", 2);
  publish("b", NULL, "b5\r\n", 4);
  publish("a", "x", "a6", 2);
  fz.out.len = 0;
  fz.nrequests = 0;
  fz.handler_calls = 0;
  fz.takeover = 0;
  fz.takeover_at = SIZE_MAX;
  fz.envelope = 0;
  fz.last_seq = 0;
  fz.may_reorder = fz.slow_reader || fz.small_buffers; /* conflation reorders across topics */
  fz.srv->stats = (server_stats_t){0};
  fz.srv->draining = 0;

  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  FZ_CHECK(fd >= 0, "socket: %s", strerror(errno));
  if (fz.small_buffers) {
    int small = 4096;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  }
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)fz.port)};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  /* Non-blocking: libFuzzer's SIGALRM (its -timeout clock) would interrupt a blocking connect. */
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
    FZ_CHECK(errno == EINPROGRESS || errno == EINTR, "connect: %s", strerror(errno));
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    int r;
    while ((r = poll(&pfd, 1, 5000)) < 0 && errno == EINTR) {
    }
    int err = 0;
    socklen_t len = sizeof err;
    FZ_CHECK(r == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0,
             "connect: %s", r == 1 ? strerror(err) : "timed out");
  }
  /* Closed with a reset: no TIME_WAIT left behind by thousands of inputs a second. */
  struct linger lg = {1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  fz.client = fd;
  for (int i = 0; i < 1000 && !fz.srv->conns; i++) uv_run(&fz.rt->loop, UV_RUN_NOWAIT);
  conn_t *c = fz.srv->conns;
  FZ_CHECK(c, "the server did not accept");
  FZ_CHECK(!c->next, "more than one conn");
  conn_lua_handle(c) = &fz; /* as if Lua held it: server.c calls on_conn_closed when it goes */
  if (fz.small_buffers) {
    uv_os_fd_t sfd;
    int small = 4096;
    if (uv_fileno((uv_handle_t *)&c->tcp, &sfd) == 0)
      setsockopt(sfd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  }
  return c;
}

int fz_feed(const void *data, size_t n) {
  if (n == 0) return 0;
  conn_t *c;
  for (int i = 0;; i++) {
    c = fz_conn();
    if (!c || c->closing || c->shut) return -1;
    if (c->reading) break;
    /* Input paused (backpressure) or the conn is ending: the client reads,
     * so the server can write and go on. */
    FZ_CHECK(i < 256 || c->ending,
             "conn stopped reading and never resumed (queued %zu, writing %d, proto %s)",
             c->queued_bytes, c->writing, c->proto->name);
    if (i >= 256) return -1;
    fz_read_client();
    fz_turn();
  }
  FZ_CHECK(c->tcp.read_cb, "reading without a read callback");
  char *copy = malloc(n); /* exactly n: ASan sees a read past the chunk */
  FZ_CHECK(copy, "oom");
  memcpy(copy, data, n);
  uv_buf_t buf = uv_buf_init(copy, (unsigned)n);
  /* conn.c's own on_read, as libuv calls it after a read of n bytes */
  c->tcp.read_cb((uv_stream_t *)&c->tcp, (ssize_t)n, &buf);
  free(copy);
  /* libuv reads a socket up to 32 times per poll before the loop turns (and
   * flushes): a turn after every chunk would make tiny chunks slow to fuzz */
  if (++unturned >= 32) fz_turn();
  return 0;
}

int fz_feed_chunked(const void *data, size_t n, fz_chunker_t *ch) {
  const char *p = data;
  while (n) {
    size_t k = fz_chunk_len(ch, n);
    if (fz_feed(p, k) != 0) return -1;
    p += k;
    n -= k;
  }
  return 0;
}

void fz_fire_timer(void) {
  conn_t *c = fz_conn();
  if (!c || c->closing || !c->tq) return;
  /* conn.c's timeout, due now (the conn is alone in its list: one conn at a
   * time): it runs in the next turn like any timer */
  c->tq_due = (uint32_t)uv_now(&fz.rt->loop);
  uv_timer_start(&fz.rt->timeouts.timer, fz.rt->timeouts.timer.timer_cb, 0, 0);
  fz_turn();
}

void fz_drain(void) {
  conn_t *c = fz_conn();
  if (!c) return;
  /* server_close's part for one conn (the listener stays for the next input) */
  fz.srv->draining = 1;
  if (!c->closing && c->proto->on_drain) c->proto->on_drain(c);
  fz_turn();
}

void fz_client_eof(void) {
  if (fz.client >= 0) shutdown(fz.client, SHUT_WR);
  fz_turn();
  fz_turn();
}

void fz_settle(void) {
  for (int i = 0; i < 256; i++) {
    size_t before = fz.out.len;
    uv_run(&fz.rt->loop, UV_RUN_NOWAIT);
    fz_read_client();
    conn_t *c = fz_conn();
    if (!c) break;
    if (i >= 2 && !c->dirty && !c->writing && fz.out.len == before) break;
  }
}

/* FUZZ_DEBUG=1: what the client got, printable, on stderr. */
static void debug_dump(void) {
  static int on = -1;
  if (on < 0) on = getenv("FUZZ_DEBUG") != NULL;
  if (!on) return;
  fprintf(stderr, "---- %zu bytes to the client (takeover %c at %zu, %d handler calls):\n",
          fz.out.len, fz.takeover ? fz.takeover : '-', fz.takeover_at, fz.handler_calls);
  for (size_t i = 0; i < fz.out.len; i++) {
    unsigned char ch = (unsigned char)fz.out.data[i];
    if (ch == '\n' || (ch >= 32 && ch < 127)) fputc(ch, stderr);
    else fprintf(stderr, "\\x%02x", ch);
  }
  fputs("\n----\n", stderr);
}

void fz_close(void) {
  fz_settle();
  fz_read_client();
  debug_dump();
  fz_check_output();
  conn_t *c = fz_conn();
  if (c) conn_close(c);
  if (fz.client >= 0) close(fz.client);
  fz.client = -1;
  for (int i = 0; i < 64 && fz_conn(); i++) uv_run(&fz.rt->loop, UV_RUN_NOWAIT);
  FZ_CHECK(!fz_conn(), "a closed conn was not freed");
  hub_free(fz.hub);
  fz.hub = NULL;
  uv_run(&fz.rt->loop, UV_RUN_NOWAIT); /* the hub's timer closes, the hub goes */
  fz.srv->draining = 0;
  unsigned live = live_handles();
  FZ_CHECK(live == baseline_handles, "%u libuv handles left open (expected %u)", live,
           baseline_handles);
  if (fz.out.cap > (1u << 20)) hstr_free(&fz.out);
}

/* ---- output checks ---- */

static const uint8_t *find(const uint8_t *p, size_t n, const char *needle) {
  return memmem(p, n, needle, strlen(needle));
}

static int starts_with(const uint8_t *p, size_t n, const char *prefix) {
  size_t k = strlen(prefix);
  return n >= k && memcmp(p, prefix, k) == 0;
}

/* One response head: "HTTP/1.1 NNN reason", then "Name: value" lines. */
static int parse_head(const uint8_t *p, size_t n, long *content_length, int *close) {
  FZ_CHECK(starts_with(p, n, "HTTP/1.1 ") && n >= 12, "response does not start with HTTP/1.1: %.20s",
           (const char *)p);
  int status = 0;
  for (int i = 9; i < 12; i++) {
    FZ_CHECK(p[i] >= '0' && p[i] <= '9', "status is not 3 digits");
    status = status * 10 + (p[i] - '0');
  }
  *content_length = -1;
  *close = 0;
  const uint8_t *line = find(p, n, "\r\n") + 2, *end = p + n;
  while (line < end - 2) { /* the head ends with the blank line */
    const uint8_t *eol = find(line, (size_t)(end - line), "\r\n");
    FZ_CHECK(eol, "header line without CRLF");
    size_t len = (size_t)(eol - line);
    FZ_CHECK(!memchr(line, '\n', len) && !memchr(line, '\r', len), "bare CR or LF in a header line");
    const uint8_t *colon = memchr(line, ':', len);
    FZ_CHECK(colon && colon > line && colon + 1 < eol && colon[1] == ' ', "malformed header line: %.*s",
             (int)len, (const char *)line);
    size_t nlen = (size_t)(colon - line);
    const char *value = (const char *)colon + 2;
    size_t vlen = len - nlen - 2;
    if (nlen == 14 && strncasecmp((const char *)line, "content-length", 14) == 0) {
      FZ_CHECK(*content_length < 0, "two Content-Length headers");
      *content_length = strtol(value, NULL, 10);
    }
    if (nlen == 10 && strncasecmp((const char *)line, "connection", 10) == 0 && vlen == 5 &&
        strncasecmp(value, "close", 5) == 0)
      *close = 1;
    line = eol + 2;
  }
  return status;
}

static void check_http(const uint8_t *p, size_t n) {
  size_t pos = 0;
  unsigned req = 0;
  int closed = 0;
  while (pos < n) {
    FZ_CHECK(!closed, "bytes after a response that said Connection: close");
    const uint8_t *blank = find(p + pos, n - pos, "\r\n\r\n");
    if (!blank) return; /* cut short by a close */
    size_t head_len = (size_t)(blank + 4 - (p + pos));
    long cl;
    int close;
    int status = parse_head(p + pos, head_len, &cl, &close);
    pos += head_len;
    if (status == 100) continue; /* interim */
    FZ_CHECK(status >= 200, "final response with status %d", status);
    int is_head = req < fz.nrequests && req < sizeof fz.heads ? fz.heads[req] : 0;
    req++;
    int bodiless = status == 204 || status == 304;
    FZ_CHECK(bodiless || cl >= 0, "response %d without Content-Length", status);
    FZ_CHECK(!bodiless || cl < 0, "response %d with Content-Length", status);
    size_t body = bodiless || is_head ? 0 : (size_t)cl;
    if (n - pos < body) return;
    pos += body;
    closed = close;
  }
}

/* What a server may send: unmasked, final, no RSV, known opcodes, minimal
 * lengths, control payloads within 125, text in UTF-8, nothing after close. */
void fz_check_ws_frames(const uint8_t *p, size_t n) {
  int closed = 0;
  while (n >= 2) {
    uint8_t b0 = p[0], b1 = p[1];
    int op = b0 & 15;
    FZ_CHECK(!(b1 & 0x80), "server frame masked");
    FZ_CHECK((b0 & 0x70) == 0, "server frame with RSV bits");
    FZ_CHECK(b0 & 0x80, "server frame not final");
    FZ_CHECK(op == 1 || op == 2 || op == 8 || op == 9 || op == 10, "server frame opcode %d", op);
    uint64_t len = b1 & 0x7f;
    size_t hl = 2;
    if (len == 126) {
      if (n < 4) return;
      len = (uint64_t)p[2] << 8 | p[3];
      hl = 4;
      FZ_CHECK(len >= 126, "non-minimal 16-bit length");
    } else if (len == 127) {
      if (n < 10) return;
      len = 0;
      for (int i = 2; i < 10; i++) len = len << 8 | p[i];
      hl = 10;
      FZ_CHECK(len > 0xFFFF, "non-minimal 64-bit length");
    }
    if (n - hl < len) return; /* cut short by a close */
    FZ_CHECK(!closed, "frame (opcode %d) after a close frame", op);
    const uint8_t *payload = p + hl;
    if (op >= 8) FZ_CHECK(len <= 125, "control frame of %llu bytes", (unsigned long long)len);
    if (op == 1) FZ_CHECK(utf8_valid(payload, len), "text frame that is not UTF-8");
    if (op == 8) {
      FZ_CHECK(len != 1, "close frame of one byte");
      if (len >= 2) {
        int code = payload[0] << 8 | payload[1];
        FZ_CHECK(valid_close_code(code), "close code %d on the wire", code);
        FZ_CHECK(utf8_valid(payload + 2, len - 2), "close reason not UTF-8");
      }
      closed = 1;
    }
    if (op == 1 && fz.envelope && starts_with(payload, len, "{\"topic\":")) { /* an envelope: ids increase */
      const uint8_t *id = find(payload, len, ",\"id\":\"" FZ_EPOCH_STR "-");
      if (id) {
        unsigned long long seq = strtoull((const char *)id + 16, NULL, 10);
        FZ_CHECK(fz.may_reorder || seq > fz.last_seq, "envelope id %llu after %llu", seq,
                 (unsigned long long)fz.last_seq);
        fz.last_seq = seq;
      }
    }
    p += hl + len;
    n -= hl + len;
  }
}

/* An event stream: only id, event, data, retry lines, comments and blank
 * lines; ids strictly increasing. */
static void check_sse_body(const uint8_t *p, size_t n) {
  FZ_CHECK(!memchr(p, '\r', n), "CR in an event stream");
  const uint8_t *end = p + n;
  while (p < end) {
    const uint8_t *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol) return; /* cut short */
    size_t len = (size_t)(eol - p);
    if (len == 0 || p[0] == ':' || starts_with(p, len, "data: ") || (len == 5 && starts_with(p, len, "data:")) ||
        starts_with(p, len, "event: ") || starts_with(p, len, "retry: ")) {
    } else if (starts_with(p, len, "id: ")) {
      FZ_CHECK(starts_with(p + 4, len - 4, FZ_EPOCH_STR "-"), "id of another epoch: %.*s", (int)len,
               (const char *)p);
      unsigned long long seq = strtoull((const char *)p + 13, NULL, 10);
      FZ_CHECK(fz.may_reorder || seq > fz.last_seq, "SSE id %llu after %llu", seq,
               (unsigned long long)fz.last_seq);
      fz.last_seq = seq;
    } else {
      FZ_CHECK(0, "unexpected line in an event stream: %.*s", (int)(len > 60 ? 60 : len),
               (const char *)p);
    }
    p = eol + 1;
  }
}

void fz_check_output(void) {
  if (!fz.plain) return;
  const uint8_t *p = (const uint8_t *)fz.out.data;
  size_t n = fz.out.len;
  size_t http_end = fz.takeover && fz.takeover_at < n ? fz.takeover_at : n;
  check_http(p, http_end);
  if (!fz.takeover || fz.takeover_at >= n) return;
  p += fz.takeover_at;
  n -= fz.takeover_at;
  const uint8_t *blank = find(p, n, "\r\n\r\n");
  if (!blank) return;
  size_t head = (size_t)(blank + 4 - p);
  long cl;
  int close;
  int status = parse_head(p, head, &cl, &close);
  FZ_CHECK(cl < 0, "a stream's head with Content-Length");
  if (fz.takeover == 'w') {
    FZ_CHECK(status == 101, "WebSocket takeover answered %d", status);
    fz_check_ws_frames(p + head, n - head);
  } else {
    FZ_CHECK(status == 200, "SSE takeover answered %d", status);
    FZ_CHECK(find(p, head, "Content-Type: text/event-stream"), "SSE head without its type");
    check_sse_body(p + head, n - head);
  }
}
