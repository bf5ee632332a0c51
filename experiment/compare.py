"""Comparing policies honestly: medians and ranges over repetitions, each policy's SLO
attainment against the oracle's, static levels that beat a controller, overlapping ranges.

Everything here works on run summaries (the ``summary`` dict of a
:class:`~experiment.report.RunReport`); several repetitions of one policy become one
summary whose numbers are medians, with ``spread[key] = [min, max]`` for every numeric figure,
nested ones under dotted keys (``in_slowdown.slo_attainment``), and ``repetitions`` holding
every run's own summary.

- **attainment_vs_oracle**: a policy's SLO attainment / the oracle's. With repetitions it is
  computed per repetition (repetition k of the policy against repetition k of the oracle: they
  ran in the same round, on the same machine load) and reported as the median with its range.
- **dominance**: a static level beats a dynamic policy when its SLO attainment and accuracy
  (medians) are both at least the dynamic policy's and one is larger.
- **overlap**: two policies' ranges of a figure over the repetitions overlap (the difference
  between them is within the run-to-run variation); only said with two repetitions or more.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from controller.config import parse_policy

HEADLINE_KEYS = ("slo_attainment", "accuracy", "p95_ms", "attainment_vs_oracle")
OVERLAP_KEYS = (
    ("slo_attainment", "SLO attainment", "{:.1%}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("p95_ms", "p95 latency", "{:.0f} ms"),
)

Summary = Mapping[str, Any]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def merge_summaries(summaries: Sequence[Summary]) -> dict[str, Any]:
    """One summary of several repetitions: every numeric figure (nested dicts included) is the
    median over the repetitions that have it, and ``spread`` maps its (dotted) key to
    ``[min, max]``; other values come from the first repetition."""
    spread: dict[str, list[float]] = {}
    merged = _merge(summaries, "", spread)
    merged["repeats"] = len(summaries)
    merged["spread"] = spread
    merged["repetitions"] = [dict(s) for s in summaries]
    return merged


def _merge(items: Sequence[Summary], prefix: str, spread: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = dict(items[0])
    for key, value in items[0].items():
        values = [s.get(key) for s in items]
        if isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in values):
            out[key] = _merge(values, f"{prefix}{key}.", spread)  # type: ignore[arg-type]
            continue
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        if not _number(value) or not numbers:
            continue
        med = float(np.median(numbers))
        out[key] = round(med) if all(isinstance(v, int) for v in values if _number(v)) else med
        spread[prefix + key] = [min(numbers), max(numbers)]
    return out


def _repetitions(summary: Summary) -> list[Summary]:
    reps = summary.get("repetitions")
    return list(reps) if isinstance(reps, list) and reps else [summary]


def _ratio(a: Any, b: Any) -> float | None:
    if not _number(a) or not _number(b) or b == 0:
        return None
    return float(a) / float(b)


def oracle_key(policies: Sequence[str]) -> str | None:
    return next((p for p in policies if parse_policy(p).kind == "oracle"), None)


def attainment_vs_oracle(summaries: Mapping[str, Summary]) -> dict[str, dict[str, Any]]:
    """Per policy: ``value`` (median over repetitions of attainment / the oracle's in the same
    repetition) and ``range`` [min, max]; empty without an oracle in the comparison."""
    oracle = oracle_key(list(summaries))
    if oracle is None:
        return {}
    base = _repetitions(summaries[oracle])
    out: dict[str, dict[str, Any]] = {}
    for policy, summary in summaries.items():
        reps = _repetitions(summary)
        ratios = [
            r
            for a, b in zip(reps, base, strict=False)
            if (r := _ratio(a.get("slo_attainment"), b.get("slo_attainment"))) is not None
        ]
        if not ratios:
            out[policy] = {"value": None, "range": None}
            continue
        out[policy] = {"value": float(np.median(ratios)), "range": [min(ratios), max(ratios)]}
    return out


def headline(summaries: Mapping[str, Summary]) -> dict[str, dict[str, Any]]:
    """Per policy: slo_attainment, accuracy, p95_ms and attainment_vs_oracle, each as
    ``{"median": m, "min": a, "max": b}`` (None when not measured)."""
    vs_oracle = attainment_vs_oracle(summaries)
    out: dict[str, dict[str, Any]] = {}
    for policy, s in summaries.items():
        row: dict[str, Any] = {}
        for key in HEADLINE_KEYS[:3]:
            value = s.get(key)
            lo, hi = s.get("spread", {}).get(key, [value, value])
            row[key] = {"median": value, "min": lo, "max": hi} if _number(value) else None
        ratio = vs_oracle.get(policy)
        row["attainment_vs_oracle"] = (
            {"median": ratio["value"], "min": ratio["range"][0], "max": ratio["range"][1]}
            if ratio and ratio["value"] is not None
            else None
        )
        out[policy] = row
    return out


def dominance(summaries: Mapping[str, Summary]) -> list[dict[str, Any]]:
    """Every (static level, dynamic policy) pair where the static level is at least as good on
    SLO attainment and on accuracy (medians) and better on one, with a sentence saying so."""
    found = []
    for static, dynamic in itertools.product(summaries, summaries):
        if parse_policy(static).kind != "static" or parse_policy(dynamic).kind == "static":
            continue
        s, d = summaries[static], summaries[dynamic]
        values = [x.get(k) for x in (s, d) for k in ("slo_attainment", "accuracy")]
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        if len(numbers) != 4:
            continue
        sa, sc, da, dc = numbers
        if sa >= da and sc >= dc and (sa > da or sc > dc):
            found.append(
                {
                    "static": static,
                    "dynamic": dynamic,
                    "text": (
                        f"{static} beats {dynamic} on both axes: SLO attainment {sa:.1%} >= "
                        f"{da:.1%} and accuracy {sc:.1%} >= {dc:.1%} (medians)"
                    ),
                }
            )
    return found


def overlaps(summaries: Mapping[str, Summary]) -> list[dict[str, Any]]:
    """Every pair of policies whose ranges of a figure (SLO attainment, accuracy, p95) over the
    repetitions overlap, with a sentence saying so; nothing with a single repetition."""
    found = []
    for key, label, fmt in OVERLAP_KEYS:
        for a, b in itertools.combinations(summaries, 2):
            ra, rb = _range(summaries[a], key), _range(summaries[b], key)
            if ra is None or rb is None:
                continue
            if ra[0] <= rb[1] and rb[0] <= ra[1]:
                found.append(
                    {
                        "figure": key,
                        "policies": [a, b],
                        "ranges": [ra, rb],
                        "text": (
                            f"{label}: the ranges of {a} [{fmt.format(ra[0])}, "
                            f"{fmt.format(ra[1])}] and {b} [{fmt.format(rb[0])}, "
                            f"{fmt.format(rb[1])}] overlap"
                        ),
                    }
                )
    return found


def _range(summary: Summary, key: str) -> list[float] | None:
    if int(summary.get("repeats", 1)) < 2:
        return None
    spread = summary.get("spread", {}).get(key)
    if not spread or any(not _number(v) or not math.isfinite(v) for v in spread):
        return None
    return [float(spread[0]), float(spread[1])]


def rotated_orders(policies: Sequence[str], repeat: int) -> list[list[str]]:
    """The order of the policies in each repetition: rotated by one each time, so that no
    policy always runs first (on a cold machine) or right after the same neighbour."""
    n = len(policies)
    return [[*policies[r % n :], *policies[: r % n]] for r in range(repeat)]
