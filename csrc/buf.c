#include "buf.h"

#include <stdlib.h>
#include <string.h>

hbuf_t *hbuf_new(size_t len) {
  hbuf_t *b = malloc(sizeof *b + len);
  if (!b) return NULL;
  b->refs = 1;
  b->len = len;
  return b;
}

hbuf_t *hbuf_copy(const void *bytes, size_t len) {
  hbuf_t *b = hbuf_new(len);
  if (b && len) memcpy(b->data, bytes, len);
  return b;
}

void hbuf_unref(hbuf_t *b) {
  if (b && --b->refs == 0) free(b);
}

int hstr_append(hstr_t *s, const void *bytes, size_t len) {
  if (len > s->cap - s->len) {
    size_t cap = s->cap ? s->cap : 256;
    while (cap - s->len < len) {
      if (cap > (size_t)-1 / 2) return -1;
      cap *= 2;
    }
    char *p = realloc(s->data, cap);
    if (!p) return -1;
    s->data = p;
    s->cap = cap;
  }
  if (len) memcpy(s->data + s->len, bytes, len);
  s->len += len;
  return 0;
}

void hstr_free(hstr_t *s) {
  free(s->data);
  s->data = NULL;
  s->len = s->cap = 0;
}

hbuf_t *hstr_freeze(hstr_t *s) {
  hbuf_t *b = hbuf_copy(s->data, s->len);
  hstr_free(s);
  return b;
}
