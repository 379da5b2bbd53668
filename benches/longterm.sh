#!/usr/bin/env bash
# The long-term tier on one machine, side by side with the machine's own
# sequential write speed:
#
# 1. `dd if=/dev/zero bs=1M oflag=direct` of DISK_SIZE: this machine's
#    sequential write speed (the restore goal is at least 0.8 of it).
# 2. A DISK_SIZE disk of random data protected into a target (full sync);
#    `cdp restore` of its newest point from the journal alone; then the
#    target rolls it into a base image (the roll's MB/s, no ingest) and
#    `cdp restore` of that long-term point.
# 3. Rolls while ingest runs: fio writes 64 KiB random blocks at RATE MB/s
#    through `cdp protect --rpo 1s` for RUNTIME seconds, with the target
#    rolling every ROLL_EVERY, and again with no roll in the same run; the
#    rolls' MB/s (journal bytes read per second) from the target's log, and
#    the RPO held (age of the newest durable point, sampled every 100 ms).
# Medians of ROUNDS runs where repeated. Prints a markdown table (also
# written to $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."

DISK_SIZE_MIB=${DISK_SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-30}
RATE=${RATE:-50}
ROLL_EVERY=${ROLL_EVERY:-5s}
OUT=${OUT:-target/bench/longterm.md}

# shellcheck source=benches/daemon_setup.sh
. benches/daemon_setup.sh
daemon_setup longterm /var/tmp
mkdir -p "$(dirname "$OUT")"

wait_listening() { for _ in $(seq 400); do grep -q listening "$1" 2>/dev/null && return; sleep 0.05; done; echo "no listening line in $1" >&2; exit 1; }
addr_of() { sed -n 's/^listening on //p' "$1"; }
median() { python3 -c "import statistics,sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.1f}')" "$@"; }
mbps() { python3 -c "print(f'{$1 / 1048576 / ($2 / 1e9):.1f}')"; }

# target DIR NAME ARGS...: starts cdp target; sets target_pid
target() {
  local dir=$1 name=$2; shift 2
  "$cdp" target --listen 127.0.0.1:0 --dir "$dir/target" --key "$dir/key" "$@" \
    >"$dir/$name.out" 2>>"$dir/target.log" &
  target_pid=$!; pids+=("$target_pid")
  wait_listening "$dir/$name.out"
}

# protect DIR: starts cdp protect on DIR/disk.img toward the running target,
# waits for the full sync; sets protect_pid and uri
protect() {
  local dir=$1
  "$cdp" protect --disk "$dir/disk.img" --listen 127.0.0.1:0 --target "$(addr_of "$dir/target.out")" \
    --key "$dir/key" --rpo 1s >"$dir/protect.out" 2>"$dir/protect.log" &
  protect_pid=$!; pids+=("$protect_pid")
  wait_listening "$dir/protect.out"
  uri="nbd://$(addr_of "$dir/protect.out")/"
  for _ in $(seq 1200); do grep -q "full sync complete" "$dir/protect.log" && return; sleep 0.1; done
  echo "no full sync in $dir/protect.log" >&2; exit 1
}

stop() { kill -TERM "$1"; wait "$1" || true; }

echo "[longterm-bench] dd oflag=direct" >&2
dd_runs=()
for _ in $(seq "$ROUNDS"); do
  t0=$(date +%s%N)
  dd if=/dev/zero of="$work/dd.img" bs=1M count="$DISK_SIZE_MIB" oflag=direct status=none
  t1=$(date +%s%N)
  dd_runs+=("$(mbps $((DISK_SIZE_MIB << 20)) $((t1 - t0)))")
  rm -f "$work/dd.img"
done
dd_mbps=$(median "${dd_runs[@]}")

echo "[longterm-bench] full sync of random data, restores" >&2
dir=$work/restore
mkdir -p "$dir"
"$cdp" keygen "$dir/key" >/dev/null
head -c $((DISK_SIZE_MIB << 20)) /dev/urandom >"$dir/disk.img"
target "$dir" target --long-term-every 1h
protect "$dir"
stop "$protect_pid"
stop "$target_pid"
restore_runs() { # AT: median MB/s of ROUNDS restores of point AT
  local runs=()
  for _ in $(seq "$ROUNDS"); do
    rm -f "$dir/out.img"; sync
    t0=$(date +%s%N)
    "$cdp" restore --dir "$dir/target" --at "$1" --key "$dir/key" --out "$dir/out.img" >/dev/null
    t1=$(date +%s%N)
    cmp -s "$dir/out.img" "$dir/disk.img" || { echo "restore of $1 differs from the disk" >&2; exit 1; }
    runs+=("$(mbps $((DISK_SIZE_MIB << 20)) $((t1 - t0)))")
  done
  rm -f "$dir/out.img"
  median "${runs[@]}"
}
newest=$("$cdp" points --dir "$dir/target" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"][-1]["id"])')
journal_restore=$(restore_runs "$newest")
target "$dir" roll --long-term-every 1s
for _ in $(seq 1200); do grep -q "long-term point made" "$dir/target.log" && break; sleep 0.1; done
stop "$target_pid"
first_roll=$(grep -m1 "long-term point made" "$dir/target.log")
roll_alone=$(python3 -c "
import re,sys
line=sys.argv[1]
b=int(re.search(r'journal_bytes=(\d+)',line).group(1)); s=float(re.search(r'seconds=([\d.]+)',line).group(1))
print(f'{b/1048576/s:.1f}')" "$first_roll")
longterm_restore=$(restore_runs "$newest")
rm -rf "$dir"

# ingest NAME ROLL_ARGS...: fio at RATE through protect while the target
# runs with ROLL_ARGS; prints "p50 p99 rolls roll_mbps"
ingest() {
  local name=$1; shift
  local dir=$work/$name
  mkdir -p "$dir"
  "$cdp" keygen "$dir/key" >/dev/null
  truncate -s "${DISK_SIZE_MIB}M" "$dir/disk.img"
  target "$dir" target "$@"
  protect "$dir"
  local samples=$dir/ages
  benches/sample_rpo.sh "$cdp" "$dir/target" "$protect_pid" "$samples" &
  local sampler=$!
  fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=16 --size="${DISK_SIZE_MIB}M" \
    --time_based --runtime="$RUNTIME" --refill_buffers --buffer_compress_percentage=50 \
    --rate="${RATE}m" >/dev/null 2>&1
  stop "$protect_pid"
  wait "$sampler" || true
  stop "$target_pid"
  python3 - "$samples" "$dir/target.log" <<'EOF'
import re, statistics, sys
ages = sorted(float(x) for x in open(sys.argv[1]) if x.strip())
q = statistics.quantiles(ages, n=100)
rolls = [(int(re.search(r'journal_bytes=(\d+)', l).group(1)), float(re.search(r'seconds=([\d.]+)', l).group(1)))
         for l in open(sys.argv[2]) if 'long-term point made' in l]
# The first roll makes the base from the full sync; the rest roll what ingest wrote.
later = rolls[1:]
mbps = statistics.median(b / 1048576 / s for b, s in later) if later else 0.0
print(f"{q[49]:.2f} {q[98]:.2f} {len(later)} {mbps:.1f}")
EOF
  rm -rf "$dir"
}

echo "[longterm-bench] ingest at ${RATE} MB/s, rolling every ${ROLL_EVERY}" >&2
read -r roll_p50 roll_p99 rolls roll_mbps < <(ingest rolling --long-term-every "$ROLL_EVERY")
echo "[longterm-bench] ingest at ${RATE} MB/s, no rolls" >&2
read -r none_p50 none_p99 _ _ < <(ingest quiet --long-term-every 24h)

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
{
  echo "# Long-term tier benchmark"
  echo
  echo "- date (UTC): $(date -u '+%F %T'); kernel $(uname -r); nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "- disk ${DISK_SIZE_MIB} MiB of random data; medians of ${ROUNDS} runs; files in $(df --output=source,fstype /var/tmp | tail -1 | xargs)"
  echo
  echo "| measurement | cdp | peer (same run) | ratio |"
  echo "|---|---:|---:|---:|"
  echo "| restore from the journal alone | ${journal_restore} MB/s | dd oflag=direct ${dd_mbps} MB/s | $(ratio "$journal_restore" "$dd_mbps") |"
  echo "| restore from a long-term point (base image) | ${longterm_restore} MB/s | dd oflag=direct ${dd_mbps} MB/s | $(ratio "$longterm_restore" "$dd_mbps") |"
  echo "| roll of the full sync into the base, no ingest | ${roll_alone} MB/s of journal | | |"
  echo "| rolls every ${ROLL_EVERY} while ingesting ${RATE} MB/s | ${roll_mbps} MB/s of journal (median of ${rolls} rolls) | | |"
  echo "| RPO p50 / p99 while rolling | ${roll_p50} s / ${roll_p99} s | no rolls: ${none_p50} s / ${none_p99} s | |"
} | tee "$OUT"
