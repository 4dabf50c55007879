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

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from host.api import AssistantMessage, ChatChoice, ChatRequest, ChatResponse, Health, ModelCard, ModelList, Usage
from host.endpoint import home_id
from host.engine import Engine, Job, KernelUnservable, Unavailable
from host.guard import BodyTooLarge, Guard, error_response, read_body, too_large
from learning.formatting import encode_prompt
from learning.generate import decode, finished
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
        if body.stream:
            return error_response(400, "streaming is not supported by the engrain host; send stream=false")
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
        started = time.perf_counter()
        try:
            prompt_ids = await asyncio.get_running_loop().run_in_executor(None, _encode, engine, body)
        except Unavailable:
            return unavailable(engine)
        limit = settings.host_max_prompt_tokens
        if len(prompt_ids) > limit:
            return error_response(
                400,
                f"the conversation is {len(prompt_ids)} tokens once formatted; this host accepts at most {limit} "
                "(ENGRAIN_HOST_MAX_PROMPT_TOKENS)",
                param="messages",
                code="context_length_exceeded",
            )
        try:
            tokens, version = await asyncio.wrap_future(engine.submit(Job(kernel, prompt_ids, body.token_budget)))
        except Unavailable:
            return unavailable(engine)
        except KernelUnservable as exc:
            kind = "server_error" if exc.status >= 500 else "invalid_request_error"
            return error_response(exc.status, str(exc), kind, code=exc.code, param="model")
        except DeployError as exc:
            return error_response(500, str(exc), "server_error")
        text = decode(engine.tokenizer, tokens)
        log.info("%s v%s: %d tokens in %.2f s", kernel, version, len(tokens), time.perf_counter() - started)
        reply = ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:12]}",
            created=int(time.time()),
            model=kernel,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text),
                    finish_reason="stop" if finished(tokens, engine.tokenizer) else "length",
                )
            ],
            usage=Usage(
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(tokens),
                total_tokens=len(prompt_ids) + len(tokens),
            ),
            engrain_version=version,
        )
        return JSONResponse(reply.model_dump())

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


def _safe_version(engine: Engine, kernel: str) -> int | None:
    try:
        return engine.deployed_version(kernel)
    except DeployError:
        return None


def _encode(engine: Engine, body: ChatRequest) -> list[int]:
    engine.ready.wait()  # the first request can arrive while the base is loading
    if engine.tokenizer is None:
        raise Unavailable(engine.unavailable_reason())
    msgs = [m.model_dump() for m in body.messages]
    if len(msgs) <= 2 and msgs[-1]["role"] == "user" and (len(msgs) == 1 or msgs[0]["role"] == "system"):
        system = msgs[0]["content"] if len(msgs) == 2 else None
        return encode_prompt(engine.tokenizer, msgs[-1]["content"], system)  # exactly as in training
    encoded = engine.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return list(encoded["input_ids"] if isinstance(encoded, dict) else encoded)
