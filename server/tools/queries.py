"""Asking a kernel."""

from __future__ import annotations

import time
from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from host.client import HostUnavailable
from server.limits import check_text
from server.outputs import QueryResult
from server.state import AppState
from server.tools._common import KernelArg, kernel_name, state_of, tool
from train_worker.locks import host_lock


@tool
async def query_kernel(
    kernel: KernelArg,
    prompt: Annotated[str, Field(description="The question or instruction.")],
    ctx: Context[AppState],
    max_new_tokens: Annotated[int, Field(ge=1, le=2048)] = 128,
    system: Annotated[str | None, Field(description="Optional system prompt.")] = None,
    temperature: Annotated[
        float, Field(ge=0.0, le=2.0, description="0 (the default): greedy, the kernel's most likely answer.")
    ] = 0.0,
    top_p: Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus sampling; applies when temperature > 0.")] = 1.0,
    seed: Annotated[
        int | None, Field(ge=-(2**63), lt=2**64, description="The same seed repeats a sampled answer.")
    ] = None,
    stop: Annotated[
        list[Annotated[str, Field(min_length=1)]] | None,
        Field(max_length=4, description="Up to 4 sequences; the answer ends before the first one."),
    ] = None,
) -> QueryResult:
    """Ask a kernel (greedy by default; temperature > 0 samples). The answer is logged; rate or correct it
    with feedback."""
    state = state_of(ctx)
    name = kernel_name(kernel)
    await state.store.kernels.get(name)
    check_text("prompt", prompt, state.settings.max_prompt_chars, "ENGRAIN_MAX_PROMPT_CHARS")
    check_text("system", system, state.settings.max_system_chars, "ENGRAIN_MAX_SYSTEM_CHARS", required=False)
    # The host knows a kernel by its folder; one never trained has none yet, and answers with the base.
    state.layout.kernel_dir(name).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        reply = await state.host.chat(
            name, prompt, system, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop
        )
    except HostUnavailable as exc:
        if exc.not_running and host_lock(state.layout.locks).held_elsewhere():
            # A host process holds its lock but does not answer yet: it is still loading the base model.
            raise ToolError(
                "the model host is starting (loading the base model; the very first start also caches the "
                "embedded model, about a minute); try again in a few seconds"
            ) from exc
        raise
    latency_ms = (time.perf_counter() - started) * 1000
    text = reply.choices[0].message.content.strip()
    interaction = await state.store.interactions.add(name, reply.engrain_version, prompt, system, text, latency_ms)
    return QueryResult(
        kernel=name,
        version=reply.engrain_version,
        response=text,
        query_id=interaction.id,
        completion_tokens=reply.usage.completion_tokens,
        truncated=reply.choices[0].finish_reason == "length",
    )
