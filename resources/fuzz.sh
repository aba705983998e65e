#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets of tests/fuzz (cargo-fuzz / libFuzzer), one at a time,
# each for a fixed number of executions, and prints per target the executions done, the time
# and the crashes.
#
#   resources/fuzz.sh [--runs N] [TARGET...]     default: every target, N = 1000000
#
# Exits non-zero if any target crashed (a panic, a failed invariant, a timeout or an
# out-of-memory); the reproducer is left under $FUZZ_OUT/artifacts/TARGET/ and can be replayed
# with `cargo fuzz run --fuzz-dir tests/fuzz TARGET FILE`. Starts from the committed seed corpus
# (tests/fuzz/corpus/TARGET) and collects what it finds in $FUZZ_OUT/corpus/TARGET, so the
# repository's corpus only changes when someone merges into it (-merge=1).
#
# libFuzzer needs `-Z` flags that stable rustc only takes with RUSTC_BOOTSTRAP=1, which this
# script sets for the fuzz build alone; cargo-fuzz is installed when missing. Everything runs
# under `nice -n 19` in one process (no -jobs/-workers), so it stays out of the way of other work.
# Environment: CARGO_TARGET_DIR (default target/fuzz), FUZZ_OUT (default
# ${TMPDIR:-/tmp}/p2pvmm-fuzz), FUZZ_TIMEOUT seconds per input (default 10), FUZZ_SANITIZER
# (default none: the targets are safe Rust, where AddressSanitizer finds nothing a panic would
# not, at half the speed; "address" to have it anyway).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
fuzz_dir=$repo/tests/fuzz
runs=1000000
targets=()
while [ $# -gt 0 ]; do
    case $1 in
    --runs)
        runs=${2:?--runs needs a number}
        shift 2
        ;;
    --runs=*)
        runs=${1#--runs=}
        shift
        ;;
    -h | --help)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    -*)
        echo "fuzz.sh: unknown option $1" >&2
        exit 2
        ;;
    *)
        targets+=("$1")
        shift
        ;;
    esac
done
case $runs in '' | *[!0-9]*)
    echo "fuzz.sh: --runs takes a whole number, not '$runs'" >&2
    exit 2
    ;;
esac

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/fuzz}
out=${FUZZ_OUT:-${TMPDIR:-/tmp}/p2pvmm-fuzz}
timeout=${FUZZ_TIMEOUT:-10}
sanitizer=${FUZZ_SANITIZER:-none}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    nice -n 19 cargo install --locked cargo-fuzz
fi

all=$(cd "$fuzz_dir" && cargo fuzz list --fuzz-dir .)
if [ ${#targets[@]} -eq 0 ]; then
    read -r -a targets <<<"$(echo $all)"
fi
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$all"; then
        echo "fuzz.sh: no target '$t' (targets: $(echo $all))" >&2
        exit 2
    fi
done

# One build for all of them: debug assertions and overflow checks on, optimized.
# (cargo fuzz build takes one target or none, which means all of them.)
if [ "${targets[*]}" = "$(echo $all)" ]; then
    (cd "$fuzz_dir" && nice -n 19 cargo fuzz build --fuzz-dir . --sanitizer "$sanitizer")
else
    for t in "${targets[@]}"; do
        (cd "$fuzz_dir" && nice -n 19 cargo fuzz build --fuzz-dir . --sanitizer "$sanitizer" "$t")
    done
fi

summary=()
failed=0
for t in "${targets[@]}"; do
    corpus=$out/corpus/$t
    artifacts=$out/artifacts/$t
    log=$out/logs/$t.log
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")" "$fuzz_dir/corpus/$t"
    before=$(find "$artifacts" -type f | wc -l)
    start=$(date +%s.%N)
    set +e
    (cd "$fuzz_dir" && nice -n 19 cargo fuzz run --fuzz-dir . --sanitizer "$sanitizer" "$t" "$corpus" "corpus/$t" -- \
        -runs="$runs" -timeout="$timeout" -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/") >"$log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    execs=${execs:-$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)}
    crashes=$(($(find "$artifacts" -type f | wc -l) - before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1 # it died without leaving an input (a build or harness problem): see the log
    fi
    line=$(printf '%-12s execs %10s  time %8ss  crashes %d' "$t" "${execs:-?}" "$secs" "$crashes")
    echo "$line"
    if [ "$crashes" -ne 0 ]; then
        failed=1
        grep -m 5 -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | sed 's/^/    /' || true
        echo "    log: $log" >&2
    fi
    summary+=("$line")
done

echo
echo "runs per target: $runs"
printf '%s\n' "${summary[@]}"
exit $failed
