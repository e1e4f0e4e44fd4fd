# Slipway — the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
DATA_DIR ?= ./var

.PHONY: run test lint fmt build bench soak fuzz ami clean

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

clean:
	$(CARGO) clean
	rm -rf $(DATA_DIR)
