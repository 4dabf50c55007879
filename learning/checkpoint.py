"""Full-state training checkpoints, written atomically as `step-NNNNNN/` directories; the newest few are kept."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from learning.fsutil import atomic_dir

log = logging.getLogger(__name__)

ADAPTER = "adapter.safetensors"
STATE = "trainer_state.pt"
PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch global RNG states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])


def checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories are never listed: they start with a dot)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: p.name)


def save(
    checkpoint_dir: Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write one checkpoint atomically, then delete all but the newest `keep`."""
    path = checkpoint_dir / f"{PREFIX}{step:06d}"
    with atomic_dir(path, replace=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER))
        torch.save(state, tmp / STATE)
    for old in checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", path)
    return path


def load_latest(checkpoint_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint as (path, adapter tensors, trainer state), or None."""
    for path in reversed(checkpoints(checkpoint_dir)):
        try:
            adapter: dict[str, torch.Tensor] = load_file(str(path / ADAPTER))
            state: dict[str, Any] = torch.load(path / STATE, weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        return path, adapter, state
    return None
