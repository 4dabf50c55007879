"""Tools that record what a kernel should learn."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from server.limits import check_experience
from server.outputs import ExperienceIn, RecordResult, RetireResult
from server.state import AppState
from server.tools._common import KernelArg, auto_check, kernel_name, state_of, tool
from store.errors import Conflict, NotFound
from store.models import ExperienceSource, NewExperience
from train_worker.protocol import MAX_INT


@tool
async def record_experience(
    kernel: KernelArg,
    prompt: Annotated[str, Field(description="What the model is asked.")],
    response: Annotated[str, Field(description="The answer it should learn to give.")],
    ctx: Context[AppState],
    system: Annotated[str | None, Field(description="Optional system prompt.")] = None,
    source: ExperienceSource = "agent",
    idempotency_key: Annotated[
        str | None, Field(max_length=200, description="Recording twice with one key stores once.")
    ] = None,
    key_answer: Annotated[
        str | None, Field(description="The part of the response a correct answer must contain.")
    ] = None,
    paraphrases: Annotated[list[str] | None, Field(max_length=16, description="Other wordings of the prompt.")] = None,
    priority: Annotated[float, Field(ge=0, le=100, description="Higher trains first.")] = 1.0,
) -> RecordResult:
    """Record one experience (prompt → desired response) for a kernel to learn on its next run."""
    item = ExperienceIn(
        prompt=prompt,
        response=response,
        system=system,
        source=source,
        idempotency_key=idempotency_key,
        key_answer=key_answer,
        paraphrases=paraphrases or [],
        priority=priority,
    )
    return await _record(state_of(ctx), kernel, [item], single=True)


@tool
async def record_experiences(
    kernel: KernelArg,
    items: Annotated[list[ExperienceIn], Field(min_length=1, description="Up to 1000 experiences.")],
    ctx: Context[AppState],
) -> RecordResult:
    """Record a batch of experiences in one transaction: all are stored, or none."""
    return await _record(state_of(ctx), kernel, items, single=False)


async def _record(state: AppState, kernel: str, items: list[ExperienceIn], *, single: bool) -> RecordResult:
    limit = state.settings.max_batch_items
    if len(items) > limit:
        raise ToolError(f"items holds {len(items)} experiences; the limit is {limit} per call. Send several batches.")
    name = kernel_name(kernel)
    await state.store.kernels.get(name)
    for n, item in enumerate(items):
        where = "" if single else f"items[{n}]."
        check_experience(
            state.settings, where, item.prompt, item.response, item.system, item.key_answer, item.paraphrases
        )
    added = await state.store.experiences.add_many(
        name, [NewExperience.model_validate(item.model_dump()) for item in items]
    )
    duplicates = sum(1 for a in added if a.duplicate)
    auto = await auto_check(state, name)
    return RecordResult(
        kernel=name,
        ids=[a.id for a in added],
        created=len(added) - duplicates,
        duplicates=duplicates,
        superseded=sorted(i for a in added for i in a.superseded),
        untrained=await state.store.experiences.count_untrained(name),
        auto_run=auto,
    )


@tool
async def retire_experience(
    experience_id: Annotated[int, Field(ge=1, le=MAX_INT, description="The id record_experience returned.")],
    reason: Annotated[str, Field(min_length=1, max_length=500, description="Why it is wrong, for the record.")],
    ctx: Context[AppState],
) -> RetireResult:
    """Take a wrong experience out of training, replay and the regression tests; it stays stored with the reason.

    The version serving now still holds what it learnt from it: record the right answer (source="correction"
    replaces it the same way) and train, or roll back.
    """
    state = state_of(ctx)
    try:
        retired = await state.store.experiences.retire(experience_id, reason)
    except NotFound as exc:
        raise ToolError(f"experience_id {experience_id}: {exc}; record_experience(s) returned the ids") from exc
    except Conflict as exc:
        raise ToolError(f"experience_id {experience_id}: {exc}") from exc
    return RetireResult(
        experience_id=retired.id,
        kernel=retired.kernel,
        status=retired.status,
        reason=reason,
        untrained=await state.store.experiences.count_untrained(retired.kernel),
        message=f"experience {retired.id} is retired: no later run trains, rehearses or checks it",
    )
