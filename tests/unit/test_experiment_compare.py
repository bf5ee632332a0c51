"""Comparison reports without running anything: medians and ranges over repetitions (nested
figures too), attainment against the oracle, the sentences saying that a static level wins or
that two ranges overlap, the rotated order of the policies, and the trade-off plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from experiment.compare import (
    attainment_vs_oracle,
    dominance,
    merge_summaries,
    overlaps,
    rotated_orders,
)
from experiment.config import ExperimentConfig, config_from_mapping
from experiment.report import RunReport, aggregate, compare_summary, markdown


def scenario() -> ExperimentConfig:
    return config_from_mapping(
        {
            "experiment": {"name": "t"},
            "plan": {"cuts": [3], "nodes": ["a", "b"]},
            "trace": {"names": ["orinoquia_day1"]},
            "emulation": {"b": {"factor": 2, "windows": [[4, 14, 5]]}},
            "controller": {"slo_ms": 150},
        }
    )


def summary(att: float, acc: float, p95: float, inside: float = 0.5, **extra: Any) -> dict:
    return {
        "policy": "p",
        "slo_ms": 150.0,
        "a_min": 0.8,
        "sent": 100,
        "completed": 100,
        "lost": 0,
        "errors": 0,
        "slo_attainment": att,
        "p50_ms": p95 / 2,
        "p95_ms": p95,
        "p99_ms": p95 * 1.2,
        "throughput_rps": 10.0,
        "offered_rps": 10.0,
        "accuracy": acc,
        "pruned_fraction": 0.5,
        "prune_events": 1,
        "restore_events": 1,
        "in_slowdown": {"requests": 40, "slo_attainment": inside, "p95_ms": p95 * 2},
        "outside_slowdown": {"requests": 60, "slo_attainment": 0.9, "p95_ms": p95 / 2},
        **extra,
    }


def report(policy: str, *summaries: dict) -> RunReport:
    runs = [
        RunReport(
            policy=policy,
            summary=s,
            levels={"changes_up": [0, 1], "changes_down": [0, 1], "time_at_level_s": {}},
            emulation=["b: constant x2"],
            timing={"nodes_ready_s": 1.0, "camera_offset_s": 0.0},
            config={},
            checks={"every_request_has_a_result": True},
        )
        for s in summaries
    ]
    return aggregate(runs)


def test_repetitions_give_median_and_range_of_every_figure_nested_ones_too() -> None:
    merged = merge_summaries(
        [summary(0.5, 0.9, 100, inside=0.1), summary(0.7, 0.95, 300, inside=0.5),
         summary(0.6, 0.92, 200, inside=0.2)]
    )  # fmt: skip
    assert merged["slo_attainment"] == pytest.approx(0.6)
    assert merged["spread"]["slo_attainment"] == [0.5, 0.7]
    # the per-window figures are medians too, not the first repetition's
    assert merged["in_slowdown"]["slo_attainment"] == pytest.approx(0.2)
    assert merged["spread"]["in_slowdown.slo_attainment"] == [0.1, 0.5]
    assert merged["in_slowdown"]["p95_ms"] == pytest.approx(400)
    assert merged["spread"]["outside_slowdown.p95_ms"] == [50, 150]
    assert merged["sent"] == 100 and isinstance(merged["sent"], int)
    assert merged["repeats"] == 3 and len(merged["repetitions"]) == 3
    agg = report("reactive", summary(0.5, 0.9, 100, 0.1), summary(0.7, 0.9, 300, 0.5),
                 summary(0.6, 0.9, 200, 0.2))  # fmt: skip
    assert agg.summary["in_slowdown"]["slo_attainment"] == pytest.approx(0.2)


def test_attainment_against_the_oracle_is_paired_by_repetition() -> None:
    summaries = {
        "reactive": merge_summaries([summary(0.4, 0.9, 1), summary(0.6, 0.9, 1)]),
        "oracle": merge_summaries([summary(0.8, 0.9, 1), summary(0.6, 0.9, 1)]),
    }
    ratio = attainment_vs_oracle(summaries)
    assert ratio["reactive"]["range"] == pytest.approx([0.5, 1.0])
    assert ratio["reactive"]["value"] == pytest.approx(0.75)
    assert ratio["oracle"]["value"] == pytest.approx(1.0)
    assert attainment_vs_oracle({"reactive": summaries["reactive"]}) == {}


def test_a_static_level_that_beats_a_controller_on_both_axes_is_named() -> None:
    summaries = {
        "static:0": summary(0.30, 0.99, 2000),
        "static:5": summary(0.88, 0.963, 333),
        "reactive": summary(0.55, 0.984, 1393),
        "proactive": summary(0.57, 0.963, 737),  # equal accuracy, lower attainment
        "oracle": summary(0.95, 0.97, 120),
    }
    found = {(d["static"], d["dynamic"]) for d in dominance(summaries)}
    assert found == {("static:5", "proactive")}
    text = dominance(summaries)[0]["text"]
    assert "static:5 beats proactive on both axes" in text
    reports = {p: report(p, s) for p, s in summaries.items()}
    md = markdown(scenario(), reports, {})
    assert "**static:5 beats proactive on both axes" in md
    cmp = compare_summary(reports)
    assert cmp["baseline"] == "static:0"
    for policy in summaries:
        row = cmp["policies"][policy]
        assert {"slo_attainment", "accuracy", "p95_ms", "attainment_vs_oracle"} <= set(row)
    assert cmp["policies"]["reactive"]["attainment_vs_oracle"] == pytest.approx(0.55 / 0.95)
    # when no static level wins, the report says that too
    summaries["proactive"] = summary(0.9, 0.97, 200)
    assert dominance(summaries) == []
    md = markdown(scenario(), {p: report(p, s) for p, s in summaries.items()}, {})
    assert "No static level beats a dynamic policy" in md


def test_overlapping_ranges_are_said_and_separate_ones_are_not() -> None:
    reactive = merge_summaries([summary(0.50, 0.98, 900), summary(0.80, 0.98, 1100)])
    proactive = merge_summaries([summary(0.75, 0.97, 500), summary(0.85, 0.97, 600)])
    found = overlaps({"reactive": reactive, "proactive": proactive})
    figures = {o["figure"] for o in found}
    assert figures == {"slo_attainment"}  # accuracy 98 vs 97, p95 900-1100 vs 500-600
    assert "SLO attainment: the ranges of reactive [50.0%, 80.0%] and proactive" in found[0]["text"]
    single = {"a": summary(0.5, 0.9, 1), "b": summary(0.5, 0.9, 1)}
    assert overlaps(single) == []  # one repetition: no ranges to compare
    md = markdown(
        scenario(),
        {
            "reactive": report("reactive", summary(0.5, 0.98, 900), summary(0.8, 0.98, 1100)),
            "proactive": report("proactive", summary(0.75, 0.97, 500), summary(0.85, 0.97, 600)),
        },
        {},
        orders=[["reactive", "proactive"], ["proactive", "reactive"]],
    )
    assert "the ranges of reactive [50.0%, 80.0%] and proactive [75.0%, 85.0%] overlap" in md
    assert "Policy order per repetition: 1: reactive, proactive; 2: proactive, reactive." in md
    assert "| SLO attainment in slowdowns |" in md


def test_every_repetition_runs_the_policies_in_another_order() -> None:
    policies = ["static:0", "static:5", "reactive", "proactive", "oracle"]
    orders = rotated_orders(policies, 3)
    assert orders[0] == policies
    assert [o[0] for o in orders] == ["static:0", "static:5", "reactive"]
    assert all(sorted(o) == sorted(policies) for o in orders)
    assert len({tuple(o) for o in orders}) == 3
    assert rotated_orders(["a"], 2) == [["a"], ["a"]]


def test_the_tradeoff_plot_has_one_point_per_policy_and_repetition(tmp_path: Path) -> None:
    from experiment import plots

    path = plots.plot_tradeoff(
        scenario(),
        {
            "static:5": [summary(0.9, 0.96, 1), summary(0.85, 0.96, 1)],
            "oracle": [summary(0.95, 0.97, 1), {"accuracy": None, "slo_attainment": None}],
        },
        tmp_path / "tradeoff.png",
    )
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_the_startup_budget_follows_the_slowest_recent_startup() -> None:
    from experiment.runner import startup_budget

    assert startup_budget(30.0, []) == 30.0
    assert startup_budget(30.0, [10.0]) == 30.0  # never below the configured budget
    slow_then_fast = startup_budget(30.0, [37.5, 15.7])
    assert slow_then_fast == pytest.approx(37.5 * 1.3 + 5.0)  # a fast one does not shrink it
    assert startup_budget(30.0, [60.0, 20.0, 20.0, 20.0]) == pytest.approx(31.0)  # forgotten


def test_a_calibration_keeps_the_load_it_was_measured_under(tmp_path: Path) -> None:
    import json

    from experiment.calibration import (
        conditions_path,
        machine_load,
        read_conditions,
    )

    path = tmp_path / "cal.json"
    assert read_conditions(path) is None  # an old calibration: unknown
    load = machine_load()
    assert load["cpus"] >= 1 and load["load1"] >= 0
    conditions_path(path).write_text(json.dumps(load))
    assert read_conditions(path) == load
    assert conditions_path(path).name == "cal.conditions.json"
