# Sourced by the benchmarks whose fio runs benches/fio_summary.py summarises
# (filter.sh, serve_point.sh): the CPU counters a manifest line records and
# the line itself, in the one layout fio_summary.py reads (its docstring).

# utime + stime (fields 14 and 15 of /proc/PID/stat) in clock ticks; covers
# all threads of the process. Fields are counted after the "(comm)" field,
# which may contain spaces.
cpu_ticks() {
  local s f
  s=$(<"/proc/$1/stat")
  s=${s##*) }
  read -r -a f <<<"$s" # f[0] is field 3 (state)
  echo $((f[11] + f[12]))
}

# Busy clock ticks of the whole machine (user, nice, system, irq, softirq,
# steal; not idle or iowait), from the first line of /proc/stat.
machine_ticks() {
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat
}

# One manifest line on stdout: ROUND WORKLOAD SERVER DIRECTION METRIC
# JSON_PATH CPU_BEFORE CPU_AFTER MACHINE_BEFORE MACHINE_AFTER, then the
# clock ticks per second.
manifest_line() {
  [ $# -eq 10 ] || {
    echo "manifest_line: 10 fields expected, got $#" >&2
    return 1
  }
  local IFS=$'\t'
  echo "$*"$'\t'"$(getconf CLK_TCK)"
}
