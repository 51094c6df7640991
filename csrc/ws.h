/* ws: WebSocket (RFC 6455) on a conn after its 101. wslay's frame API reads
 * frames; messages, fragmentation, UTF-8, control frames, the close handshake
 * and keepalive are here. Frames we send are built here too: server frames
 * are unmasked, so one frame built per publish serves every subscriber. */
#ifndef HERALD_WS_H
#define HERALD_WS_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "http.h"

typedef struct conn conn_t;

enum { WS_TEXT = 1, WS_BINARY = 2, WS_CLOSE = 8, WS_PING = 9, WS_PONG = 10 };

/* Close codes (RFC 6455 7.4.1). */
enum {
  WS_NORMAL = 1000, WS_GOING_AWAY = 1001, WS_PROTOCOL_ERROR = 1002, WS_NO_STATUS = 1005,
  WS_ABNORMAL = 1006, WS_INVALID_DATA = 1007, WS_POLICY = 1008, WS_TOO_BIG = 1009,
  WS_INTERNAL_ERROR = 1011
};

typedef struct ws_options {
  size_t max_message;   /* bytes of one message, all fragments */
  uint32_t ping_ms;     /* ping a conn silent this long; close it if still silent after as long */
  int envelope;         /* hub messages as JSON {topic, id, event, data}, not raw payloads */
  uint32_t max_rate;    /* messages (and pings) per second from the peer; 0: no limit */
  int rate_drop;        /* over the rate: drop them (else close 1008) */
} ws_options_t;

/* SHA-1 for the handshakes, fetched once (per runtime, at herald.core's
 * load): EVP_sha1() makes OpenSSL 3 look it up under a lock at every
 * handshake, and its first use loads the default provider, 2 MB of
 * libcrypto's pages, which then happens at start, not under the first client.
 * NULL on failure (ws_accept_key then uses EVP_sha1()). */
void *ws_sha1_new(void);
void ws_sha1_free(void *sha1);

/* Sec-WebSocket-Accept for a client's key (sha1: ws_sha1_new's, or NULL):
 * out needs 29 bytes. */
int ws_accept_key(const void *sha1, const char *key, size_t len, char out[29]);

/* Answers the waiting request 101 with headers (Upgrade, Connection,
 * Sec-WebSocket-Accept, ...), then what the conn missed since last_id and
 * what it was sent while opening, as for SSE. */
int ws_start(conn_t *c, const http_header_t *headers, size_t nheaders, const ws_options_t *o,
             const char *last_id, const char **err);

/* 0, or -1 with *err set. */
int ws_send(conn_t *c, const char *data, size_t len, int opcode, const char **err);
int ws_close(conn_t *c, int code, const char *reason, size_t len, const char **err);

/* Frees what is left of the WebSocket state, with the conn. */
void ws_conn_free(conn_t *c);

/* How the conn's WebSocket ended: the peer's close code (WS_NO_STATUS if its
 * close had none), else the one we sent, else WS_ABNORMAL. */
int ws_close_status(const conn_t *c, const char **reason, size_t *len);

#endif
