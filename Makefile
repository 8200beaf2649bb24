# Tollgate developer entry points. `make demo` and `make test` are the README's two commands.
.PHONY: demo test deps build lint generate check-generated bench load-bench soak fuzz-smoke

# Run the standalone demo (a proxy, stand-in APIs and a scripted agent).
demo:
	cargo run -p tollgate-proxy --bin tollgate-proxy -- demo

# Everything the tests need, then the whole suite. CI runs exactly this (see .ci/run).
test: deps build
	cargo nextest run --workspace --no-fail-fast
	$(MAKE) fuzz-smoke
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# System tools the tests talk to (redis, prometheus, helm, iptables, ...). Idempotent.
deps:
	bash .ci/install-tools.sh

# The end-to-end tests run the real binaries.
build:
	cargo build --workspace --bins

# Regenerate generated files (config schema, CRDs and their chart copies).
generate:
	cargo run -q -p tollgate-proxy --bin tollgate-proxy -- schema > proxy/config.schema.json
	@if cargo run -q -p tollgate-operator --bin tollgate-operator -- crds --help >/dev/null 2>&1; then \
		cargo run -q -p tollgate-operator --bin tollgate-operator -- crds --out-dir crds; \
		mkdir -p charts/tollgate/files/crds && cp crds/*.yaml charts/tollgate/files/crds/; \
	fi
	@mkdir -p charts/tollgate/files/policies && find policies -maxdepth 1 -name '*.rego' ! -name '*_test.rego' -exec cp {} charts/tollgate/files/policies/ \;

# A bounded coverage-guided libFuzzer run of every fuzz target (FUZZ_SECONDS each, default 10).
fuzz-smoke:
	bash .ci/fuzz-smoke.sh

# Criterion micro-benchmarks.
bench:
	cargo bench -p tollgate-proxy

# The side-by-side load benchmark (direct vs nginx vs Tollgate).
load-bench: deps
	# Tools: nginx-light and wrk (installed by deps). Pins the proxy to CPU 0, load to CPU 1.
	cargo build --release --workspace --bins
	cargo run --release -p tollgate-tests --bin load-bench
	cargo run --release -p tollgate-tests --bin propagation-bench

# Ten minutes of mixed traffic with config reloads, printing RSS and open fds (not in CI).
soak:
	cargo build --release --workspace --bins
	cargo run --release -p tollgate-tests --bin soak -- --minutes 10
