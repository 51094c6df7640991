# herald: make deps | build | test | valgrind | demo | asan | lint | release | install | rock | clean
LUA      ?= lua5.4
CC       ?= cc
LLHTTP   ?= /usr/share/llhttp
LLHTTP_H ?= /usr/share/include/llhttp
LUA_INC  ?= $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
UV_LIBS  ?= $(shell pkg-config --libs libuv 2>/dev/null || echo -luv)
# wslay reads WebSocket frames; OpenSSL does TLS and the WebSocket handshake's SHA-1;
# hiredis parses and formats Redis's protocol for the Redis broker.
LIBS     := $(UV_LIBS) -lwslay -lssl -lcrypto -lhiredis

BUILD    := build
SRCS     := $(wildcard csrc/*.c)
HDRS     := $(wildcard csrc/*.h)
LLHTTP_SRCS := $(LLHTTP)/llhttp.c $(LLHTTP)/api.c $(LLHTTP)/http.c

UV_INC   ?=

BASE_CFLAGS := -std=c11 -D_DEFAULT_SOURCE -fPIC -fvisibility=hidden -I$(LLHTTP_H) $(LUA_INC) $(UV_INC)
DEV_CFLAGS  := $(BASE_CFLAGS) -O2 -g -Wall -Wextra -Werror
# What luarocks builds: the same code, warnings not fatal on another compiler.
RELEASE_CFLAGS := $(BASE_CFLAGS) -O2 -Wall
ASAN_CFLAGS := $(BASE_CFLAGS) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -Wall -Wextra
# llhttp is generated code: built with its own flags, never -Werror.
LLHTTP_CFLAGS := -std=c11 -fPIC -fvisibility=hidden -O2 -I$(LLHTTP_H)

.PHONY: all deps build asan release install test valgrind demo lint rock clean loadgen

all: build

deps:
	@scripts/deps

build: $(BUILD)/dev/herald/core.so
asan: $(BUILD)/asan/herald/core.so
release: $(BUILD)/release/herald/core.so

# luarocks passes INST_LIBDIR (C modules) and INST_LUADIR (Lua modules).
INST_LIBDIR ?= /usr/local/lib/lua/5.4
INST_LUADIR ?= /usr/local/share/lua/5.4
install: release
	install -d $(INST_LIBDIR)/herald $(INST_LUADIR)/herald
	install -m 755 $(BUILD)/release/herald/core.so $(INST_LIBDIR)/herald/core.so
	install -m 644 lua/herald/*.lua lua/herald/*.js $(INST_LUADIR)/herald/

$(BUILD)/llhttp/%.o: $(LLHTTP)/%.c
	@mkdir -p $(dir $@)
	$(CC) $(LLHTTP_CFLAGS) -c $< -o $@

$(BUILD)/llhttp-asan/%.o: $(LLHTTP)/%.c
	@mkdir -p $(dir $@)
	$(CC) $(LLHTTP_CFLAGS) -fsanitize=address,undefined -c $< -o $@

$(BUILD)/dev/herald/core.so: $(SRCS) $(HDRS) $(LLHTTP_SRCS:$(LLHTTP)/%.c=$(BUILD)/llhttp/%.o)
	@mkdir -p $(dir $@)
	$(CC) $(DEV_CFLAGS) -shared -o $@ $(SRCS) $(filter %.o,$^) $(LIBS)

$(BUILD)/release/herald/core.so: $(SRCS) $(HDRS) $(LLHTTP_SRCS:$(LLHTTP)/%.c=$(BUILD)/llhttp/%.o)
	@mkdir -p $(dir $@)
	$(CC) $(RELEASE_CFLAGS) -shared -o $@ $(SRCS) $(filter %.o,$^) $(LIBS)

$(BUILD)/asan/herald/core.so: $(SRCS) $(HDRS) $(LLHTTP_SRCS:$(LLHTTP)/%.c=$(BUILD)/llhttp-asan/%.o)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -shared -o $@ $(SRCS) $(filter %.o,$^) $(LIBS)

# The benchmarks' load generator (bench/loadgen.c): libuv and libc only.
loadgen: $(BUILD)/bench/loadgen

$(BUILD)/bench/loadgen: bench/loadgen.c
	@mkdir -p $(dir $@)
	$(CC) -O2 -std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -o $@ $< $(UV_LIBS) -lm

# Every spec, against the dev build and then under ASan+UBSan, then the
# end-to-end specs under valgrind; the last line of output is "N passed,
# N failed" over the three runs.
test: deps build asan lint
	@scripts/test

# The end-to-end specs (HTTP, SSE, WebSocket, hub, TLS, limits, ...) and
# the chaos spec's servers with the dev build under valgrind: no invalid
# access, no definite leak (scripts/valgrind; VALGRIND_SPECS="http tls": some).
valgrind: deps build
	@VALGRIND_SPECS="$(VALGRIND_SPECS)" scripts/valgrind

lint:
	luacheck --quiet lua spec examples

# make demo TLS=1: the same over https/wss, with a self-signed certificate
# made here (build/demo-tls/); browsers will ask you to accept it.
DEMO_TLS := $(BUILD)/demo-tls
demo: deps build $(if $(TLS),$(DEMO_TLS)/cert.pem)
	$(if $(TLS),TLS_CERT=$(DEMO_TLS)/cert.pem TLS_KEY=$(DEMO_TLS)/key.pem) scripts/demo

$(DEMO_TLS)/cert.pem:
	@mkdir -p $(DEMO_TLS)
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
	  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
	  -keyout $(DEMO_TLS)/key.pem -out $(DEMO_TLS)/cert.pem 2>/dev/null

rock: deps
	luarocks --lua-version=5.4 make rockspecs/herald-scm-1.rockspec

clean:
	rm -rf $(BUILD)

# make bench: herald and nginx+nchan side by side, every scenario, then
# bench/RESULTS.md and its chart; make bench QUICK=1: small N, to prove it
# works (results in build/bench/, the committed ones stay).
.PHONY: bench
bench: deps release loadgen
	@scripts/bench-deps
	BENCH_BUILD=0 BENCH_COMMAND="make bench$(if $(QUICK), QUICK=$(QUICK))" QUICK=$(QUICK) bench/run; \
	  status=$$?; QUICK=$(QUICK) bench/report && exit $$status

# ---- fuzzing (fuzz/, scripts/fuzz) ----
# make fuzz: builds every libFuzzer target (ASan+UBSan) into build/fuzz/,
# runs each once over its regressions (fuzz/regressions/<target>/) and seeds,
# then for FUZZ_SECONDS from build/fuzz/corpus-<target>/ (a copy of
# fuzz/corpus/<target>/, so what a run finds stays out of the repository).
# Any crash, leak or sanitizer report fails it. make fuzz FUZZ_SECONDS=10:
# a quick run; FUZZ_TARGETS=ws: one target; make fuzz-regressions: no timed run.
# FUZZ_BUILD and FUZZ_EXTRA_CFLAGS make a separate build with other flags
# (e.g. to explore past a known finding: see fuzz/README.md).
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= http ws resume tls
FUZZ_BUILD   ?= $(BUILD)/fuzz
FUZZ_CFLAGS  := -std=c11 -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
                -fno-sanitize-recover=undefined -fsanitize=fuzzer-no-link $(FUZZ_EXTRA_CFLAGS) \
                -I$(LLHTTP_H) $(UV_INC)
FUZZ_HARNESS_CFLAGS := $(FUZZ_CFLAGS) -D_GNU_SOURCE -iquote csrc -Wall -Wextra -Werror
# The Lua bindings and the Redis broker take no input from clients: not linked.
FUZZ_OBJS    := $(patsubst csrc/%.c,$(FUZZ_BUILD)/obj/%.o,$(filter-out csrc/lua_%.c csrc/redis.c csrc/broker_redis.c,$(SRCS))) \
                $(LLHTTP_SRCS:$(LLHTTP)/%.c=$(FUZZ_BUILD)/obj/llhttp-%.o) $(FUZZ_BUILD)/obj/harness.o
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%)

.PHONY: fuzz fuzz-build fuzz-regressions fuzz-coverage
fuzz: fuzz-build
	FUZZ_OUT=$(FUZZ_BUILD) FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz $(FUZZ_TARGETS)

fuzz-regressions: fuzz-build
	FUZZ_OUT=$(FUZZ_BUILD) FUZZ_SECONDS=0 scripts/fuzz $(FUZZ_TARGETS)

# make fuzz-coverage: csrc/'s line coverage by the corpora a make fuzz left
# in build/fuzz/ (and the seeds), from a build for source-based coverage.
fuzz-coverage:
	$(MAKE) fuzz-build FUZZ_BUILD=$(BUILD)/fuzz-cov FUZZ_TARGETS="$(FUZZ_TARGETS)" \
	  FUZZ_EXTRA_CFLAGS="-fprofile-instr-generate -fcoverage-mapping"
	FUZZ_OUT=$(BUILD)/fuzz-cov FUZZ_CORPORA=$(FUZZ_BUILD) scripts/fuzz --coverage $(FUZZ_TARGETS)

fuzz-build: $(FUZZ_BINS)

$(FUZZ_BUILD)/obj/%.o: csrc/%.c $(HDRS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -D_DEFAULT_SOURCE -c $< -o $@

$(FUZZ_BUILD)/obj/llhttp-%.o: $(LLHTTP)/%.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FUZZ_BUILD)/obj/harness.o: fuzz/harness.c fuzz/harness.h $(HDRS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_HARNESS_CFLAGS) -c $< -o $@

$(FUZZ_BINS): $(FUZZ_BUILD)/%: fuzz/%.c fuzz/harness.h $(FUZZ_OBJS)
	$(FUZZ_CC) $(FUZZ_HARNESS_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_OBJS) $(LIBS)
