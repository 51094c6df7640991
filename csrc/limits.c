#include "limits.h"

#include <stdlib.h>
#include <string.h>

#define WINDOW_MS 1000

struct ip_entry {
  ip_entry_t *next_in_bucket;
  ip_entry_t *prev_idle, *next_idle;
  uint32_t hash;
  uint32_t conns;
  uint32_t opened;          /* in the window starting at window_ms */
  uint64_t window_ms;
  uint8_t len;              /* 4 or 16 */
  uint8_t addr[16];
  uint8_t idle;
};

/* The address bytes (IPv4-mapped IPv6 counts as IPv4: one client, one entry). */
static size_t key_of(const struct sockaddr_storage *a, const uint8_t **key) {
  if (a->ss_family == AF_INET) {
    *key = (const uint8_t *)&((const struct sockaddr_in *)a)->sin_addr;
    return 4;
  }
  const uint8_t *b = (const uint8_t *)&((const struct sockaddr_in6 *)a)->sin6_addr;
  static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (memcmp(b, mapped, 12) == 0) {
    *key = b + 12;
    return 4;
  }
  *key = b;
  return 16;
}

int ip_is_loopback(const struct sockaddr_storage *a) {
  const uint8_t *k;
  size_t len = key_of(a, &k);
  if (len == 4) return k[0] == 127;
  static const uint8_t one[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  return memcmp(k, one, 16) == 0;
}

static uint32_t hash_key(const uint8_t *k, size_t len) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < len; i++) h = (h ^ k[i]) * 16777619u;
  return h;
}

static void unlink_idle(ip_table_t *t, ip_entry_t *e) {
  if (!e->idle) return;
  if (e->prev_idle) e->prev_idle->next_idle = e->next_idle;
  else t->idle_head = e->next_idle;
  if (e->next_idle) e->next_idle->prev_idle = e->prev_idle;
  else t->idle_tail = e->prev_idle;
  e->prev_idle = e->next_idle = NULL;
  e->idle = 0;
}

static void remove_entry(ip_table_t *t, ip_entry_t *e) {
  unlink_idle(t, e);
  ip_entry_t **p = &t->buckets[e->hash & (t->nbuckets - 1)];
  while (*p != e) p = &(*p)->next_in_bucket;
  *p = e->next_in_bucket;
  t->count--;
  free(e);
}

/* Idle entries whose window is over say nothing any more: they go, oldest
 * first (the idle list is in the order they became idle). */
static void expire_idle(ip_table_t *t, uint64_t now) {
  while (t->idle_head && now - t->idle_head->window_ms >= WINDOW_MS) remove_entry(t, t->idle_head);
}

static int grow(ip_table_t *t) {
  unsigned n = t->nbuckets ? t->nbuckets * 2 : 256;
  ip_entry_t **b = calloc(n, sizeof *b);
  if (!b) return t->nbuckets ? 0 : -1; /* longer chains, still correct */
  for (unsigned i = 0; i < t->nbuckets; i++)
    for (ip_entry_t *e = t->buckets[i], *next; e; e = next) {
      next = e->next_in_bucket;
      e->next_in_bucket = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
    }
  free(t->buckets);
  t->buckets = b;
  t->nbuckets = n;
  return 0;
}

int ip_admit(ip_table_t *t, const struct sockaddr_storage *addr, uint64_t now, unsigned max_conns,
             unsigned max_rate, ip_entry_t **out) {
  expire_idle(t, now);
  if (t->count >= t->nbuckets && grow(t) != 0) return IP_NOMEM;
  const uint8_t *k;
  size_t len = key_of(addr, &k);
  uint32_t h = hash_key(k, len);
  ip_entry_t *e = t->buckets[h & (t->nbuckets - 1)];
  while (e && !(e->hash == h && e->len == len && memcmp(e->addr, k, len) == 0)) e = e->next_in_bucket;
  if (!e) {
    e = calloc(1, sizeof *e);
    if (!e) return IP_NOMEM;
    e->hash = h;
    e->len = (uint8_t)len;
    memcpy(e->addr, k, len);
    e->window_ms = now;
    e->next_in_bucket = t->buckets[h & (t->nbuckets - 1)];
    t->buckets[h & (t->nbuckets - 1)] = e;
    t->count++;
  }
  if (now - e->window_ms >= WINDOW_MS) {
    e->window_ms = now;
    e->opened = 0;
  }
  int verdict = max_conns && e->conns >= max_conns  ? IP_TOO_MANY
                : max_rate && e->opened >= max_rate ? IP_TOO_FAST
                                                    : IP_OK;
  e->opened++; /* refused attempts count too: a flood stays refused */
  if (verdict != IP_OK) {
    if (e->conns == 0 && !e->idle) { /* a new entry refused: keep it for its window */
      e->idle = 1;
      e->prev_idle = t->idle_tail;
      if (t->idle_tail) t->idle_tail->next_idle = e;
      else t->idle_head = e;
      t->idle_tail = e;
    }
    return verdict;
  }
  unlink_idle(t, e);
  e->conns++;
  *out = e;
  return IP_OK;
}

void ip_release(ip_table_t *t, ip_entry_t *e, uint64_t now) {
  if (--e->conns > 0) return;
  if (now - e->window_ms >= WINDOW_MS) {
    remove_entry(t, e);
    return;
  }
  e->idle = 1;
  e->prev_idle = t->idle_tail;
  e->next_idle = NULL;
  if (t->idle_tail) t->idle_tail->next_idle = e;
  else t->idle_head = e;
  t->idle_tail = e;
}

void ip_table_free(ip_table_t *t) {
  for (unsigned i = 0; i < t->nbuckets; i++)
    for (ip_entry_t *e = t->buckets[i], *next; e; e = next) {
      next = e->next_in_bucket;
      free(e);
    }
  free(t->buckets);
  memset(t, 0, sizeof *t);
}
