#!/usr/bin/env python3
"""The soak's curves as PNG plots: one figure per measure (resident memory, open descriptors,
live Tokio tasks, Redis keys, Postgres connections), one line per process, from a chaos run's
report.json. Usage: plot.py RUN_DIR (writes RUN_DIR/soak-<measure>.png and prints their paths)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEASURES = {
    "rss_kb": ("resident memory (MB)", 1 / 1024),
    "fds": ("open file descriptors", 1),
    "alive_tasks": ("live Tokio tasks", 1),
    "keys": ("Redis keys", 1),
    "keys_without_ttl": ("Redis keys without an expiry", 1),
    "connections": ("Postgres connections", 1),
}


def plot(run_dir: Path) -> list[Path]:
    report = json.loads((run_dir / "report.json").read_text())
    written = []
    for window in report.get("faults", []):
        samples = window.get("samples")
        if not samples:
            continue
        t0 = samples[0]["t"]
        curves: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        for row in samples:
            for key, value in row.items():
                if key == "t":
                    continue
                process, _, measure = key.rpartition(".")
                if measure in MEASURES:
                    curves[measure][process].append(((row["t"] - t0) / 60, value * MEASURES[measure][1]))
        leaking = set(window.get("leaks", {}).get("leaking", []))
        for measure, by_process in curves.items():
            fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
            for process, points in sorted(by_process.items()):
                style = "-" if f"{process}.{measure}" not in leaking else "--"
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=process, linewidth=1.4)
            ax.set_xlabel("minutes of steady load")
            ax.set_ylabel(MEASURES[measure][0])
            ax.set_title(f"soak round {window.get('round')}: {MEASURES[measure][0]}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=3, loc="lower right")
            fig.tight_layout()
            path = run_dir / f"soak-{window.get('round')}-{measure}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for path in plot(Path(sys.argv[1])):
        print(path)
