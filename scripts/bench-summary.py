#!/usr/bin/env python3
"""Summarises a bench-loopback.sh results file (JSON lines) as a Markdown table.

Per tool: median wall seconds with min–max, MB/s (10^6 bytes of history per wall second),
throughput relative to tar|nc and to rsync (default cipher) as the median of the per-round ratios
(the tools of one round ran back to back, so a ratio compares like with like), CPU seconds per GB
(both ends), peak RSS of each end, and the time a trailing `sync` took (ferry fsyncs as it goes;
tar and rsync leave dirty pages to the kernel).

usage: bench-summary.py RESULTS.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict

ORDER = ["tar", "tarzstd", "rsync", "rsyncgcm", "scp", "ferry", "ferry@base", "proto", "proto@base",
         "protoraw", "scan", "b3sum"]
NAMES = {
    "tar": "tar \\| nc",
    "tarzstd": "tar \\| zstd -1 \\| nc",
    "rsync": "rsync -a over ssh (default cipher)",
    "rsyncgcm": "rsync -a over ssh (aes128-gcm)",
    "scp": "scp -r (SFTP over ssh, default cipher)",
    "ferry": "ferry send/receive (QUIC, scan included)",
    "ferry@base": "ferry, baseline build",
    "proto": "ferry protocol in memory (no QUIC)",
    "proto@base": "ferry protocol in memory, baseline build",
    "protoraw": "ferry protocol in memory, compression off",
    "scan": "ferry scan+hash (scan_bench)",
    "b3sum": "b3sum --num-threads 2",
}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(path):
    runs = defaultdict(dict)  # tool -> round -> record
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            runs[r["tool"]][r["round"]] = r

    def ratio(tool, base):
        if base not in runs or tool not in runs:
            return None
        rs = [runs[base][k]["wall_s"] / runs[tool][k]["wall_s"]
              for k in runs[tool] if k in runs[base]]
        return (med(rs), min(rs), max(rs)) if rs else None

    def fmt_ratio(r):
        return "–" if r is None else f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f})"

    print("| tool | rounds | wall s median (min–max) | MB/s | vs tar\\|nc | vs rsync | CPU s/GB (send+recv) "
          "| peak RSS send / recv MiB | wire/bytes | sync after s | load1 | files/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tool in ORDER:
        if tool not in runs:
            continue
        rs = list(runs[tool].values())
        walls = [r["wall_s"] for r in rs]
        gb = rs[0]["bytes"] / 1e9
        cpu = [(r["cpu_send_s"] + r["cpu_recv_s"]) / gb for r in rs]
        rss_s = med([r["rss_send_kb"] for r in rs]) / 1024
        rss_r = med([r["rss_recv_kb"] for r in rs]) / 1024
        wires = [r["wire_bytes"] / r["bytes"] for r in rs if r.get("wire_bytes") is not None]
        loads = [r["load1"] for r in rs]
        transfer = tool not in ("scan", "b3sum")
        rss = f"{rss_s:.0f} / {rss_r:.0f}" if transfer and tool not in ("proto", "protoraw") else f"{rss_s:.0f}"
        wire = f"{med(wires):.3f}" if wires else "–"
        print(
            f"| {NAMES[tool]} | {len(rs)} | {med(walls):.2f} ({min(walls):.2f}–{max(walls):.2f}) "
            f"| {rs[0]['bytes'] / 1e6 / med(walls):.0f} "
            f"| {fmt_ratio(ratio(tool, 'tar')) if transfer else '–'} "
            f"| {fmt_ratio(ratio(tool, 'rsync')) if transfer else '–'} "
            f"| {med(cpu):.2f} | {rss} | {wire} "
            f"| {med([r['sync_s'] for r in rs]):.2f} | {min(loads):.2f}–{max(loads):.2f} "
            f"| {rs[0]['files'] / med(walls):.0f} |"
        )
    if "scan" in runs and "b3sum" in runs:
        r = ratio("scan", "b3sum")
        print(f"\nscan+hash vs b3sum (same files, warm cache): {fmt_ratio(r)} of b3sum's throughput")
    for tool in ("ferry", "proto"):
        base = tool + "@base"
        if tool in runs and base in runs:
            cpu = [(runs[base][k]["cpu_send_s"] + runs[base][k]["cpu_recv_s"])
                   / (runs[tool][k]["cpu_send_s"] + runs[tool][k]["cpu_recv_s"])
                   for k in runs[tool] if k in runs[base]]
            print(f"{tool} vs its baseline build: throughput {fmt_ratio(ratio(tool, base))}, "
                  f"baseline CPU / new CPU {med(cpu):.2f}× ({min(cpu):.2f}–{max(cpu):.2f})")


if __name__ == "__main__":
    main(sys.argv[1])
