#include "server.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "conn.h"
#include "tls.h"

/* Beyond this many conns waiting for their 503, new ones are dropped
 * without an answer: a flood must not cost memory. */
#define MAX_REJECTING 256

server_t *server_new(runtime_t *rt, const server_limits_t *limits, server_request_fn on_request,
                     server_conn_closed_fn on_conn_closed, void *ud) {
  server_t *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->rt = rt;
  s->limits = *limits;
  s->on_request = on_request;
  s->on_conn_closed = on_conn_closed;
  s->ud = ud;
  s->next_in_rt = rt->servers;
  if (rt->servers) rt->servers->prev_in_rt = s;
  rt->servers = s;
  return s;
}

static void free_if_done(server_t *s) {
  if (!s->orphaned || s->conns || s->listeners) return;
  ip_table_free(&s->ips);
  runtime_t *rt = s->rt;
  if (s->prev_in_rt) s->prev_in_rt->next_in_rt = s->next_in_rt;
  else rt->servers = s->next_in_rt;
  if (s->next_in_rt) s->next_in_rt->prev_in_rt = s->prev_in_rt;
  free(s);
}

static void on_listener_closed(uv_handle_t *h) {
  listener_t *l = h->data;
  tls_config_unref(l->tls);
  free(l);
}

const int server_error_codes[SERVER_ERROR_KINDS] = {400, 408, 413, 414, 429, 431, 500, 503,
                                                     1002, 1007, 1008, 1009};

void server_count_error(server_t *s, int code) {
  for (int i = 0; i < SERVER_ERROR_KINDS; i++)
    if (server_error_codes[i] == code) s->stats.errors[i]++;
}

/* Counts c against its address's limits; NULL, or why it is refused. */
static const char *per_address_refusal(server_t *s, conn_t *c) {
  const server_limits_t *lim = &s->limits;
  if (!lim->max_connections_per_ip && !lim->max_connects_per_ip) return NULL;
  struct sockaddr_storage addr;
  int len = sizeof addr;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&addr, &len) != 0) return NULL;
  if (lim->trust_loopback && ip_is_loopback(&addr)) return NULL;
  switch (ip_admit(&s->ips, &addr, uv_now(&s->rt->loop), lim->max_connections_per_ip,
                   lim->max_connects_per_ip, &c->ip)) {
    case IP_OK: return NULL;
    case IP_TOO_MANY: return "too many connections from your address\n";
    case IP_TOO_FAST: return "too many new connections from your address: slow down\n";
    default: return "server out of memory\n";
  }
}

static void on_connection(uv_stream_t *stream, int status) {
  listener_t *l = stream->data;
  server_t *s = l->server;
  if (status < 0 || s->draining) return;
  int over = s->nconns - s->rejecting >= s->limits.max_connections;
  if (over && s->rejecting >= MAX_REJECTING) {
    /* Accept and drop: leaving it in the backlog would wake us forever. */
    uv_tcp_t *t = malloc(sizeof *t);
    if (!t) return;
    uv_tcp_init(&s->rt->loop, t);
    uv_accept(stream, (uv_stream_t *)t);
    uv_close((uv_handle_t *)t, (uv_close_cb)free);
    return;
  }
  conn_t *c = conn_accept(s, stream);
  if (!c) return;
  if (http_conn_start(c) != 0) {
    conn_close(c);
    return;
  }
  if (l->tls && tls_conn_start(c, l->tls) != 0) {
    conn_close(c);
    return;
  }
  const char *refusal = over ? "server at its connection limit\n" : per_address_refusal(s, c);
  if (refusal) {
    c->rejected = 1;
    s->rejecting++;
    http_fail(c, over ? 503 : 429, refusal);
  }
}

static int resolve(const char *host, int port, struct sockaddr_storage *addr) {
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)addr) == 0) return 0;
  if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)addr) == 0) return 0;
  return UV_EINVAL;
}

void server_ignore_sigpipe(void) {
  /* libuv writes with write(2): a write to a peer that has reset raises
   * SIGPIPE, whose default action ends the process. EPIPE is what we want
   * (the conn closes). A handler the host program set is left alone. */
  struct sigaction old;
  if (sigaction(SIGPIPE, NULL, &old) == 0 && old.sa_handler == SIG_DFL) {
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, NULL);
  }
}

int server_listen(server_t *s, const char *host, int port, int backlog, tls_config_t *tls) {
  server_ignore_sigpipe();
  struct sockaddr_storage addr;
  int rc = resolve(host, port, &addr);
  if (rc) return rc;
  return server_listen_addr(s, (struct sockaddr *)&addr, backlog, tls, 0);
}

static int set_reuseport(uv_tcp_t *tcp) {
  uv_os_fd_t fd;
  int one = 1;
  int rc = uv_fileno((uv_handle_t *)tcp, &fd);
  if (rc == 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) rc = -errno;
  return rc;
}

int server_listen_addr(server_t *s, const struct sockaddr *addr, int backlog, tls_config_t *tls,
                       int reuseport) {
  listener_t *l = calloc(1, sizeof *l);
  if (!l) return UV_ENOMEM;
  l->server = s;
  l->backlog = backlog;
  int rc = uv_tcp_init_ex(&s->rt->loop, &l->tcp, addr->sa_family);
  if (rc) {
    free(l);
    return rc;
  }
  l->tcp.data = l;
  unsigned flags = addr->sa_family == AF_INET6 ? UV_TCP_IPV6ONLY : 0;
  if (reuseport) rc = set_reuseport(&l->tcp);
  if (rc == 0) rc = uv_tcp_bind(&l->tcp, addr, flags);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&l->tcp, backlog, on_connection);
  if (rc != 0) {
    uv_close((uv_handle_t *)&l->tcp, on_listener_closed);
    return rc;
  }
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&bound, &len);
  l->next = s->listeners;
  s->listeners = l;
  l->tls = tls; /* the caller's reference, now the listener's */
  s->draining = 0;
  return ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                           : ((struct sockaddr_in *)&bound)->sin_port);
}

int server_share_listeners(server_t *s) {
  for (listener_t *l = s->listeners; l; l = l->next) {
    int rc = set_reuseport(&l->tcp);
    if (rc) return rc;
  }
  return 0;
}

void server_close_listeners(server_t *s) {
  while (s->listeners) {
    listener_t *l = s->listeners;
    s->listeners = l->next;
    uv_close((uv_handle_t *)&l->tcp, on_listener_closed);
  }
}

int server_reload_tls(server_t *s, char *err, size_t errlen) {
  size_t n = 0;
  for (listener_t *l = s->listeners; l; l = l->next) n += l->tls != NULL;
  if (n == 0) return 0;
  tls_config_t **fresh = calloc(n, sizeof *fresh);
  if (!fresh) {
    snprintf(err, errlen, "tls: out of memory");
    return -1;
  }
  size_t i = 0;
  int rc = 0;
  for (listener_t *l = s->listeners; l && rc == 0; l = l->next)
    if (l->tls && !(fresh[i++] = tls_config_reload(l->tls, err, errlen))) rc = -1;
  i = 0;
  for (listener_t *l = s->listeners; l; l = l->next) {
    if (!l->tls) continue;
    if (rc == 0) {
      tls_config_unref(l->tls);
      l->tls = fresh[i];
    } else {
      tls_config_unref(fresh[i]);
    }
    i++;
  }
  free(fresh);
  return rc;
}

void server_close(server_t *s) {
  s->draining = 1;
  server_close_listeners(s);
  for (conn_t *c = s->conns, *next; c; c = next) {
    next = c->next;
    if (!c->closing && c->proto->on_drain) c->proto->on_drain(c);
  }
  free_if_done(s);
}

void server_force_close(server_t *s) {
  for (conn_t *c = s->conns; c; c = c->next) conn_close(c);
}

void server_release(server_t *s) {
  s->orphaned = 1;
  s->on_request = NULL;
  s->on_conn_closed = NULL;
  s->on_message = NULL;
  s->ud = NULL;
  if (s->listeners || s->conns) server_close(s);
  else free_if_done(s);
}

void server_add_conn(server_t *s, conn_t *c) {
  c->prev = NULL;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  s->nconns++;
}

void server_remove_conn(server_t *s, conn_t *c) {
  if (c->prev) c->prev->next = c->next;
  else s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->nconns--;
  if (c->rejected) s->rejecting--;
  if (c->ip) ip_release(&s->ips, c->ip, uv_now(&s->rt->loop));
  if (conn_lua_handle(c) && s->on_conn_closed) s->on_conn_closed(c, s->ud);
  if (s->draining) runtime_check_drained(s->rt);
  free_if_done(s);
}
