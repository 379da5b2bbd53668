#!/usr/bin/env bash
# A restarted `cdp protect`: the full sync of a new source process, seeded
# from the target's copy (compare SHA-256 digests per 64 KiB chunk, copy only
# the chunks that differ) against the first protection's plain copy of the
# whole disk, on one disk of random data with 1 MiB changed in between, page
# caches dropped before each protect run. Each figure is the time from
# starting protect until the target holds the whole disk (protect is stopped
# once its sync completes, and exits once every batch is acknowledged).
# Beside them, `openssl dgst -sha256` of the disk (SHA extensions where the
# CPU has them): one read and digest of every byte, which a comparison does
# on each side.
#
# Usage: benches/resync.sh
#   ROUNDS=3  DISK_SIZE=1G  OUT=target/bench/resync.md
#   THROTTLE=100MiB/s     protect's --throttle (a WAN link); unset: none
# Prints a markdown table (also written to $OUT): medians across rounds.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THROTTLE=${THROTTLE:-}
DISK_SIZE=${DISK_SIZE:-1G}
OUT=${OUT:-target/bench/resync.md}

# shellcheck source=benches/daemon_setup.sh
. benches/daemon_setup.sh
daemon_setup resync /tmp

# wait_line LOG TEXT [PID]: waits up to 300 s for TEXT in LOG; gives up at
# once, showing the log's end, if process PID has exited.
wait_line() {
  for _ in $(seq 3000); do
    grep -q "$2" "$1" 2>/dev/null && return
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
      echo "process $3 exited before '$2' appeared in $1:" >&2; tail -n 5 "$1" >&2; exit 1
    fi
    sleep 0.1
  done
  echo "no '$2' in $1" >&2; exit 1
}
field() { sed -n "s/.*full sync complete.* $1=\([0-9]*\).*/\1/p" "$2" | tail -1; }

# protect_once LOG: with cold caches, runs protect until its full sync
# completes, stops it and waits until it has delivered everything; prints
# the seconds that took.
protect_once() {
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  local t0; t0=$(date +%s%N)
  "$cdp" protect --disk "$dir/disk.img" --listen 127.0.0.1:0 --target "$addr" \
    --key "$dir/key" --rpo 1s ${THROTTLE:+--throttle "$THROTTLE"} >/dev/null 2>"$1" &
  local pid=$!; pids+=("$pid")
  wait_line "$1" "full sync complete" "$pid"
  kill -TERM "$pid"; wait "$pid"
  python3 -c "print(($(date +%s%N) - $t0) / 1e9)"
}

rows=()
for round in $(seq "$ROUNDS"); do
  echo "[resync-bench] round $round" >&2
  dir=$work/r$round
  mkdir -p "$dir"
  head -c "$DISK_SIZE" /dev/urandom >"$dir/disk.img"
  "$cdp" keygen "$dir/key" >/dev/null
  "$cdp" target --listen 127.0.0.1:0 --dir "$dir/target" --key "$dir/key" >"$dir/target.out" 2>"$dir/target.log" &
  target_pid=$!; pids+=("$target_pid")
  wait_line "$dir/target.out" listening
  addr=$(sed -n 's/^listening on //p' "$dir/target.out")
  first=$(protect_once "$dir/first.log")
  before=$(du -sb "$dir/target" | cut -f1)
  dd if=/dev/urandom of="$dir/disk.img" bs=1M count=1 conv=notrunc status=none \
    seek=$(($(stat -c %s "$dir/disk.img") / 2 / 1048576))
  seeded=$(protect_once "$dir/second.log")
  after=$(du -sb "$dir/target" | cut -f1)
  t0=$(date +%s%N); openssl dgst -sha256 "$dir/disk.img" >/dev/null; t1=$(date +%s%N)
  rows+=("$first $seeded $(field differing "$dir/second.log") $((after - before)) $(python3 -c "print(($t1 - $t0) / 1e9)")")
  kill -TERM "$target_pid"; wait "$target_pid" || true
  rm -rf "$dir"
done

printf '%s\n' "${rows[@]}" | python3 -c "
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.stdin if line.strip()]
med = [statistics.median(col) for col in zip(*rows)]
first, seeded, differing, grown, sha = med
print('# Resync benchmark: a restarted protect')
print()
print('- date (UTC): $(date -u '+%F %T'); kernel $(uname -r); nproc $(nproc); disk ${DISK_SIZE} of random data, 1 MiB changed between runs; throttle ${THROTTLE:-none}; ${ROUNDS} rounds, medians')
print()
print('| what | seconds | notes |')
print('|---|---:|---|')
print(f'| first protection: copy the whole disk | {first:.2f} | |')
print(f'| restart: compare with the target copy | {seeded:.2f} | {differing:.0f} chunks differed; the journal grew {grown / 2**20:.1f} MiB |')
print(f'| openssl dgst -sha256 of the disk (one side, warm) | {sha:.2f} | |')
print()
print(f'Seeded resync / full copy: {seeded / first:.2f}x the time.')
" | tee "$OUT"
