"""The host's two watcher threads on the tiny model.

The kernel watcher must survive whatever it meets in `kernels/`: each test first plants one trigger that
used to kill the thread, then deploys a good version that the watcher must still pick up by itself.
The lease watcher unloads while a live training lease exists and reloads when it is gone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from host.engine import Engine, Job
from host.kernel_watch import KernelWatcher
from tests.host.conftest import deploy
from tests.learning.conftest import make_tokenizer
from tests.procs import wait_for
from train_worker.protocol import TrainingLease, write_model

WAIT = 60  # seconds; the watchers poll every 50 ms here, but a loaded machine reloads slowly


@pytest.fixture
def watched(engine: Engine) -> Iterator[Engine]:
    KernelWatcher(engine, interval=0.05).start()
    yield engine


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny base model, of another width: its adapters cannot load onto the test host's base."""
    path = tmp_path_factory.mktemp("other-base")
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def picks_up_a_good_deploy(engine: Engine, tiny_base: tuple[Path, Path]) -> None:
    deploy(engine.settings, "good", 1, tiny_base[0], seed=1)
    wait_for(lambda: engine.resident().get("good") == 1, within=WAIT, what="the watcher to load good v1")


def test_a_stray_file_in_kernels(
    watched: Engine, tiny_base: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="host")
    watched.layout.kernels.mkdir(parents=True, exist_ok=True)
    (watched.layout.kernels / "README.txt").write_text("notes\n")
    (watched.layout.kernels / "Not A Kernel").mkdir()
    picks_up_a_good_deploy(watched, tiny_base)
    assert caplog.text.count("kernels/README.txt") == 1  # logged once, not every half second


def test_a_current_that_is_a_regular_file(
    watched: Engine, tiny_base: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="host")
    broken = watched.layout.kernel_dir("broken")
    broken.mkdir(parents=True)
    (broken / "current").write_text("versions/v1\n")
    picks_up_a_good_deploy(watched, tiny_base)
    assert caplog.text.count("not a link to a version folder") == 1
    with pytest.raises(Exception, match="not a link to a version folder"):
        watched.submit(Job("broken", [1, 2, 3], 2)).result(WAIT)


def test_a_kernel_trained_on_another_base(
    watched: Engine, tiny_base: tuple[Path, Path], other_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="host")
    deploy(watched.settings, "foreign", 1, other_base, seed=3)
    picks_up_a_good_deploy(watched, tiny_base)
    assert "foreign" not in watched.resident()
    with pytest.raises(Exception, match="trained on base model"):
        watched.submit(Job("foreign", [1, 2, 3], 2)).result(WAIT)
    assert caplog.text.count("trained on base model") == 1


# -- the training lease ---------------------------------------------------------------------------


def lease(holder: int, *, age_s: float = 0.0, run_id: str = "r-20261124T100000-abcdef") -> TrainingLease:
    now = datetime.now(UTC) - timedelta(seconds=age_s)
    return TrainingLease(holder_pid=holder, run_id=run_id, acquired_at=now, heartbeat_at=now, ttl_s=30)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def test_lease_unloads_and_its_end_reloads(engine: Engine, sleeper: subprocess.Popen[bytes]) -> None:
    from host.lease_watch import LeaseWatcher

    watcher = LeaseWatcher(engine, interval=0.05)
    watcher.start()
    path = engine.layout.lease
    write_model(path, lease(sleeper.pid))
    wait_for(lambda: engine.status == "unloaded", within=WAIT, what="unload under a live lease")
    assert engine.lease is not None and "r-20261124T100000-abcdef" in engine.unavailable_reason()
    with pytest.raises(Exception, match="reloads itself when the run ends"):
        engine.submit(Job("default", [1, 2, 3], 2)).result(WAIT)
    path.unlink()  # released
    wait_for(lambda: engine.status == "ok", within=WAIT, what="reload after the lease is released")
    write_model(path, lease(sleeper.pid, age_s=60))  # a heartbeat older than its ttl: stale
    assert not watcher.prime()
    write_model(path, lease(os.getpid()))
    wait_for(lambda: engine.status == "unloaded", within=WAIT, what="unload again")
    sleeper.kill()
    write_model(path, lease(sleeper.pid))  # its holder died (a zombie until reaped counts as dead)
    wait_for(lambda: engine.status == "ok", within=WAIT, what="reload once the holder is dead")
    path.write_text("{not json")
    assert not watcher.prime() and engine.status == "ok"
