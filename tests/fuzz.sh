#!/usr/bin/env bash
# Builds every fuzz target (firmware/fuzz, agent/fuzz, cloud-sync/fuzz) with libFuzzer's coverage
# instrumentation on the stable toolchain (the flags cargo-fuzz passes, without a
# sanitizer: the code under test is safe Rust) and runs each for FUZZ_SECONDS (default 20)
# from its corpus plus the checked-in regressions. Fails on the first crash, which it keeps
# as crash-* in the fuzz crate's directory. `cargo fuzz run <target>` works too, for longer
# runs (cargo install cargo-fuzz; RUSTC_BOOTSTRAP=1 on stable).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
triple=$(rustc -vV | sed -n 's/^host: //p')
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"

for crate in firmware/fuzz agent/fuzz cloud-sync/fuzz; do
  targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$crate/Cargo.toml" | grep -v -- '-fuzz$')
  echo "building $crate: $(echo "$targets" | tr '\n' ' ')"
  # --target keeps build scripts and proc macros uninstrumented.
  (cd "$crate" && RUSTFLAGS="$flags" cargo build --release --quiet --target "$triple" --bins)
  for t in $targets; do
    corpus="$crate/corpus/$t"
    mkdir -p "$corpus"
    seeds=()
    [ -d "$crate/regressions/$t" ] && seeds+=("$crate/regressions/$t")
    out=$(cd "$crate" && "target/$triple/release/$t" -max_total_time="$seconds" -print_final_stats=1 \
      -artifact_prefix=./ "${corpus#"$crate"/}" "${seeds[@]/#"$crate"\//}" 2>&1) || {
      echo "$out" | tail -30
      echo "fuzz target $t crashed (input saved in $crate)"
      exit 1
    }
    runs=$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p')
    cov=$(echo "$out" | grep -o 'cov: [0-9]*' | tail -1)
    echo "fuzz $t: ${runs:-?} runs in ${seconds} s, ${cov:-cov: ?}, no crash"
  done
done
