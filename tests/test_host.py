"""The model host on the tiny model: adapters follow `current`, hot-swaps equal fresh loads, HTTP contract."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from starlette.testclient import TestClient

from host.app import create_app
from host.engine import Engine, Job
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
    settings: Settings, kernel: str, version: int, model_dir: Path, seed: int, targets: Any = "all-linear"
) -> Path:
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
            base_model=str(model_dir),
            created_at=datetime.now(UTC),
        ),
    )
    folder = files.install(staged, version)
    files.switch(version)
    return folder


def reference(model_dir: Path, adapter: Path | None, prompts: list[str], tokens: int = 12) -> list[list[int]]:
    """What plain transformers (+ a freshly loaded adapter) generates: the ground truth for the host."""
    base, tok = load_base(model_dir)
    model: Any = base if adapter is None else PeftModel.from_pretrained(base, str(adapter))
    return generate_ids(model, tok, [encode_prompt(tok, p) for p in prompts], max_new_tokens=tokens)


@pytest.fixture
def engine(tiny_env: dict[str, str]) -> Iterator[Engine]:
    torch.set_num_threads(1)
    settings = Settings()
    engine = Engine(settings, TransformersBackend(settings))
    engine.start()
    engine.ready.wait(60)
    assert engine.status == "ok"
    yield engine
    engine.stop()


def test_a_cuda_host_without_cuda_fails_to_load_and_logs_why(
    tiny_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.ERROR, logger="host")
    settings = Settings(device="cuda")
    engine = Engine(settings, TransformersBackend(settings))
    engine.start()
    try:
        assert engine.ready.wait(60)
        assert engine.status == "failed"
        assert "'cuda' was requested" in caplog.text and "ENGRAIN_DEVICE=cpu" in caplog.text
    finally:
        engine.stop()


def ask(engine: Engine, kernel: str, prompts: list[str], tokens: int = 12) -> list[tuple[list[int], int | None]]:
    """Submit all prompts at once (so the engine batches them) and wait for every answer."""
    futures = [engine.submit(Job(kernel, encode_prompt(engine.tokenizer, p), tokens)) for p in prompts]
    return [f.result(60) for f in futures]


def test_versions_follow_current_and_a_hot_swap_equals_a_fresh_load(
    engine: Engine, tiny_base: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="host")
    model_dir, _ = tiny_base
    settings = engine.settings
    base_answers = reference(model_dir, None, PROMPTS)
    assert [t for t, _ in ask(engine, "k", PROMPTS)] == base_answers

    v1 = deploy(settings, "k", 1, model_dir, seed=1, targets=["q_proj", "v_proj"])
    engine.call(lambda: engine.sync("k")).result(30)
    got = ask(engine, "k", PROMPTS)
    assert [v for _, v in got] == [1, 1, 1]
    assert [t for t, _ in got] == reference(model_dir, v1, PROMPTS) != base_answers

    v2 = deploy(settings, "k", 2, model_dir, seed=2, targets=["q_proj", "v_proj"])  # same shape: in place
    got = ask(engine, "k", PROMPTS)
    assert "kernel k now serves v2 (hot-swapped" in caplog.text
    assert [v for _, v in got] == [2, 2, 2]
    assert [t for t, _ in got] == reference(model_dir, v2, PROMPTS)

    # Modules the resident adapter lacks cannot be hot-swapped: loaded beside, the old one dropped.
    v3 = deploy(settings, "k", 3, model_dir, seed=3, targets="all-linear")
    got = ask(engine, "k", PROMPTS)
    assert "kernel k now serves v3 (loaded" in caplog.text
    assert [t for t, _ in got] == reference(model_dir, v3, PROMPTS)
    assert engine.resident() == {"k": 3}

    KernelFiles(settings.layout, "k").switch(None)  # rollback to the bare base
    got = ask(engine, "k", PROMPTS)
    assert [(t, v) for t, v in got] == [(t, None) for t in base_answers]


def test_resident_kernels_do_not_leak_into_each_other(engine: Engine, tiny_base: tuple[Path, Path]) -> None:
    model_dir, _ = tiny_base
    a = deploy(engine.settings, "alpha", 1, model_dir, seed=11)
    b = deploy(engine.settings, "beta", 1, model_dir, seed=22)
    want_a, want_b = reference(model_dir, a, PROMPTS), reference(model_dir, b, PROMPTS)
    want_base = reference(model_dir, None, PROMPTS)
    # Interleaved and concurrent: the engine groups by kernel and switches adapters between groups.
    futures: list[tuple[str, concurrent.futures.Future[Any]]] = []
    for prompt in PROMPTS:
        for kernel in ("alpha", "beta", "plain"):
            job = Job(kernel, encode_prompt(engine.tokenizer, prompt), 12)
            futures.append((kernel, engine.submit(job)))
    answers: dict[str, list[list[int]]] = {"alpha": [], "beta": [], "plain": []}
    for kernel, future in futures:
        answers[kernel].append(future.result(60)[0])
    assert answers == {"alpha": want_a, "beta": want_b, "plain": want_base}


def test_http_contract(engine: Engine) -> None:
    client = TestClient(create_app(engine, token="s3cret"))
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200
    data = reply.json()
    assert data["object"] == "chat.completion" and data["usage"]["completion_tokens"] <= 5
    assert data["choices"][0]["finish_reason"] in ("stop", "length") and data["engrain_version"] is None
    assert client.get("/v1/models").json()["data"][0]["id"] == "default"
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/chat/completions", json=body | {"stream": True}).status_code == 400
    assert client.post("/v1/chat/completions", json=body | {"model": "Bad Name"}).status_code == 404
    assert client.post("/v1/chat/completions", json={"model": "default"}).status_code == 400
    assert client.post("/admin/unload").status_code == 401
    assert client.post("/admin/unload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert client.post("/admin/unload", headers=auth).json() == {"status": "unloaded"}
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 503 and "training run" in refused.json()["error"]["message"]
    assert client.post("/admin/reload", headers=auth).json() == {"status": "ok"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
