/* buf: refcounted immutable byte chunks.
 * A chunk is written once when it is made and then only read, so one publish
 * can sit in many connections' out queues without a copy per subscriber. */
#ifndef HERALD_BUF_H
#define HERALD_BUF_H

#include <stddef.h>

typedef struct hbuf {
  unsigned refs;
  size_t len;
  char data[];
} hbuf_t;

/* A chunk of len bytes with one reference; NULL when memory is out.
 * The caller fills data before sharing it. */
hbuf_t *hbuf_new(size_t len);
hbuf_t *hbuf_copy(const void *bytes, size_t len);

static inline hbuf_t *hbuf_ref(hbuf_t *b) {
  b->refs++;
  return b;
}

void hbuf_unref(hbuf_t *b);

/* A growable byte string for building messages before they are frozen. */
typedef struct hstr {
  char *data;
  size_t len, cap;
} hstr_t;

int hstr_append(hstr_t *s, const void *bytes, size_t len); /* 0 or -1 (ENOMEM) */
void hstr_free(hstr_t *s);
/* Freezes s into a chunk (one copy) and empties s; NULL on ENOMEM. */
hbuf_t *hstr_freeze(hstr_t *s);

#endif
