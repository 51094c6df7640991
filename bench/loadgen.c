/* loadgen: the load generator of herald's benchmarks (issue 6).
 *
 * Opens N WebSocket or SSE subscribers to a URL (or spread over several:
 * the nodes of a cluster), publishes M messages of S bytes through HTTP POSTs
 * (or asks the server to publish them itself with --trigger), and reports one
 * JSON object on stdout: connections, deliveries, loss, duplicates,
 * reordering, throughput, latency, and, given the server's pid (or the pids
 * of every process of a cluster, Redis included), its CPU time, write
 * syscalls and resident memory from /proc, summed and per process.
 *
 * Each payload starts with "%08x %016llx " (sequence number, CLOCK_MONOTONIC
 * ns when the POST was written), padded with 'x' to S bytes; the subscribers
 * run on the same machine and clock, so latency = receive time - timestamp.
 *
 * Self-contained: libuv and libc only. The HTTP, WebSocket (RFC 6455 client
 * side) and event-stream parsers here are the small subset a benchmark needs.
 * Sec-WebSocket-Accept is not verified (any 101 is taken): that would need a
 * SHA-1 and proves nothing about throughput.
 *
 * One shared 64 KiB read buffer serves every connection; a subscriber keeps
 * only its parse state (a few dozen bytes besides libuv's handle) and one bit
 * per expected message for duplicate detection.
 */
#include <uv.h>

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define HEADER_LEN 26        /* "%08x %016llx " */
#define HEAD_MAX 8192        /* an HTTP response head */
#define READ_BUF (64 * 1024) /* shared by every connection */
#define MAX_URLS 16          /* --sub URLs */
#define MAX_PROCS 16         /* --server-pid processes */

/* ---------------------------------------------------------------- options */

enum { MODE_WS, MODE_SSE };

typedef struct {
  char host[256];
  int port;
  char path[2048];
  struct sockaddr_in addr;
} url_t;

static struct {
  int mode;
  const char *sub_s[MAX_URLS], *pub_s, *trigger_s;
  url_t sub[MAX_URLS], pub;
  int nsub;
  long subscribers, messages, size, burst, pipeline, publishers, sources, concurrency;
  double rate, connect_rate, idle, timeout, settle_ms, connect_timeout;
  int idle_set;
  const char *label;
} opt = {
    .mode = -1,
    .subscribers = 1000,
    .messages = 1000,
    .size = 64,
    .burst = 1,
    .pipeline = 0, /* 0: --burst */
    .publishers = 1,
    .sources = 1,
    .concurrency = 256,
    .rate = 0,
    .connect_rate = 0,
    .idle = 0,
    .timeout = 60,
    .settle_ms = 500,
    .connect_timeout = 10,
    .label = "",
};

static void usage(const char *fmt, ...) {
  if (fmt) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
  }
  fputs(
      "usage: loadgen --mode ws|sse --sub URL [--sub URL...] (--pub URL | --trigger URL) [options]\n"
      "  URLs are http://host:port/path (ws mode sends the WebSocket handshake on --sub);\n"
      "  with several --sub URLs (up to 16: a cluster's nodes) subscriber i goes to URL i mod n\n"
      "  --subscribers N     subscribers to open (1000)\n"
      "  --messages M        messages to publish (1000)\n"
      "  --size S            payload bytes, >= 32 (64)\n"
      "  --rate R            messages per second, 0 = as fast as possible (0)\n"
      "  --burst B           messages per publish tick (1)\n"
      "  --pipeline W        POSTs awaiting an answer per publisher connection (--burst)\n"
      "  --publishers P      keep-alive publisher connections (1; >1 may reorder)\n"
      "  --trigger URL       POST once to URL?n=B&count=M&size=S (the server publishes); no --pub\n"
      "  --server-pid PID[:NAME]  read the server's CPU, write syscalls and RSS from /proc;\n"
      "                      several times (up to 16) for a cluster's processes: summed, and\n"
      "                      each apart (named NAME) in \"processes\"\n"
      "  --sources K         bind subscribers to 127.0.0.1..127.0.0.K (1)\n"
      "  --connect-rate C    new connections per second, 0 = as fast as possible (0)\n"
      "  --concurrency X     connections being established at once (256)\n"
      "  --connect-timeout S a connection not established after S seconds fails (10)\n"
      "  --idle SECONDS      connect, hold idle that long, measure RSS; no publishing\n"
      "  --timeout SECONDS   bound on the whole run (60)\n"
      "  --settle MS         wait after the last message for stragglers (500)\n"
      "  --label TEXT        copied into the report\n",
      stderr);
  exit(2);
}

static int parse_url(const char *s, url_t *u) {
  if (strncmp(s, "http://", 7) != 0) return -1;
  s += 7;
  const char *slash = strchr(s, '/');
  size_t hp = slash ? (size_t)(slash - s) : strlen(s);
  const char *colon = memchr(s, ':', hp);
  size_t hl = colon ? (size_t)(colon - s) : hp;
  if (hl == 0 || hl >= sizeof u->host) return -1;
  memcpy(u->host, s, hl);
  u->host[hl] = 0;
  u->port = 80;
  if (colon) {
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (end != s + hp || p <= 0 || p > 65535) return -1;
    u->port = (int)p;
  }
  const char *path = slash ? slash : "/";
  if (strlen(path) >= sizeof u->path) return -1;
  strcpy(u->path, path);
  memset(&u->addr, 0, sizeof u->addr);
  u->addr.sin_family = AF_INET;
  u->addr.sin_port = htons((uint16_t)u->port);
  if (inet_pton(AF_INET, u->host, &u->addr.sin_addr) != 1) {
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(u->host, NULL, &hints, &res) != 0 || !res) return -1;
    u->addr.sin_addr = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
    freeaddrinfo(res);
  }
  return 0;
}

static long num_arg(const char *name, const char *v, long min, long max) {
  char *end;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || *end || end == v || x < min || x > max)
    usage("%s wants an integer in [%ld, %ld], got '%s'", name, min, max, v);
  return x;
}

static double real_arg(const char *name, const char *v, double min, double max) {
  char *end;
  errno = 0;
  double x = strtod(v, &end);
  if (errno || *end || end == v || !(x >= min && x <= max))
    usage("%s wants a number in [%g, %g], got '%s'", name, min, max, v);
  return x;
}

/* What /proc says of a process at one moment, each figure with whether it
 * could be read: CPU ticks, write syscalls and run time before and after the
 * publishing, resident KiB before connecting and at the end. */
typedef struct {
  uint64_t ut, st, io, sched;
  long rss;
  int cpu_ok, io_ok, sched_ok, rss_ok;
} proc_sample_t;

/* The server's processes, sampled from /proc (--server-pid). */
typedef struct {
  long pid;
  const char *name;
  proc_sample_t before, after;
} proc_t;

static proc_t procs[MAX_PROCS];
static int nprocs;

static void add_proc(const char *v) { /* PID or PID:NAME */
  if (nprocs == MAX_PROCS) usage("at most %d --server-pid", MAX_PROCS);
  const char *colon = strchr(v, ':');
  char num[24];
  size_t n = colon ? (size_t)(colon - v) : strlen(v);
  if (n >= sizeof num) usage("--server-pid wants PID or PID:NAME, got '%s'", v);
  memcpy(num, v, n);
  num[n] = 0;
  procs[nprocs].pid = num_arg("--server-pid", num, 1, 0x7fffffff);
  procs[nprocs].name = colon && colon[1] ? colon + 1 : "server";
  nprocs++;
}

static void parse_args(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) usage(NULL);
    if (i + 1 >= argc) usage("%s needs a value", a);
    const char *v = argv[++i];
    if (!strcmp(a, "--mode")) {
      if (!strcmp(v, "ws")) opt.mode = MODE_WS;
      else if (!strcmp(v, "sse")) opt.mode = MODE_SSE;
      else usage("--mode is ws or sse, got '%s'", v);
    } else if (!strcmp(a, "--sub")) {
      if (opt.nsub == MAX_URLS) usage("at most %d --sub URLs", MAX_URLS);
      opt.sub_s[opt.nsub++] = v;
    }
    else if (!strcmp(a, "--pub")) opt.pub_s = v;
    else if (!strcmp(a, "--trigger")) opt.trigger_s = v;
    else if (!strcmp(a, "--subscribers")) opt.subscribers = num_arg(a, v, 1, 10000000);
    else if (!strcmp(a, "--messages")) opt.messages = num_arg(a, v, 1, 0x7fffffff);
    else if (!strcmp(a, "--size")) opt.size = num_arg(a, v, 32, 64L * 1024 * 1024);
    else if (!strcmp(a, "--rate")) opt.rate = real_arg(a, v, 0, 1e9);
    else if (!strcmp(a, "--burst")) opt.burst = num_arg(a, v, 1, 1000000);
    else if (!strcmp(a, "--pipeline")) opt.pipeline = num_arg(a, v, 1, 1000000);
    else if (!strcmp(a, "--publishers")) opt.publishers = num_arg(a, v, 1, 1000);
    else if (!strcmp(a, "--server-pid")) add_proc(v);
    else if (!strcmp(a, "--sources")) opt.sources = num_arg(a, v, 1, 254);
    else if (!strcmp(a, "--connect-rate")) opt.connect_rate = real_arg(a, v, 0, 1e9);
    else if (!strcmp(a, "--concurrency")) opt.concurrency = num_arg(a, v, 1, 10000000);
    else if (!strcmp(a, "--connect-timeout")) opt.connect_timeout = real_arg(a, v, 0.001, 86400);
    else if (!strcmp(a, "--idle")) opt.idle = real_arg(a, v, 0, 86400), opt.idle_set = 1;
    else if (!strcmp(a, "--timeout")) opt.timeout = real_arg(a, v, 0.001, 86400 * 7);
    else if (!strcmp(a, "--settle")) opt.settle_ms = real_arg(a, v, 0, 86400000);
    else if (!strcmp(a, "--label")) opt.label = v;
    else usage("unknown option %s", a);
  }
  if (opt.mode < 0) usage("--mode is required");
  if (!opt.nsub) usage("--sub is required");
  for (int i = 0; i < opt.nsub; i++)
    if (parse_url(opt.sub_s[i], &opt.sub[i])) usage("bad --sub URL '%s' (http://host:port/path)", opt.sub_s[i]);
  if (!opt.idle_set) {
    if (!opt.pub_s == !opt.trigger_s) usage("give --pub or --trigger (one of them)");
    const char *p = opt.pub_s ? opt.pub_s : opt.trigger_s;
    if (parse_url(p, &opt.pub)) usage("bad publisher URL '%s' (http://host:port/path)", p);
  }
  if (opt.pipeline == 0) opt.pipeline = opt.burst;
}

/* ------------------------------------------------------------------ state */

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state;
static uint64_t rnd(void) { /* xorshift64* */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 2685821657736338717ULL;
}

enum { SUB_NEW, SUB_CONNECTING, SUB_HEAD, SUB_OPEN, SUB_CLOSED, SUB_FAILED };
enum { SSE_BOL, SSE_NAME, SSE_VALUE_START, SSE_VALUE, SSE_SKIP };
enum { CH_SIZE, CH_EXT, CH_DATA, CH_DATA_END, CH_TRAILER_BOL, CH_TRAILER, CH_DONE };

typedef struct {
  uint64_t rem;
  uint8_t state, digits;
} chunk_t;

typedef struct {
  uv_tcp_t tcp;
  uint64_t started_ns; /* connect start, while establishing */
  char *head;          /* the response head while it arrives, then NULL */
  uint8_t *ctrl;       /* a WebSocket control frame's payload, while it arrives */
  uint64_t remaining;  /* WebSocket: payload bytes left in the frame */
  chunk_t chunk;       /* SSE over chunked transfer encoding */
  uint32_t index;
  int32_t last_seq;
  uint16_t head_len;
  uint8_t state, inited, chunked;
  uint8_t cap_len;      /* bytes of the current message's start captured in cap */
  char cap[HEADER_LEN]; /* the message's first bytes: seq and timestamp */
  /* WebSocket frame state */
  uint8_t ws_hdr[10], ws_hlen, ws_hneed, ws_op, ws_fin, ws_in_msg, ctrl_len;
  /* event-stream state */
  uint8_t sse_state, sse_cr, sse_name_len, sse_name_ok, sse_is_data, sse_has_data, sse_lines;
} sub_t;

enum { PC_IDLE, PC_CONNECTING, PC_READY, PC_CLOSING, PC_DEAD };
enum { RP_HEAD, RP_BODY_CL, RP_BODY_CHUNKED };

typedef struct {
  uv_tcp_t tcp;
  int index, state, inflight, reconnects, rp, status, close_after;
  uint64_t cl_rem;
  chunk_t chunk;
  size_t head_len;
  char head[HEAD_MAX];
} pubc_t;

enum { PH_CONNECT, PH_WAIT, PH_PUBLISH, PH_IDLE, PH_DONE };

/* latency histogram: 1 us buckets to 10 ms, 100 us to 1 s, 10 ms to 120 s */
#define H1 10000
#define H2 (H1 + (1000000 - 10000) / 100)
#define H3 (H2 + (120000000 - 1000000) / 10000)
#define HBUCKETS (H3 + 1)

static struct {
  uv_loop_t *loop;
  int phase;
  sub_t *subs;
  pubc_t *pubs;
  uint8_t *seen; /* one bit per (subscriber, message) */
  size_t seen_bytes; /* per subscriber */
  long next_sub, in_progress, connected, failed, disconnected, open_subs;
  int launching;
  uint64_t t_start, t_pub_start, t_connect_start, t_connected, t_first_post, t_last_delivery, t_last_answer, t_read;
  uint64_t delivered, unique, duplicated, out_of_order, malformed, protocol_errors, unexpected;
  uint64_t sent, released, answered, published_ok, publish_errors, unanswered;
  int trigger_sent, trigger_answered, wait_done, timed_out, interrupted, pubs_pending, rss_sampled;
  uint64_t hist[HBUCKETS];
  uint64_t lat_max_us;
  double lat_sum_us;
  char first_error[200];
  /* request templates */
  char *sub_req[MAX_URLS];                       /* per --sub URL */
  size_t sub_req_len[MAX_URLS], key_off[MAX_URLS]; /* where the Sec-WebSocket-Key goes */
  char *post_tmpl; /* POST head + payload template */
  size_t post_head_len, post_len;
  uv_timer_t t_progress, t_timeout, t_connect, t_wait, t_pub, t_check;
  uv_signal_t sigint, sigterm;
} g;

static char rbuf[READ_BUF];

static void note_error(const char *what, const char *why) {
  if (!g.first_error[0]) snprintf(g.first_error, sizeof g.first_error, "%s: %s", what, why);
}

/* ------------------------------------------------------------------ /proc */

static int slurp(const char *path, char *buf, size_t cap) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, cap - 1, f);
  fclose(f);
  buf[n] = 0;
  return (int)n;
}

static int proc_cpu(long pid, uint64_t *ut, uint64_t *st) { /* clock ticks */
  char path[64], buf[2048];
  snprintf(path, sizeof path, "/proc/%ld/stat", pid);
  if (slurp(path, buf, sizeof buf) < 0) return -1;
  char *p = strrchr(buf, ')');
  if (!p) return -1;
  p++;
  /* fields after the comm: 3 state ... 14 utime 15 stime */
  for (int field = 3; field <= 15; field++) {
    while (*p == ' ') p++;
    if (!*p) return -1;
    if (field == 14) *ut = strtoull(p, NULL, 10);
    if (field == 15) *st = strtoull(p, NULL, 10);
    while (*p && *p != ' ') p++;
  }
  return 0;
}

static long proc_rss_kib(long pid) {
  char path[64], buf[8192];
  snprintf(path, sizeof path, "/proc/%ld/status", pid);
  if (slurp(path, buf, sizeof buf) < 0) return -1;
  char *p = strstr(buf, "\nVmRSS:");
  return p ? strtol(p + 7, NULL, 10) : -1;
}

static int proc_field(long pid, const char *file, const char *name, uint64_t *out) {
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/%ld/%s", pid, file);
  if (slurp(path, buf, sizeof buf) < 0) return -1;
  size_t nl = strlen(name);
  for (char *p = buf; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
    if (!strncmp(p, name, nl)) {
      *out = strtoull(p + nl, NULL, 10);
      return 0;
    }
  }
  return -1;
}

static int proc_sched_ns(long pid, uint64_t *out) { /* the main thread's time on CPU, ns */
  char path[64], buf[256];
  snprintf(path, sizeof path, "/proc/%ld/schedstat", pid);
  if (slurp(path, buf, sizeof buf) < 0) return -1;
  *out = strtoull(buf, NULL, 10);
  return 0;
}

static void sample_cpu(long pid, proc_sample_t *s) {
  s->cpu_ok = proc_cpu(pid, &s->ut, &s->st) == 0;
  s->io_ok = proc_field(pid, "io", "syscw:", &s->io) == 0;
  s->sched_ok = proc_sched_ns(pid, &s->sched) == 0;
}

static void sample_rss(long pid, proc_sample_t *s) {
  s->rss = proc_rss_kib(pid);
  s->rss_ok = s->rss >= 0;
}

static void sample_before(void) {
  for (int i = 0; i < nprocs; i++) sample_cpu(procs[i].pid, &procs[i].before);
}

static void sample_after(void) {
  for (int i = 0; i < nprocs; i++)
    if (procs[i].before.cpu_ok) sample_cpu(procs[i].pid, &procs[i].after);
}

static void sample_rss_before(void) {
  for (int i = 0; i < nprocs; i++) {
    proc_t *p = &procs[i];
    sample_rss(p->pid, &p->before);
    if (!p->before.rss_ok) fprintf(stderr, "loadgen: warning: cannot read /proc/%ld/status\n", p->pid);
  }
}

static void sample_rss_after(void) {
  for (int i = 0; i < nprocs; i++) sample_rss(procs[i].pid, &procs[i].after);
}

/* Adds b's figures to sum's: a cluster's processes together. */
static void add_sample(proc_sample_t *sum, const proc_sample_t *b) {
  sum->ut += b->ut, sum->st += b->st, sum->io += b->io, sum->sched += b->sched, sum->rss += b->rss;
  sum->cpu_ok &= b->cpu_ok, sum->io_ok &= b->io_ok, sum->sched_ok &= b->sched_ok, sum->rss_ok &= b->rss_ok;
}

/* ----------------------------------------------------------------- report */

static uint32_t bucket_of(uint64_t us) {
  if (us < H1) return (uint32_t)us;
  if (us < 1000000) return (uint32_t)(H1 + (us - H1) / 100);
  if (us < 120000000) return (uint32_t)(H2 + (us - 1000000) / 10000);
  return H3;
}

static uint64_t bucket_lo(uint32_t b) {
  if (b < H1) return b;
  if (b < H2) return H1 + (uint64_t)(b - H1) * 100;
  if (b < H3) return 1000000 + (uint64_t)(b - H2) * 10000;
  return 120000000;
}

static uint64_t percentile(double p) {
  uint64_t total = 0;
  for (int i = 0; i < HBUCKETS; i++) total += g.hist[i];
  if (!total) return 0;
  uint64_t want = (uint64_t)ceil(p * (double)total);
  if (want < 1) want = 1;
  uint64_t acc = 0;
  for (uint32_t i = 0; i < HBUCKETS; i++) {
    acc += g.hist[i];
    if (acc >= want) {
      uint64_t v = bucket_lo(i);
      return v > g.lat_max_us ? g.lat_max_us : v;
    }
  }
  return g.lat_max_us;
}

static void json_str(const char *s) {
  putchar('"');
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') printf("\\%c", c);
    else if (c < 0x20) printf("\\u%04x", c);
    else putchar(c);
  }
  putchar('"');
}

static void json_num_or_null(const char *name, int ok, double v, const char *fmt) {
  printf(",\"%s\":", name);
  if (ok && isfinite(v)) printf(fmt, v);
  else fputs("null", stdout);
}

/* A process's (or the sum's) figures, as an unclosed JSON object. */
static void print_proc(const proc_t *p, int named) {
  double tck = (double)sysconf(_SC_CLK_TCK);
  double d = (double)g.delivered;
  const proc_sample_t *b = &p->before, *a = &p->after;
  int cpu = b->cpu_ok && a->cpu_ok && g.delivered > 0;
  double ut = cpu ? (double)(a->ut - b->ut) * 1e6 / tck : 0;
  double st = cpu ? (double)(a->st - b->st) * 1e6 / tck : 0;
  int io = b->io_ok && a->io_ok && g.delivered > 0;
  int sched = b->sched_ok && a->sched_ok && g.delivered > 0;
  int rss = b->rss_ok && a->rss_ok && g.connected > 0;
  printf("{\"pid\":%ld", p->pid);
  if (named) {
    printf(",\"name\":");
    json_str(p->name);
  }
  json_num_or_null("cpu_user_us_per_msg", cpu, ut / d, "%.4f");
  json_num_or_null("cpu_sys_us_per_msg", cpu, st / d, "%.4f");
  json_num_or_null("cpu_total_us_per_msg", cpu, (ut + st) / d, "%.4f");
  json_num_or_null("cpu_sched_us_per_msg", sched, (double)(a->sched - b->sched) / 1e3 / d, "%.4f");
  json_num_or_null("writes_per_msg", io, (double)(a->io - b->io) / d, "%.4f");
  json_num_or_null("cpu_user_s", cpu, ut / 1e6, "%.3f");
  json_num_or_null("cpu_sys_s", cpu, st / 1e6, "%.3f");
  json_num_or_null("write_syscalls", io, (double)(a->io - b->io), "%.0f");
  json_num_or_null("rss_kib_per_conn", rss, ((double)a->rss - (double)b->rss) / (double)g.connected,
                   "%.3f");
  json_num_or_null("rss_kib_before", b->rss_ok, (double)b->rss, "%.0f");
  json_num_or_null("rss_kib_after", a->rss_ok, (double)a->rss, "%.0f");
}

static void report_and_exit(int code, const char *error) {
  uint64_t t_end = now_ns();
  const char *modes[] = {"ws", "sse"};
  int idle = opt.idle_set;
  uint64_t messages = idle ? 0 : (uint64_t)opt.messages;
  uint64_t expected = messages * (uint64_t)g.connected;
  uint64_t lost = expected > g.unique ? expected - g.unique : 0;
  double connect_s = g.t_connected ? (double)(g.t_connected - g.t_connect_start) / 1e9
                                   : (double)(t_end - g.t_connect_start) / 1e9;
  double seconds = (g.t_first_post && g.t_last_delivery > g.t_first_post)
                       ? (double)(g.t_last_delivery - g.t_first_post) / 1e9 : 0;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double lg_user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
  double lg_sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;

  printf("{\"label\":");
  json_str(opt.label);
  printf(",\"mode\":\"%s\",\"subscribers\":%ld,\"connected\":%ld,\"failed\":%ld,\"disconnected\":%ld",
         modes[opt.mode], opt.subscribers, g.connected, g.failed, g.disconnected);
  printf(",\"connect_seconds\":%.3f", connect_s);
  printf(",\"messages\":%" PRIu64 ",\"size\":%ld,\"rate\":%g,\"burst\":%ld,\"pipeline\":%ld,\"publishers\":%ld",
         messages, opt.size, opt.rate, opt.burst, opt.pipeline, opt.publishers);
  printf(",\"trigger\":%s", opt.trigger_s && !idle ? "true" : "false");
  if (idle) printf(",\"idle_seconds\":%g", opt.idle);
  printf(",\"expected\":%" PRIu64 ",\"delivered\":%" PRIu64 ",\"unique\":%" PRIu64 ",\"lost\":%" PRIu64
         ",\"duplicated\":%" PRIu64 ",\"out_of_order\":%" PRIu64 ",\"malformed\":%" PRIu64 ",\"unexpected\":%" PRIu64
         ",\"protocol_errors\":%" PRIu64,
         expected, g.delivered, g.unique, lost, g.duplicated, g.out_of_order, g.malformed, g.unexpected,
         g.protocol_errors);
  printf(",\"published_ok\":%" PRIu64 ",\"publish_errors\":%" PRIu64, g.published_ok, g.publish_errors);
  printf(",\"seconds\":%.6f", seconds);
  json_num_or_null("throughput_msgs_per_s", seconds > 0, seconds > 0 ? (double)g.delivered / seconds : 0,
                   "%.1f");
  printf(",\"latency_us\":{\"p50\":%" PRIu64 ",\"p90\":%" PRIu64 ",\"p99\":%" PRIu64 ",\"p999\":%" PRIu64
         ",\"max\":%" PRIu64,
         percentile(0.50), percentile(0.90), percentile(0.99), percentile(0.999), g.lat_max_us);
  json_num_or_null("mean", g.delivered > 0, g.delivered ? g.lat_sum_us / (double)g.delivered : 0, "%.1f");
  printf("}");

  printf(",\"server\":");
  if (!nprocs) {
    printf("null");
  } else {
    /* the sum over every process (one unless a cluster), then each apart */
    const proc_sample_t all_ok = {.cpu_ok = 1, .io_ok = 1, .sched_ok = 1, .rss_ok = 1};
    proc_t sum = {.pid = procs[0].pid, .name = "all", .before = all_ok, .after = all_ok};
    for (int i = 0; i < nprocs; i++) {
      add_sample(&sum.before, &procs[i].before);
      add_sample(&sum.after, &procs[i].after);
    }
    print_proc(&sum, 0);
    printf(",\"processes\":[");
    for (int i = 0; i < nprocs; i++) {
      if (i) putchar(',');
      print_proc(&procs[i], 1);
      printf("}");
    }
    printf("]}");
  }
  printf(",\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_user_s\":%.3f,\"loadgen_cpu_sys_s\":%.3f", lg_user + lg_sys,
         lg_user, lg_sys);
  printf(",\"timed_out\":%s", g.timed_out ? "true" : "false");
  if (g.interrupted) printf(",\"interrupted\":true");
  if (error) {
    printf(",\"error\":");
    json_str(error);
  }
  if (g.first_error[0]) {
    printf(",\"first_error\":");
    json_str(g.first_error);
  }
  printf("}\n");
  fflush(stdout);
  fprintf(stderr, "loadgen: %s: delivered %" PRIu64 "/%" PRIu64 " (lost %" PRIu64 ", dup %" PRIu64
                  ", ooo %" PRIu64 ") in %.3f s, p99 %" PRIu64 " us%s\n",
          error ? error : "done", g.delivered, expected, lost, g.duplicated, g.out_of_order, seconds,
          percentile(0.99), g.timed_out ? " (timed out)" : "");
  exit(code);
}

static void finish(void) {
  if (g.phase == PH_DONE) return;
  int published = g.phase == PH_PUBLISH;
  g.phase = PH_DONE;
  if (published) sample_after();
  if (opt.idle_set || !g.rss_sampled) sample_rss_after();
  report_and_exit(0, NULL);
}

/* ----------------------------------------------------------------- writes */

typedef struct {
  uv_write_t req;
  uv_handle_t *close_after; /* close this handle once written (a WebSocket close) */
  size_t len;
  char data[];
} wbuf_t;

static void on_written(uv_write_t *req, int status) {
  wbuf_t *w = (wbuf_t *)req;
  (void)status;
  if (w->close_after && !uv_is_closing(w->close_after)) uv_close(w->close_after, NULL);
  free(w);
}

static wbuf_t *wbuf_new(size_t len) {
  wbuf_t *w = malloc(sizeof *w + len);
  if (!w) {
    fputs("loadgen: out of memory\n", stderr);
    exit(1);
  }
  w->close_after = NULL;
  w->len = len;
  return w;
}

static int wbuf_send(uv_stream_t *st, wbuf_t *w) {
  uv_buf_t b = uv_buf_init(w->data, (unsigned)w->len);
  int rc = uv_write(&w->req, st, &b, 1, on_written);
  if (rc) free(w);
  return rc;
}

/* ------------------------------------------------------------ HTTP heads */

/* Status code and the headers that matter of a complete head (ends at
 * "\r\n\r\n"); returns -1 if it is not an HTTP/1.x response. */
static int parse_head(const char *h, size_t len, int *status, int64_t *clen, int *chunked, int *close) {
  *status = 0, *clen = -1, *chunked = 0, *close = 0;
  if (len < 12 || strncmp(h, "HTTP/1.", 7) != 0) return -1;
  if (h[8] != ' ' || h[9] < '0' || h[9] > '9' || h[10] < '0' || h[10] > '9' || h[11] < '0' || h[11] > '9')
    return -1;
  *status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
  if (h[7] == '0') *close = 1;
  const char *end = h + len;
  const char *line = memchr(h, '\n', len);
  while (line && ++line < end) {
    const char *eol = memchr(line, '\n', (size_t)(end - line));
    if (!eol) break;
    const char *colon = memchr(line, ':', (size_t)(eol - line));
    if (colon) {
      size_t nl = (size_t)(colon - line);
      const char *v = colon + 1;
      while (v < eol && (*v == ' ' || *v == '\t')) v++;
      size_t vl = (size_t)(eol - v);
      char val[256];
      if (vl >= sizeof val) vl = sizeof val - 1;
      for (size_t i = 0; i < vl; i++) val[i] = (char)(v[i] >= 'A' && v[i] <= 'Z' ? v[i] + 32 : v[i]);
      val[vl] = 0;
      if (nl == 14 && !strncasecmp(line, "content-length", 14)) *clen = strtoll(val, NULL, 10);
      else if (nl == 17 && !strncasecmp(line, "transfer-encoding", 17)) *chunked = strstr(val, "chunked") != NULL;
      else if (nl == 10 && !strncasecmp(line, "connection", 10)) {
        if (strstr(val, "close")) *close = 1;
        if (strstr(val, "keep-alive")) *close = 0;
      }
    }
    line = eol;
  }
  return 0;
}

/* Collects a head into buf (cap HEAD_MAX); returns how many of p's n bytes
 * it took, and sets *done when "\r\n\r\n" arrived. -1: head too large. */
static long head_take(char *buf, size_t *blen, const char *p, size_t n, int *done) {
  size_t old = *blen;
  size_t take = n < HEAD_MAX - old ? n : HEAD_MAX - old;
  memcpy(buf + old, p, take);
  size_t from = old >= 3 ? old - 3 : 0;
  for (size_t i = from; i + 4 <= old + take; i++) {
    if (buf[i] == '\r' && buf[i + 1] == '\n' && buf[i + 2] == '\r' && buf[i + 3] == '\n') {
      *blen = i + 4;
      *done = 1;
      return (long)(i + 4 - old);
    }
  }
  *blen = old + take;
  *done = 0;
  return *blen >= HEAD_MAX ? -1 : (long)take;
}

typedef void (*data_fn)(void *ctx, const char *p, size_t n);

/* Chunked transfer decoding; returns the bytes consumed (it stops after the
 * last chunk's trailers: state CH_DONE) or -1 on a malformed stream. */
static long chunk_feed(chunk_t *c, const char *p, size_t n, data_fn fn, void *ctx) {
  size_t i = 0;
  while (i < n) {
    char ch;
    switch (c->state) {
    case CH_SIZE:
    case CH_EXT:
      ch = p[i++];
      if (ch == '\n') {
        if (!c->digits) return -1;
        c->state = c->rem ? CH_DATA : CH_TRAILER_BOL;
      } else if (ch == '\r') {
      } else if (c->state == CH_EXT) {
      } else if (ch == ';' || ch == ' ' || ch == '\t') {
        c->state = CH_EXT;
      } else {
        int v = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
              : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
        if (v < 0 || c->digits >= 15) return -1;
        c->rem = c->rem * 16 + (uint64_t)v;
        c->digits++;
      }
      break;
    case CH_DATA: {
      size_t take = n - i < c->rem ? n - i : (size_t)c->rem;
      if (fn) fn(ctx, p + i, take);
      i += take;
      c->rem -= take;
      if (!c->rem) c->state = CH_DATA_END;
      break;
    }
    case CH_DATA_END:
      ch = p[i++];
      if (ch == '\n') c->state = CH_SIZE, c->rem = 0, c->digits = 0;
      else if (ch != '\r') return -1;
      break;
    case CH_TRAILER_BOL:
      ch = p[i++];
      if (ch == '\n') {
        c->state = CH_DONE;
        return (long)i;
      }
      if (ch != '\r') c->state = CH_TRAILER;
      break;
    case CH_TRAILER:
      if (p[i++] == '\n') c->state = CH_TRAILER_BOL;
      break;
    default:
      return (long)i;
    }
  }
  return (long)i;
}

/* ------------------------------------------------------------ subscribers */

static void launch_more(void);
static void connect_done(void);

static void sub_close(sub_t *s) {
  if (s->inited && !uv_is_closing((uv_handle_t *)&s->tcp)) uv_close((uv_handle_t *)&s->tcp, NULL);
  free(s->head), s->head = NULL;
  free(s->ctrl), s->ctrl = NULL;
}

static void check_connect_done(void) {
  if (g.phase == PH_CONNECT && g.connected + g.failed == opt.subscribers) connect_done();
}

static void sub_fail(sub_t *s, const char *why) {
  if (s->state == SUB_CONNECTING || s->state == SUB_HEAD || s->state == SUB_NEW) {
    g.failed++;
    g.in_progress--;
    note_error("connect", why);
    s->state = SUB_FAILED;
    sub_close(s);
    launch_more();
    check_connect_done();
  } else if (s->state == SUB_OPEN) {
    g.disconnected++;
    g.open_subs--;
    note_error("subscriber", why);
    s->state = SUB_CLOSED;
    sub_close(s);
  }
}

static inline int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* A whole message arrived; its first bytes are in s->cap. */
static void deliver(sub_t *s) {
  uint64_t seq = 0, ts = 0;
  int ok = s->cap_len == HEADER_LEN && s->cap[8] == ' ' && s->cap[25] == ' ';
  for (int i = 0; ok && i < 8; i++) {
    int v = hexval(s->cap[i]);
    ok = v >= 0;
    seq = seq << 4 | (uint64_t)(v & 15);
  }
  for (int i = 9; ok && i < 25; i++) {
    int v = hexval(s->cap[i]);
    ok = v >= 0;
    ts = ts << 4 | (uint64_t)(v & 15);
  }
  s->cap_len = 0;
  if (!ok || seq >= (uint64_t)opt.messages) {
    g.malformed++;
    return;
  }
  if (g.phase != PH_PUBLISH) { /* before publishing or while idle: not ours */
    g.unexpected++;
    return;
  }
  g.delivered++;
  g.t_last_delivery = g.t_read;
  uint8_t *bits = g.seen + (size_t)s->index * g.seen_bytes;
  uint8_t mask = (uint8_t)(1u << (seq & 7));
  if (bits[seq >> 3] & mask) {
    g.duplicated++;
  } else {
    bits[seq >> 3] |= mask;
    g.unique++;
  }
  if ((int64_t)seq < (int64_t)s->last_seq) g.out_of_order++;
  s->last_seq = (int32_t)seq;
  uint64_t us = g.t_read > ts ? (g.t_read - ts) / 1000 : 0;
  g.hist[bucket_of(us)]++;
  if (us > g.lat_max_us) g.lat_max_us = us;
  g.lat_sum_us += (double)us;
}

static void capture(sub_t *s, const char *p, size_t n) {
  if (s->cap_len >= HEADER_LEN) return;
  size_t take = HEADER_LEN - s->cap_len;
  if (take > n) take = n;
  memcpy(s->cap + s->cap_len, p, take);
  s->cap_len = (uint8_t)(s->cap_len + take);
}

/* ---- WebSocket (client side of RFC 6455: server frames are unmasked) */

static void ws_send_control(sub_t *s, int op, const uint8_t *payload, size_t len, int close_after) {
  wbuf_t *w = wbuf_new(6 + len);
  uint8_t *f = (uint8_t *)w->data;
  uint32_t key = (uint32_t)rnd();
  f[0] = (uint8_t)(0x80 | op);
  f[1] = (uint8_t)(0x80 | len);
  memcpy(f + 2, &key, 4);
  for (size_t i = 0; i < len; i++) f[6 + i] = payload[i] ^ f[2 + (i & 3)];
  if (close_after) w->close_after = (uv_handle_t *)&s->tcp;
  if (wbuf_send((uv_stream_t *)&s->tcp, w) && close_after) sub_close(s);
}

static int ws_frame_end(sub_t *s) {
  if (s->ws_op & 8) {
    if (s->ws_op == 9) { /* ping: pong with its payload */
      ws_send_control(s, 10, s->ctrl, s->ctrl_len, 0);
    } else if (s->ws_op == 8) { /* close: echo the code, then the TCP close */
      g.disconnected++;
      g.open_subs--;
      note_error("subscriber", "the server sent a WebSocket close");
      s->state = SUB_CLOSED;
      uv_read_stop((uv_stream_t *)&s->tcp);
      ws_send_control(s, 8, s->ctrl, s->ctrl_len >= 2 ? 2 : 0, 1);
      free(s->ctrl), s->ctrl = NULL;
      return -1;
    }
    free(s->ctrl), s->ctrl = NULL;
    s->ctrl_len = 0;
  } else if (s->ws_fin) {
    s->ws_in_msg = 0;
    deliver(s);
  }
  s->ws_hlen = 0;
  s->ws_hneed = 2;
  return 0;
}

/* Returns -1 when the connection is gone (error or close). */
static int ws_feed(sub_t *s, const uint8_t *p, size_t n) {
  while (n) {
    if (s->ws_hlen < s->ws_hneed) {
      s->ws_hdr[s->ws_hlen++] = *p++;
      n--;
      if (s->ws_hlen == 2) {
        uint8_t len7 = s->ws_hdr[1] & 0x7f;
        if (s->ws_hdr[1] & 0x80) goto bad; /* a masked server frame */
        s->ws_hneed = (uint8_t)(2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0));
      }
      if (s->ws_hlen < s->ws_hneed) continue;
      /* the header is complete */
      uint8_t b0 = s->ws_hdr[0], len7 = s->ws_hdr[1] & 0x7f;
      uint64_t len = len7;
      if (len7 == 126) len = (uint64_t)s->ws_hdr[2] << 8 | s->ws_hdr[3];
      if (len7 == 127) {
        len = 0;
        for (int i = 2; i < 10; i++) len = len << 8 | s->ws_hdr[i];
      }
      if (b0 & 0x70) goto bad;
      s->ws_op = b0 & 0x0f;
      s->ws_fin = (b0 & 0x80) != 0;
      s->remaining = len;
      if (s->ws_op & 8) {
        if (!s->ws_fin || len > 125 || s->ws_op > 10) goto bad;
        s->ctrl_len = 0;
        if (len && !(s->ctrl = malloc(125))) goto bad;
      } else if (s->ws_op == 1 || s->ws_op == 2) {
        if (s->ws_in_msg) goto bad;
        s->ws_in_msg = 1;
        s->cap_len = 0;
      } else if (s->ws_op == 0) {
        if (!s->ws_in_msg) goto bad;
      } else {
        goto bad;
      }
      if (!len && ws_frame_end(s)) return -1;
      continue;
    }
    size_t take = n < s->remaining ? n : (size_t)s->remaining;
    if (s->ws_op & 8) {
      memcpy(s->ctrl + s->ctrl_len, p, take);
      s->ctrl_len = (uint8_t)(s->ctrl_len + take);
    } else if (s->cap_len < HEADER_LEN) {
      capture(s, (const char *)p, take);
    }
    p += take, n -= take;
    s->remaining -= take;
    if (!s->remaining && ws_frame_end(s)) return -1;
  }
  return 0;
bad:
  g.protocol_errors++;
  sub_fail(s, "WebSocket protocol error");
  return -1;
}

/* ---- event stream (data: lines; a blank line dispatches; the rest ignored) */

static size_t eol_in(const char *p, size_t n) { /* offset of the first CR or LF, or n */
  const char *lf = memchr(p, '\n', n);
  size_t m = lf ? (size_t)(lf - p) : n;
  const char *cr = memchr(p, '\r', m);
  return cr ? (size_t)(cr - p) : m;
}

static void sse_feed(void *ctx, const char *p, size_t n) {
  sub_t *s = ctx;
  size_t i = 0;
  while (i < n) {
    char c = p[i];
    if (s->sse_cr) {
      s->sse_cr = 0;
      if (c == '\n') {
        i++;
        continue;
      }
    }
    switch (s->sse_state) {
    case SSE_BOL:
      if (c == '\r' || c == '\n') { /* blank line: dispatch */
        i++;
        s->sse_cr = c == '\r';
        if (s->sse_has_data) deliver(s);
        s->sse_has_data = 0, s->sse_lines = 0, s->cap_len = 0;
      } else if (c == ':') {
        i++;
        s->sse_state = SSE_SKIP;
      } else {
        s->sse_state = SSE_NAME;
        s->sse_name_len = 0;
        s->sse_name_ok = 1;
      }
      break;
    case SSE_NAME:
      i++;
      if (c == ':' || c == '\r' || c == '\n') {
        s->sse_is_data = s->sse_name_ok && s->sse_name_len == 4;
        if (c == ':') {
          s->sse_state = s->sse_is_data ? SSE_VALUE_START : SSE_SKIP;
        } else { /* a field name alone: an empty value */
          if (s->sse_is_data) s->sse_has_data = 1, s->sse_lines++;
          s->sse_cr = c == '\r';
          s->sse_state = SSE_BOL;
        }
      } else {
        if (s->sse_name_len >= 4 || c != "data"[s->sse_name_len]) s->sse_name_ok = 0;
        if (s->sse_name_len < 255) s->sse_name_len++;
      }
      break;
    case SSE_VALUE_START:
      if (c == ' ') i++;
      s->sse_has_data = 1;
      s->sse_state = s->sse_lines++ == 0 ? SSE_VALUE : SSE_SKIP;
      break;
    case SSE_VALUE:
    case SSE_SKIP: {
      size_t e = eol_in(p + i, n - i);
      if (s->sse_state == SSE_VALUE) capture(s, p + i, e);
      i += e;
      if (i < n) {
        s->sse_cr = p[i] == '\r';
        i++;
        s->sse_state = SSE_BOL;
      }
      break;
    }
    }
  }
}

/* ---- connection */

static void on_sub_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  sub_t *s = st->data;
  if (nread == 0) return;
  if (nread < 0) {
    sub_fail(s, nread == UV_EOF ? "closed by the server" : uv_strerror((int)nread));
    return;
  }
  g.t_read = now_ns();
  const char *p = buf->base;
  size_t n = (size_t)nread;
  if (s->state == SUB_HEAD) {
    size_t hl = s->head_len;
    int done;
    long took = head_take(s->head, &hl, p, n, &done);
    s->head_len = (uint16_t)hl;
    if (took < 0) return sub_fail(s, "response head too large");
    if (!done) return;
    int status, chunked, close;
    int64_t clen;
    if (parse_head(s->head, s->head_len, &status, &clen, &chunked, &close))
      return sub_fail(s, "not an HTTP response");
    int want = opt.mode == MODE_WS ? 101 : 200;
    if (status != want) {
      char why[64];
      snprintf(why, sizeof why, "status %d", status);
      return sub_fail(s, why);
    }
    free(s->head), s->head = NULL;
    s->chunked = opt.mode == MODE_SSE && chunked;
    s->state = SUB_OPEN;
    g.connected++;
    g.open_subs++;
    g.in_progress--;
    p += took, n -= (size_t)took;
    launch_more();
    check_connect_done();
    if (s->state != SUB_OPEN) return;
  }
  if (s->state != SUB_OPEN || !n) return;
  if (opt.mode == MODE_WS) {
    ws_feed(s, (const uint8_t *)p, n);
  } else if (s->chunked) {
    long used = chunk_feed(&s->chunk, p, n, sse_feed, s);
    if (used < 0) {
      g.protocol_errors++;
      sub_fail(s, "bad chunked encoding");
    } else if (s->chunk.state == CH_DONE) {
      sub_fail(s, "the event stream ended");
    }
  } else {
    sse_feed(s, p, n);
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h, (void)suggested;
  buf->base = rbuf;
  buf->len = sizeof rbuf;
}

static void base64_16(const uint8_t in[16], char out[25]) {
  static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  int o = 0;
  for (int i = 0; i < 15; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
    out[o++] = t[v >> 18], out[o++] = t[(v >> 12) & 63], out[o++] = t[(v >> 6) & 63], out[o++] = t[v & 63];
  }
  uint32_t v = (uint32_t)in[15] << 16;
  out[o++] = t[v >> 18], out[o++] = t[(v >> 12) & 63], out[o++] = '=', out[o++] = '=';
  out[o] = 0;
}

static void on_sub_connect(uv_connect_t *req, int status) {
  sub_t *s = req->data;
  free(req);
  if (s->state != SUB_CONNECTING) return;
  if (status < 0) return sub_fail(s, uv_strerror(status));
  s->state = SUB_HEAD;
  s->head = malloc(HEAD_MAX);
  if (!s->head) return sub_fail(s, "out of memory");
  s->head_len = 0;
  int rc = uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_sub_read);
  if (rc) return sub_fail(s, uv_strerror(rc));
  int u = (int)(s->index % (uint32_t)opt.nsub);
  wbuf_t *w = wbuf_new(g.sub_req_len[u]);
  memcpy(w->data, g.sub_req[u], g.sub_req_len[u]);
  if (opt.mode == MODE_WS) { /* a fresh Sec-WebSocket-Key in the template's placeholder */
    uint8_t key[16];
    uint64_t a = rnd(), b = rnd();
    memcpy(key, &a, 8), memcpy(key + 8, &b, 8);
    char k64[25];
    base64_16(key, k64);
    memcpy(w->data + g.key_off[u], k64, 24);
  }
  rc = wbuf_send((uv_stream_t *)&s->tcp, w);
  if (rc) sub_fail(s, uv_strerror(rc));
}

static void sub_start(sub_t *s) {
  g.in_progress++;
  s->state = SUB_CONNECTING;
  s->started_ns = now_ns();
  s->last_seq = -1;
  s->ws_hneed = 2;
  int rc = uv_tcp_init(g.loop, &s->tcp);
  if (rc) return sub_fail(s, uv_strerror(rc));
  s->inited = 1;
  s->tcp.data = s;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return sub_fail(s, strerror(errno));
  if (opt.sources > 1) {
    /* the port is chosen at connect time, per source address: >64K conns */
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    struct sockaddr_in src = {0};
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(s->index % (uint32_t)opt.sources));
    if (bind(fd, (struct sockaddr *)&src, sizeof src)) {
      int e = errno;
      close(fd);
      return sub_fail(s, strerror(e));
    }
  }
  rc = uv_tcp_open(&s->tcp, fd);
  if (rc) {
    close(fd);
    return sub_fail(s, uv_strerror(rc));
  }
  uv_connect_t *req = malloc(sizeof *req);
  if (!req) return sub_fail(s, "out of memory");
  req->data = s;
  const url_t *url = &opt.sub[s->index % (uint32_t)opt.nsub];
  rc = uv_tcp_connect(req, &s->tcp, (const struct sockaddr *)&url->addr, on_sub_connect);
  if (rc) {
    free(req);
    sub_fail(s, uv_strerror(rc));
  }
}

static void launch_more(void) {
  if (g.launching || g.phase != PH_CONNECT) return;
  g.launching = 1;
  uint64_t now = now_ns();
  while (g.next_sub < opt.subscribers && g.in_progress < opt.concurrency) {
    if (opt.connect_rate > 0) {
      double allowed = opt.connect_rate * (double)(now - g.t_connect_start) / 1e9 + 1;
      if ((double)g.next_sub >= allowed) break;
    }
    sub_start(&g.subs[g.next_sub++]);
  }
  g.launching = 0;
  check_connect_done();
}

static void on_connect_timer(uv_timer_t *t) {
  (void)t;
  if (g.phase != PH_CONNECT) return;
  uint64_t now = now_ns(), limit = (uint64_t)(opt.connect_timeout * 1e9);
  for (long i = 0; i < g.next_sub && g.in_progress > 0; i++) {
    sub_t *s = &g.subs[i];
    if ((s->state == SUB_CONNECTING || s->state == SUB_HEAD) && now - s->started_ns > limit)
      sub_fail(s, "connect timeout");
  }
  launch_more();
}

/* -------------------------------------------------------------- publisher */

static void pump(void);
static void pubc_start(pubc_t *pc);
static void maybe_start_publishing(void);

static void write_posts(pubc_t *pc, uint64_t count) {
  wbuf_t *w = wbuf_new(count * g.post_len);
  uint64_t ts = now_ns();
  if (!g.t_first_post) g.t_first_post = ts;
  for (uint64_t k = 0; k < count; k++) {
    char *m = w->data + k * g.post_len;
    memcpy(m, g.post_tmpl, g.post_len);
    char hdr[HEADER_LEN + 1];
    snprintf(hdr, sizeof hdr, "%08x %016llx ", (unsigned)(g.sent + k), (unsigned long long)ts);
    memcpy(m + g.post_head_len, hdr, HEADER_LEN);
  }
  if (wbuf_send((uv_stream_t *)&pc->tcp, w)) {
    note_error("publisher", "write failed");
    return;
  }
  pc->inflight += (int)count;
  g.sent += count;
}

static void write_trigger(pubc_t *pc) {
  wbuf_t *w = wbuf_new(g.post_len);
  memcpy(w->data, g.post_tmpl, g.post_len);
  g.t_first_post = now_ns();
  if (wbuf_send((uv_stream_t *)&pc->tcp, w)) {
    note_error("publisher", "write failed");
    return;
  }
  pc->inflight++;
  g.trigger_sent = 1;
}

static void pump(void) {
  if (g.phase != PH_PUBLISH) return;
  for (long i = 0; i < opt.publishers; i++) {
    pubc_t *pc = &g.pubs[i];
    if (pc->state != PC_READY || pc->close_after) continue;
    if (opt.trigger_s) {
      if (!g.trigger_sent) write_trigger(pc);
      return;
    }
    uint64_t release = opt.rate > 0 ? g.released : (uint64_t)opt.messages;
    while (g.sent < release && pc->inflight < opt.pipeline) {
      uint64_t n = release - g.sent, room = (uint64_t)(opt.pipeline - pc->inflight);
      write_posts(pc, n < room ? n : room);
    }
  }
}

static void on_pubc_closed(uv_handle_t *h) { pubc_start(h->data); }

static void pubc_lost(pubc_t *pc, const char *why) {
  if (pc->state == PC_CLOSING || pc->state == PC_DEAD) return;
  int was_ready = pc->state == PC_READY;
  note_error("publisher", why);
  g.unanswered += (uint64_t)pc->inflight;
  g.t_last_answer = now_ns();
  if (opt.trigger_s && pc->inflight) g.trigger_answered = 1;
  pc->inflight = 0;
  pc->state = PC_CLOSING;
  if (!was_ready) g.pubs_pending--;
  uv_close((uv_handle_t *)&pc->tcp, on_pubc_closed);
}

static void pubc_answer(pubc_t *pc) {
  pc->inflight--;
  g.answered++;
  g.t_last_answer = now_ns();
  if (pc->status >= 200 && pc->status < 300) {
    g.published_ok++;
  } else {
    g.publish_errors++;
    char why[48];
    snprintf(why, sizeof why, "answered %d", pc->status);
    note_error("publisher", why);
  }
  if (opt.trigger_s) g.trigger_answered = 1;
  pc->rp = RP_HEAD;
  pc->head_len = 0;
}

static void on_pub_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  pubc_t *pc = st->data;
  if (nread == 0) return;
  if (nread < 0) return pubc_lost(pc, nread == UV_EOF ? "closed by the server" : uv_strerror((int)nread));
  const char *p = buf->base;
  size_t n = (size_t)nread;
  while (n) {
    if (pc->rp == RP_HEAD) {
      int done;
      long took = head_take(pc->head, &pc->head_len, p, n, &done);
      if (took < 0) return pubc_lost(pc, "response head too large");
      p += took, n -= (size_t)took;
      if (!done) break;
      int64_t clen;
      int chunked, close;
      if (parse_head(pc->head, pc->head_len, &pc->status, &clen, &chunked, &close))
        return pubc_lost(pc, "not an HTTP response");
      pc->close_after = close;
      if (pc->status < 200 || pc->status == 204 || pc->status == 304) {
        if (pc->status < 200) { /* 1xx: the real answer follows */
          pc->head_len = 0;
          continue;
        }
        pubc_answer(pc);
      } else if (chunked) {
        pc->rp = RP_BODY_CHUNKED;
        memset(&pc->chunk, 0, sizeof pc->chunk);
      } else if (clen >= 0) {
        pc->rp = RP_BODY_CL;
        pc->cl_rem = (uint64_t)clen;
        if (!clen) pubc_answer(pc);
      } else {
        return pubc_lost(pc, "answer without a length");
      }
    } else if (pc->rp == RP_BODY_CL) {
      size_t take = n < pc->cl_rem ? n : (size_t)pc->cl_rem;
      p += take, n -= take, pc->cl_rem -= take;
      if (!pc->cl_rem) pubc_answer(pc);
    } else {
      long used = chunk_feed(&pc->chunk, p, n, NULL, NULL);
      if (used < 0) return pubc_lost(pc, "bad chunked answer");
      p += used, n -= (size_t)used;
      if (pc->chunk.state == CH_DONE) pubc_answer(pc);
    }
  }
  if (pc->close_after && pc->inflight == 0) return pubc_lost(pc, "the server closes the connection");
  pump();
}



static void on_pub_connect(uv_connect_t *req, int status) {
  pubc_t *pc = req->data;
  free(req);
  if (pc->state != PC_CONNECTING) return;
  if (status < 0) return pubc_lost(pc, uv_strerror(status));
  uv_tcp_nodelay(&pc->tcp, 1);
  int rc = uv_read_start((uv_stream_t *)&pc->tcp, on_alloc, on_pub_read);
  if (rc) return pubc_lost(pc, uv_strerror(rc));
  pc->state = PC_READY;
  g.pubs_pending--;
  maybe_start_publishing();
  pump();
}

/* Connects (or reconnects, as the close callback of the previous handle). */
static void pubc_start(pubc_t *pc) {
  int first = pc->state == PC_IDLE;
  if (!first) {
    int more = opt.trigger_s ? !g.trigger_sent : g.sent < (uint64_t)opt.messages;
    if (g.phase == PH_DONE || !more || ++pc->reconnects > 5) {
      pc->state = PC_DEAD;
      maybe_start_publishing(); /* in the wait phase: reports that none could connect */
      return;
    }
  }
  pc->state = PC_CONNECTING;
  pc->inflight = 0, pc->rp = RP_HEAD, pc->head_len = 0, pc->close_after = 0;
  g.pubs_pending++;
  uv_tcp_init(g.loop, &pc->tcp);
  pc->tcp.data = pc;
  uv_connect_t *req = malloc(sizeof *req);
  if (!req) {
    fputs("loadgen: out of memory\n", stderr);
    exit(1);
  }
  req->data = pc;
  int rc = uv_tcp_connect(req, &pc->tcp, (const struct sockaddr *)&opt.pub.addr, on_pub_connect);
  if (rc) {
    free(req);
    pubc_lost(pc, uv_strerror(rc));
  }
}

static void on_pub_tick(uv_timer_t *t) {
  uint64_t elapsed = now_ns() - g.t_pub_start;
  double period = (double)opt.burst * 1e9 / opt.rate;
  uint64_t ticks = (uint64_t)((double)elapsed / period) + 1;
  uint64_t rel = ticks * (uint64_t)opt.burst;
  if (rel > (uint64_t)opt.messages) rel = (uint64_t)opt.messages;
  if (rel > g.released) g.released = rel;
  if (g.released >= (uint64_t)opt.messages) uv_timer_stop(t);
  pump();
}

static void on_check(uv_timer_t *t) {
  (void)t;
  uint64_t expected = (uint64_t)opt.messages * (uint64_t)g.connected;
  int all_out = opt.trigger_s ? g.trigger_answered
                              : g.sent >= (uint64_t)opt.messages && g.answered + g.unanswered >= g.sent;
  int dead = 1;
  for (long i = 0; i < opt.publishers; i++) dead &= g.pubs[i].state == PC_DEAD;
  /* everything arrived and every POST was answered: no need to settle */
  if (g.unique >= expected && (all_out || dead)) return finish();
  if (g.open_subs == 0) return finish();
  if (!all_out && !dead) return;
  uint64_t last = g.t_last_answer > g.t_last_delivery ? g.t_last_answer : g.t_last_delivery;
  if (now_ns() - last >= (uint64_t)(opt.settle_ms * 1e6)) finish();
}

static void maybe_start_publishing(void) {
  if (g.phase != PH_WAIT || !g.wait_done || g.pubs_pending > 0) return;
  int ready = 0;
  for (long i = 0; i < opt.publishers; i++) ready += g.pubs[i].state == PC_READY;
  if (!ready) {
    g.phase = PH_DONE;
    report_and_exit(1, "cannot connect to the publisher URL");
  }
  g.released = 0;
  g.t_pub_start = now_ns();
  sample_before();
  g.phase = PH_PUBLISH;
  fprintf(stderr, "loadgen: publishing %ld messages of %ld bytes%s\n", opt.messages, opt.size,
          opt.trigger_s ? " (server-side, triggered)" : "");
  pump(); /* sets t_first_post */
  if (opt.rate > 0 && !opt.trigger_s) {
    uv_timer_start(&g.t_pub, on_pub_tick, 0, 1);
  }
  uv_timer_start(&g.t_check, on_check, 10, 10);
}

static void on_wait(uv_timer_t *t) {
  (void)t;
  if (g.phase == PH_IDLE) return finish();
  g.wait_done = 1;
  maybe_start_publishing();
}

static void connect_done(void) {
  g.t_connected = now_ns();
  uv_timer_stop(&g.t_connect);
  fprintf(stderr, "loadgen: %ld connected, %ld failed in %.3f s\n", g.connected, g.failed,
          (double)(g.t_connected - g.t_connect_start) / 1e9);
  if (g.connected == 0) {
    g.phase = PH_DONE;
    report_and_exit(1, "no subscriber could connect");
  }
  sample_rss_after();
  g.rss_sampled = 1;
  if (opt.idle_set) {
    g.phase = PH_IDLE;
    uv_timer_start(&g.t_wait, on_wait, (uint64_t)(opt.idle * 1000), 0);
    return;
  }
  g.phase = PH_WAIT;
  for (long i = 0; i < opt.publishers; i++) pubc_start(&g.pubs[i]);
  uv_timer_start(&g.t_wait, on_wait, 200, 0);
}

/* ------------------------------------------------------------------ misc */

static void on_progress(uv_timer_t *t) {
  (void)t;
  static const char *names[] = {"connect", "wait", "publish", "idle", "done"};
  uint64_t expected = (uint64_t)opt.messages * (uint64_t)g.connected;
  fprintf(stderr,
          "loadgen: %6.1fs %-7s conn %ld/%ld failed %ld lost-conn %ld | sent %" PRIu64 " answered %" PRIu64
          " | delivered %" PRIu64 "/%" PRIu64 "\n",
          (double)(now_ns() - g.t_start) / 1e9, names[g.phase], g.connected, opt.subscribers, g.failed,
          g.disconnected, g.sent, g.answered, g.unique, opt.idle_set ? 0 : expected);
}

static void on_timeout(uv_timer_t *t) {
  (void)t;
  g.timed_out = 1;
  fprintf(stderr, "loadgen: timeout after %g s\n", opt.timeout);
  finish();
}

static void on_signal(uv_signal_t *h, int sig) {
  (void)h, (void)sig;
  g.interrupted = 1;
  finish();
}

static void build_templates(void) {
  char hostport[300];
  for (int u = 0; u < opt.nsub; u++) {
    const url_t *url = &opt.sub[u];
    snprintf(hostport, sizeof hostport, "%s:%d", url->host, url->port);
    size_t cap = strlen(url->path) + 512;
    char *req = g.sub_req[u] = malloc(cap);
    if (!req) {
      fputs("loadgen: out of memory\n", stderr);
      exit(1);
    }
    if (opt.mode == MODE_WS) {
      g.sub_req_len[u] = (size_t)snprintf(req, cap,
                                          "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                          "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                                          url->path, hostport);
      g.key_off[u] = (size_t)(strstr(req, "AAAAAAAAAAAAAAAAAAAAAA==") - req);
    } else {
      g.sub_req_len[u] = (size_t)snprintf(req, cap,
                                          "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
                                          "Cache-Control: no-cache\r\n\r\n",
                                          url->path, hostport);
    }
  }
  if (opt.idle_set) return;
  snprintf(hostport, sizeof hostport, "%s:%d", opt.pub.host, opt.pub.port);
  size_t cap = strlen(opt.pub.path) + 512 + (size_t)opt.size;
  g.post_tmpl = malloc(cap);
  if (opt.trigger_s) {
    g.post_len = (size_t)snprintf(g.post_tmpl, cap,
                                  "POST %s%cn=%ld&count=%ld&size=%ld HTTP/1.1\r\nHost: %s\r\n"
                                  "Content-Length: 0\r\n\r\n",
                                  opt.pub.path, strchr(opt.pub.path, '?') ? '&' : '?', opt.burst, opt.messages,
                                  opt.size, hostport);
    g.post_head_len = g.post_len;
    return;
  }
  g.post_head_len = (size_t)snprintf(g.post_tmpl, cap,
                                     "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\n"
                                     "Content-Length: %ld\r\n\r\n",
                                     opt.pub.path, hostport, opt.size);
  memset(g.post_tmpl + g.post_head_len, 'x', (size_t)opt.size);
  g.post_len = g.post_head_len + (size_t)opt.size;
}

int main(int argc, char **argv) {
  parse_args(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)opt.subscribers + 64)
    fprintf(stderr, "loadgen: warning: the open-file limit %llu is below %ld subscribers\n",
            (unsigned long long)rl.rlim_cur, opt.subscribers);

  rng_state = now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x9e3779b97f4a7c15ULL;
  if (!rng_state) rng_state = 1;
  g.loop = uv_default_loop();
  g.subs = calloc((size_t)opt.subscribers, sizeof *g.subs);
  g.pubs = calloc((size_t)opt.publishers, sizeof *g.pubs);
  g.seen_bytes = opt.idle_set ? 0 : ((size_t)opt.messages + 7) / 8;
  g.seen = calloc((size_t)opt.subscribers * g.seen_bytes + 1, 1);
  if (!g.subs || !g.pubs || !g.seen) {
    fprintf(stderr, "loadgen: cannot allocate state for %ld subscribers x %ld messages\n", opt.subscribers,
            opt.messages);
    return 1;
  }
  for (long i = 0; i < opt.subscribers; i++) g.subs[i].index = (uint32_t)i;
  for (long i = 0; i < opt.publishers; i++) g.pubs[i].index = (int)i;
  build_templates();

  uv_timer_init(g.loop, &g.t_progress);
  uv_timer_init(g.loop, &g.t_timeout);
  uv_timer_init(g.loop, &g.t_connect);
  uv_timer_init(g.loop, &g.t_wait);
  uv_timer_init(g.loop, &g.t_pub);
  uv_timer_init(g.loop, &g.t_check);
  uv_signal_init(g.loop, &g.sigint);
  uv_signal_init(g.loop, &g.sigterm);
  uv_signal_start(&g.sigint, on_signal, SIGINT);
  uv_signal_start(&g.sigterm, on_signal, SIGTERM);

  sample_rss_before();
  g.t_start = g.t_connect_start = now_ns();
  fprintf(stderr, "loadgen: %s: connecting %ld %s subscribers to %s%s\n", opt.label[0] ? opt.label : "run",
          opt.subscribers, opt.mode == MODE_WS ? "WebSocket" : "SSE", opt.sub_s[0],
          opt.nsub > 1 ? " and other URLs" : "");
  uv_timer_start(&g.t_progress, on_progress, 1000, 1000);
  uv_timer_start(&g.t_timeout, on_timeout, (uint64_t)(opt.timeout * 1000), 0);
  uv_timer_start(&g.t_connect, on_connect_timer, opt.connect_rate > 0 ? 1 : 100, opt.connect_rate > 0 ? 1 : 100);
  g.phase = PH_CONNECT;
  launch_more();
  uv_run(g.loop, UV_RUN_DEFAULT);
  /* finish() exits; the loop only ends early if nothing is left to wait for */
  finish();
  return 0;
}
