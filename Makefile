# Slipway — the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
DATA_DIR ?= ./var

.PHONY: run test lint fmt build bench bench-deps soak fuzz ami clean

## Run the server on its embedded local default: QUIC 127.0.0.1:1500, metrics 127.0.0.1:9500, data in ./var.
## Built without the `aws` feature (no AWS SDK), so a fresh clone is serving in minutes.
run:
	$(CARGO) run --bin slipway -- serve --data-dir $(DATA_DIR)

## Everything: lint, unit tests, end-to-end tests with the real binaries. The e2e tests (root
## package) find slipway-agent and slipway-powercut in target/debug/: `--workspace --all-targets`
## builds them first, as their packages have integration tests (tests/e2e/support.rs, agent_bin).
test: lint
	$(CARGO) test --workspace --all-targets --all-features --no-fail-fast

## Launches that boot (issue 15): a real Debian image (built once with mmdebstrap, cached at
## target/boot/) replicated by the agent, a restore point launched locally in QEMU (TCG) with
## its disk NVMe-attached: without conversion it must not find its root, with conversion it
## must reach its login prompt and pass a check command. Root; qemu-system-x86, mmdebstrap,
## extlinux (.ci/run installs them). A few minutes; docs/launch.md.
.PHONY: test-boot
test-boot:
	$(CARGO) build -p slipway --all-features --bins -p slipway-agent
	bash tests/boot/build-debian-image.sh target/boot/debian-bookworm.img
	$(CARGO) test -p slipway --all-features --test e2e -- --ignored --nocapture --test-threads 1 boot::

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	@# No unused dependencies (issue 13): cargo-machete reads the sources, no build needed.
	@if command -v cargo-machete >/dev/null; then cargo-machete; \
	  else echo "lint: cargo-machete not installed (cargo install --locked cargo-machete; .ci/run does)"; exit 1; fi

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
	$(CARGO) build --release -p slipway -p slipway-agent -p slipway-bench
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
## slipway-powercut, cut up to POWERCUT_CUTS times (default 1000) within POWERCUT_SECONDS
## (default 1 hour: 1000 cuts take about 40 minutes on an idle 2-core machine, 125 on a loaded one). Both run at once.
SOAK_SECONDS ?= 600
POWERCUT_CUTS ?= 1000
POWERCUT_SECONDS ?= 3600
soak:
	$(CARGO) build -p slipway-powercut -p slipway-agent
	SOAK_SECONDS=$(SOAK_SECONDS) POWERCUT_CUTS=$(POWERCUT_CUTS) POWERCUT_SECONDS=$(POWERCUT_SECONDS) \
	    $(CARGO) test -p slipway --test e2e -- --ignored --nocapture \
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
	@test -s ami/files/amazon-ssm-agent.gpg || { echo "make ami: save the SSM agent's public key as ami/files/amazon-ssm-agent.gpg first (docs/operations.md, 'Build the AMI'); no AMI built" >&2; exit 1; }
	$(CARGO) build --release -p slipway --features aws --bin slipway
	packer init ami/slipway.pkr.hcl
	packer build -var region=$(AMI_REGION) -var version=$(AMI_VERSION) -var base_ami=$(AMI_BASE) \
	    -var architecture=$(AMI_ARCH) -var binary=$(CURDIR)/target/release/slipway ami/slipway.pkr.hcl

## Debian package of the agent (issue 11 item 5): target/debian/slipway-agent_<version>_<arch>.deb
## with /usr/bin/slipway-agent, its systemd unit (installed, not enabled) and an example
## /etc/slipway/agent.toml (docs/agent.md). Needs dpkg-deb (every Debian has it).
.PHONY: deb
deb:
	$(CARGO) build --release -p slipway-agent
	bash packaging/build-deb.sh
