/* runtime: the one event loop that every server, connection and timer of a
 * Lua state lives on, and the state shared across them. */
#ifndef HERALD_RUNTIME_H
#define HERALD_RUNTIME_H

#include <stdint.h>
#include <uv.h>

typedef struct conn conn_t;
typedef struct server server_t;
typedef struct htimer htimer_t;
typedef struct client client_t;

#define HERALD_READ_CHUNK 65536

/* Something that must renew itself in a forked child (a broker's sockets). */
typedef struct runtime_fork_hook {
  void (*after_fork)(void *ud);
  void *ud;
  struct runtime_fork_hook *next;
} runtime_fork_hook_t;

/* The timeouts of the runtime's conns (conn_set_timer) without a uv_timer_t
 * (152 bytes) in every conn: a FIFO list of conns per distinct duration.
 * A conn goes in at the tail with now + duration, behind every conn already
 * there, so each list stays sorted by due time; one uv_timer waits for the
 * earliest head. Setting, moving and stopping a timeout are O(1) and as
 * exact as a uv_timer. The durations come from the configuration (header
 * and idle timeouts, heartbeats, ping intervals, TLS handshakes, linger and
 * close waits), so there are a handful of lists. */
/* A FIFO list of conns, through a conn_link_t in each (conn.c's list_*). */
typedef struct conn_list {
  conn_t *head, *tail;
} conn_list_t;

typedef struct conn_tq {
  uint32_t ms;            /* every conn in it times out this long after it was put in */
  conn_list_t conns;      /* through conn_t.tq_link, in due order */
} conn_tq_t;

typedef struct conn_timeouts {
  uv_timer_t timer;       /* fires at the earliest head's due time; stopped when all are empty */
  conn_tq_t *queues;
  unsigned nqueues, cap;
  unsigned count;         /* conns in all the lists */
  uint32_t fired_ms;      /* the duration of the timeout being handled (conn_repeat_timer) */
} conn_timeouts_t;

typedef struct runtime {
  uv_loop_t loop;
  uv_prepare_t flusher;   /* writes queued output before the loop polls (conn_flush_all) */
  uv_idle_t flush_more;   /* started while deliveries wait: the poll does not sleep */
  /* Conns with output queued and not yet handed to the kernel, oldest first
   * (through conn_t.dirty_link): */
  conn_list_t replies;    /* answers to what a peer sent: all written every loop turn */
  conn_list_t deliveries; /* topic messages: written for a slice of time per turn */
  uint32_t turn;          /* counts the loop turns' flushes */
  conn_timeouts_t timeouts; /* every conn's timeout (conn.c) */
  server_t *servers;      /* every server with listeners or connections */
  htimer_t *timers;       /* Lua timers, closed with the state */
  client_t *clients;      /* herald.test's client sockets */
  uv_timer_t tick_timer;  /* bounds one run_once */
  char date[40];          /* IMF-fixdate for the Date header, renewed each second */
  int64_t date_sec;
  int draining;           /* run() is shutting down: no new conns, finish the rest */
  int stopped;            /* the drain finished: run() returns */
  int running;            /* inside run() */
  uv_timer_t drain_timer; /* bounds the drain by the servers' shutdown_timeout */
  uv_signal_t sigint, sigterm, sighup;
  int closing;            /* the Lua state is closing: no more calls into Lua */
  void *lua;              /* lua_State of the thread currently running the loop */
  runtime_fork_hook_t *fork_hooks;
  int on_error_ref;       /* Lua logger for errors raised in callbacks */
  void *sha1;             /* SHA-1 for WebSocket handshakes (ws_sha1_new) */
  /* herald.run { workers = N } (lua_workers.c): this process's worker number,
   * 1 when it serves alone, 0 in the master; the master's pid in a worker. */
  int worker_index, worker_count, master_pid;
  char read_buf[HERALD_READ_CHUNK]; /* reads are handled synchronously: one buffer serves all */
  char tls_buf[16384];    /* and the plaintext of one TLS record */
} runtime_t;

/* Current Date header value (cached per second of loop time). */
const char *runtime_date(runtime_t *rt);
/* Logs an error that has no Lua handler to take it. */
void runtime_log(runtime_t *rt, const char *fmt, ...);
/* One loop turn that waits at most timeout_ms, with L as the running
 * thread (outside run()). */
void runtime_run_once(runtime_t *rt, void *L, int64_t timeout_ms);
/* In a forked child: renews the loop (uv_loop_fork) and calls every hook. */
int runtime_after_fork(runtime_t *rt);
/* hook lives as long as it is registered (it is usually a member of ud). */
void runtime_add_fork_hook(runtime_t *rt, runtime_fork_hook_t *hook);
void runtime_remove_fork_hook(runtime_t *rt, runtime_fork_hook_t *hook);
/* Starts draining every server; the loop stops when they are empty. */
void runtime_drain(runtime_t *rt);
/* Called by a server whenever it may have become empty during a drain. */
void runtime_check_drained(runtime_t *rt);

#endif
