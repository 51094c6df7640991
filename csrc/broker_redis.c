#include "broker_redis.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* KEYS: seq, epoch, stream, last, channel.
 * ARGV: a new epoch (used when Redis has none), event, data, history count,
 * how long the stream and last id stay (ms), max age (ms, 0: none).
 * Entries older than max age go at the next publishes, a few at a time (the
 * read filters them too); the count bound is MAXLEN's. */
static const char PUBLISH_SCRIPT[] =
    "local epoch = redis.call('GET', KEYS[2])\n"
    "if not epoch then epoch = ARGV[1]; redis.call('SET', KEYS[2], epoch) end\n"
    "local seq = redis.call('INCR', KEYS[1])\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local prev = redis.call('GET', KEYS[4]) or '0'\n"
    "redis.call('SET', KEYS[4], seq, 'PX', ARGV[5])\n"
    "if tonumber(ARGV[4]) > 0 then\n"
    "  local max_age = tonumber(ARGV[6])\n"
    "  if max_age > 0 then\n"
    "    local keep\n"
    "    for _, e in ipairs(redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 16)) do\n"
    "      if now - tonumber(e[2][6]) <= max_age then break end\n"
    "      keep = (tonumber(string.match(e[1], '^%d+')) + 1) .. '-0'\n"
    "    end\n"
    "    if keep then redis.call('XTRIM', KEYS[3], 'MINID', keep) end\n"
    "  end\n"
    "  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], seq .. '-0',\n"
    "             'e', ARGV[2], 'd', ARGV[3], 't', now, 'p', prev)\n"
    "  redis.call('PEXPIRE', KEYS[3], ARGV[5])\n"
    "end\n"
    "redis.call('PUBLISH', KEYS[5], epoch .. '\\n' .. seq .. '\\n' .. now .. '\\n' .. ARGV[2] .. "
    "'\\n' .. ARGV[3])\n"
    "return {epoch, seq}\n";

/* KEYS: stream, last, epoch. ARGV: after|all|unknown, since epoch, since
 * sequence, count. The newest count entries after since, newest first. */
static const char FETCH_SCRIPT[] =
    "local epoch = redis.call('GET', KEYS[3]) or ''\n"
    "local last = tonumber(redis.call('GET', KEYS[2]) or '0')\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local known = ARGV[1] == 'after' and ARGV[2] == epoch\n"
    "local from = known and ('(' .. ARGV[3] .. '-0') or '-'\n"
    "local entries = {}\n"
    "if tonumber(ARGV[4]) > 0 then\n"
    "  entries = redis.call('XREVRANGE', KEYS[1], '+', from, 'COUNT', ARGV[4])\n"
    "end\n"
    "return {epoch, last, now, known and 1 or 0, entries}\n";

typedef struct redis_broker {
  broker_t base;
  runtime_t *rt;
  redis_conn_t *cmd, *sub;  /* commands; pub/sub (a connection in push mode) */
  char *prefix;
  size_t prefix_len;
  int cmd_ready, sub_ready, connected;
  uint32_t epoch;
  char publish_sha[41], fetch_sha[41];
  uint64_t topic_ttl_ms;
  unsigned pending, max_pending;
  char why[256];            /* the last failure */
  runtime_fork_hook_t fork_hook;
} redis_broker_t;

/* ---- keys ---- */

typedef struct key {
  char *s;
  size_t len;
} key_t_;

/* prefix + part + topic; freed by the caller. */
static int make_key(const redis_broker_t *rb, const char *part, const char *topic, size_t len,
                    key_t_ *k) {
  size_t plen = strlen(part);
  k->len = rb->prefix_len + plen + len;
  if (!(k->s = malloc(k->len + 1))) return -1;
  memcpy(k->s, rb->prefix, rb->prefix_len);
  memcpy(k->s + rb->prefix_len, part, plen);
  memcpy(k->s + rb->prefix_len + plen, topic, len);
  k->s[k->len] = '\0';
  return 0;
}

static int parse_hex32(const char *s, size_t len, uint32_t *out) {
  if (len != 8) return -1;
  uint32_t v = 0;
  for (size_t i = 0; i < 8; i++) {
    char c = s[i];
    if (c >= '0' && c <= '9') v = v << 4 | (uint32_t)(c - '0');
    else if (c >= 'a' && c <= 'f') v = v << 4 | (uint32_t)(c - 'a' + 10);
    else return -1;
  }
  *out = v;
  return 0;
}

/* A decimal number at *p (up to end); advances *p past it. */
static int parse_u64(const char **p, const char *end, uint64_t *out) {
  const char *s = *p;
  uint64_t v = 0;
  if (s == end || *s < '0' || *s > '9') return -1;
  for (; s < end && *s >= '0' && *s <= '9'; s++) {
    if (v > (UINT64_MAX - 9) / 10) return -1;
    v = v * 10 + (uint64_t)(*s - '0');
  }
  *p = s;
  *out = v;
  return 0;
}

static uint64_t reply_u64(const redisReply *r) {
  if (r->type == REDIS_REPLY_INTEGER) return r->integer < 0 ? 0 : (uint64_t)r->integer;
  if (r->type == REDIS_REPLY_STRING) {
    const char *p = r->str;
    uint64_t v;
    if (parse_u64(&p, r->str + r->len, &v) == 0) return v;
  }
  return 0;
}

/* ---- connection state ---- */

static void set_why(redis_broker_t *rb, const char *why) {
  if (strcmp(rb->why, why) != 0) runtime_log(rb->rt, "broker: Redis: %s", why);
  snprintf(rb->why, sizeof rb->why, "%s", why);
}

static void check_connected(redis_broker_t *rb) {
  if (rb->connected || !rb->cmd_ready || !rb->sub_ready) return;
  rb->connected = 1;
  if (rb->why[0]) runtime_log(rb->rt, "broker: Redis: connected again");
  rb->why[0] = '\0';
  if (rb->base.hub) hub_broker_connected(rb->base.hub, rb->epoch);
}

static void on_lost(redis_conn_t *r, const char *why, void *ud) {
  redis_broker_t *rb = ud;
  if (r == rb->cmd) rb->cmd_ready = 0;
  else rb->sub_ready = 0;
  set_why(rb, why);
  if (!rb->connected) return;
  rb->connected = 0;
  if (rb->base.hub) hub_broker_lost(rb->base.hub);
}

static void setup_failed(redis_broker_t *rb, const char *what, const char *err) {
  char why[256];
  snprintf(why, sizeof why, "%s: %s", what, err ? err : "unexpected reply");
  set_why(rb, why);
}

static void on_sha(redis_broker_t *rb, char *sha, redisReply *reply, const char *err) {
  if (!reply) return; /* the connection went: said by on_lost */
  if (err || reply->type != REDIS_REPLY_STRING || reply->len != 40)
    return setup_failed(rb, "SCRIPT LOAD", err);
  memcpy(sha, reply->str, 41);
}

static void on_publish_sha(void *ud, redisReply *reply, const char *err) {
  redis_broker_t *rb = ud;
  on_sha(rb, rb->publish_sha, reply, err);
}

static void on_fetch_sha(void *ud, redisReply *reply, const char *err) {
  redis_broker_t *rb = ud;
  on_sha(rb, rb->fetch_sha, reply, err);
}

static void on_epoch(void *ud, redisReply *reply, const char *err) {
  redis_broker_t *rb = ud;
  if (!reply) return;
  if (err || reply->type != REDIS_REPLY_STRING || parse_hex32(reply->str, reply->len, &rb->epoch) != 0)
    return setup_failed(rb, "reading the epoch", err);
  if (!rb->publish_sha[0] || !rb->fetch_sha[0]) return; /* a script failed to load: said already */
  rb->cmd_ready = 1;
  check_connected(rb);
}

static void load_scripts(redis_broker_t *rb) {
  const char *pub[] = {"SCRIPT", "LOAD", PUBLISH_SCRIPT}, *fetch[] = {"SCRIPT", "LOAD", FETCH_SCRIPT};
  redis_command(rb->cmd, 3, pub, NULL, on_publish_sha, rb);
  redis_command(rb->cmd, 3, fetch, NULL, on_fetch_sha, rb);
}

static void new_epoch(char out[9]) {
  uint64_t x = uv_hrtime() ^ ((uint64_t)time(NULL) << 20) ^ ((uint64_t)getpid() << 40);
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  snprintf(out, 9, "%08" PRIx32, (uint32_t)x);
}

/* Scripts loaded, then the epoch (made here when Redis has none). */
static void on_cmd_ready(redis_conn_t *r, void *ud) {
  redis_broker_t *rb = ud;
  (void)r;
  rb->publish_sha[0] = rb->fetch_sha[0] = '\0';
  load_scripts(rb);
  char epoch[9];
  new_epoch(epoch);
  key_t_ k;
  if (make_key(rb, "epoch", "", 0, &k) != 0) return;
  const char *set[] = {"SET", k.s, epoch, "NX"}, *get[] = {"GET", k.s};
  redis_command(rb->cmd, 4, set, NULL, NULL, NULL);
  redis_command(rb->cmd, 2, get, NULL, on_epoch, rb);
  free(k.s);
}

static void on_sub_ready(redis_conn_t *r, void *ud) {
  redis_broker_t *rb = ud;
  redis_push_mode(r, 1);
  rb->sub_ready = 1;
  check_connected(rb);
}

/* ---- messages from pub/sub ---- */

/* "<epoch>\n<seq>\n<ms>\n<event>\n<data>" on channel <prefix>ch:<topic> */
static void on_message(redis_broker_t *rb, const redisReply *channel, const redisReply *payload) {
  size_t skip = rb->prefix_len + 3;
  if (channel->type != REDIS_REPLY_STRING || payload->type != REDIS_REPLY_STRING ||
      channel->len <= skip)
    return;
  const char *p = payload->str, *end = p + payload->len;
  uint32_t epoch;
  uint64_t seq, ms;
  if (payload->len < 9 || parse_hex32(p, 8, &epoch) != 0 || p[8] != '\n') return;
  p += 9;
  if (parse_u64(&p, end, &seq) != 0 || p == end || *p++ != '\n') return;
  if (parse_u64(&p, end, &ms) != 0 || p == end || *p++ != '\n') return;
  const char *event = p, *nl = memchr(p, '\n', (size_t)(end - p));
  if (!nl) return;
  hub_msg_t *m = hub_msg_make(channel->str + skip, channel->len - skip, seq, ms,
                              nl == event ? NULL : event, (size_t)(nl - event), nl + 1,
                              (size_t)(end - nl - 1));
  if (!m) return; /* out of memory: the subscribers miss it */
  hub_broker_message(rb->base.hub, m, epoch);
}

static void on_push(redis_conn_t *r, redisReply *reply, void *ud) {
  redis_broker_t *rb = ud;
  (void)r;
  if (!rb->base.hub || reply->type != REDIS_REPLY_ARRAY || reply->elements != 3) return;
  const redisReply *kind = reply->element[0], *channel = reply->element[1];
  if (kind->type != REDIS_REPLY_STRING || channel->type != REDIS_REPLY_STRING) return;
  if (strcmp(kind->str, "message") == 0) return on_message(rb, channel, reply->element[2]);
  if (strcmp(kind->str, "subscribe") == 0 && channel->len > rb->prefix_len + 3)
    hub_broker_watching(rb->base.hub, channel->str + rb->prefix_len + 3,
                        channel->len - rb->prefix_len - 3);
}

/* ---- the broker's operations ---- */

static int op_ready(broker_t *b) {
  return ((redis_broker_t *)b)->connected;
}

typedef struct publish_call {
  redis_broker_t *rb;
  broker_published_fn done;
  void *ud;
} publish_call_t;

static void on_published(void *ud, redisReply *reply, const char *err) {
  publish_call_t *call = ud;
  redis_broker_t *rb = call->rb;
  rb->pending--;
  uint32_t epoch = 0;
  uint64_t seq = 0;
  if (!err && (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
               reply->element[0]->type != REDIS_REPLY_STRING ||
               parse_hex32(reply->element[0]->str, reply->element[0]->len, &epoch) != 0 ||
               !(seq = reply_u64(reply->element[1]))))
    err = "unexpected reply from the publish script";
  if (err && strncmp(err, "NOSCRIPT", 8) == 0 && redis_ready(rb->cmd)) load_scripts(rb);
  call->done(call->ud, err, epoch, seq);
  free(call);
}

static int op_publish(broker_t *b, const char *topic, size_t len, const hub_topic_config_t *cfg,
                      const char *event, const char *data, size_t data_len, broker_published_fn done,
                      void *ud) {
  redis_broker_t *rb = (redis_broker_t *)b;
  if (!rb->connected || rb->pending >= rb->max_pending) return -1;
  key_t_ seq = {0}, epoch = {0}, stream = {0}, last = {0}, channel = {0};
  publish_call_t *call = malloc(sizeof *call);
  int rc = -1;
  if (!call || make_key(rb, "seq", "", 0, &seq) || make_key(rb, "epoch", "", 0, &epoch) ||
      make_key(rb, "h:", topic, len, &stream) || make_key(rb, "last:", topic, len, &last) ||
      make_key(rb, "ch:", topic, len, &channel))
    goto out;
  char fresh[9], history[16], ttl[24], max_age[24];
  new_epoch(fresh);
  snprintf(history, sizeof history, "%u", cfg->history);
  uint64_t keep = cfg->max_age_ms > rb->topic_ttl_ms ? cfg->max_age_ms : rb->topic_ttl_ms;
  snprintf(ttl, sizeof ttl, "%" PRIu64, keep);
  snprintf(max_age, sizeof max_age, "%" PRIu64, cfg->max_age_ms);
  const char *argv[] = {"EVALSHA", rb->publish_sha, "5", seq.s, epoch.s, stream.s, last.s,
                        channel.s, fresh, event ? event : "", data, history, ttl, max_age};
  size_t lens[] = {7, 40, 1, seq.len, epoch.len, stream.len, last.len, channel.len, 8,
                   event ? strlen(event) : 0, data_len, strlen(history), strlen(ttl), strlen(max_age)};
  *call = (publish_call_t){rb, done, ud};
  rc = redis_command(rb->cmd, 14, argv, lens, on_published, call);
  if (rc == 0) {
    rb->pending++;
    call = NULL;
  }
out:
  free(call);
  free(seq.s), free(epoch.s), free(stream.s), free(last.s), free(channel.s);
  return rc;
}

static int op_watch(broker_t *b, const char *topic, size_t len) {
  redis_broker_t *rb = (redis_broker_t *)b;
  if (!rb->sub_ready) return -1;
  key_t_ channel;
  if (make_key(rb, "ch:", topic, len, &channel) != 0) return -1;
  const char *argv[] = {"SUBSCRIBE", channel.s};
  size_t lens[] = {9, channel.len};
  int rc = redis_command(rb->sub, 2, argv, lens, NULL, NULL);
  free(channel.s);
  return rc;
}

static void op_unwatch(broker_t *b, const char *topic, size_t len) {
  redis_broker_t *rb = (redis_broker_t *)b;
  if (!rb->sub_ready) return;
  key_t_ channel;
  if (make_key(rb, "ch:", topic, len, &channel) != 0) return;
  const char *argv[] = {"UNSUBSCRIBE", channel.s};
  size_t lens[] = {11, channel.len};
  redis_command(rb->sub, 2, argv, lens, NULL, NULL);
  free(channel.s);
}

typedef struct fetch_call fetch_call_t;
typedef struct fetch_part {
  fetch_call_t *call;
  size_t topic;
} fetch_part_t;

struct fetch_call {
  broker_fetch_t *f;
  size_t left;
  fetch_part_t parts[];
};

static void fetch_part_done(fetch_call_t *call) {
  if (--call->left) return;
  broker_fetch_t *f = call->f;
  free(call);
  f->done(f);
}

/* One entry of XREVRANGE: ["<seq>-0", [field, value, ...]]. */
static hub_msg_t *entry_message(const broker_fetch_topic_t *ft, const redisReply *e, uint64_t *time_ms,
                                uint64_t *prev) {
  if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING ||
      e->element[1]->type != REDIS_REPLY_ARRAY)
    return NULL;
  const char *p = e->element[0]->str;
  uint64_t seq;
  if (parse_u64(&p, p + e->element[0]->len, &seq) != 0) return NULL;
  const redisReply *fields = e->element[1];
  const redisReply *event = NULL, *data = NULL;
  *time_ms = *prev = 0;
  for (size_t i = 0; i + 1 < fields->elements; i += 2) {
    const redisReply *k = fields->element[i], *v = fields->element[i + 1];
    if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING || k->len != 1) continue;
    if (k->str[0] == 'e') event = v;
    else if (k->str[0] == 'd') data = v;
    else if (k->str[0] == 't') *time_ms = reply_u64(v);
    else if (k->str[0] == 'p') *prev = reply_u64(v);
  }
  if (!data) return NULL;
  return hub_msg_make(ft->name, ft->len, seq, *time_ms, event && event->len ? event->str : NULL,
                      event ? event->len : 0, data->str, data->len);
}

static void on_fetched(void *ud, redisReply *reply, const char *err) {
  fetch_part_t *part = ud;
  broker_fetch_t *f = part->call->f;
  broker_fetch_topic_t *ft = &f->topics[part->topic];
  if (!err && (reply->type != REDIS_REPLY_ARRAY || reply->elements != 5 ||
               reply->element[4]->type != REDIS_REPLY_ARRAY))
    err = "unexpected reply from the history script";
  if (err) {
    f->error = "history read failed";
    return fetch_part_done(part->call);
  }
  const redisReply *epoch = reply->element[0];
  if (epoch->type == REDIS_REPLY_STRING) parse_hex32(epoch->str, epoch->len, &f->epoch);
  uint64_t last = reply_u64(reply->element[1]), now = reply_u64(reply->element[2]);
  int known = reply_u64(reply->element[3]) == 1;
  const redisReply *entries = reply->element[4];
  ft->msgs = entries->elements ? calloc(entries->elements, sizeof *ft->msgs) : NULL;
  uint64_t oldest_prev = last; /* the predecessor of the oldest message kept */
  /* newest first: keep while young enough, then stop */
  size_t kept = 0;
  for (size_t i = 0; ft->msgs && i < entries->elements; i++) {
    uint64_t t, prev;
    hub_msg_t *m = entry_message(ft, entries->element[i], &t, &prev);
    if (!m) continue;
    if (ft->cfg.max_age_ms && now > t && now - t > ft->cfg.max_age_ms) {
      hub_msg_unref(m);
      break;
    }
    ft->msgs[kept++] = m;
    oldest_prev = prev;
  }
  if (entries->elements && !ft->msgs) f->error = "out of memory";
  for (size_t i = 0; i < kept / 2; i++) { /* oldest first */
    hub_msg_t *tmp = ft->msgs[i];
    ft->msgs[i] = ft->msgs[kept - 1 - i];
    ft->msgs[kept - 1 - i] = tmp;
  }
  ft->n = kept;
  ft->last = last;
  if (f->since == FETCH_ALL) ft->lost = 0;
  else if (!known) ft->lost = 1;
  else ft->lost = oldest_prev > f->since_seq;
  fetch_part_done(part->call);
}

static void op_fetch(broker_t *b, broker_fetch_t *f) {
  redis_broker_t *rb = (redis_broker_t *)b;
  fetch_call_t *call = malloc(sizeof *call + f->ntopics * sizeof *call->parts);
  if (!call) {
    f->error = "out of memory";
    return f->done(f);
  }
  call->f = f;
  call->left = f->ntopics + 1; /* one more, taken at the end: done runs once, last */
  static const char *kinds[] = {"all", "after", "unknown"};
  char since_epoch[9], since_seq[24];
  snprintf(since_epoch, sizeof since_epoch, "%08" PRIx32, f->since_epoch);
  snprintf(since_seq, sizeof since_seq, "%" PRIu64, f->since_seq);
  for (size_t i = 0; i < f->ntopics; i++) {
    call->parts[i] = (fetch_part_t){call, i};
    key_t_ stream = {0}, last = {0}, epoch = {0};
    char count[16];
    snprintf(count, sizeof count, "%u", f->topics[i].cfg.history);
    int rc = -1;
    if (rb->cmd_ready && make_key(rb, "h:", f->topics[i].name, f->topics[i].len, &stream) == 0 &&
        make_key(rb, "last:", f->topics[i].name, f->topics[i].len, &last) == 0 &&
        make_key(rb, "epoch", "", 0, &epoch) == 0) {
      const char *argv[] = {"EVALSHA", rb->fetch_sha, "3", stream.s, last.s, epoch.s,
                            kinds[f->since], since_epoch, since_seq, count};
      size_t lens[] = {7, 40, 1, stream.len, last.len, epoch.len, strlen(kinds[f->since]), 8,
                       strlen(since_seq), strlen(count)};
      rc = redis_command(rb->cmd, 10, argv, lens, on_fetched, &call->parts[i]);
    }
    free(stream.s), free(last.s), free(epoch.s);
    if (rc != 0) {
      f->error = rb->cmd_ready ? "out of memory" : "broker unavailable";
      call->left--;
    }
  }
  fetch_part_done(call);
}

static const broker_ops_t redis_ops = {
    .name = "redis",
    .ready = op_ready,
    .publish = op_publish,
    .watch = op_watch,
    .unwatch = op_unwatch,
    .fetch = op_fetch,
};

/* ---- lifetime ---- */

/* A worker's own connections: nothing to log, every worker does this. */
static void after_fork(void *ud) {
  redis_broker_t *rb = ud;
  static const char why[] = "forked: reconnecting";
  snprintf(rb->why, sizeof rb->why, "%s", why); /* set_why logs only a change */
  redis_after_fork(rb->cmd);
  redis_after_fork(rb->sub);
  rb->why[0] = '\0'; /* and its connecting is no "connected again" */
}

broker_t *redis_broker_new(runtime_t *rt, hub_t *hub, const redis_broker_options_t *o, char *err,
                           size_t errlen) {
  redis_url_t url;
  const char *why;
  if (redis_url_parse(o->url, &url, &why) != 0) {
    snprintf(err, errlen, "broker: %s", why);
    return NULL;
  }
  redis_broker_t *rb = calloc(1, sizeof *rb);
  if (!rb || !(rb->prefix = strdup(o->prefix))) {
    free(rb);
    redis_url_free(&url);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  rb->base = (broker_t){&redis_ops, hub};
  rb->rt = rt;
  rb->prefix_len = strlen(o->prefix);
  rb->topic_ttl_ms = o->topic_ttl_ms;
  rb->max_pending = o->max_pending;
  redis_events_t cmd_events = {on_cmd_ready, on_lost, NULL, rb};
  redis_events_t sub_events = {on_sub_ready, on_lost, on_push, rb};
  rb->cmd = redis_open(&rt->loop, &url, &o->tls, &cmd_events, err, errlen);
  if (rb->cmd) rb->sub = redis_open(&rt->loop, &url, &o->tls, &sub_events, err, errlen);
  redis_url_free(&url);
  if (!rb->sub) {
    redis_close(rb->cmd);
    free(rb->prefix);
    free(rb);
    return NULL;
  }
  rb->fork_hook = (runtime_fork_hook_t){after_fork, rb, NULL};
  runtime_add_fork_hook(rt, &rb->fork_hook);
  hub->broker = &rb->base;
  return &rb->base;
}

void redis_broker_free(broker_t *b) {
  redis_broker_t *rb = (redis_broker_t *)b;
  if (!rb) return;
  runtime_remove_fork_hook(rb->rt, &rb->fork_hook);
  if (b->hub) {
    hub_broker_lost(b->hub);
    b->hub->broker = NULL;
  }
  b->hub = NULL; /* what the closes answer reaches no hub */
  redis_close(rb->cmd);
  redis_close(rb->sub);
  free(rb->prefix);
  free(rb);
}

int redis_broker_up(broker_t *b, const char **why) {
  redis_broker_t *rb = (redis_broker_t *)b;
  *why = rb->why;
  return rb->connected;
}

int redis_broker_command(broker_t *b, int argc, const char **argv, const size_t *lens,
                         redis_reply_fn fn, void *ud) {
  redis_broker_t *rb = (redis_broker_t *)b;
  return rb->cmd_ready ? redis_command(rb->cmd, argc, argv, lens, fn, ud) : -1;
}

const char *redis_broker_prefix(broker_t *b) {
  return ((redis_broker_t *)b)->prefix;
}
