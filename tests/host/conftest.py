"""Host test helpers: version folders as the worker leaves them, the plain-transformers reference, an engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from host.engine import Engine
from host.llama_backend import gguf_tokenizer
from host.transformers_backend import TransformersBackend
from learning.formatting import encode_prompt
from learning.generate import generate_ids
from learning.model_loading import embedded_gguf_path, load_base
from train_worker.deploy import KernelFiles
from train_worker.protocol import VersionMeta, write_model
from train_worker.settings import Settings

PROMPTS = ["Code f0?", "What is code f1?", "Tell me something."]


def make_adapter(model_dir: Path, folder: Path, seed: int, targets: Any) -> None:
    """A random (non-identity) LoRA adapter saved as a version folder the worker would leave."""
    base, _ = load_base(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(folder))


def install(settings: Settings, kernel: str, version: int, staged: Path, base_model: str) -> Path:
    """Write meta.json into a staged adapter folder, install it as vN and switch to it, as a deploy does."""
    files = KernelFiles(settings.layout, kernel)
    meta = VersionMeta(
        kernel=kernel,
        version=version,
        run_id=f"r-20261123T200000-00000{version}",
        parent_version=None,
        base_model=base_model,
        created_at=datetime.now(UTC),
    )
    write_model(staged / "meta.json", meta)
    folder = files.install(staged, version)
    with files.locked():
        files.switch(version)
    return folder


def deploy(
    settings: Settings,
    kernel: str,
    version: int,
    model_dir: Path,
    seed: int,
    targets: Any = "all-linear",
    base_model: str | None = None,
) -> Path:
    """Install and switch to a new version, as a worker's deploy does; `base_model` defaults to `model_dir`."""
    staged = KernelFiles(settings.layout, kernel).versions_dir / f".v{version}.staging"
    make_adapter(model_dir, staged, seed, targets)
    return install(settings, kernel, version, staged, base_model or str(model_dir))


def reference(model_dir: Path, adapter: Path | None, prompts: list[str], tokens: int = 12) -> list[list[int]]:
    """What plain transformers (+ a freshly loaded adapter) generates: the ground truth for the host."""
    base, tok = load_base(model_dir)
    model: Any = base if adapter is None else PeftModel.from_pretrained(base, str(adapter))
    return generate_ids(model, tok, [encode_prompt(tok, p) for p in prompts], max_new_tokens=tokens)


@pytest.fixture
def engine(tiny_env: dict[str, str]) -> Iterator[Engine]:
    """A started engine on the tiny model (transformers backend)."""
    torch.set_num_threads(1)
    settings = Settings()
    engine = Engine(settings, TransformersBackend(settings))
    engine.start()
    engine.ready.wait(60)
    assert engine.status == "ok"
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF's tokenizer, read once per session (transformers takes seconds to parse a GGUF)."""
    cache = tmp_path_factory.mktemp("fast-cache")
    gguf_tokenizer(None, embedded_gguf_path(), cache)
    return cache


class Batches(list[int]):
    """The size of every batch the engine hands its backend; `idle` is set while no decoding loop runs."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = threading.Event()
        self.idle.set()


def count_batches(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Batches:
    """Record the size of every batch the engine hands its backend (one entry per decoding loop)."""
    batches = Batches()
    generate = engine.backend.generate

    def counting(kernel: Any, sequences: Any, admit: Any) -> None:
        batches.idle.clear()
        batches.append(len(sequences))
        try:
            generate(kernel, sequences, admit)
        finally:
            batches.idle.set()

    monkeypatch.setattr(engine.backend, "generate", counting)
    return batches
