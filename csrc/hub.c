#include "hub.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "conn.h"
#include "server.h"

#define SWEEP_MS 1000

struct hub_topic {
  hub_t *hub;
  hub_topic_t *next_in_bucket;
  uint32_t hash;
  hub_topic_config_t cfg;
  hub_sub_t *subs;
  unsigned nsubs;
  unsigned publishing;  /* inside a fan-out: must not be freed */
  hub_msg_t **ring;     /* history, oldest at ring[head] */
  unsigned ring_cap, head, len;
  uint64_t evicted_seq; /* newest message of this topic no longer in its history */
  /* With a broker: */
  uint64_t last_seq;    /* the newest message delivered here */
  /* The topic's newest message when this node first watched it: where a
   * catch-up starts if none came since. Not a bound on live delivery: a
   * message published after the SUBSCRIBE may be read after this answer. */
  uint64_t sync_seq;
  unsigned watching : 1;    /* the engine delivers this topic's messages to us */
  unsigned catching_up : 1; /* reading what was missed while it did not */
  unsigned fetching : 1;
  unsigned synced : 1;      /* knows the topic's newest message as of its first watch */
  hub_msg_t **pending;  /* live messages that came during the catch-up */
  unsigned npending, pending_cap;
  size_t name_len;
  char name[];
};

/* ---- messages ---- */

void hub_msg_unref(hub_msg_t *m) {
  if (!m || --m->refs > 0) return;
  hbuf_unref(m->sse);
  hbuf_unref(m->ws_raw);
  hbuf_unref(m->ws_envelope);
  free(m->event);
  free(m);
}

static hub_msg_t *msg_new(hub_t *hub, const char *topic, size_t topic_len, const char *event,
                          const char *data, size_t len) {
  hub_msg_t *m = malloc(sizeof *m + len + 1 + topic_len + 1);
  if (!m) return NULL;
  m->refs = 1;
  m->seq = ++hub->seq;
  m->time_ms = uv_now(hub->loop);
  m->sse = m->ws_raw = m->ws_envelope = NULL;
  m->event = event ? strdup(event) : NULL;
  if (event && !m->event) {
    free(m);
    return NULL;
  }
  m->data_len = len;
  if (len) memcpy(m->data, data, len);
  m->data[len] = '\0';
  char *name = m->data + len + 1;
  memcpy(name, topic, topic_len);
  name[topic_len] = '\0';
  m->topic = name;
  m->topic_len = topic_len;
  return m;
}

hub_msg_t *hub_msg_make(const char *topic, size_t topic_len, uint64_t seq, uint64_t time_ms,
                        const char *event, size_t event_len, const char *data, size_t data_len) {
  hub_msg_t *m = malloc(sizeof *m + data_len + 1 + topic_len + 1);
  if (!m) return NULL;
  *m = (hub_msg_t){.refs = 1, .seq = seq, .time_ms = time_ms, .topic_len = topic_len,
                   .data_len = data_len};
  if (event && !(m->event = malloc(event_len + 1))) {
    free(m);
    return NULL;
  }
  if (event) {
    memcpy(m->event, event, event_len);
    m->event[event_len] = '\0';
  }
  if (data_len) memcpy(m->data, data, data_len);
  m->data[data_len] = '\0';
  char *name = m->data + data_len + 1;
  memcpy(name, topic, topic_len);
  name[topic_len] = '\0';
  m->topic = name;
  return m;
}

void hub_format_id(const hub_t *hub, uint64_t seq, char *buf) {
  snprintf(buf, HUB_ID_SIZE, "%08" PRIx32 "-%" PRIu64, hub->epoch, seq);
}

int hub_parse_id(const char *id, uint32_t *epoch, uint64_t *seq) {
  uint32_t e = 0;
  for (int i = 0; i < 8; i++) {
    char ch = id[i];
    if (ch >= '0' && ch <= '9') e = e << 4 | (uint32_t)(ch - '0');
    else if (ch >= 'a' && ch <= 'f') e = e << 4 | (uint32_t)(ch - 'a' + 10);
    else return -1;
  }
  const char *p = id + 9;
  if (id[8] != '-' || *p < '1' || *p > '9') return -1; /* canonical: no sign, no leading 0 */
  uint64_t n = 0;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (n > (UINT64_MAX - (uint64_t)(*p - '0')) / 10) return -1;
    n = n * 10 + (uint64_t)(*p - '0');
  }
  if (*p) return -1;
  *epoch = e;
  *seq = n;
  return 0;
}

/* The sequence of one of this hub's ids; 0 when the id is not one of ours
 * (another epoch, or not an id at all). */
static uint64_t parse_id(const hub_t *hub, const char *id) {
  uint32_t epoch;
  uint64_t seq;
  if (hub_parse_id(id, &epoch, &seq) != 0 || epoch != hub->epoch || seq > hub->seq) return 0;
  return seq;
}

/* ---- topics ---- */

static uint32_t hash_name(const char *s, size_t len) {
  uint32_t h = 2166136261u; /* FNV-1a */
  for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
  return h;
}

static uint64_t *forgotten_slot(hub_t *hub, uint32_t hash) {
  return &hub->forgotten[hash % HUB_FORGOTTEN_SLOTS];
}

hub_topic_t *hub_find(hub_t *hub, const char *name, size_t len) {
  uint32_t h = hash_name(name, len);
  for (hub_topic_t *t = hub->buckets[h & (hub->nbuckets - 1)]; t; t = t->next_in_bucket)
    if (t->hash == h && t->name_len == len && memcmp(t->name, name, len) == 0) return t;
  return NULL;
}

static void grow_buckets(hub_t *hub) {
  unsigned n = hub->nbuckets * 2;
  hub_topic_t **b = calloc(n, sizeof *b);
  if (!b) return; /* longer chains, still correct */
  for (unsigned i = 0; i < hub->nbuckets; i++)
    for (hub_topic_t *t = hub->buckets[i], *next; t; t = next) {
      next = t->next_in_bucket;
      t->next_in_bucket = b[t->hash & (n - 1)];
      b[t->hash & (n - 1)] = t;
    }
  free(hub->buckets);
  hub->buckets = b;
  hub->nbuckets = n;
}

/* Resizes the history ring to cfg's count, dropping the oldest if smaller. */
static void evict_oldest(hub_topic_t *t) {
  hub_msg_t *m = t->ring[t->head];
  if (m->seq > t->evicted_seq) t->evicted_seq = m->seq;
  hub_msg_unref(m);
  t->ring[t->head] = NULL;
  t->head = (t->head + 1) % t->ring_cap;
  t->len--;
}

static void apply_config(hub_topic_t *t, const hub_topic_config_t *cfg) {
  t->cfg = *cfg;
  unsigned history = t->hub->broker ? 0 : cfg->history; /* a broker keeps it */
  if (history == t->ring_cap) return;
  while (t->len > history) evict_oldest(t);
  hub_msg_t **ring = NULL;
  if (history) {
    ring = calloc(history, sizeof *ring);
    if (!ring) { /* keep the old ring; the count bound applies on the next resize */
      t->cfg.history = t->ring_cap;
      return;
    }
    for (unsigned i = 0; i < t->len; i++) ring[i] = t->ring[(t->head + i) % t->ring_cap];
  }
  free(t->ring);
  t->ring = ring;
  t->ring_cap = history;
  t->head = 0;
}

static hub_topic_t *topic_get(hub_t *hub, const char *name, size_t len,
                              const hub_topic_config_t *cfg) {
  hub_topic_t *t = hub_find(hub, name, len);
  if (t) {
    apply_config(t, cfg);
    return t;
  }
  t = calloc(1, sizeof *t + len + 1);
  if (!t) return NULL;
  t->hub = hub;
  t->hash = hash_name(name, len);
  t->name_len = len;
  memcpy(t->name, name, len);
  /* Messages of this name published before it had a record may be lost. */
  t->evicted_seq = *forgotten_slot(hub, t->hash);
  apply_config(t, cfg);
  if (hub->ntopics >= hub->nbuckets) grow_buckets(hub);
  hub_topic_t **b = &hub->buckets[t->hash & (hub->nbuckets - 1)];
  t->next_in_bucket = *b;
  *b = t;
  hub->ntopics++;
  if (hub->broker && hub->broker_up) hub->broker->ops->watch(hub->broker, name, len);
  return t;
}

static void drop_pending(hub_topic_t *t) {
  for (unsigned i = 0; i < t->npending; i++) hub_msg_unref(t->pending[i]);
  free(t->pending);
  t->pending = NULL;
  t->npending = t->pending_cap = 0;
}

static void topic_destroy(hub_topic_t *t) {
  drop_pending(t);
  free(t->ring);
  free(t);
}

/* A topic with no subscribers and no history costs nothing: its record goes,
 * and the hub remembers only that messages up to evicted_seq are gone. */
static void topic_free_if_idle(hub_topic_t *t) {
  hub_t *hub = t->hub;
  if (t->nsubs || t->len || t->publishing || hub->walking) return; /* the sweeper comes back */
  uint64_t *slot = forgotten_slot(hub, t->hash);
  if (t->evicted_seq > *slot) *slot = t->evicted_seq;
  hub_topic_t **p = &hub->buckets[t->hash & (hub->nbuckets - 1)];
  while (*p != t) p = &(*p)->next_in_bucket;
  *p = t->next_in_bucket;
  hub->ntopics--;
  if (hub->broker && hub->broker_up) hub->broker->ops->unwatch(hub->broker, t->name, t->name_len);
  topic_destroy(t);
}

static void expire(hub_topic_t *t, uint64_t now) {
  if (!t->cfg.max_age_ms) return;
  while (t->len && now - t->ring[t->head]->time_ms > t->cfg.max_age_ms) evict_oldest(t);
}

static void on_sweep(uv_timer_t *timer) {
  hub_t *hub = timer->data;
  uint64_t now = uv_now(hub->loop);
  for (unsigned i = 0; i < hub->nbuckets; i++)
    for (hub_topic_t *t = hub->buckets[i], *next; t; t = next) {
      next = t->next_in_bucket;
      expire(t, now);
      topic_free_if_idle(t);
    }
}

const char *hub_topic_name(const hub_topic_t *t, size_t *len) {
  *len = t->name_len;
  return t->name;
}

unsigned hub_topic_subscribers(const hub_topic_t *t) {
  return t->nsubs;
}

const hub_sub_t *hub_topic_first_sub(const hub_topic_t *t) {
  return t->subs;
}

/* ---- the hub ---- */

hub_t *hub_new(uv_loop_t *loop) {
  hub_t *hub = calloc(1, sizeof *hub);
  if (!hub) return NULL;
  hub->nbuckets = 64;
  hub->buckets = calloc(hub->nbuckets, sizeof *hub->buckets);
  if (!hub->buckets) {
    free(hub);
    return NULL;
  }
  hub->loop = loop;
  /* Ids from an earlier hub must not be mistaken for ours. */
  hub->epoch = (uint32_t)(time(NULL) ^ (uv_hrtime() << 8) ^ ((uint64_t)getpid() << 16));
  hub->max_subscriptions = 100;
  hub->max_queued = 1 << 20;
  uv_timer_init(loop, &hub->sweeper);
  hub->sweeper.data = hub;
  uv_timer_start(&hub->sweeper, on_sweep, SWEEP_MS, SWEEP_MS);
  uv_unref((uv_handle_t *)&hub->sweeper);
  return hub;
}

static void unlink_sub(hub_sub_t *s) {
  hub_topic_t *t = s->topic;
  hub_member_t *m = &s->conn->member;
  if (s->prev_in_topic) s->prev_in_topic->next_in_topic = s->next_in_topic;
  else t->subs = s->next_in_topic;
  if (s->next_in_topic) s->next_in_topic->prev_in_topic = s->prev_in_topic;
  if (s->prev_in_conn) s->prev_in_conn->next_in_conn = s->next_in_conn;
  else m->subs = s->next_in_conn;
  if (s->next_in_conn) s->next_in_conn->prev_in_conn = s->prev_in_conn;
  t->nsubs--;
  m->nsubs--;
  t->hub->nsubs--;
  if (s->conflated) m->nconflated--;
  hub_msg_unref(s->conflated);
  free(s);
}

/* Frees an opening's held deliveries and the opening. */
static void free_opening(hub_opening_t *o) {
  if (!o) return;
  for (unsigned i = 0; i < o->nheld; i++) {
    hub_msg_unref(o->held[i].msg);
    hbuf_unref(o->held[i].direct);
  }
  free(o->held);
  free(o);
}

/* The conn goes, or its hub: what it held is dropped, its history read forgotten. */
static void release_opening(hub_member_t *m) {
  hub_opening_t *o = m->opening;
  if (o && o->fetch) o->fetch->ud = NULL; /* the broker's reply finds nobody */
  m->opening = NULL;
  free_opening(o);
}

/* The member's opening state, made on first use; NULL on ENOMEM. */
static hub_opening_t *opening_of(hub_member_t *m) {
  if (!m->opening) m->opening = calloc(1, sizeof *m->opening);
  return m->opening;
}

static void on_hub_timer_closed(uv_handle_t *h) {
  free(h->data);
}

void hub_free(hub_t *hub) {
  for (unsigned i = 0; i < hub->nbuckets; i++)
    for (hub_topic_t *t = hub->buckets[i], *next; t; t = next) {
      next = t->next_in_bucket;
      while (t->subs) {
        conn_t *c = t->subs->conn;
        unlink_sub(t->subs);
        if (!c->member.subs) {
          release_opening(&c->member);
          c->member.hub = NULL;
        }
      }
      while (t->len) evict_oldest(t);
      topic_destroy(t);
    }
  if (hub->broker) hub->broker->hub = NULL;
  free(hub->buckets);
  uv_close((uv_handle_t *)&hub->sweeper, on_hub_timer_closed);
}

/* ---- members ---- */

static int hold(hub_member_t *m, hub_msg_t *msg, hbuf_t *direct) {
  hub_opening_t *o = opening_of(m);
  if (!o) return -1;
  if (o->nheld == o->held_cap) {
    unsigned cap = o->held_cap ? o->held_cap * 2 : 8;
    hub_held_t *h = realloc(o->held, cap * sizeof *h);
    if (!h) return -1;
    o->held = h;
    o->held_cap = cap;
  }
  if (msg) msg->refs++;
  if (direct) hbuf_ref(direct);
  o->held[o->nheld++] = (hub_held_t){msg, direct};
  return 0;
}

/* A conn whose transport does not take deliveries yet is still opening;
 * one waiting for its history from the broker too. */
static int is_open(const conn_t *c) {
  return c->proto && c->proto->deliver != NULL &&
         !(c->member.opening && c->member.opening->awaiting);
}

int hub_member_send(conn_t *c, hbuf_t *b) {
  if (is_open(c) && c->backed_up && c->queued_bytes >= c->server->limits.max_queued) {
    c->server->stats.slow_closed++;
    conn_close(c); /* a peer that does not read gets no more */
    return -1;
  }
  if (is_open(c)) return conn_send(c, b);
  return hold(&c->member, NULL, b);
}

const char *hub_subscribe(hub_t *hub, conn_t *c, const char *name, size_t len,
                          const hub_topic_config_t *cfg) {
  if (c->closing || c->ending) return "connection closed";
  if (c->member.hub && c->member.hub != hub) return "connection belongs to another app";
  for (hub_sub_t *s = c->member.subs; s; s = s->next_in_conn)
    if (s->topic->name_len == len && memcmp(s->topic->name, name, len) == 0) return NULL;
  if (c->member.nsubs >= hub->max_subscriptions) return "too many subscriptions";
  hub_topic_t *t = topic_get(hub, name, len, cfg);
  hub_sub_t *s = t ? calloc(1, sizeof *s) : NULL;
  if (!s) {
    if (t) topic_free_if_idle(t);
    return "out of memory";
  }
  s->topic = t;
  s->conn = c;
  s->next_in_topic = t->subs;
  if (t->subs) t->subs->prev_in_topic = s;
  t->subs = s;
  t->nsubs++;
  hub->nsubs++;
  s->next_in_conn = c->member.subs;
  if (c->member.subs) c->member.subs->prev_in_conn = s;
  c->member.subs = s;
  c->member.nsubs++;
  c->member.hub = hub;
  return NULL;
}

int hub_unsubscribe(hub_t *hub, conn_t *c, const char *name, size_t len) {
  if (c->member.hub != hub) return 0;
  for (hub_sub_t *s = c->member.subs; s; s = s->next_in_conn)
    if (s->topic->name_len == len && memcmp(s->topic->name, name, len) == 0) {
      hub_topic_t *t = s->topic;
      unlink_sub(s);
      topic_free_if_idle(t);
      return 1;
    }
  return 0;
}

void hub_member_release(conn_t *c) {
  hub_member_t *m = &c->member;
  while (m->subs) {
    hub_topic_t *t = m->subs->topic;
    unlink_sub(m->subs);
    topic_free_if_idle(t);
  }
  release_opening(m);
  m->hub = NULL;
}

/* One message to one subscriber, through the slow-consumer bound. */
static void deliver(hub_t *hub, hub_sub_t *s, hub_msg_t *msg) {
  conn_t *c = s->conn;
  if (c->closing || c->ending) return;
  if (!is_open(c)) {
    if (hold(&c->member, msg, NULL) != 0) conn_close(c);
    return;
  }
  /* Slow is what the peer leaves unread, not a burst queued in this turn. */
  if (s->conflated || (c->backed_up && c->queued_bytes >= hub->max_queued)) {
    if (s->topic->cfg.conflate) {
      if (s->conflated) hub->stats.conflated++;
      else c->member.nconflated++;
      hub_msg_unref(s->conflated);
      msg->refs++;
      s->conflated = msg;
      return;
    }
    /* Closing loses nothing: the client resumes from history. */
    c->server->stats.slow_closed++;
    conn_close(c);
    return;
  }
  c->proto->deliver(c, msg);
  hub->stats.delivered++;
}

void hub_member_catch_up(conn_t *c) {
  hub_t *hub = c->member.hub;
  if (!hub || !c->member.nconflated || !is_open(c)) return; /* called after every write */
  /* A delivery may write at once and fail: the close frees every sub of c. */
  for (hub_sub_t *s = c->member.subs, *next; s && !c->closing; s = next) {
    next = s->next_in_conn;
    if (!s->conflated || (c->backed_up && c->queued_bytes >= hub->max_queued)) continue;
    hub_msg_t *msg = s->conflated;
    s->conflated = NULL;
    c->member.nconflated--;
    c->proto->deliver(c, msg);
    hub->stats.delivered++;
    hub_msg_unref(msg);
  }
}

/* msg to every subscriber of t; returns how many. t stays (free it after). */
static unsigned fan_out(hub_t *hub, hub_topic_t *t, hub_msg_t *msg) {
  unsigned reached = 0;
  t->publishing++;
  for (hub_sub_t *s = t->subs, *next; s; s = next) {
    next = s->next_in_topic; /* a slow conn's close unlinks s, only s */
    deliver(hub, s, msg);
    reached++;
  }
  t->publishing--;
  return reached;
}

uint64_t hub_publish(hub_t *hub, const char *name, size_t len, const hub_topic_config_t *cfg,
                     const char *event, const char *data, size_t data_len, unsigned *reached) {
  *reached = 0;
  hub_topic_t *t = hub_find(hub, name, len);
  if (!t && cfg->history) t = topic_get(hub, name, len, cfg);
  else if (t) apply_config(t, cfg);
  hub_msg_t *msg = msg_new(hub, name, len, event, data, data_len);
  if (!msg) return 0;
  uint64_t seq = msg->seq;
  hub->stats.published++;
  if (!t) { /* nobody to tell, nothing to keep */
    *forgotten_slot(hub, hash_name(name, len)) = seq;
    hub_msg_unref(msg);
    return seq;
  }
  expire(t, msg->time_ms);
  if (t->ring_cap) {
    if (t->len == t->ring_cap) evict_oldest(t);
    msg->refs++;
    t->ring[(t->head + t->len) % t->ring_cap] = msg;
    t->len++;
  } else {
    t->evicted_seq = msg->seq;
  }
  *reached = fan_out(hub, t, msg);
  topic_free_if_idle(t);
  hub_msg_unref(msg); /* the history's reference, if any, keeps it */
  return seq;
}

/* ---- resume ---- */

typedef struct replay {
  hub_msg_t **msgs;
  size_t n, cap;
} replay_t;

static int replay_add(replay_t *r, hub_msg_t *m) {
  if (r->n == r->cap) {
    size_t cap = r->cap ? r->cap * 2 : 16;
    hub_msg_t **p = realloc(r->msgs, cap * sizeof *p);
    if (!p) return -1;
    r->msgs = p;
    r->cap = cap;
  }
  m->refs++; /* a close during the replay must not free what is left */
  r->msgs[r->n++] = m;
  return 0;
}

static int by_seq(const void *a, const void *b) {
  uint64_t x = (*(hub_msg_t *const *)a)->seq, y = (*(hub_msg_t *const *)b)->seq;
  return x < y ? -1 : x > y;
}

/* Whether topic t (NULL: no record of name) lost messages newer than since. */
static int lost_since(hub_t *hub, const hub_topic_t *t, const char *name, size_t len,
                      uint64_t since) {
  return (t ? t->evicted_seq : *forgotten_slot(hub, hash_name(name, len))) > since;
}

/* Delivers the replay in r and what was held while the stream opened, in
 * id order and once each, then the held direct sends: the stream is open. */
static int start_with(conn_t *c, replay_t *r) {
  hub_member_t *m = &c->member;
  hub_t *hub = m->hub;
  /* taken over: the stream is open, and a close on the way frees only what is ours */
  hub_opening_t none = {0}, *held = m->opening ? m->opening : &none;
  m->opening = NULL;
  int rc = 0;
  for (unsigned i = 0; i < held->nheld && rc == 0; i++)
    if (held->held[i].msg) rc = replay_add(r, held->held[i].msg);
  if (r->n > 1) qsort(r->msgs, r->n, sizeof *r->msgs, by_seq);
  uint64_t delivered = 0; /* the previous seq: each message once */
  for (size_t i = 0; i < r->n; i++) {
    if (!c->closing && rc == 0 && (i == 0 || r->msgs[i]->seq != delivered)) {
      delivered = r->msgs[i]->seq;
      c->proto->deliver(c, r->msgs[i]);
      if (hub) hub->stats.delivered++;
    }
    hub_msg_unref(r->msgs[i]);
  }
  for (unsigned i = 0; i < held->nheld && !c->closing && rc == 0; i++)
    if (held->held[i].direct) conn_send(c, held->held[i].direct);
  free(r->msgs);
  if (held != &none) free_opening(held);
  return rc;
}

static void gap(conn_t *c, const hub_topic_t *t) {
  if (!c->closing && c->proto->gap) c->proto->gap(c, t->name, t->name_len);
}

static void member_fetch(conn_t *c);

int hub_member_start(conn_t *c, const char *last_id) {
  hub_member_t *m = &c->member;
  hub_t *hub = m->hub;
  replay_t r = {0};
  if (hub && last_id && hub->broker) {
    hub_opening_t *o = opening_of(m);
    if (!o) return -1;
    o->awaiting = 1;
    o->since_all = last_id[0] == '\0';
    if (!o->since_all && hub_parse_id(last_id, &o->since_epoch, &o->since_seq) != 0)
      o->since_seq = 0; /* not an id: treated as one from another epoch */
    member_fetch(c);
    return 0;
  }
  if (hub && last_id) {
    /* "": all the history holds, asked for by the app; no gap to report */
    int everything = last_id[0] == '\0';
    uint64_t since = everything ? 0 : parse_id(hub, last_id);
    int unknown = since == 0 && !everything; /* another epoch: whatever it saw is gone */
    uint64_t now = uv_now(hub->loop);
    for (hub_sub_t *s = m->subs, *next; s && !c->closing; s = next) {
      next = s->next_in_conn; /* a failed gap closes c, which frees s */
      hub_topic_t *t = s->topic;
      expire(t, now);
      if (unknown || (!everything && lost_since(hub, t, NULL, 0, since))) gap(c, t);
      for (unsigned i = 0; i < t->len; i++) {
        hub_msg_t *msg = t->ring[(t->head + i) % t->ring_cap];
        if (msg->seq > since && replay_add(&r, msg) != 0) {
          for (size_t k = 0; k < r.n; k++) hub_msg_unref(r.msgs[k]);
          free(r.msgs);
          return -1; /* out of memory: the caller closes c */
        }
      }
    }
  }
  return start_with(c, &r);
}

/* ---- with a broker ---- */

void broker_fetch_free(broker_fetch_t *f) {
  if (!f) return;
  for (size_t i = 0; i < f->ntopics; i++) {
    for (size_t k = 0; k < f->topics[i].n; k++) hub_msg_unref(f->topics[i].msgs[k]);
    free(f->topics[i].msgs);
    free(f->topics[i].name);
  }
  free(f->topics);
  free(f);
}

static broker_fetch_t *fetch_new(size_t ntopics) {
  broker_fetch_t *f = calloc(1, sizeof *f);
  if (f && ntopics && !(f->topics = calloc(ntopics, sizeof *f->topics))) {
    free(f);
    return NULL;
  }
  return f;
}

static int fetch_add_topic(broker_fetch_t *f, const hub_topic_t *t) {
  broker_fetch_topic_t *ft = &f->topics[f->ntopics];
  if (!(ft->name = malloc(t->name_len + 1))) return -1;
  memcpy(ft->name, t->name, t->name_len + 1);
  ft->len = t->name_len;
  ft->cfg = t->cfg;
  f->ntopics++;
  return 0;
}

static void member_fetched(broker_fetch_t *f) {
  conn_t *c = f->ud;
  if (!c) return broker_fetch_free(f); /* the conn went meanwhile */
  hub_member_t *m = &c->member;
  hub_opening_t *o = m->opening; /* the fetch's: a conn that goes forgets it first */
  o->fetch = NULL;
  if (f->error && !m->hub->broker_up) return broker_fetch_free(f); /* again once it is back */
  o->awaiting = 0;
  if (f->error) runtime_log(c->rt, "broker: reading history for a resume failed: %s", f->error);
  replay_t r = {0};
  int rc = 0;
  for (size_t i = 0; i < f->ntopics && !c->closing; i++) {
    broker_fetch_topic_t *ft = &f->topics[i];
    if ((f->error || ft->lost) && !o->since_all && c->proto->gap) c->proto->gap(c, ft->name, ft->len);
    for (size_t k = 0; k < ft->n && rc == 0; k++) rc = replay_add(&r, ft->msgs[k]);
  }
  broker_fetch_free(f);
  if (start_with(c, &r) != 0 || rc != 0) conn_close(c);
}

/* Asks the broker for a resuming conn's history once every topic it joined
 * is watched: a message published after the read is then sure to come live. */
static void member_fetch(conn_t *c) {
  hub_member_t *m = &c->member;
  hub_opening_t *o = m->opening;
  hub_t *hub = m->hub;
  if (!o || !o->awaiting || o->fetch || !hub->broker_up || c->closing) return;
  size_t n = 0;
  for (hub_sub_t *s = m->subs; s; s = s->next_in_conn, n++)
    if (!s->topic->watching) return;
  broker_fetch_t *f = fetch_new(n);
  for (hub_sub_t *s = m->subs; f && s; s = s->next_in_conn)
    if (fetch_add_topic(f, s->topic) != 0) {
      broker_fetch_free(f);
      f = NULL;
    }
  if (!f) return conn_close(c);
  f->since = o->since_all ? FETCH_ALL : o->since_seq ? FETCH_AFTER : FETCH_UNKNOWN;
  f->since_epoch = o->since_epoch;
  f->since_seq = o->since_seq;
  f->done = member_fetched;
  f->ud = c;
  o->fetch = f;
  hub->broker->ops->fetch(hub->broker, f);
}

static void gap_all(hub_topic_t *t) {
  t->publishing++;
  for (hub_sub_t *s = t->subs, *next; s; s = next) {
    next = s->next_in_topic;
    if (is_open(s->conn)) gap(s->conn, t);
  }
  t->publishing--;
}

/* Delivers live messages of t newer than the last one delivered. */
static void deliver_newer(hub_t *hub, hub_topic_t *t, hub_msg_t *msg) {
  if (msg->seq <= t->last_seq) return;
  t->last_seq = msg->seq;
  fan_out(hub, t, msg);
}

static void topic_fetched(broker_fetch_t *f) {
  hub_t *hub = f->ud;
  hub_topic_t *t = hub ? hub_find(hub, f->topics[0].name, f->topics[0].len) : NULL;
  if (!t || !t->fetching) return broker_fetch_free(f);
  t->fetching = 0;
  if (f->error && !hub->broker_up) return broker_fetch_free(f);
  replay_t r = {0};
  int rc = 0;
  for (size_t k = 0; k < f->topics[0].n && rc == 0; k++) rc = replay_add(&r, f->topics[0].msgs[k]);
  for (unsigned i = 0; i < t->npending && rc == 0; i++) rc = replay_add(&r, t->pending[i]);
  int lost = f->error || f->topics[0].lost || rc;
  broker_fetch_free(f);
  drop_pending(t);
  t->catching_up = 0;
  t->publishing++;
  if (lost) gap_all(t);
  if (r.n > 1) qsort(r.msgs, r.n, sizeof *r.msgs, by_seq);
  for (size_t i = 0; i < r.n; i++) {
    deliver_newer(hub, t, r.msgs[i]);
    hub_msg_unref(r.msgs[i]);
  }
  free(r.msgs);
  t->publishing--;
  topic_free_if_idle(t);
}

/* A topic newly watched learns where it stands: its newest message so far,
 * the point a later catch-up starts from. */
static void topic_synced(broker_fetch_t *f) {
  hub_t *hub = f->ud;
  hub_topic_t *t = hub ? hub_find(hub, f->topics[0].name, f->topics[0].len) : NULL;
  if (t && t->fetching) {
    t->fetching = 0;
    if (!f->error && f->epoch == hub->epoch) t->sync_seq = f->topics[0].last;
    else if (f->error && hub->broker_up) t->synced = 0; /* tried again at the next watch */
  }
  broker_fetch_free(f);
}

/* Reads what t missed while it was not watched; or, the first time it is
 * watched, only where it stands. */
static void topic_fetch(hub_t *hub, hub_topic_t *t) {
  int sync = !t->synced;
  if ((!t->catching_up && !sync) || t->fetching || !t->watching || !hub->broker_up) return;
  broker_fetch_t *f = fetch_new(1);
  if (!f || fetch_add_topic(f, t) != 0) {
    broker_fetch_free(f);
    return;
  }
  if (sync) f->topics[0].cfg.history = 0;
  f->since = FETCH_AFTER;
  f->since_epoch = hub->epoch;
  f->since_seq = t->last_seq > t->sync_seq ? t->last_seq : t->sync_seq;
  f->done = sync ? topic_synced : topic_fetched;
  f->ud = hub;
  t->fetching = 1;
  t->synced = 1;
  hub->broker->ops->fetch(hub->broker, f);
}

/* The engine's messages now have another epoch: its history was lost.
 * Every topic that had messages tells its subscribers. */
static void adopt_epoch(hub_t *hub, uint32_t epoch) {
  if (epoch == hub->epoch) return;
  int first = !hub->epoch_known; /* this hub's own epoch was never the engine's */
  hub->epoch = epoch;
  hub->epoch_known = 1;
  if (first) return;
  hub->walking++; /* a gap that closes a conn must not free the topics walked */
  for (unsigned i = 0; i < hub->nbuckets; i++)
    for (hub_topic_t *t = hub->buckets[i]; t; t = t->next_in_bucket) {
      /* what the new epoch has had so far was missed: read it all */
      if (t->last_seq || t->synced) gap_all(t);
      t->last_seq = t->sync_seq = 0;
      t->synced = 1;
      t->catching_up = 1;
      drop_pending(t);
      topic_fetch(hub, t);
    }
  hub->walking--;
}

void hub_broker_connected(hub_t *hub, uint32_t epoch) {
  hub->broker_up = 1;
  adopt_epoch(hub, epoch);
  for (unsigned i = 0; i < hub->nbuckets; i++)
    for (hub_topic_t *t = hub->buckets[i]; t; t = t->next_in_bucket) {
      t->watching = 0;
      if (t->synced) t->catching_up = 1; /* what came while it was not watched */
      hub->broker->ops->watch(hub->broker, t->name, t->name_len);
    }
}

void hub_broker_lost(hub_t *hub) {
  hub->broker_up = 0;
  for (unsigned i = 0; i < hub->nbuckets; i++)
    for (hub_topic_t *t = hub->buckets[i]; t; t = t->next_in_bucket) t->watching = 0;
}

void hub_broker_watching(hub_t *hub, const char *name, size_t len) {
  hub_topic_t *t = hub_find(hub, name, len);
  if (!t || t->watching) return;
  t->watching = 1;
  topic_fetch(hub, t);
  t->publishing++;
  for (hub_sub_t *s = t->subs, *next; s; s = next) {
    next = s->next_in_topic;
    member_fetch(s->conn);
  }
  t->publishing--;
  topic_free_if_idle(t);
}

void hub_broker_message(hub_t *hub, hub_msg_t *msg, uint32_t epoch) {
  adopt_epoch(hub, epoch);
  hub_topic_t *t = hub_find(hub, msg->topic, msg->topic_len);
  if (t && t->catching_up) {
    if (t->npending == t->pending_cap) {
      unsigned cap = t->pending_cap ? t->pending_cap * 2 : 16;
      hub_msg_t **p = cap <= HUB_MAX_PENDING ? realloc(t->pending, cap * sizeof *p) : NULL;
      if (!p) { /* too much while catching up: the subscribers hear of a gap */
        hub_msg_unref(msg);
        drop_pending(t);
        t->catching_up = 0;
        gap_all(t);
        return;
      }
      t->pending = p;
      t->pending_cap = cap;
    }
    t->pending[t->npending++] = msg;
    return;
  }
  if (t) {
    deliver_newer(hub, t, msg);
    topic_free_if_idle(t);
  }
  hub_msg_unref(msg);
}

int hub_history(hub_t *hub, const char *name, size_t len, const char *since_id,
                void (*fn)(const hub_msg_t *m, void *ud), void *ud) {
  hub_topic_t *t = hub_find(hub, name, len);
  uint64_t since = since_id ? parse_id(hub, since_id) : 0;
  if (t) {
    expire(t, uv_now(hub->loop));
    for (unsigned i = 0; i < t->len; i++) {
      hub_msg_t *msg = t->ring[(t->head + i) % t->ring_cap];
      if (msg->seq > since) fn(msg, ud);
    }
  }
  if (!since_id) return 0;
  return since == 0 || lost_since(hub, t, name, len, since);
}
