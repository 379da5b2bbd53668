#!/usr/bin/env bash
# The main job on its embedded default: a 1 GiB file-backed disk served by
# `cdp filter` on 127.0.0.1 with a capture log, written to by a real NBD
# client (qemu-io), then the captured stream replayed onto a blank image and
# compared with the disk byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked --bin cdp
cdp=target/release/cdp
work=target/demo
rm -rf "$work" && mkdir -p "$work"
truncate -s 1G "$work/disk.img"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$cdp" filter --disk "$work/disk.img" --listen "127.0.0.1:$port" --capture-log "$work/capture.log" \
  >"$work/filter.out" 2>"$work/filter.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$work/filter.out" 2>/dev/null && break; sleep 0.1; done
uri="nbd://127.0.0.1:$port/"
echo "== serving $work/disk.img at $uri"
nbdinfo "$uri" | grep -E 'export-size|can_(flush|fua|trim|zero|multi_conn)'

echo "== a real client writes: patterns, FUA, zeroes, discard, flush"
qemu-io -f raw "$uri" \
  -c 'write -P 0x5a 0 4M' -c 'write -f -P 0xa5 8M 64k' -c 'write -z 16M 1M' \
  -c 'discard 1M 1M' -c 'flush' -c 'read -P 0x5a 0 1M' | grep -E '^(wrote|discard|read)'
echo "== allocation map"
nbdinfo --map "$uri"

kill -TERM $pid && wait $pid
trap - EXIT
echo "== filter stopped: $(grep -o 'records=[0-9]* data_bytes=[0-9]*' "$work/filter.log")"

echo "== replaying the capture log onto a blank image"
"$cdp" replay --capture-log "$work/capture.log" --onto "$work/replayed.img"
cmp "$work/disk.img" "$work/replayed.img" && echo "replayed image equals the disk byte for byte"
