"""The dashboard's HTTP surface in process, over a real store and real files: sign-in, refusals, actions, escaping.

The browser tests (`test_dashboard_browser.py`) drive the same pages in Chromium against real processes.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.server.subscriptions import InMemorySubscriptionBus
from starlette.applications import Starlette
from starlette.routing import Mount

from server.app import create_server, open_state
from server.dashboard.app import Dashboard
from server.dashboard.auth import COOKIE
from server.state import AppState, StateRef
from store.models import NewExperience
from tests.helpers import claim, event, fake_version, result
from tests.procs import ENGRAIN, free_port, processes, wait_for
from tests.test_server_tools import FACTS, GATE, call, error, snapshot
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio

TOKEN = "dashboard-test-token-0123456789"
ORIGIN = "http://127.0.0.1:8766"
INJECTION = "<script>window.__pwned = 1</script>"


@dataclass
class Dash:
    state: AppState
    http: httpx.AsyncClient

    async def sign_in(self) -> str:
        """Sign in like the login form does; return the session's CSRF token."""
        r = await self.http.post("/dashboard/login", data={"token": TOKEN, "next": "/dashboard/runs"})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/runs"
        page = await self.http.get("/dashboard/confirm/estop-on")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text
        return found.group(1)

    async def act(self, action: str, csrf: str, **fields: Any) -> httpx.Response:
        data = {"csrf": csrf, "confirm": "yes", **fields}
        return await self.http.post(f"/dashboard/actions/{action}", data=data, headers={"Origin": ORIGIN})


@pytest.fixture
async def dash(settings: Settings) -> AsyncIterator[Dash]:
    ref = StateRef()
    async with open_state(settings, InMemorySubscriptionBus(), services=False, watch=False, autotrain=False) as state:
        ref.set(state)
        app = Starlette(routes=[Mount("/dashboard", Dashboard(ref, TOKEN).app())])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as http:
            yield Dash(state, http)


async def _requested_run(state: AppState, kernel: str = "default") -> str:
    await state.store.experiences.add_many(
        kernel, [NewExperience(prompt=f["prompt"], response=f["response"]) for f in FACTS]
    )
    run, _ = await state.dispatcher.request(kernel)
    return run.id


async def test_without_the_token_every_page_is_401_with_the_sign_in_form(dash: Dash) -> None:
    for path in ("/", "/runs", "/kernels/default", "/kernels/default/experiences", "/confirm/estop-on"):
        r = await dash.http.get(f"/dashboard{path}")
        assert r.status_code == 401, path
        assert 'id="login"' in r.text and "Kernels" not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    wrong = await dash.http.get("/dashboard/", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    dash.http.cookies.set(COOKIE, "1700000000.abc.deadbeef")
    assert (await dash.http.get("/dashboard/")).status_code == 401
    dash.http.cookies.clear()
    bearer = await dash.http.get("/dashboard/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200 and "default" in bearer.text


async def test_sign_in_sets_an_http_only_strict_cookie_and_a_wrong_token_is_refused(dash: Dash) -> None:
    bad = await dash.http.post("/dashboard/login", data={"token": "guess"})
    assert bad.status_code == 401 and "not this server's token" in unescape(bad.text)
    assert COOKIE not in dash.http.cookies
    r = await dash.http.post("/dashboard/login", data={"token": TOKEN, "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert TOKEN not in cookie
    page = await dash.http.get("/dashboard/")
    assert page.status_code == 200 and "Kernels" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_actions_refuse_get_cross_site_requests_missing_csrf_and_missing_confirmation(
    dash: Dash, settings: Settings
) -> None:
    csrf = await dash.sign_in()
    estop = settings.layout.estop
    assert (await dash.http.get("/dashboard/actions/estop-on")).status_code == 405
    cross = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": ORIGIN},
    ]
    for headers in cross:
        r = await dash.http.post("/dashboard/actions/estop-on", data={"csrf": csrf, "confirm": "yes"}, headers=headers)
        assert r.status_code == 403 and "cross-site" in r.text, headers
    no_csrf = await dash.http.post("/dashboard/actions/estop-on", data={"confirm": "yes"}, headers={"Origin": ORIGIN})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    stale = await dash.act("estop-on", csrf="0" * 64)
    assert stale.status_code == 403
    unconfirmed = await dash.http.post("/dashboard/actions/estop-on", data={"csrf": csrf}, headers={"Origin": ORIGIN})
    assert unconfirmed.status_code == 400 and "confirmation" in unconfirmed.text
    assert not estop.exists()
    # A signed-out browser cannot act either, whatever it sends.
    dash.http.cookies.clear()
    assert (await dash.act("estop-on", csrf)).status_code == 401
    assert not estop.exists()


async def test_an_unknown_host_header_is_refused(dash: Dash) -> None:
    r = await dash.http.get("/dashboard/", headers={"Host": "rebound.example:8766", "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 421 and "--allowed-host" in r.text


async def test_estop_on_and_off_through_the_dashboard_stops_train_model(dash: Dash, settings: Settings) -> None:
    csrf = await dash.sign_in()
    confirm = await dash.http.get("/dashboard/confirm/estop-on")
    assert "No new run starts" in confirm.text and 'name="confirm" value="yes"' in confirm.text
    done = await dash.act("estop-on", csrf)
    assert done.status_code == 200 and "e-stop on" in done.text
    assert settings.layout.estop.exists()
    assert "The e-stop is on" in (await dash.http.get("/dashboard/")).text
    async with Client(create_server(settings)) as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        assert "e-stop" in await error(client, "train_model", kernel="default")
        done = await dash.act("estop-off", csrf)
        assert "e-stop off" in done.text and not settings.layout.estop.exists()
        assert (await call(client, "train_model", kernel="default"))["status"] == "requested"


async def test_rollback_goes_through_the_tool_code_and_shows_on_the_timeline(
    dash: Dash, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = settings.layout
    csrf = await dash.sign_in()
    async with Client(create_server(settings)) as client:
        for version in (1, 2):
            await call(client, "record_experiences", kernel="default", items=[FACTS[version - 1]])
            run_id = (await call(client, "train_model", kernel="default"))["run_id"]
            claim(layout)
            fake_version(layout, "default", version, run_id)
            (layout.kernel_dir("default") / "current").unlink(missing_ok=True)
            (layout.kernel_dir("default") / "current").symlink_to(f"versions/v{version}")
            result(
                layout,
                run_id,
                "default",
                "deployed",
                version=version,
                version_path=f"kernels/default/versions/v{version}",
            )
            await dash.state.pickup.sweep()
        confirm = await dash.http.get("/dashboard/confirm/rollback?kernel=default")
        assert "serves v2 now" in confirm.text and "After this it serves v1" in confirm.text
        done = await dash.act("rollback", csrf, kernel="default")
        assert "default now serves v1" in done.text
        assert (layout.kernel_dir("default") / "current").readlink() == Path("versions/v1")
        info = (await call(client, "list_kernels"))["kernels"][0]
        assert info["deployed_version"] == 1  # the MCP side sees the same state
        await call(client, "rollback_kernel", kernel="default", version=2)
    page = (await dash.http.get("/dashboard/kernels/default")).text
    assert "rolled back from v2 to v1 (via dashboard)" in page
    assert "rolled back from v1 to v2 (via mcp)" in page
    assert page.count("badge s-deployed") >= 2
    # Beyond the newest versions (and the served one), older versions are listed without their reports.
    monkeypatch.setattr("server.views.history.VERSIONS_SHOWN", 1)
    page = (await dash.http.get("/dashboard/kernels/default")).text
    assert "1 older versions" in page and 'id="v1"' not in page and 'id="v2"' in page
    # Rolling back to a version that is not on disk is refused and changes nothing.
    before = snapshot(settings)
    refused = await dash.act("rollback", csrf, kernel="default", version="7")
    assert refused.status_code == 409 and "no version v7 on disk" in refused.text
    assert snapshot(settings) == before


async def test_cancel_a_requested_run_from_the_dashboard(dash: Dash, settings: Settings) -> None:
    csrf = await dash.sign_in()
    run_id = await _requested_run(dash.state)
    confirm = await dash.http.get(f"/dashboard/confirm/cancel?run={run_id}")
    assert f"Cancel run {run_id}?" in confirm.text
    done = await dash.act("cancel", csrf, run=run_id)
    assert done.status_code == 200 and f"run {run_id} is cancelled" in done.text
    assert (await dash.state.store.runs.get(run_id)).status == "cancelled"
    again = await dash.act("cancel", csrf, run=run_id)
    assert again.status_code == 409 and "already ended as cancelled" in again.text
    bad = await dash.act("cancel", csrf, run="../../etc/passwd")
    assert bad.status_code == 400 and "invalid run id" in bad.text


async def test_reset_breaker_from_the_dashboard(dash: Dash) -> None:
    csrf = await dash.sign_in()
    before = (await dash.state.store.kernels.get("default")).breaker_reset_at
    done = await dash.act("reset-breaker", csrf, kernel="default")
    assert "circuit breaker of default is reset" in done.text
    assert (await dash.state.store.kernels.get("default")).breaker_reset_at != before
    unknown = await dash.act("reset-breaker", csrf, kernel="nope")
    assert unknown.status_code == 404 and "no kernel named 'nope'" in unescape(unknown.text)


async def test_recorded_markup_is_shown_as_text(dash: Dash) -> None:
    await dash.state.store.experiences.add_many(
        "default", [NewExperience(prompt=f"What is {INJECTION}?", response='<img src=x onerror="alert(1)">')]
    )
    await dash.sign_in()
    page = (await dash.http.get("/dashboard/kernels/default/experiences?q=script")).text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert INJECTION not in page and "<img src=x" not in page
    nothing = (await dash.http.get("/dashboard/kernels/default/experiences?q=%25")).text  # '%' is not a wildcard
    assert "0 matches" in nothing
    bad = await dash.http.get("/dashboard/kernels/default/experiences?status=bogus")
    assert bad.status_code == 400 and "&#39;bogus&#39; is not one of" in bad.text


async def test_a_run_page_shows_progress_curves_and_every_report_group_and_list(dash: Dash, settings: Settings) -> None:
    layout = settings.layout
    await dash.sign_in()
    run_id = await _requested_run(dash.state)
    claim(layout)
    event(layout, run_id, 0, "claimed")
    for step in range(1, 6):
        event(layout, run_id, step, "training", step=step, total_steps=10, loss=2.0 / step, tokens_per_s=100.0 + step)
    await dash.state.pickup.sweep()
    live = (await dash.http.get(f"/dashboard/runs/{run_id}")).text
    assert f'data-stream="/dashboard/runs/{run_id}/stream"' in live
    assert 'data-points="5"' in live and "50%" in live and "step 5/10" in live
    # A report with groups and lists this dashboard has never heard of: they show up under their own names.
    failed_gate = GATE | {"value": 0.5, "status": "failed", "passed": False, "margin": -0.3}
    report: dict[str, Any] = {
        "metrics": {
            "acquisition_em": 1.0,
            "lost_probes": ["What is the capital of France? -> Lyon"],
            "lost_facts": [{"fact": "Code f0? -> zub", "overwritten_by": "Code f9? -> zub"}],
            "items": [
                {"id": "1", "group": "new", "prompt": "Code f0?", "answer": "It is zub.", "em": True, "f1": 1.0},
                {"id": "c1", "group": "canary", "prompt": INJECTION, "answer": "Paris", "em": False, "f1": 0.0},
            ],
        },
        "gates": {
            "passed": False,
            "gates": [failed_gate],
            "failing": ["acquisition"],
            "skipped": [],
        },
        "outcome": None,
        "canary_summary": ["kept 0 of 1"],
    }
    (layout.run_dir(run_id) / "eval_report.json").write_text(json.dumps(report))
    result(layout, run_id, "default", "rejected", gates=[failed_gate], error="not deployed")
    await dash.state.pickup.sweep()
    page = (await dash.http.get(f"/dashboard/runs/{run_id}")).text
    assert "data-stream" not in page  # ended: nothing more to stream
    for text in ("canary: 1 item, 0% right", "lost probes (1)", "lost facts (1)", "overwritten_by",
                 "canary summary (1)", "acquisition", "-0.300"):  # fmt: skip
        assert text in page, text
    assert INJECTION not in page
    stream = await dash.http.get(f"/dashboard/runs/{run_id}/stream")
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.startswith("event: update\ndata: ") and stream.text.rstrip().endswith(
        "event: end\ndata: rejected"
    )
    broken = layout.run_dir(run_id) / "eval_report.json"
    broken.write_text('{"metrics": 3}')
    shown = (await dash.http.get(f"/dashboard/runs/{run_id}")).text
    assert "does not match the report format" in shown


async def test_unknown_kernels_runs_and_actions_are_404_or_400(dash: Dash) -> None:
    await dash.sign_in()
    assert (await dash.http.get("/dashboard/kernels/nope")).status_code == 404
    assert (await dash.http.get("/dashboard/kernels/Bad%20Name")).status_code == 400
    assert (await dash.http.get("/dashboard/runs/r-20261124T000000-abcdef")).status_code == 404
    assert (await dash.http.get("/dashboard/confirm/format-disk")).status_code == 404


def test_estop_from_the_command_line(home: Path) -> None:
    def engrain(*args: str) -> str:
        done = subprocess.run([ENGRAIN, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "e-stop off" in engrain("estop")
    assert "e-stop on" in engrain("estop", "on") and (home / "ESTOP").exists()
    assert "e-stop on" in engrain("estop", "status")
    assert "e-stop off" in engrain("estop", "off") and not (home / "ESTOP").exists()


def test_engrain_dashboard_serves_the_pages_alone(home: Path, tmp_path: Path) -> None:
    port = free_port()
    with processes(tmp_path / "logs", {"ENGRAIN_TOKEN": TOKEN}) as procs:
        procs.start("dashboard", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(f"{url}/dashboard/") == 401, within=60, what="engrain dashboard")
        root = httpx.get(f"{url}/")
        assert root.status_code == 307 and root.headers["location"] == "/dashboard/"
        page = httpx.get(f"{url}/dashboard/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert page.status_code == 200 and 'id="kernel-default"' in page.text
        assert httpx.get(f"{url}/mcp").status_code == 404  # the dashboard alone: no MCP endpoint
    assert "dashboard at" in procs.log("dashboard")


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None
