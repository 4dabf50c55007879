"""The host's HTTP surface: OpenAI-compatible chat completions and models, health, and admin unload/reload.

Every route sits behind `Guard` (loopback Host, bearer token, JSON bodies of bounded size). Every error is
in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from host.api import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorDetail,
    FinishReason,
    Health,
    ModelCard,
    ModelList,
    Usage,
)
from host.endpoint import home_id
from host.engine import Completion, Engine, Job, KernelUnservable, Unavailable
from host.guard import BodyTooLarge, Guard, error_response, read_body, too_large
from host.sampling import Sampling
from learning.formatting import encode_prompt
from train_worker.deploy import DeployError
from train_worker.protocol import check_kernel_name

log = logging.getLogger(__name__)

RETRY_AFTER_S = 10


def unavailable(engine: Engine) -> JSONResponse:
    response = error_response(503, engine.unavailable_reason(), "unavailable", code="model_unloaded")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def create_app(engine: Engine, token: str) -> Starlette:
    settings = engine.settings
    identity = home_id(engine.layout)

    def known_kernels() -> set[str]:
        names = {"default"}
        if engine.layout.kernels.is_dir():
            names |= {p.name for p in engine.layout.kernels.iterdir() if p.is_dir()}
        return names

    async def health(request: Request) -> Response:
        body = Health(
            status=engine.status,
            home_id=identity,
            backend=engine.backend.name,
            base_model=engine.base_name,
            kernels=engine.resident(),
            pid=os.getpid(),
            last_deploy_ms=engine.last_deploy_ms,
            training_run=engine.lease.run_id if engine.lease is not None else None,
        )
        return JSONResponse(body.model_dump())

    async def models(request: Request) -> Response:
        now = int(time.time())
        cards = [
            ModelCard(id=n, created=now, engrain_version=_safe_version(engine, n)) for n in sorted(known_kernels())
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def chat(request: Request) -> Response:
        try:
            raw = await read_body(request, settings.host_max_body_bytes)
        except BodyTooLarge:
            return too_large(settings.host_max_body_bytes)
        try:
            body = ChatRequest.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return error_response(400, f"{param or 'body'}: {first['msg']}", param=param)
        try:
            kernel = check_kernel_name(body.model)
        except ValueError as exc:
            return error_response(404, str(exc), param="model", code="model_not_found")
        if kernel not in known_kernels():
            return error_response(
                404,
                f"the kernel {kernel!r} does not exist in this home; GET /v1/models lists the kernels "
                "(create_kernel makes one)",
                param="model",
                code="model_not_found",
            )
        if engine.status != "ok":
            return unavailable(engine)
        try:
            prompt_ids = await asyncio.get_running_loop().run_in_executor(None, encode_chat, engine, body)
        except Unavailable:
            return unavailable(engine)
        too_long = _too_long(len(prompt_ids), body.token_budget, settings.host_max_prompt_tokens, engine)
        if too_long is not None:
            return too_long
        sampling = Sampling(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
        )
        job = Job(kernel, prompt_ids, body.token_budget, sampling, body.stop_sequences, text=body.asked)
        started = time.perf_counter()
        reply = Reply(kernel, len(prompt_ids))
        if body.stream:
            return await stream(job, reply, body.stream_options is not None and body.stream_options.include_usage)
        try:
            completion = await asyncio.wrap_future(engine.submit(job))
        except Exception as exc:
            return failure(exc)
        log.info(
            "%s v%s: %d tokens in %.2f s",
            kernel,
            completion.version,
            len(completion.tokens),
            time.perf_counter() - started,
        )
        return JSONResponse(reply.response(completion).model_dump())

    def failure(exc: BaseException) -> JSONResponse:
        """The error answer for a request the engine refused or failed."""
        if isinstance(exc, Unavailable):
            return unavailable(engine)
        if isinstance(exc, KernelUnservable):
            kind = "server_error" if exc.status >= 500 else "invalid_request_error"
            return error_response(exc.status, str(exc), kind, code=exc.code, param="model")
        if isinstance(exc, DeployError):
            return error_response(500, str(exc), "server_error")
        log.error("a request failed", exc_info=exc)
        return error_response(500, f"generation failed: {exc}", "server_error")

    async def stream(job: Job, reply: Reply, include_usage: bool) -> Response:
        """Server-sent events: a role chunk, text chunks as they are released, the finish, usage, [DONE]."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(piece: str) -> None:  # on the engine thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        job.on_text = on_text
        future = engine.submit(job)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        first = await pieces.get()  # errors before the first token still get a status code of their own
        if first is None and future.exception() is not None:
            exc = future.exception()
            assert exc is not None
            return failure(exc)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield sse(reply.chunk(Delta(role="assistant", content="")))
                piece = first
                while piece is not None:
                    yield sse(reply.chunk(Delta(content=piece)))
                    piece = await pieces.get()
                exc = future.exception()
                if exc is not None:
                    log.error("a streamed request failed", exc_info=exc)
                    yield sse(ErrorBody(error=ErrorDetail(message=f"generation failed: {exc}", type="server_error")))
                else:
                    completion = future.result()
                    yield sse(reply.chunk(Delta(), completion.finish_reason, completion.version))
                    if include_usage:
                        yield sse(reply.usage_chunk(completion))
                yield b"data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client went away (or we are done): its row leaves the batch

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def unload(request: Request) -> Response:
        await asyncio.wrap_future(engine.call(engine.unload))
        return JSONResponse({"status": engine.status})

    async def reload(request: Request) -> Response:
        if engine.lease is not None:
            return error_response(
                409, f"training run {engine.lease.run_id} holds the training lease; the host reloads itself after it"
            )
        await asyncio.wrap_future(engine.call(engine.reload))
        return JSONResponse({"status": engine.status})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/admin/unload", unload, methods=["POST"]),
            Route("/admin/reload", reload, methods=["POST"]),
        ],
        middleware=[Middleware(Guard, token=token, max_body_bytes=settings.host_max_body_bytes)],
        exception_handlers={404: _not_found, 405: _not_allowed},
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no route {request.url.path}; the host serves /v1/chat/completions and /v1/models")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path}")


class Reply:
    """The response and stream chunks of one request, sharing its id and creation time."""

    def __init__(self, kernel: str, prompt_tokens: int) -> None:
        self.kernel = kernel
        self.prompt_tokens = prompt_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, completion: Completion) -> Usage:
        n = len(completion.tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=n, total_tokens=self.prompt_tokens + n)

    def response(self, completion: Completion) -> ChatResponse:
        choice = ChatChoice(message=AssistantMessage(content=completion.text), finish_reason=completion.finish_reason)
        return ChatResponse(
            id=self.id,
            created=self.created,
            model=self.kernel,
            choices=[choice],
            usage=self.usage(completion),
            engrain_version=completion.version,
        )

    def chunk(self, delta: Delta, finish: FinishReason | None = None, version: int | None = None) -> ChatChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatChunk(id=self.id, created=self.created, model=self.kernel, choices=[choice], engrain_version=version)

    def usage_chunk(self, completion: Completion) -> ChatChunk:
        return ChatChunk(
            id=self.id,
            created=self.created,
            model=self.kernel,
            choices=[],
            usage=self.usage(completion),
            engrain_version=completion.version,
        )


def sse(event: BaseModel) -> bytes:
    return b"data: " + event.model_dump_json(exclude_none=False).encode() + b"\n\n"


def _too_long(prompt_tokens: int, budget: int, limit: int, engine: Engine) -> JSONResponse | None:
    if prompt_tokens > limit:
        message = (
            f"the conversation is {prompt_tokens} tokens once formatted; this host accepts at most {limit} "
            "(ENGRAIN_HOST_MAX_PROMPT_TOKENS)"
        )
        return error_response(400, message, param="messages", code="context_length_exceeded")
    context = engine.backend.context_length
    if prompt_tokens + budget > context:
        message = (
            f"the conversation ({prompt_tokens} tokens) plus max_tokens ({budget}) is over the model's context "
            f"of {context} tokens; send a shorter conversation or a smaller max_tokens"
        )
        return error_response(400, message, param="max_tokens", code="context_length_exceeded")
    return None


def _safe_version(engine: Engine, kernel: str) -> int | None:
    try:
        return engine.deployed_version(kernel)
    except DeployError:
        return None


def encode_chat(engine: Engine, body: ChatRequest) -> list[int]:
    """The conversation's prompt ids: one user turn (and a system prompt) exactly as in training, any other
    conversation through the same chat template."""
    engine.ready.wait()  # the first request can arrive while the base is loading
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise Unavailable(engine.unavailable_reason())
    turns = [("system" if m.role == "developer" else m.role, m.text) for m in body.messages]
    if len(turns) == 1 or (len(turns) == 2 and turns[0][0] == "system"):
        system = turns[0][1] if len(turns) == 2 else None
        return encode_prompt(tokenizer, turns[-1][1], system)
    messages = [{"role": role, "content": text} for role, text in turns]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding (a Mapping, not a dict); 4.x returned a list.
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)
