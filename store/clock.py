"""The one source of timestamps: UTC, stored as ISO-8601 text."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def to_iso(moment: datetime) -> str:
    """Render an aware datetime as UTC ISO-8601 text (`2026-11-23T20:15:00.123456+00:00`)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: engrain stores UTC only, pass an aware datetime")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def from_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone")
    return moment.astimezone(UTC)


class Clock:
    """Injectable clock: repositories and policies ask it for the time, so tests can steer it."""

    def __init__(self, source: Callable[[], datetime] = utc_now) -> None:
        self._source = source

    def now(self) -> datetime:
        return self._source()

    def iso(self) -> str:
        return to_iso(self._source())
