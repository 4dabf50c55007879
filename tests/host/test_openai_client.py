"""The official `openai` client against a real host process, on each backend: the transformers backend on the
tiny model, the fast (llama.cpp) backend on the real embedded GGUF."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from host.endpoint import read_endpoint
from tests.procs import processes, wait_for
from train_worker.auth_token import load_or_create_token
from train_worker.settings import Settings


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def api(
    request: pytest.FixtureRequest, tiny_base: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenAI]:
    """An OpenAI client for a running host of each backend (one per module), with the home's token as api_key."""
    home = tmp_path_factory.mktemp("openai") / "home"
    model_dir, cache = tiny_base
    env = {
        "ENGRAIN_HOME": str(home),
        "ENGRAIN_HOST_PORT": "0",
        "ENGRAIN_HOST_BACKEND": request.param,
        "ENGRAIN_EMBEDDED_SERVICES": "false",
        "ENGRAIN_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "ENGRAIN_BASE_MODEL": str(model_dir),
    }
    if request.param == "llama.cpp":  # the real embedded model: its GGUF, and its tokenizer read once
        del env["ENGRAIN_BASE_MODEL"]
        cache = request.getfixturevalue("tokenizer_cache")
    shutil.copytree(cache, home / "cache")
    settings = Settings(home=home)
    with processes(home.parent / "logs", env) as procs:
        procs.start("host")
        endpoint = wait_for(lambda: read_endpoint(settings.layout), within=60, what="host.json")
        client = OpenAI(base_url=f"{endpoint.url}/v1", api_key=load_or_create_token(settings)[0], max_retries=0)
        wait_for(lambda: _ready(client), within=120, what="the host to load")
        yield client


def _ready(client: OpenAI) -> bool:
    try:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    except openai.APIStatusError as exc:
        if exc.status_code == 503:
            return False
        raise
    return True


HI: Any = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_completion_and_its_stream(api: OpenAI) -> None:
    reply = api.chat.completions.create(model="default", messages=HI, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(
        api.chat.completions.create(
            model="default",
            messages=HI,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_multi_turn_stop_and_seed(api: OpenAI) -> None:
    turns: Any = [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    reply = api.chat.completions.create(model="default", messages=turns, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content
    text = api.chat.completions.create(model="default", messages=HI, max_tokens=16, temperature=0)
    content = text.choices[0].message.content or ""
    stop = next(c for c in content[1:] if c.isalpha())
    cut = api.chat.completions.create(model="default", messages=HI, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == content[: content.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    def sample(seed: int) -> str | None:
        r = api.chat.completions.create(
            model="default", messages=HI, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
        )
        return r.choices[0].message.content

    assert sample(1234) == sample(1234)


def test_an_unknown_kernel_is_a_404_in_openai_shape(api: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="no-such-kernel", messages=HI, max_tokens=4)
    body: Any = caught.value.body
    assert body["code"] == "model_not_found" and "no-such-kernel" in body["message"]
    assert [m.id for m in api.models.list()] == ["default"]
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=str(api.base_url), api_key="wrong", max_retries=0).models.list()
