"""Null-space-constrained adapter updates (AlphaEdit, ICLR 2025), for gradient-trained LoRA.

A linear layer `W` maps its input ("key") `k` to `W k`. What the model already knows lives in the
keys it sees on preserved text: general text, and every fact the kernel already holds. If an update
`ΔW` satisfies `ΔW k = 0` for every preserved key, outputs on preserved text cannot move, layer
after layer. A LoRA update is `B A`; keeping each row of `A` inside the subspace that preserved keys
(almost) never use guarantees it, whatever `B` learns.

On a small model general text uses every input direction: there is no exact null space, only
directions it uses little. A few outlier dimensions carry most of the variance (up to 10^4 times the
median), so thresholds are set against the median per-token variance `m` of general text, not
against the total. Per adapted module we keep an orthonormal basis `U` (d_in x k):

1. the keys of general text (the anchor answers and the reference text, through the bare base
   model) give a per-token covariance `C_g`; `U_g` spans its eigen-directions with variance below
   `general_threshold * m`. Computed once per base model and cached.
2. the keys of every earlier fact (through the previous version, which is what they must keep
   producing) and of the must-keep facts give a per-token covariance `C_f`; within `U_g`, the
   directions where they vary more than `facts_threshold * m` are removed too. Cheap: an
   eigen-decomposition of `k x k`.

The trainer then projects the new adapter rows after every optimizer step: `A ← A U Uᵀ`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from learning import interrupt
from learning.config import NullSpaceSettings
from learning.fsutil import atomic_path
from learning.losses import decoder_and_head
from learning.model_loading import model_device

log = logging.getLogger(__name__)

COVARIANCE_BATCH = 16


@contextmanager
def _capturing(
    modules: Mapping[str, nn.Module], sums: dict[str, torch.Tensor], mask: list[torch.Tensor]
) -> Iterator[None]:
    """Add x xᵀ of every real token's input to each module while the block runs."""

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            keys = x[mask[0]] if x.shape[:2] == mask[0].shape else x.reshape(-1, x.shape[-1])
            keys = keys.detach().to(torch.float32)
            update = keys.T @ keys
            if name in sums:
                sums[name] += update.to(sums[name].dtype).cpu()
            else:
                sums[name] = update.to(torch.float64).cpu()

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def key_covariance(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_size: int = COVARIANCE_BATCH,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ k kᵀ (float64, on the CPU) of the inputs to each module over every token of `sequences`, and the token count.

    `modules` are the linear layers whose inputs are keys (for a LoRA layer, its `base_layer`), keyed by name.
    """
    decoder, _ = decoder_and_head(model)
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = [torch.zeros(0)]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with _capturing(modules, sums, mask):
            for start in range(0, len(order), batch_size):
                interrupt.check()
                rows = [list(sequences[i]) for i in order[start : start + batch_size]]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(rows), width), dtype=torch.long)
                for r, seq in enumerate(rows):
                    ids[r, : len(seq)] = torch.tensor(seq)
                    attention[r, : len(seq)] = 1
                mask[0] = attention.bool().to(device)
                decoder(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
                tokens += int(attention.sum())
    finally:
        model.train(was_training)
    return sums, tokens


def quiet_directions(cov: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """Orthonormal columns spanning the eigen-directions of `cov` with variance below `threshold` x its median.

    Returns the basis and the median eigenvalue (the scale later thresholds are set against).
    """
    values, vectors = torch.linalg.eigh(cov.to(torch.float64))
    median = float(values.clamp(min=0).median())
    keep = int((values < threshold * median).sum())
    basis: torch.Tensor = vectors[:, :keep].to(torch.float32).contiguous()
    return basis, median


def restrict(basis: torch.Tensor, cov: torch.Tensor, limit: float) -> torch.Tensor:
    """The part of span(`basis`) along which keys with covariance `cov` vary less than `limit`."""
    if basis.shape[1] == 0:
        return basis
    b = basis.to(torch.float64)
    inner = b.T @ cov.to(torch.float64) @ b
    values, vectors = torch.linalg.eigh((inner + inner.T) / 2)
    keep = int((values < limit).sum())
    restricted: torch.Tensor = (b @ vectors[:, :keep]).to(torch.float32).contiguous()
    return restricted


def general_bases(
    covariances: Mapping[str, torch.Tensor], threshold: float, groups: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`quiet_directions` per module (bases and medians); modules in one group (one input) share one."""
    bases: dict[str, torch.Tensor] = {}
    medians: dict[str, float] = {}
    done: dict[str, tuple[torch.Tensor, float]] = {}
    for name, cov in covariances.items():
        group = (groups or {}).get(name, name)
        if group not in done:
            done[group] = quiet_directions(cov, threshold)
        bases[name], medians[name] = done[group]
    return bases, medians


MEDIAN_SUFFIX = ":median"


def save_bases(bases: Mapping[str, torch.Tensor], medians: Mapping[str, float], path: Path) -> None:
    """Write bases and their medians as one safetensors file, atomically."""
    tensors = {k: v.clone().contiguous() for k, v in bases.items()}
    tensors |= {k + MEDIAN_SUFFIX: torch.tensor([m], dtype=torch.float64) for k, m in medians.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_bases(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    loaded = load_file(str(path))
    medians = {k[: -len(MEDIAN_SUFFIX)]: float(v[0]) for k, v in loaded.items() if k.endswith(MEDIAN_SUFFIX)}
    return {k: v for k, v in loaded.items() if not k.endswith(MEDIAN_SUFFIX)}, medians


def project_rows_(weight: torch.Tensor, basis: torch.Tensor, rows: slice) -> None:
    """In place: the given rows of a LoRA `A` weight (r x d_in) become their projection onto span(basis)."""
    with torch.no_grad():
        part = weight[rows]
        if basis.shape[1] == 0:
            part.zero_()
        else:
            b = basis.to(weight.device, weight.dtype)
            part.copy_((part @ b) @ b.T)


def lora_modules(model: PeftModel) -> dict[str, tuple[nn.Module, str]]:
    """Each adapted module's name -> (its frozen base linear layer, the key of its LoRA `A` weight)."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            out[name] = (module.get_base_layer(), f"{name}.lora_A.weight")
    return out


def _input_group(name: str) -> str:
    # gate_proj and up_proj of one MLP read the same input: one covariance, one eigen-decomposition.
    return name.replace(".up_proj", ".gate_proj")


class Projector:
    """Keeps the trainable rows of every LoRA `A` inside its module's allowed subspace; call after each step."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], bases: Mapping[str, torch.Tensor], frozen: int):
        self.params, self.bases, self.frozen = params, bases, frozen

    def __call__(self) -> None:
        for key, param in self.params.items():
            project_rows_(param, self.bases[key], slice(self.frozen, None))

    def dimensions(self) -> dict[str, int]:
        """Allowed dimensions per module, for logs and reports."""
        return {k: int(b.shape[1]) for k, b in self.bases.items()}


def build_projector(
    model: PeftModel,
    params: Mapping[str, torch.nn.Parameter],
    frozen: int,
    general: Callable[[], Sequence[Sequence[int]]],
    protected: Sequence[Sequence[int]],
    settings: NullSpaceSettings,
    pad_id: int,
    cache: Path | None,
) -> Projector:
    """Bases for every adapted module: general text's null space (cached), minus what earlier facts use.

    `general()` yields the general token sequences; it is only called when the cache is cold. `protected`
    are the sequences to keep (earlier facts and the like), read through the model as it is now (the
    version being replaced).
    """
    modules = lora_modules(model)
    names = sorted(modules)
    bases: dict[str, torch.Tensor] = {}
    medians: dict[str, float] = {}
    if cache is not None and cache.is_file():
        bases, medians = load_bases(cache)
    if set(bases) != set(names):
        started = time.perf_counter()
        with model.disable_adapter():
            covs, tokens = key_covariance(model, {n: modules[n][0] for n in names}, general(), pad_id)
        per_token = {n: c / max(tokens, 1) for n, c in covs.items()}
        bases, medians = general_bases(per_token, settings.general_threshold, {n: _input_group(n) for n in names})
        log.info("quiet directions of general text: %d tokens, %.1f s", tokens, time.perf_counter() - started)
        if cache is not None:
            save_bases(bases, medians, cache)
    if not settings.general:
        for n in names:
            weight = modules[n][0].weight
            assert isinstance(weight, torch.Tensor)
            bases[n] = torch.eye(weight.shape[1])
    if settings.facts and protected:
        # Per token, like general text: summed, a few hundred protected sequences already fill a small
        # model's whole key space (576 dimensions here) and leave nothing to learn with.
        covs, tokens = key_covariance(model, {n: modules[n][0] for n in names}, protected, pad_id)
        limit = settings.facts_threshold
        bases = {n: restrict(bases[n], covs[n] / max(tokens, 1), limit * medians[n]) for n in names}
    by_param = {modules[n][1]: bases[n] for n in names}
    missing = set(params) - set(by_param) - {k for k in params if ".lora_B." in k}
    if missing:
        raise ValueError(f"no null-space basis for {sorted(missing)[:3]}")
    projector = Projector({k: p for k, p in params.items() if k in by_param}, by_param, frozen)
    dims = projector.dimensions()
    log.info("null space: %d modules, %d-%d allowed directions", len(dims), min(dims.values()), max(dims.values()))
    return projector
