/* The Lua face of the hub (topics, publish, history, presence) and of a
 * conn's SSE stream. Topic rules are resolved in Lua and arrive here as
 * plain numbers with each call. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "hub.h"
#include "lua_bind.h"
#include "sse.h"

#define HUB_MT "herald.hub"

typedef struct hub_handle {
  hub_t *hub;
} hub_handle_t;

static hub_t *check_hub(lua_State *L) {
  hub_handle_t *h = luaL_checkudata(L, 1, HUB_MT);
  if (!h->hub) luaL_error(L, "herald: hub is closed");
  return h->hub;
}

static const char *check_topic(lua_State *L, int idx, size_t *len) {
  const char *name = luaL_checklstring(L, idx, len);
  luaL_argcheck(L, *len > 0 && *len <= HUB_MAX_TOPIC, idx, "topic must be 1 to 1024 bytes");
  for (size_t i = 0; i < *len; i++)
    luaL_argcheck(L, (unsigned char)name[i] >= 0x20 && name[i] != 0x7f, idx,
                  "topic must not contain control characters");
  return name;
}

/* history, max_age_ms, conflate at idx, idx+1, idx+2 */
static hub_topic_config_t check_config(lua_State *L, int idx) {
  lua_Integer history = luaL_checkinteger(L, idx), max_age = luaL_checkinteger(L, idx + 1);
  luaL_argcheck(L, history >= 0 && history <= 1000000, idx, "history must be 0 to 1000000");
  luaL_argcheck(L, max_age >= 0, idx + 1, "max_age must be >= 0");
  return (hub_topic_config_t){(unsigned)history, (uint64_t)max_age, lua_toboolean(L, idx + 2)};
}

/* An optional event name or id: nil, or a string without line breaks. */
static const char *opt_field(lua_State *L, int idx, size_t max, const char *what) {
  if (lua_isnoneornil(L, idx)) return NULL;
  size_t len;
  const char *s = luaL_checklstring(L, idx, &len);
  const char *why = sse_check_field(s, len);
  if (why) luaL_error(L, "%s %s", what, why);
  if (len > max) luaL_error(L, "%s must be at most %d bytes", what, (int)max);
  return s;
}

static void push_id(lua_State *L, const hub_t *hub, uint64_t seq) {
  char id[HUB_ID_SIZE];
  hub_format_id(hub, seq, id);
  lua_pushstring(L, id);
}

/* hub(max_queued, max_subscriptions) */
static int core_hub(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  lua_Integer max_queued = luaL_checkinteger(L, 1), max_subs = luaL_checkinteger(L, 2);
  luaL_argcheck(L, max_queued > 0, 1, "must be > 0");
  luaL_argcheck(L, max_subs > 0, 2, "must be > 0");
  hub_handle_t *h = lua_newuserdatauv(L, sizeof *h, 0);
  h->hub = hub_new(&rt->loop);
  if (!h->hub) return luaL_error(L, "out of memory");
  h->hub->max_queued = (size_t)max_queued;
  h->hub->max_subscriptions = (unsigned)max_subs;
  luaL_setmetatable(L, HUB_MT);
  return 1;
}

static int hub_gc(lua_State *L) {
  hub_handle_t *h = luaL_checkudata(L, 1, HUB_MT);
  if (h->hub) hub_free(h->hub);
  h->hub = NULL;
  return 0;
}

/* hub:publish(topic, data, event, history, max_age_ms, conflate) -> id, reached */
static int hub_publish_l(lua_State *L) {
  hub_t *hub = check_hub(L);
  size_t len, data_len;
  const char *topic = check_topic(L, 2, &len);
  const char *data = luaL_checklstring(L, 3, &data_len);
  const char *event = opt_field(L, 4, HUB_MAX_EVENT, "event");
  hub_topic_config_t cfg = check_config(L, 5);
  unsigned reached;
  uint64_t seq = hub_publish(hub, topic, len, &cfg, event, data, data_len, &reached);
  if (!seq) return luaL_error(L, "publish: out of memory");
  push_id(L, hub, seq);
  lua_pushinteger(L, reached);
  return 2;
}

/* hub:subscribe(conn, topic, history, max_age_ms, conflate) -> true | nil, why */
static int hub_subscribe_l(lua_State *L) {
  hub_t *hub = check_hub(L);
  conn_t *c = bind_check_conn(L, 2);
  size_t len;
  const char *topic = check_topic(L, 3, &len);
  hub_topic_config_t cfg = check_config(L, 4);
  const char *err = c ? hub_subscribe(hub, c, topic, len, &cfg) : "connection closed";
  if (err) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int hub_unsubscribe_l(lua_State *L) {
  hub_t *hub = check_hub(L);
  conn_t *c = bind_check_conn(L, 2);
  size_t len;
  const char *topic = check_topic(L, 3, &len);
  lua_pushboolean(L, c && hub_unsubscribe(hub, c, topic, len));
  return 1;
}

/* hub:joined(conn, topic) -> whether conn is subscribed to topic (an ending
 * conn stays subscribed until it closes) */
static int hub_joined_l(lua_State *L) {
  check_hub(L);
  conn_t *c = bind_check_conn_ending(L, 2);
  size_t len;
  const char *topic = check_topic(L, 3, &len);
  int joined = 0;
  for (const hub_sub_t *s = c ? c->member.subs : NULL; s && !joined; s = s->next_in_conn) {
    size_t n;
    const char *name = hub_topic_name(s->topic, &n);
    joined = n == len && memcmp(name, topic, len) == 0;
  }
  lua_pushboolean(L, joined);
  return 1;
}

/* hub:leave_all(conn): a stream that failed to open */
static int hub_leave_all(lua_State *L) {
  check_hub(L);
  conn_t *c = bind_check_conn(L, 2);
  if (c) hub_member_release(c);
  return 0;
}

typedef struct history_walk {
  lua_State *L;
  const hub_t *hub;
  lua_Integer n;
} history_walk_t;

static void push_message(const hub_msg_t *m, void *ud) {
  history_walk_t *w = ud;
  lua_State *L = w->L;
  lua_createtable(L, 0, 4);
  push_id(L, w->hub, m->seq);
  lua_setfield(L, -2, "id");
  lua_pushlstring(L, m->data, m->data_len);
  lua_setfield(L, -2, "data");
  if (m->event) {
    lua_pushstring(L, m->event);
    lua_setfield(L, -2, "event");
  }
  lua_pushinteger(L, (lua_Integer)m->time_ms);
  lua_setfield(L, -2, "time");
  lua_rawseti(L, -2, ++w->n);
}

/* hub:history(topic, since_id) -> { {id, data, event, time}... }, gap */
static int hub_history_l(lua_State *L) {
  hub_t *hub = check_hub(L);
  size_t len;
  const char *topic = check_topic(L, 2, &len);
  const char *since = luaL_optstring(L, 3, NULL);
  lua_newtable(L);
  history_walk_t w = {L, hub, 0};
  int gap = hub_history(hub, topic, len, since, push_message, &w);
  lua_pushboolean(L, gap);
  return 2;
}

static int hub_subscribers(lua_State *L) {
  hub_t *hub = check_hub(L);
  size_t len;
  const char *topic = check_topic(L, 2, &len);
  hub_topic_t *t = hub_find(hub, topic, len);
  lua_pushinteger(L, t ? hub_topic_subscribers(t) : 0);
  return 1;
}

/* hub:members(topic) -> the conn handles subscribed */
static int hub_members(lua_State *L) {
  hub_t *hub = check_hub(L);
  size_t len;
  const char *topic = check_topic(L, 2, &len);
  hub_topic_t *t = hub_find(hub, topic, len);
  lua_createtable(L, t ? (int)hub_topic_subscribers(t) : 0, 0);
  lua_Integer n = 0;
  for (const hub_sub_t *s = t ? hub_topic_first_sub(t) : NULL; s; s = s->next_in_topic) {
    if (s->conn->closing) continue;
    bind_push_conn(L, s->conn);
    lua_rawseti(L, -2, ++n);
  }
  return 1;
}

static int hub_stats_l(lua_State *L) {
  hub_t *hub = check_hub(L);
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, (lua_Integer)hub->stats.published);
  lua_setfield(L, -2, "published");
  lua_pushinteger(L, (lua_Integer)hub->stats.delivered);
  lua_setfield(L, -2, "delivered");
  lua_pushinteger(L, (lua_Integer)hub->stats.conflated);
  lua_setfield(L, -2, "conflated");
  lua_pushinteger(L, hub->ntopics);
  lua_setfield(L, -2, "topics");
  lua_pushinteger(L, hub->nsubs);
  lua_setfield(L, -2, "subscriptions");
  return 1;
}

/* ---- a conn's SSE stream ---- */

static int closed(lua_State *L) {
  lua_pushnil(L);
  lua_pushstring(L, "connection closed");
  return 2;
}

static int fail(lua_State *L, const char *why) {
  lua_pushnil(L);
  lua_pushstring(L, why);
  return 2;
}

/* conn:sse_start(headers, heartbeat_ms, retry_ms, last_id) -> true | nil, why */
static int conn_sse_start(lua_State *L) {
  conn_t *c = bind_check_conn(L, 1);
  size_t n;
  http_header_t *headers = bind_check_headers(L, 2, &n);
  lua_Integer heartbeat = luaL_checkinteger(L, 3), retry = luaL_optinteger(L, 4, -1);
  const char *last_id = luaL_optstring(L, 5, NULL);
  luaL_argcheck(L, heartbeat >= 0 && heartbeat <= UINT32_MAX, 3, "out of range");
  if (!c) return closed(L);
  const char *err;
  if (sse_start(c, headers, n, (uint32_t)heartbeat, (long)retry, last_id, &err) != 0)
    return fail(L, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:sse_send(data, event, id, retry_ms) -> true | nil, why */
static int conn_sse_send(lua_State *L) {
  conn_t *c = bind_check_conn(L, 1);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  const char *event = opt_field(L, 3, HUB_MAX_EVENT, "event");
  const char *id = opt_field(L, 4, HUB_MAX_EVENT, "id");
  lua_Integer retry = luaL_optinteger(L, 5, -1);
  if (!c) return closed(L);
  if (sse_send(c, data, len, event, id, (long)retry) != 0) return fail(L, "out of memory");
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:sse_comment(text) -> true | nil, why */
static int conn_sse_comment(lua_State *L) {
  conn_t *c = bind_check_conn(L, 1);
  size_t len;
  const char *text = luaL_optlstring(L, 2, "", &len);
  if (sse_check_field(text, len)) luaL_argerror(L, 2, "comment must not contain CR, LF or NUL");
  if (!c) return closed(L);
  if (sse_comment(c, text, len) != 0) return fail(L, "out of memory");
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:queued() -> bytes waiting to be written */
static int conn_queued(lua_State *L) {
  conn_t *c = bind_check_conn(L, 1);
  lua_pushinteger(L, c ? (lua_Integer)c->queued_bytes : 0);
  return 1;
}

void bind_hub_open(lua_State *L, int runtime_idx) {
  static const luaL_Reg hub_methods[] = {
      {"publish", hub_publish_l},     {"subscribe", hub_subscribe_l},
      {"unsubscribe", hub_unsubscribe_l}, {"leave_all", hub_leave_all},
      {"joined", hub_joined_l},
      {"history", hub_history_l},     {"subscribers", hub_subscribers},
      {"members", hub_members},       {"stats", hub_stats_l},
      {"__gc", hub_gc},               {NULL, NULL}};
  static const luaL_Reg conn_methods[] = {
      {"sse_start", conn_sse_start}, {"sse_send", conn_sse_send},
      {"sse_comment", conn_sse_comment}, {"queued", conn_queued}, {NULL, NULL}};
  bind_new_class(L, runtime_idx, HUB_MT, hub_methods);
  luaL_getmetatable(L, "herald.conn");
  lua_pushvalue(L, runtime_idx);
  luaL_setfuncs(L, conn_methods, 1);
  lua_pop(L, 1);
  lua_pushvalue(L, runtime_idx);
  lua_pushcclosure(L, core_hub, 1);
  lua_setfield(L, -2, "hub");
}
