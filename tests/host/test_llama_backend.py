"""The fast backend (llama.cpp) on the real embedded GGUF: generation, batching, deploys without a base reload.

These need no fp32 model: adapters are made with numpy in peft's format, so each test takes seconds.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host.engine import Engine, Job
from host.llama_backend import LlamaCppBackend
from host.sampling import Sampling
from learning.formatting import encode_prompt
from tests.host.conftest import count_batches
from tests.host.fast import MLP, deploy_random
from tests.procs import wait_for
from train_worker.deploy import KernelFiles
from train_worker.settings import Settings

QUESTIONS = ["What is the capital of France?", "Name three fruits.", "What is 2+2?", "Why is the sky blue?"]


@pytest.fixture
def fast(home: Path, tokenizer_cache: Path) -> Iterator[Engine]:
    settings = Settings(host_threads=1)
    shutil.copytree(tokenizer_cache, settings.layout.cache)
    engine = Engine(settings, LlamaCppBackend(settings))
    engine.start()
    assert engine.ready.wait(120) and engine.status == "ok"
    yield engine
    engine.stop()


def ask(engine: Engine, kernel: str, question: str, tokens: int = 24, **kwargs: Any) -> Any:
    return engine.submit(Job(kernel, encode_prompt(engine.tokenizer, question), tokens, **kwargs)).result(120)


def test_answers_stream_stop_and_repeat_a_seed(fast: Engine) -> None:
    greedy = ask(fast, "default", QUESTIONS[0])
    assert greedy.tokens and greedy.version is None and greedy.text
    assert ask(fast, "default", QUESTIONS[0]).tokens == greedy.tokens
    pieces: list[str] = []
    streamed = ask(fast, "default", QUESTIONS[0], on_text=pieces.append)
    assert "".join(pieces) == streamed.text == greedy.text
    word = greedy.text.split()[1]
    cut = ask(fast, "default", QUESTIONS[0], stop=[word])
    assert cut.text == greedy.text[: greedy.text.index(word)] and cut.finish_reason == "stop"
    hot = Sampling(temperature=1.0, seed=42)
    assert (
        ask(fast, "default", QUESTIONS[1], sampling=hot).text == ask(fast, "default", QUESTIONS[1], sampling=hot).text
    )
    samples = {ask(fast, "default", QUESTIONS[1], sampling=Sampling(temperature=1.0, seed=s)).text for s in range(4)}
    assert len(samples) > 1
    assert ask(fast, "default", QUESTIONS[2], tokens=3).finish_reason == "length"


def test_concurrent_requests_share_steps_and_newcomers_join(fast: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_batches(fast, monkeypatch)
    alone = [ask(fast, "default", q).tokens for q in QUESTIONS]
    # The first request must still be decoding when the others arrive: the one whose answer ran to the limit.
    first_q = max(range(len(QUESTIONS)), key=lambda i: len(alone[i]))
    assert len(alone[first_q]) == 24
    # A loop looks for newcomers once more after its last answer: let it end, or `first` would join it.
    assert calls.idle.wait(30)
    calls.clear()
    decoding, submitted = threading.Event(), threading.Event()

    def hold(_: str) -> None:  # on the engine thread: decoding pauses after its first piece until the rest are queued
        decoding.set()
        submitted.wait(30)

    first = fast.submit(Job("default", encode_prompt(fast.tokenizer, QUESTIONS[first_q]), 48, on_text=hold))
    assert decoding.wait(60)
    others = [i for i in range(len(QUESTIONS)) if i != first_q]
    later = [fast.submit(Job("default", encode_prompt(fast.tokenizer, QUESTIONS[i]), 24)) for i in others]
    submitted.set()
    results = [first.result(120)] + [f.result(120) for f in later]
    assert calls == [1]  # the later three joined the running batch
    assert all(r.text for r in results)
    # Each sequence has a KV cache of its own, so its greedy answer does not depend on its companions.
    assert [r.tokens[:24] for r in results] == [alone[i] for i in [first_q, *others]]


def test_a_deploy_swaps_the_adapter_without_reloading_the_base(fast: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    load = fast.backend.load

    def counting() -> str:
        loads.append("load")
        return load()

    monkeypatch.setattr(fast.backend, "load", counting)
    base = ask(fast, "default", QUESTIONS[0])
    v1 = deploy_random(fast.settings, "k", 1, seed=1, scale=0.3)
    first = ask(fast, "k", QUESTIONS[0])
    assert first.version == 1 and first.tokens != base.tokens
    assert (v1 / "lora.gguf").is_file()  # exported once, beside the version
    deploy_random(fast.settings, "k", 2, seed=2, scale=0.3, targets=["q_proj", "k_proj", "v_proj", "o_proj", *MLP])
    second = ask(fast, "k", QUESTIONS[0])
    assert second.version == 2 and second.tokens != first.tokens
    assert fast.last_deploy_ms is not None  # its time is bench/serve.py's to measure
    with KernelFiles(fast.settings.layout, "k").locked():
        KernelFiles(fast.settings.layout, "k").switch(1)  # rollback: v1's export is reused
    assert ask(fast, "k", QUESTIONS[0]).tokens == first.tokens
    KernelFiles(fast.settings.layout, "k").switch(None)
    assert ask(fast, "k", QUESTIONS[0]).tokens == base.tokens
    assert ask(fast, "default", QUESTIONS[0]).tokens == base.tokens  # other kernels never saw the adapter
    assert loads == []


def test_queries_never_fail_while_versions_deploy(fast: Engine) -> None:
    from host.kernel_watch import KernelWatcher

    KernelWatcher(fast, interval=0.05).start()
    deploy_random(fast.settings, "live", 1, seed=10)
    stop = threading.Event()
    failures: list[BaseException] = []
    answered: list[int | None] = []

    def query() -> None:
        while not stop.is_set():
            try:
                answered.append(ask(fast, "live", QUESTIONS[3], tokens=8).version)
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=query) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(2, 5):
            deploy_random(fast.settings, "live", version, seed=10 + version)
            time.sleep(0.5)
        wait_for(lambda: answered and answered[-1] == 4, within=120, what="answers from v4")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures
    assert set(answered) <= {1, 2, 3, 4}
