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
    """Python, numpy and torch global RNG states, in types `torch.load(weights_only=True)` accepts.

    The CUDA generators are included once CUDA is in use (their states are CPU tensors too).
    """
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    state: dict[str, Any] = {
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
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def to_cpu(value: Any) -> Any:
    """`value` with every tensor nested in dicts, lists and tuples copied to the CPU (for saving)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


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
    """Write one checkpoint atomically, then delete all but the newest `keep`.

    Tensors are saved from the CPU, so a checkpoint written on a GPU resumes anywhere.
    """
    path = checkpoint_dir / f"{PREFIX}{step:06d}"
    with atomic_dir(path, replace=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER))
        torch.save(to_cpu(state), tmp / STATE)
    for old in checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", path)
    return path


def load_latest(checkpoint_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint as (path, adapter tensors, trainer state), or None; tensors on the CPU.

    `optimizer.load_state_dict` and `Tensor.copy_` move them to the parameters' device.
    """
    for path in reversed(checkpoints(checkpoint_dir)):
        try:
            adapter: dict[str, torch.Tensor] = load_file(str(path / ADAPTER))
            state: dict[str, Any] = torch.load(path / STATE, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        return path, adapter, state
    return None
