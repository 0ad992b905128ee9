# The two commands of the README:
#   make demo   set-up, build, and the embedded default job (configs/demo.toml)
#   make test   set-up, build, and the whole test suite
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build demo test bench clean-runs

setup:
	@bash scripts/setup.sh

build: setup
	@$(ENV) cargo build --bins

demo: build
	@$(ENV) ./target/debug/mlm-launch configs/demo.toml

test: setup
	@$(ENV) cargo build --workspace --bins && $(ENV) cargo test --workspace --no-fail-fast 2>&1

clean-runs:
	rm -rf runs
