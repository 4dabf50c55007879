"""`engrain watch` backs off from a worker that keeps failing, even though each attempt touches the requests folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.procs import wait_for
from train_worker.settings import Settings

# A worker that fails at once, after touching the request as a claim would (a file event the watcher sees).
FAILING = "import os, sys; open(sys.argv[2], 'a').write('start\\n'); os.utime(sys.argv[1]); sys.exit(1)"

WATCHER = """
import sys
from train_worker.settings import Settings
from train_worker.watch import Watcher
sys.exit(Watcher(Settings(), command=[sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]]).run())
"""


def test_a_failing_worker_is_retried_with_a_growing_pause(settings: Settings, tmp_path: Path) -> None:
    settings.layout.ensure()
    settings.layout.pending.write_text("{}")  # work to do: the failing worker never takes it
    starts = tmp_path / "starts"
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, FAILING, str(settings.layout.pending), str(starts)], env=os.environ.copy()
    )
    try:
        wait_for(starts.exists, within=60, what="the first attempt")
        time.sleep(5)
    finally:
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(30) == 0
    # Pauses of 2 s, then 4 s: at most 3 attempts in 5 s (one per file event, dozens, without the backoff).
    assert starts.read_text().count("start") <= 3
