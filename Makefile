# workerbus: `make run` and `make test` do their own set-up on a fresh
# Debian 12 machine that has Rust; see README.md.

SHELL       := /bin/bash
PORT        ?= 8080
NGINX       ?= /usr/sbin/nginx
BUILD       := $(CURDIR)/build
NGX_TREE    := $(BUILD)/nginx
NGX_SRC_PKG := /usr/share/nginx/src
MODULE      := $(BUILD)/ngx_workerbus_module.so
MODULES_DIR := /usr/lib/nginx/modules
LUA_DIR     := /usr/share/lua/5.1
CARGO_ENV   := NGINX_SOURCE_DIR=$(NGX_TREE) NGINX_BUILD_DIR=$(NGX_TREE)/objs
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

.PHONY: all deps build build-test-hooks install run test test-core test-nginx lint fuzz bench bench-pg bench-sync clean

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

# A private copy of Debian's nginx tree, configured with Debian's own flags,
# so the module's signature matches /usr/sbin/nginx.
$(NGX_TREE)/objs/ngx_auto_config.h:
	@nv=$$($(NGINX) -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p'); \
	hv=$$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' $(NGX_SRC_PKG)/src/core/nginx.h); \
	if [ "$$nv" != "$$hv" ]; then \
	  echo "error: $(NGINX) is nginx $$nv but the headers in $(NGX_SRC_PKG) are nginx $$hv;" \
	       "install matching nginx and nginx-dev packages" >&2; exit 1; \
	fi
	rm -rf $(NGX_TREE) && mkdir -p $(BUILD) && cp -r $(NGX_SRC_PKG) $(NGX_TREE)
	cd $(NGX_TREE) && source ./conf_flags && ./configure "$${NGX_CONF_FLAGS[@]}" > $(BUILD)/configure.log 2>&1 \
	  || { tail -20 $(BUILD)/configure.log; exit 1; }

build: deps $(NGX_TREE)/objs/ngx_auto_config.h
	$(CARGO_ENV) cargo build --release
	cp target/release/libworkerbus.so $(MODULE).tmp && mv -f $(MODULE).tmp $(MODULE)   # a new inode: running nginx keeps its mapping
	@echo "built $(MODULE)"
	@if nm -D $(MODULE) | grep -q ' workerbus_test_'; then \
	  echo "error: $(MODULE) exports test hooks" >&2; exit 1; fi

build-test-hooks: build
	$(CARGO_ENV) cargo build --release --features test-hooks --target-dir target/test-hooks
	@mkdir -p $(dir $(TEST_MODULE))
	cp target/test-hooks/release/libworkerbus.so $(TEST_MODULE).tmp && mv -f $(TEST_MODULE).tmp $(TEST_MODULE)
	@echo "built $(TEST_MODULE) (with test hooks)"

# Puts the module and the Lua modules where Debian's nginx and LuaJIT look.
install: build
	install -m 0644 $(MODULE) $(MODULES_DIR)/ngx_workerbus_module.so
	cd lib && find resty -name '*.lua' -exec install -D -m 0644 {} $(LUA_DIR)/{} \;
	@echo "add to nginx.conf: load_module $(MODULES_DIR)/ngx_workerbus_module.so;"

# nginx in the foreground with the demo on 127.0.0.1:$(PORT); Ctrl-C stops it.
run: build
	@mkdir -p $(BUILD)/run/conf $(BUILD)/run/logs
	@sed -e 's|@PORT@|$(PORT)|g' -e 's|@MODULE@|$(MODULE)|g' -e 's|@MODULES_DIR@|$(MODULES_DIR)|g' \
	     -e 's|@LIB@|$(CURDIR)/lib|g' nginx-conf/demo.conf > $(BUILD)/run/conf/nginx.conf
	$(NGINX) -t -q -p $(BUILD)/run/ -c conf/nginx.conf
	@echo
	@echo "workerbus demo on http://127.0.0.1:$(PORT)/ (Ctrl-C stops it). Try:"
	@echo "  curl 127.0.0.1:$(PORT)/status            # zones, generations, workers, event ring"
	@echo "  open http://127.0.0.1:$(PORT)/status      # the same as a live page, in a browser"
	@echo "  curl 127.0.0.1:$(PORT)/metrics           # Prometheus text format"
	@echo "  curl -N 127.0.0.1:$(PORT)/tail           # the bus as Server-Sent Events (with payloads)"
	@echo "  curl '127.0.0.1:$(PORT)/post?msg=hello'  # post an event to every worker"
	@echo "  curl 127.0.0.1:$(PORT)/seen              # what this worker's handler received"
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
	python3 tools/check_layers.py   # core < glue < ffi, no core import cycle

test-nginx: build-test-hooks
	TEST_NGINX_BINARY=$(NGINX) TEST_NGINX_LOAD_MODULES="$(LOAD_MODULES)" \
	  TEST_NGINX_LUA_PATH="$(CURDIR)/lib/?.lua;;" prove -I t/lib t/

test: build lint test-core test-nginx

bench: build
	bench/run
	bench/scrape
	bench/tail

# The PostgreSQL bus between two nodes through the local server (see bench/pg_run).
bench-pg: build
	bench/pg_run

bench-sync: build
	bench/sync_run

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
