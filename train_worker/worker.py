"""`engrain worker`: process training requests until none is left, then exit.

For each run (the lifecycle is `train_worker/lifecycle.py`): claim `pending.json`, take the training
lease so the model host frees its memory, train with `learning/`, evaluate against the gates, deploy if
they pass (only over the version the run started from), release the lease on every way out, and write
`result.json` atomically. A claimed run without a result (the worker was killed, or stopped on SIGTERM
after checkpointing) is resumed by the next worker, up to `max_resume_attempts` starts.

Stops are checked in every phase: SIGTERM, a cancel (`runs/<id>/cancel`) and the e-stop (`ESTOP`) set a
process-wide request (`learning.interrupt`) that every long loop checks between batches; training writes a
checkpoint first. SIGTERM and the e-stop leave the run to resume; a cancel ends it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from learning import interrupt
from train_worker import faults, lifecycle
from train_worker.auth_token import load_or_create_token
from train_worker.deploy import KernelFiles
from train_worker.host_control import HostController, controller_for
from train_worker.lease import SERVING, UNLOADED, Lease, clear_dead_lease, host_status, wait_for_host
from train_worker.lifecycle import RunFiles
from train_worker.locks import worker_lock
from train_worker.protocol import (
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
WATCH_EVERY_S = 0.2  # how often a running run looks for its cancel marker and the e-stop


class Interrupted(Exception):
    """SIGTERM (or the e-stop) stopped the run; it was checkpointed and is left claimed for the next worker."""


class EventLog:
    """Appends progress events, continuing the sequence across worker restarts."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        events, _, _ = read_events(path, 0)
        self._seq = max((e.seq for e in events), default=-1) + 1
        self._last_training = 0.0
        self._last_step: int | None = None

    def emit(self, phase: Phase, **fields: Any) -> None:
        event = ProgressEvent(run_id=self.run_id, seq=self._seq, ts=datetime.now(UTC), phase=phase, **fields)
        append_event(self.path, event)
        self._seq += 1

    def training(self, step: int, total: int, final: bool = False, **fields: Any) -> None:
        """Per-step progress, at most twice a second, and always the step training ended on (early stop included),
        so a curve never lacks its end."""
        now = time.monotonic()
        if step == self._last_step or (not final and step < total and now - self._last_training < 0.5):
            return
        if fields.get("loss") is not None:  # a step without a loss (the set-up) must not hold back the first one
            self._last_training = now
        self._last_step = step
        self.emit("training", step=step, total_steps=total, **_finite(fields))


class StopWatch(threading.Thread):
    """Turns a run's cancel marker and the e-stop file into a stop request while the run works."""

    def __init__(self, files: RunFiles) -> None:
        super().__init__(name="engrain-stop-watch", daemon=True)
        self._files = files
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(WATCH_EVERY_S):
            if self._files.cancel_requested():
                interrupt.request("cancel")
            elif lifecycle.estopped(self._files.layout):
                interrupt.request("estop")

    def stop(self) -> None:
        self._done.set()
        self.join(2)


class Worker:
    def __init__(self, settings: Settings, controller: HostController | None = None) -> None:
        self.settings = settings
        self.layout: Layout = settings.layout
        self.controller = controller or controller_for(settings)
        self._sigterm = False
        self._abortable = False
        self._diverged: str | None = None

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
        interrupt.clear()
        try:
            lifecycle.sweep_leftovers(self.layout)
            clear_dead_lease(self.layout)
            # A SIGTERM between runs just stops the loop: what waits is picked up by the next worker.
            while not self._sigterm:
                run_id = self.next_run()
                if run_id is None:
                    if lifecycle.estopped(self.layout) and self.layout.pending.exists():
                        self._wait_out_estop()  # a request waits; no run starts while ESTOP exists
                        continue
                    break
                try:
                    self.process(run_id)
                except Interrupted as stop:
                    if self.stopping():
                        log.warning("run %s interrupted; its checkpoint resumes with the next worker", run_id)
                        return EXIT_INTERRUPTED
                    log.warning("run %s paused (%s); it resumes once the e-stop file is removed", run_id, stop)
            return EXIT_INTERRUPTED if self._sigterm and self._has_work() else 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.release()

    def stopping(self) -> bool:
        """SIGTERM or SIGINT arrived: finish what cannot be cut short, then exit."""
        return self._sigterm

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: checkpointing and stopping", signal.Signals(signum).name)
        self._sigterm = True
        interrupt.request("sigterm")
        if self._abortable:
            # Loading a model has no batch boundaries; nothing it writes is half-visible (atomic caches).
            raise interrupt.StopRequested("sigterm")

    @contextlib.contextmanager
    def _abort_on_signal(self) -> Iterator[None]:
        self._abortable = True
        try:
            if self._sigterm:
                raise interrupt.StopRequested("sigterm")
            yield
        finally:
            self._abortable = False

    def _has_work(self) -> bool:
        return self.layout.pending.exists() or any(self.layout.active.glob("r-*"))

    def _wait_out_estop(self, files: RunFiles | None = None) -> None:
        """Wait while ESTOP exists; a SIGTERM, or a cancel of the run held, ends the wait early."""
        log.warning("the e-stop file %s exists: waiting for an operator to remove it", self.layout.estop)
        while lifecycle.estopped(self.layout) and not self._sigterm:
            if files is not None and files.cancel_requested():
                return
            time.sleep(0.2)

    def next_run(self) -> str | None:
        """A claimed run left without a result comes first; then the pending request, claimed here."""
        waiting = lifecycle.resumable(self.layout)
        if waiting:
            return waiting[0]
        if lifecycle.estopped(self.layout):
            return None
        claimed = lifecycle.claim(self.layout)
        if claimed is not None:
            faults.point("claimed")
        return claimed.run_id if claimed is not None else None

    # -- one run -------------------------------------------------------------------------------

    def process(self, run_id: str) -> None:
        run_dir = self.layout.run_dir(run_id)
        log_path = run_dir / "worker.log"
        os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            self._process(RunFiles(self.layout, run_id))
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    def _process(self, files: RunFiles) -> None:
        run_id, run_dir = files.run_id, files.dir
        if not self._sigterm:
            interrupt.clear()
        self._diverged = None
        state = self._load_state(run_id)
        if state.host_action is not None and not state.host_restored:
            # The last worker died holding the host down; it is stopped again below if needed.
            state = self.restore_host(state)
        state = self._save_state(state, attempts=state.attempts + 1, worker_pid=os.getpid())
        events = EventLog(run_dir / "events.jsonl", run_id)
        started = datetime.now(UTC)
        try:
            request = read_model(files.request, TrainRequest)
        except ProtocolError as exc:
            if files.request.exists():
                quarantine(files.request, self.layout.quarantine, str(exc))
            self._finish(run_id, None, "failed", started, error=f"the claimed request is unreadable: {exc}")
            return
        if files.deploy_committed():
            events.emit(
                "resumed", message=f"attempt {state.attempts}: a deploy was committed when the last worker died"
            )
            if self._resume_deploy(files, request, started):
                events.emit("finished", message="the committed deploy is complete")
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
        if files.cancel_requested():
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
        if lifecycle.estopped(self.layout):
            events.emit("held", message=f"the e-stop file {self.layout.estop} exists: waiting for it to go")
            self._wait_out_estop(files)
            if self._sigterm:
                state = self._save_state(state, interruptions=state.interruptions + 1)
                raise Interrupted("sigterm")
            if files.cancel_requested():
                self._finish(run_id, request.kernel, "cancelled", started, error="cancelled before training began")
                return

        watch = StopWatch(files)
        watch.start()
        lease = Lease(self.layout, run_id)
        outcome: dict[str, Any] = {}
        try:
            events.emit("stopping_host", message=f"freeing memory ({self.controller.name})")
            faults.point("stopping_host")
            state = self._free_host(lease, state)
            outcome = self._train_and_deploy(request, items, files, events)
        except interrupt.StopRequested as stop:
            reason = interrupt.requested() or str(stop)
            if reason == "cancel":
                outcome = {"status": "cancelled", "error": f"cancelled during {self._phase(events)}"}
            elif reason == "diverged":
                outcome = {"status": "failed", "error": self._diverged or "training diverged"}
            else:
                state = self._save_state(state, interruptions=state.interruptions + 1)
                events.emit("interrupted", message=f"stopped by {reason}; resumes from the last checkpoint")
                raise Interrupted(reason) from None
        except Exception as exc:
            log.exception("run %s failed", run_id)
            outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            watch.stop()
            events.emit("restarting_host")
            state = self.restore_host(state, lease)
        if outcome.get("status") in ("cancelled", "failed"):
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        self._finish(run_id, request.kernel, started=started, host_restored=state.host_restored, **outcome)
        events.emit("finished", message=outcome.get("status"))

    def _phase(self, events: EventLog) -> str:
        seen, _, _ = read_events(events.path, 0)
        return seen[-1].phase if seen else "the run"

    def _free_host(self, lease: Lease, state: RunState) -> RunState:
        """Take the lease, do the controller's part, then wait (bounded) for the host to unload."""
        if self.controller.uses_lease:
            lease.acquire()
        # Recorded before the controller acts, so a stop or crash in the middle still undoes it.
        undo = {"systemd": "stopped", "http": "unloaded", "lease": "leased"}.get(self.controller.name)
        state = self._save_state(state, host_action=undo, host_restored=undo is None)
        action = self.controller.stop(interrupt.check)
        state = self._save_state(state, host_action=action, host_restored=False)
        if self.controller.uses_lease and self.settings.host_unload_wait_s > 0:
            token, _ = load_or_create_token(self.settings)
            unloaded = wait_for_host(
                lambda: host_status(self.layout, token), UNLOADED, self.settings.host_unload_wait_s, interrupt.check
            )
            if not unloaded:
                log.warning(
                    "the model host did not report itself unloaded within %.0f s (busy answering?); training "
                    "anyway. It unloads as soon as it can and reloads after the run.",
                    self.settings.host_unload_wait_s,
                )
        return state

    def _train_and_deploy(
        self, request: TrainRequest, items: list[BatchItem], files: RunFiles, events: EventLog
    ) -> dict[str, Any]:
        interrupt.check()  # importing torch takes seconds: not for a run that is already told to stop
        # Deferred: torch and transformers load only once a run really starts.
        from learning.anchors import baseline_path
        from learning.model_loading import ensure_base_model
        from learning.pipeline import evaluate_candidate, load_bundle, release, run_training
        from learning.reports import Progress

        run_dir = files.dir
        kernel = KernelFiles(self.layout, request.kernel)
        events.emit("loading", message="loading the base model")
        faults.point("loading")
        base = None if request.base_model == "embedded" else request.base_model
        with self._abort_on_signal():
            if not baseline_path(self.layout.cache, ensure_base_model(base, self.layout.models)).exists():
                events.emit(
                    "baseline",
                    message="first run on this base model: computing its baseline (anchor answers, probes, "
                    "reference perplexity) once, a few minutes on a CPU",
                )
                faults.point("baseline")
            bundle = load_bundle(
                base, self.layout.models, self.layout.cache, self.settings.torch_threads, self.settings.device
            )
        # Continue from what serves now: a rollback since the request moved it.
        parent = kernel.current()
        previous = kernel.version_dir(parent) if parent is not None else None
        new = [i for i in items if i.role == "new"]
        earlier = [i for i in items if i.role == "replay"]

        first_step = [True]

        def on_progress(p: Progress) -> None:
            if p.loss is not None and not math.isfinite(p.loss):
                self._diverged = (
                    f"training diverged: the loss became {p.loss} at step {p.step}; lower learning_rate "
                    f"(now {request.settings.learning_rate}) or grad_clip and train again"
                )
                interrupt.request("diverged")
            fields = {"epoch": p.epoch, "loss": p.loss, "tokens_per_s": p.tokens_per_s, "eta_s": p.eta_s}
            if p.phase == "fisher":
                events.emit("training", step=p.step, total_steps=p.total_steps, message="computing Fisher information")
            else:
                events.training(p.step, p.total_steps, final=p.phase == "done", **fields)
            if p.phase == "train" and first_step[0]:
                first_step[0] = False
                faults.point("training")

        candidate = run_training(
            bundle,
            new,
            earlier,
            request.settings,
            must_keep=request.must_keep,
            previous_version=previous,
            checkpoint_dir=run_dir / "checkpoints",
            progress=on_progress,
            should_stop=lambda: interrupt.requested() is not None,
        )
        result: dict[str, Any] = {
            "base_version": parent,
            "steps": candidate.outcome.steps,
            "tokens_per_s": _finite_or_none(candidate.outcome.tokens_per_s),
            "stop_reason": candidate.outcome.stopped,
            "losses": [
                ItemLoss(experience_id=int(k), loss=v)
                for k, v in candidate.outcome.example_losses.items()
                if k.isdigit() and math.isfinite(v)
            ],
            "replayed": [int(k) for k in candidate.outcome.replayed if k.isdigit()],
        }
        if candidate.outcome.stopped == "interrupted":
            raise interrupt.StopRequested(interrupt.requested() or "stop")

        events.emit("evaluating", message=f"checking {len(new)} new and {len(earlier)} earlier facts")
        faults.point("evaluating")
        report = evaluate_candidate(bundle, candidate, new, earlier, request.gates, request.output_schema)
        write_atomic(run_dir / "eval_report.json", report.model_dump_json(indent=1).encode())
        metrics = {
            k: _finite_or_none(v)
            for k, v in report.metrics.model_dump().items()
            if isinstance(v, float | int) or v is None
        }
        result |= {"metrics": metrics, "gates": report.gates.gates, "lost": report.metrics.lost}
        if not report.gates.passed:
            release(bundle, candidate)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            return {**result, "status": "rejected", "error": f"not deployed: {report.gates.summary()}"}
        try:
            return self._deploy(request, files, kernel, candidate, report, result, parent, events)
        finally:
            release(bundle, candidate)

    def _deploy(
        self,
        request: TrainRequest,
        files: RunFiles,
        kernel: KernelFiles,
        candidate: Any,
        report: Any,
        result: dict[str, Any],
        parent: int | None,
        events: EventLog,
    ) -> dict[str, Any]:
        """Install and switch to the new version, under the kernel lock, only over the version trained from.

        `deploy.json` is the commit point: before it a cancel stops the deploy, after it the deploy
        completes (also across a crash: the next worker finishes it).
        """
        from learning.pipeline import save_version

        events.emit("deploying")
        with kernel.locked():
            if files.cancel_requested():
                return {**result, "status": "cancelled", "error": "cancelled after evaluation; nothing was deployed"}
            now = kernel.current()
            if now != parent:
                return {
                    **result,
                    "status": "rejected",
                    "error": f"not deployed: {request.kernel} moved from {_vname(parent)} to {_vname(now)} while "
                    "this run trained (a rollback or another deploy); it is not overridden. Train again to build "
                    "on what serves now.",
                }
            version = kernel.next_version()
            target = kernel.version_dir(version)
            committed = RunResult(
                run_id=request.run_id,
                kernel=request.kernel,
                status="deployed",
                finished_at=datetime.now(UTC),
                version=version,
                version_path=str(target.relative_to(self.layout.home)),
                **result,
            )
            write_model(files.deploy, committed)
            staged = kernel.versions_dir / f".v{version}.staging"
            try:
                faults.point("deploying", files.deploy)
                save_version(candidate, report, staged)
                meta = VersionMeta(
                    kernel=request.kernel,
                    version=version,
                    run_id=request.run_id,
                    parent_version=parent,
                    base_model=request.base_model,
                    created_at=datetime.now(UTC),
                    metrics=result["metrics"],
                    gates=report.gates.gates,
                )
                write_model(staged / "meta.json", meta)
                kernel.install(staged, version)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                files.deploy.unlink(missing_ok=True)  # nothing was installed: the commit is void
                raise
            faults.point("switch")
            kernel.switch(version)
            pruned = kernel.prune(self.settings.keep_versions)
        shutil.rmtree(files.dir / "checkpoints", ignore_errors=True)
        log.info("run %s deployed %s v%d", request.run_id, request.kernel, version)
        return {
            **result,
            "status": "deployed",
            "version": version,
            "version_path": committed.version_path,
            "pruned_versions": pruned,
        }

    def _resume_deploy(self, files: RunFiles, request: TrainRequest, started: datetime) -> bool:
        """A worker died after committing a deploy: finish it, or void it if nothing was installed.

        True when the run ended here; False when it goes on as an ordinary resume.
        """
        try:
            committed = read_model(files.deploy, RunResult)
        except ProtocolError as exc:
            quarantine(files.deploy, self.layout.quarantine, str(exc))
            return False
        kernel = KernelFiles(self.layout, request.kernel)
        version = committed.version
        with kernel.locked():
            installed = (
                version is not None and version in kernel.versions() and _meta_run(kernel, version) == request.run_id
            )
            if installed:
                now = kernel.current()
                if now == committed.base_version:
                    kernel.switch(version)  # the crash came between install and switch
                    now = version
                if now == version:
                    pruned = kernel.prune(self.settings.keep_versions)
                    log.info("run %s: finished its deploy of v%s after a crash", request.run_id, version)
                    result = committed.model_copy(
                        update={"finished_at": datetime.now(UTC), "started_at": started, "pruned_versions": pruned}
                    )
                    self._publish(result)
                    shutil.rmtree(files.dir / "checkpoints", ignore_errors=True)
                    return True
                self._finish(
                    request.run_id,
                    request.kernel,
                    "rejected",
                    started,
                    error=f"not deployed: {request.kernel} was moved to {_vname(now)} after this run's worker died "
                    f"mid-deploy; v{version} is kept on disk but not served",
                )
                return True
            for leftover in kernel.versions_dir.glob(f".v{version}.*") if kernel.versions_dir.is_dir() else []:
                shutil.rmtree(leftover, ignore_errors=True)
            files.deploy.unlink(missing_ok=True)
            log.info("run %s: its interrupted deploy never installed v%s; the run goes on", request.run_id, version)
            return False

    # -- bookkeeping ---------------------------------------------------------------------------

    def _load_state(self, run_id: str) -> RunState:
        path = self.layout.run_dir(run_id) / "state.json"
        if path.exists():
            try:
                return read_model(path, RunState)
            except ProtocolError as exc:
                quarantine(path, self.layout.quarantine, str(exc))
                log.error("run %s: state.json unreadable (%s); quarantined, starting its count afresh", run_id, exc)
        return RunState(run_id=run_id, updated_at=datetime.now(UTC))

    def _save_state(self, state: RunState, **changes: Any) -> RunState:
        state = state.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
        write_model(self.layout.run_dir(state.run_id) / "state.json", state)
        return state

    def restore_host(self, state: RunState, lease: Lease | None = None) -> RunState:
        """Release the lease (the host reloads itself) and undo what the controller did.

        Unless the worker is stopping, it then waits (bounded) until the host serves again, so a run that
        is reported finished finds its kernel answering.
        """
        released = lease is not None and lease.held
        if lease is not None and lease.held:
            lease.release()
        restored = True
        if state.host_action is not None:
            try:
                restored = self.controller.start(state.host_action)
            except Exception:
                log.exception("bringing the model host back failed")
                restored = False
        if released and not self._sigterm and self.settings.host_unload_wait_s > 0:
            token, _ = load_or_create_token(self.settings)
            back = wait_for_host(lambda: host_status(self.layout, token), SERVING, self.settings.host_unload_wait_s)
            if not back:
                log.warning("the model host has not reported itself serving again yet; it keeps reloading by itself")
        return self._save_state(state, host_restored=restored)

    def _finish(self, run_id: str, kernel: str | None, status: ResultStatus, started: datetime, **fields: Any) -> None:
        """Write the result (the run folder's copy, then the server's inbox) and release the claim."""
        if kernel is None:  # the request itself was unreadable
            kernel = lifecycle.kernel_of(self.layout, run_id)
        fields.setdefault("finished_at", datetime.now(UTC))
        self._publish(RunResult(run_id=run_id, kernel=kernel, status=status, started_at=started, **fields))

    def _publish(self, result: RunResult) -> None:
        lifecycle.finish(self.layout, result)
        log.info("run %s finished: %s%s", result.run_id, result.status, f" ({result.error})" if result.error else "")


def restore_host_after_crash(settings: Settings) -> bool:
    """Bring the host back for any claimed run whose worker died holding it down (ExecStopPost, watcher)."""
    lock = worker_lock(settings.layout.locks)
    if lock.held_elsewhere():
        return True  # a live worker owns the host right now
    clear_dead_lease(settings.layout)
    worker = Worker(settings)
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


def _meta_run(kernel: KernelFiles, version: int) -> str | None:
    try:
        return kernel.meta(version).run_id
    except ProtocolError:
        return None


def _vname(version: int | None) -> str:
    return "the bare base model" if version is None else f"v{version}"


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _finite(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: _finite_or_none(v) for k, v in fields.items()}
