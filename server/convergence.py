"""When a kernel has converged: its gates pass with a margin and its acquisition is stable over M runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel


class Convergence(BaseModel):
    converged: bool
    reason: str


def judge(runs: Sequence[dict[str, Any]], m: int, margin: float, max_std: float) -> Convergence:
    """`runs` are the kernel's finished runs, newest first, as {status, metrics, gates} dicts."""
    judged = [r for r in runs if r["status"] in ("deployed", "rejected")][:m]
    if len(judged) < m:
        return Convergence(converged=False, reason=f"{len(judged)} of the {m} evaluated runs needed")
    for run in judged:
        if run["status"] != "deployed":
            return Convergence(converged=False, reason="a recent run was rejected by its gates")
        for gate in run.get("gates") or []:
            if gate["status"] == "passed" and (gate.get("margin") or 0.0) < margin:
                return Convergence(
                    converged=False,
                    reason=f"gate {gate['name']} passed by {gate['margin']:.3f}, less than the margin {margin:.3f}",
                )
    acquisition = [(r.get("metrics") or {}).get("acquisition_em") for r in judged]
    values = [float(a) for a in acquisition if a is not None]
    if len(values) < m:
        return Convergence(converged=False, reason="acquisition was not measured on every recent run")
    spread = statistics.pstdev(values)
    if spread >= max_std:
        return Convergence(converged=False, reason=f"acquisition still moves (std {spread:.3f} >= {max_std:.3f})")
    return Convergence(
        converged=True,
        reason=f"last {m} runs passed every gate by >= {margin:.3f}; acquisition std {spread:.3f} < {max_std:.3f}",
    )
