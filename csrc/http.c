#include "http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "server.h"

/* Bytes of body that earn a request header_timeout more time. */
#define BODY_PROGRESS 16384

/* More headers than this is abuse, whatever their size. */
#define MAX_HEADERS 100
/* Request buffers larger than this are freed between requests so an idle
 * keep-alive conn costs little. */
#define KEEP_BUFFER_BYTES 4096

static const conn_proto_t http_proto;

#define HTTP(p) (((conn_t *)(p)->data)->http)
#define CONN(p) ((conn_t *)(p)->data)

const char *http_reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 426: return "Upgrade Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Unknown";
  }
}

/* A protocol error found inside a parser callback: remembered here and
 * answered once llhttp_execute returns. */
static int fail_in_callback(llhttp_t *p, int status) {
  HTTP(p)->fail_status = (uint16_t)status;
  return HPE_USER;
}

/* What a span of the head is: the request target, a field name or a field value. */
enum span { SPAN_URL, SPAN_NAME, SPAN_VALUE };

/* The limit counts the client's bytes (target, names, values), not the NUL
 * that ends each of them in head. How many NULs head holds while a span of
 * a given kind is being read: the target's once it is complete, one per
 * complete name and value, and the name of the value being read. A trailer
 * field (after the headers) is not counted in nheaders. */
static size_t head_nuls(const http_conn_t *h, enum span kind) {
  switch (kind) {
    case SPAN_URL: return 0;
    case SPAN_NAME: return 1 + 2 * (size_t)h->nheaders;
    case SPAN_VALUE: return 2 * (size_t)h->nheaders + (h->headers_done ? 2 : 0);
  }
  return 0;
}

/* The answer to a head over the limit: 414 while the request target is
 * being read or when the target alone fills the limit (nothing after it
 * could fit), 431 otherwise. */
static int too_large_status(const conn_t *c) {
  const http_conn_t *h = c->http;
  int in_target = h->head.len == h->url_len; /* its NUL is not there yet */
  return in_target || h->url_len >= c->server->limits.max_header_size ? 414 : 431;
}

static int append_head(llhttp_t *p, const char *at, size_t len, enum span kind) {
  conn_t *c = CONN(p);
  http_conn_t *h = c->http;
  if (h->head.len - head_nuls(h, kind) + len > c->server->limits.max_header_size)
    return fail_in_callback(p, too_large_status(c));
  size_t start = h->head.len;
  if (hstr_append(&h->head, at, len) != 0) return fail_in_callback(p, 503);
  if (kind == SPAN_NAME)
    for (size_t i = start; i < h->head.len; i++) {
      char ch = h->head.data[i];
      if (ch >= 'A' && ch <= 'Z') h->head.data[i] = (char)(ch + 32);
    }
  return 0;
}

/* Ends the span being read with a NUL (not counted against the limit). */
static int end_span(llhttp_t *p) {
  return hstr_append(&HTTP(p)->head, "", 1) != 0 ? fail_in_callback(p, 503) : 0;
}

static void reset_request(http_conn_t *h) {
  if (h->head.cap > KEEP_BUFFER_BYTES) hstr_free(&h->head);
  if (h->body.cap > KEEP_BUFFER_BYTES) hstr_free(&h->body);
  h->head.len = h->body.len = 0;
  h->url_len = 0;
  h->field_start = 0;
  h->nheaders = 0;
  h->raw_head_bytes = 0;
  h->in_message = h->headers_done = h->expect_continue = 0;
  h->fail_status = 0;
  h->body_at_timer = 0;
}

static int on_message_begin(llhttp_t *p) {
  conn_t *c = CONN(p);
  reset_request(c->http);
  c->http->in_message = 1;
  conn_set_timer(c, c->server->limits.header_timeout_ms);
  /* A pause here tells execute() where this message starts in its input, so
   * that only this head's bytes count against the limit. */
  return HPE_PAUSED;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  if (append_head(p, at, len, SPAN_URL)) return HPE_USER;
  HTTP(p)->url_len += len;
  return 0;
}

static int on_url_complete(llhttp_t *p) {
  if (end_span(p)) return HPE_USER;
  HTTP(p)->field_start = HTTP(p)->head.len;
  return 0;
}

/* Trailer fields (after a chunked body) are checked and held like header
 * fields while they are read, then dropped: they never join the headers. */
static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  return append_head(p, at, len, SPAN_NAME) ? HPE_USER : 0;
}

static int is_token_char(unsigned char ch) {
  return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

static int on_header_field_complete(llhttp_t *p) {
  http_conn_t *h = HTTP(p);
  /* A field name is a token (RFC 9112 5.1): llhttp lets "Name :", "A b:" and
   * an empty name through; they get 400. */
  size_t len = h->head.len - h->field_start;
  if (len == 0) return fail_in_callback(p, 400);
  for (size_t i = h->field_start; i < h->head.len; i++)
    if (!is_token_char((unsigned char)h->head.data[i])) return fail_in_callback(p, 400);
  if (!h->headers_done && ++h->nheaders > MAX_HEADERS) return fail_in_callback(p, 431);
  return end_span(p) ? HPE_USER : 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  return append_head(p, at, len, SPAN_VALUE) ? HPE_USER : 0;
}

static int on_header_value_complete(llhttp_t *p) {
  http_conn_t *h = HTTP(p);
  if (h->headers_done) {
    h->head.len = h->field_start; /* a trailer field: dropped */
    return 0;
  }
  if (end_span(p)) return HPE_USER;
  h->field_start = h->head.len;
  return 0;
}

/* The value of a header of the request being read, or NULL. */
static const char *find_header(const http_conn_t *h, const char *name) {
  const char *s = h->head.data + h->url_len + 1, *end = h->head.data + h->head.len;
  for (unsigned i = 0; i < h->nheaders && s < end; i++) {
    const char *value = s + strlen(s) + 1;
    if (strcmp(s, name) == 0) return value;
    s = value + strlen(value) + 1;
  }
  return NULL;
}

static int on_headers_complete(llhttp_t *p) {
  conn_t *c = CONN(p);
  http_conn_t *h = c->http;
  h->headers_done = 1;
  /* A value cut off before its field ended leaves an odd count: never here,
   * llhttp calls value_complete even for an empty value. */
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->server->limits.max_body_size)
    return fail_in_callback(p, 413);
  const char *expect = find_header(h, "expect");
  if (expect && strcasecmp(expect, "100-continue") == 0 && p->http_major == 1 && p->http_minor >= 1)
    h->expect_continue = 1;
  /* only when a body is coming: a chunked one, or a declared non-empty one */
  if (h->expect_continue &&
      ((p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length != 0))) {
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    conn_send_bytes(c, cont, sizeof cont - 1);
  }
  conn_set_timer(c, c->server->limits.header_timeout_ms);
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = CONN(p);
  http_conn_t *h = c->http;
  if (h->body.len + len > c->server->limits.max_body_size) return fail_in_callback(p, 413);
  if (hstr_append(&h->body, at, len) != 0) return fail_in_callback(p, 503);
  /* A body may take long but must move: the timer restarts only for each
   * BODY_PROGRESS bytes, so one trickled a byte at a time is cut off. */
  if (h->body.len - h->body_at_timer >= BODY_PROGRESS) {
    h->body_at_timer = h->body.len;
    conn_set_timer(c, c->server->limits.header_timeout_ms);
  }
  return 0;
}

int http_awaiting_response(const conn_t *c) {
  return c->http && !c->http_done && c->http->responses < c->http->requests && !c->closing;
}

static int finish_message(conn_t *c);

static int on_message_complete(llhttp_t *p) {
  conn_t *c = CONN(p);
  http_conn_t *h = c->http;
  conn_stop_timer(c);
  h->in_message = 0;
  h->keep_alive = llhttp_should_keep_alive(p) ? 1 : 0;
  if (hstr_append(&h->head, "", 1) != 0 || hstr_append(&h->body, "", 1) != 0)
    return fail_in_callback(p, 503);
  h->body.len--; /* the NUL only makes the body safe to print */
  http_request_t req = {
      .method = llhttp_method_name((llhttp_method_t)p->method),
      .url = h->head.data,
      .url_len = h->url_len,
      .version_major = p->http_major,
      .version_minor = p->http_minor,
      .headers = h->head.data + h->url_len + 1,
      .nheaders = h->nheaders,
      .body = h->body.data,
      .body_len = h->body.len,
      .keep_alive = h->keep_alive,
  };
  h->head_request = p->method == HTTP_HEAD;
  h->requests++;
  h->in_handler = 1;
  if (c->server->on_request) c->server->on_request(c, &req, c->server->ud);
  h->in_handler = 0;
  if (c->closing || c->proto != &http_proto) return HPE_PAUSED;
  if (h->deferred && http_awaiting_response(c)) {
    conn_set_timer(c, c->server->limits.idle_timeout_ms);
    return HPE_PAUSED; /* http_respond finishes the message */
  }
  h->deferred = 0;
  return finish_message(c);
}

int http_defer(conn_t *c) {
  if (!http_awaiting_response(c) || !c->http->in_handler) return -1;
  c->http->deferred = 1;
  return 0;
}

/* The request is answered: on to the next one, or the close. */
static int finish_message(conn_t *c) {
  http_conn_t *h = c->http;
  if (http_awaiting_response(c)) {
    static const char text[] = "the handler did not answer\n";
    http_respond(c, 500, NULL, 0, text, sizeof text - 1, NULL);
  }
  reset_request(h);
  if (h->close_after) {
    conn_end(c);
    return HPE_PAUSED;
  }
  /* The conn is idle once its answers are written: until then the timer
   * stays off (on_writable starts it when the queue drains). */
  if (c->queued_bytes == 0) conn_set_timer(c, c->server->limits.idle_timeout_ms);
  if (c->queued_bytes >= CONN_PAUSE_MARK) return HPE_PAUSED;
  return 0;
}

static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static void append_str(hstr_t *s, const char *text) {
  hstr_append(s, text, strlen(text));
}

/* close: the conn ends after this response. A stream's head (body_len
 * SIZE_MAX) has no length: the body runs until the conn closes. */
static int build_and_send(conn_t *c, int status, const http_header_t *headers, size_t nheaders,
                          const char *body, size_t body_len, int close) {
  http_conn_t *h = c->http;
  hstr_t out = {0};
  char line[128];
  snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\nDate: %s\r\n", status, http_reason(status),
           runtime_date(c->rt));
  append_str(&out, line);
  for (size_t i = 0; i < nheaders; i++) {
    hstr_append(&out, headers[i].name, headers[i].name_len);
    hstr_append(&out, ": ", 2);
    hstr_append(&out, headers[i].value, headers[i].value_len);
    hstr_append(&out, "\r\n", 2);
  }
  int streaming = body_len == SIZE_MAX;
  int bodiless = status < 200 || status == 204 || status == 304 || streaming;
  if (!bodiless) {
    snprintf(line, sizeof line, "Content-Length: %zu\r\n", body_len);
    append_str(&out, line);
  }
  if (streaming)
    ;
  else if (close)
    append_str(&out, "Connection: close\r\n");
  else if (h->parser.http_major == 1 && h->parser.http_minor == 0)
    append_str(&out, "Connection: keep-alive\r\n");
  hstr_append(&out, "\r\n", 2);
  if (!bodiless && !h->head_request) hstr_append(&out, body, body_len);
  hbuf_t *b = hstr_freeze(&out);
  if (!b) return -1;
  int rc = conn_send(c, b);
  hbuf_unref(b);
  return rc;
}

static int has_line_break(const char *s, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') return 1;
  return 0;
}

/* Checks a response's status and headers and drops the caller's Connection
 * header (ours to set); *close becomes 1 if the caller asked to close.
 * Returns how many headers were kept in kept, or -1 with *err set. */
static long check_response(conn_t *c, int status, const http_header_t *headers, size_t nheaders,
                           http_header_t *kept, int *close, const char **err) {
  if (!http_awaiting_response(c)) {
    *err = "no request is waiting for a response";
    return -1;
  }
  if (status < 100 || status > 999) {
    *err = "status must be between 100 and 999";
    return -1;
  }
  long nkept = 0;
  for (size_t i = 0; i < nheaders; i++) {
    if (has_line_break(headers[i].name, headers[i].name_len) ||
        has_line_break(headers[i].value, headers[i].value_len)) {
      *err = "header names and values must not contain CR, LF or NUL";
      return -1;
    }
    if (headers[i].name_len == 10 && strncasecmp(headers[i].name, "connection", 10) == 0 &&
        status != 101) { /* a 101's Connection: Upgrade is the caller's */
      if (headers[i].value_len == 5 && strncasecmp(headers[i].value, "close", 5) == 0) *close = 1;
    } else {
      kept[nkept++] = headers[i];
    }
  }
  return nkept;
}

static void release_buffers(http_conn_t *h) {
  hstr_free(&h->head);
  hstr_free(&h->body);
  free(h->pending);
  h->pending = NULL;
}

int http_takeover(conn_t *c, int status, const http_header_t *headers, size_t nheaders,
                  const conn_proto_t *proto, const char **err) {
  http_header_t kept[nheaders ? nheaders : 1];
  int close = 0;
  long nkept = check_response(c, status, headers, nheaders, kept, &close, err);
  if (nkept < 0) return -1;
  if (build_and_send(c, status, kept, (size_t)nkept, NULL, SIZE_MAX, 0) != 0) {
    *err = "out of memory";
    return -1;
  }
  c->http->responses++;
  release_buffers(c->http);
  c->http_done = 1; /* the parser state goes at the next flush, off this call stack */
  conn_stop_timer(c);
  c->proto = proto;
  conn_resume_reading(c); /* to see the peer go */
  return 0;
}

int http_respond(conn_t *c, int status, const http_header_t *headers, size_t nheaders,
                 const char *body, size_t body_len, const char **err) {
  const char *dummy;
  if (!err) err = &dummy;
  http_conn_t *h = c->http;
  int close = !h->keep_alive || c->server->draining || c->rt->draining;
  http_header_t kept[nheaders ? nheaders : 1];
  long nkept = check_response(c, status, headers, nheaders, kept, &close, err);
  if (nkept < 0) return -1;
  if (body_len == SIZE_MAX) body_len--; /* that length means a stream's head */
  if (build_and_send(c, status, kept, (size_t)nkept, body, body_len, close) != 0) {
    *err = "out of memory";
    return -1;
  }
  h->responses++;
  if (close) h->close_after = 1;
  if (h->deferred && !h->in_handler) {
    /* A deferred answer: reading resumes once it is written (on_writable). */
    h->deferred = 0;
    finish_message(c);
  }
  return 0;
}

void http_fail(conn_t *c, int status, const char *text) {
  http_conn_t *h = c->http;
  if (c->closing || c->ending) return;
  server_count_error(c->server, status);
  h->head_request = 0;
  h->responses = h->requests;
  build_and_send(c, status, NULL, 0, text, strlen(text), 1);
  h->close_after = 1;
  conn_end(c);
}

/* Feeds bytes to the parser, and handles a pause (backpressure, or a
 * response that closes the conn) by keeping the rest for later. */
static void execute(conn_t *c, const char *data, size_t len) {
  http_conn_t *h = c->http;
  llhttp_t *p = &h->parser;
  for (;;) {
    llhttp_errno_t err = llhttp_execute(p, data, len);
    if (c->closing || c->ending) return;
    if (c->proto != &http_proto) { /* taken over: the rest is the new protocol's */
      const char *pos = llhttp_get_error_pos(p);
      if (err != HPE_OK && pos && pos < data + len) c->proto->on_data(c, pos, (size_t)(data + len - pos));
      return;
    }
    if (err == HPE_OK) {
      /* len counts from where the message began (see below) when it began
       * in this input; whole inputs after that */
      if (h->in_message && !h->headers_done) {
        h->raw_head_bytes += len;
        if (h->raw_head_bytes > c->server->limits.max_header_size) {
          int status = too_large_status(c);
          http_fail(c, status, status == 414 ? "request target too long\n"
                                             : "request header section too large\n");
        }
      }
      return;
    }
    const char *pos = llhttp_get_error_pos(p);
    size_t used = pos ? (size_t)(pos - data) : len;
    if (err == HPE_PAUSED_UPGRADE) {
      /* No protocol took the conn over: the next bytes are HTTP again. */
      llhttp_resume_after_upgrade(p);
      data += used;
      len -= used;
      continue;
    }
    if (err == HPE_PAUSED && h->in_message && !h->headers_done) {
      /* on_message_begin's pause (every other pause happens between
       * messages): what came before belongs to earlier messages. */
      llhttp_resume(p);
      data += used;
      len -= used;
      continue;
    }
    if (err == HPE_PAUSED) {
      llhttp_resume(p);
      if (used < len) {
        h->pending = malloc(len - used);
        if (!h->pending) {
          conn_close(c);
          return;
        }
        memcpy(h->pending, data + used, len - used);
        h->pending_len = len - used;
      }
      conn_pause_reading(c);
      return;
    }
    if (h->fail_status) { /* llhttp may report a callback's refusal under another code */
      int status = h->fail_status;
      const char *text = status == 413   ? "request body too large\n"
                         : status == 414 ? "request target too long\n"
                         : status == 431 ? "request header section too large\n"
                         : status == 400 ? "bad request: malformed header field name\n"
                                         : "server out of memory\n";
      http_fail(c, status, text);
      return;
    }
    char text[160];
    snprintf(text, sizeof text, "bad request: %s\n", llhttp_get_error_reason(p));
    http_fail(c, 400, text);
    return;
  }
}

static void on_data(conn_t *c, const char *data, size_t len) {
  execute(c, data, len);
}

/* Parses the input kept while reading was paused, then reads again. */
static void resume_input(conn_t *c) {
  http_conn_t *h = c->http;
  char *rest = h->pending;
  size_t rest_len = h->pending_len;
  h->pending = NULL;
  h->pending_len = 0;
  if (rest) {
    execute(c, rest, rest_len);
    free(rest);
  }
  if (!h->pending && !c->closing && !c->ending) conn_resume_reading(c);
}

/* Called after each write that leaves the out queue below the resume mark. */
static void on_writable(conn_t *c) {
  http_conn_t *h = c->http;
  if (c->ending) return;
  if (!c->reading) {
    resume_input(c);
    if (c->closing || c->ending) return;
  }
  /* Between requests with every answer written: the idle timer runs from now. */
  if (!h->in_message && c->queued_bytes == 0 && h->requests > 0)
    conn_set_timer(c, c->server->limits.idle_timeout_ms);
}

static void on_eof(conn_t *c) {
  /* Answers to requests already read still go out; a half-sent request is dropped. */
  if (c->queued_bytes > 0 || c->http->pending) {
    free(c->http->pending);
    c->http->pending = NULL;
    conn_end(c);
  } else {
    conn_close(c);
  }
}

static void on_timeout(conn_t *c) {
  if (c->http->in_message || c->http->requests == 0)
    http_fail(c, 408, "request timed out\n");
  else
    conn_close(c); /* an idle keep-alive conn: nothing to say */
}

static void on_drain(conn_t *c) {
  if (c->http->in_message)
    c->http->close_after = 1; /* answer the request being read, then close */
  else if (c->queued_bytes > 0)
    conn_end(c);
  else
    conn_close(c);
}

static void on_close(conn_t *c) {
  release_buffers(c->http);
}

void http_conn_free(conn_t *c) {
  if (!c->http) return;
  release_buffers(c->http);
  free(c->http);
  c->http = NULL;
}

static const conn_proto_t http_proto = {
    .name = "http",
    .on_data = on_data,
    .on_eof = on_eof,
    .on_timeout = on_timeout,
    .on_writable = on_writable,
    .on_drain = on_drain,
    .on_close = on_close,
};

int http_conn_start(conn_t *c) {
  c->http = calloc(1, sizeof *c->http);
  if (!c->http) return -1;
  c->proto = &http_proto;
  llhttp_init(&c->http->parser, HTTP_REQUEST, &settings);
  c->http->parser.data = c;
  conn_set_timer(c, c->server->limits.header_timeout_ms);
  return 0;
}
