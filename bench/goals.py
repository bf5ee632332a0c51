"""What a benchmark promises, what it measured, and whether it held.

A bench declares its goals once, as module-level :class:`GoalSpec` values (the figure's key in
its report, a comparison, a target), and returns them measured (:class:`Goal`) with its report
(:class:`BenchReport`). ``edgeprune bench`` (``edgeprune.commands.bench``) prints them under the
report (inside the JSON object with ``--json``) and, with ``--check``, exits 1 naming every
missed figure. ``--goal FIGURE=TARGET`` replaces a target for one run (a stricter budget). A
figure that should have been measured and was not (``None``) counts as missed.

No torch here: ``edgeprune bench --help`` imports this module.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pipeline.errors import ConfigError

Comparison = Literal["<=", ">="]
_COMPARISONS: tuple[Comparison, ...] = ("<=", ">=")


@dataclass(frozen=True)
class Goal:
    """One figure of a bench's report against its target."""

    figure: str
    measured: float | None
    comparison: Comparison
    target: float

    def __post_init__(self) -> None:
        if self.comparison not in _COMPARISONS:
            raise ConfigError(f"goal {self.figure}: comparison must be <= or >=")
        if not math.isfinite(self.target):
            raise ConfigError(f"goal {self.figure}: the target must be a finite number")

    @property
    def met(self) -> bool:
        if self.measured is None or not math.isfinite(self.measured):
            return False
        if self.comparison == "<=":
            return self.measured <= self.target
        return self.measured >= self.target

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        return "met" if self.met else "NOT met"

    def describe(self) -> str:
        value = "-" if self.measured is None else f"{self.measured:.4g}"
        return f"{self.figure} = {value} (goal {self.comparison} {self.target:g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "measured": self.measured,
            "comparison": self.comparison,
            "target": self.target,
            "met": self.met,
        }


@dataclass(frozen=True)
class GoalSpec:
    """A goal before the run: which figure, compared how, against what."""

    figure: str
    comparison: Comparison
    target: float

    def measured(self, value: float | None) -> Goal:
        return Goal(
            self.figure, None if value is None else float(value), self.comparison, self.target
        )


@dataclass(frozen=True)
class BenchReport:
    """What a bench's ``run(args)`` returns: the JSON object, its readable form, its goals."""

    data: dict[str, Any]
    text: str
    goals: tuple[Goal, ...]


def parse_goal_override(text: str) -> tuple[str, float]:
    """``FIGURE=TARGET`` (an argparse ``type``)."""
    figure, sep, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = math.nan
    if not sep or not figure.strip() or not math.isfinite(target):
        raise argparse.ArgumentTypeError(f"expected FIGURE=NUMBER, got {text!r}")
    return figure.strip(), target


def check_overrides(specs: Sequence[GoalSpec], overrides: Mapping[str, float], bench: str) -> None:
    """Refuse ``--goal`` names the bench does not have (before it runs for minutes)."""
    known = {s.figure for s in specs}
    unknown = sorted(set(overrides) - known)
    if unknown:
        have = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"bench {bench} has no goal {', '.join(unknown)} (its goals: {have})")


def with_targets(goals: Iterable[Goal], overrides: Mapping[str, float]) -> tuple[Goal, ...]:
    """``goals`` with the targets named in ``overrides`` replaced."""
    return tuple(
        replace(g, target=overrides[g.figure]) if g.figure in overrides else g for g in goals
    )


def missed(goals: Iterable[Goal]) -> tuple[Goal, ...]:
    return tuple(g for g in goals if not g.met)


def goals_json(goals: Sequence[Goal]) -> dict[str, Any]:
    """The keys every bench's JSON object carries."""
    return {
        "goal_results": [g.to_dict() for g in goals],
        "goals_missed": [g.figure for g in missed(goals)],
    }


def render_goals(goals: Sequence[Goal]) -> str:
    """One line per goal, for the readable output."""
    if not goals:
        return "goals: none (this bench compares; it sets no goal)"
    return "\n".join(["goals:", *(f"  {g.describe()}: {g.verdict}" for g in goals)])


def missed_message(bench: str, goals: Sequence[Goal]) -> str:
    """What ``--check`` prints on stderr when ``goals`` were missed."""
    return f"edgeprune bench {bench}: goal missed: " + "; ".join(
        f"{g.describe()}: {g.verdict}" for g in goals
    )
