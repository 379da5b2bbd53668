#!/usr/bin/env python3
"""Summarise the fio runs of benches/filter.sh and benches/serve_point.sh into a
markdown table.

Usage: fio_summary.py MANIFEST

MANIFEST is a tab-separated file written by filter.sh or serve_point.sh (with
manifest_line from benches/fio_manifest.sh), one line per fio run:

    round  workload  server  direction  metric  json_path  cpu_ticks_before  cpu_ticks_after
    machine_ticks_before  machine_ticks_after  clk_tck

cpu_ticks are the server process's utime+stime; machine_ticks the busy time
of all CPUs (from /proc/stat), both in clock ticks.

direction is "read" or "write" (which side of the fio JSON holds the numbers),
metric is "iops" or "mbps" (the workload's throughput metric, used for the
ratio column). Workloads and servers are reported in first-seen order.
Every number in the main table is the median across rounds, taken per column.
The ratio column also gives the median of the per-round ratios (ours against
the best peer of the same round, which ran minutes apart at most, so slow
drift of a noisy machine cancels) and how many rounds we won.
"""

import json
import statistics
import sys

PEERS = ("nbdkit", "qemu-nbd")
OURS = "ours"


def parse_run(direction, json_path):
    with open(json_path, encoding="utf-8") as f:
        text = f.read()
    # fio can prepend warnings to its JSON; start at the first '{'.
    start = text.find("{")
    if start < 0:
        raise SystemExit(f"{json_path}: no JSON object in fio output")
    data = json.loads(text[start:])
    jobs = data.get("jobs") or []
    if len(jobs) != 1:
        raise SystemExit(f"{json_path}: expected 1 (group-reported) job, got {len(jobs)}")
    job = jobs[0]
    if job.get("error", 0) != 0:
        raise SystemExit(f"{json_path}: fio job error {job['error']}")
    side = job[direction]
    if side.get("total_ios", 0) == 0:
        raise SystemExit(f"{json_path}: no {direction} I/O completed")
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": float(side["iops"]),
        "mbps": float(side["bw_bytes"]) / 1e6,
        "p50": float(pct["50.000000"]) / 1e3,
        "p99": float(pct["99.000000"]) / 1e3,
    }


def fmt_num(x):
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}"


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    runs = {}  # (workload, server) -> list of per-round dicts
    workloads, servers, metric_of = [], [], {}
    with open(sys.argv[1], encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t")
            rnd, wl, srv, direction, metric, path = fields[:6]
            before, after, machine_before, machine_after, tck = map(int, fields[6:])
            r = parse_run(direction, path)
            r["cpu"] = (after - before) / tck
            r["machine"] = (machine_after - machine_before) / tck
            r["round"] = int(rnd)
            runs.setdefault((wl, srv), []).append(r)
            if wl not in workloads:
                workloads.append(wl)
                metric_of[wl] = metric
            if srv not in servers:
                servers.append(srv)

    def med(wl, srv, key):
        rs = runs.get((wl, srv))
        return statistics.median(r[key] for r in rs) if rs else None

    def per_round_ratios(wl, metric):
        ours = {r["round"]: r[metric] for r in runs.get((wl, OURS), [])}
        best = {}
        for peer in PEERS:
            for r in runs.get((wl, peer), []):
                best[r["round"]] = max(best.get(r["round"], 0.0), r[metric])
        return [ours[n] / best[n] for n in sorted(ours) if best.get(n, 0) > 0]

    out = []
    out.append(
        "| workload | server | IOPS | MB/s | p50 µs | p99 µs | server CPU s | machine CPU s | ratio to best peer |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for wl in workloads:
        metric = metric_of[wl]
        for srv in servers:
            if (wl, srv) not in runs:
                continue
            ratio = "—"
            if srv == OURS:
                peers = [med(wl, p, metric) for p in PEERS if (wl, p) in runs]
                if peers and max(peers) > 0:
                    label = "IOPS" if metric == "iops" else "MB/s"
                    paired = per_round_ratios(wl, metric)
                    won = sum(1 for x in paired if x >= 1)
                    ratio = (
                        f"{med(wl, srv, metric) / max(peers):.2f}× ({label}); per round "
                        f"{statistics.median(paired):.2f}×, won {won} of {len(paired)}"
                    )
                else:
                    ratio = "n/a (no peers run)"
            out.append(
                f"| {wl} | {srv} | {med(wl, srv, 'iops'):.0f} | {med(wl, srv, 'mbps'):.1f} "
                f"| {fmt_num(med(wl, srv, 'p50'))} | {fmt_num(med(wl, srv, 'p99'))} "
                f"| {med(wl, srv, 'cpu'):.2f} | {med(wl, srv, 'machine'):.2f} | {ratio} |"
            )

    # Per-round values of each workload's throughput metric, to judge noise.
    rounds = sorted({r["round"] for rs in runs.values() for r in rs})
    out.append("")
    out.append("Per-round throughput metric (IOPS for 4k/64k, MB/s for 1M):")
    out.append("")
    out.append("| workload | server | " + " | ".join(f"round {n}" for n in rounds) + " |")
    out.append("|---|---|" + "---:|" * len(rounds))
    for wl in workloads:
        metric = metric_of[wl]
        for srv in servers:
            rs = {r["round"]: r for r in runs.get((wl, srv), [])}
            if not rs:
                continue
            cells = [
                (f"{rs[n][metric]:.0f}" if metric == "iops" else f"{rs[n][metric]:.1f}") if n in rs else "—"
                for n in rounds
            ]
            out.append(f"| {wl} | {srv} | " + " | ".join(cells) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
