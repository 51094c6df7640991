#include "tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "server.h"

/* Mozilla's "intermediate" list for TLS 1.2: forward secrecy, AEAD only. */
#define DEFAULT_CIPHERS                                                               \
  "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                        \
  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                        \
  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256:" \
  "DHE-RSA-AES256-GCM-SHA384"
/* Plaintext is gathered into records of up to this much. */
#define RECORD 16384

struct tls_config {
  unsigned refs;
  size_t n;
  SSL_CTX **ctxs;          /* one per certificate; [0] is the default */
  char **certs, **keys;    /* kept for reload */
  char *ciphers, *ciphersuites;
  uint64_t handshake_timeout_ms;
};

struct tls_conn {
  SSL *ssl;
  BIO *rbio, *wbio;        /* the socket's side: ciphertext in and out */
  tls_config_t *cfg;
  unsigned out_cipher;     /* tls_out_cipher */
  unsigned done : 1, shutdown_sent : 1;
};

static void openssl_reason(char *err, size_t errlen, const char *what, const char *file) {
  unsigned long e = ERR_get_error();
  char reason[256] = "unknown error";
  if (e) ERR_error_string_n(e, reason, sizeof reason);
  ERR_clear_error();
  snprintf(err, errlen, "%s %s: %s", what, file, reason);
}

/* ---- configs ---- */

static char *dup_or_null(const char *s) {
  return s ? strdup(s) : NULL;
}

static int select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned inlen, void *arg) {
  (void)ssl, (void)arg;
  for (unsigned i = 0; i + 1 <= inlen && i + 1 + in[i] <= inlen; i += 1 + in[i])
    if (in[i] == 8 && memcmp(in + i + 1, "http/1.1", 8) == 0) {
      *out = in + i + 1;
      *outlen = 8;
      return SSL_TLSEXT_ERR_OK;
    }
  return SSL_TLSEXT_ERR_NOACK; /* go on without ALPN: only HTTP/1.1 is spoken here */
}

/* SNI: the certificate whose names match, else the default. */
static int select_certificate(SSL *ssl, int *alert, void *arg) {
  (void)alert;
  tls_config_t *cfg = arg;
  const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  if (!name) return SSL_TLSEXT_ERR_OK;
  for (size_t i = 1; i < cfg->n; i++) {
    X509 *cert = SSL_CTX_get0_certificate(cfg->ctxs[i]);
    if (cert && X509_check_host(cert, name, 0, 0, NULL) == 1) {
      SSL_set_SSL_CTX(ssl, cfg->ctxs[i]);
      break;
    }
  }
  return SSL_TLSEXT_ERR_OK;
}

static SSL_CTX *make_ctx(tls_config_t *cfg, size_t i, char *err, size_t errlen) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx) {
    openssl_reason(err, errlen, "tls:", "SSL_CTX_new");
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS); /* idle conns give back their record buffers */
  const char *ciphers = cfg->ciphers ? cfg->ciphers : DEFAULT_CIPHERS;
  if (SSL_CTX_set_cipher_list(ctx, ciphers) != 1) {
    openssl_reason(err, errlen, "tls: ciphers", ciphers);
    goto fail;
  }
  if (cfg->ciphersuites && SSL_CTX_set_ciphersuites(ctx, cfg->ciphersuites) != 1) {
    openssl_reason(err, errlen, "tls: ciphersuites", cfg->ciphersuites);
    goto fail;
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, cfg->certs[i]) != 1) {
    openssl_reason(err, errlen, "tls: certificate", cfg->certs[i]);
    goto fail;
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, cfg->keys[i], SSL_FILETYPE_PEM) != 1) {
    openssl_reason(err, errlen, "tls: key", cfg->keys[i]);
    goto fail;
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    openssl_reason(err, errlen, "tls: key does not match certificate", cfg->certs[i]);
    goto fail;
  }
  SSL_CTX_set_alpn_select_cb(ctx, select_alpn, NULL);
  if (i == 0) {
    SSL_CTX_set_tlsext_servername_callback(ctx, select_certificate);
    SSL_CTX_set_tlsext_servername_arg(ctx, cfg);
  }
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

static void config_free(tls_config_t *cfg) {
  for (size_t i = 0; i < cfg->n; i++) {
    if (cfg->ctxs) SSL_CTX_free(cfg->ctxs[i]);
    if (cfg->certs) free(cfg->certs[i]);
    if (cfg->keys) free(cfg->keys[i]);
  }
  free(cfg->ctxs);
  free(cfg->certs);
  free(cfg->keys);
  free(cfg->ciphers);
  free(cfg->ciphersuites);
  free(cfg);
}

tls_config_t *tls_config_new(const tls_settings_t *s, char *err, size_t errlen) {
  tls_config_t *cfg = calloc(1, sizeof *cfg);
  if (!cfg) goto oom;
  cfg->refs = 1;
  cfg->n = s->n;
  cfg->handshake_timeout_ms = s->handshake_timeout_ms;
  cfg->ctxs = calloc(s->n, sizeof *cfg->ctxs);
  cfg->certs = calloc(s->n, sizeof *cfg->certs);
  cfg->keys = calloc(s->n, sizeof *cfg->keys);
  cfg->ciphers = dup_or_null(s->ciphers);
  cfg->ciphersuites = dup_or_null(s->ciphersuites);
  if (!cfg->ctxs || !cfg->certs || !cfg->keys || (s->ciphers && !cfg->ciphers) ||
      (s->ciphersuites && !cfg->ciphersuites))
    goto oom;
  for (size_t i = 0; i < s->n; i++) {
    cfg->certs[i] = strdup(s->certs[i]);
    cfg->keys[i] = strdup(s->keys[i]);
    if (!cfg->certs[i] || !cfg->keys[i]) goto oom;
  }
  for (size_t i = 0; i < s->n; i++) {
    cfg->ctxs[i] = make_ctx(cfg, i, err, errlen);
    if (!cfg->ctxs[i]) {
      config_free(cfg);
      return NULL;
    }
  }
  return cfg;
oom:
  snprintf(err, errlen, "tls: out of memory");
  if (cfg) config_free(cfg);
  return NULL;
}

tls_config_t *tls_config_reload(const tls_config_t *old, char *err, size_t errlen) {
  tls_settings_t s = {(const char *const *)old->certs, (const char *const *)old->keys, old->n,
                      old->ciphers, old->ciphersuites, old->handshake_timeout_ms};
  return tls_config_new(&s, err, errlen);
}

tls_config_t *tls_config_ref(tls_config_t *cfg) {
  cfg->refs++;
  return cfg;
}

void tls_config_unref(tls_config_t *cfg) {
  if (cfg && --cfg->refs == 0) config_free(cfg);
}

/* ---- conns ---- */

int tls_conn_start(conn_t *c, tls_config_t *cfg) {
  tls_conn_t *t = calloc(1, sizeof *t);
  if (!t) return -1;
  t->ssl = SSL_new(cfg->ctxs[0]);
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->rbio || !t->wbio) {
    SSL_free(t->ssl);
    BIO_free(t->rbio);
    BIO_free(t->wbio);
    free(t);
    return -1;
  }
  BIO_set_mem_eof_return(t->rbio, -1); /* empty means "wait", not EOF */
  SSL_set_bio(t->ssl, t->rbio, t->wbio);
  SSL_set_accept_state(t->ssl);
  t->cfg = cfg;
  cfg->refs++;
  c->tls = t;
  conn_set_timer(c, cfg->handshake_timeout_ms);
  return 0;
}

void tls_conn_free(conn_t *c) {
  tls_conn_t *t = c->tls;
  if (!t) return;
  SSL_free(t->ssl); /* and its BIOs */
  tls_config_unref(t->cfg);
  free(t);
  c->tls = NULL;
}

unsigned *tls_out_cipher(conn_t *c) {
  return &c->tls->out_cipher;
}

int tls_handshake_done(const conn_t *c) {
  return c->tls && c->tls->done;
}

int tls_has_input(const conn_t *c) {
  return c->tls && c->tls->done && (SSL_pending(c->tls->ssl) > 0 || BIO_ctrl_pending(c->tls->rbio) > 0);
}

/* Something for OpenSSL to send (handshake, alert, ticket): write it soon. */
static void want_flush(conn_t *c) {
  if (BIO_ctrl_pending(c->tls->wbio) > 0) conn_mark_dirty(c);
}

void tls_on_read(conn_t *c, const char *data, size_t len) {
  tls_conn_t *t = c->tls;
  if (len && BIO_write(t->rbio, data, (int)len) != (int)len) {
    conn_close(c);
    return;
  }
  if (!t->done) {
    int r = SSL_do_handshake(t->ssl);
    want_flush(c);
    if (r != 1) {
      int e = SSL_get_error(t->ssl, r);
      ERR_clear_error();
      if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) conn_end(c); /* the alert goes out */
      return;
    }
    t->done = 1;
    conn_set_timer(c, c->server->limits.header_timeout_ms);
  }
  char *plain = c->rt->tls_buf;
  while (c->reading && !c->closing && !c->ending) {
    int n = SSL_read(t->ssl, plain, sizeof c->rt->tls_buf);
    if (n > 0) {
      c->proto->on_data(c, plain, (size_t)n);
      continue;
    }
    int e = SSL_get_error(t->ssl, n);
    ERR_clear_error();
    if (e == SSL_ERROR_WANT_READ) break;
    if (e == SSL_ERROR_ZERO_RETURN) { /* close_notify: the peer is done */
      conn_pause_reading(c);
      c->proto->on_eof(c);
    } else {
      conn_close(c);
    }
    return;
  }
  want_flush(c);
}

/* What OpenSSL has to send, queued after the ciphertext already waiting and
 * before any plaintext still waiting for the handshake. */
static int take_output(conn_t *c) {
  size_t n = BIO_ctrl_pending(c->tls->wbio);
  if (n == 0) return 0;
  hbuf_t *b = hbuf_new(n);
  if (!b || BIO_read(c->tls->wbio, b->data, (int)n) != (int)n) {
    hbuf_unref(b);
    return -1;
  }
  int rc = conn_queue_cipher(c, b);
  hbuf_unref(b);
  return rc;
}

/* Encrypts every queued plaintext chunk, gathering small ones into records. */
static int encrypt_queue(conn_t *c) {
  SSL *ssl = c->tls->ssl;
  char staging[RECORD];
  size_t used = 0;
  int rc = 0;
  unsigned first = c->out_head + c->tls->out_cipher;
  for (unsigned i = first; i < c->out_len; i++) {
    hbuf_t *b = c->outq[i].buf;
    if (rc == 0 && used && used + b->len > RECORD) {
      rc = SSL_write(ssl, staging, (int)used) > 0 ? 0 : -1;
      used = 0;
    }
    if (rc == 0 && b->len >= RECORD) {
      rc = SSL_write(ssl, b->data, (int)b->len) > 0 ? 0 : -1;
    } else if (rc == 0) {
      memcpy(staging + used, b->data, b->len);
      used += b->len;
    }
    c->queued_bytes -= b->len;
    c->server->queued_bytes -= b->len;
    hbuf_unref(b);
  }
  c->out_len = first;
  if (rc == 0 && used) rc = SSL_write(ssl, staging, (int)used) > 0 ? 0 : -1;
  if (rc != 0) ERR_clear_error();
  return rc;
}

int tls_encrypt(conn_t *c) {
  tls_conn_t *t = c->tls;
  if (t->done && !t->shutdown_sent) {
    if (encrypt_queue(c) != 0) return -1;
    if (c->ending) {
      SSL_shutdown(t->ssl); /* close_notify, then the TCP FIN */
      t->shutdown_sent = 1;
    }
  }
  return take_output(c);
}
