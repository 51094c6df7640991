/* tls: TLS 1.2/1.3 between the socket and the protocol, with OpenSSL driven
 * through memory BIOs: conn.c hands it the bytes read and asks it to encrypt
 * what is queued before each write; no layer above knows. */
#ifndef HERALD_TLS_H
#define HERALD_TLS_H

#include <stddef.h>
#include <stdint.h>

typedef struct conn conn_t;
typedef struct tls_conn tls_conn_t;

/* What a listener serves: one certificate per server name (the first is the
 * default), and the settings to build it again on reload. Refcounted: a
 * reload makes a new one while conns keep theirs. */
typedef struct tls_config tls_config_t;

typedef struct tls_settings {
  const char *const *certs; /* PEM files, chains allowed */
  const char *const *keys;
  size_t n;
  const char *ciphers;      /* TLS 1.2 cipher list; NULL: the default */
  const char *ciphersuites; /* TLS 1.3 suites; NULL: OpenSSL's */
  uint64_t handshake_timeout_ms;
} tls_settings_t;

/* NULL with err filled (naming the file and OpenSSL's reason) on failure. */
tls_config_t *tls_config_new(const tls_settings_t *s, char *err, size_t errlen);
/* The same settings, files read again. */
tls_config_t *tls_config_reload(const tls_config_t *old, char *err, size_t errlen);
tls_config_t *tls_config_ref(tls_config_t *cfg);
void tls_config_unref(tls_config_t *cfg);

/* Puts TLS on a new conn; -1 on ENOMEM. */
int tls_conn_start(conn_t *c, tls_config_t *cfg);
void tls_conn_free(conn_t *c);
/* The count of queued chunks, at the head of a TLS conn's out queue, that
 * are ciphertext (conn.c writes those only; the rest is plaintext). */
unsigned *tls_out_cipher(conn_t *c);
int tls_handshake_done(const conn_t *c);

/* Bytes from the socket: decrypted and given to the conn's protocol.
 * With len 0, decrypted input held back while reading was paused. */
void tls_on_read(conn_t *c, const char *data, size_t len);
/* Whether decrypted input is held back (reading was paused). */
int tls_has_input(const conn_t *c);

/* Before a write: turns the queued plaintext into records (several small
 * chunks into few records) and queues what OpenSSL has to send, marked as
 * ciphertext. On an ending conn, adds close_notify. 0, or -1 to close. */
int tls_encrypt(conn_t *c);

#endif
