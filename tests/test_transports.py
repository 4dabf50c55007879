"""The real `engrain serve` process: over stdio, over HTTP with a bearer token, and under the MCP Inspector CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from tests.procs import ENGRAIN, free_port, wait_for
from tests.test_server_tools import FACTS, call


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "ENGRAIN_HOME": str(home),
        "ENGRAIN_HOST_PORT": "9",
        "ENGRAIN_EMBEDDED_SERVICES": "false",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


@pytest.mark.anyio
@pytest.mark.parametrize("era", ["legacy", "auto"])
async def test_stdio_subprocess_serves_tools_and_never_imports_torch(home: Path, tmp_path: Path, era: str) -> None:
    params = StdioServerParameters(command=ENGRAIN, args=["serve"], env=_env(home, PYTHONPROFILEIMPORTTIME="1"))
    errlog = tmp_path / "stderr.txt"
    with errlog.open("w") as err:
        async with Client(stdio_client(params, errlog=err), mode=era) as client:
            recorded = await call(client, "record_experiences", kernel="default", items=FACTS)
            assert recorded["created"] == 2
            started = await call(client, "train_model", kernel="default")
            assert started["status"] == "requested"
            status = await call(client, "training_status", run_id=started["run_id"])
            assert status["run"]["n_new"] == 2
    log = errlog.read_text()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in log.splitlines() if "import time:" in line}
    assert "mcp" in imported and "aiosqlite" in imported  # the import log is real
    assert "torch" not in imported, "engrain serve must start without importing torch"
    assert "transformers" not in imported and "peft" not in imported
    assert (home / "requests" / "pending.json").exists()


@contextmanager
def _serve_http(home: Path, tmp_path: Path, *extra: str) -> Iterator[tuple[str, str]]:
    port = free_port()
    log = (tmp_path / "http.log").open("w")
    proc = subprocess.Popen(
        [ENGRAIN, "serve", "--http", "--port", str(port), *(a.replace("PORT", str(port)) for a in extra)],
        env={**os.environ, **_env(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/mcp"

    def listening() -> bool:
        try:
            httpx.get(url, timeout=0.5)
            return True
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "http.log").read_text()) from None
            return False

    try:
        wait_for(listening, within=60, what="engrain serve --http to listen")
        token_file = home / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        yield url, token_file.read_text().strip()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def http_server(home: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    with _serve_http(home, tmp_path) as served:
        yield served


def test_allowed_host_adds_to_the_loopback_names(home: Path, tmp_path: Path) -> None:
    """--allowed-host used to replace the loopback defaults, so 127.0.0.1 itself was refused (421)."""
    with _serve_http(home, tmp_path, "--allowed-host", "engrain.lan:PORT") as (url, token):
        port = url.split(":")[2].split("/")[0]
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {token}"}

        def status(host: str) -> int:
            return httpx.post(url, json=body, headers={**headers, "Host": host}).status_code

        assert status(f"127.0.0.1:{port}") != 421
        assert status(f"localhost:{port}") != 421
        assert status(f"engrain.lan:{port}") != 421
        assert status(f"evil.example:{port}") == 421


def test_http_requires_the_bearer_token(http_server: tuple[str, str]) -> None:
    url, _ = http_server
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    denied = httpx.post(url, json=body, headers=headers)
    assert denied.status_code == 401
    assert "resource_metadata" in denied.headers.get("www-authenticate", "")
    wrong = httpx.post(url, json=body, headers={**headers, "Authorization": "Bearer nope"})
    assert wrong.status_code == 401


@pytest.mark.anyio
async def test_http_client_with_the_token_uses_the_tools(http_server: tuple[str, str]) -> None:
    import httpx2

    url, token = http_server
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        kernels = await call(client, "list_kernels")
        assert [k["name"] for k in kernels["kernels"]] == ["default"]
        recorded = await call(client, "record_experience", kernel="default", **FACTS[0])
        assert recorded["created"] == 1


NPX = shutil.which("npx")
INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"


def _inspector(home: Path, tmp_path: Path, *args: str, era: str | None = None) -> subprocess.CompletedProcess[str]:
    # The Inspector writes ~/.mcp-inspector: give it a scratch HOME, but keep npm's download cache.
    npm_cache = os.environ.get("NPM_CONFIG_CACHE") or str(Path.home() / ".npm")
    env = {**os.environ, **_env(home), "HOME": str(tmp_path / "inspector-home"), "NPM_CONFIG_CACHE": npm_cache}
    command = [NPX or "npx", "-y", INSPECTOR, "--cli", "-e", f"ENGRAIN_HOME={home}", "-e", "ENGRAIN_HOST_PORT=9"]
    command += ["-e", "ENGRAIN_EMBEDDED_SERVICES=false", ENGRAIN, "serve", *args]
    if era:
        command += ["--protocol-era", era]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.npx
@pytest.mark.skipif(NPX is None, reason="npx is not installed (Node.js), so the MCP Inspector CLI cannot run")
@pytest.mark.parametrize("era", [None, "modern"])
def test_mcp_inspector_cli_lists_and_calls_tools(home: Path, tmp_path: Path, era: str | None) -> None:
    tools = _json(_inspector(home, tmp_path, "--method", "tools/list", era=era))
    names = {t["name"] for t in tools["tools"]}
    assert {"record_experience", "train_model", "training_status", "query_kernel"} <= names
    templates = _json(_inspector(home, tmp_path, "--method", "resources/templates/list", era=era))
    assert {t["uriTemplate"] for t in templates["resourceTemplates"]} == {
        "engrain://kernels/{name}",
        "engrain://runs/{run_id}",
    }
    args = json.dumps({"kernel": "default", **FACTS[0]})
    called = _json(
        _inspector(
            home,
            tmp_path,
            "--method",
            "tools/call",
            "--tool-name",
            "record_experience",
            "--tool-args-json",
            args,
            era=era,
        )
    )
    assert called["structuredContent"]["untrained"] == 1
    # An error the agent can act on: the CLI exits 5 and prints the message.
    bad = _inspector(
        home,
        tmp_path,
        "--method",
        "tools/call",
        "--tool-name",
        "create_kernel",
        "--tool-args-json",
        '{"name": "Bad Name"}',
        era=era,
    )
    assert bad.returncode == 5, bad.stdout + bad.stderr
    assert "invalid kernel name" in bad.stdout + bad.stderr
