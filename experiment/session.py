"""Several policies on one scenario, one after another, and everything they write.

:func:`run_session` runs the policies in order (same trace, same seed, a fresh broker and fresh
processes each), then writes into ``out_dir``::

    report.json               {"kind": "experiment", "compare": {...}, "runs": {policy: run}}
    report.md                 the side-by-side table, the scenario, what was emulated
    timeline-<policy>.png     arrivals, latency with the SLO, levels; slowdowns shaded
    attainment-vs-accuracy.png  SLO attainment against accuracy, one point per policy and run
    latency-cdf.png           one curve per policy
    timelines.png             (several policies) the latency panels stacked
    <policy>/                 events.jsonl, camera.json, controller-report.json, logs/, broker/
                              (<policy>-<k>/ per repetition with --repeat)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from bus.observer import Events
from experiment.compare import rotated_orders
from experiment.config import ExperimentConfig
from experiment.report import (
    RunReport,
    aggregate,
    compare_summary,
    file_tag,
    markdown,
    write_text,
)
from experiment.runner import ExperimentRunner, RunOutcome
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

MAX_OFFSET_S = 1.0  # a replay starting further off the shared clock is not comparable


@dataclass
class SessionResult:
    """What :func:`run_session` produced."""

    config: ExperimentConfig
    outcomes: dict[str, RunOutcome]
    out_dir: Path
    plots: dict[str, str]
    report_json: Path
    report_md: Path
    orders: list[list[str]] = field(default_factory=list)  # policy order per repetition

    @property
    def reports(self) -> dict[str, RunReport]:
        return {p: o.report for p, o in self.outcomes.items()}

    def compare(self) -> dict[str, Any]:
        """The one JSON object ``--json`` prints."""
        out = compare_summary(self.reports)
        out.update(
            {
                "orders": self.orders,
                "experiment": self.config.name,
                "out_dir": str(self.out_dir),
                "report": str(self.report_json),
                "plots": self.plots,
                "emulation": self.config.emulation_summary(),
                "checks": {p: r.checks for p, r in self.reports.items()},
            }
        )
        return out

    @property
    def ok(self) -> bool:
        """Every run finished with a result for every request and no orphan process."""
        return all(
            r.checks.get("every_request_has_a_result") and not r.checks.get("orphans")
            for r in self.reports.values()
        )


def default_out_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / "experiments" / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_session(
    config: ExperimentConfig,
    policies: Sequence[str],
    out_dir: Path,
    *,
    data_dir: Path,
    progress: bool = True,
    stream: IO[str] | None = None,
    command: str | None = None,
    log_level: str = "INFO",
    repeat: int = 1,
    retries: int = 2,
) -> SessionResult:
    """Run ``policies`` in order on ``config`` (``repeat`` times, interleaved) and write the
    reports and plots. With repetitions, every number is the median over them (with its
    range), the timelines show the representative run (p95 closest to the median), and the
    CDF pools every run. A run whose replay did not start within ``MAX_OFFSET_S`` of the
    shared clock (a start-up slower than the budget: its trace would not line up with the
    slowdown windows) is run again, up to ``retries`` times."""
    from experiment import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    runner = ExperimentRunner(
        config, out_dir, data_dir=data_dir, progress=progress, stream=stream, log_level=log_level
    )
    runner.prepare()
    config = runner.config
    if repeat < 1:
        raise ConfigError("repeat must be >= 1")
    for policy in policies:
        config.check_policy(policy)
    orders = rotated_orders(policies, repeat)
    runs_of: dict[str, list[RunOutcome]] = {p: [] for p in policies}
    total, started = repeat * len(policies), time.monotonic()
    # interleaved, so that a change of machine load hits all alike, and in a rotated order, so
    # that no policy always runs first or right after the same one
    for r, order in enumerate(orders):
        for policy in order:
            done = sum(len(v) for v in runs_of.values())
            tag = policy if repeat == 1 else f"{policy}-{r + 1}"
            if progress and total > 1:
                elapsed = time.monotonic() - started
                eta = f", about {elapsed / done * (total - done) / 60:.0f} min left" if done else ""
                _say(
                    stream,
                    f"== run {done + 1}/{total}: {policy}"
                    + (f" (repetition {r + 1}/{repeat})" if repeat > 1 else "")
                    + eta,
                )
            runs_of[policy].append(_aligned_run(runner, policy, tag, retries))
    outcomes = {p: _representative(o) for p, o in runs_of.items()}
    aggregated = {p: aggregate([o.report for o in runs]) for p, runs in runs_of.items()}
    files: dict[str, str] = {}
    for policy, o in outcomes.items():
        path = plots.plot_timeline(
            config, policy, o.events, o.clock_start, out_dir / f"timeline-{file_tag(policy)}.png"
        )
        files[f"timeline ({policy})"] = str(path)
    files["SLO attainment vs accuracy"] = str(
        plots.plot_tradeoff(
            config,
            {p: [o.report.summary for o in r] for p, r in runs_of.items()},
            out_dir / "attainment-vs-accuracy.png",
        )
    )
    runs = {p: (o.events, o.clock_start) for p, o in outcomes.items()}
    pooled = {p: (_pooled([o.events for o in r]), 0.0) for p, r in runs_of.items()}
    files["latency CDF"] = str(plots.plot_cdf(config, pooled, out_dir / "latency-cdf.png"))
    if len(outcomes) > 1:
        files["timelines"] = str(
            plots.plot_compare_timelines(config, runs, out_dir / "timelines.png")
        )
    reports = aggregated
    for policy, report in reports.items():
        outcomes[policy].report = report
    report_json = out_dir / "report.json"
    report_json.write_text(
        json.dumps(
            {
                "kind": "experiment",
                "experiment": config.name,
                "command": command,
                "compare": {**compare_summary(reports), "orders": orders},
                "orders": orders,
                "plots": files,
                "runs": {p: r.to_dict() for p, r in reports.items()},
            },
            indent=1,
            default=str,
        )
    )
    report_md = write_text(out_dir / "report.md", markdown(config, reports, files, command, orders))
    return SessionResult(config, outcomes, out_dir, files, report_json, report_md, orders)


def _say(stream: IO[str] | None, text: str) -> None:
    out = stream or sys.stderr
    out.write(text + "\n")
    out.flush()


def _aligned_run(runner: ExperimentRunner, policy: str, tag: str, retries: int) -> RunOutcome:
    outcome = runner.run_policy(policy, tag)
    for attempt in range(1, retries + 1):
        offset = outcome.report.timing.get("camera_offset_s")
        if offset is not None and abs(offset) <= MAX_OFFSET_S:
            break
        log.warning(
            "%s: the replay started %s s off the shared clock; running it again (attempt %d of %d)",
            tag,
            "?" if offset is None else f"{offset:+.1f}",
            attempt,
            retries,
        )
        outcome = runner.run_policy(policy, f"{tag}-retry{attempt}")
    return outcome


def _representative(runs: Sequence[RunOutcome]) -> RunOutcome:
    """The run whose p95 is closest to the median p95 of ``runs``."""
    mid = float(np.median([o.report.summary.get("p95_ms") or 0.0 for o in runs]))
    return min(runs, key=lambda o: abs((o.report.summary.get("p95_ms") or 0.0) - mid))


def _pooled(events: Sequence[Events]) -> Events:
    """Every run's exits in one :class:`Events` (latency is all a CDF needs)."""
    out = Events()
    for k, ev in enumerate(events):
        for e in ev["exit"]:
            out.add("exit", {**e, "request_id": f"{k}:{e.get('request_id')}"})
    return out
