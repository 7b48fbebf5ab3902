#!/usr/bin/env bash
# Per-tunnel counters of each process in the steady state of a long setup workload:
# CPU µs (perf's task-clock), user and system time, system calls, context switches and,
# with --malloc, libc malloc calls. Complements the load harness, whose setup figure is
# whole-run CPU over 2,000 tunnels (start-up and pool growth included) and resolves about
# ±10 % on a 2-vCPU machine; counters such as system calls and mallocs per tunnel do not
# depend on the machine's mood.
#
#   scripts/setup-counters.sh [--malloc] [--secs S] [--workers N] NAME=BINARY [NAME=BINARY ...]
#   scripts/setup-counters.sh --rathole            # the peer, from target-bench/peers.json
#
# --workers N gives each hyrelay process N data-plane workers (the harness's --workers) and
# sets TOKIO_WORKER_THREADS=N for the peers' tokio runtimes, to compare without the six
# workers of three processes taking turns on two vCPUs.
#
# Needs perf (linux-perf) and the bench harness built (`cargo bench --bench load --no-run`
# with CARGO_TARGET_DIR=target-bench). Tunnels are counted by the bridge's accept4() calls
# that returned a connection (one per app connection; not its close() calls, since its
# connections to the relay may be kept across tunnels, nor all its accept4() calls, half of
# which find nothing), or for rathole by the client's connect() calls / 2.
# --malloc adds a uprobe on libc's malloc (`perf probe`; needs root), which slows the
# processes: read its CPU figures as inflated, its malloc counts as exact.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-bench}
secs=4
malloc=
workers=()
targets=()
while (($#)); do
    case $1 in
        --malloc) malloc=1 ;;
        --secs) secs=$2; shift ;;
        --workers) workers=(--workers "$2"); export TOKIO_WORKER_THREADS=$2; shift ;;
        --rathole) targets+=(rathole) ;;
        *=*) targets+=("$1") ;;
        *) echo "usage: $0 [--malloc] [--secs S] [--workers N] NAME=BINARY ... | --rathole" >&2; exit 2 ;;
    esac
    shift
done
harness=$(ls -t "$CARGO_TARGET_DIR"/release/deps/load-* 2>/dev/null | grep -v '\.d$' | head -1)
[[ -x $harness ]] || { echo "build the harness first: cargo bench --bench load --no-run" >&2; exit 1; }
events=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_connect
if [[ -n $malloc ]]; then
    libc=$(ldconfig -p | awk '/libc.so.6 .*x86-64/ {print $NF; exit}')
    perf probe -q -x "$libc" malloc 2>/dev/null || true
    events+=,probe_libc:malloc
fi
work=$(mktemp -d)
harness_pid=
trap '[[ -n $harness_pid ]] && kill "$harness_pid" 2>/dev/null; rm -rf "$work"' EXIT

for t in "${targets[@]}"; do
    if [[ $t == rathole ]]; then
        name=rathole
        args=(--hyrelay "x=$(type -P true)" --targets-file "$CARGO_TARGET_DIR/peers.json" --only rathole)
        roles=(server client)
        pidof_role() { pgrep -f "rathole --$1" | head -1; }
    else
        name=${t%%=*} bin=$(realpath "${t#*=}")
        args=(--hyrelay "$name=$bin" --only "hyrelay[$name]")
        roles=(relay hcm bridge)
        pidof_role() { pgrep -f "^$bin .* $1( |$)" | head -1; }
    fi
    "$harness" --bench "${args[@]}" "${workers[@]}" --workloads setup --setup-count 100000 --runs 1 >"$work/harness.log" 2>&1 &
    harness_pid=$!
    sleep 6 # start-up, pools and warm connections filled
    for role in "${roles[@]}"; do
        pid=$(pidof_role "$role")
        [[ -n $pid ]] || { echo "$name: no $role process" >&2; kill "$harness_pid"; exit 1; }
        awk '{print $14, $15}' "/proc/$pid/stat" >"$work/$role.t0"
        perf stat -x, -e "$events" -e syscalls:sys_exit_accept4 --filter 'ret >= 0' -p "$pid" -- sleep "$secs" 2>"$work/$role.perf" &
        echo "$pid" >"$work/$role.pid"
    done
    wait $(jobs -p | grep -v "^$harness_pid$") 2>/dev/null || true
    for role in "${roles[@]}"; do
        awk '{print $14, $15}' "/proc/$(cat "$work/$role.pid")/stat" >"$work/$role.t1"
    done
    kill "$harness_pid" 2>/dev/null; wait "$harness_pid" 2>/dev/null || true
    harness_pid=
    python3 - "$name" "$work" "${roles[@]}" <<'PY'
import os, sys
name, work, roles = sys.argv[1], sys.argv[2], sys.argv[3:]
hz = os.sysconf("SC_CLK_TCK")
counts = {}
for r in roles:
    m = {}
    for line in open(f"{work}/{r}.perf"):
        p = line.strip().split(",")
        if len(p) > 3:
            try:
                m[p[2]] = float(p[0])
            except ValueError:
                pass
    counts[r] = m
if name == "rathole":
    tunnels = counts["client"].get("syscalls:sys_enter_connect", 0) / 2
else:
    tunnels = counts["bridge"].get("syscalls:sys_exit_accept4", 0)
if not tunnels:
    sys.exit(f"{name}: no tunnels counted")
print(f"{name}: {tunnels:.0f} tunnels in the window; per tunnel:")
total = [0.0] * 5
for r in roles:
    m = counts[r]
    u0, s0 = map(int, open(f"{work}/{r}.t0").read().split())
    u1, s1 = map(int, open(f"{work}/{r}.t1").read().split())
    row = [
        m.get("task-clock", 0) * 1000 / tunnels,  # msec -> µs
        (u1 - u0) * 1e6 / hz / tunnels,
        (s1 - s0) * 1e6 / hz / tunnels,
        m.get("raw_syscalls:sys_enter", 0) / tunnels,
        m.get("context-switches", 0) / tunnels,
    ]
    total = [a + b for a, b in zip(total, row)]
    extra = f"  malloc {m['probe_libc:malloc'] / tunnels:6.1f}" if "probe_libc:malloc" in m else ""
    print(f"  {r:7} CPU {row[0]:6.1f} µs (user {row[1]:5.1f}, sys {row[2]:5.1f})  syscalls {row[3]:5.1f}  "
          f"context switches {row[4]:4.2f}{extra}")
print(f"  {'all':7} CPU {total[0]:6.1f} µs (user {total[1]:5.1f}, sys {total[2]:5.1f})  syscalls {total[3]:5.1f}  "
      f"context switches {total[4]:4.2f}")
PY
done
