"""The auto-training policy, convergence and drift as pure functions, with the clock under the test's control."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from server.convergence import judge
from server.drift import kl_divergence, word_counts
from server.policy import AutoTrainPolicy, PolicyInputs, RunOutcome, decide, in_window

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = AutoTrainPolicy(enabled=True, min_untrained=50, cooldown_s=3600, breaker_failures=3)


def inputs(**kw: Any) -> PolicyInputs:
    defaults: dict[str, Any] = {"now": NOW, "untrained": 60, "estop": False, "active_run": None}
    return PolicyInputs(**(defaults | kw))


def test_due_when_everything_allows_it() -> None:
    d = decide(POLICY, inputs())
    assert d.due and d.reasons == ["60 untrained experiences reach the threshold of 50"]


def test_off_by_default() -> None:
    d = decide(AutoTrainPolicy(), inputs())
    assert not d.due and "auto-training is off" in d.reasons[0]


@pytest.mark.parametrize(("untrained", "due"), [(49, False), (50, True), (51, True)])
def test_threshold(untrained: int, due: bool) -> None:
    d = decide(POLICY, inputs(untrained=untrained))
    assert d.due is due
    if not due:
        assert "49 untrained experiences; the threshold is 50" in d.reasons


def test_cooldown_counts_from_the_last_run_end() -> None:
    ended = [RunOutcome("deployed", NOW - timedelta(minutes=50))]
    d = decide(POLICY, inputs(recent_runs=ended))
    assert not d.due and d.cooldown_remaining_s == pytest.approx(600)
    assert "cooling down: 600 s left of 3600 s" in " ".join(d.reasons)
    later = decide(POLICY, inputs(now=NOW + timedelta(minutes=10), recent_runs=ended))
    assert later.due and later.cooldown_remaining_s == 0


@pytest.mark.parametrize(
    ("window", "moment", "inside"),
    [
        ("02:00-06:00", time(1, 59), False),
        ("02:00-06:00", time(2, 0), True),
        ("02:00-06:00", time(5, 59), True),
        ("02:00-06:00", time(6, 0), False),
        # Crossing midnight.
        ("22:00-03:00", time(21, 59), False),
        ("22:00-03:00", time(22, 0), True),
        ("22:00-03:00", time(23, 59), True),
        ("22:00-03:00", time(0, 0), True),
        ("22:00-03:00", time(2, 59), True),
        ("22:00-03:00", time(3, 0), False),
        ("22:00-03:00", time(12, 0), False),
        (None, time(12, 0), True),
    ],
)
def test_window(window: str | None, moment: time, inside: bool) -> None:
    assert in_window(window, moment) is inside


def test_window_uses_local_time() -> None:
    policy = POLICY.model_copy(update={"window": "22:00-03:00"})
    tokyo = timezone(timedelta(hours=9))
    # 12:00 UTC is 21:00 in UTC+9: outside; 14:00 UTC is 23:00 there: inside.
    d = decide(policy, inputs(local_tz=tokyo))
    assert (
        not d.due and not d.in_window and "outside the training window 22:00-03:00 (local time now 21:00)" in d.reasons
    )
    assert decide(policy, inputs(now=NOW + timedelta(hours=2), local_tz=tokyo)).due


@pytest.mark.parametrize("bad", ["2:00-6:00", "02:00-24:00", "02:00", "25:00-01:00"])
def test_a_malformed_window_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="must look like '02:00-06:00'"):
        AutoTrainPolicy(window=bad)


def failed(minutes_ago: float) -> RunOutcome:
    return RunOutcome("failed", NOW - timedelta(minutes=minutes_ago))


def test_breaker_opens_after_k_consecutive_recent_failures() -> None:
    no_cooldown = POLICY.model_copy(update={"cooldown_s": 0})
    two = decide(no_cooldown, inputs(recent_runs=[failed(5), failed(10)]))
    assert two.due and two.consecutive_failures == 2 and not two.breaker_open
    three = decide(no_cooldown, inputs(recent_runs=[failed(5), failed(10), failed(15)]))
    assert not three.due and three.breaker_open
    assert "circuit breaker open: 3 failed or rejected runs in a row" in " ".join(three.reasons)


def test_rejected_automatic_runs_count_toward_the_breaker_and_manual_ones_are_skipped() -> None:
    no_cooldown = POLICY.model_copy(update={"cooldown_s": 0})

    def rejected(minutes: int, trigger: str) -> RunOutcome:
        return RunOutcome("rejected", NOW - timedelta(minutes=minutes), trigger)

    auto = [rejected(5, "auto"), rejected(10, "auto"), rejected(15, "auto")]
    decision = decide(no_cooldown, inputs(recent_runs=auto))
    assert decision.breaker_open and not decision.due  # the same failing batch is not retried forever
    manual_between = [failed(5), rejected(7, "manual"), failed(10)]
    assert decide(no_cooldown, inputs(recent_runs=manual_between)).consecutive_failures == 2


def test_breaker_ignores_old_failures_cancelled_runs_and_closes_after_a_success() -> None:
    no_cooldown = POLICY.model_copy(update={"cooldown_s": 0, "breaker_period_s": 3600})
    old = [failed(5), failed(10), failed(24 * 60)]  # the third is outside the period
    assert not decide(no_cooldown, inputs(recent_runs=old)).breaker_open
    cancelled_between = [failed(5), RunOutcome("cancelled", NOW), failed(10), failed(15)]
    assert decide(no_cooldown, inputs(recent_runs=cancelled_between)).breaker_open
    success_between = [failed(5), failed(10), RunOutcome("deployed", NOW - timedelta(minutes=12)), failed(15)]
    assert decide(no_cooldown, inputs(recent_runs=success_between)).consecutive_failures == 2


def test_a_manual_reset_closes_the_breaker() -> None:
    no_cooldown = POLICY.model_copy(update={"cooldown_s": 0})
    runs = [failed(5), failed(10), failed(15)]
    reset = decide(no_cooldown, inputs(recent_runs=runs, breaker_reset_at=NOW - timedelta(minutes=1)))
    assert reset.due and reset.consecutive_failures == 0
    # A failure after the reset counts again.
    partly = decide(no_cooldown, inputs(recent_runs=runs, breaker_reset_at=NOW - timedelta(minutes=7)))
    assert partly.consecutive_failures == 1


def test_estop_blocks() -> None:
    d = decide(POLICY, inputs(estop=True))
    assert not d.due and "the e-stop file exists" in " ".join(d.reasons)


def test_an_active_run_blocks_another() -> None:
    d = decide(POLICY, inputs(active_run="r-20261123T120000-abcdef"))
    assert not d.due and "already queued or running" in " ".join(d.reasons)


def test_a_converged_kernel_waits_for_experiences_that_differ() -> None:
    same = decide(POLICY, inputs(converged=True, drift=0.1))
    assert not same.due and "converged: new experiences are like what it knows (drift 0.10 <= 0.50)" in same.reasons
    new = decide(POLICY, inputs(converged=True, drift=0.9))
    assert new.due and "new experiences differ from what it knows (drift 0.90 > 0.50)" in " ".join(new.reasons)


def test_every_blocking_reason_is_listed_at_once() -> None:
    d = decide(POLICY, inputs(untrained=1, estop=True, recent_runs=[failed(1), failed(2), failed(3)]))
    text = " ".join(d.reasons)
    assert not d.due
    for part in ("e-stop", "threshold is 50", "cooling down", "circuit breaker open"):
        assert part in text


def run(status: str, acquisition: float, margin: float = 0.2) -> dict[str, Any]:
    gate = {"name": "acquisition", "status": "passed" if status == "deployed" else "failed", "margin": margin}
    return {"status": status, "metrics": {"acquisition_em": acquisition}, "gates": [gate]}


def test_convergence_needs_m_runs_passing_with_margin_and_stable_acquisition() -> None:
    assert judge([run("deployed", 1.0)] * 2, 3, 0.05, 0.02).reason == "2 of the 3 evaluated runs needed"
    stable = judge([run("deployed", 0.95), run("deployed", 0.96), run("deployed", 0.95)], 3, 0.05, 0.02)
    assert stable.converged, stable.reason
    moving = judge([run("deployed", 1.0), run("deployed", 0.85), run("deployed", 0.95)], 3, 0.05, 0.02)
    assert not moving.converged and "acquisition still moves" in moving.reason
    thin = judge([run("deployed", 1.0, margin=0.01)] * 3, 3, 0.05, 0.02)
    assert not thin.converged and "less than the margin" in thin.reason
    rejected = judge([run("rejected", 1.0), run("deployed", 1.0), run("deployed", 1.0)], 3, 0.05, 0.02)
    assert not rejected.converged and "rejected" in rejected.reason
    # Failed and cancelled runs say nothing about quality: they are skipped, not counted.
    skipped = [run("deployed", 1.0), {"status": "failed", "metrics": None, "gates": None}] + [run("deployed", 1.0)] * 2
    assert judge(skipped, 3, 0.05, 0.02).converged


def test_drift_is_zero_for_the_same_distribution_and_grows_with_new_words() -> None:
    known = word_counts(["The capital of Zorbia is Quellmoor.", "Vantrel was founded by Ilsa Marrow."] * 5)
    assert kl_divergence(known, known) == pytest.approx(0.0, abs=1e-12)
    similar = word_counts(["The capital of Zorbia is Quellmoor."])
    different = word_counts(["def parse(line): return json.loads(line)", "SELECT id FROM runs WHERE status"])
    assert 0 < kl_divergence(similar, known) < kl_divergence(different, known)
    assert kl_divergence(word_counts([]), known) == 0.0
