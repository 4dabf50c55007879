"""The pure parts behind the dashboard and the terminal: SVG charts, report reading, answer diffs, sparklines."""

from __future__ import annotations

import json
import math
from pathlib import Path

from server.dashboard.charts import downsample, line_chart, nice_ticks
from server.terminal import sparkline
from server.views.reports import EvalReportView, answer_changes, item_groups, read_report, report_lists

GATES = {"passed": True, "gates": [], "failing": [], "skipped": []}


def _item(prompt: str, answer: str, em: bool, group: str = "retention") -> dict[str, object]:
    return {"id": prompt, "group": group, "prompt": prompt, "answer": answer, "em": em, "f1": float(em)}


def _report(*items: dict[str, object], **metrics: object) -> EvalReportView:
    return EvalReportView.model_validate({"metrics": {**metrics, "items": list(items)}, "gates": GATES})


def test_downsample_keeps_the_ends_and_the_limit() -> None:
    xs = [float(i) for i in range(1000)]
    sx, sy = downsample(xs, [x * 2 for x in xs], limit=50)
    assert len(sx) == 50 and (sx[0], sx[-1]) == (0.0, 999.0)
    assert all(y == 2 * x for x, y in zip(sx, sy, strict=True))
    assert downsample([1.0, 2.0], [3.0, 4.0], limit=50) == ([1.0, 2.0], [3.0, 4.0])


def test_ticks_cover_the_range_with_round_steps() -> None:
    ticks = nice_ticks(0.13, 0.87)
    assert ticks == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(5.0, 5.0) == [5.0]
    assert nice_ticks(math.nan, 1.0) == []


def test_line_chart_escapes_text_skips_non_finite_points_and_says_how_many_it_drew() -> None:
    svg = str(line_chart([0, 1, 2, 3], [1.0, math.nan, 0.5, 0.25], title="<b>loss</b>", x_label="step", y_label="x"))
    assert 'data-points="3"' in svg and "&lt;b&gt;loss&lt;/b&gt;" in svg and "<b>" not in svg
    assert svg.count("<circle") == 3 and svg.count("<polyline") == 1
    empty = str(line_chart([], [], title="speed", x_label="step", y_label="tok/s"))
    assert 'data-points="0"' in empty and "no points yet" in empty


def test_answer_changes_put_lost_answers_first_and_ignore_unchanged_ones() -> None:
    before = _report(_item("a?", "It is zub.", True), _item("b?", "It is kel.", False), _item("c?", "Same.", True))
    after = _report(
        _item("a?", "It is mor.", False, group="regression"),  # groups may differ between versions
        _item("b?", "It is sul.", True),
        _item("c?", "Same. ", True),
        _item("new?", "It is pim.", True, group="new"),
    )
    changes = answer_changes(after, before)
    assert [(c.prompt, c.verdict) for c in changes] == [("a?", "lost"), ("b?", "gained")]
    assert changes[0].group == "regression" and changes[0].before == "It is zub."


def test_unknown_groups_and_lists_are_kept_from_both_levels_of_the_report() -> None:
    raw = {
        "metrics": {"lost_probes": ["x -> y"], "acquisition_em": 1.0, "items": [_item("q", "a", True, "canary")]},
        "gates": GATES,
        "lost_facts": [{"fact": "f", "overwritten_by": "g"}],
        "outcome": None,
    }
    report = EvalReportView.model_validate(raw)
    assert [g.name for g in item_groups(report)] == ["canary"]
    assert [(n.name, len(n.entries)) for n in report_lists(report)] == [("lost_probes", 1), ("lost_facts", 1)]


def test_a_report_that_does_not_parse_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    bad = tmp_path / "eval_report.json"
    bad.write_text("{not json")
    assert "does not match" in (read_report(bad).problem or "")
    bad.write_text(json.dumps({"metrics": {"items": [{"id": 1}]}, "gates": GATES}))
    assert "does not match" in (read_report(bad).problem or "")
    assert "no evaluation report" in (read_report(tmp_path / "missing.json").problem or "")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"metrics": {}, "gates": GATES}))
    assert read_report(tmp_path / "missing.json", good).report is not None


def test_sparkline_scales_between_min_and_max() -> None:
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert sparkline([5.0, 5.0]) == "▁▁"
    assert sparkline([]) == ""
    assert len(sparkline([float(i) for i in range(100)], width=10)) == 10
