/* The Lua face of a server and of the connections it hands to Lua. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "lua_bind.h"
#include "server.h"
#include "tls.h"
#include "ws.h"

#define SERVER_MT "herald.server"
#define CONN_MT "herald.conn"

typedef struct lua_server {
  server_t *srv;
  runtime_t *rt;
  int on_request_ref;
  int on_event_ref;    /* on_event(conn, "message", data, kind) | (conn, "closed"[, code, reason]) */
  int self_ref;        /* anchors a listening server that Lua dropped */
} lua_server_t;

typedef struct conn_handle {
  conn_t *c;           /* NULL once the conn is gone */
} conn_handle_t;

static lua_server_t *check_server(lua_State *L) {
  lua_server_t *ls = luaL_checkudata(L, 1, SERVER_MT);
  if (!ls->srv) luaL_error(L, "herald: server is closed");
  return ls;
}

conn_t *bind_check_conn(lua_State *L, int idx) {
  conn_handle_t *h = luaL_checkudata(L, idx, CONN_MT);
  return h->c && !h->c->closing && !h->c->ending ? h->c : NULL; /* ending: no more output */
}
#define check_conn(L) bind_check_conn(L, 1)

conn_t *bind_check_conn_ending(lua_State *L, int idx) {
  conn_handle_t *h = luaL_checkudata(L, idx, CONN_MT);
  return h->c && !h->c->closing ? h->c : NULL;
}

void bind_push_conn(lua_State *L, conn_t *c) {
  if (conn_lua_handle(c)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->lua_ref);
    return;
  }
  conn_handle_t *h = lua_newuserdatauv(L, sizeof *h, 0);
  h->c = c;
  luaL_setmetatable(L, CONN_MT);
  lua_pushvalue(L, -1);
  c->lua_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  conn_lua_handle(c) = h;
}

static void on_conn_closed(conn_t *c, void *ud) {
  lua_server_t *ls = ud;
  lua_State *L = ls->rt->lua;
  int live = !ls->rt->closing && L;
  if (live && c->notify_close && ls->on_event_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, ls->on_event_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->lua_ref);
    lua_pushliteral(L, "closed");
    int nargs = 2;
    if (c->ws) {
      const char *reason;
      size_t len;
      lua_pushinteger(L, ws_close_status(c, &reason, &len));
      lua_pushlstring(L, reason, len);
      nargs = 4;
    }
    bind_call(ls->rt, nargs);
  }
  ((conn_handle_t *)conn_lua_handle(c))->c = NULL;
  conn_lua_handle(c) = NULL;
  if (live) luaL_unref(L, LUA_REGISTRYINDEX, c->lua_ref);
}

/* Builds the request table: method, url, version, headers (lowercased
 * names; repeated ones joined with ", "), body, keep_alive. */
static void push_request(lua_State *L, const http_request_t *req) {
  lua_createtable(L, 0, 6);
  lua_pushstring(L, req->method);
  lua_setfield(L, -2, "method");
  lua_pushlstring(L, req->url, req->url_len);
  lua_setfield(L, -2, "url");
  lua_pushfstring(L, "%d.%d", req->version_major, req->version_minor);
  lua_setfield(L, -2, "version");
  lua_createtable(L, 0, (int)req->nheaders);
  const char *s = req->headers;
  for (unsigned i = 0; i < req->nheaders; i++) {
    const char *value = s + strlen(s) + 1;
    if (lua_getfield(L, -1, s) == LUA_TSTRING) {
      lua_pushstring(L, ", ");
      lua_pushstring(L, value);
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushstring(L, value);
    }
    lua_setfield(L, -2, s);
    s = value + strlen(value) + 1;
  }
  lua_setfield(L, -2, "headers");
  lua_pushlstring(L, req->body, req->body_len);
  lua_setfield(L, -2, "body");
  lua_pushboolean(L, req->keep_alive);
  lua_setfield(L, -2, "keep_alive");
}

static void on_message(conn_t *c, const char *data, size_t len, int binary, void *ud) {
  lua_server_t *ls = ud;
  lua_State *L = ls->rt->lua;
  if (!L || ls->rt->closing || ls->on_event_ref == LUA_NOREF) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->on_event_ref);
  bind_push_conn(L, c);
  lua_pushliteral(L, "message");
  lua_pushlstring(L, data, len);
  if (binary) lua_pushliteral(L, "binary");
  else lua_pushliteral(L, "text");
  bind_call(ls->rt, 4);
}

static void on_request(conn_t *c, const http_request_t *req, void *ud) {
  lua_server_t *ls = ud;
  lua_State *L = ls->rt->lua;
  if (!L || ls->rt->closing) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->on_request_ref);
  bind_push_conn(L, c);
  push_request(L, req);
  bind_call(ls->rt, 2); /* a failure is logged; http answers 500 for it */
}

/* server(limits, on_request, on_event) */
static int core_server(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  server_limits_t limits = {
      .max_header_size = (size_t)bind_opt_integer(L, 1, "max_header_size", 16384),
      .max_body_size = (size_t)bind_opt_integer(L, 1, "max_body_size", 1048576),
      .header_timeout_ms = (uint64_t)bind_opt_integer(L, 1, "header_timeout_ms", 10000),
      .idle_timeout_ms = (uint64_t)bind_opt_integer(L, 1, "idle_timeout_ms", 60000),
      .shutdown_timeout_ms = (uint64_t)bind_opt_integer(L, 1, "shutdown_timeout_ms", 5000),
      .max_connections = (unsigned)bind_opt_integer(L, 1, "max_connections", 10000),
      .max_connections_per_ip = (unsigned)bind_opt_integer(L, 1, "max_connections_per_ip", 0),
      .max_connects_per_ip = (unsigned)bind_opt_integer(L, 1, "max_connects_per_ip", 0),
      .trust_loopback = (int)bind_opt_integer(L, 1, "trust_loopback", 1),
      .max_queued = (size_t)bind_opt_integer(L, 1, "max_queued", 1048576),
      .drain_retry_ms = (uint32_t)bind_opt_integer(L, 1, "drain_retry_ms", 1000),
  };
  lua_server_t *ls = lua_newuserdatauv(L, sizeof *ls, 0);
  memset(ls, 0, sizeof *ls);
  ls->rt = rt;
  ls->self_ref = LUA_NOREF;
  lua_pushvalue(L, 2);
  ls->on_request_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  ls->on_event_ref = LUA_NOREF;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_pushvalue(L, 3);
    ls->on_event_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  luaL_setmetatable(L, SERVER_MT);
  ls->srv = server_new(rt, &limits, on_request, on_conn_closed, ls);
  if (!ls->srv) return luaL_error(L, "out of memory");
  ls->srv->on_message = on_message;
  return 1;
}

/* The TLS table the Lua half built: { certs = {...}, keys = {...}, ciphers,
 * ciphersuites, handshake_timeout_ms }. NULL with err on a bad file. */
static tls_config_t *check_tls(lua_State *L, int idx, char *err, size_t errlen) {
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_getfield(L, idx, "certs");
  lua_getfield(L, idx, "keys");
  int certs = lua_gettop(L) - 1, keys = certs + 1;
  luaL_checktype(L, certs, LUA_TTABLE);
  luaL_checktype(L, keys, LUA_TTABLE);
  size_t n = (size_t)luaL_len(L, certs);
  luaL_argcheck(L, n > 0 && n <= 64 && (size_t)luaL_len(L, keys) == n, idx,
                "tls: 1 to 64 certificates, each with a key");
  const char **paths = lua_newuserdatauv(L, 2 * n * sizeof *paths, 0);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, certs, (lua_Integer)i + 1);
    lua_rawgeti(L, keys, (lua_Integer)i + 1);
    paths[i] = luaL_checkstring(L, -2);
    paths[n + i] = luaL_checkstring(L, -1);
    lua_pop(L, 2); /* anchored by the tables */
  }
  lua_getfield(L, idx, "ciphers");
  lua_getfield(L, idx, "ciphersuites");
  tls_settings_t settings = {
      .certs = paths, .keys = paths + n, .n = n,
      .ciphers = luaL_optstring(L, -2, NULL), .ciphersuites = luaL_optstring(L, -1, NULL),
      .handshake_timeout_ms = (uint64_t)bind_opt_integer(L, idx, "handshake_timeout_ms", 10000),
  };
  tls_config_t *cfg = tls_config_new(&settings, err, errlen);
  lua_pop(L, 5);
  return cfg;
}

/* srv:listen(host, port, backlog, tls) -> port | nil, err, ename */
static int server_listen_l(lua_State *L) {
  lua_server_t *ls = check_server(L);
  const char *host = luaL_checkstring(L, 2);
  lua_Integer port = luaL_checkinteger(L, 3);
  lua_Integer backlog = luaL_optinteger(L, 4, 511);
  luaL_argcheck(L, port >= 0 && port <= 65535, 3, "must be 0 to 65535");
  tls_config_t *tls = NULL;
  if (!lua_isnoneornil(L, 5)) {
    char err[512];
    tls = check_tls(L, 5, err, sizeof err); /* before binding: never half-configured */
    if (!tls) {
      lua_pushnil(L);
      lua_pushstring(L, err);
      lua_pushliteral(L, "TLS");
      return 3;
    }
  }
  int rc = server_listen(ls->srv, host, (int)port, (int)backlog, tls);
  if (rc < 0) {
    tls_config_unref(tls);
    return bind_uv_error(L, rc);
  }
  if (ls->self_ref == LUA_NOREF) {
    lua_pushvalue(L, 1);
    ls->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_pushinteger(L, rc);
  return 1;
}

/* srv:reload_tls() -> true | nil, err */
static int server_reload_tls_l(lua_State *L) {
  lua_server_t *ls = check_server(L);
  char err[512];
  if (server_reload_tls(ls->srv, err, sizeof err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int server_close_l(lua_State *L) {
  lua_server_t *ls = luaL_checkudata(L, 1, SERVER_MT);
  if (ls->srv) server_close(ls->srv);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->self_ref);
  ls->self_ref = LUA_NOREF;
  return 0;
}

/* srv:stats() -> { connections, by_transport = {...}, bytes_in, bytes_out,
 * writes, queued_bytes, errors = { http_400 = n, ..., ws_1002 = n } } */
static int server_stats_l(lua_State *L) {
  lua_server_t *ls = check_server(L);
  server_t *s = ls->srv;
  lua_Integer http = 0, sse = 0, ws = 0;
  for (conn_t *c = s->conns; c; c = c->next) {
    if (c->proto && c->proto->name[0] == 'w') ws++;
    else if (c->proto && c->proto->name[0] == 's') sse++;
    else http++;
  }
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, s->nconns);
  lua_setfield(L, -2, "connections");
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, http);
  lua_setfield(L, -2, "http");
  lua_pushinteger(L, sse);
  lua_setfield(L, -2, "sse");
  lua_pushinteger(L, ws);
  lua_setfield(L, -2, "ws");
  lua_setfield(L, -2, "by_transport");
  lua_pushinteger(L, (lua_Integer)s->stats.bytes_in);
  lua_setfield(L, -2, "bytes_in");
  lua_pushinteger(L, (lua_Integer)s->stats.bytes_out);
  lua_setfield(L, -2, "bytes_out");
  lua_pushinteger(L, (lua_Integer)s->stats.writes);
  lua_setfield(L, -2, "writes");
  lua_pushinteger(L, (lua_Integer)s->queued_bytes);
  lua_setfield(L, -2, "queued_bytes");
  lua_pushinteger(L, (lua_Integer)s->stats.slow_closed);
  lua_setfield(L, -2, "slow_closed");
  lua_createtable(L, 0, SERVER_ERROR_KINDS);
  for (int i = 0; i < SERVER_ERROR_KINDS; i++) {
    int code = server_error_codes[i];
    char kind[16];
    snprintf(kind, sizeof kind, code < 1000 ? "http_%d" : "ws_%d", code);
    lua_pushinteger(L, (lua_Integer)s->stats.errors[i]);
    lua_setfield(L, -2, kind);
  }
  lua_setfield(L, -2, "errors");
  return 1;
}

/* srv:queued_bytes() -> bytes its conns have waiting to be written */
static int server_queued_l(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_server(L)->srv->queued_bytes);
  return 1;
}

/* srv:listeners() -> how many sockets it accepts on */
static int server_listeners(lua_State *L) {
  lua_server_t *ls = check_server(L);
  lua_Integer n = 0;
  for (listener_t *l = ls->srv->listeners; l; l = l->next) n++;
  lua_pushinteger(L, n);
  return 1;
}

static int server_connections(lua_State *L) {
  lua_server_t *ls = check_server(L);
  lua_pushinteger(L, ls->srv->nconns);
  return 1;
}

static int server_gc(lua_State *L) {
  lua_server_t *ls = luaL_checkudata(L, 1, SERVER_MT);
  if (ls->srv) server_release(ls->srv);
  ls->srv = NULL;
  if (!ls->rt->closing) {
    luaL_unref(L, LUA_REGISTRYINDEX, ls->on_request_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ls->on_event_ref);
  }
  return 0;
}

http_header_t *bind_check_headers(lua_State *L, int idx, size_t *n) {
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_Integer count = luaL_len(L, idx) / 2;
  http_header_t *headers = lua_newuserdatauv(L, sizeof *headers * (size_t)(count ? count : 1), 0);
  for (lua_Integer i = 0; i < count; i++) {
    lua_rawgeti(L, idx, 2 * i + 1);
    lua_rawgeti(L, idx, 2 * i + 2);
    headers[i].name = luaL_checklstring(L, -2, &headers[i].name_len);
    headers[i].value = luaL_checklstring(L, -1, &headers[i].value_len);
    lua_pop(L, 2); /* still anchored by the table */
  }
  *n = (size_t)count;
  return headers;
}

/* conn:respond(status, headers, body): headers is a flat list
 * { name1, value1, name2, value2, ... }. Returns true, or nil and why. */
static int conn_respond(lua_State *L) {
  conn_t *c = check_conn(L);
  lua_Integer status = luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  size_t body_len = 0;
  const char *body = luaL_optlstring(L, 4, "", &body_len);
  if (!c) {
    lua_pushnil(L);
    lua_pushstring(L, "connection closed");
    return 2;
  }
  size_t n;
  http_header_t *headers = bind_check_headers(L, 3, &n);
  const char *err = NULL;
  if (http_respond(c, (int)status, headers, n, body, body_len, &err) != 0)
    return luaL_error(L, "respond: %s", err);
  lua_pushboolean(L, 1);
  return 1;
}

static int conn_close_l(lua_State *L) {
  conn_t *c = check_conn(L);
  if (c) conn_close(c);
  return 0;
}

/* conn:finish(): flush what is queued, then close */
static int conn_finish(lua_State *L) {
  conn_t *c = check_conn(L);
  if (c) conn_end(c);
  return 0;
}

static int conn_alive(lua_State *L) {
  lua_pushboolean(L, check_conn(L) != NULL);
  return 1;
}

/* conn:defer() -> whether the handler may answer later */
static int conn_defer(lua_State *L) {
  conn_t *c = bind_check_conn(L, 1);
  lua_pushboolean(L, c && http_defer(c) == 0);
  return 1;
}

static int conn_awaiting(lua_State *L) {
  conn_t *c = check_conn(L);
  lua_pushboolean(L, c && http_awaiting_response(c));
  return 1;
}

/* conn:peer() -> ip, port */
static int conn_peer(lua_State *L) {
  conn_t *c = check_conn(L);
  if (!c) return 0;
  struct sockaddr_storage addr;
  int len = sizeof addr;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&addr, &len) != 0) return 0;
  char ip[64] = "";
  int port;
  if (addr.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&addr, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in6 *)&addr)->sin6_port);
  } else {
    uv_ip4_name((struct sockaddr_in *)&addr, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in *)&addr)->sin_port);
  }
  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}

void bind_server_open(lua_State *L, int runtime_idx) {
  static const luaL_Reg server_methods[] = {
      {"listen", server_listen_l}, {"close", server_close_l}, {"reload_tls", server_reload_tls_l},
      {"stats", server_stats_l}, {"queued_bytes", server_queued_l}, {"listeners", server_listeners},
      {"connections", server_connections}, {"__gc", server_gc}, {NULL, NULL}};
  static const luaL_Reg conn_methods[] = {
      {"respond", conn_respond}, {"close", conn_close_l}, {"finish", conn_finish}, {"alive", conn_alive},
      {"awaiting", conn_awaiting}, {"defer", conn_defer}, {"peer", conn_peer}, {NULL, NULL}};
  bind_new_class(L, runtime_idx, SERVER_MT, server_methods);
  bind_new_class(L, runtime_idx, CONN_MT, conn_methods);
  lua_pushvalue(L, runtime_idx);
  lua_pushcclosure(L, core_server, 1);
  lua_setfield(L, -2, "server");
}
