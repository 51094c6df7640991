/* workers: herald.run { workers = N }. The master forks N workers that each
 * serve every listener the apps bound, restarts one that dies unasked, and
 * hands SIGTERM/SIGINT (drain) and SIGHUP (TLS reload) on to them. While it
 * supervises it runs none of the apps' handles (listeners, timers, brokers)
 * and no Lua but herald.on_error's logger for its own log lines: only a
 * small libuv loop of its own with four signal handles and a few timers.
 *
 * Why a loop of its own rather than sigsuspend/sigtimedwait and waitpid:
 * libuv catches a signal with a process-wide handler that writes to the
 * loop's pipe, so it does not matter which thread the kernel hands the
 * signal to; sigwait needs it blocked in every thread, threads that
 * libraries start included (the Redis broker resolves names on libuv's
 * thread pool), which herald does not control. And the restart
 * backoff and the shutdown deadline are plain timers. The price is paid in
 * each child: it renews that loop (uv_loop_fork: otherwise closing it would
 * poll the master's epoll and read the master's signal pipe) only to close
 * it, and it keeps the signals blocked from before the fork until its own
 * handlers are in place, so a signal sent right after the fork is neither
 * lost nor written to the master's pipe by the inherited handler.
 *
 * Port sharing (SO_REUSEPORT): the master sets SO_REUSEPORT on each
 * listener it bound; worker 1 keeps the master's sockets (inherited); every
 * other worker closes its inherited copies and binds sockets of its own on
 * the same addresses with SO_REUSEPORT, and the kernel spreads new
 * connections across them. The master closes its copies once the first
 * workers are forked, so no socket is left that nobody accepts on. A
 * restarted worker binds new sockets too. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lua_bind.h"
#include "server.h"
#include "tls.h"

#define MAX_WORKERS 1024
#define WINDOW_MS 60000      /* a worker's restarts are counted per minute */
#define BACKOFF_FIRST_MS 100 /* the second restart within it waits this, then twice as long */
#define BACKOFF_MAX_MS 5000
#define KILL_MARGIN_MS 2000  /* past the longest shutdown_timeout: SIGKILL */

/* One listener, as a worker binds its address again. */
typedef struct bound {
  server_t *server;
  struct sockaddr_storage addr;
  int backlog;
  tls_config_t *tls;   /* a reference of our own; NULL: plain TCP */
} bound_t;

typedef struct worker {
  int pid;               /* 0: not running */
  int due;               /* to fork at the next turn */
  unsigned restarts;     /* since window_start */
  uint64_t window_start;
  uv_timer_t backoff;    /* until it is due again */
} worker_t;

typedef struct master {
  uv_loop_t loop;
  uv_signal_t sigchld, sigterm, sigint, sighup;
  uv_timer_t deadline;   /* SIGKILL for workers that outlive the drain */
  runtime_t *rt;
  int pid;
  int n;
  unsigned max_restarts;
  uint64_t kill_after_ms;
  int stopping;
  int shared;            /* the master still holds the listeners it bound */
  int child;             /* in a forked child: its worker number */
  bound_t *bound;
  size_t nbound;
  char failure[256];     /* why it gave up, or "" */
  worker_t workers[];
} master_t;

static int alive(const master_t *m) {
  for (int i = 0; i < m->n; i++)
    if (m->workers[i].pid) return 1;
  return 0;
}

static void describe(int status, char *buf, size_t len) {
  if (WIFSIGNALED(status))
    snprintf(buf, len, "killed by signal %d (%s)%s", WTERMSIG(status), strsignal(WTERMSIG(status)),
             WCOREDUMP(status) ? ", core dumped" : "");
  else
    snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
}

static void on_deadline(uv_timer_t *t) {
  master_t *m = t->data;
  for (int i = 0; i < m->n; i++) {
    worker_t *w = &m->workers[i];
    if (!w->pid) continue;
    runtime_log(m->rt, "worker %d (pid %d) still runs %llu ms after SIGTERM: SIGKILL", i + 1, w->pid,
                (unsigned long long)m->kill_after_ms);
    kill(w->pid, SIGKILL);
  }
}

/* SIGTERM to every worker (again, if asked again); none restarts after it. */
static void stop_all(master_t *m) {
  if (!m->stopping) uv_timer_start(&m->deadline, on_deadline, m->kill_after_ms, 0);
  m->stopping = 1;
  for (int i = 0; i < m->n; i++) {
    worker_t *w = &m->workers[i];
    uv_timer_stop(&w->backoff);
    w->due = 0;
    if (w->pid) kill(w->pid, SIGTERM);
  }
}

static void on_backoff(uv_timer_t *t) {
  worker_t *w = t->data;
  w->due = 1; /* forked by the supervising loop, outside any libuv callback */
}

/* Worker i (pid, or 0 when it could not be forked) is gone: how says why. */
static void gone(master_t *m, int i, int pid, const char *how, int clean) {
  worker_t *w = &m->workers[i];
  w->pid = 0;
  if (m->stopping) {
    if (!clean) runtime_log(m->rt, "worker %d (pid %d) %s while stopping", i + 1, pid, how);
    return;
  }
  uint64_t now = uv_now(&m->loop);
  if (w->restarts == 0 || now - w->window_start >= WINDOW_MS) {
    w->restarts = 0;
    w->window_start = now;
  }
  if (w->restarts >= m->max_restarts) {
    snprintf(m->failure, sizeof m->failure,
             "worker %d (pid %d) %s after %u restart%s within a minute (max_restarts = %u): gave up",
             i + 1, pid, how, w->restarts, w->restarts == 1 ? "" : "s", m->max_restarts);
    runtime_log(m->rt, "%s; stopping the other workers", m->failure);
    stop_all(m);
    return;
  }
  uint64_t delay = 0;
  if (w->restarts > 0) {
    delay = BACKOFF_FIRST_MS;
    for (unsigned k = 1; k < w->restarts && delay < BACKOFF_MAX_MS; k++) delay *= 2;
    if (delay > BACKOFF_MAX_MS) delay = BACKOFF_MAX_MS;
  }
  w->restarts++;
  if (delay) runtime_log(m->rt, "worker %d (pid %d) %s: restarting it in %llu ms", i + 1, pid, how,
                         (unsigned long long)delay);
  else runtime_log(m->rt, "worker %d (pid %d) %s: restarting it", i + 1, pid, how);
  uv_timer_start(&w->backoff, on_backoff, delay, 0);
}

static void reap(master_t *m) {
  for (int i = 0; i < m->n; i++) {
    worker_t *w = &m->workers[i];
    int status, pid = w->pid;
    if (!pid || waitpid(pid, &status, WNOHANG) != pid) continue;
    char how[128];
    describe(status, how, sizeof how);
    gone(m, i, pid, how, WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
}

/* New certificates for the workers the master forks from now on; per
 * server, all or nothing, as each worker does (and logs) on its SIGHUP. */
static void reload_tls(master_t *m) {
  tls_config_t **fresh = calloc(m->nbound ? m->nbound : 1, sizeof *fresh);
  char *failed = calloc(m->nbound ? m->nbound : 1, 1);
  if (!fresh || !failed) goto done;
  char err[512];
  for (size_t i = 0; i < m->nbound; i++) {
    if (!m->bound[i].tls || (fresh[i] = tls_config_reload(m->bound[i].tls, err, sizeof err))) continue;
    for (size_t j = 0; j < m->nbound; j++) failed[j] |= m->bound[j].server == m->bound[i].server;
  }
  for (size_t i = 0; i < m->nbound; i++) {
    if (!fresh[i]) continue;
    if (failed[i]) {
      tls_config_unref(fresh[i]);
    } else {
      tls_config_unref(m->bound[i].tls);
      m->bound[i].tls = fresh[i];
    }
  }
done:
  free(fresh);
  free(failed);
}

static void on_signal(uv_signal_t *h, int signum) {
  master_t *m = h->data;
  if (signum == SIGCHLD) {
    reap(m);
  } else if (signum == SIGHUP) {
    for (int i = 0; i < m->n; i++)
      if (m->workers[i].pid) kill(m->workers[i].pid, SIGHUP);
    reload_tls(m);
  } else {
    stop_all(m);
  }
}

/* Forks worker i; returns 1 in the child. */
static int spawn(master_t *m, int i) {
  worker_t *w = &m->workers[i];
  w->due = 0;
  fflush(NULL); /* else what stdio holds would be written by every process */
  int pid = fork();
  if (pid == 0) {
    m->child = i + 1;
    return 1;
  }
  if (pid > 0) {
    w->pid = pid;
  } else {
    char how[128];
    snprintf(how, sizeof how, "could not be forked (%s)", strerror(errno));
    gone(m, i, 0, how, 0);
  }
  return 0;
}

static void close_loop(master_t *m) {
  uv_close((uv_handle_t *)&m->sigchld, NULL);
  uv_close((uv_handle_t *)&m->sigterm, NULL);
  uv_close((uv_handle_t *)&m->sigint, NULL);
  uv_close((uv_handle_t *)&m->sighup, NULL);
  uv_close((uv_handle_t *)&m->deadline, NULL);
  for (int i = 0; i < m->n; i++) uv_close((uv_handle_t *)&m->workers[i].backoff, NULL);
  uv_run(&m->loop, UV_RUN_DEFAULT);
  uv_loop_close(&m->loop);
}

static void free_master(master_t *m) {
  for (size_t i = 0; i < m->nbound; i++) tls_config_unref(m->bound[i].tls);
  free(m->bound);
  free(m);
}

static void format_addr(const struct sockaddr_storage *a, char *buf, size_t len) {
  char ip[64] = "?";
  int port;
  if (a->ss_family == AF_INET6) {
    uv_ip6_name((const struct sockaddr_in6 *)a, ip, sizeof ip);
    port = ntohs(((const struct sockaddr_in6 *)a)->sin6_port);
  } else {
    uv_ip4_name((const struct sockaddr_in *)a, ip, sizeof ip);
    port = ntohs(((const struct sockaddr_in *)a)->sin_port);
  }
  snprintf(buf, len, "%s port %d", ip, port);
}

/* In the child: leaves the master's loop, renews the runtime, takes its
 * listeners, and serves. Returns "worker", whether it served. */
static int become_worker(lua_State *L, master_t *m, const sigset_t *mask) {
  runtime_t *rt = m->rt;
  int index = m->child;
  /* If the master dies, the kernel sends SIGTERM and this worker drains;
   * if it died already, nobody would. */
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != m->pid) _exit(1);
  if (uv_loop_fork(&m->loop) != 0) _exit(1);
  close_loop(m);
  int ok = 1, rc = runtime_after_fork(rt);
  if (rc != 0) {
    runtime_log(rt, "worker %d: uv_loop_fork: %s", index, uv_strerror(rc));
    ok = 0;
  }
  if (ok && !(m->shared && index == 1)) {
    for (server_t *s = rt->servers; s; s = s->next_in_rt) server_close_listeners(s);
    for (size_t i = 0; i < m->nbound && ok; i++) {
      bound_t *b = &m->bound[i];
      rc = server_listen_addr(b->server, (struct sockaddr *)&b->addr, b->backlog,
                              b->tls ? tls_config_ref(b->tls) : NULL, 1);
      if (rc >= 0) continue;
      char where[96];
      format_addr(&b->addr, where, sizeof where);
      runtime_log(rt, "worker %d: listen on %s: %s", index, where, uv_strerror(rc));
      tls_config_unref(b->tls);
      ok = 0;
    }
  }
  rt->worker_index = index;
  rt->worker_count = m->n;
  rt->master_pid = m->pid;
  free_master(m);
  if (ok && lua_isfunction(L, 3)) { /* the Lua half's ready(): the brokers connect first */
    void *outer = rt->lua;
    rt->lua = L;
    lua_pushvalue(L, 3);
    bind_call(rt, 0);
    rt->lua = outer;
  }
  lua_pushliteral(L, "worker");
  if (ok) bind_serve(L, rt, mask);
  lua_pushboolean(L, ok);
  return 2;
}

/* workers(n, max_restarts, ready): in the master, supervises n workers until
 * SIGTERM/SIGINT (or a worker's herald.stop()) and they all ended, and
 * returns "master" (raises if they kept dying); in a worker, serves like
 * run() and returns "worker", whether it served: the Lua half then ends
 * the process. */
static int core_workers(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  lua_Integer n = luaL_checkinteger(L, 1), max_restarts = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n >= 1 && n <= MAX_WORKERS, 1, "must be 1 to 1024");
  luaL_argcheck(L, max_restarts >= 0 && max_restarts <= 1000000, 2, "must be 0 to 1000000");
  if (rt->running) return luaL_error(L, "herald.run: already running");
  master_t *m = calloc(1, sizeof *m + (size_t)n * sizeof(worker_t));
  if (!m) return luaL_error(L, "herald.run: out of memory");
  m->rt = rt;
  m->pid = (int)getpid();
  m->n = (int)n;
  m->max_restarts = (unsigned)max_restarts;
  uint64_t longest = 0;
  for (server_t *s = rt->servers; s; s = s->next_in_rt) {
    for (listener_t *l = s->listeners; l; l = l->next) m->nbound++;
    if (s->limits.shutdown_timeout_ms > longest) longest = s->limits.shutdown_timeout_ms;
  }
  m->kill_after_ms = longest + KILL_MARGIN_MS;
  m->bound = calloc(m->nbound ? m->nbound : 1, sizeof *m->bound);
  if (!m->bound) {
    free(m);
    return luaL_error(L, "herald.run: out of memory");
  }
  size_t k = 0;
  int rc = 0;
  for (server_t *s = rt->servers; s && rc == 0; s = s->next_in_rt) {
    rc = server_share_listeners(s);
    for (listener_t *l = s->listeners; l && rc == 0; l = l->next, k++) {
      bound_t *b = &m->bound[k];
      int len = sizeof b->addr;
      b->server = s;
      b->backlog = l->backlog;
      b->tls = l->tls ? tls_config_ref(l->tls) : NULL;
      rc = uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&b->addr, &len);
    }
  }
  if (rc != 0) {
    free_master(m);
    return luaL_error(L, "herald.run: sharing the listeners (SO_REUSEPORT): %s", uv_strerror(rc));
  }
  if ((rc = uv_loop_init(&m->loop)) != 0) {
    free_master(m);
    return luaL_error(L, "herald.run: uv_loop_init: %s", uv_strerror(rc));
  }
  uv_signal_t *sigs[] = {&m->sigchld, &m->sigterm, &m->sigint, &m->sighup};
  int signums[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP};
  for (int i = 0; i < 4; i++) {
    uv_signal_init(&m->loop, sigs[i]);
    sigs[i]->data = m;
    uv_signal_start(sigs[i], on_signal, signums[i]);
  }
  uv_timer_init(&m->loop, &m->deadline);
  m->deadline.data = m;
  for (int i = 0; i < m->n; i++) {
    worker_t *w = &m->workers[i];
    w->due = 1;
    uv_timer_init(&m->loop, &w->backoff);
    w->backoff.data = w;
  }
  m->shared = 1;
  void *outer = rt->lua;
  rt->lua = L; /* runtime_log goes through herald.on_error's logger */
  rt->worker_index = 0;
  rt->worker_count = m->n;
  sigset_t forwarded, mask;
  sigemptyset(&forwarded);
  for (int i = 0; i < 4; i++) sigaddset(&forwarded, signums[i]);
  for (;;) {
    if (!m->stopping) {
      /* Blocked across fork: a child takes them once its own handlers are in place. */
      pthread_sigmask(SIG_BLOCK, &forwarded, &mask);
      for (int i = 0; i < m->n; i++)
        if (m->workers[i].due && spawn(m, i)) return become_worker(L, m, &mask);
      pthread_sigmask(SIG_SETMASK, &mask, NULL);
    }
    if (m->shared) {
      /* Worker 1 holds them now: keeping them here would only let the
       * kernel queue connections that nobody accepts if worker 1 dies. */
      for (server_t *s = rt->servers; s; s = s->next_in_rt) server_close_listeners(s);
      m->shared = 0;
    }
    if (m->stopping && !alive(m)) break;
    uv_run(&m->loop, UV_RUN_ONCE);
  }
  close_loop(m);
  rt->lua = outer;
  char failure[sizeof m->failure];
  memcpy(failure, m->failure, sizeof failure);
  free_master(m);
  if (failure[0]) return luaL_error(L, "herald.run: %s", failure);
  lua_pushliteral(L, "master");
  return 1;
}

/* worker() -> this process's worker number (1 when it serves alone, 0 in
 * the master), pid, and how many workers there are. */
static int core_worker(lua_State *L) {
  runtime_t *rt = bind_runtime(L);
  lua_pushinteger(L, rt->worker_index);
  lua_pushinteger(L, (lua_Integer)getpid());
  lua_pushinteger(L, rt->worker_count);
  return 3;
}

static int core_parallelism(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
  return 1;
}

void bind_workers_open(lua_State *L, int runtime_idx) {
  static const luaL_Reg functions[] = {
      {"workers", core_workers}, {"worker", core_worker}, {"parallelism", core_parallelism}, {NULL, NULL}};
  lua_pushvalue(L, runtime_idx);
  luaL_setfuncs(L, functions, 1);
}
