"""Fault injection for the fault suite (tests/test_faults.py, bench/faults.py); inert unless asked for.

`ENGRAIN_FAULT=<action>:<point>` makes the worker misbehave at one named point of a run:
- `pause`: announce the point (the file `$ENGRAIN_FAULT_READY`, if set) and wait there, as if that phase
  took long, until a stop is requested (SIGTERM, a cancel) or the announcement file is removed; then go
  on, so the phase's own stop handling runs. A test kills, signals or cancels while it waits.
- `kill`: the process SIGKILLs itself at the point: a crash exactly between two writes.
- `enospc`: raise `OSError(ENOSPC)` there, as a full disk would.
- `tear`: cut the file just written there to half its length, then SIGKILL: a write torn by the crash
  (points `result`, `finishing` and `deploying` name the file they follow).

A fault fires once per process; with `ENGRAIN_FAULT_ONCE=<file>` it fires only while that file does not
exist, and creates it, so a watcher that passes the fault on to every worker it starts only hurts the first.

Points, in run order: `claim` (marker written, request not yet renamed), `claimed`, `stopping_host`,
`loading`, `baseline`, `training`, `evaluating`, `deploying` (deploy committed, version not written),
`switch` (version installed, `current` not switched), `result` (result.json written, inbox copy not),
`finishing` (inbox copy written, marker not removed).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from learning import interrupt

ENV = "ENGRAIN_FAULT"
READY_ENV = "ENGRAIN_FAULT_READY"
ONCE_ENV = "ENGRAIN_FAULT_ONCE"
PAUSE_LIMIT_S = 600.0  # a forgotten pause must not hold a worker forever


_fired: set[str] = set()


def point(name: str, written: Path | None = None) -> None:
    """Misbehave here if `ENGRAIN_FAULT` names this point; only the first time a process reaches it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, where = spec.partition(":")
    if where != name or name in _fired:
        return
    _fired.add(name)
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
    if action == "tear" and written is not None:
        data = written.read_bytes()
        written.write_bytes(data[: len(data) // 2])
        action = "kill"
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    elif action == "pause":
        ready = Path(os.environ.get(READY_ENV) or os.devnull)
        if ready != Path(os.devnull):
            ready.write_text(f"{name} {os.getpid()}\n")
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while interrupt.requested() is None and time.monotonic() < deadline and ready.exists():
            time.sleep(0.02)
