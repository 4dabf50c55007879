"""Fixtures shared by the whole suite: an isolated ENGRAIN_HOME, settings, and MCP clients in both eras."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama saved as a local model directory, and its baseline cache, built once."""
    from learning.anchors import ensure_baseline
    from learning.model_loading import load_base
    from tests.learning.conftest import make_model, make_tokenizer

    root = tmp_path_factory.mktemp("tiny-base")
    model_dir, cache = root / "model", root / "cache"
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    try:
        model, tok = load_base(model_dir)
        ensure_baseline(model, tok, model_dir, cache)
    finally:
        torch.set_num_threads(threads)
    return model_dir, cache


@pytest.fixture
def tiny_env(home: Path, tiny_base: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """ENGRAIN_* for real processes over the tiny model, with its baseline already in the home's cache."""
    from tests.procs import tiny_env_vars

    model_dir, cache = tiny_base
    shutil.copytree(cache, home / "cache")
    env = tiny_env_vars(home, model_dir)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def real_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model and baseline caches shared by every slow test of a session (ENGRAIN_SLOW_CACHE keeps them)."""
    kept = os.environ.get("ENGRAIN_SLOW_CACHE")
    root = Path(kept) if kept else tmp_path_factory.mktemp("real-caches")
    for name in ("models", "cache"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return root
