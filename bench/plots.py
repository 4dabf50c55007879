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
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "img"
# One colour per strategy (the continual plot has up to seventeen), the default's first.
COLORS = [
    "#868e96",
    "#f59f00",
    "#e8590c",
    "#7048e8",
    "#1c7ed6",
    "#2b8a3e",
    "#c2255c",
    "#0b7285",
    "#212529",
    "#66a80f",
    "#ae3ec9",
    "#8d6e63",
    "#d6336c",
    "#1864ab",
    "#0ca678",
    "#e64980",
    "#5c940d",
]


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
    # The held-back panel is empty below its points (round 1 has none): the legend hides no data there.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[1].legend(handles, labels, fontsize=8, loc="lower right", ncol=2)
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
    """Per llama.cpp weight type: single-stream speed, 8 concurrent against 1, greedy agreement with fp32."""
    rows = {k: v for k, v in data["backends"].items() if "agreement" in v}
    kinds = list(rows)
    x = np.arange(len(kinds))
    fig, (speed, batch, agree) = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for offset, label, key, color in (
        (-0.2, "host, kernel with adapter", "decode_tok_s", "#1c7ed6"),
        (0.2, "raw llama.cpp, same weights", "raw_llamacpp_same_weights_tok_s", "#868e96"),
    ):
        bars = speed.bar(x + offset, [rows[k][key] for k in kinds], 0.4, label=label, color=color)
        speed.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    speed.set_xticks(x, kinds)
    speed.set_ylabel("generated tokens per second")
    speed.set_title("Single stream, 64 greedy tokens")
    speed.legend(fontsize=8, loc="lower left")
    for offset, label, source, color in (
        (-0.2, "host: 8 at once / one at a time", None, "#1c7ed6"),
        (0.2, "raw llama.cpp: one batch / one at a time", "raw_llamacpp", "#868e96"),
    ):
        ratios = [
            (rows[k]["concurrency"] if source is None else rows[k]["concurrency"].get(source, {})).get("ratio", 0.0)
            for k in kinds
        ]
        bars = batch.bar(x + offset, ratios, 0.4, label=label, color=color)
        batch.bar_label(bars, fmt="%.2fx", padding=2, fontsize=8)
    batch.axhline(3.5, color="#c92a2a", linestyle="--", linewidth=1, label="target 3.5x")
    batch.set_xticks(x, kinds)
    batch.set_ylim(0, 5)
    batch.set_ylabel("total tokens/s, 8 concurrent ÷ 8 in turn")
    batch.set_title("8 concurrent requests")
    batch.legend(fontsize=8, loc="upper left")
    shares = [100 * rows[k]["agreement"]["identical"] for k in kinds]
    bars = agree.bar(x, shares, 0.5, color="#1c7ed6")
    agree.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
    agree.axhline(98, color="#c92a2a", linestyle="--", linewidth=1, label="target 98%")
    agree.set_xticks(x, kinds)
    agree.set_ylim(0, 105)
    agree.set_ylabel("greedy answers identical to fp32 (%)")
    agree.set_title("Agreement with the model the gates judged")
    agree.legend(fontsize=8, loc="lower right")
    for axis in (speed, batch, agree):
        axis.grid(axis="y", alpha=0.3)
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
