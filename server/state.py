"""What every tool call can reach: settings, store, dispatcher, pickup, notifier, host client."""

from __future__ import annotations

from dataclasses import dataclass

from host.client import HostClient
from server.autotrain import AutoTrainer
from server.dispatch import Dispatcher
from server.notify import Notifier
from server.pickup import Pickup
from store import Store
from train_worker.settings import Layout, Settings


@dataclass
class AppState:
    settings: Settings
    store: Store
    dispatcher: Dispatcher
    pickup: Pickup
    notifier: Notifier
    host: HostClient
    autotrainer: AutoTrainer
    default_base: str

    @property
    def layout(self) -> Layout:
        return self.settings.layout


class StateRef:
    """The running server's state for HTTP routes outside MCP (the dashboard); set while the lifespan runs."""

    def __init__(self) -> None:
        self._state: AppState | None = None

    def set(self, state: AppState | None) -> None:
        self._state = state

    @property
    def state(self) -> AppState:
        if self._state is None:
            raise RuntimeError("the engrain server is not running (its lifespan has not started)")
        return self._state
