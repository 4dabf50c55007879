"""Fixtures shared by the whole suite: an isolated ENGRAIN_HOME, settings, and MCP clients in both eras."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from server.app import create_server
from train_worker.settings import Settings

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ENGRAIN_HOME; the environment points at it so subprocesses agree."""
    path = tmp_path / "engrain-home"
    monkeypatch.setenv("ENGRAIN_HOME", str(path))
    monkeypatch.delenv("ENGRAIN_CONFIG", raising=False)
    # A port nothing listens on, so query_kernel meets no stray host.
    monkeypatch.setenv("ENGRAIN_HOST_PORT", "9")
    monkeypatch.setenv("ENGRAIN_EMBEDDED_SERVICES", "false")
    yield path


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings()


@pytest.fixture(params=["legacy", "auto"], ids=["legacy-era", "modern-era"])
def mode(request: pytest.FixtureRequest) -> str:
    """Both protocol eras: 2025-11-25 with its handshake, and 2026-07-28 without."""
    return str(request.param)


@pytest.fixture
def connect(settings: Settings, mode: str) -> Any:
    """`async with connect() as client:` an in-process server over `settings`, in the fixture's era."""

    @asynccontextmanager
    async def _connect(**kwargs: Any) -> AsyncIterator[Client]:
        async with Client(create_server(settings), mode=mode, **kwargs) as client:
            yield client

    return _connect
