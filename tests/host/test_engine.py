"""The engine on the tiny model: adapters follow `current`, hot-swaps equal fresh loads, kernels stay apart."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from host.engine import Engine, Job, KernelUnservable
from host.transformers_backend import TransformersBackend
from learning.formatting import encode_prompt
from learning.scope import SCOPE_FILE, Scope
from tests.host.conftest import PROMPTS, count_batches, deploy, install, make_adapter, reference
from train_worker.deploy import KernelFiles
from train_worker.settings import Settings


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
    return [(c.tokens, c.version) for c in (f.result(60) for f in futures)]


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
        answers[kernel].append(future.result(60).tokens)
    assert answers == {"alpha": want_a, "beta": want_b, "plain": want_base}


def test_concurrent_requests_share_decoding_steps_streamed_or_not(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = count_batches(engine, monkeypatch)
    pieces: list[list[str]] = [[], []]
    jobs = [Job("default", encode_prompt(engine.tokenizer, p), 10) for p in PROMPTS]
    jobs[0].on_text, jobs[1].on_text = pieces[0].append, pieces[1].append
    jobs.append(Job("default", encode_prompt(engine.tokenizer, PROMPTS[0]), 10))
    gate = threading.Event()
    engine.call(gate.wait)  # the engine thread waits until all four are queued, however slow this thread is
    futures = [engine.submit(j) for j in jobs]
    gate.set()
    done = [f.result(60) for f in futures]
    assert batches == [4]  # one batch, one decoding loop for all four
    assert ["".join(p) for p in pieces] == [done[0].text, done[1].text]
    assert done[0].tokens == done[3].tokens  # batch companions do not change a greedy answer


def test_a_cancelled_request_leaves_the_batch(engine: Engine) -> None:
    job = Job("default", encode_prompt(engine.tokenizer, PROMPTS[0]), 200)
    other = Job("default", encode_prompt(engine.tokenizer, PROMPTS[1]), 30)
    job.on_text = lambda _: job.cancelled.set()  # the client goes away after the first text
    first, second = engine.submit(job), engine.submit(other)
    assert len(first.result(60).tokens) < 10
    assert second.result(60).tokens  # its companion went on


def test_a_scoped_version_answers_only_what_it_was_taught_and_the_base_the_rest(
    engine: Engine, tiny_base: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, _ = tiny_base
    files = KernelFiles(engine.settings.layout, "k")
    staged = files.versions_dir / ".v1.staging"
    make_adapter(model_dir, staged, seed=5, targets="all-linear")
    (staged / SCOPE_FILE).write_text(Scope.of(["What is code Orvania?"], 0.5).model_dump_json())
    v1 = install(engine.settings, "k", 1, staged, str(model_dir))
    taught, other = "What is code Orvania?", "What is code Germany?"
    batches = count_batches(engine, monkeypatch)
    gate = threading.Event()
    engine.call(gate.wait)  # both queued before the engine looks: they arrive in one batch
    futures = [engine.submit(Job("k", encode_prompt(engine.tokenizer, p), 12, text=p)) for p in (taught, other)]
    gate.set()
    inside, outside = (f.result(60) for f in futures)
    assert (inside.version, outside.version) == (1, None)
    assert inside.tokens == reference(model_dir, v1, [taught])[0]
    assert outside.tokens == reference(model_dir, None, [other])[0] != reference(model_dir, v1, [other])[0]
    assert batches == [1, 1]  # the batch split in two: one decoding loop with the adapter, one without
    # A request without routing text (a caller that does not say what it asks) gets the adapter.
    assert ask(engine, "k", [other])[0][1] == 1


def test_an_unreadable_scope_refuses_the_version_and_says_what_to_do(
    engine: Engine, tiny_base: tuple[Path, Path]
) -> None:
    model_dir, _ = tiny_base
    files = KernelFiles(engine.settings.layout, "k")
    staged = files.versions_dir / ".v1.staging"
    make_adapter(model_dir, staged, seed=5, targets="all-linear")
    (staged / SCOPE_FILE).write_text('{"threshold": 2, "keys": []}')
    install(engine.settings, "k", 1, staged, str(model_dir))
    with pytest.raises(
        KernelUnservable,
        match=r"scope.json is unreadable \(threshold: Input should be less than or equal to 1\); roll the kernel",
    ):
        engine.submit(Job("k", encode_prompt(engine.tokenizer, "Hi?"), 4, text="Hi?")).result(60)
