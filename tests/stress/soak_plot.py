"""Plot a soak run's samples (the JSON written via SHMCAST_SOAK_OUT) into a PNG.

    python tests/stress/soak_plot.py soak.json docs/reliability-soak.png

Needs matplotlib (``pip install matplotlib``); not part of the test suite.
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as f:
        report = json.load(f)
    samples = report["samples"]
    t = [s["t"] / 60 for s in samples]
    panels = [
        ("publisher RSS (MiB)", [s["rss_kb"] / 1024 for s in samples],
         report["baseline"]["rss_kb"] / 1024),
        ("publisher open fds", [s["fds"] for s in samples], report["baseline"]["fds"]),
        ("publisher mappings (/proc/PID/maps lines)", [s["maps"] for s in samples],
         report["baseline"]["maps"]),
        ("/dev/shm entries of the bus", [s["shm_entries"] for s in samples],
         report["baseline"]["shm_entries"]),
        ("live subscribers", [s["subscribers"] for s in samples], None),
        ("publish rate (events/s)", [s["rate"] for s in samples], None),
    ]
    # Two-series panels (newer runs only): (title, {label: values}, log scale).
    pairs = []
    if "worst_publish_cpu_us" in samples[0]:
        pairs.append(("worst publish per sample (µs)",
                      {"wall clock": [s["worst_publish_us"] for s in samples],
                       "CPU of the publishing thread": [s["worst_publish_cpu_us"]
                                                        for s in samples]}, True))
    if "voluntary_cs_delta" in samples[0]:
        pairs.append(("publisher context switches per sample",
                      {"involuntary (preempted)": [s["involuntary_cs_delta"] for s in samples],
                       "voluntary (blocked)": [s["voluntary_cs_delta"] for s in samples]},
                      False))
    if "loadavg_1m" in samples[0]:
        pairs.append(("host load average (1 min)",
                      {"load": [s["loadavg_1m"] for s in samples],
                       "CPUs": [report.get("cpus") or 0] * len(samples)}, False))
    n = len(panels) + len(pairs)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2 * n), sharex=True)
    for ax, (title, series, log) in zip(axes[len(panels):], pairs, strict=True):
        for label, ys in series.items():
            ax.plot(t, ys, marker=".", linewidth=1, label=label)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=max(max(v) for v in series.values()) * 1.25 + 1)
        ax.set_ylabel(title, fontsize=8)
        ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    for ax, (title, ys, base) in zip(axes, panels, strict=False):
        ax.plot(t, ys, marker=".", linewidth=1)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", linewidth=0.8,
                       label="baseline, no subscribers")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_ylabel(title, fontsize=8)
        ax.set_ylim(bottom=0, top=max(*ys, base or 0) * 1.25 + 1)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    started = sum(report["subscribers_started"].values())
    fig.suptitle(f"shmcast soak: {report['seconds']:.0f} s, {report['events']:,} events, "
                 f"{started:,} subscribers started", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
