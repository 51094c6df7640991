/* The Lua face of a conn's WebSocket: the handshake's accept key, start,
 * send, ping and close. Handshake checks and subprotocol choice are Lua's. */
#include <string.h>

#include "conn.h"
#include "lua_bind.h"
#include "ws.h"

static int result(lua_State *L, conn_t *c, int rc, const char *err) {
  if (!c) {
    lua_pushnil(L);
    lua_pushliteral(L, "connection closed");
    return 2;
  }
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ws_accept(key) -> the Sec-WebSocket-Accept value */
static int core_ws_accept(lua_State *L) {
  size_t len;
  const char *key = luaL_checklstring(L, 1, &len);
  char out[29];
  if (ws_accept_key(bind_runtime(L)->sha1, key, len, out) != 0) return luaL_error(L, "ws_accept: SHA-1 failed");
  lua_pushstring(L, out);
  return 1;
}

/* conn:ws_start(headers, max_message, ping_ms, envelope, last_id, max_rate, rate_drop)
 * -> true | nil, why */
static int conn_ws_start(lua_State *L) {
  conn_t *c = bind_check_conn(L, 1);
  size_t n;
  http_header_t *headers = bind_check_headers(L, 2, &n);
  lua_Integer max_message = luaL_checkinteger(L, 3), ping = luaL_checkinteger(L, 4);
  luaL_argcheck(L, max_message > 0, 3, "must be > 0");
  luaL_argcheck(L, ping >= 0 && ping <= UINT32_MAX, 4, "out of range");
  lua_Integer rate = luaL_optinteger(L, 7, 0);
  luaL_argcheck(L, rate >= 0 && rate <= UINT32_MAX, 7, "out of range");
  ws_options_t o = {(size_t)max_message, (uint32_t)ping, lua_toboolean(L, 5), (uint32_t)rate,
                    lua_toboolean(L, 8)};
  const char *last_id = luaL_optstring(L, 6, NULL);
  const char *err = NULL;
  int rc = c ? ws_start(c, headers, n, &o, last_id, &err) : 0;
  return result(L, c, rc, err);
}

/* conn:ws_send(data, kind) with kind "text" (default), "binary" or "ping" */
static int conn_ws_send(lua_State *L) {
  static const char *const kinds[] = {"text", "binary", "ping", NULL};
  static const int opcodes[] = {WS_TEXT, WS_BINARY, WS_PING};
  conn_t *c = bind_check_conn(L, 1);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  int op = opcodes[luaL_checkoption(L, 3, "text", kinds)];
  const char *err = NULL;
  int rc = c ? ws_send(c, data, len, op, &err) : 0;
  if (rc != 0 && strcmp(err, "out of memory") != 0 && strcmp(err, "closing") != 0)
    return luaL_argerror(L, 2, err);
  return result(L, c, rc, err);
}

/* conn:ws_close(code, reason) */
static int conn_ws_close(lua_State *L) {
  conn_t *c = bind_check_conn(L, 1);
  lua_Integer code = luaL_optinteger(L, 2, WS_NORMAL);
  size_t len;
  const char *reason = luaL_optlstring(L, 3, "", &len);
  const char *err = NULL;
  if (c && ws_close(c, (int)code, reason, len, &err) != 0) return luaL_error(L, "close: %s", err);
  return result(L, c, 0, NULL);
}

void bind_ws_open(lua_State *L, int runtime_idx) {
  static const luaL_Reg conn_methods[] = {
      {"ws_start", conn_ws_start}, {"ws_send", conn_ws_send}, {"ws_close", conn_ws_close},
      {NULL, NULL}};
  luaL_getmetatable(L, "herald.conn");
  lua_pushvalue(L, runtime_idx);
  luaL_setfuncs(L, conn_methods, 1);
  lua_pop(L, 1);
  ((runtime_t *)lua_touserdata(L, runtime_idx))->sha1 = ws_sha1_new();
  lua_pushvalue(L, runtime_idx);
  lua_pushcclosure(L, core_ws_accept, 1);
  lua_setfield(L, -2, "ws_accept");
}
