"""Elastic weight consolidation over the LoRA parameters: diagonal Fisher, its storage, and the penalty."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from learning import interrupt

FISHER_FILE = "fisher.safetensors"


def empirical_fisher(
    params: Mapping[str, torch.nn.Parameter],
    per_example_losses: Iterable[Callable[[], torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over examples of each parameter's squared loss gradient.

    Each callable computes one example's loss; gradients are taken one example at a time because the
    square of a batch gradient is not the mean of per-example squares.
    """
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    n = 0
    for loss_fn in per_example_losses:
        interrupt.check()
        for p in params.values():
            p.grad = None
        torch.autograd.backward(loss_fn())
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.detach() ** 2
        n += 1
    for p in params.values():
        p.grad = None
    return {k: v / max(n, 1) for k, v in fisher.items()}


def merge_fisher(
    previous: Mapping[str, torch.Tensor] | None, current: Mapping[str, torch.Tensor], decay: float
) -> dict[str, torch.Tensor]:
    """Online EWC: decay * previous + current, so protection accumulates across versions."""
    if previous is None:
        return dict(current)
    return {k: decay * previous[k] + v if k in previous else v.clone() for k, v in current.items()}


def normalised(fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fisher divided by its mean over all entries, so the penalty weight does not depend on loss scale."""
    total = sum(float(v.sum()) for v in fisher.values())
    count = sum(v.numel() for v in fisher.values())
    mean = total / count if count and total > 0 else 1.0
    return {k: v / mean for k, v in fisher.items()}


def penalty(
    params: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Σ F·(θ - θ*)² over the parameters present in all three maps (0 at the anchor point)."""
    terms = [(fisher[k] * (p - anchor[k]) ** 2).sum() for k, p in params.items() if k in anchor and k in fisher]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def save_fisher(path: Path, fisher: Mapping[str, torch.Tensor]) -> None:
    """Write a Fisher (or any name → tensor map) as safetensors, from the CPU so any machine can read it."""
    save_file({k: v.detach().cpu().contiguous() for k, v in fisher.items()}, str(path))


def load_fisher(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a map written by `save_fisher`, onto `device` (the adapter's, for the penalty)."""
    loaded: dict[str, torch.Tensor] = load_file(str(path), device=str(device))
    return loaded
