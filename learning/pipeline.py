"""The learning entry points the worker calls; it only orchestrates, every path is explicit.

Contract, in the order a worker uses it:

1. `bundle = load_bundle(base_model, models_dir, cache_dir, device=...)`: resolves the base model
   (None = the embedded SmolLM2, dequantised and cached once under `models_dir`; otherwise a local
   Hugging Face directory, never a hub id), loads it frozen in fp32 on `device` (cpu, cuda or auto;
   everything later runs where the model is), and loads or computes the base baseline (anchor
   answers, probe answers, reference perplexity), cached under `cache_dir`. About 1 s when cached;
   the first call for a base model takes about 2 minutes on 2 cores.
2. `candidate = run_training(bundle, new, replay_pool, settings, previous_version=..., checkpoint_dir=...,
   progress=..., should_stop=...)`: attaches the previous version's adapter (cumulative learning) or a
   fresh one, trains, and, unless interrupted, computes this run's Fisher merged with the previous one.
   `candidate.outcome.stopped == "interrupted"` means a checkpoint was written to `checkpoint_dir`:
   calling again with the same inputs and directory resumes it. `outcome.example_losses` maps each
   new/replay example id to its last loss (store it as `Example.loss` for prioritised replay).
3. `report = evaluate_candidate(bundle, candidate.model, new, held_back, thresholds, output_schema)`:
   all metrics plus the gate report; `report.gates.passed` decides deployment.
4. `save_version(candidate, report, version_dir)`: writes, atomically, `version_dir/` with
   `adapter_config.json` + `adapter_model.safetensors` (peft format: `PeftModel.from_pretrained(base,
   version_dir)` serves it), `fisher.safetensors` (when EWC is on), `scope.json` (the prompts the
   adapter answers, when `serve_scope` is 'taught'; learning/scope.py) and `eval_report.json`.
5. `release(bundle, candidate)`: removes the adapter layers so the bare base can be reused.

A version directory is what `previous_version` expects on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from learning import dataset, ewc, lora, nullspace, sdft
from learning.anchors import Anchor, Baseline, ensure_baseline, reference_text, train_anchors
from learning.batching import collate
from learning.config import GateThresholds, KeepFact, TrainSettings
from learning.examples import Example
from learning.formatting import IGNORE_INDEX, encode_example
from learning.fsutil import atomic_dir, atomic_write_text
from learning.gates import GateReport, apply_gates
from learning.losses import hidden_states, per_row_mean, selected_logits, target_mask, token_ce
from learning.metrics import MustKeep, Prior, assess_prior, compute_metrics, must_keep_items
from learning.model_loading import ensure_base_model, load_base, model_device, setup_threads
from learning.reports import Metrics, Progress, TrainOutcome
from learning.scope import SCOPE_FILE, Scope, read_scope
from learning.train import EwcTerm, run_fingerprint, train

log = logging.getLogger(__name__)

FISHER_FILE = ewc.FISHER_FILE
REPORT_FILE = "eval_report.json"
PRIOR_FILE = "prior.json"  # beside the checkpoints: what the replaced version answered, for an exact resume
REFERENCE_WINDOW = 256
PROTECTED_ANSWER_TOKENS = 16


@dataclass
class Bundle:
    """The loaded base model, its tokenizer, where it lives, and its cached baseline."""

    model_dir: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    baseline: Baseline
    cache_dir: Path


@dataclass
class Candidate:
    """A trained adapter (still attached to the base), what the run produced, and what it replaced."""

    model: PeftModel
    outcome: TrainOutcome
    fisher: dict[str, torch.Tensor] | None
    settings: TrainSettings
    prior: Prior
    must_keep: list[MustKeep]
    scope: Scope | None  # the prompts this version's adapter answers; None: every prompt


class EvalReport(BaseModel):
    """What is saved as `eval_report.json` next to a version: metrics, gates, and the training outcome."""

    model_config = ConfigDict(extra="forbid")

    metrics: Metrics
    gates: GateReport
    outcome: TrainOutcome | None = None


def load_bundle(
    base_model: str | None,
    models_dir: Path,
    cache_dir: Path,
    num_threads: int | None = None,
    device: str = "cpu",
) -> Bundle:
    """Resolve, load and baseline the base model on `device` ("cpu", "cuda" or "auto"; see the module docstring).

    Everything trained and evaluated on the bundle then runs on the model's device.
    """
    setup_threads(num_threads)
    model_dir = ensure_base_model(base_model, models_dir)
    model, tokenizer = load_base(model_dir, device)
    baseline = ensure_baseline(model, tokenizer, model_dir, cache_dir)
    return Bundle(model_dir=model_dir, model=model, tokenizer=tokenizer, baseline=baseline, cache_dir=cache_dir)


def _fisher_examples(new: Sequence[Example], pool: Sequence[Example], seed: int) -> list[Example]:
    # This run's data: every new item plus as many replayed ones, so protection covers both.
    extra = random.Random(seed).sample(list(pool), min(len(pool), len(new)))
    return [*new, *extra]


def compute_fisher(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_seq_len: int
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the adapter on `examples` (response-token loss, one example at a time)."""
    params = lora.trainable_params(model)
    pad = _pad_id(tokenizer)
    device = model_device(model)

    def loss_of(example: Example) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            batch = collate([encode_example(tokenizer, example, max_seq_len)], [0], pad).to(device)
            mask = target_mask(batch.labels)
            hidden = hidden_states(model, batch.input_ids, batch.attention_mask)
            logits = selected_logits(model, hidden, mask)
            ce = token_ce(logits, batch.labels[:, 1:][mask])
            return per_row_mean(ce, torch.zeros(len(ce), dtype=torch.long, device=device), 1)[0]

        return fn

    was_training = model.training
    model.train(False)
    try:
        return ewc.empirical_fisher(params, (loss_of(e) for e in examples))
    finally:
        model.train(was_training)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def _general_sequences(bundle: Bundle, max_seq_len: int) -> list[list[int]]:
    """General text whose keys the null space preserves: the train anchors' answers and the reference text."""
    tok = bundle.tokenizer
    out = [
        encode_example(tok, a.example, max_seq_len, end_with_eos=a.finished).input_ids
        for a in train_anchors(bundle.baseline)
    ]
    ids: list[int] = tok(reference_text(), add_special_tokens=False)["input_ids"]
    out += [ids[i : i + REFERENCE_WINDOW] for i in range(0, len(ids), REFERENCE_WINDOW)]
    return out


def _protected(
    bundle: Bundle,
    n_new: int,
    earlier: Sequence[Example],
    keep: Sequence[MustKeep],
    prior: Prior,
    anchors: Sequence[Anchor],
    near_anchors: Sequence[int],
    settings: TrainSettings,
) -> list[list[int]]:
    """What this run's update must leave alone: earlier facts, must-keep facts the replaced version knows
    (with its answers), and the base's answers to the general questions nearest to the new facts."""
    assert settings.nullspace is not None
    tok, limit = bundle.tokenizer, settings.max_seq_len
    out = [encode_example(tok, e, limit).input_ids for e in earlier]
    for item in keep:
        if prior.right.get(item.id):
            example = Example(id=item.id, prompt=item.prompt, response=prior.answers[item.id])
            out.append(encode_example(tok, example, limit, end_with_eos=False).input_ids)
    for i in list(near_anchors)[: settings.nullspace.nearest_anchors * n_new]:
        # The question and the start of the answer, where a fact is stated; a long answer's rest is general
        # text the general null space already covers, and protecting all of it leaves nothing to learn with.
        encoded = encode_example(tok, anchors[i].example, limit, end_with_eos=anchors[i].finished)
        answer_start = next(i for i, t in enumerate(encoded.labels) if t != IGNORE_INDEX)
        out.append(encoded.input_ids[: answer_start + PROTECTED_ANSWER_TOKENS])
    return out


def _rehearsed(keep: Sequence[MustKeep], prior: Prior) -> list[Anchor]:
    """The must-keep facts the replaced version answers right, as anchors on those very answers."""
    return [
        Anchor(Example(id=k.id, prompt=k.prompt, response=prior.answers[k.id]), finished=False)
        for k in keep
        if prior.right.get(k.id)
    ]


def _projector(
    bundle: Bundle, model: PeftModel, frozen: int, protected: Sequence[Sequence[int]], settings: TrainSettings
) -> nullspace.Projector:
    assert settings.nullspace is not None
    ns = settings.nullspace
    modules = sorted(nullspace.lora_modules(model))
    digest = hashlib.sha256(json.dumps([modules, ns.general_threshold, settings.max_seq_len]).encode()).hexdigest()[:12]
    cache = bundle.cache_dir / "nullspace" / f"{bundle.baseline.fingerprint}-{digest}.safetensors"
    return nullspace.build_projector(
        model,
        lora.trainable_params(model),
        frozen,
        lambda: _general_sequences(bundle, settings.max_seq_len),
        protected,
        ns,
        _pad_id(bundle.tokenizer),
        cache,
    )


def _prior(
    bundle: Bundle,
    model: PeftModel,
    earlier: Sequence[Example],
    must_keep: Sequence[MustKeep],
    checkpoint_dir: Path | None,
    scope: Scope | None,
) -> Prior:
    """What the version being replaced answers (the model before any step, as served under its `scope`)."""
    path = checkpoint_dir / PRIOR_FILE if checkpoint_dir is not None else None
    if path is not None and path.is_file():
        try:
            return Prior.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError):
            log.warning("recomputing an unreadable %s", path)
    prior = assess_prior(model, bundle.tokenizer, earlier, must_keep, scope)
    if path is not None:
        atomic_write_text(path, json.dumps(prior.to_json()))
    return prior


def run_training(
    bundle: Bundle,
    new: Sequence[Example],
    earlier: Sequence[Example],
    settings: TrainSettings,
    *,
    must_keep: Sequence[KeepFact] = (),
    previous_version: Path | None = None,
    checkpoint_dir: Path | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Candidate:
    """Train one run on top of `previous_version` (a version directory) or a fresh adapter.

    `earlier` is every fact the kernel already holds: the replay set is chosen from it, the null space
    protects it, and evaluation checks all of it. `must_keep` is the kernel's own must-keep list.
    """
    previous_scope = read_scope(previous_version)  # before attaching: a bad file leaves the bundle as it was
    frozen = 0
    if settings.adapter_mode == "grow":
        model, frozen = lora.attach_grown(
            bundle.model, settings.adapter, previous_version, settings.grow_rank, settings.max_rank, settings.seed
        )
    else:
        model = lora.attach(bundle.model, settings.adapter, previous_version, seed=settings.seed)
    keep = must_keep_items(bundle.baseline, must_keep)
    prior = _prior(bundle, model, earlier, keep, checkpoint_dir, previous_scope)
    previous_fisher: dict[str, torch.Tensor] | None = None
    if previous_version is not None and (previous_version / FISHER_FILE).is_file():
        previous_fisher = ewc.load_fisher(previous_version / FISHER_FILE, model_device(model))
    ewc_term = None
    if settings.ewc_lambda > 0 and previous_fisher is not None and frozen == 0:
        start = {k: p.detach().clone() for k, p in lora.trainable_params(model).items()}
        ewc_term = EwcTerm(anchor=start, fisher=ewc.normalised(previous_fisher), weight=settings.ewc_lambda)
    all_anchors = train_anchors(bundle.baseline)
    ns = settings.nullspace
    wants_near = (settings.anchor_ratio > 0 and settings.anchor_neighbour_share > 0) or (
        ns is not None and ns.facts and ns.nearest_anchors > 0
    )
    near = dataset.nearest_anchor_order(model, bundle.tokenizer, new, all_anchors) if wants_near else []
    projector = None
    if ns is not None:
        protected = _protected(bundle, len(new), earlier, keep, prior, all_anchors, near, settings) if ns.facts else []
        projector = _projector(bundle, model, frozen, protected, settings)
        projector()  # the fresh rows start inside the allowed subspace too
    anchors = all_anchors if settings.anchor_ratio > 0 else []
    targets = sdft.self_distilled(model, bundle.tokenizer, new) if settings.self_distilled_targets else new
    data = dataset.build(
        model,
        bundle.tokenizer,
        targets,
        earlier,
        anchors,
        settings,
        kl_cache_dir=bundle.cache_dir / "kl" / bundle.baseline.fingerprint,
        near_anchors=near if wants_near else None,
        rehearsed=_rehearsed(keep, prior) if settings.rehearse_must_keep else (),
    )
    outcome = train(
        model,
        bundle.tokenizer,
        data,
        settings,
        fingerprint=run_fingerprint(settings, new, earlier, anchors),
        ewc_term=ewc_term,
        after_step=projector,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        should_stop=should_stop,
    )
    # Without EWC this run adds no Fisher, but the accumulated one is carried to the next version.
    fisher = previous_fisher
    if outcome.stopped != "interrupted" and settings.ewc_lambda > 0 and frozen == 0:
        if progress is not None:
            progress(
                Progress(
                    step=outcome.steps,
                    total_steps=outcome.total_steps,
                    epoch=outcome.epochs,
                    loss=outcome.final_loss,
                    tokens_per_s=outcome.tokens_per_s,
                    eta_s=0.0,
                    phase="fisher",
                    new_em=outcome.new_em,
                )
            )
        current = compute_fisher(
            model, bundle.tokenizer, _fisher_examples(new, earlier, settings.seed), settings.max_seq_len
        )
        fisher = ewc.merge_fisher(previous_fisher, current, settings.fisher_decay)
    scope = (
        Scope.of([e.prompt for e in (*earlier, *new)], settings.scope_threshold)
        if settings.serve_scope == "taught"
        else None
    )
    return Candidate(
        model=model, outcome=outcome, fisher=fisher, settings=settings, prior=prior, must_keep=keep, scope=scope
    )


def evaluate_candidate(
    bundle: Bundle,
    candidate: Candidate,
    new: Sequence[Example],
    earlier: Sequence[Example],
    thresholds: GateThresholds,
    output_schema: dict[str, Any] | None = None,
) -> EvalReport:
    """Every metric of the candidate as served (its adapter inside its scope), and the gates against `thresholds`."""
    metrics = compute_metrics(
        candidate.model,
        bundle.tokenizer,
        new=new,
        earlier=earlier,
        replayed=set(candidate.outcome.replayed),
        prior=candidate.prior,
        must_keep=candidate.must_keep,
        baseline=bundle.baseline,
        output_schema=output_schema,
        scope=candidate.scope,
    )
    gates = apply_gates(metrics, thresholds)
    log.info("gates: %s", gates.summary())
    return EvalReport(metrics=metrics, gates=gates, outcome=candidate.outcome)


def save_version(candidate: Candidate, report: EvalReport | None, version_dir: Path) -> Path:
    """Write adapter, Fisher and eval report into `version_dir` atomically (see the module docstring)."""
    with atomic_dir(version_dir) as tmp:
        lora.write_adapter(candidate.model, tmp)
        if candidate.fisher is not None:
            ewc.save_fisher(tmp / FISHER_FILE, candidate.fisher)
        if candidate.scope is not None:
            (tmp / SCOPE_FILE).write_text(candidate.scope.model_dump_json(), encoding="utf-8")
        if report is not None:
            (tmp / REPORT_FILE).write_text(report.model_dump_json(indent=1), encoding="utf-8")
    return version_dir


def release(bundle: Bundle, candidate: Candidate) -> None:
    """Strip the adapter layers from the base so the bundle can train or serve another adapter."""
    base = candidate.model.unload()
    bundle.model = base
