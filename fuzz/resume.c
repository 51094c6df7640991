/* SSE Last-Event-ID and resume: a hub with a few topics and some history
 * (count and age bounds, a topic that keeps none, a config change), a conn
 * subscribed to some of them that, while its stream opens, is published to
 * and sent to (held), then hub_member_start with the fuzzed id, then live
 * messages. The conn is in memory only (no socket): its protocol records
 * what the hub hands it. Checked against hub_history with the same id:
 *   - the replay is exactly the subscribed topics' messages newer than the
 *     id, merged with the held ones, in strictly increasing id order, once;
 *   - a gap is reported for exactly the topics that lost messages (none for
 *     no id or ""), once each, before any message;
 *   - the held direct sends follow the replay; live messages follow it, ids
 *     still increasing;
 *   - an id in our own format ("0000abcd-<seq>") is understood as that seq.
 *
 * Input: byte 0 settings: bits 0-1 history of "a" (0, 1, 3, 8), bit 2
 * history of "x" (1 or 4), bit 3 "a" keeps 2 from the opening on, bits 4-5
 * the id (0: the input's tail as a string, 1: none, 2: "", 3: ours for the
 * seq in the tail's first byte), bit 6 unsubscribe "b" after the start,
 * bit 7 max_subscriptions 2. Byte 1: the topics to subscribe to (bits 0-4:
 * a, b, c, room:1, x). Then three groups of publishes, each a count byte and
 * that many bytes (topic = (byte & 7) % 5, bits 3-4 time passing: 0, 0.5,
 * 1.5 or 4 s, bit 5 the hub's sweep runs first (expiry, idle topics freed),
 * bit 7 an event): history before, while opening (with count bits 6-7:
 * direct sends), live after. The rest is the id. */
#include <string.h>

#include "harness.h"

#define NTOPICS 5
static const char *const names[NTOPICS] = {"a", "b", "c", "room:1", "x"};

static uv_loop_t loop;
static runtime_t *rt;
static server_t srv;

typedef struct record {
  uint64_t seqs[512];
  size_t n;
  const hub_topic_t *gaps[NTOPICS];
  size_t ngaps;
  int gap_after_msg;
} record_t;

static record_t rec;

static void deliver(conn_t *c, hub_msg_t *m) {
  (void)c;
  FZ_CHECK(m->refs > 0, "delivered a freed message");
  if (rec.n < sizeof rec.seqs / sizeof *rec.seqs) rec.seqs[rec.n] = m->seq;
  rec.n++;
}

static void gap(conn_t *c, const char *name, size_t len) {
  const hub_topic_t *t = hub_find(c->member.hub, name, len);
  FZ_CHECK(t != NULL, "gap for a topic the hub does not have");
  if (rec.n) rec.gap_after_msg = 1;
  for (size_t i = 0; i < rec.ngaps; i++) FZ_CHECK(rec.gaps[i] != t, "gap reported twice for a topic");
  FZ_CHECK(rec.ngaps < NTOPICS, "more gaps than topics");
  rec.gaps[rec.ngaps++] = t;
}

/* is_open() in hub.c: a protocol with deliver takes messages; before, they are held */
static const conn_proto_t opening = {.name = "opening"};
static const conn_proto_t open_proto = {.name = "open", .deliver = deliver, .gap = gap};

static hub_topic_config_t cfgs[NTOPICS];

typedef struct collect {
  uint64_t seqs[1024];
  size_t n;
} collect_t;

static void collect(const hub_msg_t *m, void *ud) {
  collect_t *col = ud;
  if (col->n) FZ_CHECK(m->seq > col->seqs[col->n - 1], "history out of order");
  FZ_CHECK(col->n < sizeof col->seqs / sizeof *col->seqs, "history too long");
  col->seqs[col->n++] = m->seq;
}

/* Our id format exactly, or 0. */
static uint64_t parse_ours(const char *id, uint64_t max) {
  if (strlen(id) < 10 || memcmp(id, FZ_EPOCH_STR "-", 9) != 0) return 0;
  const char *d = id + 9;
  if (d[0] == '0') return 0; /* no leading zeros: 0 is no seq of ours */
  uint64_t seq = 0;
  for (; *d; d++) {
    if (*d < '0' || *d > '9') return 0;
    if (seq > (UINT64_MAX - 9) / 10) return 0;
    seq = seq * 10 + (uint64_t)(*d - '0');
  }
  return seq <= max ? seq : 0;
}

static uint64_t now;

static void publish_group(hub_t *hub, fz_in_t *in, size_t count, int subscribed_mask,
                          uint64_t *held, size_t *nheld, int opening_conn, conn_t *c) {
  for (size_t i = 0; i < count && in->len; i++) {
    uint8_t b = fz_byte(in);
    int t = (b & 7) % NTOPICS;
    static const uint64_t steps[] = {0, 500, 1500, 4000};
    now += steps[(b >> 3) & 3];
    loop.time = now;
    if (b & 0x20) hub->sweeper.timer_cb(&hub->sweeper); /* the hub's 1 s sweep, due now */
    unsigned reached;
    uint64_t before = rec.n;
    uint64_t seq = hub_publish(hub, names[t], strlen(names[t]), &cfgs[t], b & 0x80 ? "ev" : NULL,
                               "data", 4, &reached);
    FZ_CHECK(seq == hub->seq && seq > 0, "publish seq");
    int sub = (subscribed_mask >> t) & 1;
    FZ_CHECK(reached == (unsigned)sub, "publish to %s reached %u (subscribed %d)", names[t], reached, sub);
    if (sub && opening_conn && *nheld < 256) held[(*nheld)++] = seq;
    if (sub && !opening_conn && c) {
      FZ_CHECK(rec.n == before + 1, "live message not delivered at once");
      FZ_CHECK(rec.n < 2 || rec.seqs[rec.n - 1] > rec.seqs[rec.n - 2], "live id %llu not after %llu",
               (unsigned long long)rec.seqs[rec.n - 1], (unsigned long long)rec.seqs[rec.n - 2]);
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!rt) {
    FZ_CHECK(uv_loop_init(&loop) == 0, "uv_loop_init");
    rt = calloc(1, sizeof *rt);
    FZ_CHECK(rt, "oom");
    srv.rt = rt;
    srv.limits.max_queued = 1 << 20;
  }
  fz_in_t in = {data, size};
  uint8_t f0 = fz_byte(&in), submask = fz_byte(&in) & 31;
  static const unsigned a_hist[] = {0, 1, 3, 8};
  cfgs[0] = (hub_topic_config_t){a_hist[f0 & 3], 0, 0};
  cfgs[1] = (hub_topic_config_t){8, 0, 0};
  cfgs[2] = (hub_topic_config_t){0, 0, 0};
  cfgs[3] = (hub_topic_config_t){2, 3000, 0};
  cfgs[4] = (hub_topic_config_t){(f0 & 4) ? 4 : 1, 1000, 0};
  uv_update_time(&loop);
  now = uv_now(&loop);
  memset(&rec, 0, sizeof rec);

  hub_t *hub = hub_new(&loop);
  FZ_CHECK(hub, "hub_new");
  hub->epoch = FZ_EPOCH;
  if (f0 & 0x80) hub->max_subscriptions = 2;

  /* history */
  publish_group(hub, &in, fz_byte(&in) % 64, 0, NULL, NULL, 0, NULL);

  /* a conn opens its stream: subscribes, gets publishes and direct sends (held) */
  conn_t *c = calloc(1, sizeof *c);
  FZ_CHECK(c, "oom");
  c->rt = rt;
  c->server = &srv;
  c->proto = &opening;
  int subscribed = 0;
  for (int t = 0; t < NTOPICS; t++) {
    if (!((submask >> t) & 1)) continue;
    const char *err = hub_subscribe(hub, c, names[t], strlen(names[t]), &cfgs[t]);
    FZ_CHECK(!err || (hub->max_subscriptions == 2 && c->member.nsubs == 2 &&
                      strcmp(err, "too many subscriptions") == 0),
             "subscribe %s: %s", names[t], err);
    if (!err) subscribed |= 1 << t;
  }
  if (f0 & 8) cfgs[0].history = 2; /* the ring is resized at the next publish or subscribe */
  uint64_t held[256];
  size_t nheld = 0;
  uint8_t n2 = fz_byte(&in);
  publish_group(hub, &in, n2 % 16, subscribed, held, &nheld, 1, c);
  unsigned ndirect = n2 >> 6;
  for (unsigned i = 0; i < ndirect; i++) {
    hbuf_t *b = hbuf_copy("direct", 6);
    FZ_CHECK(b && hub_member_send(c, b) == 0, "direct send while opening");
    hbuf_unref(b);
  }
  FZ_CHECK(c->out_len == 0, "a send while opening was not held");
  uint8_t n3 = fz_byte(&in) % 16;
  fz_in_t live = in; /* the live group is read after the start; the id is the tail after it */
  for (size_t i = 0; i < n3 && in.len; i++) fz_byte(&in);

  /* the id */
  char id[256];
  const char *last_id;
  uint64_t ours = 0;
  switch ((f0 >> 4) & 3) {
    case 0: {
      size_t len = in.len < sizeof id - 1 ? in.len : sizeof id - 1;
      memcpy(id, in.p, len);
      id[len] = '\0';
      last_id = id;
      break;
    }
    case 1: last_id = NULL; break;
    case 2: last_id = ""; break;
    default:
      hub_format_id(hub, fz_byte(&in) % (hub->seq + 1), id);
      last_id = id;
      break;
  }
  if (last_id && last_id[0]) ours = parse_ours(last_id, hub->seq);

  /* the oracle: hub_history with the same id, topic by topic */
  uint64_t expect[1536];
  size_t nexpect = 0;
  int lost[NTOPICS] = {0};
  for (int t = 0; t < NTOPICS && last_id; t++) {
    if (!((subscribed >> t) & 1)) continue;
    collect_t col = {.n = 0};
    lost[t] = hub_history(hub, names[t], strlen(names[t]), last_id, collect, &col);
    collect_t all = {.n = 0};
    FZ_CHECK(hub_history(hub, names[t], strlen(names[t]), NULL, collect, &all) == 0,
             "history without an id reports a loss");
    /* what the id let through is a suffix of the whole history */
    FZ_CHECK(col.n <= all.n && memcmp(col.seqs, all.seqs + (all.n - col.n), col.n * 8) == 0,
             "history since an id is not a suffix of the history");
    if (ours) {
      size_t newer = 0;
      for (size_t i = 0; i < all.n; i++) newer += all.seqs[i] > ours;
      FZ_CHECK(col.n == newer, "history since our id %s: %zu messages, %zu are newer", last_id,
               col.n, newer);
    }
    for (size_t i = 0; i < col.n; i++) expect[nexpect++] = col.seqs[i];
  }
  for (size_t i = 0; i < nheld; i++) expect[nexpect++] = held[i];
  /* sort and dedupe the expected replay */
  for (size_t i = 1; i < nexpect; i++)
    for (size_t j = i; j > 0 && expect[j - 1] > expect[j]; j--) {
      uint64_t x = expect[j];
      expect[j] = expect[j - 1];
      expect[j - 1] = x;
    }
  size_t nuniq = 0;
  for (size_t i = 0; i < nexpect; i++)
    if (!nuniq || expect[nuniq - 1] != expect[i]) expect[nuniq++] = expect[i];

  /* the start */
  c->proto = &open_proto;
  FZ_CHECK(hub_member_start(c, last_id) == 0, "hub_member_start failed");
  FZ_CHECK(!rec.gap_after_msg, "a gap after a replayed message");
  FZ_CHECK(rec.n == nuniq, "replayed %zu messages, expected %zu (id \"%s\")", rec.n, nuniq,
           last_id ? last_id : "(none)");
  if (getenv("FUZZ_DEBUG")) {
    fprintf(stderr, "id \"%s\" (ours: %llu), hub at %llu, subscribed %#x: %zu replayed, %zu gaps, %u direct:",
            last_id ? last_id : "(none)", (unsigned long long)ours, (unsigned long long)hub->seq,
            subscribed, rec.n, rec.ngaps, ndirect);
    for (size_t i = 0; i < rec.n; i++) fprintf(stderr, " %llu", (unsigned long long)rec.seqs[i]);
    fputc('\n', stderr);
  }
  for (size_t i = 0; i < rec.n && i < sizeof rec.seqs / sizeof *rec.seqs; i++) {
    FZ_CHECK(rec.seqs[i] == expect[i], "replay[%zu] = %llu, expected %llu", i,
             (unsigned long long)rec.seqs[i], (unsigned long long)expect[i]);
    if (i) FZ_CHECK(rec.seqs[i] > rec.seqs[i - 1], "replay not strictly increasing");
    char fid[HUB_ID_SIZE];
    hub_format_id(hub, rec.seqs[i], fid);
    FZ_CHECK(parse_ours(fid, hub->seq) == rec.seqs[i], "our id %s does not parse back", fid);
  }
  for (int t = 0; t < NTOPICS; t++) {
    if (!((subscribed >> t) & 1)) continue;
    hub_topic_t *topic = hub_find(hub, names[t], strlen(names[t]));
    FZ_CHECK(topic, "a subscribed topic has no record");
    int reported = 0;
    for (size_t i = 0; i < rec.ngaps; i++) reported |= rec.gaps[i] == topic;
    int expected = last_id && last_id[0] && lost[t];
    FZ_CHECK(reported == expected, "gap for %s: reported %d, expected %d (id \"%s\")", names[t],
             reported, expected, last_id ? last_id : "(none)");
  }
  FZ_CHECK(rec.ngaps <= (size_t)__builtin_popcount((unsigned)subscribed), "gap for a topic not subscribed");
  FZ_CHECK(c->out_len - c->out_head == ndirect, "%u direct sends held, %u queued after the start",
           ndirect, c->out_len - c->out_head);

  /* live */
  if (f0 & 0x40 && ((subscribed >> 1) & 1)) {
    FZ_CHECK(hub_unsubscribe(hub, c, "b", 1) == 1, "unsubscribe b");
    subscribed &= ~2;
  }
  publish_group(hub, &live, n3, subscribed, NULL, NULL, 0, c);

  /* other topics' history with the same id: no crash, a loss for a topic we never kept */
  collect_t col = {.n = 0};
  int l = hub_history(hub, "zzz", 3, last_id, collect, &col);
  FZ_CHECK(col.n == 0 && (last_id ? 1 : 0) >= l, "history of an unknown topic");

  /* clean up: what conn_close and free_conn would do for a conn with no socket */
  hub_member_release(c);
  for (unsigned i = c->out_head; i < c->out_len; i++) hbuf_unref(c->outq[i].buf);
  free(c->outq);
  rt->replies = rt->deliveries = (conn_list_t){NULL, NULL};
  free(c);
  hub_free(hub);
  uv_run(&loop, UV_RUN_NOWAIT); /* the hub's timer closes, the hub goes */
  return 0;
}
