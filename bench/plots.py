"""PNG plots of the benchmark results for docs/benchmarks.md (matplotlib).

    .venv/bin/python -m bench.plots            # bench/results/*.json -> docs/img/bench-*.png

Reads what `bench.continual`, `bench.train_speed` and `bench.serve` wrote; keys it does not know are ignored
and a missing file or figure is skipped with a note, so new result fields never break the plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "img"
COLORS = ["#868e96", "#f59f00", "#e8590c", "#7048e8", "#1c7ed6", "#2b8a3e", "#c2255c", "#0b7285"]


def _strategies(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each strategy's rounds, each round's figures the mean over seeds (`meta` and entries without seeds skipped)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, entry in data.items():
        seeds = entry.get("per_seed") if isinstance(entry, dict) else None
        if not isinstance(seeds, dict) or not seeds:
            continue
        runs = [rows for rows in seeds.values() if isinstance(rows, list) and rows]
        if runs:
            out[name] = [_round_mean([r[i] for r in runs if i < len(r)]) for i in range(max(map(len, runs)))]
    return out


def _round_mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = {k for row in rows for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {k: _mean([float(row[k]) for row in rows if isinstance(row.get(k), int | float)]) for k in keys}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _series(rounds: list[dict[str, Any]], key: str) -> list[float | None]:
    return [float(r[key]) if isinstance(r.get(key), int | float) else None for r in rounds]


def _line(ax: Axes, values: list[float | None], label: str, color: str, bold: bool) -> None:
    points = [(i + 1, v) for i, v in enumerate(values) if v is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=label, color=color, linewidth=2.6 if bold else 1.4)


def continual(data: dict[str, Any]) -> Figure:
    strategies = _strategies(data)
    if not strategies:
        raise KeyError("no strategy with per-round results")
    panels: list[tuple[str, str, Callable[[list[dict[str, Any]]], list[float | None]], tuple[float, float] | None]] = [
        ("The round's facts learnt", "exact match", lambda r: _series(r, "acquisition_em"), (0, 1.05)),
        ("Earlier facts kept that were not replayed", "share", lambda r: _series(r, "held_back_kept"), (0, 1.05)),
        ("General probes kept", "share of probes the base got right", lambda r: _series(r, "general_kept"), (0, 1.05)),
        ("Perplexity on the reference text", "after / before", lambda r: _series(r, "ppl_ratio"), None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (title, ylabel, fn, ylim) in zip(axes.flat, panels, strict=True):
        for i, (name, rounds) in enumerate(strategies.items()):
            _line(ax, fn(rounds), name, COLORS[i % len(COLORS)], name == "default")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(1, max(len(r) for r in strategies.values()) + 1))
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes.flat[3].axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    meta = data.get("meta", {})
    fig.suptitle(f"Continual learning on {meta.get('model', 'the model')} (mean over seeds)")
    return fig


def train_speed(data: dict[str, Any]) -> Figure:
    ours, trl = float(data["ours_tokens_per_s"]), float(data["trl_tokens_per_s"])
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    bars = ax.barh(["TRL SFTTrainer", "engrain"], [trl, ours], color=["#868e96", "#2b8a3e"])
    ax.bar_label(bars, labels=[f"{trl:.0f} tok/s", f"{ours:.0f} tok/s ({ours / trl:.2f}x)"], padding=4)
    peak = data.get("peak_tokens_per_s")
    if isinstance(peak, int | float):
        ax.axvline(peak, color="#c92a2a", linestyle="--", linewidth=1.2, label=f"measured fp32 peak, {peak:.0f} tok/s")
        ax.legend(loc="lower right", fontsize=9)
    ax.set_xlim(0, max(ours, trl, float(peak or 0)) * 1.25)
    ax.set_xlabel("training tokens per second (LoRA, same data and settings)")
    ax.set_title(f"Training speed on {data.get('threads', '?')} CPU threads")
    ax.grid(axis="x", alpha=0.3)
    return fig


def serve(data: dict[str, Any]) -> Figure:
    single, conc, deploy = data["single_request"], data["concurrent_8"], data["deploy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    labels = [
        "generate\n(base)",
        "host\n(base)",
        "PeftModel\n(adapter)",
        "host\n(adapter)",
        "one at\na time",
        "8 at\nonce",
    ]
    values = [
        single["base"]["plain_tok_s"],
        single["base"]["host_tok_s"],
        single["adapter"]["plain_tok_s"],
        single["adapter"]["host_tok_s"],
        conc["single_tok_s"],
        conc["concurrent_8_tok_s"],
    ]
    colors = ["#868e96", "#1c7ed6"] * 2 + ["#868e96", "#1c7ed6"]
    bars = left.bar(labels, values, color=colors)
    left.bar_label(bars, fmt="%.1f", padding=2, fontsize=9)
    left.set_ylabel("generated tokens per second")
    left.set_title("Serving throughput (grey: baseline in the same run)")
    left.grid(axis="y", alpha=0.3)
    times = {"full reload": deploy["full_reload_s"] * 1000, "hot swap": deploy["swap_s"] * 1000}
    switch = data.get("switch", {}).get("ms_per_switch")
    if isinstance(switch, int | float):
        times["kernel switch"] = switch
    bars = right.barh(list(times), list(times.values()), color=["#868e96", "#1c7ed6", "#1c7ed6"][: len(times)])
    right.bar_label(bars, fmt="%.1f ms", padding=3, fontsize=9)
    right.set_xscale("log")
    right.set_xlabel("milliseconds (log scale)")
    right.set_title("Deploying a new version into the running host")
    right.grid(axis="x", alpha=0.3)
    return fig


FIGURES: dict[str, tuple[str, Callable[[dict[str, Any]], Figure]]] = {
    "bench-continual.png": ("continual.json", continual),
    "bench-train-speed.png": ("train_speed.json", train_speed),
    "bench-serve.png": ("serve.json", serve),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark JSON files")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNG files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for png, (source, draw) in FIGURES.items():
        path = args.results / source
        try:
            figure = draw(json.loads(path.read_text()))
        except FileNotFoundError:
            print(f"skipped {png}: {path} does not exist", file=sys.stderr)
            continue
        except (KeyError, TypeError, ValueError) as exc:
            print(f"skipped {png}: {path} lacks what it needs ({exc!r})", file=sys.stderr)
            continue
        figure.savefig(args.out / png, dpi=110, metadata={"Software": None})
        plt.close(figure)
        print(args.out / png)
        written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
