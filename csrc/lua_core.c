/* herald.core: the runtime (loop, run/stop, drain), timers, and the entry
 * point that registers every layer's binding. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "conn.h"
#include "lua_bind.h"
#include "server.h"
#include "ws.h"

#define RUNTIME_MT "herald.runtime"
#define TIMER_MT "herald.timer"

/* ---- the runtime ---- */

const char *runtime_date(runtime_t *rt) {
  int64_t now = (int64_t)(uv_now(&rt->loop) / 1000);
  if (now != rt->date_sec || !rt->date[0]) {
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(rt->date, sizeof rt->date, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    rt->date_sec = now;
  }
  return rt->date;
}

/* Through the Lua logger (herald.on_error) when there is one to call. */
void runtime_log(runtime_t *rt, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  lua_State *L = rt->lua;
  if (L && !rt->closing && rt->on_error_ref != LUA_NOREF && lua_checkstack(L, 2)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, rt->on_error_ref);
    lua_pushstring(L, msg);
    if (lua_pcall(L, 1, 0, 0) == LUA_OK) return;
    lua_pop(L, 1);
  }
  fprintf(stderr, "herald: %s\n", msg);
}

static void on_flush(uv_prepare_t *h) {
  conn_flush_all(h->data);
}

static void finish_drain(runtime_t *rt) {
  uv_timer_stop(&rt->drain_timer);
  rt->stopped = 1;
  uv_stop(&rt->loop);
}

void runtime_check_drained(runtime_t *rt) {
  if (!rt->draining || rt->stopped) return;
  for (server_t *s = rt->servers; s; s = s->next_in_rt)
    if (s->nconns > 0) return;
  finish_drain(rt);
}

static void on_drain_timeout(uv_timer_t *t) {
  runtime_t *rt = t->data;
  for (server_t *s = rt->servers; s; s = s->next_in_rt) server_force_close(s);
  finish_drain(rt); /* the closes complete in run()'s last turn */
}

void runtime_drain(runtime_t *rt) {
  if (rt->draining) return;
  rt->draining = 1;
  uint64_t bound = 0;
  for (server_t *s = rt->servers, *next; s; s = next) {
    next = s->next_in_rt; /* server_close may free an orphan */
    if (s->limits.shutdown_timeout_ms > bound) bound = s->limits.shutdown_timeout_ms;
    server_close(s);
  }
  uv_timer_start(&rt->drain_timer, on_drain_timeout, bound, 0);
  runtime_check_drained(rt);
}

int runtime_after_fork(runtime_t *rt) {
  int rc = uv_loop_fork(&rt->loop);
  for (runtime_fork_hook_t *h = rt->fork_hooks; h; h = h->next) h->after_fork(h->ud);
  return rc;
}

void runtime_add_fork_hook(runtime_t *rt, runtime_fork_hook_t *hook) {
  hook->next = rt->fork_hooks;
  rt->fork_hooks = hook;
}

void runtime_remove_fork_hook(runtime_t *rt, runtime_fork_hook_t *hook) {
  for (runtime_fork_hook_t **p = &rt->fork_hooks; *p; p = &(*p)->next)
    if (*p == hook) {
      *p = hook->next;
      return;
    }
}

static void on_signal(uv_signal_t *h, int signum) {
  runtime_t *rt = h->data;
  if (signum != SIGHUP) {
    runtime_drain(rt);
    return;
  }
  /* SIGHUP: new certificates for new connections; a bad one keeps the old. */
  for (server_t *s = rt->servers; s; s = s->next_in_rt) {
    char err[512];
    if (server_reload_tls(s, err, sizeof err) != 0) runtime_log(rt, "SIGHUP: %s (kept the old certificates)", err);
  }
}

int bind_call(runtime_t *rt, int nargs) {
  lua_State *L = rt->lua;
  int base = lua_gettop(L) - nargs;
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  lua_remove(L, -2);
  lua_insert(L, base);
  int ok = lua_pcall(L, nargs, 0, base) == LUA_OK;
  if (!ok) {
    const char *msg = lua_tostring(L, -1);
    int logged = 0;
    if (rt->on_error_ref != LUA_NOREF) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, rt->on_error_ref);
      lua_pushvalue(L, -2);
      logged = lua_pcall(L, 1, 0, 0) == LUA_OK;
      if (!logged) lua_pop(L, 1);
    }
    if (!logged) runtime_log(rt, "%s", msg ? msg : "(error object is not a string)");
    lua_pop(L, 1);
  }
  lua_remove(L, base);
  return ok;
}

int bind_uv_error(lua_State *L, int rc) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", uv_err_name(rc), uv_strerror(rc));
  lua_pushstring(L, uv_err_name(rc));
  return 3;
}

lua_Integer bind_opt_integer(lua_State *L, int idx, const char *name, lua_Integer dflt) {
  lua_getfield(L, idx, name);
  lua_Integer v = lua_isnil(L, -1) ? dflt : luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  return v;
}

void bind_new_class(lua_State *L, int runtime_idx, const char *name, const luaL_Reg *methods) {
  luaL_newmetatable(L, name);
  lua_pushvalue(L, runtime_idx); /* every method's upvalue */
  luaL_setfuncs(L, methods, 1);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

void bind_serve(lua_State *L, runtime_t *rt, const sigset_t *mask) {
  void *outer = rt->lua;
  rt->lua = L;
  rt->running = 1;
  rt->stopped = 0;
  uv_signal_start(&rt->sigint, on_signal, SIGINT);
  uv_signal_start(&rt->sigterm, on_signal, SIGTERM);
  uv_signal_start(&rt->sighup, on_signal, SIGHUP);
  if (mask) pthread_sigmask(SIG_SETMASK, mask, NULL); /* what came while blocked lands here */
  while (!rt->stopped) {
    if (!uv_run(&rt->loop, UV_RUN_ONCE) && !rt->draining) break; /* nothing left to serve */
  }
  uv_run(&rt->loop, UV_RUN_NOWAIT); /* let the last closes complete */
  uv_signal_stop(&rt->sigint);
  uv_signal_stop(&rt->sigterm);
  uv_signal_stop(&rt->sighup);
  rt->running = 0;
  rt->draining = 0;
  rt->lua = outer;
}

/* run(): serves until stop() or SIGINT/SIGTERM, drains, and returns. */
static int core_run(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  if (rt->running) return luaL_error(L, "herald.run: already running");
  bind_serve(L, rt, NULL);
  return 0;
}

/* stop(): drains this process; in a worker, asks the master to stop them all. */
static int core_stop(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  if (rt->master_pid && getppid() == rt->master_pid) kill(rt->master_pid, SIGTERM);
  if (rt->running) runtime_drain(rt);
  return 0;
}

static void on_tick(uv_timer_t *t) {
  (void)t;
}

void runtime_run_once(runtime_t *rt, void *L, int64_t timeout_ms) {
  void *outer = rt->lua;
  rt->lua = L;
  uv_timer_start(&rt->tick_timer, on_tick, timeout_ms > 0 ? (uint64_t)timeout_ms : 0, 0);
  uv_run(&rt->loop, UV_RUN_ONCE);
  uv_timer_stop(&rt->tick_timer);
  rt->lua = outer;
}

/* run_once(timeout_ms): one loop turn that waits at most timeout_ms; for
 * herald.test, which drives the loop from a spec. Returns whether anything
 * keeps the loop alive. */
static int core_run_once(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  lua_Integer timeout = luaL_optinteger(L, 1, 0);
  if (rt->running) return luaL_error(L, "herald: run_once inside run");
  runtime_run_once(rt, L, timeout);
  lua_pushboolean(L, uv_loop_alive(&rt->loop));
  return 1;
}

/* pid(): this process's id (a worker's, after a fork). */
static int core_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  return 1;
}

static int core_now(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  uv_update_time(&rt->loop);
  lua_pushinteger(L, (lua_Integer)uv_now(&rt->loop));
  return 1;
}

static int core_hrtime(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_hrtime());
  return 1;
}

static int core_on_error(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, rt->on_error_ref);
  lua_pushvalue(L, 1);
  rt->on_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* ---- timers ---- */

struct htimer {
  uv_timer_t handle;
  runtime_t *rt;
  int fn_ref, self_ref;
  int cancelled;
  htimer_t **owner;    /* the userdata's pointer, cleared when this goes */
  htimer_t *prev, *next;
};

static void on_timer_closed(uv_handle_t *h) {
  free(h->data);
}

/* L is the running thread, or NULL while the state closes. */
static void timer_release(htimer_t *t, lua_State *L) {
  if (t->cancelled) return;
  t->cancelled = 1;
  runtime_t *rt = t->rt;
  if (t->prev) t->prev->next = t->next;
  else rt->timers = t->next;
  if (t->next) t->next->prev = t->prev;
  if (t->owner) *t->owner = NULL;
  if (L) {
    luaL_unref(L, LUA_REGISTRYINDEX, t->fn_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);
  }
  uv_close((uv_handle_t *)&t->handle, on_timer_closed);
}

static void on_timer(uv_timer_t *h) {
  htimer_t *t = h->data;
  lua_State *L = t->rt->lua;
  int repeating = uv_timer_get_repeat(h) > 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
  bind_call(t->rt, 0);
  if (!repeating) timer_release(t, L);
}

/* timer(delay_ms, repeat_ms, fn) -> handle with :cancel() */
static int core_timer(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  lua_Integer delay = luaL_checkinteger(L, 1), repeat = luaL_checkinteger(L, 2);
  luaL_argcheck(L, delay >= 0, 1, "must be >= 0");
  luaL_argcheck(L, repeat >= 0, 2, "must be >= 0");
  luaL_checktype(L, 3, LUA_TFUNCTION);
  htimer_t *t = calloc(1, sizeof *t);
  if (!t) return luaL_error(L, "out of memory");
  htimer_t **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = t;
  luaL_setmetatable(L, TIMER_MT);
  t->rt = rt;
  t->owner = ud;
  lua_pushvalue(L, 3);
  t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* an active timer outlives its handle */
  uv_timer_init(&rt->loop, &t->handle);
  t->handle.data = t;
  t->next = rt->timers;
  if (rt->timers) rt->timers->prev = t;
  rt->timers = t;
  uv_timer_start(&t->handle, on_timer, (uint64_t)delay, (uint64_t)repeat);
  return 1;
}

static int timer_cancel(lua_State *L) {
  htimer_t **ud = luaL_checkudata(L, 1, TIMER_MT);
  if (*ud) timer_release(*ud, L);
  return 0;
}

static int timer_active(lua_State *L) {
  htimer_t **ud = luaL_checkudata(L, 1, TIMER_MT);
  lua_pushboolean(L, *ud != NULL);
  return 1;
}

/* ---- closing the state ---- */

static void close_owned(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

static int runtime_gc(lua_State *L) {
  runtime_t *rt = lua_touserdata(L, 1);
  rt->closing = 1;
  while (rt->timers) timer_release(rt->timers, NULL);
  bind_client_close_all(rt);
  for (server_t *s = rt->servers, *next; s; s = next) {
    next = s->next_in_rt;
    server_force_close(s);
    server_release(s); /* frees it once its conns are closed */
  }
  /* What is left is the runtime's own handles, closed without callbacks. */
  uv_run(&rt->loop, UV_RUN_NOWAIT);
  uv_walk(&rt->loop, close_owned, NULL);
  uv_run(&rt->loop, UV_RUN_DEFAULT);
  uv_loop_close(&rt->loop);
  conn_timeouts_free(rt);
  ws_sha1_free(rt->sha1);
  return 0;
}

static int runtime_new(lua_State *L) {
  runtime_t *rt = lua_newuserdatauv(L, sizeof *rt, 0);
  memset(rt, 0, sizeof *rt);
  rt->on_error_ref = LUA_NOREF;
  rt->worker_index = rt->worker_count = 1;
  int rc = uv_loop_init(&rt->loop);
  if (rc) return luaL_error(L, "herald: uv_loop_init: %s", uv_strerror(rc));
  luaL_newmetatable(L, RUNTIME_MT);
  lua_pushcfunction(L, runtime_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  uv_prepare_init(&rt->loop, &rt->flusher);
  rt->flusher.data = rt;
  uv_prepare_start(&rt->flusher, on_flush);
  uv_unref((uv_handle_t *)&rt->flusher);
  uv_idle_init(&rt->loop, &rt->flush_more);
  uv_unref((uv_handle_t *)&rt->flush_more);
  uv_timer_init(&rt->loop, &rt->drain_timer);
  rt->drain_timer.data = rt;
  uv_timer_init(&rt->loop, &rt->tick_timer);
  conn_timeouts_init(rt);
  uv_signal_init(&rt->loop, &rt->sigint);
  uv_signal_init(&rt->loop, &rt->sigterm);
  uv_signal_init(&rt->loop, &rt->sighup);
  rt->sigint.data = rt->sigterm.data = rt->sighup.data = rt;
  uv_unref((uv_handle_t *)&rt->sigint);
  uv_unref((uv_handle_t *)&rt->sigterm);
  uv_unref((uv_handle_t *)&rt->sighup);
  return 1;
}

__attribute__((visibility("default"))) int luaopen_herald_core(lua_State *L) {
  static const luaL_Reg functions[] = {
      {"run", core_run},       {"stop", core_stop}, {"run_once", core_run_once},
      {"now", core_now},       {"hrtime", core_hrtime}, {"on_error", core_on_error},
      {"timer", core_timer},   {"pid", core_pid},       {NULL, NULL},
  };
  static const luaL_Reg timer_methods[] = {
      {"cancel", timer_cancel}, {"active", timer_active}, {NULL, NULL}};
  runtime_new(L);
  int rt_idx = lua_gettop(L);
  /* The runtime lives as long as the state: the registry holds it. */
  lua_pushvalue(L, rt_idx);
  lua_setfield(L, LUA_REGISTRYINDEX, "herald.runtime.instance");
  bind_new_class(L, rt_idx, TIMER_MT, timer_methods);
  lua_newtable(L);
  lua_pushvalue(L, rt_idx);
  luaL_setfuncs(L, functions, 1);
  bind_server_open(L, rt_idx);
  bind_client_open(L, rt_idx);
  bind_hub_open(L, rt_idx);
  bind_ws_open(L, rt_idx);
  bind_broker_open(L, rt_idx);
  bind_workers_open(L, rt_idx);
  lua_pushstring(L, uv_version_string());
  lua_setfield(L, -2, "libuv_version");
  return 1;
}
