#!/usr/bin/env bash
# Benchmark `cdp filter` (our NBD server) against nbdkit's file plugin and
# qemu-nbd, side by side, with fio's nbd engine.
#
# Each server serves its own preallocated 1 GiB file filled with random data;
# the servers are restarted every round and the files passed round, so each
# server meets each file (ext4's cost per write differs from one freshly made
# file to another). In each round every workload runs against every server in
# turn, so machine noise hits all of them alike; the order rotates from round
# to round, and every run starts with `sync`, so no server pays for the
# writeback of the dirty pages its predecessor left. The table reports
# medians across rounds.
#
# Usage: benches/filter.sh
# Environment:
#   RUNTIME=10            fio runtime per run, seconds (plus a 2 s ramp)
#   ROUNDS=3              rounds over all workloads and servers (a multiple of
#                         the number of servers gives each one each file
#                         equally often)
#   SERVERS="ours nbdkit qemu-nbd"   subset/order of servers to run
#   ONLY=seqwrite-1m-qd8  run only the workloads whose names contain this
#   CDP=path              prebuilt cdp binary; unset: cargo build --release
#   OUT=target/bench/filter.md       where the markdown report is written
#   KEEP_DISKS=1          keep the 1 GiB disk files under target/bench/disks
#
# Output: the report (header + table) on stdout and in $OUT; progress on
# stderr; raw fio JSON under target/bench/raw/<UTC timestamp>/.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
# shellcheck source=benches/fio_manifest.sh
. benches/fio_manifest.sh

RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
SERVERS=${SERVERS:-ours nbdkit qemu-nbd}
OUT=${OUT:-target/bench/filter.md}
KEEP_DISKS=${KEEP_DISKS:-0}
RAMP=2
DISK_SIZE=1G
DISK_BYTES=1073741824
STARTUP_TIMEOUT=30 # seconds to wait for a server to accept connections
STOP_TIMEOUT=10    # seconds to wait after SIGTERM before SIGKILL

BENCH_DIR=target/bench
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW_DIR=$BENCH_DIR/raw/$STAMP
LOG_DIR=$RAW_DIR/logs
DISK_DIR=$BENCH_DIR/disks
MANIFEST=$RAW_DIR/manifest.tsv

# Workloads: name rw bs iodepth direction metric
WORKLOADS=(
  "randwrite-4k-qd32 randwrite 4k 32 write iops"
  "randread-64k-qd16 randread 64k 16 read iops"
  "seqwrite-1m-qd8 write 1M 8 write mbps"
)

log() { printf '[filter-bench] %s\n' "$*" >&2; }
die() {
  printf '[filter-bench] error: %s\n' "$*" >&2
  exit 1
}

[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (seconds), got '$RUNTIME'"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
if [ -n "${ONLY:-}" ]; then
  selected=()
  for w in "${WORKLOADS[@]}"; do
    [[ ${w%% *} == *"$ONLY"* ]] && selected+=("$w")
  done
  [ ${#selected[@]} -gt 0 ] || die "ONLY='$ONLY' matches no workload (${WORKLOADS[*]%% *})"
  WORKLOADS=("${selected[@]}")
fi
read -r -a SERVER_LIST <<<"$SERVERS"
[ ${#SERVER_LIST[@]} -gt 0 ] || die "SERVERS is empty"
for s in "${SERVER_LIST[@]}"; do
  case $s in
    ours | nbdkit | qemu-nbd) ;;
    *) die "unknown server '$s' in SERVERS (choose from: ours nbdkit qemu-nbd)" ;;
  esac
done
want_ours=0
[[ " ${SERVER_LIST[*]} " == *" ours "* ]] && want_ours=1

# --- cleanup: stop every server we started, by PID, on any exit ----------------
declare -A PID=()
DISKS=()
stop_servers() {
  local name pid rc waited
  for name in "${!PID[@]}"; do
    pid=${PID[$name]}
    kill -TERM "$pid" 2>/dev/null || continue
    waited=0
    while is_alive "$pid" && [ "$waited" -lt $((STOP_TIMEOUT * 10)) ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if is_alive "$pid"; then
      log "$name (pid $pid) still running ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    [ "$rc" -eq 0 ] || log "$name (pid $pid) exited with status $rc after SIGTERM (log: $LOG_DIR/$name.log)"
  done
  PID=()
}
cleanup() {
  stop_servers
  if [ "$KEEP_DISKS" != 1 ] && [ ${#DISKS[@]} -gt 0 ]; then
    rm -f "${DISKS[@]}"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A process is alive if /proc has it and it is not a zombie (kill -0 succeeds
# on unreaped zombies, so it cannot tell a crashed server from a live one).
is_alive() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  [ "${s:0:1}" != Z ]
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# --- dependencies and our binary ---------------------------------------------------
log "installing dependencies (scripts/install-deps.sh)"
scripts/install-deps.sh
for tool in fio nbdkit qemu-nbd nbdinfo python3 fallocate getconf; do
  command -v "$tool" >/dev/null || die "'$tool' not found after scripts/install-deps.sh"
done

if [ "$want_ours" = 1 ]; then
  if [ -z "${CDP:-}" ]; then
    log "building cdp (cargo build --release)"
    cargo build --release --bin cdp || die "cargo build --release failed; fix the build or set CDP=/path/to/cdp (or run SERVERS=\"nbdkit qemu-nbd\" to skip ours)"
    CDP=${CARGO_TARGET_DIR:-target}/release/cdp
  fi
  [ -f "$CDP" ] || die "cdp binary not found at '$CDP' (build it with cargo build --release, set CDP=/path/to/cdp, or run SERVERS=\"nbdkit qemu-nbd\")"
  [ -x "$CDP" ] || die "cdp binary at '$CDP' is not executable"
fi

mkdir -p "$RAW_DIR" "$LOG_DIR" "$DISK_DIR" "$(dirname "$OUT")"
: >"$MANIFEST"

# --- disks: one preallocated 1 GiB file of random data per server ------------------
for i in "${!SERVER_LIST[@]}"; do
  disk=$DISK_DIR/disk$i.img
  log "creating $disk ($DISK_SIZE, fallocate + /dev/urandom)"
  rm -f "$disk"
  DISKS+=("$disk")
  fallocate -l "$DISK_SIZE" "$disk"
  # conv=notrunc keeps the preallocated extents; fsync so the data is on disk
  # (it stays in the page cache too, for every server alike).
  dd if=/dev/urandom of="$disk" bs=1M count=1024 conv=notrunc,fsync status=none
done

# --- servers -------------------------------------------------------------------------
declare -A PORT=()

# start_server NAME DISK; its log is appended to, as it restarts every round.
start_server() {
  local name=$1 disk=$2 port log_file
  port=$(free_port)
  log_file=$LOG_DIR/$name.log
  case $name in
    ours)
      "$CDP" filter --disk "$disk" --listen "127.0.0.1:$port" >>"$log_file" 2>&1 &
      ;;
    nbdkit)
      # nbdkit 1.32: default 16 threads, file plugin with cache=default.
      nbdkit --foreground --port "$port" --ipaddr 127.0.0.1 file file="$disk" >>"$log_file" 2>&1 &
      ;;
    qemu-nbd)
      qemu-nbd --format=raw --cache=writeback --aio=threads --bind 127.0.0.1 --port "$port" \
        --persistent --shared=8 "$disk" >>"$log_file" 2>&1 &
      ;;
  esac
  PID[$name]=$!
  PORT[$name]=$port
  log "started $name (pid ${PID[$name]}) on 127.0.0.1:$port, serving $disk"
}

wait_ready() {
  local name=$1 pid=${PID[$1]} port=${PORT[$1]} deadline size
  deadline=$((SECONDS + STARTUP_TIMEOUT))
  while :; do
    if ! is_alive "$pid"; then
      local what=$name rc=0 tail_text
      [ "$name" = ours ] && what="ours ($CDP filter)"
      wait "$pid" 2>/dev/null || rc=$?
      unset "PID[$name]"
      tail_text=$(tail -n 20 "$LOG_DIR/$name.log")
      die "$what exited with status $rc before accepting connections; last lines of $LOG_DIR/$name.log:
${tail_text:-(log is empty)}"
    fi
    # Ours announces readiness on stdout; also require an NBD handshake.
    if [ "$name" != ours ] || grep -q "listening on 127.0.0.1:$port" "$LOG_DIR/$name.log"; then
      if size=$(timeout 5 nbdinfo --size "nbd://127.0.0.1:$port" 2>/dev/null); then
        [ "$size" = "$DISK_BYTES" ] || die "$name reports export size $size, expected $DISK_BYTES"
        return 0
      fi
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "$name did not accept NBD connections on 127.0.0.1:$port within ${STARTUP_TIMEOUT}s; log: $LOG_DIR/$name.log"
    sleep 0.2
  done
}

# --- runs ----------------------------------------------------------------------------
total=$((ROUNDS * ${#WORKLOADS[@]} * ${#SERVER_LIST[@]}))
n=0
log "running $total fio runs of ${RUNTIME}s (+${RAMP}s ramp) each"
for round in $(seq 1 "$ROUNDS"); do
  first=$(((round - 1) % ${#SERVER_LIST[@]}))
  stop_servers
  for i in "${!SERVER_LIST[@]}"; do
    s=${SERVER_LIST[i]}
    start_server "$s" "${DISKS[(i + first) % ${#DISKS[@]}]}"
    wait_ready "$s"
  done
  order=("${SERVER_LIST[@]:first}" "${SERVER_LIST[@]:0:first}")
  for w in "${WORKLOADS[@]}"; do
    read -r wname rw bs iodepth direction metric <<<"$w"
    for s in "${order[@]}"; do
      n=$((n + 1))
      pid=${PID[$s]}
      json=$RAW_DIR/r$round-$wname-$s.json
      is_alive "$pid" || die "$s (pid $pid) is no longer running; log: $LOG_DIR/$s.log"
      sync
      before=$(cpu_ticks "$pid")
      machine_before=$(machine_ticks)
      if ! fio --name="$wname" --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$s]}/" \
        --rw="$rw" --bs="$bs" --iodepth="$iodepth" --numjobs=1 --size=1G --direct=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --group_reporting \
        --output-format=json --output="$json" >"$json.log" 2>&1; then
        die "fio failed for $wname against $s (round $round):
$(tail -n 20 "$json.log")
server log: $LOG_DIR/$s.log"
      fi
      is_alive "$pid" || die "$s (pid $pid) died during $wname (round $round); log: $LOG_DIR/$s.log"
      after=$(cpu_ticks "$pid")
      machine_after=$(machine_ticks)
      [ -s "$json.log" ] || rm -f "$json.log"
      manifest_line "$round" "$wname" "$s" "$direction" "$metric" "$json" "$before" "$after" \
        "$machine_before" "$machine_after" >>"$MANIFEST"
      log "[$n/$total] round $round $wname $s done"
    done
  done
done

# --- report --------------------------------------------------------------------------
cpu_model=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
[ -n "$cpu_model" ] || cpu_model=$(lscpu 2>/dev/null | awk -F': *' '/Model name/ {print $2; exit}')
report=$RAW_DIR/report.md
{
  echo "# NBD server benchmark: cdp filter vs nbdkit vs qemu-nbd"
  echo
  echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
  echo "- kernel: $(uname -r); nproc: $(nproc); CPU: ${cpu_model:-unknown}"
  echo "- $(fio --version); nbdkit $(nbdkit --version | awk '{print $2}'); $(qemu-nbd --version | head -n 1)"
  if [ "$want_ours" = 1 ]; then
    echo "- cdp: $CDP ($(git -C "$REPO" describe --always --dirty 2>/dev/null || echo 'no git'))"
  fi
  echo "- RUNTIME=${RUNTIME}s (+${RAMP}s ramp), ROUNDS=$ROUNDS, servers: ${SERVER_LIST[*]} (run alternately within each round, the order rotating by round, sync before each run; servers restarted every round, each on another of the files)"
  echo "- data: each server serves its own 1 GiB file (a different one each round), preallocated with fallocate and filled from /dev/urandom, so reads hit real data (warm in the page cache); nbdkit file plugin with default cache, qemu-nbd --cache=writeback --aio=threads --shared=8; no flushes requested"
  echo "- fio: ioengine=nbd numjobs=1 size=1G direct=1 time_based; fio and the servers share this machine (no CPU pinning)"
  echo "- every number is the median across rounds; p50/p99 = fio completion latency (clat); server CPU s = utime+stime of the server process over the whole fio run (connect + ramp + runtime); machine CPU s = busy time of all CPUs over the same span (fio, the server, the kernel's writeback and network work alike); ratio = ours / max(nbdkit, qemu-nbd) on the workload's throughput metric"
  echo "- raw fio JSON: $RAW_DIR"
  echo
  python3 benches/fio_summary.py "$MANIFEST"
} >"$report"
cp "$report" "$OUT"
cat "$report"
log "report written to $OUT"
