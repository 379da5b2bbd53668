# Sourced by the benchmarks that run cdp's own daemons (replication.sh,
# resync.sh, longterm.sh): installs what they need, builds the release
# binary, and makes a scratch directory. When the script exits, every
# process whose pid it added to `pids` is killed and the directory removed.

# daemon_setup NAME PARENT: sets `cdp` (the binary), `work` (the scratch
# directory, PARENT/cdp-NAME-bench.XXXXXX) and `pids` (empty).
daemon_setup() {
  scripts/install-deps.sh
  cargo build --release --locked --bin cdp >&2
  cdp=$PWD/target/release/cdp
  work=$(mktemp -d "$2/cdp-$1-bench.XXXXXX")
  pids=()
  trap daemon_cleanup EXIT
}

daemon_cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
