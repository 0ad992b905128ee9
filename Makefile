# The two commands of the README:
#   make demo   set-up, build, and the embedded default job (configs/demo.toml)
#   make test   set-up, build, and the whole test suite
# On a cluster (docs/cluster.md, "Installing on a cluster"):
#   make build                 set-up of what the build needs only, and the build
#   make install PREFIX=DIR    a release build, its binaries in DIR/bin
SHELL := /bin/bash
ENV := source scripts/env.sh &&
# Where cargo builds: $CARGO_TARGET_DIR when set (.ci/run keeps one outside the
# clone), else target/.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# make install: where, and which build (release, or debug: what `make build` made).
PREFIX ?= $(HOME)/.local
PROFILE ?= release
# The user-facing binaries: the worker and its commands, the launcher, the
# communication check.
BINS := mlm mlm-launch mlm-comm-check

.PHONY: setup setup-demo setup-test setup-lint build release install demo test bench fmt lint clean-runs

# What the build needs (scripts/setup.sh says what each stage holds).
setup:
	@bash scripts/setup.sh build

setup-demo:
	@bash scripts/setup.sh demo

setup-test:
	@bash scripts/setup.sh test

setup-lint:
	@bash scripts/setup.sh lint

# --workspace: the launcher is its own crate; a bare `cargo build` at the root
# builds only the `mlm` package and `make demo` would miss mlm-launch.
build: setup
	@$(ENV) cargo build --workspace --bins

release: setup
	@$(ENV) cargo build --release --workspace --bins

# The binaries find libtorch without LD_LIBRARY_PATH: build.rs gives them a
# RUNPATH to the torch of $MLM_VENV, which must stay where it is.
install: $(if $(filter debug,$(PROFILE)),build,release)
	@install -d "$(PREFIX)/bin"
	@for b in $(BINS); do install -m 755 "$(TARGET_DIR)/$(PROFILE)/$$b" "$(PREFIX)/bin/$$b" || exit 1; done
	@env -u LD_LIBRARY_PATH "$(PREFIX)/bin/mlm" --version >/dev/null \
		|| { echo "install: $(PREFIX)/bin/mlm does not start (libtorch not found? see ldd)" >&2; exit 1; }
	@echo "installed $(BINS) in $(PREFIX)/bin ($(PROFILE) build)"

demo: build setup-demo
	@$(ENV) $(TARGET_DIR)/debug/mlm-launch configs/demo.toml

test: build setup-test
	@$(ENV) cargo test --workspace --no-fail-fast 2>&1

# Formatting (rustfmt.toml) and lints, warnings as errors: what .ci/run checks.
fmt: setup-lint
	@$(ENV) cargo fmt --all

lint: setup-lint
	@$(ENV) cargo fmt --all --check && $(ENV) cargo clippy --workspace --all-targets -- -D warnings

# The benchmarks against the Python reference (docs/benchmarks.md); slow.
bench: build setup-test
	@$(ENV) cargo bench --bench train_throughput && $(ENV) cargo bench --bench prepare_throughput \
		&& $(ENV) cargo bench --bench resume_position

clean-runs:
	rm -rf runs
