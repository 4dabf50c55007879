"""Headless Chromium driven over the DevTools protocol through a pipe (`--remote-debugging-pipe`).

No driver, no websocket library, no port: Chromium reads commands on fd 3 and writes replies and events on
fd 4, each a JSON message ended by a NUL byte. Debian's `chromium` package is the browser (`make chromium`).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

# Without the networking switches Chromium keeps calling home, which this closed network answers slowly.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-pipe",
]


class BrowserError(Exception):
    pass


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One Chromium process and one page in it."""

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self._proc = proc
        self._out = to_browser
        self._in = from_browser
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    # -- the protocol ------------------------------------------------------------------------------

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for Chromium")
            ready, _, _ = select.select([self._in], [], [], left)
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium exited (code {self._proc.poll()})")
                self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(raw))

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    # -- what a test does ----------------------------------------------------------------------------

    def open_page(self) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def goto(self, url: str, timeout: float = 30) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout)

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self, selector: str = "body") -> str:
        return str(self.eval(f"document.querySelector({json.dumps(selector)})?.innerText ?? ''"))

    def wait_for(self, expression: str, timeout: float = 30, every: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(every)
        raise BrowserError(f"timed out after {timeout:.0f} s waiting for {expression}")

    def submit(self, form_selector: str, timeout: float = 30, **fields: str) -> None:
        """Fill a form's fields and submit it the way a click would, then wait for the next page."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        fills = "".join(
            f"f.elements[{json.dumps(name)}].value = {json.dumps(value)};" for name, value in fields.items()
        )
        self.eval(
            f"(() => {{ const f = document.querySelector({json.dumps(form_selector)}); {fills} f.requestSubmit(); }})()"
        )
        self.wait_event("Page.loadEventFired", timeout)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            width, height = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": min(height, 6000), "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with suppress(BrowserError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._out, self._in):
            with suppress(OSError):
                os.close(fd)


@contextmanager
def chromium(executable: str | None = None, log: Path | None = None) -> Iterator[Browser]:
    """Start a fresh headless Chromium (its own profile in a temporary folder) with one page open."""
    path = executable or chromium_path()
    if path is None:
        raise BrowserError("Chromium is not installed: run `make chromium` (Debian's chromium package)")
    profile = tempfile.mkdtemp(prefix="engrain-chromium-")
    commands_r, commands_w = os.pipe()  # we write, Chromium reads on fd 3
    replies_r, replies_w = os.pipe()  # Chromium writes on fd 4, we read

    out = log.open("ab") if log else subprocess.DEVNULL
    # bash (dash takes single-digit fds only) puts the pipe ends on fds 3 and 4, then becomes Chromium.
    wiring = f'exec "$0" "$@" 3<&{commands_r} 4>&{replies_w}'
    proc = subprocess.Popen(
        ["/bin/bash", "-c", wiring, path, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        pass_fds=(commands_r, replies_w),
        stdout=out,
        stderr=out,
    )
    os.close(commands_r)
    os.close(replies_w)
    browser = Browser(proc, commands_w, replies_r)
    try:
        browser.open_page()
        yield browser
    finally:
        browser.close()
        if log:
            out.close()  # type: ignore[union-attr]
        shutil.rmtree(profile, ignore_errors=True)
