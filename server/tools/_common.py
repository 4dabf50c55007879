"""What every tool module shares: the registry, the state accessor, and views of kernels and runs."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ParamSpec, TypeVar

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from host.client import HostError, HostUnavailable
from server.actions import ActionRefused
from server.dispatch import NothingToTrain
from server.kernel_config import KernelConfig
from server.outputs import AutoStatus, EventView, KernelInfo, RunView
from server.pickup import kernel_uri, run_uri
from server.state import AppState
from store.errors import StoreError
from store.models import Kernel, Run
from train_worker.deploy import DeployError
from train_worker.locks import LockFileError
from train_worker.protocol import Gate, LostItem, check_kernel_name

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
            for name, value in kwargs.items():
                if not isinstance(value, Context):
                    _check_unicode(name, value)
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except (
            StoreError,
            DeployError,
            HostUnavailable,
            HostError,
            NothingToTrain,
            LockFileError,
            ActionRefused,
        ) as exc:
            raise ToolError(str(exc)) from exc
        except Exception as exc:
            # A bug, not bad input: the agent still gets words (the SDK would send none), the log the trace.
            log.exception("internal error in %s", fn.__name__)
            raise ToolError(
                f"internal error in {fn.__name__} ({type(exc).__name__}: {exc}); the server log has the details"
            ) from exc

    TOOLS.append(wrapper)
    return wrapper


def _check_unicode(where: str, value: Any) -> None:
    """Text must be storable UTF-8: a lone surrogate (valid in JSON escapes, not in UTF-8) is refused by name."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ToolError(
                f"{where} contains an unpaired surrogate (U+{ord(value[exc.start]):04X}) at character {exc.start}; "
                "send valid Unicode text"
            ) from exc
        if "\x00" in value:
            raise ToolError(f"{where} contains a NUL character at {value.index(chr(0))}; remove it")
    elif isinstance(value, BaseModel):
        _check_unicode(where, value.model_dump())
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(f"{where}.{key}", key)
            _check_unicode(f"{where}.{key}", item)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_unicode(f"{where}[{i}]", item)


def state_of(ctx: Context[AppState]) -> AppState:
    return ctx.request_context.lifespan_context


def kernel_name(name: str) -> str:
    try:
        return check_kernel_name(name)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc


async def kernel_info(state: AppState, kernel: Kernel) -> KernelInfo:
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
        lost=[LostItem.model_validate(item) for item in run.lost or []],
        error=run.error,
        cancel_requested=run.cancel_requested,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        recent_events=[
            EventView.model_validate(e.model_dump()) for e in await state.store.runs.events(run.id, limit=events)
        ],
    )


async def auto_check(state: AppState, kernel: str) -> str | None:
    """Start an automatic run if the kernel's policy says one is due; the caller's own work never fails for it."""
    return await state.autotrainer.check_quietly(kernel)


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
