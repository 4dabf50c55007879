"""The engine: one thread owns the backend; requests that arrive together are batched per kernel.

- Every backend call happens on the engine thread, never on the event loop.
- Decoding is memory-bound, so a batch of 8 costs little more than one request.
- Which version each kernel serves follows `kernels/<name>/current`; the engine asks the backend to
  attach, swap or drop adapters accordingly, never reloading the base for a deploy.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from host.backend import Backend, Sequence
from train_worker.deploy import KernelFiles
from train_worker.settings import Settings

log = logging.getLogger(__name__)

GATHER_SECONDS = 0.02  # after an idle spell, wait this long for concurrent requests to batch with
MAX_BATCH = 16


class Unavailable(Exception):
    pass


@dataclass
class Job:
    kernel: str
    prompt_ids: list[int]
    max_new_tokens: int
    future: concurrent.futures.Future[tuple[list[int], int | None]] = field(default_factory=concurrent.futures.Future)


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
        self._resident: dict[str, int] = {}  # kernel -> version whose adapter the backend holds
        self.last_deploy_ms: float | None = None
        self._thread = threading.Thread(target=self._loop, name="engrain-engine", daemon=True)
        self.stopped = threading.Event()

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    # -- public, thread-safe -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.call(self._first_load)

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

    def submit(self, job: Job) -> concurrent.futures.Future[tuple[list[int], int | None]]:
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        command = Command(fn)
        self._queue.put(command)
        return command.future

    def resident(self) -> dict[str, int | None]:
        return dict(self._resident)

    def deployed_version(self, kernel: str) -> int | None:
        return KernelFiles(self.layout, kernel).current()

    # -- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        carry: Job | Command | None = None
        while not self.stopped.is_set():
            item = carry or self._queue.get()
            carry = None
            if isinstance(item, Command):
                _complete(item.future, item.fn)
                continue
            jobs = [item]
            deadline = time.monotonic() + GATHER_SECONDS
            while len(jobs) < MAX_BATCH:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if isinstance(nxt, Command):
                    carry = nxt  # commands run after this batch, in arrival order
                    break
                jobs.append(nxt)
            by_kernel: dict[str, list[Job]] = {}
            for job in jobs:
                by_kernel.setdefault(job.kernel, []).append(job)
            for kernel, group in by_kernel.items():
                self._generate(kernel, group)

    def _load(self) -> None:
        started = time.perf_counter()
        self.status = "loading"
        self._resident.clear()
        name = self.backend.load()
        self.status = "ok"
        log.info("host ready with %s (%s) in %.1f s", name, self.backend.name, time.perf_counter() - started)

    def unload(self) -> None:
        self.backend.unload()
        self._resident.clear()
        self.status = "unloaded"
        log.info("unloaded the model to free memory for training")

    def reload(self) -> None:
        if self.status != "ok":
            self._load()

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
        folder = KernelFiles(self.layout, kernel).version_dir(version)
        started = time.perf_counter()
        how = self.backend.attach(kernel, version, folder)
        self._resident[kernel] = version
        self.last_deploy_ms = (time.perf_counter() - started) * 1e3
        log.info("kernel %s now serves v%d (%s in %.0f ms)", kernel, version, how, self.last_deploy_ms)
        return version

    def _generate(self, kernel: str, jobs: list[Job]) -> None:
        outputs: list[list[int]] = [[] for _ in jobs]
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None

        def collector(out: list[int], limit: int) -> Callable[[int], bool]:
            def emit(token: int) -> bool:
                out.append(token)
                return token != eos and len(out) < limit

            return emit

        try:
            if self.status != "ok":
                raise Unavailable(
                    "the model host is unloaded while a training run uses the memory; it comes back when the run ends"
                )
            version = self.sync(kernel)
            sequences = [
                Sequence(j.prompt_ids, j.max_new_tokens, collector(out, j.max_new_tokens))
                for j, out in zip(jobs, outputs, strict=True)
            ]
            self.backend.generate(kernel if version is not None else None, sequences)
        except Exception as exc:
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, tokens in zip(jobs, outputs, strict=True):
            job.future.set_result((tokens, version))


def _complete(future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
