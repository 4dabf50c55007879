"""Learning from use: feedback on answers, the review queue, and corrections from the client's model."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context, Resolve, Sample
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CreateMessageResult, SamplingMessage, TextContent
from pydantic import Field

from server.kernel_config import KernelConfig
from server.keyfacts import missing_key_facts
from server.limits import check_text
from server.outputs import CorrectionResult, FeedbackResult, ReviewQueue
from server.state import AppState
from server.tools._common import KernelArg, auto_check, kernel_name, state_of, tool
from server.views import experiences as views
from store.errors import StoreError
from store.models import AddedExperience, ExperienceSource, ExperienceStatus, Interaction, NewExperience, Verdict
from train_worker.protocol import MAX_INT


@tool
async def feedback(
    query_id: Annotated[int, Field(ge=1, le=MAX_INT, description="The query_id query_kernel returned.")],
    rating: Annotated[int, Field(ge=1, le=5, description="1 = wrong … 5 = perfect.")],
    ctx: Context[AppState],
    correction: Annotated[
        str | None, Field(description="The answer the kernel should have given; it becomes training data.")
    ] = None,
) -> FeedbackResult:
    """Rate a query_kernel answer; you are the teacher.

    A correction becomes a training experience. An answer rated 4-5 becomes a gold example the kernel
    rehearses so it keeps that behaviour. One rated 1-2 without a correction joins review_queue, and a
    trained experience with the same prompt is trained again.
    """
    state = state_of(ctx)
    interaction = await state.store.interactions.get(query_id)
    kernel = interaction.kernel
    correction_id = gold_id = None
    superseded: list[int] = []
    retrain = 0
    if correction is not None:
        check_text("correction", correction, state.settings.max_response_chars, "ENGRAIN_MAX_RESPONSE_CHARS")
        verdict: Verdict = "corrected"
        added = await _add_one(state, kernel, interaction, correction, "correction", "new", priority=2.0)
        correction_id, superseded = added.id, added.superseded
    elif rating >= GOOD_RATING:
        verdict = "gold"
        # Already right: store it as trained, so it is rehearsed in replay without starting a run.
        gold_id = (await _add_one(state, kernel, interaction, interaction.response, "feedback", "trained")).id
    elif rating <= BAD_RATING:
        verdict = "needs_improvement"
    else:
        verdict = "neutral"
    if rating <= BAD_RATING and correction is None:
        # Without a correction the prompt's trained experience is trained again; with one, it was replaced.
        retrain = await state.store.experiences.mark_needs_improvement(kernel, interaction.prompt)
    await state.store.interactions.set_feedback(query_id, rating, verdict, correction, correction_id)
    auto = await auto_check(state, kernel) if correction_id is not None or retrain else None
    return FeedbackResult(
        query_id=query_id,
        rating=rating,
        verdict=verdict,
        correction_experience_id=correction_id,
        superseded=superseded,
        gold_experience_id=gold_id,
        retrain=retrain,
        untrained=await state.store.experiences.count_untrained(kernel),
        auto_run=auto,
    )


GOOD_RATING = 4
BAD_RATING = 2


async def _add_one(
    state: AppState,
    kernel: str,
    interaction: Interaction,
    response: str,
    source: ExperienceSource,
    status: ExperienceStatus,
    priority: float = 1.0,
) -> AddedExperience:
    """Store one experience made from an interaction; a correction replaces what it corrects."""
    [added] = await state.store.experiences.add_many(
        kernel,
        [
            NewExperience(
                prompt=interaction.prompt,
                response=response,
                system=interaction.system,
                source=source,
                status=status,
                interaction_id=interaction.id,
                priority=priority,
            )
        ],
    )
    return added


async def _ask_client_model(query_id: int, ctx: Context[AppState]) -> Sample:
    """Resolver for request_correction: check the opt-in, then ask the client's model through MCP sampling."""
    state = state_of(ctx)
    try:
        interaction = await state.store.interactions.get(query_id)
        kernel = await state.store.kernels.get(interaction.kernel)
    except StoreError as exc:
        raise ToolError(str(exc)) from exc
    if not KernelConfig.model_validate(kernel.config).sampling_corrections:
        raise ToolError(
            f"kernel {kernel.name!r} does not take corrections from the client's model; an operator can allow it "
            "with configure_kernel(sampling_corrections=true), or correct the answer yourself with feedback"
        )
    question = (
        f"A small assistant model was asked:\n{interaction.prompt}\n\nIt answered:\n{interaction.response}\n\n"
        "If the answer is wrong or incomplete, write the correct answer; otherwise repeat it. Reply with the "
        "answer alone, one or two sentences, naming what the question is about."
    )
    return Sample(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=question))],
        system_prompt="You correct answers for a small model that learns from your corrections. Be factual.",
        max_tokens=300,
        temperature=0.0,
    )


@tool
async def request_correction(
    query_id: Annotated[
        int, Field(ge=1, le=MAX_INT, description="A query_id from query_kernel whose answer needs correcting.")
    ],
    ctx: Context[AppState],
    suggestion: Annotated[CreateMessageResult, Resolve(_ask_client_model)],
) -> CorrectionResult:
    """Ask your own model (MCP sampling) to correct an answer; kept as training data only if it names what the
    question is about. Needs the kernel's opt-in (configure_kernel(sampling_corrections=true))."""
    state = state_of(ctx)
    interaction = await state.store.interactions.get(query_id)
    text = suggestion.content.text.strip() if isinstance(suggestion.content, TextContent) else ""
    missing = missing_key_facts(interaction.prompt, text)
    if not text or missing:
        reason = "the suggestion was empty" if not text else f"the suggestion leaves out {', '.join(missing)}"
        return CorrectionResult(
            query_id=query_id,
            suggestion=text,
            model=suggestion.model,
            accepted=False,
            reason=f"not kept: {reason}; correct it yourself with feedback(query_id, rating, correction)",
            untrained=await state.store.experiences.count_untrained(interaction.kernel),
        )
    check_text("suggestion", text, state.settings.max_response_chars, "ENGRAIN_MAX_RESPONSE_CHARS")
    experience_id = (await _add_one(state, interaction.kernel, interaction, text, "correction", "new", priority=2.0)).id
    rating = interaction.rating or BAD_RATING
    await state.store.interactions.set_feedback(query_id, rating, "corrected", text, experience_id)
    return CorrectionResult(
        query_id=query_id,
        suggestion=text,
        model=suggestion.model,
        accepted=True,
        reason="kept as a correction: it names every key term of the question",
        correction_experience_id=experience_id,
        untrained=await state.store.experiences.count_untrained(interaction.kernel),
        auto_run=await auto_check(state, interaction.kernel),
    )


@tool
async def review_queue(
    kernel: KernelArg,
    ctx: Context[AppState],
    limit: Annotated[int, Field(ge=1, le=200)] = 20,
) -> ReviewQueue:
    """The kernel's worst uncorrected answers (rated 1-2): correct them with feedback(query_id, rating, correction)."""
    return await views.review_queue(state_of(ctx), kernel_name(kernel), limit)
