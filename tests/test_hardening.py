"""Homes, files, locks, names, numbers and schemas: what the issue found open, each shown closed."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from learning.config import MAX_BATCH_TOKENS, GateThresholds, TrainSettings
from learning.output_schema import SchemaProblem, check_schema, matches
from server.app import create_server
from server.policy import AutoTrainPolicy
from store import Store
from tests.test_server_tools import call, error, snapshot
from train_worker.locks import LockFileError, ProcessLock, worker_lock
from train_worker.protocol import ProtocolError, TrainRequest, check_kernel_name, check_run_id, validate
from train_worker.settings import HomeError, Layout, Settings

# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "default\n"])
def test_kernel_names_with_a_trailing_newline_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid kernel name"):
        check_kernel_name(name)


def test_run_ids_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid run id"):
        check_run_id("r-20261123T201500-a1b2c3\n")


# ---------------------------------------------------------------------------------------------
# Homes and files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.anyio
async def test_home_and_store_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        layout = Layout(tmp_path / "home")
        layout.ensure()
        store = await Store.open(layout.db)
        await store.kernels.create("k", "embedded", "", {})
        await store.close()
    finally:
        os.umask(old)
    assert _mode(layout.home) == 0o700
    for folder in (layout.requests, layout.runs, layout.kernels, layout.locks, layout.logs, layout.quarantine):
        assert _mode(folder) == 0o700, folder
    for name in ("engrain.db", "engrain.db-wal", "engrain.db-shm"):
        path = layout.home / name
        if path.exists():
            assert _mode(path) == 0o600, name


def test_an_open_home_is_tightened(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    Layout(home).ensure()
    assert _mode(home) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user owns")
def test_a_home_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "theirs"
    home.mkdir()
    os.chown(home, 65534, 65534)
    with pytest.raises(HomeError, match="belongs to uid 65534"):
        Layout(home).ensure()


def test_lock_files_are_never_followed_or_truncated(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "worker.lock").symlink_to(victim)
    lock = worker_lock(locks)
    with pytest.raises(LockFileError, match="symbolic link"):
        lock.acquire()
    with pytest.raises(LockFileError, match="symbolic link"):
        lock.held_elsewhere()
    assert victim.read_text() == "keep me\n"


def test_checking_a_lock_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "host.lock"
    path.write_text("4242\n")
    before = path.stat().st_mtime_ns
    assert ProcessLock(path).held_elsewhere() is False
    assert path.read_text() == "4242\n" and path.stat().st_mtime_ns == before
    held = ProcessLock(path)
    assert held.acquire()
    try:
        assert _mode(path) in (0o600, 0o644)  # pre-existing file keeps its mode; new ones are 0600
        assert ProcessLock(path).held_elsewhere() is True
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        held.release()
    fresh = ProcessLock(tmp_path / "new.lock")
    assert not fresh.held_elsewhere()
    assert _mode(tmp_path / "new.lock") == 0o600


# ---------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (TrainSettings, "learning_rate", float("inf")),
        (TrainSettings, "learning_rate", float("nan")),
        (TrainSettings, "seed", 2**64),
        (TrainSettings, "seed", -1),
        (TrainSettings, "ewc_lambda", float("inf")),
        (TrainSettings, "warmup_steps", 10**12),
        (GateThresholds, "max_ppl_ratio", float("inf")),
        (GateThresholds, "min_acquisition_em", float("nan")),
        (AutoTrainPolicy, "breaker_period_s", 1e20),
        (AutoTrainPolicy, "cooldown_s", float("inf")),
        (AutoTrainPolicy, "min_untrained", 2**70),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_field(model: Any, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        model.model_validate({field: value})


def test_batch_times_length_has_a_memory_budget() -> None:
    TrainSettings(batch_size=32, max_seq_len=4096)
    with pytest.raises(ValueError, match=f"over the budget of {MAX_BATCH_TOKENS}"):
        TrainSettings(batch_size=64, max_seq_len=4096)


def test_a_request_with_null_numbers_is_refused_with_the_field(tmp_path: Path) -> None:
    """What inf used to become on disk: the reader names the field instead of looping."""
    data = {
        "run_id": "r-20261123T201500-a1b2c3",
        "kernel": "k",
        "base_model": "embedded",
        "base_version": None,
        "settings": {"learning_rate": None},
        "gates": {},
        "requested_at": "2026-11-23T20:15:00+00:00",
    }
    with pytest.raises(ProtocolError, match="learning_rate"):
        validate(data, TrainRequest, "pending.json")


@pytest.mark.anyio
async def test_configure_kernel_refuses_inf_and_huge_numbers_and_stores_nothing(settings: Settings) -> None:
    async with Client(create_server(settings)) as client:
        before = snapshot(settings)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"settings": {"learning_rate": float("inf")}}, "learning_rate"),
            ({"gates": {"max_ppl_ratio": float("inf")}}, "max_ppl_ratio"),
            ({"auto": {"breaker_period_s": 1e20}}, "breaker_period_s"),
            ({"settings": {"seed": 2**64}}, "seed"),
            ({"settings": {"batch_size": 512, "max_seq_len": 32768}}, "max_seq_len"),
        ]
        for args, field in cases:
            text = await error(client, "configure_kernel", kernel="default", **args)
            assert field in text, text
        assert snapshot(settings) == before
        text = await error(client, "feedback", query_id=2**70, rating=3)
        assert "query_id" in text
        status = await call(client, "training_status", kernel="default")
        assert status["auto"]["enabled"] is False


# ---------------------------------------------------------------------------------------------
# Answer schemas


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"$ref": "#"}, "recursive"),
        ({"type": "object", "properties": {"child": {"$ref": "#"}}}, "recursive"),
        ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "recursive"),
        ({"$ref": "https://example.com/schema.json"}, "not a local JSON pointer"),
        ({"$ref": "other.json#/x"}, "not a local JSON pointer"),
        ({"$ref": "#/$defs/missing"}, "does not exist"),
        ({"$id": "https://example.com/s", "type": "object"}, "$id"),
        ({"$dynamicRef": "#meta"}, "$dynamicRef"),
        ({"type": "string", "pattern": "(unclosed"}, "not a valid regular expression"),
        ({"type": "nonsense"}, "not a valid JSON Schema"),
        ({"type": "object", "patternProperties": {"^a": {}}, "unevaluatedProperties": False}, "additionalProperties"),
    ],
)
def test_unusable_answer_schemas_are_refused_with_the_reason(schema: dict[str, Any], reason: str) -> None:
    with pytest.raises(SchemaProblem, match=reason.replace("$", r"\$")):
        check_schema(schema)


def test_a_schema_with_local_definitions_is_accepted_and_matches() -> None:
    schema = {
        "$defs": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"}},
        "type": "object",
        "properties": {"first": {"$ref": "#/$defs/name"}, "last": {"$ref": "#/$defs/name"}},
        "patternProperties": {"^x-": {"type": "integer"}},
        "additionalProperties": False,
        "required": ["first"],
    }
    check_schema(schema)
    assert matches('{"first": "Ada", "last": "Lovelace", "x-age": 36}', schema)
    assert not matches('{"first": "ada"}', schema)
    assert not matches('{"first": "Ada", "other": 1}', schema)
    assert not matches("not json", schema)


def test_a_pathological_pattern_fails_the_answer_quickly_instead_of_hanging() -> None:
    schema = {"type": "string", "pattern": "^(a|aa)+$"}
    check_schema(schema)
    started = time.perf_counter()
    assert not matches('"' + "a" * 60 + '!"', schema)
    assert time.perf_counter() - started < 5.0  # the `re` module takes minutes on this input


@pytest.mark.anyio
async def test_configure_kernel_refuses_a_recursive_or_remote_schema(settings: Settings) -> None:
    async with Client(create_server(settings)) as client:
        before = snapshot(settings)
        text = await error(client, "configure_kernel", kernel="default", output_schema={"$ref": "#"})
        assert "recursive" in text
        text = await error(client, "configure_kernel", kernel="default", output_schema={"$ref": "http://x/y.json"})
        assert "local JSON pointer" in text
        assert snapshot(settings) == before
