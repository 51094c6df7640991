/* broker: what the hub asks of a distributed engine that shares topics,
 * message ids and history between herald processes (Redis today; NATS or
 * another would implement the same operations). Without one, the hub is its
 * own in-process engine: ids, history rings and fan-out in memory.
 *
 * With a broker the hub keeps no history of its own: a publish goes to the
 * engine, which assigns the id, keeps the history and hands the message to
 * every node watching the topic (this one too) through hub_broker_message;
 * the hub then fans it out to its local subscribers as it does its own. */
#ifndef HERALD_BROKER_H
#define HERALD_BROKER_H

#include <stddef.h>
#include <stdint.h>

#include "hub.h"

typedef struct broker broker_t;
typedef struct broker_ops broker_ops_t;

/* Where a history read starts: all of it (asked for by the app), after an
 * id, or after an id the engine cannot place (lost: all of it, and a gap). */
typedef enum { FETCH_ALL, FETCH_AFTER, FETCH_UNKNOWN } broker_since_t;

/* One topic of a history read, filled by the broker. */
typedef struct broker_fetch_topic {
  char *name;
  size_t len;
  hub_topic_config_t cfg; /* how much history this node asks for */
  hub_msg_t **msgs;       /* oldest first; the fetch owns a reference to each */
  size_t n;
  int lost;               /* messages after since are gone */
  uint64_t last;          /* the topic's newest sequence, kept or not */
} broker_fetch_topic_t;

typedef struct broker_fetch broker_fetch_t;
struct broker_fetch {
  broker_since_t since;
  uint32_t since_epoch;   /* FETCH_AFTER: the id's epoch and sequence */
  uint64_t since_seq;
  broker_fetch_topic_t *topics;
  size_t ntopics;
  uint32_t epoch;         /* the engine's epoch: the messages' ids are in it */
  const char *error;      /* set when the read failed (a static text) */
  unsigned outstanding;   /* the broker's own count of replies to come */
  void (*done)(broker_fetch_t *f); /* called once, then the caller frees f */
  void *ud;
};

typedef void (*broker_published_fn)(void *ud, const char *err, uint32_t epoch, uint64_t seq);

struct broker_ops {
  const char *name;
  /* Whether publishes and reads go through now. */
  int (*ready)(broker_t *b);
  /* Sends a message; done gets its id, or why it was not published (then no
   * node got it). Returns -1 (done not called) when the engine cannot take
   * it now. */
  int (*publish)(broker_t *b, const char *topic, size_t len, const hub_topic_config_t *cfg,
                 const char *event, const char *data, size_t data_len, broker_published_fn done,
                 void *ud);
  /* This node has subscribers on topic from now on / no longer. The broker
   * calls hub_broker_watching once the engine delivers the topic's messages. */
  int (*watch)(broker_t *b, const char *topic, size_t len);
  void (*unwatch)(broker_t *b, const char *topic, size_t len);
  /* Reads history; f->done is called (perhaps before this returns). */
  void (*fetch)(broker_t *b, broker_fetch_t *f);
};

struct broker {
  const broker_ops_t *ops;
  hub_t *hub;
};

/* ---- what a broker calls ---- */

/* The engine is connected (again) with this epoch: every topic is watched
 * anew and caught up from history past the last message delivered. */
void hub_broker_connected(hub_t *hub, uint32_t epoch);
/* The engine is unreachable: publishes fail until hub_broker_connected. */
void hub_broker_lost(hub_t *hub);
/* The engine confirmed it delivers topic's messages to this node now. */
void hub_broker_watching(hub_t *hub, const char *topic, size_t len);
/* A message of a topic this node watches. The hub takes msg's reference. */
void hub_broker_message(hub_t *hub, hub_msg_t *msg, uint32_t epoch);

/* A message made by the engine (seq is its id's sequence); NULL on ENOMEM. */
hub_msg_t *hub_msg_make(const char *topic, size_t topic_len, uint64_t seq, uint64_t time_ms,
                        const char *event, size_t event_len, const char *data, size_t data_len);

/* Parses "<epoch>-<seq>" (canonical only); 0 on success. */
int hub_parse_id(const char *id, uint32_t *epoch, uint64_t *seq);

void broker_fetch_free(broker_fetch_t *f);

#endif
