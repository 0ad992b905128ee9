# The two commands of the README:
#   make demo   set-up, build, and the embedded default job (configs/demo.toml)
#   make test   set-up, build, and the whole test suite
SHELL := /bin/bash
ENV := source scripts/env.sh &&
# Where cargo builds: $CARGO_TARGET_DIR when set (.ci/run keeps one outside the
# clone), else target/.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: setup build demo test bench fmt lint clean-runs

setup:
	@bash scripts/setup.sh

# --workspace: the launcher is its own crate; a bare `cargo build` at the root
# builds only the `mlm` package and `make demo` would miss mlm-launch.
build: setup
	@$(ENV) cargo build --workspace --bins

demo: build
	@$(ENV) $(TARGET_DIR)/debug/mlm-launch configs/demo.toml

test: build
	@$(ENV) cargo test --workspace --no-fail-fast 2>&1

# Formatting (rustfmt.toml) and lints, warnings as errors: what .ci/run checks.
fmt: setup
	@$(ENV) cargo fmt --all

lint: setup
	@$(ENV) cargo fmt --all --check && $(ENV) cargo clippy --workspace --all-targets -- -D warnings

# The benchmarks against the Python reference (docs/benchmarks.md); slow.
bench: build
	@$(ENV) cargo bench --bench train_throughput && $(ENV) cargo bench --bench prepare_throughput \
		&& $(ENV) cargo bench --bench resume_position

clean-runs:
	rm -rf runs
