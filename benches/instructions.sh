#!/usr/bin/env bash
# Noise-free cross-check of the timing ratios: instructions per operation, counted by
# valgrind's callgrind (deterministic: the same binary gives the same counts on any load).
#
# Each single-threaded case of benches/teredo.rs runs twice under callgrind, with N1 and N2
# operations (TEREDO_BENCH_INSTRUCTIONS=<case>, TEREDO_BENCH_ITERATIONS=<n>); the difference
# of the two totals over N2 - N1 is the cost of one operation, setup and process start
# cancelled out. Instructions are not time (a locked CAS is one instruction and ~20 cycles),
# so these ratios check the work done, not the goals themselves.
#
# Usage: benches/instructions.sh            (needs valgrind; ~1 minute)
set -euo pipefail
cd "$(dirname "$0")/.."

exe=$(cargo bench --features mock --bench teredo --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*teredo-[0-9a-f]*\))$/\1/p' | tail -n 1)
if [[ -z "$exe" ]]; then
    echo "instructions.sh: could not find the teredo bench executable" >&2
    exit 1
fi

N1=1000
N2=3000

total() { # case iterations -> instructions of the whole process
    TEREDO_BENCH_INSTRUCTIONS="$1" TEREDO_BENCH_ITERATIONS="$2" \
        valgrind --tool=callgrind --callgrind-out-file=/dev/null "$exe" 2>&1 \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

declare -A per_op
cases=(
    current_port/atomic_load current_port/watcher current_port/spin_lock_read
    current_port/atomic_load_static current_port/static_watcher
    fanout/watcher/1 fanout/spin_lock_boxed_closures/1
    fanout/watcher/8 fanout/spin_lock_boxed_closures/8
    fanout/watcher/64 fanout/spin_lock_boxed_closures/64
    subscribe_unsubscribe/watcher/10 subscribe_unsubscribe/watcher/1000
)
for case in "${cases[@]}"; do
    a=$(total "$case" "$N1")
    b=$(total "$case" "$N2")
    per_op[$case]=$(awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.2f", (b - a) / (n2 - n1) }')
    echo "instructions $case ${per_op[$case]}"
done

ratio() { # name ours base goal
    awk -v name="$1" -v a="${per_op[$2]}" -v b="${per_op[$3]}" -v goal="$4" \
        'BEGIN { printf "ratio %s %.3f goal %s (instructions: %s / %s)\n", name, a / b, goal, a, b }'
}
echo
echo "== teredo-watcher: ratios of instruction counts (callgrind) =="
ratio current_port/atomic_load current_port/watcher current_port/atomic_load "<=1.2"
ratio current_port/spin_lock_read current_port/watcher current_port/spin_lock_read none
ratio current_port_static/atomic_load_static current_port/static_watcher current_port/atomic_load_static "<=1.05"
for n in 1 8 64; do
    ratio "fanout_$n/spin_lock_boxed_closures" "fanout/watcher/$n" "fanout/spin_lock_boxed_closures/$n" "<=1.5"
done
# The marginal cost of one more subscriber, (cost(64) - cost(8)) / 56, ours against the
# baseline's: the goal PERFORMANCE.md states for fan-out.
marginal() { # name
    awk -v w64="${per_op[fanout/watcher/64]}" -v w8="${per_op[fanout/watcher/8]}" \
        -v b64="${per_op[fanout/spin_lock_boxed_closures/64]}" -v b8="${per_op[fanout/spin_lock_boxed_closures/8]}" \
        'BEGIN { o = (w64 - w8) / 56; b = (b64 - b8) / 56;
                 printf "ratio fanout_marginal_per_subscriber %.3f goal <=1.2 (instructions: %.2f / %.2f)\n", o / b, o, b }'
}
marginal
ratio subscribe_unsubscribe_1000/subscribe_unsubscribe_10 subscribe_unsubscribe/watcher/1000 subscribe_unsubscribe/watcher/10 "<=2"
