/* The Redis broker: topics, ids, history and presence shared by every
 * herald process that uses the same Redis and prefix.
 *
 * Keys (prefix "herald:" by default):
 *   <prefix>epoch       the id epoch; a new one when Redis lost its data
 *   <prefix>seq         the last message's sequence, across all topics
 *   <prefix>h:<topic>   the topic's history: a stream of entries "<seq>-0"
 *                       with fields e (event), d (data), t (ms), p (the
 *                       topic's previous sequence: how gaps are found)
 *   <prefix>last:<topic> the topic's newest sequence
 * and the pub/sub channel <prefix>ch:<topic>. One script publishes: it
 * assigns the id, appends to the stream (bounded by count) and publishes. */
#ifndef HERALD_BROKER_REDIS_H
#define HERALD_BROKER_REDIS_H

#include "broker.h"
#include "redis.h"
#include "runtime.h"

typedef struct redis_broker_options {
  const char *url;
  const char *prefix;
  redis_tls_options_t tls;
  uint64_t topic_ttl_ms;   /* how long a quiet topic's history and last id stay */
  unsigned max_pending;    /* publishes waiting for Redis's answer */
} redis_broker_options_t;

/* Starts connecting; NULL and err when the options are wrong. */
broker_t *redis_broker_new(runtime_t *rt, hub_t *hub, const redis_broker_options_t *o, char *err,
                           size_t errlen);
void redis_broker_free(broker_t *b);

/* Whether it is connected; *why is the last failure's text ("" if none). */
int redis_broker_up(broker_t *b, const char **why);
/* A command on the broker's connection (presence lives in Lua); -1 when
 * Redis is unreachable. */
int redis_broker_command(broker_t *b, int argc, const char **argv, const size_t *lens,
                         redis_reply_fn fn, void *ud);
/* The prefix every key and channel starts with. */
const char *redis_broker_prefix(broker_t *b);

#endif
