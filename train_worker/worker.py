"""`engrain worker`: process training requests until none is left, then exit.

For each run: claim `pending.json` by renaming it into the run folder, free the model host, train with
`learning/`, evaluate against the gates, deploy if they pass, always bring the host back, and write
`result.json` atomically. A claimed run without a result (the worker was killed, or stopped by SIGTERM
after checkpointing) is resumed by the next worker, up to `max_resume_attempts` starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from train_worker.deploy import KernelFiles
from train_worker.host_control import HostController, controller_for
from train_worker.locks import worker_lock
from train_worker.protocol import (
    CANCEL_MARKER,
    BatchItem,
    BatchManifest,
    ItemLoss,
    Phase,
    ProgressEvent,
    ProtocolError,
    ResultStatus,
    RunResult,
    RunState,
    TrainRequest,
    VersionMeta,
    append_event,
    check_run_id,
    quarantine,
    read_batch,
    read_events,
    read_model,
    write_atomic,
    write_model,
)
from train_worker.settings import Layout, Settings

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a run was checkpointed on SIGTERM and will resume


class Interrupted(Exception):
    """SIGTERM arrived: the run was checkpointed and is left claimed for the next worker."""


class EventLog:
    """Appends progress events, continuing the sequence across worker restarts."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        events, _, _ = read_events(path, 0)
        self._seq = max((e.seq for e in events), default=-1) + 1
        self._last_training = 0.0

    def emit(self, phase: Phase, **fields: Any) -> None:
        event = ProgressEvent(run_id=self.run_id, seq=self._seq, ts=datetime.now(UTC), phase=phase, **fields)
        append_event(self.path, event)
        self._seq += 1

    def training(self, step: int, total: int, **fields: Any) -> None:
        """Per-step progress, at most twice a second (and always the last step)."""
        now = time.monotonic()
        if step < total and now - self._last_training < 0.5:
            return
        self._last_training = now
        self.emit("training", step=step, total_steps=total, **fields)


class Worker:
    def __init__(self, settings: Settings, controller: HostController | None = None) -> None:
        self.settings = settings
        self.layout: Layout = settings.layout
        self.controller = controller or controller_for(settings)
        self._sigterm = False

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        self.layout.ensure()
        lock = worker_lock(self.layout.locks)
        if not lock.acquire():
            holder = lock.holder()
            log.warning(
                "another worker%s is already training; this one exits (requests wait for it)",
                f" (pid {holder})" if holder else "",
            )
            return 0
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            # A SIGTERM between runs just stops the loop: what waits is picked up by the next worker.
            while not self._sigterm:
                run_id = self.next_run()
                if run_id is None:
                    break
                try:
                    self.process(run_id)
                except Interrupted:
                    log.warning("run %s interrupted; its checkpoint resumes with the next worker", run_id)
                    return EXIT_INTERRUPTED
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.release()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: checkpointing and stopping", signal.Signals(signum).name)
        self._sigterm = True

    def next_run(self) -> str | None:
        """A claimed run left without a result comes first; then the pending request, claimed here."""
        for marker in sorted(self.layout.active.iterdir()) if self.layout.active.is_dir() else []:
            try:
                run_id = check_run_id(marker.name)
            except ValueError:
                log.error("ignoring stray file %s in %s", marker.name, self.layout.active)
                continue
            if not (self.layout.run_dir(run_id) / "result.json").exists():
                return run_id
            marker.unlink(missing_ok=True)  # result written, marker not yet removed: finish the cleanup
        return self._claim_pending()

    def _claim_pending(self) -> str | None:
        pending = self.layout.pending
        try:
            request = read_model(pending, TrainRequest)
        except ProtocolError as exc:
            if not pending.exists():
                return None
            moved = quarantine(pending, self.layout.quarantine, str(exc))
            log.error("quarantined %s as %s: %s", pending.name, moved.name, exc)
            return None
        run_dir = self.layout.run_dir(request.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(pending, run_dir / "request.json")  # the claim: atomic, so exactly one worker wins
        except FileNotFoundError:
            return None  # withdrawn by a cancel, or claimed elsewhere
        write_atomic(self.layout.active / request.run_id, b"")
        log.info("claimed run %s for kernel %s", request.run_id, request.kernel)
        return request.run_id

    # -- one run -------------------------------------------------------------------------------

    def process(self, run_id: str) -> None:
        run_dir = self.layout.run_dir(run_id)
        handler = logging.FileHandler(run_dir / "worker.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            self._process(run_id, run_dir)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    def _process(self, run_id: str, run_dir: Path) -> None:
        state = self._load_state(run_id)
        if state.host_action is not None and not state.host_restored:
            # The last worker died holding the host down; it is stopped again below if needed.
            state = self.restore_host(state)
        state = self._save_state(state, attempts=state.attempts + 1, worker_pid=os.getpid())
        events = EventLog(run_dir / "events.jsonl", run_id)
        started = datetime.now(UTC)
        try:
            request = read_model(run_dir / "request.json", TrainRequest)
        except ProtocolError as exc:
            self._finish(run_id, None, "failed", started, error=f"the claimed request is unreadable: {exc}")
            return
        # Graceful stops (SIGTERM, checkpointed) do not count: only workers that died on the run do.
        crashes = state.attempts - 1 - state.interruptions
        if crashes >= self.settings.max_resume_attempts:
            error = (
                f"workers died {crashes} times on this run (killed, or out of memory); giving up after "
                f"ENGRAIN_MAX_RESUME_ATTEMPTS={self.settings.max_resume_attempts}. See {run_dir / 'worker.log'}."
            )
            self._finish(run_id, request.kernel, "failed", started, error=error)
            return
        events.emit("claimed" if state.attempts == 1 else "resumed", message=f"attempt {state.attempts}")
        if self._cancelled(run_dir):
            self._finish(run_id, request.kernel, "cancelled", started, error="cancelled before training began")
            return
        try:
            manifest = read_model(run_dir / "manifest.json", BatchManifest)
            items = read_batch(run_dir, manifest)
        except ProtocolError as exc:
            for name in ("batch.jsonl", "manifest.json"):
                if (run_dir / name).exists():
                    quarantine(run_dir / name, self.layout.quarantine, str(exc))
            self._finish(run_id, request.kernel, "failed", started, error=f"the run's batch is unusable: {exc}")
            return

        events.emit("stopping_host", message=f"freeing memory ({self.controller.name})")
        try:
            action = self.controller.stop()
        except Exception as exc:
            self._finish(run_id, request.kernel, "failed", started, error=f"could not stop the model host: {exc}")
            return
        state = self._save_state(state, host_action=action, host_restored=False)
        outcome: dict[str, Any] = {}
        try:
            outcome = self._train_and_deploy(request, items, run_dir, events)
        except Interrupted:
            state = self._save_state(state, interruptions=state.interruptions + 1)
            raise
        except Exception as exc:
            log.exception("run %s failed", run_id)
            outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            events.emit("restarting_host")
            state = self.restore_host(state)
        self._finish(run_id, request.kernel, started=started, host_restored=state.host_restored, **outcome)
        events.emit("finished", message=outcome.get("status"))

    def _train_and_deploy(
        self, request: TrainRequest, items: list[BatchItem], run_dir: Path, events: EventLog
    ) -> dict[str, Any]:
        # Deferred: torch and transformers load only once a run really starts.
        from learning.anchors import baseline_path
        from learning.model_loading import ensure_base_model
        from learning.pipeline import evaluate_candidate, load_bundle, release, run_training, save_version
        from learning.reports import Progress

        files = KernelFiles(self.layout, request.kernel)
        events.emit("loading", message="loading the base model")
        base = None if request.base_model == "embedded" else request.base_model
        if not baseline_path(self.layout.cache, ensure_base_model(base, self.layout.models)).exists():
            events.emit(
                "loading",
                message="first run on this base model: computing its baseline (anchor answers, probes, "
                "reference perplexity) once, a few minutes on a CPU",
            )
        bundle = load_bundle(
            base, self.layout.models, self.layout.cache, self.settings.torch_threads, self.settings.device
        )
        # Continue from what serves now: a rollback since the request moved it.
        parent = files.current()
        previous = files.version_dir(parent) if parent is not None else None
        new = [i for i in items if i.role == "new"]
        earlier = [i for i in items if i.role == "replay"]

        def on_progress(p: Progress) -> None:
            fields = {"epoch": p.epoch, "loss": p.loss, "tokens_per_s": p.tokens_per_s, "eta_s": p.eta_s}
            if p.phase == "fisher":
                events.emit("training", step=p.step, total_steps=p.total_steps, message="computing Fisher information")
            else:
                events.training(p.step, p.total_steps, **fields)

        def should_stop() -> bool:
            return self._sigterm or self._cancelled(run_dir)

        candidate = run_training(
            bundle,
            new,
            earlier,
            request.settings,
            must_keep=request.must_keep,
            previous_version=previous,
            checkpoint_dir=run_dir / "checkpoints",
            progress=on_progress,
            should_stop=should_stop,
        )
        result: dict[str, Any] = {
            "base_version": parent,
            "steps": candidate.outcome.steps,
            "tokens_per_s": candidate.outcome.tokens_per_s,
            "stop_reason": candidate.outcome.stopped,
            "losses": [
                ItemLoss(experience_id=int(k), loss=v)
                for k, v in candidate.outcome.example_losses.items()
                if k.isdigit()
            ],
            "replayed": [int(k) for k in candidate.outcome.replayed if k.isdigit()],
        }
        if candidate.outcome.stopped == "interrupted":
            if self._cancelled(run_dir):
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                return {**result, "status": "cancelled", "error": "cancelled during training"}
            events.emit("interrupted", step=candidate.outcome.steps, total_steps=candidate.outcome.total_steps)
            raise Interrupted

        events.emit("evaluating", message=f"checking {len(new)} new and {len(earlier)} earlier facts")
        report = evaluate_candidate(bundle, candidate, new, earlier, request.gates, request.output_schema)
        write_atomic(run_dir / "eval_report.json", report.model_dump_json(indent=1).encode())
        metrics = {k: v for k, v in report.metrics.model_dump().items() if isinstance(v, float | int) or v is None}
        result |= {"metrics": metrics, "gates": report.gates.gates, "lost": report.metrics.lost}
        if not report.gates.passed:
            release(bundle, candidate)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            return {**result, "status": "rejected", "error": f"not deployed: {report.gates.summary()}"}

        events.emit("deploying")
        with files.locked():
            version = files.next_version()
            staged = files.versions_dir / f".v{version}.staging"
            save_version(candidate, report, staged)
            meta = VersionMeta(
                kernel=request.kernel,
                version=version,
                run_id=request.run_id,
                parent_version=parent,
                base_model=request.base_model,
                created_at=datetime.now(UTC),
                metrics=metrics,
                gates=report.gates.gates,
            )
            write_model(staged / "meta.json", meta)
            target = files.install(staged, version)
            files.switch(version)
            pruned = files.prune(self.settings.keep_versions)
        release(bundle, candidate)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        log.info("run %s deployed %s v%d", request.run_id, request.kernel, version)
        return {
            **result,
            "status": "deployed",
            "version": version,
            "version_path": str(target.relative_to(self.layout.home)),
            "pruned_versions": pruned,
        }

    # -- bookkeeping ---------------------------------------------------------------------------

    def _cancelled(self, run_dir: Path) -> bool:
        return (run_dir / CANCEL_MARKER).exists()

    def _load_state(self, run_id: str) -> RunState:
        path = self.layout.run_dir(run_id) / "state.json"
        if path.exists():
            try:
                return read_model(path, RunState)
            except ProtocolError as exc:
                log.error("run %s: state.json unreadable (%s); starting its count afresh", run_id, exc)
        return RunState(run_id=run_id, updated_at=datetime.now(UTC))

    def _save_state(self, state: RunState, **changes: Any) -> RunState:
        state = state.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
        write_model(self.layout.run_dir(state.run_id) / "state.json", state)
        return state

    def restore_host(self, state: RunState) -> RunState:
        restored = True
        if state.host_action is not None:
            try:
                restored = self.controller.start(state.host_action)
            except Exception:
                log.exception("bringing the model host back failed")
                restored = False
        return self._save_state(state, host_restored=restored)

    def _finish(self, run_id: str, kernel: str | None, status: ResultStatus, started: datetime, **fields: Any) -> None:
        """Write the result (the run folder's copy, then the server's inbox) and release the claim."""
        run_dir = self.layout.run_dir(run_id)
        if kernel is None:  # the request itself was unreadable
            kernel = _kernel_from_dir(run_dir)
        result = RunResult(
            run_id=run_id,
            kernel=kernel,
            status=status,
            started_at=started,
            finished_at=datetime.now(UTC),
            **fields,
        )
        write_model(run_dir / "result.json", result)
        write_model(self.layout.results / f"{run_id}.json", result)
        (self.layout.active / run_id).unlink(missing_ok=True)
        log.info("run %s finished: %s%s", run_id, status, f" ({result.error})" if result.error else "")


def restore_host_after_crash(settings: Settings) -> bool:
    """Bring the host back for any claimed run whose worker died holding it down (ExecStopPost, watcher)."""
    worker = Worker(settings)
    lock = worker_lock(settings.layout.locks)
    if lock.held_elsewhere():
        return True  # a live worker owns the host right now
    ok = True
    for marker in sorted(settings.layout.active.glob("r-*")):
        state_path = settings.layout.run_dir(marker.name) / "state.json"
        if not state_path.exists():
            continue
        try:
            state = read_model(state_path, RunState)
        except ProtocolError:
            continue
        if state.host_action is not None and not state.host_restored:
            ok = worker.restore_host(state).host_restored and ok
    return ok


def _kernel_from_dir(run_dir: Path) -> str:
    try:
        return read_model(run_dir / "manifest.json", BatchManifest).kernel
    except ProtocolError:
        return "default"
