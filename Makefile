# Slipway — the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
DATA_DIR ?= ./var

.PHONY: run test lint fmt build bench bench-deps soak fuzz ami clean

## Run the server on its embedded local default: QUIC 127.0.0.1:1500, metrics 127.0.0.1:9500, data in ./var.
## Built without the `aws` feature (no AWS SDK), so a fresh clone is serving in minutes.
run:
	$(CARGO) run --bin slipway -- serve --data-dir $(DATA_DIR)

## Everything: lint, unit tests, end-to-end tests with the real binaries
test: lint
	$(CARGO) test --workspace --all-targets --all-features --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --workspace --all-features

## Benchmarks (issue 7): Slipway beside dd and nbdcopy→qemu-nbd in one run; rewrites
## docs/benchmarks.md. BENCH_ARGS="--quick" to try it (1 run, small sizes, writes
## target/bench/benchmarks.md), BENCH_ARGS="--scenario 4" for one scenario. Needs root for
## scenario 2 (network namespaces, TUN) and scenario 8 (a live source: loop device, ext4, freezes).
BENCH_ARGS ?=
bench: bench-deps
	$(CARGO) build --release -p slipway --bins
	$(CARGO) build --release -p slipway-bench
	./target/release/slipway-bench $(BENCH_ARGS); rc=$$?; ./target/release/slipway-bench cleanup; exit $$rc

bench-deps:
	@bash bench/deps.sh

clean:
	$(CARGO) clean
	rm -rf $(DATA_DIR)

## Kill soak (issue 6): agents in --follow with a changing workload while the server is
## kill -9ed at random moments; then every replica and restore point is checked. Bounded by
## SOAK_SECONDS (default 10 minutes). Root needed for nothing here.
## Then the power-cut soak (tests/e2e/powercut.rs, root + /dev/fuse): the server's data dir on
## slipway-powercut, cut up to POWERCUT_CUTS times (default 1000) within SOAK_SECONDS.
SOAK_SECONDS ?= 600
soak:
	$(CARGO) build -p slipway-powercut
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test -p slipway --test e2e -- --ignored --nocapture \
	    --test-threads 2 soak:: powercut::powercut_soak

## Fuzzing (issue 6): each cargo-fuzz target of crates/proto/fuzz for FUZZ_SECONDS (default
## 5 minutes each). Stable toolchain, no sanitizer (see docs/reliability.md). The corpus
## grows in crates/proto/fuzz/corpus; crashes land in crates/proto/fuzz/artifacts.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= frame_decoder frame_parts handshake
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	cd crates/proto/fuzz && for t in $(FUZZ_TARGETS); do \
	    $(CARGO) fuzz run --sanitizer none $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=16384 \
	        -print_final_stats=1 || exit 1; \
	done

## Staging AMI (issue 5): Packer (amazon-ebs, Debian 12) runs ami/provision.sh on a temporary
## instance. Needs packer and AWS credentials; AMI_REGION, AMI_VERSION, AMI_BASE (empty: the
## newest official Debian 12), AMI_ARCH (x86_64|arm64). Without packer it says so and fails.
AMI_REGION ?= eu-west-1
AMI_VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
AMI_BASE ?=
AMI_ARCH ?= x86_64
ami:
	@command -v packer >/dev/null || { echo "make ami: packer is not installed (see docs/operations.md, 'Build the AMI'); no AMI built" >&2; exit 1; }
	$(CARGO) build --release -p slipway --features aws --bin slipway
	packer init ami/slipway.pkr.hcl
	packer build -var region=$(AMI_REGION) -var version=$(AMI_VERSION) -var base_ami=$(AMI_BASE) \
	    -var architecture=$(AMI_ARCH) -var binary=$(CURDIR)/target/release/slipway ami/slipway.pkr.hcl

## Debian package of the agent (issue 11 item 5): target/debian/slipway-agent_<version>_<arch>.deb
## with /usr/bin/slipway-agent, its systemd unit (installed, not enabled) and an example
## /etc/slipway/agent.toml (docs/agent.md). Needs dpkg-deb (every Debian has it).
.PHONY: deb
deb:
	$(CARGO) build --release -p slipway --bin slipway-agent
	bash packaging/build-deb.sh
