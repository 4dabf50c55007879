"""Tools that create, configure, list and roll back kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from server.kernel_config import KernelConfig
from server.outputs import AutoStatus, KernelInfo, KernelList, RollbackResult
from server.pickup import kernel_uri
from server.policy import AutoTrainPolicy
from server.state import AppState
from server.tools._common import KernelArg, auto_check, auto_status, kernel_info, kernel_name, state_of, tool
from train_worker.deploy import KernelFiles
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
    state = state_of(ctx)
    name = kernel_name(kernel)
    k = await state.store.kernels.get(name)
    # The kernel lock can be held by a worker writing a deploy: wait for it off the event loop.
    target = await anyio.to_thread.run_sync(_switch_back, KernelFiles(state.layout, name), version)
    await state.store.versions.mark_deployed(name, target)
    await state.notifier.updated(kernel_uri(name))
    return RollbackResult(
        kernel=name,
        from_version=k.deployed_version,
        to_version=target,
        message=f"{name} now serves {_vname(target)}; the model host follows within a second",
    )


def _switch_back(files: KernelFiles, version: int | None) -> int | None:
    """Under the kernel lock: point `current` at `version` (None: the one before it, 0: the bare base)."""
    name = files.kernel
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
    return target


def _vname(version: int | None) -> str:
    return "the bare base model" if version is None else f"v{version}"


@tool
async def reset_circuit_breaker(kernel: KernelArg, ctx: Context[AppState]) -> AutoStatus:
    """Close a kernel's circuit breaker after fixing what made its runs fail; earlier failures stop counting."""
    state = state_of(ctx)
    k = await state.store.kernels.reset_breaker(kernel_name(kernel))
    status = await auto_status(state, k)
    await auto_check(state, k.name)
    return status
