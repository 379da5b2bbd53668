#!/usr/bin/env bash
# Samples the RPO of a running protection: every 0.1 s, the age in seconds
# of the newest durable point in TARGET_DIR, one line per sample, appended
# to OUT, for as long as process PID (the `cdp protect`) lives.
#
# Usage: benches/sample_rpo.sh CDP TARGET_DIR PID OUT   (run it in the background)
set -uo pipefail
cdp=$1 target=$2 pid=$3 out=$4
: >"$out"
while kill -0 "$pid" 2>/dev/null; do
  "$cdp" points --dir "$target" --json 2>/dev/null | python3 -c "
import json,sys,time
p=json.load(sys.stdin)['points']
if p: print((time.time_ns() - p[-1]['time_ns']) / 1e9)" >>"$out" || true
  sleep 0.1
done
