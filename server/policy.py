"""When a kernel trains by itself: the auto-training policy, as a pure function of the facts and the time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, tzinfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PERIOD_S = 366 * 86400.0  # a year: longer periods overflow date arithmetic and mean "never" anyway
_WINDOW = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])$")


class AutoTrainPolicy(BaseModel):
    """Per kernel, off by default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    min_untrained: int = Field(default=50, ge=1, le=10_000_000, description="Train once this many experiences wait.")
    cooldown_s: float = Field(default=3600, ge=0, le=MAX_PERIOD_S, description="Seconds since the last run ended.")
    window: str | None = Field(
        default=None, description="Daily local-time window 'HH:MM-HH:MM' (may cross midnight); None: any time."
    )
    breaker_failures: int = Field(
        default=3, ge=1, le=1000, description="Consecutive failed runs that open the breaker."
    )
    breaker_period_s: float = Field(
        default=86400, gt=0, le=MAX_PERIOD_S, description="Only failures this recent count."
    )
    converge_runs: int = Field(default=3, ge=2, le=100, description="Runs over which convergence is judged (M).")
    converge_margin: float = Field(default=0.05, ge=0, le=1, description="Every gate must pass by at least this.")
    converge_std: float = Field(default=0.02, ge=0, le=1, description="Acquisition must vary less than this.")
    drift_threshold: float = Field(
        default=0.5, ge=0, le=1000, description="KL (nats) of new experiences from the trained set that counts as new."
    )

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value is not None and not _WINDOW.fullmatch(value):
            raise ValueError(f"window {value!r} must look like '02:00-06:00' (24-hour local time)")
        return value


@dataclass(frozen=True)
class RunOutcome:
    status: str
    finished_at: datetime | None
    trigger: str = "manual"


@dataclass(frozen=True)
class PolicyInputs:
    """What the policy looks at; gathered from the store and the filesystem by the caller."""

    now: datetime
    untrained: int
    estop: bool
    active_run: str | None
    recent_runs: list[RunOutcome] = field(default_factory=list)  # newest first
    breaker_reset_at: datetime | None = None
    converged: bool = False
    drift: float | None = None
    local_tz: tzinfo | None = None  # None: the machine's local time zone


class Decision(BaseModel):
    """Whether an automatic run is due, and why (or why not), in words an agent can relay."""

    due: bool
    reasons: list[str]
    breaker_open: bool = False
    consecutive_failures: int = 0
    cooldown_remaining_s: float = 0.0
    in_window: bool = True


def in_window(window: str | None, moment: time) -> bool:
    """True when `moment` lies in 'HH:MM-HH:MM'; a window whose end is before its start crosses midnight."""
    if window is None:
        return True
    m = _WINDOW.fullmatch(window)
    assert m is not None, window
    start = time(int(m.group(1)), int(m.group(2)))
    end = time(int(m.group(3)), int(m.group(4)))
    if start == end:
        return True
    if start < end:
        return start <= moment < end
    return moment >= start or moment < end


def consecutive_failures(policy: AutoTrainPolicy, inputs: PolicyInputs) -> int:
    """Failed runs in a row, newest first, that are recent and after the last manual reset.

    A rejected automatic run counts as a failure: its batch would be retried, and rejected, forever.
    A deployed run ends the streak; a cancelled run, or a manual one that was rejected, is skipped.
    """
    horizon = inputs.now - timedelta(seconds=policy.breaker_period_s)
    count = 0
    for run in inputs.recent_runs:
        if run.status == "cancelled" or (run.status == "rejected" and run.trigger != "auto"):
            continue
        failed = run.status == "failed" or run.status == "rejected"
        if not failed or run.finished_at is None or run.finished_at < horizon:
            break
        if inputs.breaker_reset_at is not None and run.finished_at <= inputs.breaker_reset_at:
            break
        count += 1
    return count


def decide(policy: AutoTrainPolicy, inputs: PolicyInputs) -> Decision:
    """Every condition is checked (not just the first that fails), so the answer explains itself fully."""
    reasons: list[str] = []
    due = True
    if not policy.enabled:
        due = False
        reasons.append("auto-training is off for this kernel (configure_kernel(auto={'enabled': true}))")
    if inputs.estop:
        due = False
        reasons.append("the e-stop file exists: no run starts until an operator removes it")
    if inputs.active_run is not None:
        due = False
        reasons.append(f"run {inputs.active_run} is already queued or running")
    if inputs.untrained < policy.min_untrained:
        due = False
        reasons.append(f"{inputs.untrained} untrained experiences; the threshold is {policy.min_untrained}")
    else:
        reasons.append(f"{inputs.untrained} untrained experiences reach the threshold of {policy.min_untrained}")
    cooldown_left = 0.0
    last_end = next((r.finished_at for r in inputs.recent_runs if r.finished_at is not None), None)
    if last_end is not None and policy.cooldown_s > 0:
        cooldown_left = max(0.0, policy.cooldown_s - (inputs.now - last_end).total_seconds())
        if cooldown_left > 0:
            due = False
            reasons.append(f"cooling down: {cooldown_left:.0f} s left of {policy.cooldown_s:.0f} s since the last run")
    local = inputs.now.astimezone(inputs.local_tz)
    inside = in_window(policy.window, local.time())
    if not inside:
        due = False
        reasons.append(f"outside the training window {policy.window} (local time now {local:%H:%M})")
    failures = consecutive_failures(policy, inputs)
    breaker = failures >= policy.breaker_failures
    if breaker:
        due = False
        reasons.append(
            f"circuit breaker open: {failures} failed or rejected runs in a row; it closes after a successful run or "
            "reset_circuit_breaker(kernel)"
        )
    if inputs.converged:
        if inputs.drift is not None and inputs.drift > policy.drift_threshold:
            reasons.append(
                f"converged, but new experiences differ from what it knows (drift {inputs.drift:.2f} > "
                f"{policy.drift_threshold:.2f})"
            )
        else:
            due = False
            drift = "unknown" if inputs.drift is None else f"{inputs.drift:.2f}"
            reasons.append(
                f"converged: new experiences are like what it knows (drift {drift} <= {policy.drift_threshold:.2f})"
            )
    return Decision(
        due=due,
        reasons=reasons,
        breaker_open=breaker,
        consecutive_failures=failures,
        cooldown_remaining_s=cooldown_left,
        in_window=inside,
    )
