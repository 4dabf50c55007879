"""Applying the auto-training policy: gather the facts, start a run when one is due, judge convergence."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import tzinfo

from server.convergence import judge
from server.dispatch import Dispatcher
from server.drift import kl_divergence, word_counts
from server.kernel_config import KernelConfig
from server.policy import Decision, PolicyInputs, RunOutcome, decide
from store import Store
from store.models import Kernel, KernelStatus, Run
from train_worker.deploy import KernelFiles
from train_worker.protocol import write_atomic
from train_worker.settings import Layout

log = logging.getLogger(__name__)

DRIFT_SAMPLE = 2000  # experiences per side: enough for word statistics, cheap to read
Notify = Callable[..., Awaitable[None]]


class AutoTrainer:
    def __init__(
        self, store: Store, layout: Layout, dispatcher: Dispatcher, notify: Notify, local_tz: tzinfo | None = None
    ) -> None:
        self._store = store
        self._layout = layout
        self._dispatcher = dispatcher
        self._notify = notify
        self._local_tz = local_tz

    async def drift(self, kernel: str) -> float | None:
        """KL of the untrained experiences' words from the trained ones'; None when either side is empty."""
        new = await self._store.experiences.texts(kernel, untrained=True, limit=DRIFT_SAMPLE)
        known = await self._store.experiences.texts(kernel, untrained=False, limit=DRIFT_SAMPLE)
        if not new or not known:
            return None
        return kl_divergence(word_counts(new), word_counts(known))

    async def decision(self, kernel: Kernel) -> Decision:
        config = KernelConfig.model_validate(kernel.config)
        active = await self._store.runs.active_for_kernel(kernel.name)
        recent = await self._store.runs.recent_final(kernel.name, limit=max(20, config.auto.breaker_failures * 2))
        inputs = PolicyInputs(
            now=self._store.db.clock.now(),
            untrained=await self._store.experiences.count_untrained(kernel.name),
            estop=self._layout.estop.exists(),
            active_run=active.id if active else None,
            recent_runs=[RunOutcome(r.status, r.finished_at, r.trigger) for r in recent],
            breaker_reset_at=kernel.breaker_reset_at,
            converged=kernel.status == "converged",
            drift=await self.drift(kernel.name) if kernel.status == "converged" else None,
            local_tz=self._local_tz,
        )
        return decide(config.auto, inputs)

    async def check(self, name: str) -> Run | None:
        """Start an automatic run if one is due; a converged kernel whose new data differs becomes active again."""
        kernel = await self._store.kernels.get(name)
        config = KernelConfig.model_validate(kernel.config)
        if not config.auto.enabled or kernel.status == "paused":
            return None
        if kernel.status == "converged":
            drift = await self.drift(name)
            if drift is not None and drift > config.auto.drift_threshold:
                log.info("kernel %s: new experiences differ (drift %.2f); it is no longer converged", name, drift)
                await self._store.kernels.set_status(name, "active")
                kernel = await self._store.kernels.get(name)
        decision = await self.decision(kernel)
        if not decision.due:
            return None
        run, existing = await self._dispatcher.request(name, trigger="auto")
        if not existing:
            log.info("kernel %s: automatic run %s (%s)", name, run.id, "; ".join(decision.reasons))
        return run

    async def check_quietly(self, name: str) -> str | None:
        """`check`, for callers whose own work must not fail for it: the run started, or None (errors logged)."""
        try:
            run = await self.check(name)
        except Exception:
            log.exception("auto-training check failed for kernel %s", name)
            return None
        return run.id if run is not None else None

    async def check_all(self) -> None:
        for kernel in await self._store.kernels.all():
            try:
                await self.check(kernel.name)
            except Exception:
                log.exception("auto-training check failed for kernel %s", kernel.name)

    async def after_run(self, run: Run) -> None:
        """Judge convergence once a run has ended; a converged kernel's deployed version is kept forever."""
        kernel = await self._store.kernels.get(run.kernel)
        if kernel.status == "paused":
            return
        auto = KernelConfig.model_validate(kernel.config).auto
        recent = await self._store.runs.recent_final(kernel.name, limit=auto.converge_runs * 3)
        verdict = judge(
            [{"status": r.status, "metrics": r.metrics, "gates": r.gates} for r in recent],
            auto.converge_runs,
            auto.converge_margin,
            auto.converge_std,
        )
        status: KernelStatus = "converged" if verdict.converged else "active"
        if status != kernel.status:
            log.info("kernel %s is now %s: %s", kernel.name, status, verdict.reason)
            await self._store.kernels.set_status(kernel.name, status)
        if verdict.converged and kernel.deployed_version is not None:
            await self._store.versions.mark_converged(kernel.name, kernel.deployed_version)
            folder = KernelFiles(self._layout, kernel.name).version_dir(kernel.deployed_version)
            if folder.is_dir():
                write_atomic(folder / KernelFiles.KEEP_MARKER, f"converged after run {run.id}\n".encode())
        await self.check(kernel.name)
