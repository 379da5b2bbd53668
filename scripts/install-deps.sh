#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use: real NBD clients
# and peer servers, fio, FUSE and ext4 tools, the zstd and openssl command
# lines the codec benchmark compares against, and what the kernel test needs
# (nbd-client, busybox-static and qemu-system-x86; see docs/KERNEL.md).
# Idempotent; runs as root or via sudo.
set -euo pipefail

packages=(libnbd-bin python3-libnbd nbdkit fio fuse3 qemu-utils e2fsprogs util-linux zstd openssl
  nbd-client busybox-static)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done

# qemu-system-x86 goes on the same apt-get line as qemu-utils: installing it
# alone makes apt remove a qemu-utils it does not match (and with it qemu-img
# and qemu-io, which the other tests use). Where the installed qemu-utils
# comes from elsewhere (e.g. a backport, 10.x, which Breaks the distribution's
# qemu-system-common 7.2), no qemu-system-x86 can sit beside it: then it is
# not installed, and the kernel test runs the distribution's qemu extracted
# into its cache instead (scripts/kernel-initramfs.sh).
updated=""
update() {
  [ -n "$updated" ] || $SUDO apt-get update -qq
  updated=1
}
[ ${#missing[@]} -eq 0 ] || update
qemu_system=()
if ! installed qemu-system-x86; then
  if plan=$(apt-get install -s -q --no-install-recommends qemu-system-x86 qemu-utils 2>&1) &&
    ! grep -q '^Remv ' <<<"$plan"; then
    qemu_system=(qemu-system-x86 qemu-utils)
  else
    echo "note: qemu-system-x86 cannot be installed beside qemu-utils" \
      "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) without removing or breaking it;" \
      "the kernel test runs the distribution's qemu extracted into its cache instead" >&2
  fi
fi

if [ ${#missing[@]} -eq 0 ] && [ ${#qemu_system[@]} -eq 0 ]; then
  exit 0
fi
update
echo "installing: ${missing[*]} ${qemu_system[*]}" >&2
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" "${qemu_system[@]}" >/dev/null
