"""The one definition of every file exchanged between the MCP server and the worker.

Files (under `$ENGRAIN_HOME`, see `train_worker.settings.Layout`):
- `requests/pending.json`            `TrainRequest`, written by the server, claimed by the worker.
- `runs/<run_id>/batch.jsonl`        one `BatchItem` per line, written by the server.
- `runs/<run_id>/manifest.json`      `BatchManifest`, written by the server after the batch.
- `runs/<run_id>/events.jsonl`       one `ProgressEvent` per line, appended by the worker.
- `runs/<run_id>/result.json`        `RunResult`, written by the worker; a copy goes to
                                     `requests/results/<run_id>.json` for the server to pick up.
- `runs/<run_id>/state.json`         `RunState`, the worker's attempt count and what it did to the host.
- `runs/<run_id>/cancel`             a marker from the server: stop this run at the next check.
- `runs/<run_id>/deploy.json`        `RunResult`, written by the worker under the kernel lock: the deploy is
                                     committed (a cancel is refused from then on) and this is what it publishes.
- `requests/active/<run_id>`         an empty marker: the run is claimed and has no result yet.
- `kernels/<name>/versions/vN/meta.json`  `VersionMeta`, written by the worker before deploying.
- `locks/training.lease`             `TrainingLease`, held by a worker that needs the host's memory; the
                                     host unloads while a live lease exists and reloads itself after.
- `host.json`                        `HostEndpoint`, written by the model host when it listens; clients
                                     find the host here and check its identity.

Every JSON file is written atomically (temp file, fsync, rename) and validated on read. A file that
fails validation is moved to `quarantine/` by `quarantine()`, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from learning.config import MAX_INT as MAX_INT
from learning.config import GateThresholds as GateThresholds  # re-exported: the server names it from here
from learning.config import KeepFact as KeepFact
from learning.config import TrainSettings as TrainSettings
from learning.examples import Example
from learning.fsutil import fsync_dir as fsync_dir  # re-exported: deploy and the server write through these
from learning.fsutil import write_atomic as write_atomic
from learning.gates import Gate as Gate  # re-exported: a gate's verdict travels in result.json
from learning.output_schema import SchemaProblem as SchemaProblem
from learning.output_schema import check_schema as check_schema  # re-exported: the server checks at configure
from learning.reports import LostItem as LostItem
from learning.scope import Scope

SCHEMA_VERSION: Literal[1] = 1
CANCEL_MARKER = "cancel"  # runs/<run_id>/cancel: the server asks the worker to stop the run

KERNEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
RUN_ID_PATTERN = r"^r-[0-9]{8}T[0-9]{6}-[0-9a-f]{6}$"
_KERNEL_NAME = re.compile(KERNEL_NAME_PATTERN)
_RUN_ID = re.compile(RUN_ID_PATTERN)


def check_kernel_name(name: str) -> str:
    if not _KERNEL_NAME.fullmatch(name):
        raise ValueError(
            f"invalid kernel name {name!r}: use 1-63 characters from a-z, 0-9, '-' and '_', "
            "starting with a letter or digit (for example 'support-bot')"
        )
    return name


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"invalid run id {run_id!r}: run ids look like 'r-20261123T201500-a1b2c3', as train_model returns them"
        )
    return run_id


# The validators double as path-safety checks: both names become directory names.
KernelName = Annotated[
    str, AfterValidator(check_kernel_name), Field(json_schema_extra={"pattern": KERNEL_NAME_PATTERN})
]
RunId = Annotated[str, AfterValidator(check_run_id), Field(json_schema_extra={"pattern": RUN_ID_PATTERN})]


def _checked_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    if schema is not None:
        check_schema(schema)  # local refs only, no recursion, bounded patterns: evaluation always ends
    return schema


def new_run_id(now: datetime) -> str:
    return f"r-{now.astimezone(UTC):%Y%m%dT%H%M%S}-{os.urandom(3).hex()}"


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class TrainRequest(_File):
    """`requests/pending.json`: train one kernel on the batch in its run folder."""

    kind: Literal["train_request"] = "train_request"
    run_id: RunId
    kernel: KernelName
    base_model: str = Field(description="'embedded' or an absolute path to a local Hugging Face model directory.")
    base_version: int | None = Field(description="Deployed adapter version to continue from; None: the bare base.")
    settings: TrainSettings
    gates: GateThresholds
    output_schema: Annotated[dict[str, Any] | None, AfterValidator(_checked_schema)] = Field(
        default=None, description="JSON Schema the kernel's answers must satisfy, if it declares one."
    )
    must_keep: list[KeepFact] = Field(
        default_factory=list, description="The kernel's own must-keep facts, checked with the built-in canaries."
    )
    requested_at: AwareDatetime


class BatchItem(Example):
    """One line of `batch.jsonl`: an experience to learn (`new`), or one the kernel already holds (`replay`).

    Every `replay` item is a regression test the candidate must keep; the worker rehearses at most
    `replay_ratio` times as many of them as there are new items (learning/replay.py picks which).
    """

    role: Literal["new", "replay"]
    experience_id: int


class BatchManifest(_File):
    """`runs/<run_id>/manifest.json`: what `batch.jsonl` holds, so a torn or edited batch is caught."""

    kind: Literal["batch_manifest"] = "batch_manifest"
    run_id: RunId
    kernel: KernelName
    created_at: AwareDatetime
    n_new: int = Field(ge=0)
    n_replay: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Digest of batch.jsonl's bytes.")


Phase = Literal[
    "claimed",
    "resumed",
    "held",
    "stopping_host",
    "loading",
    "baseline",
    "training",
    "checkpoint",
    "interrupted",
    "evaluating",
    "deploying",
    "restarting_host",
    "finished",
]

# How each phase moves the run's status in the store. A result, not an event, ends a run.
PHASE_STATUS: dict[Phase, Literal["running", "evaluating"]] = {
    "claimed": "running",
    "resumed": "running",
    "held": "running",
    "stopping_host": "running",
    "loading": "running",
    "baseline": "running",
    "training": "running",
    "checkpoint": "running",
    "interrupted": "running",
    "evaluating": "evaluating",
    "deploying": "evaluating",
}


class ProgressEvent(_File):
    """One line of `runs/<run_id>/events.jsonl`."""

    kind: Literal["progress"] = "progress"
    run_id: RunId
    seq: int = Field(ge=0, description="Strictly increasing within a run, across worker restarts.")
    ts: AwareDatetime
    phase: Phase
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = Field(default=None, ge=0)
    loss: float | None = None
    tokens_per_s: float | None = Field(default=None, ge=0)
    eta_s: float | None = Field(default=None, ge=0)
    message: str | None = None

    @property
    def progress(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)


class ItemLoss(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experience_id: int
    loss: float


ResultStatus = Literal["deployed", "rejected", "failed", "cancelled"]


class RunResult(_File):
    """`runs/<run_id>/result.json` (and its copy in `requests/results/`): how a run ended."""

    kind: Literal["run_result"] = "run_result"
    run_id: RunId
    kernel: KernelName
    status: ResultStatus
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime
    base_version: int | None = None
    version: int | None = Field(default=None, description="The version deployed by this run.")
    version_path: str | None = Field(default=None, description="Its folder, relative to $ENGRAIN_HOME.")
    metrics: dict[str, float | None] = Field(default_factory=dict)
    gates: list[Gate] = Field(default_factory=list)
    error: str | None = None
    losses: list[ItemLoss] = Field(default_factory=list, description="Last training loss of each experience.")
    replayed: list[int] = Field(default_factory=list, description="Earlier experiences this run rehearsed.")
    lost: list[LostItem] = Field(
        default_factory=list, description="Earlier and must-keep facts the candidate lost, each with what overwrote it."
    )
    steps: int = Field(default=0, ge=0)
    tokens_per_s: float | None = None
    stop_reason: str | None = None
    host_restored: bool | None = Field(default=None, description="Whether the model host was brought back.")
    pruned_versions: list[int] = Field(default_factory=list, description="Old versions the retention policy removed.")

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if g.status == "failed"]


HostAction = Literal["leased", "stopped", "unloaded", "not_running", "left_alone"]


class RunState(_File):
    """`runs/<run_id>/state.json`: the worker's own bookkeeping, read by the next worker and the watcher."""

    kind: Literal["run_state"] = "run_state"
    run_id: RunId
    attempts: int = Field(default=0, ge=0, description="Workers that have started on this run.")
    interruptions: int = Field(default=0, ge=0, description="Of those, how many stopped gracefully on SIGTERM.")
    worker_pid: int | None = None
    host_action: HostAction | None = Field(default=None, description="What the last worker did to the host.")
    host_restored: bool = True
    updated_at: AwareDatetime


class VersionMeta(_File):
    """`kernels/<name>/versions/vN/meta.json`: where an adapter version came from and how it scored."""

    kind: Literal["version_meta"] = "version_meta"
    kernel: KernelName
    version: int = Field(ge=1)
    run_id: RunId
    parent_version: int | None = Field(description="The version this one continued from; None: the bare base.")
    base_model: str
    created_at: AwareDatetime
    metrics: dict[str, float | None] = Field(default_factory=dict)
    gates: list[Gate] = Field(default_factory=list)


class TrainingLease(_File):
    """`locks/training.lease`: a worker needs the model host's memory for a training run.

    The host owns its own unloading: while a live lease exists it unloads, and once the lease is
    released (the file is removed), goes stale (no heartbeat for `ttl_s`) or its holder dies, it
    reloads itself. No crash, timeout or missing watcher can therefore leave the host down.
    """

    kind: Literal["training_lease"] = "training_lease"
    holder_pid: int = Field(ge=1, description="The worker process holding the lease.")
    run_id: RunId | None = Field(default=None, description="The run the memory is needed for.")
    acquired_at: AwareDatetime
    heartbeat_at: AwareDatetime = Field(description="Refreshed by the holder every few seconds.")
    ttl_s: float = Field(default=30.0, gt=0, le=3600, description="Stale when the heartbeat is older than this.")

    def live(self, now: datetime | None = None) -> bool:
        """Held by a running process whose heartbeat is fresh."""
        now = now or datetime.now(UTC)
        if (now - self.heartbeat_at).total_seconds() > self.ttl_s:
            return False
        return pid_alive(self.holder_pid)


class HostEndpoint(_File):
    """`host.json`: where this home's model host listens, written atomically by the host once it listens.

    `home_id` is also served by the host's `/health`; a client that finds another id there is talking
    to another home's host (a port clash or a stale file) and must refuse it.
    """

    kind: Literal["host_endpoint"] = "host_endpoint"
    home_id: str = Field(min_length=8, max_length=128)
    pid: int = Field(ge=1)
    url: str = Field(description="Base URL on loopback, e.g. 'http://127.0.0.1:8765'.")
    base_model: str
    started_at: AwareDatetime


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


FILE_MODELS: dict[str, type[BaseModel]] = {
    "train_request": TrainRequest,
    "batch_item": BatchItem,
    "batch_manifest": BatchManifest,
    "progress_event": ProgressEvent,
    "run_result": RunResult,
    "version_meta": VersionMeta,
    "run_state": RunState,
    "training_lease": TrainingLease,
    "host_endpoint": HostEndpoint,
    "version_scope": Scope,
}

M = TypeVar("M", bound=BaseModel)


class ProtocolError(Exception):
    """A file from another process is missing, unreadable, or not what its model says."""


# ---------------------------------------------------------------------------------------------
# Atomic writes and validated reads


def write_model(path: Path, model: BaseModel) -> None:
    write_atomic(path, model.model_dump_json(indent=2).encode() + b"\n")


def jsonl_bytes(models: Iterable[BaseModel]) -> bytes:
    return b"".join(m.model_dump_json().encode() + b"\n" for m in models)


def append_event(path: Path, event: ProgressEvent) -> None:
    """Append one line with a single O_APPEND write, so a reader never sees half an event."""
    line = event.model_dump_json().encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_model(path: Path, model: type[M]) -> M:
    """Read and validate one JSON file; any problem becomes a `ProtocolError` with the reason."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProtocolError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{path.name} is not valid JSON: {exc}") from exc
    return validate(data, model, path.name)


def validate(data: Any, model: type[M], what: str) -> M:
    if isinstance(data, dict):
        version = data.get("schema_version")
        if version is not None and version != SCHEMA_VERSION:
            raise ProtocolError(
                f"{what} has schema_version {version!r}; this engrain reads version {SCHEMA_VERSION}. "
                "Upgrade the older of server and worker so both speak one version."
            )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"{what} does not match {model.__name__}: {_summarise(exc)}") from exc


def read_batch(run_dir: Path, manifest: BatchManifest) -> list[BatchItem]:
    """Read `batch.jsonl`, checking it against the manifest's digest and counts."""
    path = run_dir / "batch.jsonl"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProtocolError(f"cannot read batch.jsonl: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != manifest.sha256:
        raise ProtocolError("batch.jsonl does not match manifest.json's sha256: it was changed or torn")
    items = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"batch.jsonl line {number} is not valid JSON: {exc}") from exc
        items.append(validate(data, BatchItem, f"batch.jsonl line {number}"))
    n_new = sum(1 for i in items if i.role == "new")
    if (n_new, len(items) - n_new) != (manifest.n_new, manifest.n_replay):
        raise ProtocolError(
            f"batch.jsonl holds {n_new} new and {len(items) - n_new} replay items; "
            f"the manifest says {manifest.n_new} and {manifest.n_replay}"
        )
    return items


def read_events(path: Path, offset: int) -> tuple[list[ProgressEvent], int, list[str]]:
    """Events appended since byte `offset`: (events, new offset, problems). A partial last line waits."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset, []
    end = chunk.rfind(b"\n") + 1
    events: list[ProgressEvent] = []
    problems: list[str] = []
    for line in chunk[:end].splitlines():
        if not line.strip():
            continue
        try:
            events.append(validate(json.loads(line), ProgressEvent, "events.jsonl line"))
        except (json.JSONDecodeError, ProtocolError) as exc:
            problems.append(str(exc))
    return events, offset + end, problems


def quarantine(path: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move a refused file aside with its reason next to it; return where it went."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    target = quarantine_dir / f"{stamp}-{path.name}"
    os.replace(path, target)
    write_atomic(target.with_name(target.name + ".reason.txt"), reason.encode() + b"\n")
    return target


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------
# JSON Schemas, committed under train_worker/schemas/ and checked for drift by the tests

SCHEMA_DIR = Path(__file__).with_name("schemas")


def json_schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in FILE_MODELS.items()}


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.schema.json"
        write_atomic(path, (json.dumps(schema, indent=2, sort_keys=True) + "\n").encode())
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_schemas():
        print(written_path)
