"""The engine: one thread owns the backend; requests that arrive together are batched per kernel.

- Every backend call happens on the engine thread, never on the event loop.
- Concurrent requests for one kernel share decoding steps, streamed ones included; a backend that can
  (llama.cpp) also takes requests that arrive while a batch runs. Commands (unload, a version swap) and
  other kernels' requests wait for the batch in flight, which then takes no newcomers.
- Each request's tokens become text here (`TextStream`): stop sequences, finish reasons, streaming.
- Which version each kernel serves follows `kernels/<name>/current`; the engine asks the backend to
  attach, swap or drop adapters accordingly, never reloading the base for a deploy.
- A version saved with a scope (`scope.json`, learning/scope.py) answers only requests that name
  something the kernel was taught; the bare base answers the rest, and says so (`version` None).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from host.backend import Backend, Sequence
from host.sampling import GREEDY, Sampling
from host.textstream import TextStream
from learning.scope import Scope, ScopeError, read_scope
from train_worker.deploy import DeployError, KernelFiles
from train_worker.protocol import ProtocolError, TrainingLease, read_events
from train_worker.settings import Settings

log = logging.getLogger(__name__)

GATHER_SECONDS = 0.02  # after an idle spell, wait this long for concurrent requests to batch with
MAX_BATCH = 16


class Unavailable(Exception):
    """The host is not serving now (unloaded for training, loading, or failed to load)."""


class KernelUnservable(Exception):
    """A kernel's deployed version cannot be served by this host; refused until `current` moves."""

    status = 500
    code = "kernel_unservable"


class BaseMismatch(KernelUnservable):
    status = 409
    code = "base_model_mismatch"


def base_key(spec: str | None) -> str:
    """One spelling of a base model: 'embedded', or a resolved absolute path."""
    if spec is None or spec == "embedded":
        return "embedded"
    return str(Path(spec).expanduser().resolve())


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    version: int | None  # the kernel's adapter version that answered; None: the bare base


@dataclass
class Job:
    kernel: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    stop: list[str] = field(default_factory=list)
    text: str | None = None  # what the request asks, routed by the version's scope; None: the adapter answers
    # Called on the engine thread with each piece of text as it is released (streaming), then not again.
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    future: concurrent.futures.Future[Completion] = field(default_factory=concurrent.futures.Future)


@dataclass
class Command:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class Engine:
    """The backend, which version each kernel serves, and the thread that runs them."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.layout = settings.layout
        self.backend = backend
        self.status: Literal["loading", "ok", "unloaded", "failed"] = "loading"
        self.ready = threading.Event()  # set once the first load finished, well or not
        self.base_name = settings.base_model or "embedded"
        self._queue: queue.Queue[Job | Command] = queue.Queue()
        self._pending: collections.deque[Job | Command] = collections.deque()  # taken, to run after this batch
        self._resident: dict[str, int] = {}  # kernel -> version whose adapter the backend holds
        self._scopes: dict[str, Scope | None] = {}  # kernel -> the resident version's scope (None: every prompt)
        self._refused: dict[str, tuple[int, KernelUnservable]] = {}  # kernel -> (version, why), not retried
        self.last_deploy_ms: float | None = None
        # The live training lease the host is unloaded for (set by the lease watcher), and who unloaded it.
        self.lease: TrainingLease | None = None
        self.unloaded_by: Literal["lease", "admin"] | None = None
        self._thread = threading.Thread(target=self._loop, name="engrain-engine", daemon=True)
        self.stopped = threading.Event()

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    # -- public, thread-safe -------------------------------------------------------------------

    def start(self, *, load: bool = True) -> None:
        """Start the engine thread and load the base, or (`load=False`: a training run holds the memory) wait."""
        self._thread.start()
        if load:
            self.call(self._first_load)
        else:
            self.status, self.unloaded_by = "unloaded", "lease"
            self.ready.set()

    def _first_load(self) -> None:
        try:
            self._load()
        except Exception:
            self.status = "failed"
            log.exception("the model host could not load its base model")
            raise
        finally:
            self.ready.set()

    def stop(self) -> None:
        self.stopped.set()
        self._queue.put(Command(lambda: None))
        self._thread.join(10)

    def submit(self, job: Job) -> concurrent.futures.Future[Completion]:
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        command = Command(fn)
        self._queue.put(command)
        return command.future

    def resident(self) -> dict[str, int | None]:
        return dict(self._resident)

    def deployed_version(self, kernel: str) -> int | None:
        files = KernelFiles(self.layout, kernel)
        try:
            return files.current()
        except OSError as exc:  # `current` is a regular file or a folder, not the link deploys write
            raise DeployError(
                f"{files.current_link} is not a link to a version folder ({exc.strerror}); rollback_kernel rewrites it"
            ) from exc

    def unavailable_reason(self) -> str:
        """Why queries get 503 now, with when it should end where that is known."""
        if self.status == "loading":
            return "the model host is loading its base model; try again in a few seconds"
        if self.status == "failed":
            return "the model host failed to load its base model; see its log (it retries by itself)"
        lease = self.lease
        if self.unloaded_by == "lease" and lease is not None:
            return (
                f"the model host is unloaded while training run {lease.run_id or '(unnamed)'} uses the memory"
                f"{_run_progress(self.layout.run_dir(lease.run_id) if lease.run_id else None)}; "
                "it reloads itself when the run ends"
            )
        return (
            "the model host was unloaded (POST /admin/unload) to free memory for training; "
            "it comes back with POST /admin/reload"
        )

    # -- engine thread -------------------------------------------------------------------------

    def _take(self, timeout: float | None) -> Job | Command | None:
        if self._pending:
            return self._pending.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while not self.stopped.is_set():
            item = self._take(None)
            if isinstance(item, Command):
                _complete(item.future, item.fn)
                continue
            assert item is not None
            jobs = [item]
            deadline = time.monotonic() + GATHER_SECONDS
            while len(jobs) < MAX_BATCH:
                nxt = self._take(max(0.0, deadline - time.monotonic()))
                if nxt is None:
                    break
                if isinstance(nxt, Command):
                    self._pending.appendleft(nxt)  # commands run after this batch, in arrival order
                    break
                jobs.append(nxt)
            by_kernel: dict[str, list[Job]] = {}
            for job in jobs:
                by_kernel.setdefault(job.kernel, []).append(job)
            for kernel, group in by_kernel.items():
                self._generate(kernel, group)

    def _admit(self, kernel: str, room: int, joins: Callable[[Job], bool]) -> list[Job]:
        """Requests for `kernel` that arrived while its batch runs and `joins` it, unless anything else waits."""
        admitted: list[Job] = []
        while len(admitted) < room and not self._pending:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job) and item.kernel == kernel and joins(item):
                admitted.append(item)
            else:
                self._pending.append(item)
        return admitted

    def _load(self) -> None:
        started = time.perf_counter()
        self.status = "loading"
        self._resident.clear()
        self._refused.clear()
        name = self.backend.load()
        self.status = "ok"
        log.info("host ready with %s (%s) in %.1f s", name, self.backend.name, time.perf_counter() - started)

    def unload(self, by: Literal["lease", "admin"] = "admin") -> None:
        if self.status != "unloaded":
            self.backend.unload()
            self._resident.clear()
            self.status = "unloaded"
            log.info("unloaded the model to free memory for training (%s)", by)
        self.unloaded_by = by

    def reload(self) -> None:
        if self.status != "ok":
            try:
                self._load()
            except Exception:
                self.status = "failed"
                raise
        self.unloaded_by = None

    def sync(self, kernel: str) -> int | None:
        """Make the kernel's resident adapter match `current`; return the version it now serves."""
        version = self.deployed_version(kernel)
        resident = self._resident.get(kernel)
        if resident == version:
            return version
        if version is None:
            self.backend.detach(kernel)
            del self._resident[kernel]
            return None
        refused = self._refused.get(kernel)
        if refused is not None and refused[0] == version:
            raise refused[1]
        files = KernelFiles(self.layout, kernel)
        started = time.perf_counter()
        try:
            self._check_base(files, version)
            scope = _scope(files, version)
            how = self.backend.attach(kernel, version, files.version_dir(version))
        except Exception as exc:
            why = (
                exc
                if isinstance(exc, KernelUnservable)
                else KernelUnservable(f"kernel {kernel!r} v{version} cannot be served: {exc}")
            )
            self._refused[kernel] = (version, why)
            if kernel in self._resident:  # a failed swap may have left the old adapter half-replaced
                self._resident.pop(kernel)
                self.backend.detach(kernel)
            raise why from exc
        self._refused.pop(kernel, None)
        self._resident[kernel] = version
        self._scopes[kernel] = scope
        self.last_deploy_ms = (time.perf_counter() - started) * 1e3
        log.info("kernel %s now serves v%d (%s in %.0f ms)", kernel, version, how, self.last_deploy_ms)
        return version

    def _check_base(self, files: KernelFiles, version: int) -> None:
        try:
            trained_on = files.meta(version).base_model
        except ProtocolError as exc:
            raise KernelUnservable(f"kernel {files.kernel!r} v{version} has no readable meta.json: {exc}") from exc
        if base_key(trained_on) != base_key(self.settings.base_model):
            raise BaseMismatch(
                f"kernel {files.kernel!r} v{version} was trained on base model {trained_on!r}, but this host serves "
                f"{self.base_name!r}; serve it from a host with ENGRAIN_BASE_MODEL={trained_on} (its own "
                "ENGRAIN_HOME), or roll the kernel back to a version of this base"
            )

    def _generate(self, kernel: str, jobs: list[Job]) -> None:
        try:
            if self.status != "ok":
                raise Unavailable(self.unavailable_reason())
            version = self.sync(kernel)
        except Exception as exc:
            for job in jobs:
                job.future.set_exception(exc)
            return
        scope = self._scopes.get(kernel) if version is not None else None

        def answers(job: Job) -> int | None:
            """The version that answers `job`: the kernel's, or None (the bare base) outside its scope."""
            if scope is None or job.text is None or scope.covers(job.text):
                return version
            return None

        by_version: dict[int | None, list[Job]] = {}
        for job in jobs:
            by_version.setdefault(answers(job), []).append(job)
        for answering, group in by_version.items():
            self._run(kernel, answering, group, answers)

    def _run(self, kernel: str, version: int | None, jobs: list[Job], answers: Callable[[Job], int | None]) -> None:
        """Generate for `jobs` with `version`'s adapter (None: the bare base); newcomers it answers join them."""
        running = [_Running(job, self.tokenizer, version) for job in jobs]

        def admit() -> list[Sequence]:
            room = MAX_BATCH - sum(1 for r in running if not r.job.future.done())
            joins = self._admit(kernel, room, lambda job: answers(job) == version)
            newcomers = [_Running(job, self.tokenizer, version) for job in joins]
            running.extend(newcomers)
            return [r.sequence for r in newcomers]

        try:
            self.backend.generate(kernel if version is not None else None, [r.sequence for r in running], admit)
        except Exception as exc:
            log.exception("generation failed for kernel %s", kernel)
            for r in running:
                if not r.job.future.done():
                    r.job.future.set_exception(exc)
            return
        for r in running:
            r.finish()


class _Running:
    """One job inside a batch: its text stream, and the `emit` the backend calls with each token."""

    def __init__(self, job: Job, tokenizer: Any, version: int | None) -> None:
        self.job = job
        self.version = version
        self.stream = TextStream(tokenizer, job.stop)
        self.eos = tokenizer.eos_token_id
        self.finish_reason: Literal["stop", "length"] = "length"
        self.sequence = Sequence(job.prompt_ids, job.max_new_tokens, self.emit, job.sampling)

    def emit(self, token: int) -> bool:
        if self.job.future.done():
            return False
        piece = self.stream.push(token)
        if piece and self.job.on_text is not None:
            self.job.on_text(piece)
        if token == self.eos or self.stream.stopped:
            self.finish_reason = "stop"
            self.finish()
            return False
        if len(self.stream.tokens) >= self.job.max_new_tokens or self.job.cancelled.is_set():
            self.finish()
            return False
        return True

    def finish(self) -> None:
        """Release any held-back text and resolve the job (once)."""
        if self.job.future.done():
            return
        rest = self.stream.flush()
        if rest and self.job.on_text is not None:
            self.job.on_text(rest)
        self.job.future.set_result(
            Completion(list(self.stream.tokens), self.stream.text, self.finish_reason, self.version)
        )


def _scope(files: KernelFiles, version: int) -> Scope | None:
    try:
        return read_scope(files.version_dir(version))
    except ScopeError as exc:
        raise KernelUnservable(f"kernel {files.kernel!r} v{version} cannot be served: {exc}") from exc


def _run_progress(run_dir: Path | None) -> str:
    """' (phase training, 40% done, about 95 s left)' from the run's last progress event, or ''."""
    if run_dir is None:
        return ""
    events, _, _ = read_events(run_dir / "events.jsonl", 0)
    if not events:
        return ""
    last = events[-1]
    parts = [f"phase {last.phase}"]
    if last.progress is not None:
        parts.append(f"{last.progress:.0%} done")
    if last.eta_s is not None:
        parts.append(f"about {last.eta_s:.0f} s left")
    return " (" + ", ".join(parts) + ")"


def _complete(future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
