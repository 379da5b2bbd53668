#!/usr/bin/env bash
# Instant recovery: `cdp serve-point` against a short and a long history of a
# 1 GiB disk.
#
# 1. Histories: a 1 GiB disk of random data protected (`cdp protect --rpo
#    200ms`) into `cdp target --long-term-every 1s` (default retention, so
#    the journal keeps everything). Short: the full sync and three qemu-io
#    rounds. Long: the same, then LONG_SECONDS of fio random writes (4-64 KiB,
#    at WRITE_RATE) — a long-term point per second and hundreds of journal
#    points. A third case is the long history after retention removed the
#    journal segments under its long-term points (`--short-term-retention 0s`).
# 2. Time to first byte: from starting `cdp serve-point --at NEWEST` to the
#    first 4 KiB read at offset 0 completing (a libnbd client connecting to
#    its Unix socket, retrying every 0.5 ms); median of TTFB_RUNS runs, with
#    serve-point's own figures for opening the history and the point.
#    COLD=1 adds one run per case after dropping the page cache.
# 3. fio --ioengine=nbd random reads (4 KiB and 64 KiB, iodepth 16, RUNTIME
#    s) against serve-point on the long history's newest point, and against
#    nbdkit's file plugin serving the same point rebuilt by `cdp restore`,
#    alternately for ROUNDS rounds (benches/fio_summary.py: medians, ratio).
#
# Everything runs under a temp dir that is removed at the end; every process
# started is stopped by its PID. Prints a markdown report (also to $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
# shellcheck source=benches/fio_manifest.sh
. benches/fio_manifest.sh

RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
TTFB_RUNS=${TTFB_RUNS:-5}
LONG_SECONDS=${LONG_SECONDS:-120}
WRITE_RATE=${WRITE_RATE:-4m}
COLD=${COLD:-0}
OUT=${OUT:-target/bench/serve_point.md}

log() { printf '[serve-point-bench] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

scripts/install-deps.sh
for tool in fio nbdkit qemu-io nbdinfo python3; do
  command -v "$tool" >/dev/null || die "'$tool' not found after scripts/install-deps.sh"
done
if [ -z "${CDP:-}" ]; then
  log "building cdp (cargo build --release)"
  cargo build --release --bin cdp >&2
  CDP=$REPO/target/release/cdp
fi
PYTHON=python3
python3 -c 'import nbd' 2>/dev/null || PYTHON=/usr/bin/python3

work=$(mktemp -d /tmp/cdp-serve-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_line() { # FILE PATTERN
  for _ in $(seq 1200); do grep -q "$2" "$1" 2>/dev/null && return; sleep 0.1; done
  die "no '$2' in $1 after 120 s"
}
stop() { # PID: SIGTERM, wait
  kill -TERM "$1"
  wait "$1" || die "process $1 exited with status $? after SIGTERM"
}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

"$CDP" keygen "$work/key" >/dev/null
log "making a 1 GiB disk of random data"
head -c 1G /dev/urandom >"$work/random.img"

# history NAME SECONDS_OF_FIO: fills $work/NAME/target; both daemons stopped.
history() {
  local name=$1 seconds=$2 dir=$work/$1 target_pid protect_pid uri
  mkdir -p "$dir"
  cp "$work/random.img" "$dir/disk.img"
  "$CDP" target --listen 127.0.0.1:0 --dir "$dir/target" --key "$work/key" \
    --long-term-every 1s >"$dir/target.out" 2>"$dir/target.log" &
  target_pid=$!
  pids+=("$target_pid")
  wait_line "$dir/target.out" "listening on"
  "$CDP" protect --disk "$dir/disk.img" --listen 127.0.0.1:0 --key "$work/key" --rpo 200ms \
    --target "$(sed -n 's/^listening on //p' "$dir/target.out")" >"$dir/protect.out" 2>"$dir/protect.log" &
  protect_pid=$!
  pids+=("$protect_pid")
  wait_line "$dir/protect.out" "listening on"
  uri="nbd://$(sed -n 's/^listening on //p' "$dir/protect.out")/"
  log "$name: full sync of 1 GiB"
  wait_line "$dir/protect.log" "full sync complete"
  for round in "write -P 0x11 3M 12k" "write -P 0x22 20M 1M" "write -z 40M 4M"; do
    qemu-io -f raw "$uri" -c "$round" -c flush >/dev/null
    sleep 1.2
  done
  if [ "$seconds" -gt 0 ]; then
    log "$name: ${seconds}s of random writes at $WRITE_RATE"
    fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bsrange=4k-64k --iodepth=4 \
      --size=1G --rate="$WRITE_RATE" --time_based --runtime="$seconds" >"$dir/fio.log" 2>&1 ||
      die "fio writing the $name history failed: $(tail -n 5 "$dir/fio.log")"
  fi
  stop "$protect_pid"
  sleep 1.5 # the target rolls what it holds
  stop "$target_pid"
}

# summary DIR: points, long-term points, bytes of each tier and the newest
# point, as table cells.
read -r -d '' SUMMARY_PY <<'EOF' || true
import json, sys
s = json.load(sys.stdin)
p = s["points"]
long_term = sum(1 for x in p if x["tier"] != "journal")
journal = s["journal_bytes"] / 2**20
tier = s["long_term_bytes"] / 2**20
print(f"{len(p)} | {long_term} | {journal:.0f} MiB | {tier:.0f} MiB | {p[-1]['id']} ({p[-1]['tier']})")
EOF
summary() { "$CDP" points --dir "$1" --json | python3 -c "$SUMMARY_PY"; }
newest() { "$CDP" points --dir "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"][-1]["id"])'; }

# One TTFB run; argv CDP TARGET KEY AT SOCKET LOG; prints "ttfb_ms total_ms
# history_ms image_ms layers" (the last four from serve-point's log).
read -r -d '' TTFB_PY <<'EOF' || true
import re, subprocess, sys, time
import nbd
cdp, target, key, at, sock, logpath = sys.argv[1:7]
t0 = time.perf_counter()
with open(logpath, "w") as err:
    p = subprocess.Popen([cdp, "serve-point", "--dir", target, "--key", key, "--at", at,
                          "--socket", sock], stdout=subprocess.DEVNULL, stderr=err)
while True:
    h = nbd.NBD()
    try:
        h.connect_unix(sock)
        break
    except nbd.Error:
        if p.poll() is not None:
            sys.exit(f"serve-point exited with {p.returncode}; log {logpath}")
        time.sleep(0.0005)
h.pread(4096, 0)
t1 = time.perf_counter()
h.shutdown()
p.terminate()
p.wait()
text = open(logpath).read()
fields = [re.search(k + r'="?([0-9.]+)', text).group(1)
          for k in ("total_ms", "history_ms", "image_ms", "layers")]
print(f"{(t1 - t0) * 1e3:.1f}", *fields)
EOF

# Medians of TTFB runs (stdin) as a table row; argv LABEL COLD.
read -r -d '' TTFB_ROW_PY <<'EOF' || true
import statistics, sys
label, cold = sys.argv[1:3]
rows = [l.split() for l in sys.stdin if l.strip()]
med = lambda i: statistics.median(float(r[i]) for r in rows)
ttfb = sorted(float(r[0]) for r in rows)
print(f"| {label} | {med(0):.1f} ms | {ttfb[0]:.1f}–{ttfb[-1]:.1f} | {cold} | {med(2):.1f} ms | {med(3):.1f} ms | {rows[0][4]} |")
EOF

ttfb_case() { # LABEL DIR → a table row
  local label=$1 target=$2/target at runs=() cold="—"
  at=$(newest "$target")
  for i in $(seq "$TTFB_RUNS"); do
    runs+=("$($PYTHON -c "$TTFB_PY" "$CDP" "$target" "$work/key" "$at" "$work/ttfb.sock" "$work/ttfb-$i.log")")
  done
  if [ "$COLD" = 1 ]; then
    sync
    echo 3 >/proc/sys/vm/drop_caches
    cold="$($PYTHON -c "$TTFB_PY" "$CDP" "$target" "$work/key" "$at" "$work/ttfb.sock" "$work/ttfb-cold.log" | cut -d' ' -f1) ms"
  fi
  printf '%s\n' "${runs[@]}" | python3 -c "$TTFB_ROW_PY" "$label" "$cold"
}

history short 0
history long "$LONG_SECONDS"
short_summary=$(summary "$work/short/target")
long_summary=$(summary "$work/long/target")

log "time to first byte"
ttfb_rows=()
ttfb_rows+=("$(ttfb_case short "$work/short")")
ttfb_rows+=("$(ttfb_case long "$work/long")")

log "rebuilding the long history's newest point with cdp restore"
at=$(newest "$work/long/target")
t0=$(date +%s%N)
"$CDP" restore --dir "$work/long/target" --at "$at" --key "$work/key" --out "$work/restored.img" >/dev/null
restore_ms=$((($(date +%s%N) - t0) / 1000000))

log "random reads: serve-point vs nbdkit on the restored image"
ours_port=$(free_port)
"$CDP" serve-point --dir "$work/long/target" --key "$work/key" --at "$at" \
  --listen "127.0.0.1:$ours_port" >"$work/ours.out" 2>"$work/ours.log" &
ours_pid=$!
pids+=("$ours_pid")
wait_line "$work/ours.out" "listening on"
nbdkit_port=$(free_port)
nbdkit --foreground --port "$nbdkit_port" --ipaddr 127.0.0.1 --readonly file file="$work/restored.img" \
  >"$work/nbdkit.log" 2>&1 &
nbdkit_pid=$!
pids+=("$nbdkit_pid")
for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$nbdkit_port" >/dev/null 2>&1 && break; sleep 0.1; done
declare -A PORT=([ours]=$ours_port [nbdkit]=$nbdkit_port)
declare -A SPID=([ours]=$ours_pid [nbdkit]=$nbdkit_pid)
manifest=$work/manifest.tsv
: >"$manifest"
for round in $(seq "$ROUNDS"); do
  for bs in 4k 64k; do
    for server in ours nbdkit; do
      json=$work/r$round-$bs-$server.json
      before=$(cpu_ticks "${SPID[$server]}")
      machine_before=$(machine_ticks)
      fio --name="randread-$bs-qd16" --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$server]}/" --readonly \
        --rw=randread --bs="$bs" --iodepth=16 --size=1G --time_based --runtime="$RUNTIME" --ramp_time=2 \
        --group_reporting --output-format=json --output="$json" >/dev/null 2>&1 ||
        die "fio randread $bs against $server failed"
      after=$(cpu_ticks "${SPID[$server]}")
      machine_after=$(machine_ticks)
      manifest_line "$round" "randread-$bs-qd16" "$server" read iops "$json" "$before" "$after" \
        "$machine_before" "$machine_after" >>"$manifest"
      log "round $round randread $bs $server done"
    done
  done
done
stop "$ours_pid"
stop "$nbdkit_pid"

log "the long history after retention removed its rolled journal segments"
"$CDP" target --listen 127.0.0.1:0 --dir "$work/long/target" --key "$work/key" \
  --long-term-every 1h --short-term-retention 0s >"$work/retention.out" 2>"$work/retention.log" &
retention_pid=$!
pids+=("$retention_pid")
wait_line "$work/retention.out" "listening on"
sleep 3
stop "$retention_pid"
trimmed_summary=$(summary "$work/long/target")
ttfb_rows+=("$(ttfb_case "long, journal trimmed" "$work/long")")

{
  echo "# serve-point benchmark"
  echo
  echo "- date (UTC): $(date -u '+%F %T'); kernel $(uname -r); nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "- cdp $(git -C "$REPO" describe --always --dirty); $(fio --version); nbdkit $(nbdkit --version | awk '{print $2}')"
  echo "- 1 GiB disk of random data, \`cdp protect --rpo 200ms\` into \`cdp target --long-term-every 1s\`; long history: ${LONG_SECONDS}s of fio random 4-64 KiB writes at ${WRITE_RATE}B/s"
  echo
  echo "| history | points | long-term points | journal | long-term tier | served point |"
  echo "|---|---:|---:|---:|---:|---|"
  echo "| short | $short_summary |"
  echo "| long | $long_summary |"
  echo "| long, journal trimmed | $trimmed_summary |"
  echo
  echo "Time to first byte (start of \`cdp serve-point\` to the first 4 KiB read done; median of $TTFB_RUNS warm runs; serve-point's own log for opening the history, which reads the journal's entry headers, and for the point's layers):"
  echo
  echo "| history | TTFB | range | cold cache | open history | open point | layers |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ttfb_rows[@]}"
  echo
  echo "For comparison, \`cdp restore\` of the long history's newest point (1 GiB): ${restore_ms} ms."
  echo
  echo "Random reads of the long history's newest point: serve-point (ours) vs nbdkit's file plugin on the image \`cdp restore\` rebuilt, fio --ioengine=nbd iodepth 16, ${RUNTIME}s + 2s ramp, $ROUNDS rounds alternating:"
  echo
  python3 benches/fio_summary.py "$manifest"
} >"$work/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$work/report.md" "$OUT"
cat "$work/report.md"
