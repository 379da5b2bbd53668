#!/bin/sh
# Attaches an NBD export (a disk protected by `cdp protect` or `cdp filter`)
# as a local block device and prints the device's path.
#
# Usage: scripts/attach.sh URI [DEVICE]
#   URI     nbd://HOST[:PORT][/EXPORT] (port 10809 by default; the filter
#           answers to its export name and to the empty one), or
#           nbd+unix:///[EXPORT]?socket=PATH
#   DEVICE  /dev/nbdN or /dev/loopN to use; default: the first free one
#
# Where /dev/nbd* exists (the nbd module is loaded), the kernel's client
# attaches it: nbd-client with the export's preferred block size, a timeout,
# and -C N connections when the export offers multi-conn. The block size and
# multi-conn are asked of the export with nbdinfo (libnbd-bin); without
# nbdinfo (e.g. in a small initramfs) nbd-client's defaults are used: one
# connection and 512-byte blocks, unless the variables below say otherwise.
# Where there is no /dev/nbd*, the export is mounted as a file with nbdfuse
# and a loop device (direct I/O) is made over it; the script says so. What it
# made is recorded under $CDP_ATTACH_STATE so that scripts/detach.sh DEVICE
# can undo it.
#
# Environment:
#   CDP_ATTACH_TIMEOUT      seconds before the kernel gives up on a request
#                           (default 120; 0 waits for ever)
#   CDP_ATTACH_CONNECTIONS  connections for nbd-client (default: up to 4, one
#                           per CPU, when the export offers multi-conn, else 1)
#   CDP_ATTACH_BLOCK_SIZE   block size for nbd-client (default: the export's
#                           preferred size, 512 to 4096)
#   CDP_ATTACH_STATE        state directory (default /run/cdp-attach)
#
# POSIX sh (busybox sh is enough for the nbd-client path). Needs root.
set -eu

state=${CDP_ATTACH_STATE:-/run/cdp-attach}
timeout=${CDP_ATTACH_TIMEOUT:-120}

die() {
	echo "attach: $*" >&2
	exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 URI [DEVICE]"
for setting in CDP_ATTACH_TIMEOUT CDP_ATTACH_CONNECTIONS CDP_ATTACH_BLOCK_SIZE; do
	eval "value=\${$setting:-}"
	case "$value" in
	*[!0-9]*) die "$setting=$value is not a number" ;;
	esac
done
case "${CDP_ATTACH_BLOCK_SIZE:-512}" in
512 | 1024 | 2048 | 4096) ;;
*) die "CDP_ATTACH_BLOCK_SIZE must be 512, 1024, 2048 or 4096" ;;
esac
[ "${CDP_ATTACH_CONNECTIONS:-1}" -ge 1 ] || die "CDP_ATTACH_CONNECTIONS must be at least 1"
uri=$1
device=${2:-}

# ---- the URI -----------------------------------------------------------
host="" port=10809 socket="" export_name=""
case "$uri" in
nbd://*)
	rest=${uri#nbd://}
	authority=${rest%%/*}
	[ "$authority" = "$rest" ] || export_name=${rest#*/}
	case "$authority" in
	\[*\]:*) host=${authority%%]:*}; host=${host#\[}; port=${authority##*]:} ;;
	\[*\]) host=${authority#\[}; host=${host%]} ;;
	*:*) host=${authority%%:*}; port=${authority#*:} ;;
	*) host=$authority ;;
	esac
	;;
nbd+unix://*)
	rest=${uri#nbd+unix://}
	query=${rest#*\?}
	[ "$query" != "$rest" ] || die "$uri: a Unix-socket URI needs ?socket=PATH"
	path=${rest%%\?*}
	export_name=${path#/}
	case "$query" in
	socket=*) socket=${query#socket=}; socket=${socket%%&*} ;;
	*) die "$uri: a Unix-socket URI needs ?socket=PATH" ;;
	esac
	;;
nbds://* | nbds+unix://*) die "$uri: TLS exports are not supported" ;;
*) die "$uri is not an NBD URI (nbd://HOST[:PORT][/EXPORT] or nbd+unix:///[EXPORT]?socket=PATH)" ;;
esac
case "$port" in
'' | *[!0-9]*) die "$uri: the port must be a number" ;;
esac
[ -n "$host" ] || [ -n "$socket" ] || die "$uri names no host"

# ---- which path --------------------------------------------------------
have_nbd=""
for d in /dev/nbd[0-9]*; do
	[ -b "$d" ] && have_nbd=1 && break
done
case "$device" in
"") if [ -n "$have_nbd" ]; then mode=nbd; else mode=fuse; fi ;;
/dev/nbd[0-9]* | nbd[0-9]*) mode=nbd ;;
/dev/loop[0-9]* | loop[0-9]*) mode=fuse ;;
*) die "$device is neither /dev/nbdN nor /dev/loopN" ;;
esac
case "$device" in
/dev/*) ;;
?*) device=/dev/$device ;;
esac
name=${device#/dev/}

# The export must answer before anything is made: nbdinfo connects and
# negotiates (where it is missing, nbd-client below says the same).
info=""
probe() {
	command -v nbdinfo >/dev/null 2>&1 || return 0
	info=$(nbdinfo --json "$uri" 2>&1) || die "the export $uri is unreachable: $info"
}

mkdir -p "$state"

# ---- the kernel's client -----------------------------------------------
if [ "$mode" = nbd ]; then
	[ -n "$have_nbd" ] || [ -b "$device" ] ||
		die "there is no $device: load the nbd module (modprobe nbd) or attach without naming a device"
	command -v nbd-client >/dev/null 2>&1 ||
		die "nbd-client is not installed (apt-get install nbd-client)"
	connected() { [ -e "/sys/block/$1/pid" ] || [ "$(cat "/sys/block/$1/size" 2>/dev/null || echo 0)" != 0 ]; }
	if [ -n "$device" ]; then
		[ -b "$device" ] || die "$device does not exist"
		! connected "$name" || die "$device is busy: it is connected already (scripts/detach.sh $device)"
	else
		for d in /sys/block/nbd[0-9]*; do
			[ -e "$d" ] || continue
			if ! connected "${d##*/}"; then
				device=/dev/${d##*/}
				name=${d##*/}
				break
			fi
		done
		[ -n "$device" ] || die "every /dev/nbd* is in use"
	fi
	probe

	connections=${CDP_ATTACH_CONNECTIONS:-}
	block_size=${CDP_ATTACH_BLOCK_SIZE:-}
	if [ -n "$info" ]; then
		if [ -z "$connections" ]; then
			connections=1
			if echo "$info" | grep -q '"can_multi_conn": *true'; then
				connections=$(nproc 2>/dev/null || echo 1)
				[ "$connections" -le 4 ] || connections=4
			fi
		fi
		if [ -z "$block_size" ]; then
			preferred=$(echo "$info" | sed -n 's/.*"block_size_preferred": *\([0-9]*\).*/\1/p' | head -n 1)
			block_size=512
			for b in 1024 2048 4096; do
				[ "${preferred:-0}" -ge "$b" ] && block_size=$b
			done
		fi
	else
		echo "attach: nbdinfo is not installed: cannot ask the export for multi-conn and" \
			"its block size; using ${connections:-1} connection(s) and ${block_size:-512}-byte blocks" >&2
	fi

	set -- -b "${block_size:-512}" -t "$timeout" -C "${connections:-1}"
	[ -z "$export_name" ] || set -- "$@" -N "$export_name"
	if [ -n "$socket" ]; then
		set -- -u "$socket" "$device" "$@"
	else
		set -- "$host" "$port" "$device" "$@"
	fi
	if ! out=$(nbd-client "$@" 2>&1); then
		die "nbd-client $* failed: the export $uri is unreachable or refused the connection:
$out"
	fi
	echo "$out" >&2
	connected "$name" || die "nbd-client $* succeeded but $device is not connected:
$out"
	{
		echo "mode=nbd"
		echo "uri=$uri"
	} >"$state/$name"
	echo "$device"
	exit 0
fi

# ---- nbdfuse and a loop device -----------------------------------------
if [ -n "$have_nbd" ]; then
	echo "attach: attaching through nbdfuse and $device, as asked" >&2
else
	echo "attach: no /dev/nbd* here (the nbd module is not loaded):" \
		"attaching through nbdfuse and a loop device" >&2
fi
for tool in nbdfuse nbdinfo losetup fusermount3 setsid; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (libnbd-bin, fuse3, util-linux)"
done
if [ -n "$device" ]; then
	[ -b "$device" ] || die "$device does not exist"
	[ ! -e "/sys/block/$name/loop" ] ||
		die "$device is busy: it is bound to $(cat "/sys/block/$name/loop/backing_file" 2>/dev/null)"
fi
probe

mountpoint=$(mktemp -d "$state/fuse.XXXXXX")
log=$mountpoint.log
pidfile=$mountpoint.pid
# In its own session, so that it outlives this script and its terminal;
# setsid -w lives as long as nbdfuse (if it has to fork at all), and
# nbdfuse writes its own PID once it serves.
setsid -w nbdfuse -P "$pidfile" "$mountpoint" "$uri" </dev/null >"$log" 2>&1 &
watch=$!
pid=""
undo() {
	fusermount3 -u -q "$mountpoint" 2>/dev/null || true
	[ -z "$pid" ] || kill "$pid" 2>/dev/null || true
	kill "$watch" 2>/dev/null || true
	rmdir "$mountpoint" 2>/dev/null || true
	rm -f "$log" "$pidfile"
}
tries=0
until [ -s "$pidfile" ] && [ -s "$mountpoint/nbd" ]; do
	if ! kill -0 "$watch" 2>/dev/null; then
		why=$(cat "$log")
		undo
		die "nbdfuse $uri failed: $why"
	fi
	tries=$((tries + 1))
	if [ "$tries" -gt 200 ]; then
		undo
		die "nbdfuse $uri: $mountpoint/nbd did not appear within 20 s"
	fi
	sleep 0.1
done
pid=$(cat "$pidfile")
if [ -n "$device" ]; then
	losetup --direct-io=on "$device" "$mountpoint/nbd" 2>"$log.losetup" || {
		why=$(cat "$log.losetup")
		rm -f "$log.losetup"
		undo
		die "losetup $device failed: $why"
	}
else
	device=$(losetup --find --show --direct-io=on "$mountpoint/nbd" 2>"$log.losetup") || {
		why=$(cat "$log.losetup")
		rm -f "$log.losetup"
		undo
		die "losetup failed: $why"
	}
fi
rm -f "$log.losetup"
name=${device#/dev/}
{
	echo "mode=fuse"
	echo "uri=$uri"
	echo "pid=$pid"
	echo "mountpoint=$mountpoint"
} >"$state/$name"
echo "$device"
