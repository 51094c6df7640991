#include "conn.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "tls.h"
#include "ws.h"

/* After FIN, how long a closing conn keeps reading so that the peer's last
 * bytes in flight do not turn our close into a reset that loses the answer. */
#define LINGER_MS 2000
#define MAX_WRITE_BATCH 128 /* below 256: conn_t.out_inflight has 8 bits */

/* A loop turn writes every reply, then deliveries, oldest first, for this
 * long at most. A fan-out to many thousand conns goes in slices with the
 * loop's I/O between them: a request, a ping or a new connection waits a
 * slice, not the whole fan-out, and what is published meanwhile joins the
 * queues of the conns still waiting, to leave in the same write. */
#define DELIVERY_SLICE_NS 1000000
/* A delivery is written at once (inside the publish) when a write's worth
 * waits (bytes, or MAX_WRITE_BATCH chunks), or when its conn has waited
 * among the deliveries since an earlier turn and this many chunks are
 * queued: a publisher that outruns the fan-out meets the writes in its own
 * publishes, and a message's latency stays about one fan-out's, at a few
 * messages per write. A burst published in one turn still leaves in one
 * write. */
#define DELIVERY_WRITE_BYTES 65536
#define DELIVERY_BACKLOG 3

/* The runtime's lists of conns (runtime.h): the timeout lists through
 * tq_link, the replies and deliveries through dirty_link. */
#define LINK_OF(c, field) ((conn_link_t *)((char *)(c) + (field)))

static void list_append(conn_list_t *l, conn_t *c, size_t field) {
  conn_link_t *k = LINK_OF(c, field);
  k->prev = l->tail;
  k->next = NULL;
  if (l->tail) LINK_OF(l->tail, field)->next = c;
  else l->head = c;
  l->tail = c;
}

static void list_remove(conn_list_t *l, conn_t *c, size_t field) {
  conn_link_t *k = LINK_OF(c, field);
  if (k->prev) LINK_OF(k->prev, field)->next = k->next;
  else l->head = k->next;
  if (k->next) LINK_OF(k->next, field)->prev = k->prev;
  else l->tail = k->prev;
  k->prev = k->next = NULL;
}

enum { NOT_DIRTY, DIRTY_REPLY, DIRTY_DELIVERY };

static conn_list_t *dirty_list(conn_t *c) {
  return c->dirty == DIRTY_DELIVERY ? &c->rt->deliveries : &c->rt->replies;
}

static void unlink_dirty(conn_t *c) {
  if (!c->dirty) return;
  list_remove(dirty_list(c), c, offsetof(conn_t, dirty_link));
  c->dirty = NOT_DIRTY;
}

static void link_dirty(conn_t *c, unsigned which) {
  c->dirty = which;
  list_append(dirty_list(c), c, offsetof(conn_t, dirty_link));
}

/* A reply takes the conn's deliveries along with it. */
void conn_mark_dirty(conn_t *c) {
  if (c->dirty == DIRTY_REPLY) return;
  unlink_dirty(c);
  link_dirty(c, DIRTY_REPLY);
}

static void mark_delivery(conn_t *c) {
  if (c->dirty) return;
  c->delivery_turn = c->rt->turn;
  link_dirty(c, DIRTY_DELIVERY);
}

static void free_conn(conn_t *c) {
  unlink_dirty(c);
  for (unsigned i = c->out_head; i < c->out_len; i++) hbuf_unref(c->outq[i].buf);
  if (c->outq != &c->out1) free(c->outq);
  c->server->queued_bytes -= c->queued_bytes;
  server_remove_conn(c->server, c);
  ws_conn_free(c);
  tls_conn_free(c);
  http_conn_free(c);
  free(c);
}

static void on_handle_closed(uv_handle_t *h) {
  free_conn((conn_t *)h);
}

static void tq_unlink(conn_t *c);

void conn_close(conn_t *c) {
  if (c->closing) return;
  c->closing = 1;
  if (c->proto && c->proto->on_close) c->proto->on_close(c);
  hub_member_release(c);
  tq_unlink(c);
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  conn_t *c = (conn_t *)h;
  buf->base = c->rt->read_buf;
  buf->len = sizeof c->rt->read_buf;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  conn_t *c = (conn_t *)s;
  if (c->closing) return;
  if (n > 0) {
    if (c->shut) return; /* lingering: discard */
    c->server->stats.bytes_in += (uint64_t)n;
    if (c->tls) tls_on_read(c, buf->base, (size_t)n);
    else c->proto->on_data(c, buf->base, (size_t)n);
  } else if (n < 0) {
    if (c->shut) {
      conn_close(c);
      return;
    }
    conn_pause_reading(c);
    c->proto->on_eof(c);
  }
}

static void on_timer(conn_t *c) {
  if (c->closing) return;
  if (c->shut || (c->tls && !tls_handshake_done(c))) { /* lingered, or a handshake too slow */
    conn_close(c);
    return;
  }
  c->proto->on_timeout(c);
}

conn_t *conn_accept(server_t *server, uv_stream_t *listener) {
  conn_t *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->rt = server->rt;
  c->server = server;
  c->lua_ref = -2; /* LUA_NOREF */
  uv_tcp_init(&c->rt->loop, &c->tcp);
  c->outq = &c->out1;
  c->out_cap = 1;
  server_add_conn(server, c);
  if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    return NULL;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  conn_resume_reading(c);
  return c;
}

void conn_pause_reading(conn_t *c) {
  if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
}

void conn_resume_reading(conn_t *c) {
  if (c->reading || c->closing) return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = 1;
  /* Input decrypted before the pause will not come from the socket again. */
  if (c->reading && tls_has_input(c)) tls_on_read(c, NULL, 0);
}

/* ---- timeouts: a FIFO list per duration, one uv_timer (runtime.h) ---- */

/* Whether loop time a comes before b; both wrap at 32 bits, and every
 * timeout is shorter than 2^31 ms. */
static int before(uint32_t a, uint32_t b) {
  return (int32_t)(a - b) < 0;
}

static void tq_unlink(conn_t *c) {
  if (!c->tq) return;
  conn_timeouts_t *to = &c->rt->timeouts;
  list_remove(&to->queues[c->tq - 1].conns, c, offsetof(conn_t, tq_link));
  c->tq = 0;
  /* An earlier head that went leaves the timer early: it finds nothing due
   * and waits again. With no timeout left it stops (the loop may end). */
  if (--to->count == 0) uv_timer_stop(&to->timer);
}

/* The list of the duration ms (made on first use): its index, or -1. */
static int tq_find(conn_timeouts_t *to, uint32_t ms) {
  for (unsigned i = 0; i < to->nqueues; i++)
    if (to->queues[i].ms == ms) return (int)i;
  if (to->nqueues == (1u << 12) - 1) return -1; /* conn_t.tq's 12 bits */
  if (to->nqueues == to->cap) {
    unsigned cap = to->cap ? to->cap * 2 : 8;
    conn_tq_t *q = realloc(to->queues, cap * sizeof *q);
    if (!q) return -1;
    to->queues = q;
    to->cap = cap;
  }
  to->queues[to->nqueues] = (conn_tq_t){.ms = ms};
  return (int)to->nqueues++;
}

/* The conn that times out first: the earliest of the lists' heads. */
static conn_t *tq_first(const conn_timeouts_t *to) {
  conn_t *first = NULL;
  for (unsigned i = 0; i < to->nqueues; i++) {
    conn_t *h = to->queues[i].conns.head;
    if (h && (!first || before(h->tq_due, first->tq_due))) first = h;
  }
  return first;
}

static void on_timeouts(uv_timer_t *t) {
  runtime_t *rt = t->data;
  conn_timeouts_t *to = &rt->timeouts;
  /* Timeouts set by the callbacks are due after now: the loop ends. */
  uint32_t now = (uint32_t)uv_now(&rt->loop);
  conn_t *c;
  while ((c = tq_first(to)) && !before(now, c->tq_due)) {
    to->fired_ms = to->queues[c->tq - 1].ms;
    tq_unlink(c);
    on_timer(c);
  }
  if ((c = tq_first(to))) {
    int32_t wait = (int32_t)(c->tq_due - (uint32_t)uv_now(&rt->loop));
    uv_timer_start(&to->timer, on_timeouts, wait > 0 ? (uint64_t)wait : 0, 0);
  }
}

void conn_set_timer(conn_t *c, uint64_t ms) {
  if (c->closing) return;
  conn_timeouts_t *to = &c->rt->timeouts;
  tq_unlink(c);
  if (ms == 0) ms = 1; /* not in the loop turn that set it */
  if (ms > INT32_MAX) ms = INT32_MAX; /* 24 days: the wrapping comparison's bound */
  int i = tq_find(to, (uint32_t)ms);
  if (i < 0) {
    conn_close(c);
    return;
  }
  conn_list_t *q = &to->queues[i].conns;
  c->tq_due = (uint32_t)(uv_now(&c->rt->loop) + ms);
  c->tq = (unsigned)i + 1;
  list_append(q, c, offsetof(conn_t, tq_link));
  to->count++;
  /* Behind another conn of its list it is due after that one: only a new
   * head may come before what the timer waits for. */
  if (q->head == c &&
      (!uv_is_active((uv_handle_t *)&to->timer) || uv_timer_get_due_in(&to->timer) > ms))
    uv_timer_start(&to->timer, on_timeouts, ms, 0);
}

void conn_stop_timer(conn_t *c) {
  tq_unlink(c);
}

void conn_repeat_timer(conn_t *c) {
  conn_set_timer(c, c->rt->timeouts.fired_ms);
}

void conn_timeouts_init(runtime_t *rt) {
  uv_timer_init(&rt->loop, &rt->timeouts.timer);
  rt->timeouts.timer.data = rt;
}

void conn_timeouts_free(runtime_t *rt) {
  free(rt->timeouts.queues);
  rt->timeouts.queues = NULL;
  rt->timeouts.nqueues = rt->timeouts.cap = 0;
}

static int enqueue(conn_t *c, hbuf_t *b) {
  if (c->closing || c->shut || b->len > UINT32_MAX) return -1;
  if (c->out_len == c->out_cap) {
    if (c->out_head > 0 && !c->writing) {
      memmove(c->outq, c->outq + c->out_head, (c->out_len - c->out_head) * sizeof *c->outq);
      c->out_len -= c->out_head;
      c->out_head = 0;
    } else {
      unsigned cap = c->out_cap >= 4 ? c->out_cap * 2 : 4;
      int inline_q = c->outq == &c->out1;
      out_item_t *q = realloc(inline_q ? NULL : c->outq, cap * sizeof *q);
      if (!q) return -1;
      if (inline_q) q[0] = c->out1; /* out_len is 1 */
      c->outq = q;
      c->out_cap = cap;
    }
  }
  c->outq[c->out_len++].buf = hbuf_ref(b);
  c->queued_bytes += b->len;
  c->server->queued_bytes += b->len;
  return 0;
}

int conn_send(conn_t *c, hbuf_t *b) {
  if (enqueue(c, b) != 0) return -1;
  conn_mark_dirty(c);
  return 0;
}

/* write_queue's outcomes */
enum { WROTE_ALL, WROTE_NOTHING_DUE, WAITING, CLOSED };
static int write_queue(conn_t *c);

int conn_deliver(conn_t *c, hbuf_t *b) {
  int waited = c->dirty == DIRTY_DELIVERY && c->delivery_turn != c->rt->turn;
  if (enqueue(c, b) != 0) return -1;
  mark_delivery(c);
  /* Not more than half of max_queued either: what we hold back must not
   * look like a peer that does not read (ws.c holds its input). */
  size_t write_bytes = c->server->limits.max_queued / 2;
  if (write_bytes > DELIVERY_WRITE_BYTES) write_bytes = DELIVERY_WRITE_BYTES;
  unsigned queued = c->out_len - c->out_head;
  if (c->queued_bytes < write_bytes && queued < MAX_WRITE_BATCH && (!waited || queued < DELIVERY_BACKLOG))
    return 0;
  /* Written; what the kernel did not take, and what follows a write, wait
   * for its next turn, behind the others. */
  if (write_queue(c) != CLOSED) {
    unlink_dirty(c);
    mark_delivery(c);
  }
  return 0;
}

int conn_queue_cipher(conn_t *c, hbuf_t *b) {
  if (conn_send(c, b) != 0) return -1; /* at the end, then moved before the plaintext */
  unsigned *cipher = tls_out_cipher(c);
  unsigned at = c->out_head + *cipher, last = c->out_len - 1;
  if (last > at) {
    out_item_t item = c->outq[last];
    memmove(c->outq + at + 1, c->outq + at, (last - at) * sizeof *c->outq);
    c->outq[at] = item;
  }
  (*cipher)++;
  return 0;
}

int conn_send_bytes(conn_t *c, const void *bytes, size_t len) {
  hbuf_t *b = hbuf_copy(bytes, len);
  if (!b) return -1;
  int rc = conn_send(c, b);
  hbuf_unref(b);
  return rc;
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  (void)status;
  conn_t *c = req->data;
  free(req);
  if (!c->closing) conn_set_timer(c, LINGER_MS);
}

/* Everything queued is written: finish an ending conn, or let a paused
 * protocol read again. */
static void on_queue_empty(conn_t *c) {
  if (c->ending && !c->shut) {
    c->shut = 1;
    uv_shutdown_t *req = malloc(sizeof *req); /* rare: not worth a field in every conn */
    if (!req) {
      conn_close(c);
      return;
    }
    req->data = c;
    conn_resume_reading(c); /* to see the peer's EOF during the linger */
    if (uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
      free(req);
      conn_close(c);
    }
  }
}

/* Drops what the kernel took: whole chunks from the head of the queue, and
 * a part of the next one (out_off). limit: chunks that may go. */
static void consume(conn_t *c, size_t bytes, unsigned limit) {
  if (bytes != SIZE_MAX) c->server->stats.bytes_out += bytes;
  while (limit > 0) {
    hbuf_t *b = c->outq[c->out_head].buf;
    size_t left = b->len - c->out_off;
    if (bytes < left) {
      c->out_off += (uint32_t)bytes;
      c->queued_bytes -= bytes;
      c->server->queued_bytes -= bytes;
      return;
    }
    bytes -= left;
    c->queued_bytes -= left;
    c->server->queued_bytes -= left;
    hbuf_unref(b);
    c->out_head++;
    c->out_off = 0;
    if (c->tls) (*tls_out_cipher(c))--;
    limit--;
  }
}

/* A write finished: what next. */
static void written(conn_t *c) {
  if (c->out_head == c->out_len) c->out_head = c->out_len = 0;
  if (c->out_len > c->out_head) {
    mark_delivery(c); /* after a slow peer's wait, or past MAX_WRITE_BATCH: in its turn */
  } else {
    on_queue_empty(c);
  }
  if (!c->closing && !c->shut && c->queued_bytes < CONN_PAUSE_MARK / 2 && c->proto->on_writable)
    c->proto->on_writable(c);
}

static void on_write(uv_write_t *req, int status) {
  conn_t *c = req->data;
  free(req);
  size_t before = c->queued_bytes;
  consume(c, SIZE_MAX, c->out_inflight);
  if (status >= 0) c->server->stats.bytes_out += before - c->queued_bytes;
  c->out_inflight = 0;
  c->writing = 0;
  c->backed_up = 0;
  if (c->closing) return;
  if (status < 0) {
    conn_close(c);
    return;
  }
  written(c);
}

/* Hands the queue to the kernel: first straight away (uv_try_write: no
 * request, no callback, no epoll change when the kernel takes it all, the
 * usual case), and what the kernel refuses through uv_write, which waits for
 * room. Calls back into nothing: conn_deliver calls it inside a fan-out. */
static int write_queue(conn_t *c) {
  if (c->closing) return CLOSED;
  if (c->writing) return WAITING;
  if (c->tls && tls_encrypt(c) != 0) {
    conn_close(c);
    return CLOSED;
  }
  /* Over TLS only ciphertext is written; plaintext may wait for the handshake. */
  unsigned n = c->tls ? *tls_out_cipher(c) : c->out_len - c->out_head;
  if (n == 0) return WROTE_NOTHING_DUE;
  if (n > MAX_WRITE_BATCH) n = MAX_WRITE_BATCH;
  uv_buf_t bufs[MAX_WRITE_BATCH];
  size_t total = 0;
  for (unsigned i = 0; i < n; i++) {
    hbuf_t *b = c->outq[c->out_head + i].buf;
    size_t off = i == 0 ? c->out_off : 0;
    bufs[i] = uv_buf_init(b->data + off, (unsigned)(b->len - off));
    total += b->len - off;
  }
  int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, n);
  c->server->stats.writes++;
  if (r == UV_EAGAIN) r = 0;
  if (r < 0) {
    conn_close(c);
    return CLOSED;
  }
  if ((size_t)r == total) {
    consume(c, total, n);
    return WROTE_ALL;
  }
  /* The kernel's buffer is full: the peer reads slowly. Wait for room. */
  unsigned done = 0;
  size_t left = (size_t)r;
  while (left >= bufs[done].len) left -= bufs[done++].len; /* r < total: stops inside */
  bufs[done].base += left;
  bufs[done].len -= (unsigned)left;
  consume(c, (size_t)r, n);
  uv_write_t *req = malloc(sizeof *req); /* only a slow peer needs one */
  if (!req) {
    conn_close(c);
    return CLOSED;
  }
  req->data = c;
  if (uv_write(req, (uv_stream_t *)&c->tcp, bufs + done, n - done, on_write) != 0) {
    free(req);
    conn_close(c);
    return CLOSED;
  }
  c->server->stats.writes++; /* once, however many calls libuv makes of it */
  c->writing = 1;
  c->out_inflight = n - done;
  c->backed_up = 1;
  /* It sent so much that we hold its input until it reads what we owe it
   * (max_queued), and the kernel says it does not read: it goes. */
  if (c->input_held) {
    c->server->stats.slow_closed++;
    conn_close(c);
    return CLOSED;
  }
  return WAITING;
}

static void flush(conn_t *c) {
  if (c->http_done && c->http) http_conn_free(c);
  switch (write_queue(c)) {
  case WROTE_ALL:
    written(c);
    break;
  case WROTE_NOTHING_DUE: /* over TLS, plaintext may wait for the handshake */
    if (c->out_len == c->out_head) written(c);
    break;
  default:
    break;
  }
}

static void keep_polling(uv_idle_t *h) {
  (void)h;
}

void conn_flush_all(runtime_t *rt) {
  conn_t *c;
  rt->turn++;
  while ((c = rt->replies.head)) {
    unlink_dirty(c);
    flush(c);
  }
  uint64_t deadline = uv_hrtime() + DELIVERY_SLICE_NS;
  for (unsigned n = 1; (c = rt->deliveries.head); n++) {
    unlink_dirty(c);
    flush(c);
    if (n % 16 == 0 && uv_hrtime() >= deadline) break;
  }
  while ((c = rt->replies.head)) { /* made by the deliveries' writes (TLS, on_writable) */
    unlink_dirty(c);
    flush(c);
  }
  if (rt->deliveries.head) uv_idle_start(&rt->flush_more, keep_polling);
  else uv_idle_stop(&rt->flush_more);
}

void conn_end(conn_t *c) {
  if (c->closing || c->ending) return;
  c->ending = 1;
  conn_stop_timer(c);
  conn_pause_reading(c);
  conn_mark_dirty(c); /* the flush sees an empty queue and shuts down */
}
