#!/bin/sh
# Undoes scripts/attach.sh: detaches a block device attached to an NBD export.
#
# Usage: scripts/detach.sh DEVICE
#   /dev/nbdN   disconnected with nbd-client -d (the kernel's client)
#   /dev/loopN  made by attach.sh over nbdfuse: the loop device is detached,
#               the FUSE file unmounted and nbdfuse stopped (by its PID)
#
# Refuses, changing nothing, while the device (or a partition on it) is
# mounted, used as swap, held by another device (device-mapper, md) or open
# in a process, and names who uses it. Works when the export has gone away.
# Environment: CDP_ATTACH_STATE, the state directory (default /run/cdp-attach).
#
# POSIX sh (busybox sh is enough for /dev/nbdN). Needs root.
set -eu

state=${CDP_ATTACH_STATE:-/run/cdp-attach}

die() {
	echo "detach: $*" >&2
	exit 1
}

[ $# -eq 1 ] || die "usage: $0 DEVICE"
device=$1
case "$device" in
/dev/*) ;;
*) device=/dev/$device ;;
esac
name=${device#/dev/}
case "$name" in
nbd[0-9]* | loop[0-9]*) ;;
*) die "$device is neither /dev/nbdN nor /dev/loopN" ;;
esac
[ -e "/sys/block/$name" ] || die "there is no $device"

# ---- is it in use? -----------------------------------------------------
# The device and its partitions: names and major:minor numbers.
parts=$name
for p in /sys/block/"$name"/"$name"*; do
	[ -e "$p/dev" ] && parts="$parts ${p##*/}"
done
busy=""
for part in $parts; do
	majmin=$(cat "/sys/class/block/$part/dev")
	# mountinfo's third field is the mounted device's major:minor.
	where=$(awk -v d="$majmin" '$3 == d { print $5 }' /proc/self/mountinfo | head -n 1)
	[ -z "$where" ] || busy="$busy
  /dev/$part is mounted on $where"
	if grep -q "^/dev/$part[[:space:]]" /proc/swaps 2>/dev/null; then
		busy="$busy
  /dev/$part is in use as swap"
	fi
	for holder in /sys/class/block/"$part"/holders/*; do
		[ -e "$holder" ] && busy="$busy
  /dev/$part is held by ${holder##*/}"
	done
done
# Processes with the device or a partition open (ls -l shows each fd's target).
pids=$(ls -l /proc/[0-9]*/fd 2>/dev/null | awk -v parts=" $parts " '
	/^\/proc\/[0-9]+\/fd:$/ { split($0, a, "/"); pid = a[3]; next }
	NF > 2 && $(NF - 1) == "->" && $NF ~ /^\/dev\// {
		if (index(parts, " " substr($NF, 6) " ")) print pid
	}' | sort -u)
for pid in $pids; do
	# Not this script, nor the commands that looked (they inherited our
	# descriptors and are gone by now).
	[ "$pid" != $$ ] && comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
	busy="$busy
  $comm (PID $pid) has it open"
done
[ -z "$busy" ] || die "$device is busy; nothing was changed:$busy"

# ---- the kernel's client -----------------------------------------------
case "$name" in
nbd*)
	if [ ! -e "/sys/block/$name/pid" ] && [ "$(cat "/sys/block/$name/size")" = 0 ]; then
		rm -f "$state/$name"
		die "$device is not connected"
	fi
	command -v nbd-client >/dev/null 2>&1 || die "nbd-client is not installed"
	out=$(nbd-client -d "$device" 2>&1) || die "nbd-client -d $device failed: $out"
	tries=0
	while [ -e "/sys/block/$name/pid" ]; do
		tries=$((tries + 1))
		[ "$tries" -le 100 ] || die "$device is still connected 10 s after nbd-client -d: $out"
		sleep 0.1
	done
	rm -f "$state/$name"
	echo "detached $device" >&2
	exit 0
	;;
esac

# ---- nbdfuse and a loop device -----------------------------------------
[ -f "$state/$name" ] ||
	die "$device was not attached by attach.sh (no $state/$name); detach it with losetup -d"
value() { sed -n "s/^$1=//p" "$state/$name"; }
pid=$(value pid)
mountpoint=$(value mountpoint)
[ -n "$pid" ] && [ -n "$mountpoint" ] || die "$state/$name is damaged: $(cat "$state/$name")"

if [ -e "/sys/block/$name/loop" ]; then
	backing=$(cat "/sys/block/$name/loop/backing_file")
	[ "$backing" = "$mountpoint/nbd" ] ||
		die "$device is bound to $backing, not to $mountpoint/nbd as $state/$name says"
	out=$(losetup -d "$device" 2>&1) || die "losetup -d $device failed: $out"
	# The kernel lets go on the last close; udev or blkid may hold it briefly.
	tries=0
	while [ -e "/sys/block/$name/loop" ]; do
		tries=$((tries + 1))
		[ "$tries" -le 100 ] || die "$device is still bound 10 s after losetup -d"
		sleep 0.1
	done
fi

# Unmounting the FUSE file makes nbdfuse exit.
tries=0
while grep -q " $mountpoint fuse" /proc/self/mounts; do
	out=$(fusermount3 -u "$mountpoint" 2>&1) && break
	tries=$((tries + 1))
	[ "$tries" -le 100 ] || die "fusermount3 -u $mountpoint keeps failing: $out"
	sleep 0.1
done
# Only this nbdfuse: its PID, if that process is still nbdfuse.
tries=0
while [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = nbdfuse ]; do
	tries=$((tries + 1))
	if [ "$tries" -gt 100 ]; then
		kill "$pid" 2>/dev/null || true
		echo "detach: nbdfuse (PID $pid) did not exit after the unmount: killed it" >&2
		break
	fi
	sleep 0.1
done
rmdir "$mountpoint" 2>/dev/null || true
rm -f "$mountpoint.log" "$mountpoint.pid" "$state/$name"
echo "detached $device" >&2
