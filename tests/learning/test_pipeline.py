from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from learning import ewc, lora, pipeline
from learning.config import AdapterSettings, GateThresholds, TrainSettings
from learning.formatting import encode_prompt
from learning.greedy_check import Ask, ask
from learning.metrics import base_only, routed_ask
from learning.pipeline import (
    FISHER_FILE,
    PRIOR_FILE,
    REPORT_FILE,
    EvalReport,
    evaluate_candidate,
    load_bundle,
    release,
    run_training,
    save_version,
)
from learning.scope import SCOPE_FILE, Scope, ScopeError, read_scope
from tests.learning.conftest import facts

# The continued adapter with EWC (the earlier default): the grown, projected one has its own test below.
SETTINGS = TrainSettings(
    adapter=AdapterSettings(rank=8, alpha=16, target_modules="all-linear"),
    adapter_mode="continue",
    nullspace=None,
    learning_rate=1e-2,
    max_epochs=30,
    batch_size=4,
    warmup_steps=1,
    replay_ratio=1.0,
    anchor_ratio=0.5,
    kl_weight=0.5,
    ewc_lambda=0.1,
    neighbour_anchors=False,  # on random bytes they slow convergence; tests/learning/test_neighbours.py has them
)
SCHEMA = {"type": "object", "required": ["answer"]}


def test_two_versions_end_to_end(tiny_model_dir: Path, tiny_bundle_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    models, cache = tiny_bundle_dirs
    bundle = load_bundle(str(tiny_model_dir), models, cache, num_threads=1, device="cpu")
    round1, round2 = facts(4, prefix="a"), facts(4, prefix="b")

    first = run_training(bundle, round1, [], SETTINGS)
    assert first.outcome.stopped == "converged" and first.fisher is not None
    report = evaluate_candidate(bundle, first, round1, [], GateThresholds())
    m = report.metrics
    assert m.acquisition_em == 1.0 and m.retention_kept is None and m.earlier_known == 0 and m.ppl_ratio is not None
    assert m.anchor_agreement is not None and m.probes_checked == sum(bundle.baseline.probe_correct)
    assert {"retention", "schema"} <= set(report.gates.skipped)
    v1 = save_version(first, report, tmp_path / "v1")
    files = {"adapter_config.json", lora.ADAPTER_FILE, FISHER_FILE, REPORT_FILE, SCOPE_FILE}
    assert {p.name for p in v1.iterdir()} == files
    saved, made = read_scope(v1), Scope.of([e.prompt for e in round1], SETTINGS.scope_threshold)
    assert saved is not None and first.scope is not None
    assert saved.model_dump() == first.scope.model_dump() == made.model_dump()
    assert m.routing is not None and (m.routing.new_out, m.routing.paraphrases_out) == (0, 0)
    assert EvalReport.model_validate_json((v1 / REPORT_FILE).read_text()).outcome == first.outcome
    release(bundle, first)

    # Round 2 continues from v1 (its adapter and its Fisher for EWC); round 1 is what it must keep.
    pool = [e.model_copy(update={"loss": first.outcome.example_losses[e.id]}) for e in round1]
    second = run_training(bundle, round2, pool, SETTINGS, previous_version=v1)
    assert second.fisher is not None
    assert all(second.prior.right[e.id] for e in round1)  # v1 answered every round-1 fact
    previous_fisher = ewc.load_fisher(v1 / FISHER_FILE)
    assert all(bool((second.fisher[k] >= previous_fisher[k]).all()) for k in previous_fisher)

    report2 = evaluate_candidate(bundle, second, round2, pool, GateThresholds(), output_schema=SCHEMA)
    m2 = report2.metrics
    assert m2.acquisition_em == 1.0 and m2.earlier_known == 4 and m2.retention_kept is not None
    assert m2.earlier_lost == round(4 * (1 - m2.retention_kept)) == len([x for x in m2.lost if x.group == "earlier"])
    earlier_scores = [s for s in m2.items if s.group == "earlier"]
    assert len(earlier_scores) == 4 and all(s.before for s in earlier_scores)
    assert {s.id for s in earlier_scores if s.replayed} == set(second.outcome.replayed)
    assert m2.schema_compliance == 0.0
    assert "schema" in report2.gates.failing and not report2.gates.passed
    schema_gate = next(g for g in report2.gates.gates if g.name == "schema")
    assert schema_gate.value == 0.0 and schema_gate.margin == -1.0
    v2 = save_version(second, report2, tmp_path / "v2")
    assert json.loads((v2 / REPORT_FILE).read_text())["gates"]["passed"] is False


def test_the_evaluation_answers_as_the_host_serves(tiny_model_dir: Path, tiny_bundle_dirs: tuple[Path, Path]) -> None:
    models, cache = tiny_bundle_dirs
    bundle = load_bundle(str(tiny_model_dir), models, cache, num_threads=1, device="cpu")
    round1 = facts(4, prefix="a")
    first = run_training(bundle, round1, [], SETTINGS)
    texts = [round1[0].prompt, "Tell me something."]
    asks = [Ask(prompt=encode_prompt(bundle.tokenizer, t), budget=12) for t in texts]
    adapted = ask(first.model, bundle.tokenizer, asks)
    with base_only(first.model):
        base = ask(first.model, bundle.tokenizer, asks)
    served, inside = routed_ask(first.model, bundle.tokenizer, asks, texts, first.scope)
    assert inside == [True, False]
    assert adapted[1] != base[1]  # the adapter would change the answer to a prompt it was not taught...
    assert served == [adapted[0], base[1]]  # ...but the base answers it
    unscoped, _ = routed_ask(first.model, bundle.tokenizer, asks, texts, None)
    assert unscoped == adapted
    release(bundle, first)

    every = SETTINGS.model_copy(update={"serve_scope": "all"})
    assert run_training(bundle, round1, [], every).scope is None


def test_an_unreadable_scope_of_the_replaced_version_stops_the_run_before_it_touches_anything(
    tiny_model_dir: Path, tiny_bundle_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    models, cache = tiny_bundle_dirs
    bundle = load_bundle(str(tiny_model_dir), models, cache, num_threads=1, device="cpu")
    s = SETTINGS.model_copy(update={"max_epochs": 2, "ewc_lambda": 0.0})
    first = run_training(bundle, facts(4, prefix="a"), [], s)
    v1 = save_version(first, None, tmp_path / "v1")
    release(bundle, first)
    (v1 / SCOPE_FILE).write_text("{not json")
    before = {p.name: p.read_bytes() for p in v1.iterdir()}
    with pytest.raises(ScopeError, match=rf"{v1 / SCOPE_FILE} is unreadable .*roll the kernel back"):
        run_training(bundle, facts(4, prefix="b"), facts(4, prefix="a"), s, previous_version=v1)
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == before
    # No adapter layers were injected: the bundle is still the bare base, ready for another run.
    assert not any("lora_" in name for name, _ in bundle.model.named_modules())


def test_a_grown_adapter_keeps_earlier_rows_frozen(
    tiny_model_dir: Path, tiny_bundle_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    models, cache = tiny_bundle_dirs
    bundle = load_bundle(str(tiny_model_dir), models, cache, num_threads=1, device="cpu")
    s = SETTINGS.model_copy(update={"adapter_mode": "grow", "grow_rank": 4, "ewc_lambda": 0.0, "max_epochs": 5})
    first = run_training(bundle, facts(4, prefix="a"), [], s)
    v1 = save_version(first, None, tmp_path / "v1")
    release(bundle, first)
    assert LoraConfig.from_pretrained(str(v1)).r == 4

    second = run_training(bundle, facts(4, prefix="b"), facts(4, prefix="a"), s, previous_version=v1)
    v2 = save_version(second, None, tmp_path / "v2")
    release(bundle, second)
    cfg1, cfg2 = LoraConfig.from_pretrained(str(v1)), LoraConfig.from_pretrained(str(v2))
    assert cfg2.r == 8 and cfg2.lora_alpha / cfg2.r == cfg1.lora_alpha / cfg1.r
    old, new = load_file(str(v1 / lora.ADAPTER_FILE)), load_file(str(v2 / lora.ADAPTER_FILE))
    for key, value in old.items():
        part = new[key][:4] if ".lora_A." in key else new[key][:, :4]
        assert torch.equal(part, value), key  # what v1 learnt is carried bit for bit
    assert any(not torch.equal(new[k][4:], torch.zeros_like(new[k][4:])) for k in new if ".lora_A." in k)


def test_the_replaced_versions_answers_are_kept_for_a_resumed_run(
    tiny_model_dir: Path, tiny_bundle_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models, cache = tiny_bundle_dirs
    bundle = load_bundle(str(tiny_model_dir), models, cache, num_threads=1, device="cpu")
    s = SETTINGS.model_copy(update={"max_epochs": 1})
    first = run_training(bundle, facts(2, prefix="b"), facts(2, prefix="a"), s, checkpoint_dir=tmp_path)
    release(bundle, first)
    assert (tmp_path / PRIOR_FILE).is_file()

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the prior was computed again: a resumed run would judge against a moved model")

    monkeypatch.setattr(pipeline, "assess_prior", boom)
    again = run_training(bundle, facts(2, prefix="b"), facts(2, prefix="a"), s, checkpoint_dir=tmp_path)
    assert again.prior == first.prior
