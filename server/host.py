"""`engrain host`: the model host. Loads the base once, serves every kernel's deployed adapter.

- OpenAI-compatible `POST /v1/chat/completions` (the `model` field is the kernel) and `GET /v1/models`,
  `GET /health`, and bearer-token `POST /admin/unload` / `POST /admin/reload` for the worker.
- One engine thread owns the model: every torch call happens there, never on the event loop.
  Requests that arrive together are batched per kernel (decoding is memory-bound, so a batch of 8
  costs little more than one).
- Each kernel's adapter is resident under its own peft adapter name; switching kernels is a
  `set_adapter`. A deploy or rollback moves `kernels/<name>/current`; the host notices within half a
  second and loads the new version beside the base, never reloading the base itself.

This is the one `server` module that imports torch and `learning/`: it is the inference process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import hmac
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import uvicorn
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from learning.formatting import encode_prompt, ensure_chat_template
from learning.generate import decode, finished, generate_ids
from learning.model_loading import ensure_base_model, load_base, model_device, setup_threads
from server.host_api import ChatChoice, ChatMessage, ChatRequest, ChatResponse, Health, ModelCard, ModelList, Usage
from train_worker.auth_token import load_or_create_token
from train_worker.deploy import DeployError, KernelFiles
from train_worker.locks import host_lock
from train_worker.protocol import check_kernel_name
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
    """The model, its resident adapters, and the thread that runs them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = settings.layout
        self.status: Literal["loading", "ok", "unloaded", "failed"] = "loading"
        self.ready = threading.Event()  # set once the first load finished, well or not
        self.base_name = settings.base_model or "embedded"
        self._queue: queue.Queue[Job | Command] = queue.Queue()
        self._base: Any = None
        self._model: PeftModel | None = None
        self.tokenizer: Any = None
        self._resident: dict[str, tuple[int, str]] = {}  # kernel -> (version, adapter name)
        self.last_deploy_ms: float | None = None
        self._thread = threading.Thread(target=self._loop, name="engrain-engine", daemon=True)
        self.stopped = threading.Event()

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
        return {k: v for k, (v, _) in self._resident.items()}

    def deployed_version(self, kernel: str) -> int | None:
        return KernelFiles(self.layout, kernel).current()

    # -- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        setup_threads(self.settings.torch_threads)
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
        model_dir = ensure_base_model(self.settings.base_model, self.layout.models)
        self._base, self.tokenizer = load_base(model_dir, self.settings.device)
        ensure_chat_template(self.tokenizer)
        self._model = None
        self._resident.clear()
        self.status = "ok"
        log.info("host ready with %s in %.1f s", model_dir.name, time.perf_counter() - started)

    def unload(self) -> None:
        self._model = None
        self._base = None
        self._resident.clear()
        gc.collect()
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()  # give the cached GPU memory back, for the training run
        self.status = "unloaded"
        log.info("unloaded the model to free memory for training")

    def reload(self) -> None:
        if self.status != "ok":
            self._load()

    def sync(self, kernel: str) -> tuple[int | None, str | None]:
        """Make the kernel's resident adapter match `current`; return (version, adapter name)."""
        version = self.deployed_version(kernel)
        resident = self._resident.get(kernel)
        if resident is not None and resident[0] == version:
            return resident
        if version is None:
            if resident is not None:
                self._drop(kernel)
            return None, None
        folder = str(KernelFiles(self.layout, kernel).version_dir(version))
        name = "k_" + kernel.replace("-", "_")  # one peft adapter per kernel; versions replace its weights
        started = time.perf_counter()
        device = str(model_device(self._base))  # adapter weights load straight onto the base's device
        how = "hot-swapped"
        if resident is not None and self._model is not None:
            try:
                # Same shape as the resident version (the usual case: a run continues the last one):
                # copy the new weights into place, no new modules, no base reload.
                hotswap_adapter(self._model, folder, adapter_name=name, torch_device=device)
            except (RuntimeError, ValueError) as exc:
                log.info("kernel %s: v%d cannot be hot-swapped (%s); loading it beside", kernel, version, exc)
                self._drop(kernel)
                resident = None
        if resident is None:
            how = "loaded"
            if self._model is None:
                self._model = PeftModel.from_pretrained(
                    self._base, folder, adapter_name=name, is_trainable=False, torch_device=device
                )
            else:
                self._model.load_adapter(folder, adapter_name=name, is_trainable=False, torch_device=device)
        self._resident[kernel] = (version, name)
        self.last_deploy_ms = (time.perf_counter() - started) * 1e3
        log.info("kernel %s now serves v%d (%s in %.0f ms)", kernel, version, how, self.last_deploy_ms)
        return version, name

    def _drop(self, kernel: str) -> None:
        _, name = self._resident.pop(kernel)
        assert self._model is not None
        remaining = [n for _, n in self._resident.values()]
        if remaining:
            self._model.set_adapter(remaining[0])
            self._model.delete_adapter(name)
        else:
            # peft keeps pointing at a deleted last adapter; strip the LoRA layers off the base instead.
            self._base = self._model.unload()
            self._model = None

    def _generate(self, kernel: str, jobs: list[Job]) -> None:
        try:
            if self.status != "ok":
                raise Unavailable(
                    "the model host is unloaded while a training run uses the memory; it comes back when the run ends"
                )
            version, name = self.sync(kernel)
            budget = max(j.max_new_tokens for j in jobs)
            prompts = [j.prompt_ids for j in jobs]
            if name is None:
                if self._model is not None:
                    with self._model.disable_adapter():
                        outputs = generate_ids(self._model, self.tokenizer, prompts, max_new_tokens=budget)
                else:
                    outputs = generate_ids(self._base, self.tokenizer, prompts, max_new_tokens=budget)
            else:
                assert self._model is not None
                self._model.set_adapter(name)
                outputs = generate_ids(self._model, self.tokenizer, prompts, max_new_tokens=budget)
        except Exception as exc:
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, tokens in zip(jobs, outputs, strict=True):
            job.future.set_result((tokens[: job.max_new_tokens], version))


def _complete(future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)


class KernelWatcher(threading.Thread):
    """Polls each kernel's `current` link and loads a new version at once, so no query waits for it."""

    def __init__(self, engine: Engine, interval: float = 0.5) -> None:
        super().__init__(name="engrain-kernel-watch", daemon=True)
        self._engine = engine
        self._interval = interval

    def run(self) -> None:
        engine = self._engine
        while not engine.stopped.wait(self._interval):
            if engine.status != "ok" or not engine.layout.kernels.is_dir():
                continue
            resident = engine.resident()
            for folder in engine.layout.kernels.iterdir():
                try:
                    version = KernelFiles(engine.layout, folder.name).current()
                except DeployError:
                    continue
                if resident.get(folder.name) != version and (version is not None or folder.name in resident):
                    engine.call(functools.partial(engine.sync, folder.name)).result()


# ---------------------------------------------------------------------------------------------
# HTTP


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(engine: Engine, token: str) -> Starlette:
    async def health(request: Request) -> Response:
        body = Health(
            status=engine.status,
            base_model=engine.base_name,
            kernels=engine.resident(),
            pid=os.getpid(),
            last_deploy_ms=engine.last_deploy_ms,
        )
        return JSONResponse(body.model_dump())

    async def models(request: Request) -> Response:
        now = int(time.time())
        names = {"default"}
        if engine.layout.kernels.is_dir():
            names |= {p.name for p in engine.layout.kernels.iterdir() if p.is_dir()}
        cards = [ModelCard(id=n, created=now, engrain_version=_safe_version(engine, n)) for n in sorted(names)]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def chat(request: Request) -> Response:
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return _error(400, f"not a valid chat completion request: {exc.errors()[0]['msg']}")
        if body.stream:
            return _error(400, "streaming is not supported by the engrain host; send stream=false")
        try:
            kernel = check_kernel_name(body.model)
        except ValueError as exc:
            return _error(404, str(exc))
        if engine.status == "unloaded":
            return _error(503, "the model host is unloaded while a training run uses the memory", "unavailable")
        started = time.perf_counter()
        try:
            job_ids = await asyncio.get_running_loop().run_in_executor(None, _encode, engine, body)
            tokens, version = await asyncio.wrap_future(engine.submit(Job(kernel, job_ids, body.token_budget)))
        except Unavailable as exc:
            return _error(503, str(exc), "unavailable")
        except DeployError as exc:
            return _error(500, str(exc), "server_error")
        text = decode(engine.tokenizer, tokens)
        log.info("%s v%s: %d tokens in %.2f s", kernel, version, len(tokens), time.perf_counter() - started)
        reply = ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:12]}",
            created=int(time.time()),
            model=kernel,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatMessage(role="assistant", content=text),
                    finish_reason="stop" if finished(tokens, engine.tokenizer) else "length",
                )
            ],
            usage=Usage(
                prompt_tokens=len(job_ids), completion_tokens=len(tokens), total_tokens=len(job_ids) + len(tokens)
            ),
            engrain_version=version,
        )
        return JSONResponse(reply.model_dump())

    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    async def unload(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "admin endpoints need the bearer token (ENGRAIN_TOKEN or $ENGRAIN_HOME/token)")
        await asyncio.wrap_future(engine.call(engine.unload))
        return JSONResponse({"status": engine.status})

    async def reload(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "admin endpoints need the bearer token (ENGRAIN_TOKEN or $ENGRAIN_HOME/token)")
        await asyncio.wrap_future(engine.call(engine.reload))
        return JSONResponse({"status": engine.status})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/admin/unload", unload, methods=["POST"]),
            Route("/admin/reload", reload, methods=["POST"]),
        ]
    )


def _safe_version(engine: Engine, kernel: str) -> int | None:
    try:
        return engine.deployed_version(kernel)
    except DeployError:
        return None


def _encode(engine: Engine, body: ChatRequest) -> list[int]:
    engine.ready.wait()  # the first request can arrive while the base is loading
    if engine.tokenizer is None:
        raise Unavailable("the model host failed to load its base model; see its log")
    msgs = [m.model_dump() for m in body.messages]
    if len(msgs) <= 2 and msgs[-1]["role"] == "user" and (len(msgs) == 1 or msgs[0]["role"] == "system"):
        system = msgs[0]["content"] if len(msgs) == 2 else None
        return encode_prompt(engine.tokenizer, msgs[-1]["content"], system)  # exactly as in training
    encoded = engine.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return list(encoded["input_ids"] if isinstance(encoded, dict) else encoded)


def serve(settings: Settings) -> int:
    """Run the host in the foreground until SIGTERM/SIGINT."""
    settings.layout.ensure()
    lock = host_lock(settings.layout.locks)
    if not lock.acquire():
        log.warning("a model host (pid %s) is already running; this one exits", lock.holder())
        return 0
    try:
        token, _ = load_or_create_token(settings)
        engine = Engine(settings)
        engine.start()
        KernelWatcher(engine).start()
        config = uvicorn.Config(
            create_app(engine, token),
            host=settings.host_address,
            port=settings.host_port,
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        log.info("model host on http://%s:%d", settings.host_address, settings.host_port)
        server.run()
        engine.stop()
        return 0 if server.started else 1
    finally:
        lock.release()
