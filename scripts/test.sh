#!/usr/bin/env bash
# The full test suite: installs what the tests need, then checks formatting,
# lints (warnings are errors) and runs every test, unit and integration.
# The integration tests use real NBD clients, loop devices and mounts: run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || {
  echo "cargo not found: install a Rust toolchain (https://rustup.rs), then rerun" >&2
  exit 1
}
[ "$(id -u)" -eq 0 ] || echo "warning: not root; loop-device and mount tests will fail" >&2

scripts/install-deps.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== loom model checks of our lock-free code (cfg cdp_loom)"
RUSTFLAGS="--cfg cdp_loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p filter --release --locked --lib -- wake:: combine:: 2>&1 | tee /dev/stderr | grep -q "test result: ok. 3 passed"
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the
# last of which may well be an empty one).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
