"""Host test helpers: version folders as the worker leaves them, the plain-transformers reference, an engine."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from host.engine import Engine
from host.transformers_backend import TransformersBackend
from learning.formatting import encode_prompt
from learning.generate import generate_ids
from learning.model_loading import load_base
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
    files = KernelFiles(settings.layout, kernel)
    staged = files.versions_dir / f".v{version}.staging"
    make_adapter(model_dir, staged, seed, targets)
    write_model(
        staged / "meta.json",
        VersionMeta(
            kernel=kernel,
            version=version,
            run_id=f"r-20261123T200000-00000{version}",
            parent_version=None,
            base_model=base_model or str(model_dir),
            created_at=datetime.now(UTC),
        ),
    )
    folder = files.install(staged, version)
    with files.locked():
        files.switch(version)
    return folder


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
