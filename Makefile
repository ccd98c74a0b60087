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
# The image the chart runs by default: its image.repository, tagged with its appVersion.
IMAGE ?= $(shell sed -n 's/^  repository: //p' charts/pacer/values.yaml):$(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/pacer/Chart.yaml)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

.PHONY: build
build: ## Build the pacer binary and the test ground's pacer-testbed (debug)
	cargo build
	@# The testbed needs the `testing` feature, which the pacer binary never gets.
	cargo build --features testing --bin pacer-testbed

.PHONY: generate
generate: build ## Regenerate crds/ (and the chart's), deploy/pacer.yaml, docs/iam-role.json and docs/iam-policy.md from the code
	$(PACER) crds --dir crds
	$(PACER) crds --dir charts/pacer/crds
	$$(hack/build-helm.sh) template pacer charts/pacer --namespace pacer --include-crds --kube-version 1.31.0 \
	  -f charts/pacer/ci/minimal-values.yaml > deploy/pacer.yaml
	$(PACER) iam-policy > docs/iam-role.json
	$(PACER) reference > docs/reference.md
	$(PACER) iam-policy --explain > docs/iam-policy.md
	$(PACER) iam-policy --html > docs/iam-policy-builder.html

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

.PHONY: demo-tools
demo-tools: ## Build or reuse only what `make demo` and `make dev-env` run: kube-apiserver, etcd, kubectl, moto and the npm webhook examples
	@# Side by side: moto's and npm's downloads overlap the Go builds.
	hack/build-kube.sh >/dev/null & kube=$$!; \
	hack/moto-venv.sh >/dev/null & moto=$$!; \
	hack/npm-tools.sh >/dev/null & npm=$$!; \
	ok=0; for pid in $$kube $$moto $$npm; do wait $$pid || ok=1; done; exit $$ok

.PHONY: tools
tools: demo-tools ## Build or reuse every tool `make test` needs (also parliament, shellcheck, hadolint, pebble, helm, crane, cargo-deny, cargo-audit, chromium) in $(PACER_CACHE)
	hack/parliament-venv.sh >/dev/null
	hack/shellcheck.sh --version >/dev/null
	hack/hadolint.sh --version >/dev/null
	hack/build-pebble.sh >/dev/null
	hack/build-helm.sh >/dev/null
	hack/build-crane.sh >/dev/null
	hack/cargo-tools.sh >/dev/null
	hack/chromium.sh >/dev/null

.PHONY: shellcheck
shellcheck: ## shellcheck the runner boot script and the project's scripts
	hack/shellcheck.sh src/domain/boot.sh hack/*.sh

.PHONY: image
image: ## Build the release binary, pack the image daemonless as an OCI layout in $(CARGO_TARGET_DIR)/image/oci (IMAGE=repository:tag) and run it once; push with `crane push`
	cargo build --release --locked --bin pacer
	hack/image.sh --smoke $(CARGO_TARGET_DIR)/release/pacer $(CARGO_TARGET_DIR)/image $(IMAGE)
	@echo "push: $$(hack/build-crane.sh) push $(CARGO_TARGET_DIR)/image/oci $(IMAGE)"

.PHONY: image-check
image-check: build ## Lint the Dockerfile; pack the debug binary as `make image` packs the release one and run it in the image as its user
	hack/hadolint.sh Dockerfile
	hack/image.sh --smoke $(PACER) $(CARGO_TARGET_DIR)/image-check $(IMAGE)

.PHONY: supply-chain
supply-chain: ## cargo deny (licences, bans, sources) and cargo audit (RustSec, offline)
	hack/supply-chain.sh

.PHONY: test-unit
test-unit: ## Unit tests only (no servers): the inner loop
	cargo test --lib

.PHONY: test
AWS_CALL_LOG := $(CURDIR)/target/aws-calls
# Test grounds keep their logs for a post-mortem; the target (in CI, a cache) keeps two days'.
GROUNDS = $(CARGO_TARGET_DIR)/tmp
PRUNE_GROUNDS = if [ -d "$(GROUNDS)" ]; then find "$(GROUNDS)" -mindepth 1 -maxdepth 1 -mtime +1 -exec rm -rf {} +; fi

test: fmt-check clippy shellcheck check-generated tools supply-chain image-check ## Every check: format, clippy, shellcheck, generated files, supply chain, the image, unit and integration tests, the IAM policy proven, the demo ended by each signal
	rm -rf $(AWS_CALL_LOG)
	$(PRUNE_GROUNDS)
	AWS_PROXY_CALL_LOG=$(AWS_CALL_LOG) cargo test --lib --bins --tests
	cargo build --quiet
	cargo build --quiet --features testing --bin pacer-testbed
	hack/iam-check.sh $(PACER) $(AWS_CALL_LOG)
	hack/demo-signals.sh $(PACER)

.PHONY: fuzz
fuzz: ## The hostile-input properties (identity documents, callback tokens, webhooks; pool specs through `pacer validate` and the API server) for PACER_FUZZ_MS each (default a minute); `make test` runs them for 2 s
	PACER_FUZZ_MS=$${PACER_FUZZ_MS:-60000} cargo test --test hostile_input --test pool_agreement

.PHONY: iam-check
iam-check: build ## Lint the IAM policy and simulate the AWS calls the last `make test` recorded against it
	hack/iam-check.sh $(PACER) $(AWS_CALL_LOG)

.PHONY: bench
bench: tools ## Launch latency, EC2 calls per job and memory with many RunnerJobs (BENCH_JOBS, BENCH_STORED, BENCH_LATENCY_MS, BENCH_ONLY)
	$(PRUNE_GROUNDS)
	cargo bench --bench launch --profile $(or $(BENCH_PROFILE),dev)

.PHONY: chaos
CHAOS_REPORT := $(CURDIR)/bench/results/chaos-latest.md
chaos: tools ## The fault scenarios with CHAOS_JOBS jobs each (default 40), one at a time; writes bench/results/chaos-latest.md
	$(PRUNE_GROUNDS)
	mkdir -p $(dir $(CHAOS_REPORT))
	{ echo '# Chaos run'; echo; \
	  echo "$$(date -u +%Y-%m-%dT%H:%MZ), commit $$(git rev-parse --short HEAD), $${CHAOS_JOBS:-40} jobs per scenario, maxRunners 4, \`make chaos\`."; \
	  echo 'Every count after `fired` must be zero; `explained` lists jobs that ended without running here, or lost with their instance, by the reason they give.'; echo; \
	  echo '| scenario | jobs | fired | succeeded | explained | unexplained | busy killed | extra instances | left alive | left runners | over maxRunners (most alive) | took |'; \
	  echo '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |'; } > $(CHAOS_REPORT)
	CHAOS_JOBS=$${CHAOS_JOBS:-40} CHAOS_REPORT=$(CHAOS_REPORT) cargo test --test chaos --test chaos_whole -- --test-threads=1

.PHONY: dev-env
dev-env: demo-tools ## Bring the test ground up in the foreground, CRDs installed; prints how to reach it
	hack/ground.sh --crds crds .tools/ground

.PHONY: demo-signals
demo-signals: build demo-tools ## Start `make demo` and end it with each signal (Ctrl-C, SIGTERM, SIGHUP); fail if anything it started is left
	hack/demo-signals.sh $(PACER)

.PHONY: demo
demo: build demo-tools ## The whole system locally: ground, fake GitHub, runner simulator, two pacer replicas, webhook-driven jobs
	hack/demo.sh $(PACER)
