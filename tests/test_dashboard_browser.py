"""The dashboard as a person sees it: headless Chromium against a real `engrain serve --http`, over a home whose
runs real workers made on the tiny model. Screenshots of every page land in the test's folder (and in
$ENGRAIN_SCREENSHOTS when set)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client

from server.app import create_server
from tests.browser import Browser, chromium, chromium_path
from tests.dashboard_home import INJECTION, Built, build
from tests.procs import ENGRAIN, Procs, free_port, processes, tiny_env_vars, wait_for
from tests.test_server_tools import call
from tests.test_worker import SLOW
from train_worker.settings import Settings

pytestmark = pytest.mark.browser


@dataclass
class World:
    settings: Settings
    env: dict[str, str]
    procs: Procs
    built: Built
    url: str  # the dashboard's base URL
    token: str
    browser: Browser
    shots: Path

    def shot(self, name: str) -> Path:
        path = self.browser.screenshot(self.shots / f"{name}.png")
        extra = os.environ.get("ENGRAIN_SCREENSHOTS")
        if extra:
            shutil.copy(path, Path(extra) / path.name)
        return path


@pytest.fixture(scope="module")
def world(tiny_base: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if chromium_path() is None:
        pytest.fail("Chromium is not installed: run `make chromium` (Debian's chromium package)")
    model_dir, cache = tiny_base
    root = tmp_path_factory.mktemp("dashboard")
    home = root / "home"
    shutil.copytree(cache, home / "cache")
    env = tiny_env_vars(home, model_dir)
    settings = Settings(
        home=home,
        base_model=str(model_dir),
        host_port=int(env["ENGRAIN_HOST_PORT"]),
        embedded_services=False,
        host_controller="http",
    )
    with processes(root / "logs", env) as procs:
        procs.start("host")
        built = anyio.run(build, settings, procs, env)
        port = free_port()
        procs.start("serve", "--http", "--port", str(port))
        url = f"http://127.0.0.1:{port}/dashboard"
        wait_for(lambda: _status(f"{url}/") == 401, what="the dashboard")
        token = (home / "token").read_text().strip()
        with chromium(log=root / "chromium.log") as browser:
            browser.goto(f"{url}/")
            assert browser.text("h1") == "Sign in"
            browser.submit("#login", token=token)
            yield World(settings, env, procs, built, url, token, browser, root / "shots")


def _status(url: str, **kwargs: object) -> int | None:
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code  # type: ignore[arg-type]
    except httpx.HTTPError:
        return None


def test_kernels_page(world: World) -> None:
    b = world.browser
    b.goto(f"{world.url}/")
    assert b.text("h1") == "Kernels"
    for name in ("default", "support", "tiny"):
        assert name in b.text(f"#kernel-{name} h2")
    tiny = b.text("#kernel-tiny")
    assert "serves v2" in tiny and "deployed" in tiny
    assert "auto-training is off for this kernel" in tiny
    world.shot("kernels")


def test_kernel_page_shows_the_timeline_and_each_versions_gates_facts_and_answer_changes(world: World) -> None:
    b = world.browser
    b.goto(f"{world.url}/kernels/tiny")
    timeline = b.text("ol.timeline")
    assert "v2 deployed" in timeline and "v1 deployed" in timeline
    assert "rejected" in timeline and "acquisition" in timeline  # the rejected run names its gate
    v2 = b.text("#v2")
    assert "serving" in v2 and "What it learnt (4 new experiences)" in v2 and "Answers against v1" in v2
    rows = b.eval("[...document.querySelectorAll('#v2 table.gates tbody tr')].map(r => r.innerText)")
    assert any(r.startswith("acquisition") and "passed" in r for r in rows), rows
    assert len(rows) >= 6  # every gate: value, threshold, margin
    world.shot("kernel")


def test_run_page_draws_the_loss_curve_and_the_gate_report(world: World) -> None:
    b = world.browser
    b.goto(f"{world.url}/runs/{world.built.deployed[0]}")
    points = int(b.eval("document.querySelector('svg.chart.loss').dataset.points"))
    drawn = b.eval("document.querySelector('svg.chart.loss polyline').points.numberOfItems")
    assert points >= 2 and drawn == points
    assert "acquisition" in b.text("section.report") and "passed" in b.text("section.report")
    assert b.eval("document.querySelector('#live').dataset.stream") is None  # it has ended: nothing streams
    world.shot("run")


def test_a_recorded_script_is_shown_as_text_and_never_runs(world: World) -> None:
    b = world.browser
    b.goto(f"{world.url}/kernels/tiny/experiences?q=s1")
    assert INJECTION in b.text("table.experiences")
    assert "It is <b>zub</b>." in b.text("table.experiences")
    assert b.eval("window.__pwned") is None
    assert b.eval("document.querySelectorAll('main script, main img, main b').length") == 0
    b.goto(f"{world.url}/runs/{world.built.deployed[0]}")  # the report's answers show it too
    b.eval("document.querySelectorAll('details').forEach(d => d.open = true)")
    assert INJECTION in b.text("section.report")
    assert b.eval("window.__pwned") is None
    world.shot("experiences")


def test_review_queue_and_provenance(world: World) -> None:
    b = world.browser
    b.goto(f"{world.url}/kernels/tiny/review")
    queue = b.text("table.review")
    assert "Code q9?" in queue and str(world.built.review_query) in queue
    b.goto(f"{world.url}/kernels/tiny/experiences?source=correction")
    row = b.text("table.experiences")
    assert "It is kel, always." in row and "from query #" in row
    b.goto(f"{world.url}/kernels/tiny/experiences?q=f1")
    assert "corrected by" in b.text("table.experiences")
    world.shot("review")


def test_the_real_server_refuses_what_it_must(world: World) -> None:
    signed_out = httpx.get(f"{world.url}/kernels/tiny")
    assert signed_out.status_code == 401 and 'id="login"' in signed_out.text
    assert httpx.get(f"{world.url}/actions/estop-on").status_code == 405
    bearer = {"Authorization": f"Bearer {world.token}"}
    cross = httpx.post(
        f"{world.url}/actions/estop-on",
        data={"confirm": "yes"},
        headers={**bearer, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert cross.status_code == 403 and not world.settings.layout.estop.exists()
    mcp = httpx.post(world.url.replace("/dashboard", "/mcp"), json={})
    assert mcp.status_code == 401  # the MCP endpoint beside it keeps its own bearer check


def test_terminal_views(world: World) -> None:
    env = {**os.environ, **world.env, "COLUMNS": "220"}

    def engrain(*args: str) -> str:
        done = subprocess.run([ENGRAIN, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    status = engrain("status")
    for text in ("tiny", "support", "default", "v2", "12 (8 trained)"):
        assert text in status, text
    runs = engrain("runs", "--kernel", "tiny")
    assert runs.count("deployed") == 2 and "rejected" in runs and "failed: acquisition" in runs
    shown = engrain("show", world.built.rejected)
    assert "rejected" in shown and "acquisition" in shown and "failed" in shown
    missing = subprocess.run([ENGRAIN, "show", "r-20200101T000000-000000"], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "no run with run_id" in missing.stderr


def test_a_live_run_updates_in_place_and_is_cancelled_from_the_page(world: World) -> None:
    b = world.browser

    async def start() -> str:
        async with Client(create_server(world.settings)) as client:
            await call(client, "configure_kernel", kernel="tiny", settings=SLOW)
            return str((await call(client, "train_model", kernel="tiny"))["run_id"])

    run_id = anyio.run(start)
    worker = world.procs.start("worker", log="live-worker", ENGRAIN_HOST_CONTROLLER="none")
    watch = subprocess.Popen(
        [ENGRAIN, "show", run_id, "--watch", "--interval", "0.5"],
        env={**os.environ, **world.env, "COLUMNS": "160"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        b.goto(f"{world.url}/runs/{run_id}")
        b.eval("window.__sameDocument = true")
        first = int(b.wait_for("Number(document.querySelector('#live .status-line').dataset.step) || 0", timeout=90))
        updates = int(b.eval("document.querySelector('#live').dataset.updates || 0"))
        later = b.wait_for(
            f"(Number(document.querySelector('#live .status-line').dataset.step) || 0) > {first} "
            "&& document.querySelector('#live .status-line').dataset.step",
            timeout=90,
        )
        assert int(later) > first
        assert b.eval("window.__sameDocument") is True  # the panel changed without a reload
        assert int(b.eval("document.querySelector('#live').dataset.updates")) > updates  # pushed, not reloaded
        assert int(b.eval("document.querySelector('svg.chart.loss').dataset.points")) >= 2
        assert "running" in b.text("#live .headline")
        world.shot("run-live")
        b.goto(b.eval("document.querySelector('#live a.act').href"))  # "Cancel run"
        assert f"Cancel run {run_id}?" in b.text("h1")
        b.submit("#confirm")
        assert "cancel" in b.text("#done")
        b.goto(f"{world.url}/runs/{run_id}")
        # Still live, the page learns the end from its stream; if the worker was quicker, it opens ended.
        b.wait_for("document.querySelector('#live .headline').innerText.startsWith('cancelled')", timeout=120)
        assert "cancelled during training" in b.text("#live")
        assert worker.wait(60) == 0
        out, err = watch.communicate(timeout=60)  # --watch returns by itself once the run has ended
        assert watch.returncode == 0, err
        assert "cancelled" in out
    finally:
        for proc in (watch, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
