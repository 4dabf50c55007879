from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from learning import checkpoint, lora
from learning.anchors import Anchor
from learning.config import AdapterSettings, TrainSettings
from learning.examples import Example
from learning.reports import Progress
from learning.train import EwcTerm, _Run, train
from tests.learning.conftest import facts, make_model

ADAPTER = AdapterSettings(rank=8, alpha=16)


def settings(**overrides: object) -> TrainSettings:
    base: dict[str, object] = dict(
        adapter=ADAPTER,
        learning_rate=1e-2,
        max_epochs=40,
        batch_size=4,
        warmup_steps=1,
        replay_ratio=0.5,
        anchor_ratio=0.5,
        checkpoint_every=1000,
        neighbour_anchors=False,
    )
    base.update(overrides)
    return TrainSettings.model_validate(base)


def anchors(n: int = 4) -> list[Anchor]:
    return [
        Anchor(
            example=Example(id=f"anchor:{i}", prompt=f"General {i}", response=f"Answer number {i}"), finished=i % 2 == 0
        )
        for i in range(n)
    ]


def fresh(tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    return lora.attach_new(make_model(tokenizer), ADAPTER, seed=seed)


def test_learns_new_items_and_stops_early(tokenizer: PreTrainedTokenizerFast) -> None:
    model = fresh(tokenizer)
    pool = facts(4, prefix="old")
    out = train(model, tokenizer, facts(4), pool, anchors(), settings())
    assert out.stopped == "converged"
    assert out.new_em == 1.0
    assert out.epochs < 40 and out.steps == out.epochs * 2  # 4 new + 2 replay + 2 anchors = 2 batches of 4
    # Every new and replayed item has a last loss; anchors are not reported.
    assert {"f0", "f1", "f2", "f3"} <= out.example_losses.keys()
    assert not any(k.startswith("anchor") for k in out.example_losses)
    assert out.example_losses.keys() <= {e.id for e in facts(4) + pool}
    assert out.tokens > 0 and out.tokens_per_s > 0


def test_without_early_stopping_it_runs_every_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    out = train(fresh(tokenizer), tokenizer, facts(2), [], [], settings(max_epochs=3, early_stop_em=None))
    assert out.stopped == "max_epochs" and out.epochs == 3 and out.steps == 3


def test_epoch_plan_mixes_new_replay_and_anchors(tokenizer: PreTrainedTokenizerFast) -> None:
    run = _Run(
        fresh(tokenizer),
        tokenizer,
        facts(4),
        facts(6, prefix="old"),
        anchors(5),
        settings(replay_ratio=1.0, anchor_ratio=0.5),
    )
    plan = run.plan_epoch(0)
    keys = [k for b in plan for k in b]
    assert sorted(k for k in keys if k.startswith("new:")) == [f"new:{i}" for i in range(4)]
    assert sum(k.startswith("replay:") for k in keys) == 4
    assert sum(k.startswith("anchor:") for k in keys) == 2
    assert len(set(keys)) == len(keys)
    assert plan == run.plan_epoch(0) and plan != run.plan_epoch(1)


def test_progress_reports_steps_and_eta(tokenizer: PreTrainedTokenizerFast) -> None:
    seen: list[Progress] = []
    out = train(
        fresh(tokenizer), tokenizer, facts(4), [], [], settings(max_epochs=3, early_stop_em=None), progress=seen.append
    )
    steps = [p for p in seen if p.phase == "train"]
    assert [p.step for p in steps] == list(range(1, out.steps + 1))
    assert all(p.total_steps == 3 and p.loss is not None and p.tokens_per_s > 0 for p in steps)
    assert steps[-1].eta_s == 0.0 and steps[0].eta_s > 0
    assert seen[0].phase == "prepare" and seen[-1].phase == "done"
    assert any(p.phase == "check" for p in seen)


def test_should_stop_writes_a_checkpoint_and_returns_interrupted(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    out = train(
        fresh(tokenizer), tokenizer, facts(4), [], anchors(), settings(), checkpoint_dir=tmp_path, should_stop=stop
    )
    assert out.stopped == "interrupted" and out.steps == 3
    assert out.checkpoint is not None
    ckpt = Path(out.checkpoint)
    assert ckpt.parent == tmp_path and (ckpt / checkpoint.ADAPTER).is_file() and (ckpt / checkpoint.STATE).is_file()
    found = checkpoint.load_latest(tmp_path)
    assert found is not None
    state = found[2]
    assert state["loop"]["step"] == 3 and state["loop"]["plan"]
    assert {"python", "numpy", "torch"} <= state["rng"].keys()
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3


def test_only_the_newest_checkpoints_are_kept(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    train(
        fresh(tokenizer),
        tokenizer,
        facts(4),
        [],
        [],
        settings(max_epochs=5, early_stop_em=None, checkpoint_every=1, keep_checkpoints=2),
        checkpoint_dir=tmp_path,
    )
    assert [p.name for p in tmp_path.iterdir()] and sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000004",
        "step-000005",
    ]


@pytest.mark.parametrize("stop_after", [1, 5, 8])
def test_resume_reproduces_the_uninterrupted_adapter(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, stop_after: int
) -> None:
    # Dropout, replay sampling, anchors with KL, and EWC all in play, so every bit of state matters.
    s = (
        settings(
            adapter=AdapterSettings(rank=8, alpha=16, dropout=0.1),
            max_epochs=6,
            early_stop_em=None,
            kl_weight=0.5,
            ewc_lambda=0.1,
            replay_strategy="prioritized",
            checkpoint_every=2,
            adapter_dropout=None,
        )
        if False
        else settings(
            adapter=AdapterSettings(rank=8, alpha=16, dropout=0.1),
            max_epochs=6,
            early_stop_em=None,
            kl_weight=0.5,
            ewc_lambda=0.1,
            replay_strategy="prioritized",
            checkpoint_every=2,
        )
    )
    pool = [e.model_copy(update={"loss": float(i)}) for i, e in enumerate(facts(6, prefix="old"))]

    def ewc_for(model: torch.nn.Module) -> EwcTerm:
        params = lora.trainable_params(model)  # type: ignore[arg-type]
        return EwcTerm(
            anchor={k: p.detach().clone() + 0.01 for k, p in params.items()},
            fisher={k: torch.ones_like(p) for k, p in params.items()},
            weight=s.ewc_lambda,
        )

    full = fresh(tokenizer)
    reference = train(full, tokenizer, facts(4), pool, anchors(), s, ewc_term=ewc_for(full))
    expected = lora.adapter_state(full)

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > stop_after

    first = fresh(tokenizer)
    interrupted = train(
        first,
        tokenizer,
        facts(4),
        pool,
        anchors(),
        s,
        ewc_term=ewc_for(first),
        checkpoint_dir=tmp_path,
        should_stop=stop,
    )
    assert interrupted.stopped == "interrupted" and interrupted.steps == stop_after

    # A new process: a fresh model with the same starting adapter, pointed at the checkpoint directory.
    torch.manual_seed(1234)  # the global RNG state must come from the checkpoint, not from here
    second = fresh(tokenizer)
    resumed = train(second, tokenizer, facts(4), pool, anchors(), s, ewc_term=ewc_for(second), checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == stop_after
    assert resumed.steps == reference.steps and resumed.stopped == reference.stopped
    got = lora.adapter_state(second)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k  # bit-identical
    assert resumed.example_losses == pytest.approx(reference.example_losses, abs=1e-5)


def test_a_checkpoint_from_another_run_is_ignored(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    train(
        fresh(tokenizer),
        tokenizer,
        facts(4),
        [],
        [],
        settings(max_epochs=2, early_stop_em=None, checkpoint_every=1),
        checkpoint_dir=tmp_path,
    )
    out = train(
        fresh(tokenizer),
        tokenizer,
        facts(3),
        [],
        [],
        settings(max_epochs=1, early_stop_em=None),
        checkpoint_dir=tmp_path,
    )
    assert out.resumed_from_step is None and out.steps == 1


def test_ewc_keeps_parameters_near_the_previous_version(tokenizer: PreTrainedTokenizerFast) -> None:
    s = settings(max_epochs=5, early_stop_em=None, replay_ratio=0, anchor_ratio=0)

    def drift(weight: float) -> float:
        model = fresh(tokenizer)
        params = lora.trainable_params(model)
        start = {k: p.detach().clone() for k, p in params.items()}
        term = EwcTerm(anchor=start, fisher={k: torch.ones_like(p) for k, p in params.items()}, weight=weight)
        train(model, tokenizer, facts(4), [], [], s, ewc_term=term)
        return sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in params.items())

    assert drift(1000.0) < 0.2 * drift(0.0)


def test_kl_keeps_anchor_predictions_closer_to_the_base(tokenizer: PreTrainedTokenizerFast) -> None:
    s = settings(max_epochs=8, early_stop_em=None, replay_ratio=0, anchor_ratio=1.0, learning_rate=2e-2)

    def anchor_kl(weight: float) -> float:
        model = fresh(tokenizer)
        run_settings = s.model_copy(update={"kl_weight": weight})
        train(model, tokenizer, facts(4), [], anchors(4), run_settings)
        probe = _Run(model, tokenizer, facts(4), [], anchors(4), run_settings.model_copy(update={"kl_weight": 1.0}))
        keys = [f"anchor:{i}" for i in range(4)]
        batch, items = probe.batch(keys)
        with torch.no_grad():
            model.train(False)
            _, kl = probe.losses(batch, items)
        assert kl is not None
        return float(kl)

    assert anchor_kl(5.0) < 0.5 * anchor_kl(0.0)


def test_refuses_an_empty_run(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="no new examples"):
        train(fresh(tokenizer), tokenizer, [], [], [], settings())


def test_kl_targets_are_cached_on_disk_and_give_the_same_run(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    s = settings(max_epochs=2, early_stop_em=None, kl_weight=1.0, anchor_ratio=1.0)
    first_model = fresh(tokenizer)
    first = train(first_model, tokenizer, facts(4), [], anchors(4), s, kl_cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    second_model = fresh(tokenizer)
    second = train(second_model, tokenizer, facts(4), [], anchors(4), s, kl_cache_dir=tmp_path)
    assert second.final_loss == first.final_loss
    a, b = lora.adapter_state(first_model), lora.adapter_state(second_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_anchors_nearest_to_the_new_items_come_first_in_every_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    new = facts(2)
    pool = anchors(6)
    # Anchor 4 asks exactly what new item 0 asks: it must be the nearest.
    pool[4] = Anchor(example=Example(id="anchor:4", prompt=new[0].prompt, response="base answer"), finished=True)
    run = _Run(fresh(tokenizer), tokenizer, new, [], pool, settings(anchor_ratio=1.0, anchor_neighbour_share=0.5))
    order = run.near_anchors()
    assert sorted(order) == list(range(6)) and order[0] == 4
    for epoch in range(3):
        keys = [k for b in run.plan_epoch(epoch) for k in b if k.startswith("anchor:")]
        assert "anchor:4" in keys and len(keys) == 2
