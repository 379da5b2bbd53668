#!/usr/bin/env bash
# End-to-end replication on one machine: `cdp protect` (capture, batch per
# RPO, zstd, AES-256-GCM, TCP) into `cdp target` (journal, fdatasync, ack),
# with fio writing through the protected disk's NBD export.
#
# 1. Sustained: fio random 64 KiB writes, unthrottled, for RUNTIME seconds;
#    replicated MB/s = bytes fio wrote / time until the target acknowledged
#    the last batch (protect's SIGTERM drain included).
# 2. RPO held at 10, 50 and 100 MB/s of 64 KiB random writes (--rpo 1s):
#    every 100 ms the newest durable point's age (now - its cut time) is
#    sampled from `cdp points --json`; p50/p99 of the ages are reported.
# Prints a markdown table (also written to $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-20}
RATES=${RATES:-10 50 100}
OUT=${OUT:-target/bench/replication.md}
DISK_SIZE=${DISK_SIZE:-2G}

# shellcheck source=benches/daemon_setup.sh
. benches/daemon_setup.sh
daemon_setup repl /tmp

wait_listening() { for _ in $(seq 400); do grep -q listening "$1" 2>/dev/null && return; sleep 0.05; done; echo "no listening line in $1" >&2; exit 1; }
now_ns() { date +%s%N; }

# start NAME: fresh disk, key, target and protect; sets target_pid protect_pid uri dir
start() {
  local name=$1
  dir=$work/$name
  mkdir -p "$dir"
  truncate -s "$DISK_SIZE" "$dir/disk.img"
  "$cdp" keygen "$dir/key" >/dev/null
  "$cdp" target --listen 127.0.0.1:0 --dir "$dir/target" --key "$dir/key" >"$dir/target.out" 2>"$dir/target.log" &
  target_pid=$!; pids+=("$target_pid")
  wait_listening "$dir/target.out"
  "$cdp" protect --disk "$dir/disk.img" --listen 127.0.0.1:0 --target "$(sed -n 's/^listening on //p' "$dir/target.out")" \
    --key "$dir/key" --rpo 1s >"$dir/protect.out" 2>"$dir/protect.log" &
  protect_pid=$!; pids+=("$protect_pid")
  wait_listening "$dir/protect.out"
  uri="nbd://$(sed -n 's/^listening on //p' "$dir/protect.out")/"
  for _ in $(seq 600); do grep -q "full sync complete" "$dir/protect.log" && break; sleep 0.1; done
}

fio_write() { # RATE_ARG...
  fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=16 --size="$DISK_SIZE" \
    --time_based --runtime="$RUNTIME" --refill_buffers --buffer_compress_percentage=50 \
    --output-format=json "$@" 2>/dev/null | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(j["io_bytes"])'
}

echo "[replication-bench] sustained run" >&2
start sustained
t0=$(now_ns)
bytes=$(fio_write)
kill -TERM "$protect_pid"; wait "$protect_pid"
t1=$(now_ns)
sustained=$(python3 -c "print(f'{$bytes / (($t1 - $t0) / 1e9) / 1e6:.1f}')")
kill -TERM "$target_pid"; wait "$target_pid" || true

rows=()
for rate in $RATES; do
  echo "[replication-bench] RPO at ${rate} MB/s" >&2
  start "rate$rate"
  samples=$dir/ages
  benches/sample_rpo.sh "$cdp" "$dir/target" "$protect_pid" "$samples" &
  sampler=$!
  fio_write --rate="${rate}m" >/dev/null
  kill -TERM "$protect_pid"; wait "$protect_pid"
  wait "$sampler" || true
  kill -TERM "$target_pid"; wait "$target_pid" || true
  rows+=("$(python3 -c "
import statistics
a=sorted(float(x) for x in open('$samples') if x.strip())
q=statistics.quantiles(a, n=100) if len(a) > 2 else [a[0]]*99
print(f'| {$rate} MB/s | {len(a)} | {q[49]:.2f} s | {q[98]:.2f} s |')")")
done

{
  echo "# Replication benchmark"
  echo
  echo "- date (UTC): $(date -u '+%F %T'); kernel $(uname -r); nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "- fio 64 KiB random writes, iodepth 16, 50% compressible buffers, through \`cdp protect --rpo 1s\` into \`cdp target\` on 127.0.0.1; RUNTIME=${RUNTIME}s, disk ${DISK_SIZE}"
  echo
  echo "Sustained replication (unthrottled writes, until the last batch is acknowledged): **${sustained} MB/s**"
  echo
  echo "| write rate | samples | RPO p50 (age of newest durable point) | RPO p99 |"
  echo "|---|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT"
