# secretd — the commands README shows and CI runs.
#   make demo    build everything and run the main job end to end
#   make test    build once (release, static) and run every test layer against that build
#   make lint    rustfmt, clippy -D warnings, ruff, mypy --strict
#   make bench   latency/throughput benchmarks (not tests: nothing is gated on time)
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

.PHONY: help build venv test test-rust test-py test-e2e lint demo demo-dynamic bench proto-py clean image fuzz fuzz-smoke

help:
	@echo "targets: demo demo-dynamic test lint bench build venv proto-py clean image fuzz fuzz-smoke"

## build: the whole workspace, once, in one profile (every test layer reuses it)
build:
	$(CARGO) build $(CARGO_ARGS) --workspace --bins --tests

## venv: a venv inside the repo with pinned packages and the client installed from client-py/
venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements-dev.txt client-py/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e client-py
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

demo: build venv
	$(PY) demo/demo.py

## demo-dynamic: dynamic PostgreSQL credentials from OpenBao, rotated into a running function
demo-dynamic: build venv
	$(PY) demo/dynamic_demo.py

## bench: release build, then every benchmark side by side; prints a table, writes bench/RESULTS.md
##        (BASELINE=/path/to/older/secretd adds that build to the interleaved latency runs)
bench: venv
	$(CARGO) build $(CARGO_ARGS) --workspace --bins
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
	rm -rf $(VENV)
