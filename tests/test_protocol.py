"""The file contract between server and worker: schemas, atomic writes, validated reads, quarantine."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from learning.config import GateThresholds, TrainSettings
from train_worker.protocol import (
    SCHEMA_DIR,
    BatchItem,
    BatchManifest,
    ProgressEvent,
    ProtocolError,
    RunResult,
    TrainRequest,
    append_event,
    json_schemas,
    jsonl_bytes,
    quarantine,
    read_batch,
    read_events,
    read_model,
    write_atomic,
    write_model,
)
from train_worker.worker import EventLog

RUN = "r-20261123T200000-abcdef"
NOW = datetime(2026, 11, 23, 20, 0, tzinfo=UTC)


def _request() -> TrainRequest:
    return TrainRequest(
        run_id=RUN,
        kernel="default",
        base_model="embedded",
        base_version=None,
        settings=TrainSettings(),
        gates=GateThresholds(),
        requested_at=NOW,
    )


def test_committed_schemas_match_the_models() -> None:
    """Regenerate with `python -m train_worker.protocol` when a model changes on purpose."""
    for name, schema in json_schemas().items():
        committed = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        assert committed == schema, f"{name}.schema.json drifted from its model"


def test_every_model_instance_validates_against_its_committed_schema(tmp_path: Path) -> None:
    samples = {
        "train_request": _request(),
        "batch_item": BatchItem(id="1", experience_id=1, role="new", prompt="p", response="r"),
        "progress_event": ProgressEvent(run_id=RUN, seq=0, ts=NOW, phase="training", step=1, total_steps=2),
        "run_result": RunResult(run_id=RUN, kernel="default", status="failed", finished_at=NOW, error="x"),
    }
    for name, model in samples.items():
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        jsonschema.validate(json.loads(model.model_dump_json()), schema)


def test_write_atomic_leaves_no_temp_files_and_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "pending.json"
    write_model(target, _request())
    write_model(target, _request())
    assert [p.name for p in tmp_path.iterdir()] == ["pending.json"]
    assert read_model(target, TrainRequest) == _request()


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pending.json"
    write_atomic(target, b"old")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["pending.json"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"schema_version": 7}', "schema_version 7; this engrain reads version 1"),
        (b'{"schema_version": 1, "kind": "train_request"}', "does not match TrainRequest: run_id: Field required"),
        (b'{"schema_version": 1, "run_id": "../../etc"}', "invalid run id"),
    ],
)
def test_malformed_files_raise_protocol_errors_with_the_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "pending.json"
    path.write_bytes(content)
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        read_model(path, TrainRequest)


def test_quarantine_moves_the_file_and_keeps_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "requests" / "pending.json"
    path.parent.mkdir()
    path.write_bytes(b"garbage")
    moved = quarantine(path, tmp_path / "quarantine", "not valid JSON")
    assert not path.exists()
    assert moved.read_bytes() == b"garbage"
    assert moved.with_name(moved.name + ".reason.txt").read_text() == "not valid JSON\n"


def test_events_are_read_incrementally_and_a_partial_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    append_event(path, ProgressEvent(run_id=RUN, seq=0, ts=NOW, phase="claimed"))
    with path.open("ab") as fh:
        fh.write(b"not json\n")
        fh.write(b'{"schema_version": 1, "kind": "progress", "run_id": "' + RUN.encode())  # torn: no newline yet
    events, offset, problems = read_events(path, 0)
    assert [e.seq for e in events] == [0]
    assert len(problems) == 1 and "Expecting value" in problems[0]
    with path.open("ab") as fh:
        fh.write(b'", "seq": 1, "ts": "2026-11-23T20:00:01+00:00", "phase": "training"}\n')
    more, offset2, _ = read_events(path, offset)
    assert [e.seq for e in more] == [1] and offset2 == path.stat().st_size


def test_batch_is_checked_against_its_manifest(tmp_path: Path) -> None:
    items = [
        BatchItem(id="1", experience_id=1, role="new", prompt="p", response="r"),
        BatchItem(id="2", experience_id=2, role="replay", prompt="p2", response="r2"),
    ]
    raw = jsonl_bytes(items)
    (tmp_path / "batch.jsonl").write_bytes(raw)
    import hashlib

    manifest = BatchManifest(
        run_id=RUN, kernel="default", created_at=NOW, n_new=1, n_replay=1, sha256=hashlib.sha256(raw).hexdigest()
    )
    assert read_batch(tmp_path, manifest) == items
    (tmp_path / "batch.jsonl").write_bytes(raw + b"\n")
    with pytest.raises(ProtocolError, match="sha256"):
        read_batch(tmp_path, manifest)
    wrong_counts = manifest.model_copy(update={"n_new": 2, "n_replay": 0})
    (tmp_path / "batch.jsonl").write_bytes(raw)
    with pytest.raises(ProtocolError, match="the manifest says 2 and 0"):
        read_batch(tmp_path, wrong_counts)


def test_progress_is_throttled_but_keeps_the_step_training_ended_on(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "r-20261123T201500-a1b2c3")
    log.training(0, 100)  # the set-up, with no loss yet: it does not hold back step 1's
    for step in range(1, 8):  # an early stop at step 7 of 100, all within the throttle window
        log.training(step, 100, loss=1.0 / step)
    log.training(7, 100, final=True, loss=1.0 / 7)
    log.training(7, 100, final=True, loss=1.0 / 7)  # the same step reported twice is drawn once
    steps = [e.step for e in read_events(path, 0)[0]]
    assert steps == [0, 1, 7]
