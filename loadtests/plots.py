"""The comparison report's figures: tokens/s against concurrency, and the TTFT and ITL distributions (empirical
CDFs) of every server at a few concurrency levels. Needs matplotlib (`pip install -e .[bench]`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a benchmark machine

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from loadtests.comparison import Measured, levels


def throughput(measured: list[Measured], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in measured:
        points = [(int(r.label[2:]), r.tokens_per_s) for r in m.reports if r.label.startswith("c=")]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", linewidth=2.5 if m.peer == "tokenmill" else 1.2, label=m.name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels(measured), [str(c) for c in levels(measured)])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def distribution(measured: list[Measured], what: str, path: Path, shown: tuple[int, ...] = (1, 8, 32)) -> None:
    """Empirical CDFs of `what` ("ttfts" or "itls", seconds) per server, one panel per concurrency level."""
    found = [c for c in shown if c in levels(measured)] or levels(measured)[-1:]
    if not found:
        return
    fig, axes = plt.subplots(1, len(found), figsize=(5 * len(found), 4), squeeze=False)
    for ax, c in zip(axes[0], found, strict=True):
        for m in measured:
            report = m.at(c)
            values = sorted(getattr(report, what)) if report else []
            if values:
                xs = [values[0] * 1000] + [v * 1000 for v in values]
                ys = [0.0] + [(i + 1) / len(values) for i in range(len(values))]
                ax.step(xs, ys, where="post", label=m.name)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{'TTFT' if what == 'ttfts' else 'inter-token latency'} (ms, log)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"c={c}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(measured: list[Measured], directory: Path) -> list[Path]:
    paths = [directory / "report_throughput.png", directory / "report_ttft.png", directory / "report_itl.png"]
    throughput(measured, paths[0])
    distribution(measured, "ttfts", paths[1])
    distribution(measured, "itls", paths[2])
    return [p for p in paths if p.exists()]
