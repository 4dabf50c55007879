"""The MCP tools. Each returns a pydantic model (its structured output) or raises a `ToolError` that says what to do."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import anyio
from mcp.server.mcpserver import Context, Resolve, Sample
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CreateMessageResult, SamplingMessage, TextContent
from pydantic import Field

from server.dispatch import NothingToTrain
from server.host_client import HostError, HostUnavailable
from server.kernel_config import KernelConfig
from server.keyfacts import missing_key_facts
from server.limits import check_experience, check_text
from server.outputs import (
    AutoStatus,
    CorrectionResult,
    EventView,
    ExperienceIn,
    FeedbackResult,
    KernelInfo,
    KernelList,
    QueryResult,
    RecordResult,
    ReviewItem,
    ReviewQueue,
    RollbackResult,
    RunView,
    StatusResult,
    TrainStarted,
)
from server.pickup import kernel_uri, run_uri
from server.policy import AutoTrainPolicy
from server.state import AppState
from store.errors import StoreError
from store.models import ExperienceSource, ExperienceStatus, Interaction, Kernel, NewExperience, Run, Verdict
from train_worker.deploy import DeployError, KernelFiles
from train_worker.protocol import (
    Gate,
    GateThresholds,
    KernelName,
    RunId,
    TrainSettings,
    check_kernel_name,
    check_run_id,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

TOOLS: list[Callable[..., Awaitable[Any]]] = []

KernelArg = Annotated[str, Field(description="Kernel name, e.g. 'default'.")]


def tool(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Register a tool; expected store failures become `ToolError`s carrying their message."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (StoreError, DeployError, HostUnavailable, HostError, NothingToTrain) as exc:
            raise ToolError(str(exc)) from exc

    TOOLS.append(wrapper)
    return wrapper


def _state(ctx: Context[AppState]) -> AppState:
    return ctx.request_context.lifespan_context


def _kernel_name(name: str) -> str:
    try:
        return check_kernel_name(name)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc


async def _kernel_info(state: AppState, kernel: Kernel) -> KernelInfo:
    active = await state.store.runs.active_for_kernel(kernel.name)
    return KernelInfo(
        name=kernel.name,
        uri=kernel_uri(kernel.name),
        base_model=kernel.base_model,
        description=kernel.description,
        status=kernel.status,
        deployed_version=kernel.deployed_version,
        experiences=await state.store.experiences.count(kernel.name),
        untrained=await state.store.experiences.count_untrained(kernel.name),
        active_run=active.id if active else None,
        config=KernelConfig.model_validate(kernel.config),
    )


async def run_view(state: AppState, run: Run, events: int = 5) -> RunView:
    gates = [Gate.model_validate(g) for g in run.gates or []]
    return RunView(
        run_id=run.id,
        kernel=run.kernel,
        uri=run_uri(run.id),
        status=run.status,
        trigger=run.trigger,
        phase=run.phase,
        progress=run.progress,
        step=run.step,
        total_steps=run.total_steps,
        loss=run.loss,
        tokens_per_s=run.tokens_per_s,
        eta_s=run.eta_s,
        message=run.message,
        n_new=run.n_new,
        n_replay=run.n_replay,
        base_version=run.base_version,
        new_version=run.new_version,
        metrics=run.metrics,
        gates=gates,
        failed_gates=[g.name for g in gates if g.status == "failed"],
        error=run.error,
        cancel_requested=run.cancel_requested,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        recent_events=[
            EventView.model_validate(e.model_dump()) for e in await state.store.runs.events(run.id, limit=events)
        ],
    )


@tool
async def create_kernel(
    name: Annotated[KernelName, Field(description="New kernel's name: a-z, 0-9, '-', '_' (max 63).")],
    ctx: Context[AppState],
    base_model: Annotated[
        str | None, Field(description="Local Hugging Face model directory; omit for the server's default.")
    ] = None,
    description: Annotated[str, Field(max_length=2000)] = "",
    settings: Annotated[TrainSettings | None, Field(description="Training settings; omit for defaults.")] = None,
    gates: Annotated[GateThresholds | None, Field(description="Quality gates; omit for defaults.")] = None,
    output_schema: Annotated[
        dict[str, Any] | None, Field(description="JSON Schema every answer must satisfy, checked by a gate.")
    ] = None,
) -> KernelInfo:
    """Create a kernel: a named adapter over a base model that learns from its own experiences."""
    state = _state(ctx)
    base = state.default_base
    if base_model is not None:
        path = Path(base_model).expanduser()
        if not path.is_absolute() or not (path / "config.json").is_file():
            raise ToolError(
                f"base_model {base_model!r} is not a local Hugging Face model directory (an absolute path "
                "holding config.json). engrain never downloads models; omit base_model for the default."
            )
        base = str(path.resolve())
    if output_schema is not None:
        _check_schema(output_schema)
    config = KernelConfig(
        train=settings or TrainSettings(), gates=gates or GateThresholds(), output_schema=output_schema
    )
    kernel = await state.store.kernels.create(name, base, description, config.model_dump(mode="json"))
    return await _kernel_info(state, kernel)


@tool
async def configure_kernel(
    kernel: KernelArg,
    ctx: Context[AppState],
    settings: Annotated[TrainSettings | None, Field(description="Replaces the training settings.")] = None,
    gates: Annotated[GateThresholds | None, Field(description="Replaces the gate thresholds.")] = None,
    output_schema: Annotated[
        dict[str, Any] | None, Field(description="Replaces the answer JSON Schema; {} removes it.")
    ] = None,
    description: Annotated[str | None, Field(max_length=2000)] = None,
    auto: Annotated[
        AutoTrainPolicy | None, Field(description="Replaces the auto-training policy (off unless enabled).")
    ] = None,
    sampling_corrections: Annotated[
        bool | None, Field(description="Allow request_correction to ask the client's model for corrections.")
    ] = None,
) -> KernelInfo:
    """Change a kernel's training settings, gates, answer schema or auto-training policy; the next run uses them."""
    state = _state(ctx)
    k = await state.store.kernels.get(_kernel_name(kernel))
    config = KernelConfig.model_validate(k.config)
    changes: dict[str, Any] = {}
    if settings is not None:
        changes["train"] = settings
    if gates is not None:
        changes["gates"] = gates
    if auto is not None:
        changes["auto"] = auto
    if sampling_corrections is not None:
        changes["sampling_corrections"] = sampling_corrections
    if output_schema is not None:
        if output_schema:
            _check_schema(output_schema)
        changes["output_schema"] = output_schema or None
    if not changes and description is None:
        raise ToolError(
            "nothing to change: pass settings, gates, auto, sampling_corrections, output_schema or description"
        )
    updated = await state.store.kernels.set_config(
        k.name, config.model_copy(update=changes).model_dump(mode="json"), description
    )
    await state.notifier.updated(kernel_uri(k.name))
    await _auto_check(state, k.name)
    return await _kernel_info(state, updated)


def _check_schema(schema: dict[str, Any]) -> None:
    import jsonschema  # deferred: only kernels with an output schema need it

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ToolError(f"output_schema is not a valid JSON Schema: {exc.message}") from exc


@tool
async def list_kernels(ctx: Context[AppState]) -> KernelList:
    """List every kernel with its deployed version, experience counts and any active run."""
    state = _state(ctx)
    return KernelList(kernels=[await _kernel_info(state, k) for k in await state.store.kernels.all()])


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
    return await _record(_state(ctx), kernel, [item], single=True)


@tool
async def record_experiences(
    kernel: KernelArg,
    items: Annotated[list[ExperienceIn], Field(min_length=1, description="Up to 1000 experiences.")],
    ctx: Context[AppState],
) -> RecordResult:
    """Record a batch of experiences in one transaction: all are stored, or none."""
    return await _record(_state(ctx), kernel, items, single=False)


async def _record(state: AppState, kernel: str, items: list[ExperienceIn], *, single: bool) -> RecordResult:
    limit = state.settings.max_batch_items
    if len(items) > limit:
        raise ToolError(f"items holds {len(items)} experiences; the limit is {limit} per call. Send several batches.")
    name = _kernel_name(kernel)
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
    auto = await _auto_check(state, name)
    return RecordResult(
        kernel=name,
        ids=[a.id for a in added],
        created=len(added) - duplicates,
        duplicates=duplicates,
        untrained=await state.store.experiences.count_untrained(name),
        auto_run=auto,
    )


async def _auto_check(state: AppState, kernel: str) -> str | None:
    """Start an automatic run if the kernel's policy says one is due; the caller's own work never fails for it."""
    try:
        run = await state.autotrainer.check(kernel)
    except Exception:
        log.exception("auto-training check failed for kernel %s", kernel)
        return None
    return run.id if run is not None else None


@tool
async def train_model(kernel: KernelArg, ctx: Context[AppState]) -> TrainStarted:
    """Start training a kernel on its untrained experiences. Returns at once; poll training_status."""
    state = _state(ctx)
    name = _kernel_name(kernel)
    await state.store.kernels.get(name)
    if state.layout.estop.exists():
        raise ToolError(
            f"training is stopped by the e-stop file {state.layout.estop}; an operator must remove it "
            "before any run, manual or automatic, can start"
        )
    run, existing = await state.dispatcher.request(name)
    if existing:
        message = f"run {run.id} for {name} is already {run.status}; this returns it instead of starting another"
    elif run.status == "queued":
        message = f"queued: another kernel's run holds the trainer; {run.id} starts when it ends"
    else:
        message = f"requested: the worker picks {run.id} up shortly; poll training_status(run_id=...)"
    return TrainStarted(
        run_id=run.id,
        kernel=name,
        status=run.status,
        status_uri=run_uri(run.id),
        already_active=existing,
        n_new=run.n_new,
        n_replay=run.n_replay,
        message=message,
    )


@tool
async def training_status(
    ctx: Context[AppState],
    run_id: Annotated[RunId | None, Field(description="A run id from train_model.")] = None,
    kernel: Annotated[str | None, Field(description="A kernel: its latest runs.")] = None,
) -> StatusResult:
    """A run's or a kernel's training status: phase, progress, loss, ETA, metrics, gates and errors."""
    state = _state(ctx)
    await state.pickup.sweep()  # fresh progress, not the last background pass
    if run_id is not None:
        run = await state.store.runs.get(check_run_id(run_id))
        return StatusResult(run=await run_view(state, run, events=10))
    if kernel is not None:
        k = await state.store.kernels.get(_kernel_name(kernel))
        runs = await state.store.runs.recent(k.name, limit=10)
        views = [await run_view(state, r) for r in runs]
        return StatusResult(
            run=views[0] if views else None,
            kernel=await _kernel_info(state, k),
            runs=views,
            auto=await auto_status(state, k),
        )
    active = await state.store.runs.with_status("queued", "requested", "running", "evaluating")
    return StatusResult(runs=[await run_view(state, r) for r in active])


@tool
async def wait_for_training(
    run_id: Annotated[RunId, Field(description="A run id from train_model.")],
    ctx: Context[AppState],
    timeout_s: Annotated[float, Field(gt=0, le=3600, description="Return after this long even if not done.")] = 300,
) -> RunView:
    """Wait for a run to end (or the timeout), sending MCP progress notifications as it goes; returns the run."""
    state = _state(ctx)
    run = await state.store.runs.get(run_id)
    last: tuple[object, ...] = ()
    with anyio.move_on_after(timeout_s):
        while run.active:
            seen = (run.status, run.phase, run.step)
            if seen != last:
                last = seen
                await ctx.report_progress(100 * (run.progress or 0.0), 100, message=_progress_line(run))
            await anyio.sleep(WAIT_POLL_S)
            await state.pickup.sweep()
            run = await state.store.runs.get(run_id)
    if not run.active:
        await ctx.report_progress(100, 100, message=f"{run.status}" + (f": {run.error}" if run.error else ""))
    return await run_view(state, run, events=10)


WAIT_POLL_S = 1.0


def _progress_line(run: Run) -> str:
    parts = [run.phase or run.status]
    if run.step is not None and run.total_steps:
        parts.append(f"step {run.step}/{run.total_steps}")
    if run.loss is not None:
        parts.append(f"loss {run.loss:.3f}")
    if run.eta_s is not None:
        parts.append(f"ETA {run.eta_s:.0f}s")
    if run.message:
        parts.append(run.message)
    return ", ".join(parts)


@tool
async def query_kernel(
    kernel: KernelArg,
    prompt: Annotated[str, Field(description="The question or instruction.")],
    ctx: Context[AppState],
    max_new_tokens: Annotated[int, Field(ge=1, le=2048)] = 128,
    system: Annotated[str | None, Field(description="Optional system prompt.")] = None,
) -> QueryResult:
    """Ask a kernel (greedy decoding). The answer is logged; rate or correct it with feedback."""
    state = _state(ctx)
    name = _kernel_name(kernel)
    await state.store.kernels.get(name)
    check_text("prompt", prompt, state.settings.max_prompt_chars, "ENGRAIN_MAX_PROMPT_CHARS")
    check_text("system", system, state.settings.max_system_chars, "ENGRAIN_MAX_SYSTEM_CHARS", required=False)
    started = time.perf_counter()
    reply = await state.host.chat(name, prompt, system, max_new_tokens)
    latency_ms = (time.perf_counter() - started) * 1000
    text = reply.choices[0].message.content
    interaction = await state.store.interactions.add(name, reply.engrain_version, prompt, system, text, latency_ms)
    return QueryResult(
        kernel=name,
        version=reply.engrain_version,
        response=text,
        query_id=interaction.id,
        completion_tokens=reply.usage.completion_tokens,
        truncated=reply.choices[0].finish_reason == "length",
    )


@tool
async def feedback(
    query_id: Annotated[int, Field(description="The query_id query_kernel returned.")],
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
    state = _state(ctx)
    interaction = await state.store.interactions.get(query_id)
    kernel = interaction.kernel
    correction_id = gold_id = None
    retrain = 0
    if correction is not None:
        check_text("correction", correction, state.settings.max_response_chars, "ENGRAIN_MAX_RESPONSE_CHARS")
        verdict: Verdict = "corrected"
        correction_id = await _add_one(state, kernel, interaction, correction, "correction", "new", priority=2.0)
    elif rating >= GOOD_RATING:
        verdict = "gold"
        # Already right: store it as trained, so it is rehearsed in replay without starting a run.
        gold_id = await _add_one(state, kernel, interaction, interaction.response, "feedback", "trained")
    elif rating <= BAD_RATING:
        verdict = "needs_improvement"
    else:
        verdict = "neutral"
    if rating <= BAD_RATING:
        retrain = await state.store.experiences.mark_needs_improvement(kernel, interaction.prompt)
    await state.store.interactions.set_feedback(query_id, rating, verdict, correction, correction_id)
    auto = await _auto_check(state, kernel) if correction_id is not None or retrain else None
    return FeedbackResult(
        query_id=query_id,
        rating=rating,
        verdict=verdict,
        correction_experience_id=correction_id,
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
) -> int:
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
    return added.id


async def _ask_client_model(query_id: int, ctx: Context[AppState]) -> Sample:
    """Resolver for request_correction: check the opt-in, then ask the client's model through MCP sampling."""
    state = _state(ctx)
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
    query_id: Annotated[int, Field(description="A query_id from query_kernel whose answer needs correcting.")],
    ctx: Context[AppState],
    suggestion: Annotated[CreateMessageResult, Resolve(_ask_client_model)],
) -> CorrectionResult:
    """Ask your own model (MCP sampling) to correct an answer; kept as training data only if it names what the
    question is about. Needs the kernel's opt-in (configure_kernel(sampling_corrections=true))."""
    state = _state(ctx)
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
    experience_id = await _add_one(state, interaction.kernel, interaction, text, "correction", "new", priority=2.0)
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
        auto_run=await _auto_check(state, interaction.kernel),
    )


@tool
async def review_queue(
    kernel: KernelArg,
    ctx: Context[AppState],
    limit: Annotated[int, Field(ge=1, le=200)] = 20,
) -> ReviewQueue:
    """The kernel's worst uncorrected answers (rated 1-2): correct them with feedback(query_id, rating, correction)."""
    state = _state(ctx)
    name = _kernel_name(kernel)
    await state.store.kernels.get(name)
    items, total = await state.store.interactions.review(name, limit)
    return ReviewQueue(
        kernel=name,
        items=[
            ReviewItem(
                query_id=i.id,
                prompt=i.prompt,
                response=i.response,
                rating=i.rating,
                version=i.version,
                created_at=i.created_at,
            )
            for i in items
        ],
        total=total,
    )


@tool
async def reset_circuit_breaker(kernel: KernelArg, ctx: Context[AppState]) -> AutoStatus:
    """Close a kernel's circuit breaker after fixing what made its runs fail; earlier failures stop counting."""
    state = _state(ctx)
    k = await state.store.kernels.reset_breaker(_kernel_name(kernel))
    status = await auto_status(state, k)
    await _auto_check(state, k.name)
    return status


async def auto_status(state: AppState, kernel: Kernel) -> AutoStatus:
    policy = KernelConfig.model_validate(kernel.config).auto
    decision = await state.autotrainer.decision(kernel)
    return AutoStatus(
        enabled=policy.enabled,
        due=decision.due,
        reasons=decision.reasons,
        kernel_status=kernel.status,
        untrained=await state.store.experiences.count_untrained(kernel.name),
        min_untrained=policy.min_untrained,
        cooldown_remaining_s=decision.cooldown_remaining_s,
        window=policy.window,
        in_window=decision.in_window,
        breaker_open=decision.breaker_open,
        consecutive_failures=decision.consecutive_failures,
        estop=state.layout.estop.exists(),
        drift=await state.autotrainer.drift(kernel.name),
    )


@tool
async def cancel_training(
    run_id: Annotated[RunId, Field(description="The run to cancel.")], ctx: Context[AppState]
) -> RunView:
    """Cancel a run: at once if the worker has not started it, otherwise at the worker's next step."""
    state = _state(ctx)
    run = await state.store.runs.get(run_id)
    if not run.active:
        raise ToolError(f"run {run_id} already ended as {run.status}; nothing to cancel")
    run = await state.dispatcher.cancel(run)
    await state.notifier.updated(run_uri(run.id), kernel_uri(run.kernel))
    return await run_view(state, run)


@tool
async def rollback_kernel(
    kernel: KernelArg,
    ctx: Context[AppState],
    version: Annotated[
        int | None, Field(ge=0, description="Version to serve; omit for the previous one; 0 for the bare base.")
    ] = None,
) -> RollbackResult:
    """Serve an earlier adapter version of a kernel (or the bare base model)."""
    state = _state(ctx)
    name = _kernel_name(kernel)
    k = await state.store.kernels.get(name)
    files = KernelFiles(state.layout, name)
    with files.locked():
        current = files.current()
        on_disk = files.versions()
        if version is None:
            earlier = [v for v in on_disk if current is None or v < current]
            if not earlier:
                raise ToolError(
                    f"kernel {name!r} has no version before {_vname(current)} to roll back to; "
                    "pass version=0 to serve the bare base model"
                )
            target: int | None = earlier[-1]
        else:
            target = version or None
            if target is not None and target not in on_disk:
                kept = ", ".join(f"v{v}" for v in on_disk) or "none"
                raise ToolError(f"kernel {name!r} has no version v{target} on disk (kept: {kept})")
        files.switch(target)
    await state.store.versions.mark_deployed(name, target)
    await state.notifier.updated(kernel_uri(name))
    return RollbackResult(
        kernel=name,
        from_version=k.deployed_version,
        to_version=target,
        message=f"{name} now serves {_vname(target)}; the model host follows within a second",
    )


def _vname(version: int | None) -> str:
    return "the bare base model" if version is None else f"v{version}"
