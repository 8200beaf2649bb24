# Tollgate developer entry points. `make demo` and `make test` are the README's two commands.
.PHONY: demo test deps build lint generate check-generated bench load-bench perf-check perf-baseline soak fuzz-smoke differential

# Run the standalone demo (a proxy, stand-in APIs and a scripted agent).
# Built as `make build` builds it, so `make test` afterwards reuses the same artefacts.
demo:
	@cargo build --workspace --bins
	@./target/debug/tollgate-proxy demo

# Everything the tests need, then the whole suite. CI runs exactly this (see .ci/run).
test: deps build
	cargo nextest run --workspace --no-fail-fast
	bash .ci/fuzz-smoke.sh
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

# A bounded, reproducible coverage-guided libFuzzer run of every fuzz target (also in `make test`).
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

# Instruction-count regression check: a fixed number of requests per configuration under
# callgrind, compared with the checked-in baseline (exit 1 on a regression over 20%). Repeatable
# on a noisy machine, unlike CPU time. Reports; CI does not run it.
perf-check:
	command -v valgrind >/dev/null || apt-get install -y -qq valgrind
	cargo build --release --workspace --bins
	cargo run --release -p tollgate-tests --bin load-bench -- --instructions-only --callgrind on --curves true --baseline tests/perf-baseline.json

# Re-record the baseline after an intended change (commit tests/perf-baseline.json with it).
perf-baseline:
	cargo build --release --workspace --bins
	cargo run --release -p tollgate-tests --bin load-bench -- --instructions-only --callgrind on --curves true --write-baseline tests/perf-baseline.json

# Ten minutes of mixed traffic with config reloads, printing RSS and open fds (not in CI).
soak:
	cargo build --release --workspace --bins
	cargo run --release -p tollgate-tests --bin soak -- --minutes 10

# The upstream-zoo differential test alone (issue 13; also part of `make test`): nginx, Flask,
# FastAPI, Express, Go and Tomcat echo stacks, each executing the adversarial corpus.
differential: build
	bash .ci/install-zoo.sh
	cargo nextest run -p tollgate-tests --test differential
