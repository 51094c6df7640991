/* hub: topics, their subscribers and histories, and message ids. It knows
 * nothing of sockets or wire formats beyond handing each message to the
 * transport of each subscribed conn (conn_proto_t.deliver), once per
 * subscriber, with no copy and no Lua. */
#ifndef HERALD_HUB_H
#define HERALD_HUB_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "buf.h"

typedef struct conn conn_t;
typedef struct hub hub_t;
typedef struct broker broker_t;
typedef struct broker_fetch broker_fetch_t;
typedef struct hub_topic hub_topic_t;

#define HUB_FORGOTTEN_SLOTS 4096
/* Live messages a topic keeps while it catches up on a broker's history. */
#define HUB_MAX_PENDING 65536

/* Longest topic name and event name accepted. */
#define HUB_MAX_TOPIC 1024
#define HUB_MAX_EVENT 256

/* A published message: immutable, refcounted, shared by the topic's history
 * and every queue that holds one of its encodings. */
typedef struct hub_msg {
  unsigned refs;
  uint64_t seq;
  uint64_t time_ms;     /* loop time of the publish: history's max_age */
  /* Each wire format is encoded at the message's first delivery in that
   * format, then shared: SSE event, WebSocket frame of the payload, and
   * WebSocket frame of the envelope (topic, id, event, data). */
  hbuf_t *sse, *ws_raw, *ws_envelope;
  const char *topic;    /* the topic's name (a copy owned by the message) */
  size_t topic_len;
  char *event;          /* NULL, or the event name */
  size_t data_len;
  char data[];          /* data_len bytes and a NUL */
} hub_msg_t;

/* A conn's subscription to one topic. */
typedef struct hub_sub {
  hub_topic_t *topic;
  conn_t *conn;
  struct hub_sub *prev_in_topic, *next_in_topic;
  struct hub_sub *prev_in_conn, *next_in_conn;
  hub_msg_t *conflated; /* the newest message held back from a slow conn */
} hub_sub_t;

/* What a message's delivery to one conn waits in before the conn's stream
 * has started: a hub message, or bytes for that conn alone. */
typedef struct hub_held {
  hub_msg_t *msg;
  hbuf_t *direct;
} hub_held_t;

/* What a conn's stream needs only while it opens: made when the first
 * delivery is held (or a resume waits for the broker), gone when the stream
 * starts, so that an open conn keeps only its hub_member_t. */
typedef struct hub_opening {
  hub_held_t *held;     /* deliveries while the stream is being opened */
  unsigned nheld, held_cap;
  /* With a broker, a resuming stream waits for its history: */
  unsigned awaiting : 1;   /* deliveries are held until it arrives */
  unsigned since_all : 1;  /* all the history holds, or after since_epoch-since_seq */
  uint32_t since_epoch;
  uint64_t since_seq;
  broker_fetch_t *fetch;   /* the read under way */
} hub_opening_t;

/* The hub's part of a conn (in every conn: 32 bytes). */
typedef struct hub_member {
  hub_t *hub;
  hub_sub_t *subs;
  unsigned nsubs;
  unsigned nconflated;  /* subscriptions holding a conflated message */
  hub_opening_t *opening; /* NULL once open, or while nothing is held */
} hub_member_t;

typedef struct hub_topic_config {
  unsigned history;     /* messages kept for resume */
  uint64_t max_age_ms;  /* and none older than this; 0: no age bound */
  int conflate;         /* slow conns keep only the newest message, not closed */
} hub_topic_config_t;

typedef struct hub_stats {
  uint64_t published, delivered, conflated;
  unsigned topics;
} hub_stats_t;

struct hub {
  uv_loop_t *loop;
  uv_timer_t sweeper;   /* expires history by age, frees idle topics */
  uint32_t epoch;       /* changes whenever history is lost: each new hub */
  uint64_t seq;         /* the last message id's sequence */
  /* Newest message of a topic whose record is gone (or never was), per slot
   * of the name's hash: a resume on such a topic reports a gap when it may
   * have missed one; names sharing a slot can only cause a needless gap. */
  uint64_t forgotten[HUB_FORGOTTEN_SLOTS];
  hub_topic_t **buckets;
  unsigned nbuckets, ntopics;
  unsigned nsubs;       /* subscriptions, all topics */
  unsigned max_subscriptions; /* per conn */
  size_t max_queued;    /* per conn: bytes queued past which a conn is slow */
  hub_stats_t stats;
  broker_t *broker;     /* NULL: the hub is its own engine */
  int broker_up;        /* the broker is connected */
  int epoch_known;      /* epoch is the broker's (not the hub's own first one) */
  unsigned walking;     /* inside a walk over every topic: none is freed meanwhile */
};

hub_t *hub_new(uv_loop_t *loop);
/* Detaches every conn and frees the hub (once its timer has closed). */
void hub_free(hub_t *hub);

/* Publishes to topic; returns the message's sequence (0 on ENOMEM) and
 * sets *reached to the number of subscribers it went to. */
uint64_t hub_publish(hub_t *hub, const char *topic, size_t topic_len,
                     const hub_topic_config_t *cfg, const char *event, const char *data,
                     size_t data_len, unsigned *reached);

/* 0 on success, or an error text. */
const char *hub_subscribe(hub_t *hub, conn_t *c, const char *topic, size_t topic_len,
                          const hub_topic_config_t *cfg);
int hub_unsubscribe(hub_t *hub, conn_t *c, const char *topic, size_t topic_len);
/* Leaves every topic and drops held deliveries: the conn is going. */
void hub_member_release(conn_t *c);

/* Direct bytes for one conn: queued, or held while its stream opens. */
int hub_member_send(conn_t *c, hbuf_t *b);

/* Starts a conn's stream: answers what it missed since last_id (NULL: no
 * resume; "": everything in history, no gap) on every topic it joined,
 * merged in id order with the deliveries held while it opened, then the
 * held direct sends. The transport's gap() is called first for each topic
 * where messages were lost. With a broker the history is read from it, and
 * the stream starts when it arrives. */
int hub_member_start(conn_t *c, const char *last_id);

/* A slow conn drained below its bound: send what conflation held back. */
void hub_member_catch_up(conn_t *c);

const char *hub_topic_name(const hub_topic_t *t, size_t *len);
hub_topic_t *hub_find(hub_t *hub, const char *topic, size_t topic_len);
unsigned hub_topic_subscribers(const hub_topic_t *t);
const hub_sub_t *hub_topic_first_sub(const hub_topic_t *t);

/* Calls fn for each message of topic's history newer than since_id (NULL:
 * all), oldest first. Returns 1 when messages after since_id were lost. */
int hub_history(hub_t *hub, const char *topic, size_t topic_len, const char *since_id,
                void (*fn)(const hub_msg_t *m, void *ud), void *ud);

/* "<epoch>-<seq>": buf needs HUB_ID_SIZE bytes. */
#define HUB_ID_SIZE 32
void hub_format_id(const hub_t *hub, uint64_t seq, char *buf);

void hub_msg_unref(hub_msg_t *m);

#endif
