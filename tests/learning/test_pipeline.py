from __future__ import annotations

import json
from pathlib import Path

from learning import ewc, lora
from learning.config import AdapterSettings, GateThresholds, TrainSettings
from learning.pipeline import (
    FISHER_FILE,
    REPORT_FILE,
    EvalReport,
    evaluate_candidate,
    load_bundle,
    release,
    run_training,
    save_version,
)
from tests.learning.conftest import facts

SETTINGS = TrainSettings(
    adapter=AdapterSettings(rank=8, alpha=16, target_modules="all-linear"),
    learning_rate=1e-2,
    max_epochs=30,
    batch_size=4,
    warmup_steps=1,
    replay_ratio=1.0,
    anchor_ratio=0.5,
    kl_weight=0.5,
    ewc_lambda=0.1,
)
SCHEMA = {"type": "object", "required": ["answer"]}


def test_two_versions_end_to_end(tiny_model_dir: Path, tiny_bundle_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    models, cache = tiny_bundle_dirs
    bundle = load_bundle(str(tiny_model_dir), models, cache, num_threads=1, device="cpu")
    round1, round2 = facts(4, prefix="a"), facts(4, prefix="b")

    first = run_training(bundle, round1, [], SETTINGS)
    assert first.outcome.stopped == "converged" and first.fisher is not None
    report = evaluate_candidate(bundle, first.model, round1, [], GateThresholds(), outcome=first.outcome)
    m = report.metrics
    assert m.acquisition_em == 1.0 and m.retention_em is None and m.ppl_ratio is not None
    assert m.anchor_agreement is not None
    # A random base answers no probe correctly, so "kept" is not measurable: skipped, not passed.
    assert m.general_kept is None and m.base_probe_accuracy == 0.0
    assert {"retention", "schema", "general_kept"} <= set(report.gates.skipped)
    v1 = save_version(first, report, tmp_path / "v1")
    assert {p.name for p in v1.iterdir()} == {"adapter_config.json", lora.ADAPTER_FILE, FISHER_FILE, REPORT_FILE}
    assert EvalReport.model_validate_json((v1 / REPORT_FILE).read_text()).outcome == first.outcome
    release(bundle, first)

    # Round 2 continues from v1 (its adapter and its Fisher for EWC), replaying round 1.
    pool = [e.model_copy(update={"loss": first.outcome.example_losses[e.id]}) for e in round1]
    second = run_training(bundle, round2, pool, SETTINGS, previous_version=v1)
    assert second.fisher is not None
    previous_fisher = ewc.load_fisher(v1 / FISHER_FILE)
    assert all(bool((second.fisher[k] >= previous_fisher[k]).all()) for k in previous_fisher)

    report2 = evaluate_candidate(bundle, second.model, round2, round1, GateThresholds(), output_schema=SCHEMA)
    m2 = report2.metrics
    assert m2.acquisition_em == 1.0 and m2.retention_em is not None and m2.retention_em >= 0.75
    assert m2.schema_compliance == 0.0
    assert report2.gates.failing[-1:] == ["schema"] and not report2.gates.passed
    schema_gate = next(g for g in report2.gates.gates if g.name == "schema")
    assert schema_gate.value == 0.0 and schema_gate.margin == -1.0
    v2 = save_version(second, report2, tmp_path / "v2")
    assert json.loads((v2 / REPORT_FILE).read_text())["gates"]["passed"] is False
