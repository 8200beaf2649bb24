#!/usr/bin/env bash
# A short, bounded, coverage-guided libFuzzer run of every target in fuzz/ on the installed
# (stable) toolchain: cargo-fuzz needs nightly flags, which RUSTC_BOOTSTRAP=1 unlocks. Each
# target runs FUZZ_RUNS inputs (default 50000) from its seed corpus with a fixed FUZZ_SEED
# (default 1), so a run is reproducible: what passed on one machine passes on another (a slow
# machine may stop earlier, at FUZZ_SECONDS, default 20, on a prefix of the same sequence).
# Set FUZZ_SEED=0 for a random seed when hunting. A crash fails the run and leaves the input
# in fuzz/artifacts/<target>/. The corpus grown in the run is discarded.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-20}
runs=${FUZZ_RUNS:-50000}
seed=${FUZZ_SEED:-1}
export RUSTC_BOOTSTRAP=1
# No sanitizer: the crate forbids unsafe code, and an ASan build of every dependency would
# double the build; libFuzzer still finds panics and assertion failures.
targets=$(cargo fuzz list)
cargo fuzz build -s none
for t in $targets; do
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/" 2>/dev/null || true
  echo "fuzz smoke: $t ($runs runs, seed $seed, at most ${seconds}s)"
  cargo fuzz run -s none "$t" "$work" -- -seed="$seed" -runs="$runs" -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -2
  rm -rf "$work"
done
