#!/usr/bin/env bash
# The main job on its embedded default: a 1 GiB file-backed disk (holding
# some data already) protected by `cdp protect`, replicating to `cdp target`
# on the same machine (127.0.0.1) with a fresh key, which rolls a long-term
# point every 2 seconds (a short schedule, for the demo). A real NBD client
# (qemu-io) writes to it; then the restore points of both tiers are listed,
# and the newest point and the oldest long-term point are restored and
# compared with the disk as it was.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked --bin cdp
cdp=target/release/cdp
work=target/demo
rm -rf "$work" && mkdir -p "$work"
truncate -s 1G "$work/disk.img"
head -c 64M /dev/urandom | dd of="$work/disk.img" conv=notrunc status=none   # data for the full sync
"$cdp" keygen "$work/key"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_listening() { for _ in $(seq 200); do grep -q listening "$1" 2>/dev/null && return; sleep 0.05; done; echo "no listening line in $1" >&2; exit 1; }

"$cdp" target --listen 127.0.0.1:0 --dir "$work/target" --key "$work/key" --long-term-every 2s >"$work/target.out" 2>"$work/target.log" &
pids+=($!)
wait_listening "$work/target.out"
target=$(sed -n 's/^listening on //p' "$work/target.out")

"$cdp" protect --disk "$work/disk.img" --listen 127.0.0.1:0 --target "$target" --key "$work/key" --rpo 1s \
  >"$work/protect.out" 2>"$work/protect.log" &
protect=$!
pids+=($protect)
wait_listening "$work/protect.out"
uri="nbd://$(sed -n 's/^listening on //p' "$work/protect.out")/"
echo "== protecting $work/disk.img, served at $uri, replicating to $target"

echo "== a real client writes: patterns, FUA, zeroes, discard, flush"
qemu-io -f raw "$uri" \
  -c 'write -P 0x5a 0 4M' -c 'write -f -P 0xa5 8M 64k' -c 'write -z 16M 1M' \
  -c 'discard 1M 1M' -c 'flush' | grep -E '^(wrote|discard)'
first_done=$(date +%s%N)
# The target rolls a long-term point every 2 s; wait for one made after
# these writes, then keep a copy of the disk as it is now.
for _ in $(seq 300); do
  "$cdp" points --dir "$work/target" --json 2>/dev/null | python3 -c '
import json, sys
points = json.load(sys.stdin)["points"]
sys.exit(0 if any(p["tier"] != "journal" and p["time_ns"] > int(sys.argv[1]) for p in points) else 1)' "$first_done" && break
  sleep 0.2
done
cp --sparse=always "$work/disk.img" "$work/first.img"
second_write=$(date +%s%N)
qemu-io -f raw "$uri" -c 'write -P 0x77 100M 8M' -c 'flush' | grep -E '^wrote'
sleep 2

kill -TERM "$protect" && wait "$protect"
echo "== protect stopped: $(grep -o 'batches=[0-9]* bytes=[0-9]*' "$work/protect.log")"

echo "== restore points"
"$cdp" points --dir "$work/target"
last=$("$cdp" points --dir "$work/target" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"][-1]["id"])')
echo "== restoring point $last"
"$cdp" restore --dir "$work/target" --at "$last" --key "$work/key" --out "$work/restored.img"
cmp "$work/disk.img" "$work/restored.img" && echo "restored image equals the protected disk byte for byte"
first_lt=$("$cdp" points --dir "$work/target" --json | python3 -c '
import json, sys
points = json.load(sys.stdin)["points"]
print([p["id"] for p in points if p["tier"] != "journal" and p["time_ns"] < int(sys.argv[1])][-1])' "$second_write")
echo "== restoring long-term point $first_lt (made in the pause before the second write)"
"$cdp" restore --dir "$work/target" --at "$first_lt" --key "$work/key" --out "$work/restored-lt.img"
cmp "$work/first.img" "$work/restored-lt.img" && echo "it equals the disk as it was before the second write"
