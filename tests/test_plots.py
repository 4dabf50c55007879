"""bench/plots.py draws from the committed results, and from results with fields it has never seen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import plots

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_every_plot_is_drawn_from_the_committed_results(tmp_path: Path) -> None:
    assert plots.main(["--out", str(tmp_path)]) == 0
    committed = [png for png, (source, _) in plots.FIGURES.items() if (RESULTS / source).is_file()]
    assert "bench-continual.png" in committed
    for name in committed:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_added_keys_are_ignored_and_a_missing_file_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    continual = json.loads((RESULTS / "continual.json").read_text())
    continual["meta"]["seeds"] = [0, 1]
    first_seed = next(iter(continual["default"]["per_seed"].values()))
    first_seed[0]["lost_facts"] = [{"fact": "x", "overwritten_by": "y"}]
    first_seed[0]["regression_em"] = 0.9
    continual["summary_by_seed"] = {"0": {"general_kept": 0.86}}  # no per-seed rounds: not a strategy
    (results / "continual.json").write_text(json.dumps(continual))
    shutil.copy(RESULTS / "train_speed.json", results / "train_speed.json")
    out = tmp_path / "img"
    assert plots.main(["--results", str(results), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench-continual.png", "bench-train-speed.png"]
    assert "skipped bench-serve.png" in capsys.readouterr().err
