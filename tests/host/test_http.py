"""The host's HTTP surface on the tiny model: the OpenAI contract, and what every request must pass first."""

from __future__ import annotations

import json
from typing import Any

from starlette.testclient import TestClient

from host.app import create_app
from host.engine import Engine

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}


def client_for(engine: Engine, host: str = "127.0.0.1:8765") -> TestClient:
    return TestClient(create_app(engine, token=TOKEN), base_url=f"http://{host}", headers=AUTH)


def openai_error(response: Any, status: int) -> dict[str, Any]:
    """The response is `status` with OpenAI's error shape; its `error` object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return dict(error)


def test_chat_models_health_and_admin(engine: Engine) -> None:
    client = client_for(engine)
    reply = client.post("/v1/chat/completions", json=BODY)
    assert reply.status_code == 200
    data = reply.json()
    assert data["object"] == "chat.completion" and data["usage"]["completion_tokens"] <= 5
    assert data["choices"][0]["finish_reason"] in ("stop", "length") and data["engrain_version"] is None
    assert client.get("/v1/models").json()["data"][0]["id"] == "default"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "transformers" and len(health["home_id"]) >= 8
    assert openai_error(client.post("/v1/chat/completions", json=BODY | {"model": "Bad Name"}), 404)["param"] == "model"
    missing = openai_error(client.post("/v1/chat/completions", json=BODY | {"model": "nobody"}), 404)
    assert missing["code"] == "model_not_found" and "nobody" in missing["message"]
    assert openai_error(client.post("/v1/chat/completions", json={"model": "default"}), 400)["param"] == "messages"
    assert openai_error(client.post("/v1/chat/completions", json=BODY | {"n": 2}), 400)["param"] == "n"
    assert (
        openai_error(client.post("/v1/chat/completions", json=BODY | {"temperature": 3}), 400)["param"] == "temperature"
    )
    assert client.post("/admin/unload").json() == {"status": "unloaded"}
    refused = openai_error(client.post("/v1/chat/completions", json=BODY), 503)
    assert "/admin/reload" in refused["message"]
    assert client.post("/admin/reload").json() == {"status": "ok"}
    assert client.post("/v1/chat/completions", json=BODY).status_code == 200


def test_every_route_needs_the_token(engine: Engine) -> None:
    client = TestClient(create_app(engine, token=TOKEN), base_url="http://127.0.0.1:8765")
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/admin/unload"), ("POST", "/admin/reload"), ("GET", "/nowhere")]:  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = client.request(method, path, json=BODY, headers=headers)
            assert openai_error(response, 401)["code"] == "invalid_api_key", (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
    assert engine.status == "ok"  # the unload without a token did nothing


def test_only_loopback_host_headers(engine: Engine) -> None:
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "localhost", "127.0.0.1"):
        assert client_for(engine, host).get("/health").status_code == 200, host
    for host in ("evil.example:8765", "evil.example", "127.0.0.1.evil.example:8765", "0.0.0.0:8765"):
        assert "127.0.0.1 or localhost" in openai_error(client_for(engine, host).get("/health"), 421)["message"]


def test_bodies_must_be_json_and_small(engine: Engine) -> None:
    client = client_for(engine)
    text = client.post("/v1/chat/completions", content=json.dumps(BODY), headers={"Content-Type": "text/plain"})
    assert "application/json" in openai_error(text, 415)["message"]
    form = client.post("/v1/chat/completions", data={"model": "default"})
    openai_error(form, 415)
    big = BODY | {"messages": [{"role": "user", "content": "x" * (engine.settings.host_max_body_bytes + 1)}]}
    assert "ENGRAIN_HOST_MAX_BODY_BYTES" in openai_error(client.post("/v1/chat/completions", json=big), 413)["message"]

    def chunks() -> Any:  # no Content-Length: the cap holds while reading
        yield json.dumps(BODY)[:-1].encode()
        yield b', "pad": "' + b"y" * engine.settings.host_max_body_bytes + b'"}'

    openai_error(
        client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413
    )


def test_long_prompts_are_refused_before_generation(engine: Engine) -> None:
    client = client_for(engine)
    limit = engine.settings.host_max_prompt_tokens
    long = BODY | {"messages": [{"role": "user", "content": "a" * (limit + 10)}]}  # one token per byte here
    error = openai_error(client.post("/v1/chat/completions", json=long), 400)
    assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]


def events(response: Any) -> list[Any]:
    """The `data:` payloads of a server-sent event stream; the last one must be [DONE]."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_multi_turn_conversations_are_answered(engine: Engine) -> None:
    turns: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Code f0?"},
        {"role": "assistant", "content": "It is zub."},
        {"role": "user", "content": [{"type": "text", "text": "And code "}, {"type": "text", "text": "f1?"}]},
    ]
    reply = client_for(engine).post("/v1/chat/completions", json=BODY | {"messages": turns, "temperature": 0})
    assert reply.status_code == 200, reply.text
    as_template = engine.tokenizer.apply_chat_template(
        [{"role": t["role"], "content": "And code f1?" if i == 3 else t["content"]} for i, t in enumerate(turns)],
        tokenize=True,
        add_generation_prompt=True,
    )["input_ids"]
    assert reply.json()["usage"]["prompt_tokens"] == len(as_template)
    ends_with_assistant = turns[:3]
    openai_error(client_for(engine).post("/v1/chat/completions", json=BODY | {"messages": ends_with_assistant}), 400)


def test_streaming_gives_the_same_answer_piece_by_piece(engine: Engine) -> None:
    client = client_for(engine)
    body = BODY | {"max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    with client.stream(
        "POST", "/v1/chat/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        assert all(c["usage"] is None for c in events(response))  # usage only when asked for
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True, "model": "nobody"}) as response:
        assert response.status_code == 404  # refused before the stream starts, with a status of its own


def test_stop_sequences_and_max_tokens(engine: Engine) -> None:
    client = client_for(engine)
    body = BODY | {"max_tokens": 16, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    text = whole["message"]["content"]
    stop = next(c for c in text[1:] if c != "\ufffd")  # the random model writes arbitrary bytes
    cut = client.post("/v1/chat/completions", json=body | {"stop": ["never-appears", stop]}).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    short = client.post("/v1/chat/completions", json=body | {"max_completion_tokens": 3}).json()
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    assert openai_error(client.post("/v1/chat/completions", json=body | {"stop": ["a", "b", "c", "d", "e"]}), 400)


def test_a_seed_repeats_a_sample(engine: Engine) -> None:
    client = client_for(engine)
    body = BODY | {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95}

    def answer(**extra: Any) -> str:
        return str(client.post("/v1/chat/completions", json=body | extra).json()["choices"][0]["message"]["content"])

    assert answer(seed=5) == answer(seed=5)
    assert len({answer(seed=s) for s in range(6, 10)}) > 1  # sampling, not greedy
    assert answer(seed=5, temperature=0) == answer(temperature=0, seed=6)  # greedy ignores the seed
