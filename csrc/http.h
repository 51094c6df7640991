/* http: HTTP/1.1 on a conn. llhttp parses requests (keep-alive, pipelining,
 * chunked bodies); each complete request goes to the server's handler, and
 * responses are serialized here in the order requests arrived. */
#ifndef HERALD_HTTP_H
#define HERALD_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "llhttp.h"

typedef struct conn conn_t;

typedef struct http_conn {
  llhttp_t parser;
  hstr_t head;            /* url \0 (name \0 value \0)* of the request being read */
  hstr_t body;
  size_t url_len;
  size_t field_start;     /* where the header name being read starts in head */
  size_t raw_head_bytes;  /* bytes fed while the head was incomplete */
  size_t body_at_timer;   /* body bytes when the request timer was last restarted */
  unsigned nheaders;
  unsigned in_message : 1, headers_done : 1, expect_continue : 1, keep_alive : 1,
      head_request : 1, close_after : 1,
      in_handler : 1, /* the server's on_request runs */
      deferred : 1;   /* the handler answers later (http_defer) */
  uint16_t fail_status;   /* the 4xx a parser callback found, answered after execute */
  unsigned requests, responses; /* dispatched and answered: answers go in order */
  char *pending;          /* unparsed input kept while input is paused */
  size_t pending_len;
} http_conn_t;

/* A complete request as the handler sees it; valid during the call only. */
typedef struct http_request {
  const char *method;
  const char *url;
  size_t url_len;
  size_t field_start;     /* where the header name being read starts in head */
  int version_major, version_minor;
  const char *headers;    /* nheaders pairs of NUL-terminated name, value; names lowercased */
  unsigned nheaders;
  const char *body;
  size_t body_len;
  int keep_alive;
} http_request_t;

typedef struct http_header {
  const char *name, *value;
  size_t name_len, value_len;
} http_header_t;

/* Puts HTTP on a new conn; -1 on ENOMEM. */
int http_conn_start(conn_t *c);
/* Frees the parser state: after a takeover (at the next flush) and with the conn. */
void http_conn_free(conn_t *c);

/* Answers the oldest unanswered request. Returns 0, or -1 with *err set. */
int http_respond(conn_t *c, int status, const http_header_t *headers, size_t nheaders,
                 const char *body, size_t body_len, const char **err);

/* Answers the waiting request with a head and no length, and hands the conn
 * to proto, which writes the body as a stream (SSE) or speaks another
 * protocol after a 101 (WebSocket). Returns 0, or -1 with *err set. */
typedef struct conn_proto conn_proto_t;
int http_takeover(conn_t *c, int status, const http_header_t *headers, size_t nheaders,
                  const conn_proto_t *proto, const char **err);

/* Answers with a short text body and closes: used for protocol errors. */
void http_fail(conn_t *c, int status, const char *text);

const char *http_reason(int status);

/* True while a request has been dispatched and not yet answered. */
int http_awaiting_response(const conn_t *c);
/* Called by a handler that will answer after it returns (from a callback):
 * the conn reads nothing more until then; the idle timeout bounds the wait. */
int http_defer(conn_t *c);

#endif
