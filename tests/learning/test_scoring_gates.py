from __future__ import annotations

import pytest

from learning.config import GateThresholds
from learning.gates import apply_gates
from learning.metrics import schema_ok
from learning.reports import LostItem, Metrics, NewFact
from learning.scoring import contains, contains_any, normalise, token_f1


def test_normalise_and_contains() -> None:
    assert normalise("The capital is PARIS!") == ["the", "capital", "is", "paris"]
    assert contains("The capital of France is Paris.", "paris")
    assert contains("It was Odalys  Brenk, surely", "Odalys Brenk")
    assert not contains("Parisian food", "Paris")  # whole words only
    assert not contains("anything", "")
    assert contains_any("It has 6 legs", ["six", "6"])


def test_token_f1() -> None:
    assert token_f1("the sand lynx", "the sand lynx") == 1.0
    assert token_f1("sand lynx", "the sand lynx") == pytest.approx(0.8)
    assert token_f1("no", "yes") == 0.0
    assert token_f1("", "") == 1.0


def full_metrics(**overrides: float | int | None) -> Metrics:
    values: dict[str, float | int | None] = dict(
        acquisition_em=1.0,
        paraphrase_em=0.7,
        retention_kept=0.96,
        must_keep_lost=0,
        anchor_agreement=0.8,
        general_kept=1.0,
        ppl_ratio=1.05,
        schema_compliance=None,
    )
    values.update(overrides)
    return Metrics(**values)


def test_all_gates_pass_with_margins() -> None:
    report = apply_gates(full_metrics(), GateThresholds(min_paraphrase_em=0.5, max_ppl_ratio=1.25))
    assert report.passed and report.failing == []
    ppl = next(g for g in report.gates if g.name == "perplexity")
    assert ppl.comparison == "<=" and ppl.margin == pytest.approx(1.25 - 1.05)
    assert report.skipped == ["schema"]
    assert "schema" in report.summary()


def test_impossible_thresholds_fail_and_say_by_how_much() -> None:
    t = GateThresholds(min_acquisition_em=1.0, max_ppl_ratio=1.0, min_general_kept=1.0)
    report = apply_gates(full_metrics(acquisition_em=0.9, ppl_ratio=1.2), t)
    assert not report.passed
    assert report.failing == ["acquisition", "perplexity"]
    acq = next(g for g in report.gates if g.name == "acquisition")
    assert acq.passed is False and acq.margin == pytest.approx(-0.1)
    assert "acquisition 0.900 >= 1.000 missed by 0.100" in report.summary()


def test_unmeasurable_gate_is_skipped_not_passed() -> None:
    report = apply_gates(full_metrics(retention_kept=None), GateThresholds())
    retention = next(g for g in report.gates if g.name == "retention")
    assert retention.status == "skipped" and retention.passed is None
    assert "retention" in report.skipped and report.passed
    paraphrase = next(g for g in report.gates if g.name == "paraphrase")
    assert paraphrase.status == "skipped" and paraphrase.reason == "no threshold set"


def test_schema_gate() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert schema_ok('{"ok": true}', schema)
    assert not schema_ok('{"ok": "yes"}', schema)
    assert not schema_ok("not json", schema)
    report = apply_gates(full_metrics(schema_compliance=0.5), GateThresholds())
    assert report.failing == ["schema"]


def test_retention_and_must_keep_gates_name_what_was_lost_and_what_overwrote_it() -> None:
    overwrote = NewFact(id="12", prompt="What is the capital of Lusmere?", key_answer="Darnhollow")
    metrics = full_metrics(retention_kept=0.5, must_keep_lost=1)
    metrics.lost = [
        LostItem(
            id="3",
            group="earlier",
            prompt="What is the capital of Orvania?",
            expected="Keltrosa",
            answer="The capital of Orvania is Darnhollow.",
            overwritten_by=overwrote,
        ),
        LostItem(
            id="canary:0", group="must_keep", prompt="What is the capital of France?", expected="Paris", answer="Lyon"
        ),
    ]
    report = apply_gates(metrics, GateThresholds())
    assert report.failing == ["retention", "must_keep"]
    summary = report.summary()
    assert "What is the capital of Orvania?" in summary and "Darnhollow" in summary
    assert "overwritten by 'What is the capital of Lusmere?'" in summary
    assert "What is the capital of France?" in summary
    must_keep = next(g for g in report.gates if g.name == "must_keep")
    assert must_keep.value == 1.0 and must_keep.threshold == 0.0 and must_keep.comparison == "<="


def test_the_must_keep_gate_can_be_switched_off() -> None:
    report = apply_gates(full_metrics(must_keep_lost=2), GateThresholds(max_must_keep_lost=None))
    assert "must_keep" in report.skipped and report.passed
