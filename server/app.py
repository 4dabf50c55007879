"""The engrain MCP server: construction, lifespan and resources."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import tzinfo
from importlib.metadata import version as package_version
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.subscriptions import InMemorySubscriptionBus

from host.client import HostClient
from server.autotrain import AutoTrainer
from server.dispatch import Dispatcher
from server.kernel_config import KernelConfig
from server.notify import Notifier, install_legacy_subscriptions
from server.pickup import Pickup, Watcher
from server.services import ensure_services
from server.state import AppState, StateRef
from server.tools import TOOLS, kernel_info, run_view
from store import Clock, Store
from store.errors import NotFound
from train_worker.auth_token import load_or_create_token
from train_worker.protocol import check_kernel_name, check_run_id
from train_worker.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_BASE = "embedded"

INSTRUCTIONS = """\
engrain teaches a local language model (a "kernel") from what you record, without letting it forget.

Recommended loop:
1. record_experiences(kernel, items=[{prompt, response, key_answer?, paraphrases?}]) to teach facts or behaviour;
   key_answer is the part a correct answer must contain.
2. train_model(kernel) returns a run_id at once; poll training_status(run_id=...) for phase, progress and ETA,
   wait_for_training(run_id) to block with progress notifications, or subscribe to engrain://runs/{run_id}.
3. A run is deployed only if its quality gates pass (it learnt the new items, kept earlier ones, and did not drift
   from the base model); a rejected run names the failing gate and by how much.
4. query_kernel(kernel, prompt) to use it. After each answer you can judge, call feedback(query_id, rating 1-5,
   correction?): a correction becomes training data, a good answer is kept as a gold example, a bad one without a
   correction joins review_queue(kernel) for correcting in a batch. You are the teacher.
5. configure_kernel(kernel, auto={"enabled": true, "min_untrained": N}) lets the kernel train by itself;
   training_status(kernel=...) says why the next automatic run is or is not due.
6. rollback_kernel(kernel) if a deployed version misbehaves; cancel_training(run_id) to stop a run.
The kernel named 'default' always exists.
"""


AUTO_CHECK_SECONDS = 30.0  # how often waiting kernels are re-checked (cooldowns end, windows open)


async def _periodic(fn: Callable[[], Awaitable[None]], every: float) -> None:
    while True:
        await anyio.sleep(every)
        await fn()


@asynccontextmanager
async def open_state(
    settings: Settings,
    bus: InMemorySubscriptionBus,
    *,
    clock: Clock | None = None,
    local_tz: tzinfo | None = None,
    services: bool = True,
    watch: bool = True,
    autotrain: bool = True,
) -> AsyncIterator[AppState]:
    """The server's state over one home: the MCP lifespan, the dashboard's, and the terminal views' (these two
    leave the host and watcher to `engrain serve`, and the terminal also does without background loops)."""
    settings.layout.ensure()
    store = await Store.open(settings.layout.db, clock)
    try:
        default_base = settings.base_model or EMBEDDED_BASE
        await store.kernels.ensure(
            "default", default_base, "The kernel every agent shares unless it names another.", _default_config()
        )
        notifier = Notifier(bus)
        dispatcher = Dispatcher(store, settings.layout)
        autotrainer = AutoTrainer(store, settings.layout, dispatcher, notifier.updated, local_tz)
        pickup = Pickup(store, settings.layout, dispatcher, notifier.updated, autotrainer.after_run)
        host = HostClient(settings.layout, load_or_create_token(settings)[0])
        state = AppState(settings, store, dispatcher, pickup, notifier, host, autotrainer, default_base)
        await dispatcher.reconcile()
        if services:
            await anyio.to_thread.run_sync(ensure_services, settings)
        if not (watch or autotrain):
            yield state  # no task group: the caller's errors reach it unwrapped
            return
        async with anyio.create_task_group() as tg:
            if watch:
                tg.start_soon(Watcher(settings.layout).run, pickup)
            if autotrain:
                tg.start_soon(_periodic, autotrainer.check_all, AUTO_CHECK_SECONDS)
            yield state
            tg.cancel_scope.cancel()
    finally:
        await store.close()


def create_server(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    local_tz: tzinfo | None = None,
    token_verifier: Any = None,
    auth: Any = None,
    ref: StateRef | None = None,
) -> MCPServer[AppState]:
    """Build the server. Settings are read when the lifespan starts unless given here; `ref` gets its state."""

    bus = InMemorySubscriptionBus()

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        async with open_state(settings or Settings(), bus, clock=clock, local_tz=local_tz) as state:
            if ref is not None:
                ref.set(state)
            try:
                yield state
            finally:
                if ref is not None:
                    ref.set(None)

    mcp: MCPServer[AppState] = MCPServer(
        name="engrain",
        version=package_version("engrain"),
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        subscriptions=bus,
        token_verifier=token_verifier,
        auth=auth,
    )
    for fn in TOOLS:
        mcp.add_tool(fn)
    _add_resources(mcp)
    install_legacy_subscriptions(mcp)
    return mcp


def _default_config() -> dict[str, Any]:
    return KernelConfig().stored()


def _add_resources(mcp: MCPServer[AppState]) -> None:
    @mcp.resource(
        "engrain://kernels/{name}",
        mime_type="application/json",
        description="A kernel: its deployed version, counts, configuration and active run.",
    )
    async def kernel_resource(name: str, ctx: Context[AppState]) -> str:
        state = ctx.request_context.lifespan_context
        try:
            kernel = await state.store.kernels.get(check_kernel_name(name))
        except (NotFound, ValueError) as exc:
            raise ResourceError(str(exc)) from exc
        return (await kernel_info(state, kernel)).model_dump_json(indent=2)

    @mcp.resource(
        "engrain://runs/{run_id}",
        mime_type="application/json",
        description="A training run: status, progress, metrics, gate outcomes and recent events.",
    )
    async def run_resource(run_id: str, ctx: Context[AppState]) -> str:
        state = ctx.request_context.lifespan_context
        try:
            run = await state.store.runs.get(check_run_id(run_id))
        except (NotFound, ValueError) as exc:
            raise ResourceError(str(exc)) from exc
        return json.dumps((await run_view(state, run, events=20)).model_dump(mode="json"), indent=2)
