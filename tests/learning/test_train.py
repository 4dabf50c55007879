from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from learning import checkpoint, dataset, lora
from learning.anchors import Anchor
from learning.config import AdapterSettings, TrainSettings
from learning.examples import Example
from learning.reports import Progress, TrainOutcome
from learning.train import EwcTerm, losses, run_fingerprint, train
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


def fit(
    model,
    tokenizer: PreTrainedTokenizerFast,
    new: list[Example],
    pool: list[Example],
    anchor_items: list[Anchor],
    s: TrainSettings,
    kl_cache_dir: Path | None = None,
    **kwargs,
) -> TrainOutcome:
    """Build the run's dataset and train on it, as learning.pipeline.run_training does."""
    data = dataset.build(model, tokenizer, new, pool, anchor_items, s, kl_cache_dir)
    return train(model, tokenizer, data, s, fingerprint=run_fingerprint(s, new, pool, anchor_items), **kwargs)


def test_learns_new_items_and_stops_early(tokenizer: PreTrainedTokenizerFast) -> None:
    model = fresh(tokenizer)
    pool = facts(4, prefix="old")
    out = fit(model, tokenizer, facts(4), pool, anchors(), settings())
    assert out.stopped == "converged"
    assert out.new_em == 1.0
    assert out.epochs < 40 and out.steps == out.epochs * 2  # 4 new + 2 replay + 2 anchors = 2 batches of 4
    # Every new and replayed item has a last loss; anchors are not reported.
    assert {"f0", "f1", "f2", "f3"} <= out.example_losses.keys()
    assert not any(k.startswith("anchor") for k in out.example_losses)
    assert out.example_losses.keys() <= {e.id for e in facts(4) + pool}
    assert out.tokens > 0 and out.tokens_per_s > 0


def test_without_early_stopping_it_runs_every_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    out = fit(fresh(tokenizer), tokenizer, facts(2), [], [], settings(max_epochs=3, early_stop_em=None))
    assert out.stopped == "max_epochs" and out.epochs == 3 and out.steps == 3


def test_epoch_plan_mixes_new_replay_and_anchors(tokenizer: PreTrainedTokenizerFast) -> None:
    s = settings(replay_ratio=1.0, anchor_ratio=0.5)
    data = dataset.build(fresh(tokenizer), tokenizer, facts(4), facts(6, prefix="old"), anchors(5), s)
    plans = [data.epoch(e, s.batch_size, s.seed) for e in range(4)]
    for plan in plans:
        rows = [r for b in plan for r in b]
        kinds = [data.items[r].kind for r in rows]
        assert kinds.count("new") == 4 and kinds.count("replay") == 4 and kinds.count("anchor") == 2
        assert len(set(rows)) == len(rows)
    assert plans[0] == data.epoch(0, s.batch_size, s.seed) and plans[0] != plans[1]
    # The replay set is chosen once per run: every epoch rehearses the same earlier facts.
    replayed = {
        tuple(sorted(data.items[r].id for b in plan for r in b if data.items[r].kind == "replay")) for plan in plans
    }
    assert len(replayed) == 1 and sorted(data.replayed) == list(replayed.pop())


def test_nearest_replay_rehearses_the_earlier_facts_that_read_like_the_new_ones(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    new = [Example(id="n", prompt="What is the capital of Orvania?", response="Keltrosa.")]
    pool = [Example(id=f"e{i}", prompt=f"How many legs has animal {i}?", response=f"{i}.") for i in range(5)]
    pool.insert(2, Example(id="same-form", prompt="What is the capital of Dremmark?", response="Vashlund."))
    s = settings(replay_ratio=1.0, replay_strategy="nearest", anchor_ratio=0)
    data = dataset.build(fresh(tokenizer), tokenizer, new, pool, [], s)
    assert data.replayed == ["same-form"]


def test_progress_reports_steps_and_eta(tokenizer: PreTrainedTokenizerFast) -> None:
    seen: list[Progress] = []
    out = fit(
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

    out = fit(
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
    fit(
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
    s = settings(
        adapter=AdapterSettings(rank=8, alpha=16, dropout=0.1),
        max_epochs=6,
        early_stop_em=None,
        kl_weight=0.5,
        ewc_lambda=0.1,
        replay_strategy="prioritized",
        checkpoint_every=2,
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
    reference = fit(full, tokenizer, facts(4), pool, anchors(), s, ewc_term=ewc_for(full))
    expected = lora.adapter_state(full)

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > stop_after

    first = fresh(tokenizer)
    interrupted = fit(
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
    resumed = fit(second, tokenizer, facts(4), pool, anchors(), s, ewc_term=ewc_for(second), checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == stop_after
    assert resumed.steps == reference.steps and resumed.stopped == reference.stopped
    got = lora.adapter_state(second)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k  # bit-identical
    assert resumed.example_losses == pytest.approx(reference.example_losses, abs=1e-5)


def test_a_checkpoint_from_another_run_is_ignored(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    fit(
        fresh(tokenizer),
        tokenizer,
        facts(4),
        [],
        [],
        settings(max_epochs=2, early_stop_em=None, checkpoint_every=1),
        checkpoint_dir=tmp_path,
    )
    out = fit(
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
        fit(model, tokenizer, facts(4), [], [], s, ewc_term=term)
        return sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in params.items())

    assert drift(1000.0) < 0.2 * drift(0.0)


def test_kl_keeps_anchor_predictions_closer_to_the_base(tokenizer: PreTrainedTokenizerFast) -> None:
    s = settings(max_epochs=8, early_stop_em=None, replay_ratio=0, anchor_ratio=1.0, learning_rate=2e-2)

    def anchor_kl(weight: float) -> float:
        model = fresh(tokenizer)
        fit(model, tokenizer, facts(4), [], anchors(4), s.model_copy(update={"kl_weight": weight}))
        probe = dataset.build(model, tokenizer, facts(4), [], anchors(4), s.model_copy(update={"kl_weight": 1.0}))
        rows = [i for i, it in enumerate(probe.items) if it.kind == "anchor"]
        with torch.no_grad():
            model.train(False)
            _, kl = losses(model, probe, rows, int(tokenizer.pad_token_id))
        assert kl is not None
        return float(kl)

    assert anchor_kl(5.0) < 0.5 * anchor_kl(0.0)


def test_refuses_an_empty_run(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="no new examples"):
        fit(fresh(tokenizer), tokenizer, [], [], [], settings())


def test_kl_targets_are_cached_on_disk_and_give_the_same_run(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    s = settings(max_epochs=2, early_stop_em=None, kl_weight=1.0, anchor_ratio=1.0)
    first_model = fresh(tokenizer)
    first = fit(first_model, tokenizer, facts(4), [], anchors(4), s, kl_cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    second_model = fresh(tokenizer)
    second = fit(second_model, tokenizer, facts(4), [], anchors(4), s, kl_cache_dir=tmp_path)
    assert second.final_loss == first.final_loss
    a, b = lora.adapter_state(first_model), lora.adapter_state(second_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_anchors_nearest_to_the_new_items_come_first_in_every_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    new = facts(2)
    pool = anchors(6)
    # Anchor 4 asks exactly what new item 0 asks: it must be the nearest.
    pool[4] = Anchor(example=Example(id="anchor:4", prompt=new[0].prompt, response="base answer"), finished=True)
    s = settings(anchor_ratio=1.0, anchor_neighbour_share=0.5)
    data = dataset.build(fresh(tokenizer), tokenizer, new, [], pool, s)
    assert data.items[data.every_epoch[-1]].id == "anchor:4"  # the one nearest anchor kept in every epoch
    for epoch in range(3):
        ids = [data.items[r].id for b in data.epoch(epoch, s.batch_size, s.seed) for r in b]
        assert "anchor:4" in ids and sum(i.startswith("anchor:") for i in ids) == 2
