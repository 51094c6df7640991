#include "buf.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

/* Giving memory back after a spike. Output chunks are most of what a
 * server allocates for a while and then frees (a burst of big answers to
 * peers that vanish, a backlog for slow readers); glibc's malloc keeps what
 * was freed in its free lists, so without this the RSS stays at the spike's
 * height (the chaos spec saw 200 MB kept for 2 MB in use). So: when the
 * bytes held in chunks have fallen by TRIM_STEP or more from their
 * high-water mark, to half of it or less, malloc_trim returns the free
 * pages, and the mark restarts from there (a spike going away is trimmed at
 * its half, quarter, ... until less than TRIM_STEP is left). Each trim
 * follows TRIM_STEP freed at least, which amortizes its cost (a walk over
 * the heap); steady traffic, whose chunks stay about as many, never
 * triggers one. The counters are the process's, as its malloc heap is:
 * atomic, since Lua states on other threads may have runtimes of their own. */
#define TRIM_STEP ((size_t)2 << 20)
static atomic_size_t chunk_bytes, chunk_high;

hbuf_t *hbuf_new(size_t len) {
  hbuf_t *b = malloc(sizeof *b + len);
  if (!b) return NULL;
  b->refs = 1;
  b->len = len;
  size_t now = atomic_fetch_add_explicit(&chunk_bytes, len, memory_order_relaxed) + len;
  if (now > atomic_load_explicit(&chunk_high, memory_order_relaxed))
    atomic_store_explicit(&chunk_high, now, memory_order_relaxed);
  return b;
}

static void chunk_freed(size_t len) {
  size_t now = atomic_fetch_sub_explicit(&chunk_bytes, len, memory_order_relaxed) - len;
  size_t high = atomic_load_explicit(&chunk_high, memory_order_relaxed);
  if (high - now >= TRIM_STEP && now <= high / 2) {
    atomic_store_explicit(&chunk_high, now, memory_order_relaxed);
#ifdef __GLIBC__
    malloc_trim(0);
#endif
  }
}

hbuf_t *hbuf_copy(const void *bytes, size_t len) {
  hbuf_t *b = hbuf_new(len);
  if (b && len) memcpy(b->data, bytes, len);
  return b;
}

void hbuf_unref(hbuf_t *b) {
  if (b && --b->refs == 0) {
    size_t len = b->len;
    free(b);
    chunk_freed(len);
  }
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
