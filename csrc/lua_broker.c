/* The Lua face of the Redis broker: publish and history with a callback
 * (Redis answers later), raw commands for presence (lua/herald/broker.lua),
 * and the connection's state. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_redis.h"
#include "hub.h"
#include "lua_bind.h"
#include "sse.h"

#define BROKER_MT "herald.broker"
#define HUB_MT "herald.hub"
#define MAX_COMMAND_ARGS 64

typedef struct broker_handle {
  broker_t *broker;
  runtime_t *rt;
} broker_handle_t;

static broker_handle_t *check_handle(lua_State *L) {
  return luaL_checkudata(L, 1, BROKER_MT);
}

static broker_t *check_broker(lua_State *L) {
  broker_handle_t *h = check_handle(L);
  if (!h->broker) luaL_error(L, "herald: broker is closed");
  return h->broker;
}

/* A Lua callback waiting for Redis. */
typedef struct pending_call {
  runtime_t *rt;
  int fn_ref;   /* LUA_NOREF: nobody to tell */
} pending_call_t;

static pending_call_t *pending_new(lua_State *L, runtime_t *rt, int fn_idx) {
  pending_call_t *p = malloc(sizeof *p);
  if (!p) return NULL;
  p->rt = rt;
  p->fn_ref = LUA_NOREF;
  if (!lua_isnoneornil(L, fn_idx)) {
    lua_pushvalue(L, fn_idx);
    p->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  return p;
}

/* Pushes the callback, or returns NULL (and frees p) when there is none or
 * the state is closing. */
static lua_State *pending_begin(pending_call_t *p) {
  runtime_t *rt = p->rt;
  if (p->fn_ref == LUA_NOREF || rt->closing || !rt->lua) {
    free(p);
    return NULL;
  }
  lua_State *L = rt->lua;
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->fn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->fn_ref);
  return L;
}

static void pending_call(pending_call_t *p, int nargs) {
  runtime_t *rt = p->rt;
  free(p);
  bind_call(rt, nargs);
}

static void push_id(lua_State *L, uint32_t epoch, uint64_t seq) {
  char id[HUB_ID_SIZE];
  snprintf(id, sizeof id, "%08" PRIx32 "-%" PRIu64, epoch, seq);
  lua_pushstring(L, id);
}

/* core.redis_broker(hub, { url, prefix, ca, cert, key, verify, topic_ttl_ms, max_pending })
 * -> broker | nil, why, bad_url (true when the URL itself is wrong): the
 * caller says which option is wrong, and where. */
static int core_redis_broker(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  hub_t **hub = luaL_checkudata(L, 1, HUB_MT);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (!*hub) return luaL_error(L, "herald: hub is closed");
  if ((*hub)->broker) return luaL_error(L, "herald: the hub has a broker already");
  redis_broker_options_t o = {0};
  lua_getfield(L, 2, "url");
  o.url = luaL_checkstring(L, -1);
  lua_getfield(L, 2, "prefix");
  o.prefix = luaL_optstring(L, -1, "herald:");
  lua_getfield(L, 2, "ca");
  o.tls.ca_file = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 2, "cert");
  o.tls.cert_file = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 2, "key");
  o.tls.key_file = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 2, "verify");
  o.tls.verify = lua_isnil(L, -1) || lua_toboolean(L, -1);
  o.topic_ttl_ms = (uint64_t)bind_opt_integer(L, 2, "topic_ttl_ms", 86400000);
  o.max_pending = (unsigned)bind_opt_integer(L, 2, "max_pending", 10000);
  redis_url_t url;
  const char *bad;
  if (redis_url_parse(o.url, &url, &bad) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, bad);
    lua_pushboolean(L, 1);
    return 3;
  }
  redis_url_free(&url);
  broker_handle_t *h = lua_newuserdatauv(L, sizeof *h, 1);
  h->rt = rt;
  h->broker = NULL;
  luaL_setmetatable(L, BROKER_MT);
  lua_pushvalue(L, 1); /* the hub lives as long as its broker */
  lua_setiuservalue(L, -2, 1);
  char err[512];
  h->broker = redis_broker_new(rt, *hub, &o, err, sizeof err);
  if (!h->broker) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1;
}

static int broker_close(lua_State *L) {
  broker_handle_t *h = check_handle(L);
  broker_t *b = h->broker;
  h->broker = NULL;
  redis_broker_free(b);
  return 0;
}

/* broker:status() -> up, why */
static int broker_status(lua_State *L) {
  const char *why;
  lua_pushboolean(L, redis_broker_up(check_broker(L), &why));
  lua_pushstring(L, why);
  return 2;
}

/* broker:wait(timeout_ms, keep_trying) -> true | nil, why: runs the loop until
 * the broker is connected, or (unless keep_trying) its first attempt failed. */
static int broker_wait(lua_State *L) {
  broker_t *b = check_broker(L);
  runtime_t *rt = bind_runtime(L);
  lua_Integer timeout = luaL_checkinteger(L, 2);
  int keep_trying = lua_toboolean(L, 3);
  if (rt->running) { /* it connects in the background */
    lua_pushboolean(L, 1);
    return 1;
  }
  uv_update_time(&rt->loop);
  uint64_t deadline = uv_now(&rt->loop) + (uint64_t)(timeout < 0 ? 0 : timeout);
  const char *why = "";
  while (!redis_broker_up(b, &why) && (keep_trying || !why[0]) && uv_now(&rt->loop) < deadline) {
    runtime_run_once(rt, L, (int64_t)(deadline - uv_now(&rt->loop)));
    uv_update_time(&rt->loop);
    if (!check_handle(L)->broker) break;
  }
  if (check_handle(L)->broker && redis_broker_up(b, &why)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, why[0] ? why : "timed out connecting");
  return 2;
}

static void on_published(void *ud, const char *err, uint32_t epoch, uint64_t seq) {
  pending_call_t *p = ud;
  lua_State *L = pending_begin(p);
  if (!L) return;
  if (err) {
    lua_pushnil(L);
    lua_pushstring(L, err);
  } else {
    push_id(L, epoch, seq);
    lua_pushnil(L);
  }
  pending_call(p, 2);
}

static const char *check_topic(lua_State *L, int idx, size_t *len) {
  const char *name = luaL_checklstring(L, idx, len);
  luaL_argcheck(L, *len > 0 && *len <= HUB_MAX_TOPIC, idx, "topic must be 1 to 1024 bytes");
  return name;
}

/* broker:publish(topic, data, event, history, max_age_ms, fn) -> true | nil, why;
 * fn(id) once Redis took it, or fn(nil, why). */
static int broker_publish(lua_State *L) {
  broker_t *b = check_broker(L);
  runtime_t *rt = bind_runtime(L);
  size_t len, data_len;
  const char *topic = check_topic(L, 2, &len);
  const char *data = luaL_checklstring(L, 3, &data_len);
  const char *event = luaL_optstring(L, 4, NULL);
  hub_topic_config_t cfg = {(unsigned)luaL_checkinteger(L, 5), (uint64_t)luaL_checkinteger(L, 6), 0};
  const char *why;
  if (!redis_broker_up(b, &why)) {
    lua_pushnil(L);
    lua_pushfstring(L, "broker unavailable: %s", why[0] ? why : "connecting");
    return 2;
  }
  pending_call_t *p = pending_new(L, rt, 7);
  if (!p) return luaL_error(L, "out of memory");
  if (b->ops->publish(b, topic, len, &cfg, event, data, data_len, on_published, p) != 0) {
    if (p->fn_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, p->fn_ref);
    free(p);
    lua_pushnil(L);
    lua_pushstring(L, "broker busy: too many publishes waiting for Redis");
    return 2;
  }
  if (b->hub) b->hub->stats.published++;
  lua_pushboolean(L, 1);
  return 1;
}

static void on_history(broker_fetch_t *f) {
  pending_call_t *p = f->ud;
  lua_State *L = pending_begin(p);
  if (!L) return broker_fetch_free(f);
  if (f->error) {
    lua_pushnil(L);
    lua_pushstring(L, f->error);
  } else {
    broker_fetch_topic_t *ft = &f->topics[0];
    lua_createtable(L, (int)ft->n, 0);
    for (size_t i = 0; i < ft->n; i++) {
      hub_msg_t *m = ft->msgs[i];
      lua_createtable(L, 0, 4);
      push_id(L, f->epoch, m->seq);
      lua_setfield(L, -2, "id");
      lua_pushlstring(L, m->data, m->data_len);
      lua_setfield(L, -2, "data");
      if (m->event) {
        lua_pushstring(L, m->event);
        lua_setfield(L, -2, "event");
      }
      lua_pushinteger(L, (lua_Integer)m->time_ms);
      lua_setfield(L, -2, "time");
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_pushboolean(L, ft->lost);
  }
  broker_fetch_free(f);
  pending_call(p, 2);
}

/* broker:history(topic, since_id, history, max_age_ms, fn): fn(list, gap) or fn(nil, why) */
static int broker_history(lua_State *L) {
  broker_t *b = check_broker(L);
  runtime_t *rt = bind_runtime(L);
  size_t len;
  const char *topic = check_topic(L, 2, &len);
  const char *since = luaL_optstring(L, 3, NULL);
  hub_topic_config_t cfg = {(unsigned)luaL_checkinteger(L, 4), (uint64_t)luaL_checkinteger(L, 5), 0};
  luaL_checktype(L, 6, LUA_TFUNCTION);
  broker_fetch_t *f = calloc(1, sizeof *f);
  if (f) f->topics = calloc(1, sizeof *f->topics);
  if (f && f->topics) f->topics[0].name = malloc(len + 1);
  if (!f || !f->topics || !f->topics[0].name) {
    broker_fetch_free(f);
    return luaL_error(L, "out of memory");
  }
  memcpy(f->topics[0].name, topic, len + 1);
  f->topics[0].len = len;
  f->topics[0].cfg = cfg;
  f->ntopics = 1;
  if (!since) f->since = FETCH_ALL;
  else if (hub_parse_id(since, &f->since_epoch, &f->since_seq) == 0) f->since = FETCH_AFTER;
  else f->since = FETCH_UNKNOWN;
  const char *why;
  if (!redis_broker_up(b, &why)) {
    broker_fetch_free(f);
    lua_pushnil(L);
    lua_pushfstring(L, "broker unavailable: %s", why[0] ? why : "connecting");
    return 2;
  }
  f->ud = pending_new(L, rt, 6);
  if (!f->ud) {
    broker_fetch_free(f);
    return luaL_error(L, "out of memory");
  }
  f->done = on_history;
  b->ops->fetch(b, f);
  lua_pushboolean(L, 1);
  return 1;
}

static void push_reply(lua_State *L, const redisReply *r, int depth) {
  switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
      lua_pushlstring(L, r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      lua_pushinteger(L, (lua_Integer)r->integer);
      break;
    case REDIS_REPLY_ARRAY:
      if (depth > 8 || !lua_checkstack(L, 4)) {
        lua_pushnil(L);
        break;
      }
      lua_createtable(L, (int)r->elements, 0);
      for (size_t i = 0; i < r->elements; i++) {
        push_reply(L, r->element[i], depth + 1);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
      }
      break;
    default:
      lua_pushboolean(L, 0); /* nil reply: false keeps arrays whole */
  }
}

static void on_command_reply(void *ud, redisReply *reply, const char *err) {
  pending_call_t *p = ud;
  lua_State *L = pending_begin(p);
  if (!L) return;
  if (err) {
    lua_pushnil(L);
    lua_pushstring(L, err);
  } else {
    push_reply(L, reply, 0);
    lua_pushnil(L);
  }
  pending_call(p, 2);
}

/* broker:command(fn, arg1, ...) -> true | nil, why: fn(reply, err) */
static int broker_command(lua_State *L) {
  broker_t *b = check_broker(L);
  runtime_t *rt = bind_runtime(L);
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  int argc = lua_gettop(L) - 2;
  luaL_argcheck(L, argc >= 1 && argc <= MAX_COMMAND_ARGS, 3, "1 to 64 command arguments");
  const char *argv[MAX_COMMAND_ARGS];
  size_t lens[MAX_COMMAND_ARGS];
  for (int i = 0; i < argc; i++) argv[i] = luaL_checklstring(L, i + 3, &lens[i]);
  pending_call_t *p = pending_new(L, rt, 2);
  if (!p) return luaL_error(L, "out of memory");
  if (redis_broker_command(b, argc, argv, lens, on_command_reply, p) != 0) {
    if (p->fn_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, p->fn_ref);
    free(p);
    const char *why;
    redis_broker_up(b, &why);
    lua_pushnil(L);
    lua_pushfstring(L, "broker unavailable: %s", why[0] ? why : "connecting");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int broker_prefix(lua_State *L) {
  lua_pushstring(L, redis_broker_prefix(check_broker(L)));
  return 1;
}

void bind_broker_open(lua_State *L, int runtime_idx) {
  static const luaL_Reg methods[] = {
      {"status", broker_status},   {"wait", broker_wait},       {"publish", broker_publish},
      {"history", broker_history}, {"command", broker_command}, {"prefix", broker_prefix},
      {"close", broker_close},     {"__gc", broker_close},      {NULL, NULL}};
  bind_new_class(L, runtime_idx, BROKER_MT, methods);
  lua_pushvalue(L, runtime_idx);
  lua_pushcclosure(L, core_redis_broker, 1);
  lua_setfield(L, -2, "redis_broker");
}
