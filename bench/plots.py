"""bench/README.md's side-by-side figures as PNGs, from the results files the benchmarks write.

The numbers live once, in bench/results/<section>.json: the bench tests call record() with what they
measured, and render() draws every figure of every results file into bench/img/<figure>.png, which
bench/README.md embeds beside its tables. `./run bench` calls render() after the benchmarks;
`python bench/plots.py` redraws from the committed results alone.

A results file:
    {"section": "dns",
     "figures": {"<figure>": {"title": str, "kind": "line" | "bar", "x_label": str, "y_label": str,
                              "log_x": bool, "log_y": bool,
                              "series": {"<name>": {"measured": str, "points": {"<x>": value}}}}}}
A value is a number, or a list of repeated measurements drawn as their median with a min-max bar (a
README's "median (min-max)" is stored as [min, median, max], which draws the same). For "line" the
x keys are numbers (Services); for "bar" they are categories, in insertion order.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
IMG = BENCH / "img"

Value = float | list[float]


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return {"section": path.stem, "figures": {}}


def _write(path: Path, data: dict[str, Any]) -> None:
    # Atomic: a bench killed mid-write must not leave a results file the next render cannot read.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def record(section: str, figure: str, series: str, points: dict[str, Value], measured: str,
           *, results: Path = RESULTS, **layout: Any) -> None:
    """Store a bench run's measured points for one series of one figure (other series are kept).

    `layout` (title, kind, x_label, y_label, log_x, log_y) is only needed when the figure is new.
    Points at x values this run did not measure are kept: a run of one size updates only that size.
    """
    path = results / f"{section}.json"
    data = _load(path)
    fig = data["figures"].setdefault(figure, {"kind": "line", "log_x": False, "log_y": False, "series": {}})
    fig.update(layout)
    entry = fig["series"].setdefault(series, {"measured": measured, "points": {}})
    entry["points"].update(points)
    entry["measured"] = measured
    _write(path, data)


def stamp(bench: str) -> str:
    """Which run a figure is from: the bench file, UTC time, the commit measured and the machine's load."""
    commit = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "?"
    return (f"{bench} {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit}, "
            f"load {os.getloadavg()[0]:.1f}")


def _mid_range(v: Value) -> tuple[float, float, float]:
    if isinstance(v, list):
        return float(min(v)), float(statistics.median(v)), float(max(v))
    return float(v), float(v), float(v)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def render_figure(name: str, fig: dict[str, Any], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # no display on CI or a node
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, Any]] = fig["series"]
    f, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    if fig["kind"] == "bar":
        cats: list[str] = []
        for s in series.values():
            cats += [c for c in s["points"] if c not in cats]
        width = 0.8 / max(len(series), 1)
        for i, (label, s) in enumerate(series.items()):
            xs, mids, lo, hi = [], [], [], []
            for j, c in enumerate(cats):
                if c in s["points"]:
                    a, m, b = _mid_range(s["points"][c])
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    mids.append(m)
                    lo.append(m - a)
                    hi.append(b - m)
            bars = ax.bar(xs, mids, width, label=label, yerr=[lo, hi] if any(lo + hi) else None, capsize=3)
            ax.bar_label(bars, labels=[_fmt(m) for m in mids], fontsize=7, padding=2)
        ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right", fontsize=8)
    else:
        markers = "osD^vP*X"
        for i, (label, s) in enumerate(series.items()):
            pts = sorted((float(x), _mid_range(v)) for x, v in s["points"].items())
            xs = [p[0] for p in pts]
            mids = [p[1][1] for p in pts]
            err = [[p[1][1] - p[1][0] for p in pts], [p[1][2] - p[1][1] for p in pts]]
            ls = "--" if label.startswith(("Go", "floor", "bare")) else "-"
            ax.errorbar(xs, mids, yerr=err if any(err[0] + err[1]) else None, marker=markers[i % len(markers)],
                        linestyle=ls, capsize=3, label=label)
        ax.set_xlabel(fig.get("x_label", ""))
        if fig.get("log_x"):
            ax.set_xscale("log")
            xs_all = sorted({float(x) for s in series.values() for x in s["points"]})
            ax.set_xticks(xs_all, [f"{x:,.0f}" for x in xs_all])
            ax.minorticks_off()
    if fig.get("log_y"):
        from matplotlib.ticker import FuncFormatter, NullFormatter
        ax.set_yscale("log")
        # Plain numbers (300, not 3x10^2); minor ticks get labels only when no decade line is in view.
        plain = FuncFormatter(lambda v, _: f"{v:,.6g}")
        ax.yaxis.set_major_formatter(plain)
        lo, hi = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else NullFormatter())
    ax.set_ylabel(fig.get("y_label", ""))
    ax.set_title(fig.get("title", name), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    dates = sorted({s["measured"] for s in series.values()})
    f.text(0.01, 0.01, "measured: " + "; ".join(dates), fontsize=6, color="0.35", wrap=True)
    f.tight_layout(rect=(0, 0.04, 1, 1))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    f.savefig(path)
    plt.close(f)
    return path


def render(results: Path = RESULTS, out: Path = IMG) -> list[Path]:
    """Draw every figure of every results file; returns the PNGs written."""
    written = []
    for path in sorted(results.glob("*.json")):
        for name, fig in _load(path)["figures"].items():
            written.append(render_figure(name, fig, out))
    return written


if __name__ == "__main__":
    for p in render():
        print(p.relative_to(BENCH.parent))
    sys.exit(0)
