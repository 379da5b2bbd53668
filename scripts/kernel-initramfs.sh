#!/usr/bin/env bash
# Prepares a real Linux kernel for the kernel test (tests/kernel.rs,
# docs/KERNEL.md): Debian's cloud kernel (linux-image-*-cloud-amd64, which
# ships nbd.ko) and an initramfs with busybox-static, the virtio-net and nbd
# modules, nbd-client, util-linux's blkdiscard and the shared libraries they
# need. Nothing is installed on the host: the packages are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` into a cache, and the
# kernel and base initramfs are built there once per set of package versions
# (and version of this script). Where qemu-system-x86_64 is not installed
# (scripts/install-deps.sh explains when it cannot be), the distribution's
# qemu is unpacked into the cache too and run through a small wrapper.
#
# Usage: scripts/kernel-initramfs.sh OUT_DIR [OVERLAY_DIR]
#   Writes OUT_DIR/vmlinuz and OUT_DIR/initrd.img: the cached base initramfs
#   followed by a cpio of OVERLAY_DIR's contents (placed at / in the guest;
#   e.g. its /init), and prints three lines:
#     kernel PATH   OUT_DIR/vmlinuz, the kernel to boot
#     initrd PATH   OUT_DIR/initrd.img
#     qemu PATH     a qemu-system-x86_64 to run it with
#
# Cache: $CDP_KERNEL_CACHE, default ${XDG_CACHE_HOME:-~/.cache}/cdp/kernel-test.
# Concurrent runs share it safely (flock). Needs the apt lists
# (apt-get update) only when something is not cached yet.
set -euo pipefail

die() {
  echo "kernel-initramfs: $*" >&2
  exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 OUT_DIR [OVERLAY_DIR]"
out=$1
overlay=${2:-}
[ -d "$out" ] || die "$out is not a directory"
[ -z "$overlay" ] || [ -d "$overlay" ] || die "$overlay is not a directory"
for tool in apt-get apt-cache dpkg-deb ldd flock gzip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found"
done

cache=${CDP_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cdp/kernel-test}
mkdir -p "$cache/debs"
exec 9>"$cache/.lock"
flock 9

# Candidate versions from the apt lists ("PACKAGE VERSION" lines), looked
# up in one apt-cache call for the packages named here (each call takes a
# good part of a second).
versions=""
candidates() {
  apt-cache policy "$@" 2>/dev/null |
    awk '/^[^ ]/ { p = $1; sub(/:$/, "", p) } /Candidate:/ { print p, $2 }'
}
candidate() {
  local known
  known=$(awk -v p="$1" '$1 == p { print $2 }' <<<"$versions")
  if [ -n "$known" ]; then echo "$known"; else candidates "$1" | awk '{ print $2 }'; fi
}

# Downloads a package (candidate version) into the cache once; prints its path.
fetch() {
  local package=$1 version pattern deb
  version=$(candidate "$package")
  [ -n "$version" ] && [ "$version" != "(none)" ] ||
    die "apt knows no package $package: run apt-get update"
  pattern="$cache/debs/${package}_${version//:/%3a}_*.deb"
  deb=$(compgen -G "$pattern" | head -n1 || true)
  if [ -z "$deb" ]; then
    (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$package=$version" >&2) ||
      die "cannot download $package $version"
    deb=$(compgen -G "$pattern" | head -n1 || true)
    [ -n "$deb" ] || die "apt-get download $package=$version left no $pattern"
  fi
  echo "$deb"
}

# The kernel: the package the cloud meta-package depends on now.
kernel_package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kernel_package" ] ||
  die "apt knows no linux-image-cloud-amd64: run apt-get update (Debian 12 main)"
kernel_version=${kernel_package#linux-image-}

packages=("$kernel_package" nbd-client busybox-static util-linux)
versions=$(candidates "${packages[@]}" qemu-system-x86)
key=$(
  for p in "${packages[@]}"; do echo "$p $(candidate "$p")"; done
  sha256sum <"$0"
)
base="$cache/base-$(sha256sum <<<"$key" | cut -c1-16)"

build_base() {
  local work="$base.tmp.$$" root stage deb m
  rm -rf "$work"
  mkdir -p "$work/pkg" "$work/root"
  root="$work/root"
  for p in "${packages[@]}"; do
    deb=$(fetch "$p")
    dpkg-deb -x "$deb" "$work/pkg"
  done
  local pkg="$work/pkg" modules="$work/pkg/lib/modules/$kernel_version"
  [ -f "$pkg/boot/vmlinuz-$kernel_version" ] || die "no vmlinuz in $kernel_package"
  cp "$pkg/boot/vmlinuz-$kernel_version" "$work/vmlinuz"

  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,lib/modules,lib/x86_64-linux-gnu,lib64}
  cp "$pkg/bin/busybox" "$root/bin/busybox"
  cp "$pkg/bin/busybox" "$work/busybox"
  ln -s busybox "$root/bin/sh"

  # The modules and, first, what each depends on (the .ko's modinfo
  # `depends=`): e.g. virtio_ring before virtio.
  local order=()
  add_module() {
    local name=$1 file deps dep
    for m in "${order[@]}"; do [ "$m" = "$name" ] && return 0; done
    file=$(find "$modules" -name "$name.ko" -o -name "$name.ko.xz" | head -n1)
    [ -n "$file" ] || die "$kernel_package has no module $name"
    if [ "${file%.xz}" != "$file" ]; then
      xz -dc "$file" >"$root/lib/modules/$name.ko"
    else
      cp "$file" "$root/lib/modules/$name.ko"
    fi
    deps=$(tr '\0' '\n' <"$root/lib/modules/$name.ko" | sed -n 's/^depends=//p' | tr ',' ' ')
    for dep in $deps; do add_module "${dep//-/_}"; done
    order+=("$name")
  }
  for m in virtio_pci virtio_net nbd; do add_module "$m"; done
  printf '%s\n' "${order[@]}" >"$root/lib/modules/load-order"

  # nbd-client and blkdiscard -z (busybox's blkdiscard cannot zero) from the
  # downloaded packages, with the libraries ldd resolves for them on the host.
  cp "$pkg/sbin/nbd-client" "$root/sbin/nbd-client"
  cp "$pkg/sbin/blkdiscard" "$root/usr/sbin/blkdiscard"
  local lib
  for binary in "$root/sbin/nbd-client" "$root/usr/sbin/blkdiscard"; do
    if ldd "$binary" | grep -q 'not found'; then
      die "$(basename "$binary") needs libraries the host lacks (run scripts/install-deps.sh):
$(ldd "$binary" | grep 'not found')"
    fi
    for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
      case "$lib" in
        */ld-linux-x86-64.so.2) cp -L "$lib" "$root/lib64/ld-linux-x86-64.so.2" ;;
        *) cp -L "$lib" "$root/lib/x86_64-linux-gnu/" ;;
      esac
    done
  done
  echo "kernel $kernel_version, modules: ${order[*]}" >"$work/contents"

  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    "$root/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$work/base.cpio.gz"
  rm -rf "$work/pkg" "$work/root"
  rm -rf "$base"
  mv "$work" "$base"
  # Older builds go (callers copy what they use while holding the lock).
  for old in "$cache"/base-*; do
    [ "$old" = "$base" ] || rm -rf "$old"
  done
  echo "kernel-initramfs: built $base ($(cat "$base/contents"))" >&2
}

[ -s "$base/base.cpio.gz" ] || build_base

# qemu: the host's, else the distribution's unpacked into the cache.
qemu=$(command -v qemu-system-x86_64 || true)
if [ -z "$qemu" ]; then
  qemu_version=$(candidate qemu-system-x86)
  [ -n "$qemu_version" ] && [ "$qemu_version" != "(none)" ] ||
    die "apt knows no qemu-system-x86: run apt-get update"
  qdir="$cache/qemu-${qemu_version//[:~+]/_}"
  if [ ! -x "$qdir/qemu-system-x86_64" ]; then
    rm -rf "$qdir.tmp.$$"
    mkdir -p "$qdir.tmp.$$/root"
    # Exactly the packages apt would add to this host for qemu-system-x86:
    # the ones whose libraries the host lacks.
    for p in $(apt-get install -s -q --no-install-recommends qemu-system-x86 2>/dev/null |
      awk '/^Inst / { print $2 }'); do
      dpkg-deb -x "$(fetch "$p")" "$qdir.tmp.$$/root"
    done
    r="$qdir/root"
    cat >"$qdir.tmp.$$/qemu-system-x86_64" <<EOF
#!/bin/sh
# qemu-system-x86 $qemu_version unpacked from its Debian packages (not installed).
LD_LIBRARY_PATH="$r/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
QEMU_MODULE_DIR="$r/usr/lib/x86_64-linux-gnu/qemu" \\
exec "$r/usr/bin/qemu-system-x86_64" -L "$r/usr/share/qemu" -L "$r/usr/share/seabios" \\
  -L "$r/usr/lib/ipxe/qemu" "\$@"
EOF
    chmod +x "$qdir.tmp.$$/qemu-system-x86_64"
    rm -rf "$qdir"
    mv "$qdir.tmp.$$" "$qdir"
    "$qdir/qemu-system-x86_64" -version >/dev/null || die "the unpacked qemu does not run"
    echo "kernel-initramfs: unpacked qemu-system-x86 $qemu_version into $qdir" >&2
  fi
  qemu="$qdir/qemu-system-x86_64"
fi

# The initrd: the base, then the overlay (the kernel unpacks concatenated
# archives in order, later files replacing earlier ones).
cp "$base/vmlinuz" "$out/vmlinuz"
cp "$base/base.cpio.gz" "$out/initrd.img"
if [ -n "$overlay" ]; then
  (cd "$overlay" && find . -mindepth 1 | LC_ALL=C sort |
    "$base/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 >>"$out/initrd.img"
fi
flock -u 9
echo "kernel $out/vmlinuz"
echo "initrd $out/initrd.img"
echo "qemu $qemu"
