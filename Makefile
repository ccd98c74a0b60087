# Pacer's make targets. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

export PACER_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/pacer
# CI starts from a fresh clone; a target dir in the cache outside it keeps builds warm there.
ifeq ($(CI),true)
export CARGO_TARGET_DIR ?= $(PACER_CACHE)/target
export CARGO_TERM_COLOR ?= never
endif
CARGO_TARGET_DIR ?= target
PACER := $(CARGO_TARGET_DIR)/debug/pacer

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

.PHONY: build
build: ## Build the pacer binary (debug)
	cargo build

.PHONY: generate
generate: build ## Regenerate crds/ and docs/iam-role.json from the code
	$(PACER) crds --dir crds
	$(PACER) iam-policy > docs/iam-role.json

.PHONY: crds
crds: generate ## Same as generate

.PHONY: check-generated
check-generated: ## Fail when crds/ or docs/iam-role.json differ from what the code generates
	cargo test --lib -- committed_

.PHONY: fmt-check
fmt-check: ## cargo fmt --check
	cargo fmt --all -- --check

.PHONY: clippy
clippy: ## cargo clippy on every target, warnings are errors
	cargo clippy --all-targets -- -D warnings

.PHONY: tools
tools: ## Build or reuse the test ground's tools (kube-apiserver, etcd, moto) in $(PACER_CACHE), and the webhook fixtures
	hack/build-kube.sh >/dev/null
	hack/moto-venv.sh >/dev/null
	hack/webhook-fixtures.sh >/dev/null

.PHONY: test-unit
test-unit: ## Unit tests only (no servers): the inner loop
	cargo test --lib

.PHONY: test
test: fmt-check clippy check-generated tools ## Every check: format, clippy, generated files, unit and integration tests
	cargo test --lib --bins --tests

.PHONY: bench
bench: tools ## Launch latency, EC2 calls per job and memory with many RunnerJobs (BENCH_JOBS, BENCH_STORED, BENCH_LATENCY_MS, BENCH_MOTO=1)
	cargo bench --bench launch --profile $(or $(BENCH_PROFILE),dev)

.PHONY: dev-env
dev-env: tools ## Bring the test ground up in the foreground, CRDs installed; prints how to reach it
	hack/ground.sh --crds crds .tools/ground

.PHONY: demo
demo: build tools ## Bring the ground up, apply the examples and show them
	hack/demo.sh $(PACER)
