#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use: real NBD clients
# and peer servers, fio, FUSE and ext4 tools, and the zstd and openssl command
# lines the codec benchmark compares against. Idempotent; runs as root or via sudo.
set -euo pipefail

packages=(libnbd-bin python3-libnbd nbdkit fio fuse3 qemu-utils e2fsprogs util-linux zstd openssl)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
