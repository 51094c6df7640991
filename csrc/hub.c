#include "hub.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

void hub_format_id(const hub_t *hub, uint64_t seq, char *buf) {
  snprintf(buf, HUB_ID_SIZE, "%08" PRIx32 "-%" PRIu64, hub->epoch, seq);
}

/* The sequence of one of this hub's ids; 0 when the id is not one of ours
 * (another epoch, or not an id at all). */
static uint64_t parse_id(const hub_t *hub, const char *id) {
  char *end;
  if (strlen(id) < 10 || id[8] != '-') return 0;
  unsigned long long epoch = strtoull(id, &end, 16);
  if (end != id + 8 || epoch != hub->epoch) return 0;
  if (id[9] < '0' || id[9] > '9') return 0;
  unsigned long long seq = strtoull(id + 9, &end, 10);
  if (*end || seq > hub->seq) return 0;
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
  if (cfg->history == t->ring_cap) return;
  while (t->len > cfg->history) evict_oldest(t);
  hub_msg_t **ring = NULL;
  if (cfg->history) {
    ring = calloc(cfg->history, sizeof *ring);
    if (!ring) { /* keep the old ring; the count bound applies on the next resize */
      t->cfg.history = t->ring_cap;
      return;
    }
    for (unsigned i = 0; i < t->len; i++) ring[i] = t->ring[(t->head + i) % t->ring_cap];
  }
  free(t->ring);
  t->ring = ring;
  t->ring_cap = cfg->history;
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
  return t;
}

/* A topic with no subscribers and no history costs nothing: its record goes,
 * and the hub remembers only that messages up to evicted_seq are gone. */
static void topic_free_if_idle(hub_topic_t *t) {
  if (t->nsubs || t->len || t->publishing) return;
  hub_t *hub = t->hub;
  uint64_t *slot = forgotten_slot(hub, t->hash);
  if (t->evicted_seq > *slot) *slot = t->evicted_seq;
  hub_topic_t **p = &hub->buckets[t->hash & (hub->nbuckets - 1)];
  while (*p != t) p = &(*p)->next_in_bucket;
  *p = t->next_in_bucket;
  hub->ntopics--;
  free(t->ring);
  free(t);
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

static void free_held(hub_member_t *m) {
  for (unsigned i = 0; i < m->nheld; i++) {
    hub_msg_unref(m->held[i].msg);
    hbuf_unref(m->held[i].direct);
  }
  free(m->held);
  m->held = NULL;
  m->nheld = m->held_cap = 0;
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
          free_held(&c->member);
          c->member.hub = NULL;
        }
      }
      while (t->len) evict_oldest(t);
      free(t->ring);
      free(t);
    }
  free(hub->buckets);
  uv_close((uv_handle_t *)&hub->sweeper, on_hub_timer_closed);
}

/* ---- members ---- */

static int hold(hub_member_t *m, hub_msg_t *msg, hbuf_t *direct) {
  if (m->nheld == m->held_cap) {
    unsigned cap = m->held_cap ? m->held_cap * 2 : 8;
    hub_held_t *h = realloc(m->held, cap * sizeof *h);
    if (!h) return -1;
    m->held = h;
    m->held_cap = cap;
  }
  if (msg) msg->refs++;
  if (direct) hbuf_ref(direct);
  m->held[m->nheld++] = (hub_held_t){msg, direct};
  return 0;
}

/* A conn whose transport does not take deliveries yet is still opening. */
static int is_open(const conn_t *c) {
  return c->proto && c->proto->deliver != NULL;
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
  free_held(m);
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
  for (hub_sub_t *s = c->member.subs; s && !c->closing; s = s->next_in_conn) {
    if (!s->conflated || (c->backed_up && c->queued_bytes >= hub->max_queued)) continue;
    hub_msg_t *msg = s->conflated;
    s->conflated = NULL;
    c->member.nconflated--;
    c->proto->deliver(c, msg);
    hub->stats.delivered++;
    hub_msg_unref(msg);
  }
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
  t->publishing++;
  for (hub_sub_t *s = t->subs, *next; s; s = next) {
    next = s->next_in_topic; /* a slow conn's close unlinks s, only s */
    deliver(hub, s, msg);
    (*reached)++;
  }
  t->publishing--;
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

int hub_member_start(conn_t *c, const char *last_id, hub_gap_fn gap) {
  hub_member_t *m = &c->member;
  hub_t *hub = m->hub;
  hub_member_t held = *m; /* taken over: a close on the way frees only what is ours */
  m->held = NULL;
  m->nheld = m->held_cap = 0;
  replay_t r = {0};
  int rc = 0;
  if (hub && last_id) {
    /* "": all the history holds, asked for by the app; no gap to report */
    int everything = last_id[0] == '\0';
    uint64_t since = everything ? 0 : parse_id(hub, last_id);
    int unknown = since == 0 && !everything; /* another epoch: whatever it saw is gone */
    uint64_t now = uv_now(hub->loop);
    for (hub_sub_t *s = m->subs; s && !c->closing; s = s->next_in_conn) {
      hub_topic_t *t = s->topic;
      expire(t, now);
      if (unknown || (!everything && lost_since(hub, t, NULL, 0, since))) gap(c, t);
      for (unsigned i = 0; i < t->len && rc == 0; i++) {
        hub_msg_t *msg = t->ring[(t->head + i) % t->ring_cap];
        if (msg->seq > since) rc = replay_add(&r, msg);
      }
    }
  }
  for (unsigned i = 0; i < held.nheld && rc == 0; i++)
    if (held.held[i].msg) rc = replay_add(&r, held.held[i].msg);
  if (r.n > 1) qsort(r.msgs, r.n, sizeof *r.msgs, by_seq);
  for (size_t i = 0; i < r.n; i++) {
    if (!c->closing && rc == 0 && (i == 0 || r.msgs[i]->seq != r.msgs[i - 1]->seq)) {
      c->proto->deliver(c, r.msgs[i]);
      if (hub) hub->stats.delivered++;
    }
    hub_msg_unref(r.msgs[i]);
  }
  for (unsigned i = 0; i < held.nheld && !c->closing && rc == 0; i++)
    if (held.held[i].direct) conn_send(c, held.held[i].direct);
  free(r.msgs);
  free_held(&held);
  return rc;
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
