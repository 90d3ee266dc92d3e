#!/usr/bin/env python3
"""Summarises bench-link.sh and bench-resume.sh results (JSON lines) as Markdown tables.

link: per rate, loss, data set and tool: median goodput (data bits per wall second) with
min–max, as a fraction of the link rate, and ferry / tar|nc per round (same round, same data).
resume: per interruption: median seconds lost beyond a clean run (and beyond the outage itself)
and bytes re-sent (bytes that reached the receiver beyond a clean run's), with min–max.

usage: bench-lan-summary.py RESULTS.jsonl [...]
"""
import json
import statistics
import sys
from collections import defaultdict


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def rng(xs, fmt="{:.2f}"):
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def link(rs):
    by = defaultdict(dict)  # (rate, loss, data, tool) -> round -> record
    for r in rs:
        by[(r["rate_bits"], r["loss"], r["data"], r["tool"])][r["round"]] = r
    print("| link | loss each way | data | tool | runs | goodput Mbit/s median (min–max) "
          "| of link rate | ferry / tar\\|nc per round | wire / bytes | CPU s send+recv | peak RSS send / recv MiB | load1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(by):
        bits, loss, data, tool = key
        runs = by[key]
        good = [r["bytes"] * 8 / r["wall_s"] / 1e6 for r in runs.values()]
        frac = [g * 1e6 / bits for g in good]
        other = by.get((bits, loss, data, "tar"), {})
        ratio = "–"
        if tool == "ferry" and other:
            rr = [other[k]["wall_s"] / runs[k]["wall_s"] for k in runs if k in other]
            if rr:
                ratio = rng(rr) + "×"
        wires = [r["wire_bytes"] / r["bytes"] for r in runs.values() if r.get("wire_bytes")]
        cpu = [r["cpu_send_s"] + r["cpu_recv_s"] for r in runs.values()]
        loads = [r["load1"] for r in runs.values()]
        rate = next(iter(runs.values()))["rate"]
        print(f"| {rate} | {loss * 100:g}% | {data} | {tool} | {len(runs)} | {rng(good, '{:.1f}')} "
              f"| {rng([f * 100 for f in frac], '{:.1f}')} % | {ratio} "
              f"| {(f'{med(wires):.3f}' if wires else '–')} | {med(cpu):.2f} "
              f"| {med([r['rss_send_kb'] for r in runs.values()]) / 1024:.0f} / "
              f"{med([r['rss_recv_kb'] for r in runs.values()]) / 1024:.0f} "
              f"| {min(loads):.2f}–{max(loads):.2f} |")


def resume(rs):
    by = defaultdict(dict)
    for r in rs:
        by[r["kind"]][r["round"]] = r
    clean = by.get("none", {})
    print("| interruption | runs | wall s median (min–max) | lost s beyond clean run | "
          "lost s beyond clean + outage | bytes re-sent (MiB) median (min–max) | load1 |")
    print("|---|---|---|---|---|---|---|")
    for kind in sorted(by, key=lambda k: (k != "none", k)):
        runs = by[kind]
        walls = [r["wall_s"] for r in runs.values()]
        loads = [r["load1"] for r in runs.values()]
        if kind == "none" or not clean:
            print(f"| {kind} | {len(runs)} | {rng(walls)} | – | – | – | {min(loads):.2f}–{max(loads):.2f} |")
            continue
        lost = [runs[k]["wall_s"] - clean[k]["wall_s"] for k in runs if k in clean]
        lost_o = [runs[k]["wall_s"] - clean[k]["wall_s"] - runs[k].get("outage_s", 0)
                  for k in runs if k in clean]
        resent = [(runs[k]["wire_in_bytes"] - clean[k]["wire_in_bytes"]) / 2**20
                  for k in runs if k in clean]
        print(f"| {kind} | {len(runs)} | {rng(walls)} | {rng(lost)} | {rng(lost_o)} "
              f"| {rng(resent, '{:.1f}')} | {min(loads):.2f}–{max(loads):.2f} |")


def main(paths):
    groups = defaultdict(list)
    for p in paths:
        for line in open(p):
            line = line.strip()
            if line:
                r = json.loads(line)
                groups[r.get("bench", "loopback")].append(r)
    if groups.get("link"):
        link(groups["link"])
    if groups.get("resume"):
        resume(groups["resume"])


if __name__ == "__main__":
    main(sys.argv[1:])
