/* limits: what one client address may take. A table of the addresses with
 * open connections (or one opened in the last second): how many each holds
 * and how many it opened in the current second. */
#ifndef HERALD_LIMITS_H
#define HERALD_LIMITS_H

#include <stdint.h>
#include <uv.h>

typedef struct ip_entry ip_entry_t;

typedef struct ip_table {
  ip_entry_t **buckets;
  unsigned nbuckets, count;
  ip_entry_t *idle_head, *idle_tail; /* no connection open: kept for the rate window */
} ip_table_t;

enum { IP_OK = 0, IP_TOO_MANY, IP_TOO_FAST, IP_NOMEM };

/* Counts a new connection from addr; on IP_OK *entry is its address's entry,
 * to give back with ip_release. max_conns, max_rate: 0 = no limit. */
int ip_admit(ip_table_t *t, const struct sockaddr_storage *addr, uint64_t now_ms,
             unsigned max_conns, unsigned max_rate, ip_entry_t **entry);
void ip_release(ip_table_t *t, ip_entry_t *e, uint64_t now_ms);
void ip_table_free(ip_table_t *t);

/* Whether addr is a loopback address (trusted: a local proxy's connections). */
int ip_is_loopback(const struct sockaddr_storage *addr);

#endif
