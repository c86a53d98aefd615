#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/) and runs each for a bounded time,
# failing on any crash, leak, timeout or failed assertion. CI calls it from
# .ci/run after `cargo test`.
#
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   targets to run (default: all of `cargo fuzz list`)
#   FUZZ_SANITIZER address (default) or none
#   FUZZ_SEED      libFuzzer's -seed (default 1: CI explores the same inputs
#                  each run, so a red step means the code changed, not the
#                  dice; a finding is then reproducible. 0 = a random seed,
#                  for longer local runs that look further)
#
# The machine has one stable toolchain; cargo-fuzz passes nightly-only
# flags (-Z sanitizer, -Cpasses=sancov-module), which RUSTC_BOOTSTRAP=1
# lets stable rustc accept. The build goes to target/fuzz, beside the main
# build (one `target/` to watch and to clean). What a run adds to the
# corpus goes to target/fuzz/corpus/<target>; the committed seeds in
# fuzz/corpus/<target> are read, never written. A crash leaves its input in
# fuzz/artifacts/<target>/ (printed below): fix it, add a regression test to
# the normal suite, and commit the input to fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"
seed="${FUZZ_SEED:-1}"
target_dir="$PWD/target/fuzz"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi

cd fuzz
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
start=$(date +%s)
cargo fuzz build -s "$sanitizer" --target-dir "$target_dir"
echo "fuzz: built in $(( $(date +%s) - start )) s; $(du -sh "$target_dir" | cut -f1) in $target_dir"

for t in $targets; do
    mkdir -p "$target_dir/corpus/$t"
    echo "fuzz: $t for ${seconds} s"
    # -timeout: one input taking over 10 s is a hang, and fails the step.
    cargo fuzz run -s "$sanitizer" --target-dir "$target_dir" "$t" \
        "$target_dir/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -seed="$seed" -print_final_stats=1
done
echo "fuzz: done in $(( $(date +%s) - start )) s"
