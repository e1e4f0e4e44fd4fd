# Slipway — the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
DATA_DIR ?= ./var

.PHONY: run test lint fmt build bench bench-deps soak fuzz ami clean

## Run the server on its embedded local default: QUIC 127.0.0.1:1500, metrics 127.0.0.1:9500, data in ./var
run:
	$(CARGO) run --bin slipway -- serve --data-dir $(DATA_DIR)

## Everything: lint, unit tests, end-to-end tests with the real binaries
test: lint
	$(CARGO) test --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --workspace

## Benchmarks (issue 7): Slipway beside dd and nbdcopy→qemu-nbd in one run; rewrites
## docs/benchmarks.md. BENCH_ARGS="--quick" to try it (1 run, small sizes, writes
## target/bench/benchmarks.md), BENCH_ARGS="--scenario 4" for one scenario. Needs root for
## scenario 2 (network namespaces, TUN).
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
