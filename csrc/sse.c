#include "sse.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "conn.h"
#include "hub.h"
#include "server.h"
#include "utf8.h"

static int append(hstr_t *out, const char *s, size_t len) {
  return hstr_append(out, s, len);
}

static int append_field(hstr_t *out, const char *name, const char *value, size_t len) {
  return append(out, name, strlen(name)) | append(out, ": ", 2) | append(out, value, len) |
         append(out, "\n", 1);
}

int sse_encode(hstr_t *out, const char *id, const char *event, const char *data, size_t len,
               long retry_ms) {
  int rc = 0;
  if (id) rc |= append_field(out, "id", id, strlen(id));
  if (event) rc |= append_field(out, "event", event, strlen(event));
  if (retry_ms >= 0) {
    char n[24];
    snprintf(n, sizeof n, "%ld", retry_ms);
    rc |= append_field(out, "retry", n, strlen(n));
  }
  /* Each line, whatever ends it, is a data: line; an empty payload is one
   * empty line, which the client still dispatches as "". */
  size_t start = 0;
  for (size_t i = 0; i <= len; i++) {
    if (i < len && data[i] != '\n' && data[i] != '\r') continue;
    if (i > start) rc |= append_field(out, "data", data + start, i - start);
    else rc |= append(out, "data:\n", 6);
    if (i < len && data[i] == '\r' && i + 1 < len && data[i + 1] == '\n') i++;
    start = i + 1;
  }
  rc |= append(out, "\n", 1);
  return rc ? -1 : 0;
}

const char *sse_check_field(const char *s, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') return "must not contain CR, LF or NUL";
  return NULL;
}

static int send_frozen(conn_t *c, hstr_t *out) {
  hbuf_t *b = hstr_freeze(out);
  if (!b) return -1;
  int rc = hub_member_send(c, b);
  hbuf_unref(b);
  return rc;
}

int sse_send(conn_t *c, const char *data, size_t len, const char *event, const char *id,
             long retry_ms) {
  hstr_t out = {0};
  if (sse_encode(&out, id, event, data, len, retry_ms) != 0) {
    hstr_free(&out);
    return -1;
  }
  return send_frozen(c, &out);
}

int sse_comment(conn_t *c, const char *text, size_t len) {
  hstr_t out = {0};
  int rc = append(&out, ":", 1);
  if (len) rc |= append(&out, " ", 1) | append(&out, text, len);
  rc |= append(&out, "\n\n", 2);
  if (rc) {
    hstr_free(&out);
    return -1;
  }
  return send_frozen(c, &out);
}

/* Encoded at the first SSE delivery of the message, then shared. */
static void deliver(conn_t *c, hub_msg_t *m) {
  if (!m->sse) {
    char id[HUB_ID_SIZE];
    hub_format_id(c->member.hub, m->seq, id);
    hstr_t out = {0};
    if (sse_encode(&out, id, m->event, m->data, m->data_len, -1) == 0) m->sse = hstr_freeze(&out);
    else hstr_free(&out);
  }
  if (!m->sse || conn_deliver(c, m->sse) != 0) conn_close(c);
}

static void send_gap(conn_t *c, const char *name, size_t len) {
  hstr_t json = {0};
  int rc = hstr_append(&json, "{\"topic\":", 9) | json_append_string(&json, name, len) |
           hstr_append(&json, "}", 1);
  if (rc == 0) rc = sse_send(c, json.data, json.len, SSE_GAP_EVENT, NULL, -1);
  hstr_free(&json);
  if (rc) conn_close(c);
}

static void on_data(conn_t *c, const char *data, size_t len) {
  (void)c, (void)data, (void)len; /* a stream's client has nothing to say */
}

static void on_eof(conn_t *c) {
  conn_close(c);
}

static void on_timeout(conn_t *c) {
  static const char beat[] = ":\n\n";
  if (conn_send_bytes(c, beat, sizeof beat - 1) != 0) {
    conn_close(c);
    return;
  }
  conn_repeat_timer(c);
}

/* Shutting down: the client should come back (to another node behind the
 * balancer) soon, and resume from its last id. */
static void on_drain(conn_t *c) {
  char line[32];
  int n = snprintf(line, sizeof line, "retry: %u\n\n", (unsigned)c->server->limits.drain_retry_ms);
  conn_send_bytes(c, line, (size_t)n);
  conn_end(c);
}

static const conn_proto_t sse_proto = {
    .name = "sse",
    .on_data = on_data,
    .on_eof = on_eof,
    .on_timeout = on_timeout,
    .on_writable = hub_member_catch_up,
    .on_drain = on_drain,
    .deliver = deliver,
    .gap = send_gap,
};

int sse_start(conn_t *c, const http_header_t *extra, size_t nextra, uint32_t heartbeat_ms,
              long retry_ms, const char *last_id, const char **err) {
  static const http_header_t fixed[] = {
      {"Content-Type", "text/event-stream; charset=utf-8", 12, 32},
      {"Cache-Control", "no-cache", 13, 8},
      {"X-Accel-Buffering", "no", 17, 2},
  };
  size_t nfixed = sizeof fixed / sizeof *fixed;
  http_header_t headers[nfixed + nextra];
  memcpy(headers, fixed, sizeof fixed);
  if (nextra) memcpy(headers + nfixed, extra, nextra * sizeof *extra);
  if (http_takeover(c, 200, headers, nfixed + nextra, &sse_proto, err) != 0) return -1;
  c->notify_close = 1;
  if (retry_ms >= 0) {
    char line[32];
    int n = snprintf(line, sizeof line, "retry: %ld\n\n", retry_ms);
    if (conn_send_bytes(c, line, (size_t)n) != 0) goto oom;
  }
  if (hub_member_start(c, last_id) != 0) goto oom;
  if (heartbeat_ms) conn_set_timer(c, heartbeat_ms);
  return 0;
oom:
  *err = "out of memory";
  conn_close(c);
  return -1;
}
