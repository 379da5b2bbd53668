#!/usr/bin/env bash
# Benchmark the replication frame codec (pipeline::codec) on one core against
# the reference tools: our Sealer (zstd level 1 + AES-256-GCM) and Opener over
# 1 MiB plaintexts, the zstd crate and ring's AES-256-GCM alone, `zstd -b1 FILE`
# and `openssl speed -evp aes-256-gcm -seconds 3` (16384-byte column), all in
# the same run, pinned with taskset to one CPU. Each of ours keeps its fastest
# pass over 3 s per round, as `zstd -b` keeps its fastest; the report gives
# medians across rounds and every round. The measuring is done by the
# example pipeline/examples/codec_throughput.rs; this script installs the
# tools, builds it, pins it and keeps the report.
#
# The data file is generated on first use (deterministic, disk-like: a third
# zeros, a third compressible text and record pages, a third random, in runs
# of 64 KiB to 1 MiB) and reused afterwards; point DATA at a real disk image
# to measure that instead.
#
# Usage: benches/codec.sh
# Environment:
#   ROUNDS=5                       rounds; every measurement runs once per round
#   SIZE_MIB=256                   size of the generated data file
#   DATA=target/bench/codec-data.bin   data file (generated if missing)
#   CPU=0                          the CPU to pin to
#   OUT=target/bench/codec.md      where the markdown report is written
#
# Output: the report (header + table of medians) on stdout and in $OUT;
# progress on stderr.
set -euo pipefail

cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SIZE_MIB=${SIZE_MIB:-256}
DATA=${DATA:-target/bench/codec-data.bin}
CPU=${CPU:-0}
OUT=${OUT:-target/bench/codec.md}

log() { printf '[codec-bench] %s\n' "$*" >&2; }
die() {
  printf '[codec-bench] error: %s\n' "$*" >&2
  exit 1
}

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB must be a positive integer, got '$SIZE_MIB'"
[[ $CPU =~ ^[0-9]+$ ]] || die "CPU must be a CPU number, got '$CPU'"

log "installing dependencies (scripts/install-deps.sh)"
scripts/install-deps.sh
for tool in zstd openssl taskset; do
  command -v "$tool" >/dev/null || die "'$tool' not found after scripts/install-deps.sh"
done

log "building the example (cargo build --release -p pipeline --example codec_throughput)"
cargo build --release -p pipeline --example codec_throughput ||
  die "cargo build --release -p pipeline --example codec_throughput failed"
BIN=${CARGO_TARGET_DIR:-target}/release/examples/codec_throughput
[ -x "$BIN" ] || die "example binary not found at '$BIN'"

mkdir -p "$(dirname "$DATA")" "$(dirname "$OUT")"
report=$(mktemp)
trap 'rm -f "$report"' EXIT
log "measuring on CPU $CPU, $ROUNDS rounds (about $((ROUNDS * 40)) s)"
taskset -c "$CPU" "$BIN" "$DATA" --size-mib "$SIZE_MIB" --rounds "$ROUNDS" >"$report" ||
  die "codec_throughput failed"
{
  cat "$report"
  echo
  echo "Run by benches/codec.sh at $(git describe --always --dirty 2>/dev/null || echo 'no git'), $(date -u '+%Y-%m-%d %H:%M:%S') UTC."
} >"$OUT"
cat "$OUT"
log "report written to $OUT"
