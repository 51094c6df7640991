/* The TLS layer's input path: a real TLS listener (tls_config_new with two
 * certificates, the second chosen by SNI for b.example; keys made at
 * startup, written to a private temporary directory for tls_config_new and
 * removed at once: no key in the repository), a conn accepted on it, and
 * the input as what the client sends:
 *
 *   raw mode: the input is the client's bytes from the first one: records,
 *     ClientHello, alerts, whatever (seeds: real ClientHellos);
 *   handshake mode: an OpenSSL client in this process (memory BIOs) does a
 *     real handshake with the server over the connection, then sends the
 *     input as plaintext in records of chunk sizes (HTTP, so what is behind
 *     the TLS layer runs too: WebSocket, SSE), optionally with a key update
 *     or a renegotiation attempt in the middle, a close_notify at the end,
 *     and the input's tail appended as raw bytes after the records.
 *
 * Input: four bytes of settings, then the client's bytes or plaintext.
 *   byte 0: bit 0 handshake mode, bits 1-2 chunk style, bit 3 the client
 *           ends its side (FIN) at the end, bits 4-5 client: any version,
 *           TLS 1.2, TLS 1.3, TLS 1.2 with ChaCha20; bit 6 SNI b.example
 *           (else localhost), bit 7 ALPN offer (h2, http/1.1)
 *   byte 1: chunk seed
 *   byte 2: bit 0 close_notify at the end, bit 1 key update / renegotiation
 *           halfway, bit 2 the timer fires at the end, bit 3 drain at the end,
 *           bit 4 the server is at its connection limit (its 503 waits in
 *           plaintext for the handshake, then goes out encrypted)
 *   byte 3: handshake mode: the input's last n bytes are raw, after the records */
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static SSL_CTX *client_ctx[4];

static void write_pem(const char *path, EVP_PKEY *key, X509 *cert) {
  FILE *f = fopen(path, "w");
  FZ_CHECK(f, "open %s", path);
  int ok = cert ? PEM_write_X509(f, cert) : PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
  FZ_CHECK(ok && fclose(f) == 0, "write %s", path);
}

/* A self-signed P-256 certificate for name, written as dir/<tag>.crt and .key. */
static void make_cert(const char *dir, const char *tag, const char *name, char *cert_path,
                      char *key_path) {
  EVP_PKEY *key = EVP_EC_gen("P-256");
  X509 *x = X509_new();
  FZ_CHECK(key && x, "key generation");
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
  X509_gmtime_adj(X509_getm_notBefore(x), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x), 86400L * 30);
  X509_set_pubkey(x, key);
  X509_NAME *subject = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC, (const unsigned char *)name, -1, -1, 0);
  X509_set_issuer_name(x, subject);
  char san[128];
  snprintf(san, sizeof san, "DNS:%s", name);
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
  X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, san);
  FZ_CHECK(ext && X509_add_ext(x, ext, -1), "SAN");
  X509_EXTENSION_free(ext);
  FZ_CHECK(X509_sign(x, key, EVP_sha256()) > 0, "sign");
  snprintf(cert_path, 256, "%s/%s.crt", dir, tag);
  snprintf(key_path, 256, "%s/%s.key", dir, tag);
  write_pem(cert_path, NULL, x);
  write_pem(key_path, key, NULL);
  X509_free(x);
  EVP_PKEY_free(key);
}

static void setup(void) {
  char dir[] = "/tmp/herald-fuzz-tls-XXXXXX";
  FZ_CHECK(mkdtemp(dir), "mkdtemp");
  char certs[2][256], keys[2][256];
  make_cert(dir, "default", "localhost", certs[0], keys[0]);
  make_cert(dir, "b", "b.example", certs[1], keys[1]);
  const char *cert_list[] = {certs[0], certs[1]}, *key_list[] = {keys[0], keys[1]};
  tls_settings_t settings = {cert_list, key_list, 2, NULL, NULL, 10000};
  char err[512];
  tls_config_t *cfg = tls_config_new(&settings, err, sizeof err);
  for (int i = 0; i < 2; i++) {
    unlink(certs[i]);
    unlink(keys[i]);
  }
  rmdir(dir);
  FZ_CHECK(cfg, "tls_config_new: %s", err);
  fz_setup(cfg); /* the listener takes the reference */

  for (int i = 0; i < 4; i++) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    FZ_CHECK(ctx, "client SSL_CTX_new");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    if (i == 1 || i == 3) SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
    if (i == 2) SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (i == 3) SSL_CTX_set_cipher_list(ctx, "ECDHE-ECDSA-CHACHA20-POLY1305");
    client_ctx[i] = ctx;
  }
}

typedef struct client {
  SSL *ssl;
  BIO *rbio, *wbio;
  size_t given; /* bytes of fz.out handed to the client's SSL */
  fz_chunker_t *ch;
  int dead;
} client_t;

/* What the client's SSL wrote: to the server, in chunks. */
static void client_flush(client_t *cl) {
  char buf[16384];
  int n;
  while ((n = BIO_read(cl->wbio, buf, sizeof buf)) > 0)
    if (!cl->dead && fz_feed_chunked(buf, (size_t)n, cl->ch) != 0) cl->dead = 1;
}

/* What the server wrote: to the client's SSL, which reads (and drops) the
 * plaintext, as a client reading responses does. */
static void client_take(client_t *cl) {
  fz_read_client();
  if (fz.out.len > cl->given) {
    BIO_write(cl->rbio, fz.out.data + cl->given, (int)(fz.out.len - cl->given));
    cl->given = fz.out.len;
  }
  if (SSL_is_init_finished(cl->ssl)) {
    char buf[16384];
    while (SSL_read(cl->ssl, buf, sizeof buf) > 0) {
    }
    ERR_clear_error();
  }
}

static int handshake(client_t *cl) {
  for (int round = 0; round < 64; round++) {
    int r = SSL_do_handshake(cl->ssl);
    int e = r == 1 ? SSL_ERROR_NONE : SSL_get_error(cl->ssl, r);
    ERR_clear_error();
    client_flush(cl);
    fz_turn();
    client_take(cl);
    if (r == 1) return 0;
    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) return -1;
    if (cl->dead || !fz_conn()) return -1;
  }
  return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    setup();
    ready = 1;
  }
  fz_in_t in = {data, size};
  uint8_t f0 = fz_byte(&in), seed = fz_byte(&in), f2 = fz_byte(&in), tail = fz_byte(&in);
  fz_chunker_t ch;
  fz_chunker_init(&ch, (f0 >> 1) & 3, seed);
  fz.slow_reader = fz.small_buffers = 0;
  fz.hub_max_queued = 0;
  fz.srv->limits.max_connections = (f2 & 16) ? 0 : 1000;
  fz.ws = (fz_ws_config_t){.opt = {.max_message = 1024, .ping_ms = 1000}};
  fz_open();

  if (!(f0 & 1)) {
    fz_feed_chunked(in.p, in.len, &ch);
  } else {
    client_t cl = {.ch = &ch};
    cl.ssl = SSL_new(client_ctx[(f0 >> 4) & 3]);
    cl.rbio = BIO_new(BIO_s_mem());
    cl.wbio = BIO_new(BIO_s_mem());
    FZ_CHECK(cl.ssl && cl.rbio && cl.wbio, "client SSL");
    BIO_set_mem_eof_return(cl.rbio, -1);
    SSL_set_bio(cl.ssl, cl.rbio, cl.wbio);
    SSL_set_connect_state(cl.ssl);
    SSL_set_tlsext_host_name(cl.ssl, (f0 & 0x40 ? "b.example" : "localhost"));
    if (f0 & 0x80) {
      static const unsigned char alpn[] = "\x02h2\x08http/1.1";
      SSL_set_alpn_protos(cl.ssl, alpn, sizeof alpn - 1);
    }
    fz_chunker_t whole;
    fz_chunker_init(&whole, 0, 0);
    cl.ch = &whole; /* the handshake in whole flights; the records after it in chunks */
    if (handshake(&cl) == 0) {
      FZ_CHECK(tls_handshake_done(fz_conn()) || !fz_conn() || fz_conn()->closing,
               "the client finished its handshake, the server did not");
      if (f0 & 0x80) {
        const unsigned char *proto;
        unsigned len;
        SSL_get0_alpn_selected(cl.ssl, &proto, &len);
        FZ_CHECK(len == 8 && memcmp(proto, "http/1.1", 8) == 0, "ALPN did not pick http/1.1");
      }
      cl.ch = &ch;
      size_t raw = tail < in.len ? tail : in.len;
      size_t plain = in.len - raw, half = plain / 2, done = 0;
      while (done < plain && !cl.dead && fz_conn()) {
        size_t k = fz_chunk_len(&ch, plain - done);
        if (done < half && done + k >= half && (f2 & 2)) {
          if (SSL_version(cl.ssl) == TLS1_3_VERSION) SSL_key_update(cl.ssl, SSL_KEY_UPDATE_REQUESTED);
          else SSL_renegotiate(cl.ssl);
        }
        if (SSL_write(cl.ssl, in.p + done, (int)k) <= 0) {
          ERR_clear_error();
          break;
        }
        done += k;
        client_flush(&cl);
        client_take(&cl);
      }
      if (f2 & 1) {
        SSL_shutdown(cl.ssl);
        client_flush(&cl);
      }
      if (!cl.dead && raw) fz_feed_chunked(in.p + plain, raw, &ch);
      client_take(&cl);
    }
    ERR_clear_error();
    SSL_free(cl.ssl);
  }
  if (f2 & 4) fz_fire_timer();
  if (f2 & 8) fz_drain();
  if (f0 & 8) fz_client_eof();
  fz_close();
  ERR_clear_error();
  return 0;
}
