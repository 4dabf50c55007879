"""The host's HTTP surface: OpenAI-compatible chat completions and models, health, and admin unload/reload."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from host.api import ChatChoice, ChatMessage, ChatRequest, ChatResponse, Health, ModelCard, ModelList, Usage
from host.engine import Engine, Job, Unavailable
from learning.formatting import encode_prompt
from learning.generate import decode, finished
from train_worker.deploy import DeployError
from train_worker.protocol import check_kernel_name

log = logging.getLogger(__name__)


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
