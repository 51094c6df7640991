/* sse: Server-Sent Events on a conn once its request has been answered
 * with a stream: the event-stream format of the HTML standard, heartbeat
 * comments, and delivery of hub messages encoded once per publish. */
#ifndef HERALD_SSE_H
#define HERALD_SSE_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "http.h"

typedef struct conn conn_t;

/* The event the stream sends before the replay when messages of a topic were
 * lost (history too short, or a restart): data is {"topic": name}. */
#define SSE_GAP_EVENT "herald-gap"

/* Appends one event: id and event may be NULL, retry_ms < 0 leaves it out.
 * Each line of data (ending in \n, \r\n or \r) becomes a data: line. */
int sse_encode(hstr_t *out, const char *id, const char *event, const char *data, size_t len,
               long retry_ms);

/* NULL, or why s cannot be an event name or id (CR, LF or NUL in it). */
const char *sse_check_field(const char *s, size_t len);

/* Answers the waiting request with 200 and the event-stream headers (plus
 * extra ones, e.g. CORS), then retry, what the conn missed since last_id
 * (NULL: nothing to resume), and what it was sent while opening. */
int sse_start(conn_t *c, const http_header_t *extra, size_t nextra, uint32_t heartbeat_ms,
              long retry_ms, const char *last_id, const char **err);

/* An event for this conn alone. */
int sse_send(conn_t *c, const char *data, size_t len, const char *event, const char *id,
             long retry_ms);
/* A comment line: ignored by clients, keeps proxies from timing out. */
int sse_comment(conn_t *c, const char *text, size_t len);

#endif
