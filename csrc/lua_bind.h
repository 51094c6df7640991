/* Shared by the Lua bindings: how C reaches Lua and back. */
#ifndef HERALD_LUA_BIND_H
#define HERALD_LUA_BIND_H

#include <lauxlib.h>
#include <lua.h>
#include <signal.h>

#include "runtime.h"

/* Every core function has the runtime as its first upvalue. */
#define bind_runtime(L) ((runtime_t *)lua_touserdata((L), lua_upvalueindex(1)))

/* The only way from a libuv callback into Lua: calls the function below
 * nargs arguments on the running thread's stack with a traceback handler;
 * an error goes to the runtime's logger. Returns 1 when the call succeeded.
 * Leaves nothing on the stack. */
int bind_call(runtime_t *rt, int nargs);

/* For a failed libuv call: pushes nil, "ENAME: message", "ENAME"; returns 3. */
int bind_uv_error(lua_State *L, int rc);

/* Reads an integer field of an options table that the Lua half validated. */
lua_Integer bind_opt_integer(lua_State *L, int idx, const char *name, lua_Integer dflt);

/* Registers a metatable under name with methods (and __index to them),
 * each with the runtime at runtime_idx as upvalue. */
void bind_new_class(lua_State *L, int runtime_idx, const char *name, const luaL_Reg *methods);

/* Adds the layer's functions to the module table on the top of the stack,
 * each with the runtime (at runtime_idx) as upvalue. */
void bind_server_open(lua_State *L, int runtime_idx);
void bind_client_open(lua_State *L, int runtime_idx);

typedef struct conn conn_t;
typedef struct http_header http_header_t;

/* A conn's Lua handle (made once per conn); the conn from the handle at idx,
 * NULL once it is closed. */
void bind_push_conn(lua_State *L, conn_t *c);
conn_t *bind_check_conn(lua_State *L, int idx);
/* The same, but also while the conn ends (no more output, not yet closed). */
conn_t *bind_check_conn_ending(lua_State *L, int idx);

/* Reads a flat list { name1, value1, ... } at idx into headers kept alive by
 * a userdata left on the stack; *n is the count. */
http_header_t *bind_check_headers(lua_State *L, int idx, size_t *n);

void bind_hub_open(lua_State *L, int runtime_idx);
void bind_ws_open(lua_State *L, int runtime_idx);
void bind_broker_open(lua_State *L, int runtime_idx);
void bind_workers_open(lua_State *L, int runtime_idx);

/* herald.run's loop on thread L: serves until stop() or SIGINT/SIGTERM,
 * drains, returns. mask: the signal mask to set once its signal handlers
 * are in place (a worker starts with them blocked), or NULL. */
void bind_serve(lua_State *L, runtime_t *rt, const sigset_t *mask);

/* Closes what the binding owns when the Lua state closes. */
void bind_client_close_all(runtime_t *rt);

#endif
