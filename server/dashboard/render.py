"""HTML from Jinja templates with autoescaping on, so every prompt, answer and name is inert text."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from server.dashboard import charts
from server.views import text

MISSING = "\u2013"  # an en dash where there is no value

_env = Environment(
    loader=PackageLoader("server.dashboard", "templates"),
    autoescape=select_autoescape(["html"], default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def signed(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:+.{digits}f}"


def duration(seconds: float | None) -> str:
    return text.duration(seconds, MISSING)


def when(value: datetime | None) -> str:
    if value is None:
        return MISSING
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ago(value: datetime | None) -> str:
    if value is None:
        return ""
    return duration((datetime.now(UTC) - value).total_seconds()) + " ago"


def version_label(value: int | None) -> str:
    return "base" if value is None else f"v{value}"


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.0f}%"


_env.filters.update(
    number=number,
    signed=signed,
    duration=duration,
    when=when,
    ago=ago,
    vlabel=version_label,
    percent=percent,
    count=text.count,
)
_env.globals.update(line_chart=charts.line_chart, quote=lambda s: quote(str(s), safe=""))


def render(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)
