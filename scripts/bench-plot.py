#!/usr/bin/env python3
"""Draws the benchmark plots from bench-results/*.jsonl into bench-results/plots/*.png.

- rate-vs-link.png: goodput against link rate (bench-link.sh): ferry on incompressible and on
  text-heavy data, tar | nc on the same, at 0% and 1% loss; the dashed line is the link rate.
- rate-vs-size.png: throughput against history size (loopback; bench-sizes.sh and
  bench-loopback.sh batches tagged quiet-*/rss-*): ferry, tar | nc, rsync over ssh; and the peak
  RSS of each end of ferry.

Points are medians over rounds; bars span min–max. Uses matplotlib, installed on first use into
a virtual environment under target/bench-tools/plot-venv (PyPI), so the system Python is left
alone.

usage: scripts/bench-plot.py [--since YYYYMMDDTHHMMSS] [RESULTS_DIR]

--since keeps only result files recorded at or after that UTC time (the stamp in their names),
so that a plot shows one build's batches rather than every session's.
"""
import glob
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    venv = os.path.join(REPO, "target", "bench-tools", "plot-venv")
    py = os.path.join(venv, "bin", "python3")
    if os.environ.get("FERRY_PLOT_VENV") == "1":
        sys.exit("bench-plot: matplotlib still missing in " + venv)
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    subprocess.check_call([py, "-m", "pip", "install", "--quiet", "matplotlib"])
    os.environ["FERRY_PLOT_VENV"] = "1"
    os.execv(py, [py] + sys.argv)


def stamp(path):
    """The UTC time in a result file's name (…-20261127T003112Z.jsonl), or ""."""
    base = os.path.basename(path)[: -len(".jsonl")]
    last = base.rsplit("-", 1)[-1]
    return last.rstrip("Z") if "T" in last else ""


def load(results, since=""):
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "*.jsonl"))):
        if since and stamp(path) < since:
            continue
        for line in open(path):
            line = line.strip()
            if line:
                r = json.loads(line)
                r["_file"] = os.path.basename(path)
                rows.append(r)
    return rows


def stats(xs):
    m = statistics.median(xs)
    return m, m - min(xs), max(xs) - m


def plot_link(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    link = [r for r in rows if r.get("bench") == "link"]
    if not link:
        print("bench-plot: no bench-link results; skipping rate-vs-link.png")
        return
    series = defaultdict(lambda: defaultdict(list))  # (tool, data, loss) -> rate -> [Mbit/s]
    for r in link:
        series[(r["tool"], r["data"], r["loss"])][r["rate_bits"]].append(
            r["bytes"] * 8 / r["wall_s"] / 1e6)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {("ferry", "random"): ("tab:blue", "o", "ferry, incompressible"),
              ("ferry", "text"): ("tab:green", "^", "ferry, text (effective rate)"),
              ("tar", "random"): ("tab:gray", "s", "tar | nc, incompressible"),
              ("tar", "text"): ("tab:brown", "D", "tar | nc, text")}
    rates = sorted({r["rate_bits"] for r in link})
    for (tool, data, loss), by_rate in sorted(series.items()):
        color, marker, label = styles.get((tool, data), ("black", "x", f"{tool} {data}"))
        xs = sorted(by_rate)
        ms = [stats(by_rate[x]) for x in xs]
        ax.errorbar([x / 1e6 for x in xs], [m[0] for m in ms],
                    yerr=[[m[1] for m in ms], [m[2] for m in ms]],
                    color=color, marker=marker, capsize=3,
                    linestyle="-" if loss == 0 else "--",
                    label=f"{label}, {loss * 100:g}% loss")
    ax.plot([x / 1e6 for x in rates], [x / 1e6 for x in rates], color="red", linestyle=":",
            label="link rate")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate, Mbit/s (tc tbf, both directions)")
    ax.set_ylabel("data delivered, Mbit/s (wall clock, from sender start)")
    ax.set_title("Goodput over a namespace link (2 shared vCPUs; both ends on them)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rate-vs-link.png"), dpi=110)
    print("bench-plot: wrote rate-vs-link.png")


def plot_sizes(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # bench-sizes.sh results, plus bench-loopback.sh batches of large-file histories run with
    # tar, rsync and ferry (tags quiet-* and rss-*): different batches, so each point is labelled
    # by size only; BENCHMARKS.md says which batch each came from.
    sizes = [r for r in rows
             if r["_file"].startswith(("sizes-", "quiet-", "rss-"))
             and r.get("tool") in ("tar", "rsync", "ferry")]
    if not sizes:
        print("bench-plot: no bench-sizes results; skipping rate-vs-size.png")
        return
    by = defaultdict(lambda: defaultdict(list))  # tool -> GiB -> [MB/s]
    rss = defaultdict(lambda: defaultdict(list))  # end -> GiB -> [MiB]
    for r in sizes:
        gib = r["bytes"] / 2**30
        by[r["tool"]][gib].append(r["bytes"] / r["wall_s"] / 1e6)
        if r["tool"] == "ferry":
            rss["send"][gib].append(r["rss_send_kb"] / 1024)
            rss["recv"][gib].append(r["rss_recv_kb"] / 1024)
    names = {"tar": "tar | nc", "rsync": "rsync over ssh (default cipher)", "ferry": "ferry"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for tool, pts in sorted(by.items()):
        xs = sorted(pts)
        ms = [stats(pts[x]) for x in xs]
        ax.errorbar(xs, [m[0] for m in ms], yerr=[[m[1] for m in ms], [m[2] for m in ms]],
                    marker="o", capsize=3, label=names.get(tool, tool))
    ax.set_xlabel("history size, GiB")
    ax.set_ylabel("MB/s (loopback, wall clock)")
    ax.set_title("Throughput vs history size (loopback)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    for end, pts in sorted(rss.items()):
        xs = sorted(pts)
        ax2.plot(xs, [statistics.median(pts[x]) for x in xs], marker="o",
                 label=f"ferry {'sender' if end == 'send' else 'receiver'}")
    ax2.set_xlabel("history size, GiB")
    ax2.set_ylabel("peak RSS, MiB")
    ax2.set_title("ferry peak memory vs history size")
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rate-vs-size.png"), dpi=110)
    print("bench-plot: wrote rate-vs-size.png")


def main():
    ensure_matplotlib()
    args = sys.argv[1:]
    since = ""
    if len(args) >= 2 and args[0] == "--since":
        since, args = args[1], args[2:]
    results = args[0] if args else os.path.join(REPO, "bench-results")
    out = os.path.join(results, "plots")
    os.makedirs(out, exist_ok=True)
    rows = load(results, since)
    plot_link(rows, out)
    plot_sizes(rows, out)


if __name__ == "__main__":
    main()
