/* A plain TCP client on the runtime's loop, for herald.test: specs speak to
 * a server in the same process over a real socket, byte for byte. */
#include <stdlib.h>
#include <string.h>

#include "lua_bind.h"
#include "server.h"

#define CLIENT_MT "herald.client"

struct client {
  uv_tcp_t tcp;
  uv_connect_t connect_req;
  runtime_t *rt;
  int fn_ref, self_ref;
  int closed;
  client_t **owner;
  client_t *prev, *next;
};

typedef struct client_write {
  uv_write_t req;
  char data[];
} client_write_t;

static void on_client_closed(uv_handle_t *h) {
  free(h->data);
}

/* L is the running thread, or NULL while the state closes. reset: close
 * with SO_LINGER 0, so the peer gets a RST (and loses what is unread). */
static void client_release_how(client_t *cl, lua_State *L, int reset) {
  if (cl->closed) return;
  cl->closed = 1;
  runtime_t *rt = cl->rt;
  if (cl->prev) cl->prev->next = cl->next;
  else rt->clients = cl->next;
  if (cl->next) cl->next->prev = cl->prev;
  if (cl->owner) *cl->owner = NULL;
  if (L) {
    luaL_unref(L, LUA_REGISTRYINDEX, cl->fn_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, cl->self_ref);
  }
  /* uv_tcp_close_reset refuses a handle with a shutdown under way */
  if (!reset || uv_tcp_close_reset(&cl->tcp, on_client_closed) != 0)
    uv_close((uv_handle_t *)&cl->tcp, on_client_closed);
}

static void client_release(client_t *cl, lua_State *L) {
  client_release_how(cl, L, 0);
}

void bind_client_close_all(runtime_t *rt) {
  while (rt->clients) client_release(rt->clients, NULL);
}

/* Calls the client's function with an event name and an optional string. */
static void emit(client_t *cl, const char *event, const char *data, size_t len) {
  lua_State *L = cl->rt->lua;
  if (!L || cl->rt->closing) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, cl->fn_ref);
  lua_pushstring(L, event);
  if (data) lua_pushlstring(L, data, len);
  else lua_pushnil(L);
  bind_call(cl->rt, 2);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  client_t *cl = h->data;
  buf->base = cl->rt->read_buf;
  buf->len = sizeof cl->rt->read_buf;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  client_t *cl = s->data;
  if (n > 0) {
    emit(cl, "data", buf->base, (size_t)n);
  } else if (n == UV_EOF) {
    uv_read_stop(s);
    emit(cl, "eof", NULL, 0);
  } else if (n < 0) {
    const char *name = uv_err_name((int)n);
    emit(cl, "error", name, strlen(name));
    client_release(cl, cl->rt->lua);
  }
}

static void on_connect(uv_connect_t *req, int status) {
  client_t *cl = req->data;
  if (cl->closed) return;
  if (status < 0) {
    const char *name = uv_err_name(status);
    emit(cl, "error", name, strlen(name));
    client_release(cl, cl->rt->lua);
    return;
  }
  uv_read_start((uv_stream_t *)&cl->tcp, on_alloc, on_read);
  emit(cl, "connect", NULL, 0);
}

/* connect(host, port, fn) -> client; fn(event, data) gets "connect",
 * "data", "eof" and "error" */
static int core_connect(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  struct sockaddr_storage addr;
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)&addr) != 0)
    return luaL_argerror(L, 1, "not a numeric IPv4 or IPv6 address");
  server_ignore_sigpipe(); /* writing to a server that reset must not end the process */
  client_t *cl = calloc(1, sizeof *cl);
  if (!cl) return luaL_error(L, "out of memory");
  client_t **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = cl;
  luaL_setmetatable(L, CLIENT_MT);
  cl->rt = rt;
  cl->owner = ud;
  lua_pushvalue(L, 3);
  cl->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  cl->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_tcp_init(&rt->loop, &cl->tcp);
  cl->tcp.data = cl;
  cl->connect_req.data = cl;
  cl->next = rt->clients;
  if (rt->clients) rt->clients->prev = cl;
  rt->clients = cl;
  int rc = uv_tcp_connect(&cl->connect_req, &cl->tcp, (struct sockaddr *)&addr, on_connect);
  if (rc < 0) {
    client_release(cl, L);
    return bind_uv_error(L, rc);
  }
  return 1;
}

static client_t *check_client(lua_State *L) {
  client_t **ud = luaL_checkudata(L, 1, CLIENT_MT);
  return *ud;
}

static void on_write(uv_write_t *req, int status) {
  (void)status; /* a failed write shows up as a read error or EOF */
  free(req);
}

static int client_write(lua_State *L) {
  client_t *cl = check_client(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (!cl) return luaL_error(L, "client is closed");
  client_write_t *w = malloc(sizeof *w + len);
  if (!w) return luaL_error(L, "out of memory");
  memcpy(w->data, data, len);
  uv_buf_t buf = uv_buf_init(w->data, (unsigned)len);
  int rc = uv_write(&w->req, (uv_stream_t *)&cl->tcp, &buf, 1, on_write);
  if (rc < 0) {
    free(w);
    return bind_uv_error(L, rc);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  (void)status;
  free(req);
}

static int client_shutdown(lua_State *L) {
  client_t *cl = check_client(L);
  if (!cl) return 0;
  uv_shutdown_t *req = malloc(sizeof *req);
  if (req && uv_shutdown(req, (uv_stream_t *)&cl->tcp, on_shutdown) != 0) free(req);
  return 0;
}

static int client_close(lua_State *L) {
  client_t *cl = check_client(L);
  if (cl) client_release(cl, L);
  return 0;
}

/* reset(): close at once with a RST instead of a FIN (SO_LINGER 0), as a
 * peer that crashes or drops its socket with unread data does. */
static int client_reset(lua_State *L) {
  client_t *cl = check_client(L);
  if (cl) client_release_how(cl, L, 1);
  return 0;
}

/* pause()/resume(): stop and restart reading, to act as a slow reader. */
static int client_pause(lua_State *L) {
  client_t *cl = check_client(L);
  if (cl) uv_read_stop((uv_stream_t *)&cl->tcp);
  return 0;
}

static int client_resume(lua_State *L) {
  client_t *cl = check_client(L);
  if (cl) uv_read_start((uv_stream_t *)&cl->tcp, on_alloc, on_read);
  return 0;
}

void bind_client_open(lua_State *L, int runtime_idx) {
  static const luaL_Reg methods[] = {{"write", client_write}, {"shutdown", client_shutdown},
                                     {"close", client_close}, {"reset", client_reset},
                                     {"pause", client_pause},
                                     {"resume", client_resume}, {NULL, NULL}};
  bind_new_class(L, runtime_idx, CLIENT_MT, methods);
  lua_pushvalue(L, runtime_idx);
  lua_pushcclosure(L, core_connect, 1);
  lua_setfield(L, -2, "connect");
}
