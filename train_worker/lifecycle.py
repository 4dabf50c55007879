"""The one run lifecycle: every status, the files that hold it, who may move it, and how each crash recovers.

    queued ──server──> requested ──worker: claim──> running ──worker──> evaluating
      │                   │                           │                     │
      └──server──> cancelled <──server: withdraw      └── worker: result.json ──> deployed | rejected
                                                                                  | failed | cancelled

Statuses and the files that hold them (under `$ENGRAIN_HOME`; docs/lifecycle.md draws the same):
- queued: a store row only (another run holds `pending.json`).
- requested: `runs/<id>/batch.jsonl` and `manifest.json`, then `requests/pending.json`.
- running: `requests/active/<id>` and `runs/<id>/request.json`; progress in `runs/<id>/events.jsonl`.
- evaluating: the same; the last event is `evaluating` or `deploying`.
- final (deployed, rejected, failed, cancelled): `runs/<id>/result.json`, copied to
  `requests/results/<id>.json` until the server records it and moves it to `requests/archive/`.

Who may move what:
- The server (under the cross-process dispatch lock, so two servers on one home take turns) creates runs,
  writes requests, withdraws a request it wins the rename of `pending.json` for, records result files,
  and force-finishes a claimed run only while it holds the worker lock itself (no worker can run then).
- The worker (one at a time: the worker lock) claims `pending.json`, resumes claimed runs, and ends them
  by writing `result.json`, then its inbox copy, then removing the active marker, in that order.
- A deploy commits under the kernel's lock by writing `runs/<id>/deploy.json` (the result it will publish);
  a cancel that finds it refuses with a reason, one that comes first stops the deploy.

Crash points and their recovery (nothing waits for a person):
1. The server dies between the store's `requested` and `pending.json`: `reconcile` writes it again.
2. The worker dies after the active marker, before renaming `pending.json`: the next worker finishes the
   claim if `pending.json` still names the run, else drops the marker.
3. A claimed run without a marker (an older engrain crashed between rename and marker): `reconcile` re-arms it.
4. The worker dies during a run: the marker stays; the next worker resumes from the last checkpoint, up to
   `max_resume_attempts` starts. Its training lease names a dead process, so the host reloads by itself.
5. The worker dies between `result.json` and its inbox copy: the server copies it on its next sweep (and
   the next worker does, before it drops the marker).
6. The server dies after recording a result, before archiving it: the next sweep records it again
   (recording is idempotent) and archives it.
7. The worker dies during a deploy: `deploy.json` says which version; the next worker completes the switch
   (or sees it done) and publishes the result without training again, or removes the half-written version.
8. A torn or refused file is quarantined with its reason and recorded; a refused request or result ends
   its run as failed with that reason, so nothing is retried forever.

What is served: `kernels/<name>/current` is the one source of truth (the host follows it, deploys and
rollbacks switch it atomically under the kernel lock). The store's deployed version is reconciled from
it. A deploy only switches `current` if it still points where the run started from, so a rollback during
a run is never silently undone: such a run ends rejected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

from train_worker import faults
from train_worker.deploy import KernelFiles
from train_worker.locks import worker_lock
from train_worker.protocol import (
    CANCEL_MARKER,
    ProtocolError,
    RunResult,
    TrainRequest,
    check_kernel_name,
    check_run_id,
    quarantine,
    read_model,
    write_atomic,
    write_model,
)
from train_worker.settings import Layout

log = logging.getLogger(__name__)

RunStatus = Literal["queued", "requested", "running", "evaluating", "deployed", "rejected", "failed", "cancelled"]
ACTIVE: tuple[RunStatus, ...] = ("queued", "requested", "running", "evaluating")
FINAL: tuple[RunStatus, ...] = ("deployed", "rejected", "failed", "cancelled")
Mover = Literal["server", "worker"]

# (from, to) -> who may make that move; every other move is refused. A worker's moves reach the store
# through its events and its result file; the server's are its own. "server" on a move out of running or
# evaluating is the force-finish of a run whose worker is gone.
MOVES: dict[tuple[RunStatus, RunStatus], tuple[Mover, ...]] = {
    ("queued", "requested"): ("server",),
    ("queued", "cancelled"): ("server",),
    ("queued", "failed"): ("server",),  # its request could not be written
    ("requested", "running"): ("worker",),
    ("running", "evaluating"): ("worker",),
    # A result can arrive before the events that led to it were mirrored: the result decides.
    **{("requested", f): ("worker",) for f in FINAL},
    ("requested", "cancelled"): ("server", "worker"),  # withdrawn, or nothing left to cancel
    ("requested", "failed"): ("server", "worker"),  # refused, or lost past every rewrite
    **{(s, f): ("worker", "server") for s in ("running", "evaluating") for f in FINAL},
}

assert set(get_args(RunStatus)) == {*ACTIVE, *FINAL}

DEPLOY = "deploy.json"  # runs/<id>/deploy.json: a committed deploy (the RunResult it will publish)
WITHDRAWN = "request.withdrawn.json"
STALE_TEMP_S = 3600.0  # temp files older than this belong to nobody alive


def may_move(current: RunStatus, target: RunStatus, who: Mover) -> bool:
    return who in MOVES.get((current, target), ())


class RunFiles:
    """Where one run's lifecycle files live."""

    def __init__(self, layout: Layout, run_id: str) -> None:
        self.layout = layout
        self.run_id = check_run_id(run_id)
        self.dir = layout.run_dir(run_id)
        self.request = self.dir / "request.json"
        self.result = self.dir / "result.json"
        self.deploy = self.dir / DEPLOY
        self.cancel = self.dir / CANCEL_MARKER
        self.state = self.dir / "state.json"
        self.marker = layout.active / run_id
        self.inbox = layout.results / f"{run_id}.json"
        self.archived = layout.archive / f"{run_id}.json"

    def claimed(self) -> bool:
        return self.request.exists()

    def ended(self) -> bool:
        return self.result.exists()

    def cancel_requested(self) -> bool:
        return self.cancel.exists()

    def deploy_committed(self) -> bool:
        return self.deploy.exists()


Observed = Literal["pending", "claiming", "claimed", "unmarked", "ended", "delivered", "recorded", "lost"]


def observe(layout: Layout, run_id: str) -> Observed:
    """What the files say about a run the store holds as active (see the module docstring)."""
    files = RunFiles(layout, run_id)
    if files.ended():
        if files.archived.exists():
            return "recorded"
        return "delivered" if files.inbox.exists() else "ended"
    if files.claimed():
        return "claimed" if files.marker.exists() else "unmarked"
    if files.marker.exists():
        return "claiming"
    if pending_run_id(layout) == run_id:
        return "pending"
    return "lost"


def pending_run_id(layout: Layout) -> str | None:
    try:
        return read_model(layout.pending, TrainRequest).run_id
    except ProtocolError:
        return None


def estopped(layout: Layout) -> bool:
    """While `ESTOP` exists no run starts, and a running one stops at its next check."""
    return layout.estop.exists()


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class Claim:
    run_id: str
    kernel: str


def claim(layout: Layout) -> Claim | None:
    """Claim `pending.json`: the active marker first, then the rename into the run folder.

    A request that fails validation is quarantined; if its run id can be read, the run ends failed with
    the reason (the server would otherwise write the same refused request again).
    """
    pending = layout.pending
    try:
        request = read_model(pending, TrainRequest)
    except ProtocolError as exc:
        if not pending.exists():
            return None
        raw = _lenient(pending)
        moved = quarantine(pending, layout.quarantine, str(exc))
        log.error("quarantined %s as %s: %s", pending.name, moved.name, exc)
        run_id, kernel = _ids(raw)
        if run_id is not None:
            files = RunFiles(layout, run_id)
            if not files.ended() and not files.claimed():
                finish(
                    layout,
                    RunResult(
                        run_id=run_id,
                        kernel=kernel or kernel_of(layout, run_id),
                        status="failed",
                        finished_at=datetime.now(UTC),
                        error=f"the worker refused the run's request and quarantined it as {moved.name}: {exc}",
                    ),
                )
        return None
    files = RunFiles(layout, request.run_id)
    files.dir.mkdir(parents=True, exist_ok=True)
    write_atomic(files.marker, b"")  # first: a crash from here on leaves a marker the next worker sees
    faults.point("claim")
    try:
        os.rename(pending, files.request)  # the claim: atomic, so exactly one worker (or a withdraw) wins
    except FileNotFoundError:
        files.marker.unlink(missing_ok=True)  # withdrawn by a cancel meanwhile
        return None
    log.info("claimed run %s for kernel %s", request.run_id, request.kernel)
    return Claim(request.run_id, request.kernel)


def resumable(layout: Layout) -> list[str]:
    """Claimed runs without a result, oldest first; finishes the bookkeeping of crash points 2, 5 and 6."""
    found = []
    for marker in sorted(layout.active.iterdir()) if layout.active.is_dir() else []:
        try:
            files = RunFiles(layout, marker.name)
        except ValueError:
            log.error("ignoring stray file %s in %s", marker.name, layout.active)
            continue
        if files.ended():
            try:
                read_model(files.result, RunResult)
            except ProtocolError as exc:
                # Torn by the crash that interrupted its writing: the run is resumed, and ends again.
                quarantine(files.result, layout.quarantine, f"{exc} (the run is resumed)")
            else:
                deliver(layout, files.run_id)
                marker.unlink(missing_ok=True)
                continue
        if not files.claimed():
            if pending_run_id(layout) == files.run_id:
                files.dir.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(layout.pending, files.request)  # finish the interrupted claim
            if not files.claimed():
                marker.unlink(missing_ok=True)  # the request was withdrawn before the claim completed
                continue
        found.append(files.run_id)
    return found


def finish(layout: Layout, result: RunResult) -> None:
    """End a run: `result.json` in its folder, then the server's inbox copy, then the marker goes."""
    files = RunFiles(layout, result.run_id)
    write_model(files.result, result)
    faults.point("result", files.result)
    deliver(layout, result.run_id)
    faults.point("finishing", files.inbox)
    files.marker.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(files.deploy)  # published: the deploy it committed is over


def deliver(layout: Layout, run_id: str) -> bool:
    """Put the run's `result.json` in the server's inbox unless it is there, already recorded, or not sound."""
    files = RunFiles(layout, run_id)
    if files.inbox.exists() or files.archived.exists() or not files.ended():
        return False
    try:
        result = read_model(files.result, RunResult)
    except ProtocolError:
        return False  # torn: the next worker quarantines it and resumes the run
    write_model(files.inbox, result)
    return True


# ---------------------------------------------------------------------------------------------
# Server side


def withdraw(layout: Layout, run_id: str) -> bool:
    """Take back `pending.json` if it still names `run_id`: whoever renames it first owns it."""
    if pending_run_id(layout) != run_id:
        return False
    files = RunFiles(layout, run_id)
    files.dir.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(layout.pending, files.dir / WITHDRAWN)
    except FileNotFoundError:
        return False
    return True


def rearm(layout: Layout, run_id: str) -> None:
    """Crash point 3: a claimed run lost its marker; without one no worker would resume it."""
    write_atomic(RunFiles(layout, run_id).marker, b"")


def force_finish(layout: Layout, run_id: str, kernel: str, status: RunStatus, error: str) -> RunResult | None:
    """End a claimed run whose worker is gone, holding the worker lock so none can start meanwhile.

    None when a worker is alive (it must end the run itself) or the run already has a result.
    """
    if status not in FINAL:
        raise ValueError(f"{status} is not a final status")
    lock = worker_lock(layout.locks)
    if not lock.acquire():
        return None
    try:
        files = RunFiles(layout, run_id)
        if files.ended() or files.deploy_committed():
            return None
        result = RunResult(
            run_id=run_id,
            kernel=check_kernel_name(kernel),
            status=status,
            finished_at=datetime.now(UTC),
            error=error,
        )
        finish(layout, result)
        lease = layout.lease
        with contextlib.suppress(FileNotFoundError):
            lease.unlink()  # its holder is dead (we hold the worker lock); the host reloads either way
        return result
    finally:
        lock.release()


def sweep_leftovers(layout: Layout, now: float | None = None) -> list[Path]:
    """Remove temp files and staging folders that belong to no live process; return what went.

    Called by the worker while it holds the worker lock: staging folders under `kernels/*/versions/`
    are only ever made by a worker, so any found then is a crashed deploy's. Temp files elsewhere are
    removed only when old, since a server may be writing one right now.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    runs = [d for d in layout.runs.iterdir() if d.is_dir()] if layout.runs.is_dir() else []
    kernels = [k for k in layout.kernels.iterdir() if k.is_dir()] if layout.kernels.is_dir() else []
    # Only a worker writes these: whatever is half-written there now is a dead worker's.
    worker_only = [k / "versions" for k in kernels] + [d / "checkpoints" for d in runs]
    for folder in worker_only:
        for entry in folder.iterdir() if folder.is_dir() else []:
            if entry.name.startswith("."):
                _remove(entry)
                removed.append(entry)
    for kernel in kernels:
        with KernelFiles(layout, kernel.name).locked():  # a rollback may be switching the link right now
            for entry in kernel.glob(".current.*.tmp"):
                _remove(entry)
                removed.append(entry)
    shared = [layout.requests, layout.results, layout.active, layout.archive, layout.quarantine, layout.home, *runs]
    for folder in shared:
        for entry in folder.glob(".*.tmp") if folder.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                if now - entry.lstat().st_mtime > STALE_TEMP_S:
                    _remove(entry)
                    removed.append(entry)
    if removed:
        log.info("swept %d leftover temp files and staging folders", len(removed))
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _lenient(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _ids(raw: object) -> tuple[str | None, str | None]:
    if not isinstance(raw, dict):
        return None, None
    run_id = kernel = None
    with contextlib.suppress(ValueError, TypeError):
        run_id = check_run_id(str(raw.get("run_id")))
    with contextlib.suppress(ValueError, TypeError):
        kernel = check_kernel_name(str(raw.get("kernel")))
    return run_id, kernel


def kernel_of(layout: Layout, run_id: str) -> str:
    """The kernel a run folder belongs to, from its manifest (for a run whose request is unreadable)."""
    from train_worker.protocol import BatchManifest

    try:
        return read_model(layout.run_dir(run_id) / "manifest.json", BatchManifest).kernel
    except ProtocolError:
        return "default"
