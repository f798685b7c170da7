# workerbus: `make run` and `make test` do their own set-up on a fresh
# Debian 12 machine that has Rust; see README.md.

SHELL       := /bin/bash
PORT        ?= 8080
NGINX       ?= /usr/sbin/nginx
BUILD       := $(CURDIR)/build
# Another nginx: `make build NGINX=/path/to/sbin/nginx NGINX_SRC=<its source
# tree>` (README, "Building for another nginx"); the tree is configured with
# the binary's own `nginx -V` arguments so the module's signature matches.
NGINX_SRC   ?= /usr/share/nginx/src
NGX_TREE    ?= $(BUILD)/nginx
MODULE      ?= $(BUILD)/ngx_workerbus_module.so
TARGET_DIR  ?= $(CURDIR)/target
MODULES_DIR := /usr/lib/nginx/modules
LUA_DIR     := /usr/share/lua/5.1
CARGO_ENV   := NGINX_SOURCE_DIR=$(NGX_TREE) NGINX_BUILD_DIR=$(NGX_TREE)/objs CARGO_TARGET_DIR=$(TARGET_DIR)
# The module the suites load: built with the `test-hooks` feature (the test-only
# C entry points, workerbus_test_*), in its own target directory so that it and
# $(MODULE), which never has them, are both kept built.
TEST_MODULE := $(BUILD)/test-hooks/ngx_workerbus_module.so
LOAD_MODULES := $(MODULES_DIR)/ndk_http_module.so $(MODULES_DIR)/ngx_http_lua_module.so $(TEST_MODULE)

# Debian packages the build, the demo and the tests need (PostgreSQL: the
# bridge's suites t/4xx start private servers with its initdb/pg_ctl when no
# server serves trust logins on 127.0.0.1:5432; openssl makes their TLS certificates). Never `luajit`:
# it conflicts with libluajit2 and removes the Lua module; `luajit2` is the CLI.
PACKAGES := nginx nginx-dev libnginx-mod-http-lua libnginx-mod-http-ndk \
            lua-resty-core lua-cjson luajit2 libclang-dev \
            libtest-base-perl libtest-simple-perl libwww-perl libtext-diff-perl libipc-run-perl \
            curl procps bc python3 \
            postgresql postgresql-client openssl
# Tools of the operator-facing tests: prometheus carries promtool
# (t/300-metrics.t checks the scrape with it), chromium renders the status
# page (t/310-status-page.t). Where one cannot be installed, deps says so and
# its test is skipped with a message. Installing prometheus starts its
# server: deps stops and disables it again.
TEST_PACKAGES := prometheus chromium

.PHONY: all deps build build-test-hooks build-hop-trace install run test test-core test-nginx test-other-nginx lint fuzz bench bench-pg bench-sync bench-memory bench-hops bench-instr clean
.PHONY: deb

all: build

# Installs only what is missing; quick when everything is there.
deps:
	@missing=$$(for p in $(PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  systemctl disable --now nginx >/dev/null 2>&1 || true; \
	  service nginx stop >/dev/null 2>&1 || true; \
	fi
	@missing=$$(for p in $(TEST_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	  done); \
	for p in $$missing; do \
	  echo "installing $$p (for the tests)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$p >/dev/null; } \
	    || echo "warning: could not install $$p: the tests that need it will be skipped"; \
	  if [ $$p = prometheus ]; then \
	    systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	    service prometheus stop >/dev/null 2>&1 || true; \
	  fi; \
	done

# A private copy of the nginx tree, configured as the binary was (Debian's
# tree carries its flags in conf_flags; any other is configured with the
# binary's `nginx -V` arguments, its --add-module/--add-dynamic-module ones
# left out: they do not change the module signature and point at the
# builder's paths), so the module's signature matches $(NGINX).
$(NGX_TREE)/objs/ngx_auto_config.h:
	@nv=$$($(NGINX) -v 2>&1 | sed -n 's|.*version: [a-z]*/\([0-9]*\.[0-9]*\.[0-9]*\).*|\1|p'); \
	hv=$$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' $(NGINX_SRC)/src/core/nginx.h); \
	if [ "$$nv" != "$$hv" ]; then \
	  echo "error: $(NGINX) is nginx $$nv but the sources in $(NGINX_SRC) are nginx $$hv;" \
	       "install matching nginx and nginx-dev packages, or give NGINX_SRC=<nginx $$nv's source tree>" >&2; exit 1; \
	fi
	rm -rf $(NGX_TREE) && mkdir -p $(dir $(NGX_TREE)) $(BUILD) && cp -r $(NGINX_SRC) $(NGX_TREE)
	cd $(NGX_TREE) && if [ -f conf_flags ]; then \
	  source ./conf_flags && set -- "$${NGX_CONF_FLAGS[@]}"; \
	else \
	  args=$$($(NGINX) -V 2>&1 | sed -n 's/^configure arguments: //p'); eval "set -- $$args"; \
	  for a; do shift; case "$$a" in --add-module=*|--add-dynamic-module=*) ;; *) set -- "$$@" "$$a";; esac; done; \
	fi; \
	conf=./configure; [ -x $$conf ] || conf=auto/configure; \
	$$conf "$$@" > $(BUILD)/configure-$(notdir $(NGX_TREE)).log 2>&1 \
	  || { tail -20 $(BUILD)/configure-$(notdir $(NGX_TREE)).log; exit 1; }

build: deps $(NGX_TREE)/objs/ngx_auto_config.h
	$(CARGO_ENV) cargo build --release
	@mkdir -p $(dir $(MODULE))
	cp $(TARGET_DIR)/release/libworkerbus.so $(MODULE).tmp && mv -f $(MODULE).tmp $(MODULE)   # a new inode: running nginx keeps its mapping
	@echo "built $(MODULE)"
	@if nm -D $(MODULE) | grep -q ' workerbus_\(test\|hop\)_'; then \
	  echo "error: $(MODULE) exports test or trace hooks" >&2; exit 1; fi

build-test-hooks: build
	$(CARGO_ENV) cargo build --release --features test-hooks --target-dir target/test-hooks
	@mkdir -p $(dir $(TEST_MODULE))
	cp target/test-hooks/release/libworkerbus.so $(TEST_MODULE).tmp && mv -f $(TEST_MODULE).tmp $(TEST_MODULE)
	@echo "built $(TEST_MODULE) (with test hooks)"

# The module bench/hops loads: built with the `hop-trace` feature (a
# timestamp at each hop of a wake-up, src/module/hop.rs), in its own target
# directory; neither $(MODULE) nor $(TEST_MODULE) has it.
HOP_MODULE := $(BUILD)/hop-trace/ngx_workerbus_module.so
build-hop-trace: build
	$(CARGO_ENV) cargo build --release --features hop-trace --target-dir target/hop-trace
	@mkdir -p $(dir $(HOP_MODULE))
	cp target/hop-trace/release/libworkerbus.so $(HOP_MODULE).tmp && mv -f $(HOP_MODULE).tmp $(HOP_MODULE)
	@echo "built $(HOP_MODULE) (with hop trace)"

# Puts the module and the Lua modules where Debian's nginx and LuaJIT look.
install: build
	install -m 0644 $(MODULE) $(MODULES_DIR)/ngx_workerbus_module.so
	cd lib && find resty -name '*.lua' -exec install -D -m 0644 {} $(LUA_DIR)/{} \;
	@echo "add to nginx.conf: load_module $(MODULES_DIR)/ngx_workerbus_module.so;"

# The Debian package build/libnginx-mod-workerbus_<version>_<arch>.deb, laid
# out like Debian's libnginx-mod-* (pkg/build-deb says what goes where; the
# version is Cargo.toml's). t/600-deb.t installs, runs and purges it.
# dpkg-dev: dpkg-shlibdeps for the Depends, binutils' strip.
PACKAGES += dpkg-dev
deb: build
	@pkg/build-deb $(MODULE) lib $(BUILD)

# nginx in the foreground with the demo on 127.0.0.1:$(PORT); Ctrl-C stops it.
# The demo's PostgreSQL bridge is on when PG_URL takes a login (trust, as the
# tests' server on 127.0.0.1:5432), off without PostgreSQL or with PG=off.
PG      ?= auto
PG_URL  ?= postgresql://postgres@127.0.0.1:5432/test?sslmode=disable
run: build
	@mkdir -p $(BUILD)/run/conf $(BUILD)/run/logs
	@if [ "$(PG)" != off ] && PGCONNECT_TIMEOUT=2 psql -X -w -q -At -d '$(PG_URL)' -c 'select 1' >/dev/null 2>&1; then \
	  pg= pg_on=true; echo "PostgreSQL answers at $(PG_URL): the demo's bridge is on (/pg/wait, /pg/post)"; \
	elif [ "$(PG)" = off ]; then \
	  pg='# ' pg_on=false; echo "PG=off: the demo runs without the PostgreSQL bridge"; \
	else \
	  pg='# ' pg_on=false; echo "no PostgreSQL login at $(PG_URL): the demo runs without the bridge" \
	    "(start PostgreSQL with trust logins on 127.0.0.1:5432, or set PG_URL=...)"; \
	fi; \
	sed -e 's|@PORT@|$(PORT)|g' -e 's|@MODULE@|$(MODULE)|g' -e 's|@MODULES_DIR@|$(MODULES_DIR)|g' \
	    -e 's|@LIB@|$(CURDIR)/lib|g' -e "s|@PG@|$$pg|g" -e "s|@PG_ON@|$$pg_on|g" \
	    -e 's|@PG_URL@|$(subst &,\&,$(subst |,\|,$(PG_URL)))|g' nginx-conf/demo.conf > $(BUILD)/run/conf/nginx.conf
	@echo "resty.sync: task demo-config, a new version every 10 s (curl 127.0.0.1:$(PORT)/sync)"
	$(NGINX) -t -q -p $(BUILD)/run/ -c conf/nginx.conf
	@echo
	@echo "workerbus demo on http://127.0.0.1:$(PORT)/ (Ctrl-C stops it). Try:"
	@echo "  curl 127.0.0.1:$(PORT)/status            # zones, generations, workers, event ring"
	@echo "  open http://127.0.0.1:$(PORT)/status      # the same as a live page, in a browser"
	@echo "  curl 127.0.0.1:$(PORT)/metrics           # Prometheus text format"
	@echo "  curl -N 127.0.0.1:$(PORT)/tail           # the bus as Server-Sent Events (with payloads)"
	@echo "  curl '127.0.0.1:$(PORT)/post?msg=hello'  # post an event to every worker"
	@echo "  curl 127.0.0.1:$(PORT)/seen              # what this worker's handler received"
	@echo "  curl 127.0.0.1:$(PORT)/sync              # the resty.sync task's version and data"
	@echo "  curl 127.0.0.1:$(PORT)/pg/wait & curl '127.0.0.1:$(PORT)/pg/post?msg=hi'   # across nodes (with the bridge)"
	@echo "  kill -HUP \$$(cat $(BUILD)/run/logs/nginx.pid)   # reload: generation 2"
	@echo
	exec $(NGINX) -p $(BUILD)/run/ -c conf/nginx.conf -g 'daemon off;'

test-core:
	cargo test --release --no-default-features

# rustfmt and clippy come from rustup components; added when missing.
lint: build
	@rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
	cargo fmt --check
	cargo clippy --release --all-targets --no-default-features -- -D warnings
	$(CARGO_ENV) cargo clippy --release --all-targets -- -D warnings
	$(CARGO_ENV) cargo clippy --release --all-targets --features test-hooks --target-dir target/test-hooks -- -D warnings
	$(CARGO_ENV) cargo clippy --release --all-targets --features hop-trace --target-dir target/hop-trace -- -D warnings
	python3 tools/check_layers.py   # core < glue < ffi, no core import cycle

test-nginx: build-test-hooks
	TEST_NGINX_BINARY=$(NGINX) TEST_NGINX_LOAD_MODULES="$(LOAD_MODULES)" \
	  TEST_NGINX_LUA_PATH="$(CURDIR)/lib/?.lua;;" prove -I t/lib t/

test: build lint test-core test-nginx test-other-nginx

# A second nginx, 1.28 from the nginx-src crate (crates.io; tools/nginx-src),
# built with --with-compat; the module built for it the way a user builds
# for their own nginx (NGINX=, NGINX_SRC=); then the suites that need no Lua.
OTHER       := $(BUILD)/other-nginx
OTHER_NGINX := $(OTHER)/sbin/nginx

$(OTHER_NGINX):
	@src=$$(cargo metadata --format-version 1 --manifest-path tools/nginx-src/Cargo.toml \
	  | python3 -c 'import json,sys,os; d=json.load(sys.stdin); print([os.path.dirname(p["manifest_path"]) for p in d["packages"] if p["name"]=="nginx-src"][0])'); \
	rm -rf $(OTHER) && mkdir -p $(OTHER) && cp -r $$src/nginx $(OTHER)/src && echo "building nginx from $$src"
	cd $(OTHER)/src && auto/configure --prefix=$(OTHER) --with-compat --with-threads --with-http_ssl_module --with-stream \
	  > $(OTHER)/configure.log 2>&1 || { tail -20 $(OTHER)/configure.log; exit 1; }
	$(MAKE) -C $(OTHER)/src -j2 > $(OTHER)/make.log 2>&1 || { tail -20 $(OTHER)/make.log; exit 1; }
	$(MAKE) -C $(OTHER)/src install > /dev/null

test-other-nginx: deps $(OTHER_NGINX)
	$(MAKE) build NGINX=$(OTHER_NGINX) NGINX_SRC=$(OTHER)/src NGX_TREE=$(OTHER)/tree \
	  MODULE=$(OTHER)/ngx_workerbus_module.so TARGET_DIR=$(OTHER)/target
	TEST_NGINX_BINARY=$(OTHER_NGINX) TEST_NGINX_LOAD_MODULES="$(OTHER)/ngx_workerbus_module.so" \
	  prove -I t/lib t/008-no-lua.t t/400-pg-config.t

bench: build
	$(CARGO_ENV) cargo build --release --example wake_floor --example idle_floor
	bench/run
	bench/scrape
	bench/tail
	bench/memory

# The PostgreSQL bus between two nodes through the local server, beside its
# floor (examples/pg_floor.rs) in the same run (see bench/pg_run).
bench-pg: build
	$(CARGO_ENV) cargo build --release --example pg_floor
	bench/pg_run

bench-sync: build
	bench/sync_run

# What the module costs an idle node: RSS per worker with and without it,
# and the zone's parts (see bench/memory).
bench-memory: build
	bench/memory

# Where a wake-up's time goes: the per-hop medians (see bench/hops).
bench-hops: build-hop-trace
	$(CARGO_ENV) cargo build --release --example wake_floor
	bench/hops

# Instructions per delivery, poster and woken worker, by callgrind: a count
# that a loaded machine does not move (see bench/instructions).
bench-instr: build
	@command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null; }
	bench/instructions

clean:
	rm -rf $(BUILD) target t/servroot*

# Fuzzing (not part of `make test`): libFuzzer through cargo-fuzz, each
# target for FUZZ_SECONDS. Seeds are kept in fuzz/corpus/<target>; what a
# run learns goes to fuzz/out/<target> and findings to fuzz/artifacts/
# (both ignored by git). Only the stable toolchain exists here, so
# RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z sanitizer flags. See fuzz/README.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := ring_reader ffi_args
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p out/$$t && \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a $$t out/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 || exit 1; \
	done
