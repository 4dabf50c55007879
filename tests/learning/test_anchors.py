from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from learning import anchors
from learning.model_loading import load_base


def test_packaged_data_is_diverse_and_split() -> None:
    train, evals = anchors.anchor_prompts()
    assert len(train) >= 40 and len(evals) >= 20
    assert not set(train) & set(evals)
    probes = anchors.probes()
    assert len(probes) >= 150 and all(p.answers for p in probes)
    assert not {p.prompt for p in probes} & set(train)
    canaries = anchors.canaries()
    assert 8 <= len(canaries) <= 20 and not {c.prompt for c in canaries} & ({p.prompt for p in probes} | set(train))
    assert len(anchors.reference_text().split()) >= 700


def test_baseline_is_computed_once_and_cached(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerFast
) -> None:
    model, tok = load_base(tiny_model_dir)
    first = anchors.ensure_baseline(model, tok, tiny_model_dir, tmp_path)
    path = anchors.baseline_path(tmp_path, tiny_model_dir)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]
    train, evals = anchors.anchor_prompts()
    assert [a.prompt for a in first.train_anchors] == train and len(first.eval_anchors) == len(evals)
    assert len(first.probe_correct) == len(anchors.probes()) and first.reference_ppl > 1
    assert len(first.canaries) == len(anchors.canaries())
    # A right answer keeps its token path up to the accepted answer; a wrong one has none.
    assert all(bool(p.path) == p.correct for p in first.probes)
    assert all(a.ids for a in first.eval_anchors)

    def boom(*args: object) -> anchors.Baseline:
        raise AssertionError("recomputed a cached baseline")

    monkeypatch.setattr(anchors, "compute_baseline", boom)
    assert anchors.ensure_baseline(model, tok, tiny_model_dir, tmp_path) == first


def test_an_unreadable_cache_is_recomputed(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_base(tiny_model_dir)
    path = anchors.baseline_path(tmp_path, tiny_model_dir)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    baseline = anchors.ensure_baseline(model, tok, tiny_model_dir, tmp_path)
    assert anchors.Baseline.model_validate_json(path.read_text()) == baseline


def test_train_anchors_carry_the_base_answers() -> None:
    baseline = anchors.Baseline(
        fingerprint="x",
        train_anchors=[
            anchors.AnchorAnswer(prompt="a", answer="A.", finished=True),
            anchors.AnchorAnswer(prompt="b", answer="", finished=False),
            anchors.AnchorAnswer(prompt="c", answer="C is long", finished=False),
        ],
        eval_anchors=[],
        probes=[],
        canaries=[],
        reference_ppl=10.0,
        seconds=0.0,
    )
    items = anchors.train_anchors(baseline)
    assert [(a.example.prompt, a.example.response, a.finished) for a in items] == [
        ("a", "A.", True),
        ("c", "C is long", False),
    ]
