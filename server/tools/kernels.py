"""Tools that create, configure, list and roll back kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from server import actions
from server.kernel_config import KernelConfig
from server.outputs import AutoStatus, KernelInfo, KernelList, RollbackResult
from server.pickup import kernel_uri
from server.policy import AutoTrainPolicy
from server.state import AppState
from server.tools._common import KernelArg, auto_check, kernel_info, kernel_name, state_of, tool
from train_worker.protocol import (
    MAX_INT,
    GateThresholds,
    KeepFact,
    KernelName,
    SchemaProblem,
    TrainSettings,
    check_schema,
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
    state = state_of(ctx)
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
    kernel = await state.store.kernels.create(name, base, description, config.stored())
    return await kernel_info(state, kernel)


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
    must_keep: Annotated[
        list[KeepFact] | None,
        Field(
            max_length=200,
            description="Adds facts the kernel must never lose ({prompt, answers}); one with a prompt already "
            "listed replaces it. A run that loses any of them, or a built-in canary, is not deployed.",
        ),
    ] = None,
    forget_must_keep: Annotated[
        list[str] | None, Field(max_length=200, description="Prompts to take off the must-keep list.")
    ] = None,
) -> KernelInfo:
    """Change a kernel's training settings, gates, answer schema, must-keep facts or auto-training policy.

    The next run uses them.
    """
    state = state_of(ctx)
    k = await state.store.kernels.get(kernel_name(kernel))
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
    if must_keep is not None or forget_must_keep is not None:
        changes["must_keep"] = _merge_must_keep(config.must_keep, must_keep or [], forget_must_keep or [])
    if output_schema is not None:
        if output_schema:
            _check_schema(output_schema)
        changes["output_schema"] = output_schema or None
    if not changes and description is None:
        raise ToolError(
            "nothing to change: pass settings, gates, auto, sampling_corrections, output_schema, must_keep, "
            "forget_must_keep or description"
        )
    updated = await state.store.kernels.set_config(k.name, config.model_copy(update=changes).stored(), description)
    await state.notifier.updated(kernel_uri(k.name))
    await auto_check(state, k.name)
    return await kernel_info(state, updated)


def _merge_must_keep(current: list[KeepFact], add: list[KeepFact], forget: list[str]) -> list[KeepFact]:
    unknown = [p for p in forget if p not in {f.prompt for f in current}]
    if unknown:
        raise ToolError(f"forget_must_keep names prompts that are not on the must-keep list: {unknown[:3]}")
    kept = {f.prompt: f for f in current if f.prompt not in set(forget)}
    kept.update({f.prompt: f for f in add})
    return list(kept.values())


def _check_schema(schema: dict[str, Any]) -> None:
    try:
        check_schema(schema)
    except SchemaProblem as exc:
        raise ToolError(str(exc)) from exc


@tool
async def list_kernels(ctx: Context[AppState]) -> KernelList:
    """List every kernel with its deployed version, experience counts and any active run."""
    state = state_of(ctx)
    return KernelList(kernels=[await kernel_info(state, k) for k in await state.store.kernels.all()])


@tool
async def rollback_kernel(
    kernel: KernelArg,
    ctx: Context[AppState],
    version: Annotated[
        int | None,
        Field(ge=0, le=MAX_INT, description="Version to serve; omit for the previous one; 0 for the bare base."),
    ] = None,
) -> RollbackResult:
    """Serve an earlier adapter version of a kernel (or the bare base model)."""
    return await actions.rollback(state_of(ctx), kernel_name(kernel), version, via="mcp")


@tool
async def reset_circuit_breaker(kernel: KernelArg, ctx: Context[AppState]) -> AutoStatus:
    """Close a kernel's circuit breaker after fixing what made its runs fail; earlier failures stop counting."""
    return await actions.reset_breaker(state_of(ctx), kernel_name(kernel))
