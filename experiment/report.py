"""What one run measured, computed from its recorded messages; JSON and Markdown reports.

Definitions (the same for every policy):

- **sent**: distinct request ids the camera published on ``stage/0/<camera>``; **completed**: distinct
  ids with a result. Latency is the ``exits`` message's ``latency_s`` (exit time at the last
  node minus the camera's entry time; all processes share this machine's clock).
- **SLO attainment**: requests with latency <= SLO over requests SENT (a lost or unfinished
  request counts as a miss).
- **p50/p95/p99**: percentiles of the completed requests' latencies.
- **throughput**: completed requests / (last exit - first send); **offered load**: sent /
  (last send - first send).
- **accuracy**: fraction of completed requests whose label matches the image's true label.
- **prune / restore events**: the controller's decisions (``control/decisions``); level changes
  per stage come from the retained ``control/stage/<i>`` messages, and so does the time spent
  at each level (from the clock start to the last exit).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bus.messages import LevelMessage
from bus.observer import Events
from controller.config import parse_policy
from experiment.compare import (
    attainment_vs_oracle,
    dominance,
    headline,
    merge_summaries,
    overlaps,
)
from experiment.config import ExperimentConfig

SUMMARY_KEYS = (
    "slo_attainment",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "accuracy",
    "throughput_rps",
    "sent",
    "completed",
    "lost",
    "prune_events",
    "restore_events",
)


@dataclass
class RunReport:
    """One run of one policy: its numbers (``summary``) and what made them."""

    policy: str
    summary: dict[str, Any]
    levels: dict[str, Any]
    emulation: list[str]
    timing: dict[str, Any]
    config: dict[str, Any]
    camera: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "experiment-run",
            "policy": self.policy,
            "summary": self.summary,
            "levels": self.levels,
            "emulation": self.emulation,
            "timing": self.timing,
            "checks": self.checks,
            "camera": self.camera,
            "controller": self.controller,
            "files": self.files,
            "config": self.config,
        }


def first_by_id(items: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for item in items:
        out.setdefault(str(item.get("request_id")), item)
    return out


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if values.size else None


def level_timeline(
    events: Events, n_stages: int, clock_start: float
) -> list[list[tuple[float, int]]]:
    """Per stage, (seconds since the clock start, level) steps; level 0 from the start."""
    steps: list[list[tuple[float, int]]] = [[(-math.inf, 0)] for _ in range(n_stages)]
    for body in sorted(events["level"], key=lambda b: b["rx"]):
        message = LevelMessage.from_body(body)
        stage, level = message.stage, message.level
        if stage < n_stages and level != steps[stage][-1][1]:
            steps[stage].append((body["rx"] - clock_start, level))
    return steps


def time_at_levels(steps: list[tuple[float, int]], start: float, end: float) -> dict[str, float]:
    """Seconds spent at each level between ``start`` and ``end`` (clock seconds)."""
    spent: dict[str, float] = {}
    for (t, level), nxt in zip(steps, [*steps[1:], (math.inf, -1)], strict=True):
        a, b = max(t, start), min(nxt[0], end)
        if b > a:
            spent[str(level)] = spent.get(str(level), 0.0) + b - a
    return spent


def in_windows(t: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    mask = np.zeros(t.shape, dtype=bool)
    for a, b in windows:
        mask |= (t >= a) & (t < b)
    return mask


def slowdown_spans(config: ExperimentConfig) -> list[tuple[float, float]]:
    """Every transient slowdown or hog window of any node (clock seconds)."""
    spans = [(w.start_s, w.end_s) for n in config.nodes for w in n.emulation.windows]
    spans += [w for n in config.nodes for w in n.hog_windows]
    return sorted(spans)


def build_report(
    config: ExperimentConfig,
    policy: str,
    events: Events,
    *,
    clock_start: float,
    timing: dict[str, Any],
    camera: Mapping[str, Any] | None = None,
    controller: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
) -> RunReport:
    """Compute a :class:`RunReport` from a run's recorded messages."""
    slo_s = config.slo_ms / 1e3
    sends = first_by_id(events["send"])
    exits = first_by_id(events["exit"])
    results = first_by_id(events["result"])
    sent_ids = set(sends) | set(exits)  # an exit without a recorded send still was sent
    lat = np.asarray([float(e["latency_s"]) for e in exits.values()])
    entry = np.asarray([float(e["entry_ts"]) - clock_start for e in exits.values()])
    ok = lat <= slo_s
    n_sent = len(sent_ids)
    labelled = [bool(r["correct"]) for r in results.values() if r.get("correct") is not None]
    pruned = [any(int(v) > 0 for v in r.get("levels", [])) for r in results.values()]
    send_t = sorted(float(s["entry_ts"]) for s in sends.values())
    exit_t = sorted(float(e["exit_ts"]) for e in exits.values())
    span = (exit_t[-1] - send_t[0]) if send_t and exit_t else 0.0
    offered_span = (send_t[-1] - send_t[0]) if len(send_t) > 1 else 0.0
    decisions = events["decision"]
    windows = slowdown_spans(config)
    inside = in_windows(entry, windows)
    n_stages = len(config.nodes)
    steps = level_timeline(events, n_stages, clock_start)
    end = exit_t[-1] - clock_start if exit_t else 0.0
    begin = min(0.0, send_t[0] - clock_start) if send_t else 0.0
    ups = [sum(1 for a, b in itertools.pairwise(s) if b[1] > a[1]) for s in steps]
    downs = [sum(1 for a, b in itertools.pairwise(s) if b[1] < a[1]) for s in steps]
    summary = {
        "policy": policy,
        "slo_ms": config.slo_ms,
        "a_min": config.a_min,
        "sent": n_sent,
        "completed": len(results),
        "lost": n_sent - len(set(results) & sent_ids),
        "slo_attainment": float(ok.sum() / n_sent) if n_sent else None,
        "slo_attainment_completed": float(ok.mean()) if lat.size else None,
        "p50_ms": _pct(lat, 50),
        "p95_ms": _pct(lat, 95),
        "p99_ms": _pct(lat, 99),
        "mean_ms": float(lat.mean() * 1e3) if lat.size else None,
        "max_ms": float(lat.max() * 1e3) if lat.size else None,
        "throughput_rps": len(exits) / span if span > 0 else None,
        "offered_rps": len(sends) / offered_span if offered_span > 0 else None,
        "accuracy": float(np.mean(labelled)) if labelled else None,
        "labelled": len(labelled),
        "pruned_fraction": float(np.mean(pruned)) if pruned else None,
        "prune_events": sum(1 for d in decisions if d.get("action") == "prune"),
        "restore_events": sum(1 for d in decisions if d.get("action") == "restore"),
        "in_slowdown": {
            "requests": int(inside.sum()),
            "slo_attainment": float(ok[inside].mean()) if inside.any() else None,
            "p95_ms": _pct(lat[inside], 95),
        },
        "outside_slowdown": {
            "requests": int((~inside).sum()),
            "slo_attainment": float(ok[~inside].mean()) if (~inside).any() else None,
            "p95_ms": _pct(lat[~inside], 95),
        },
        "errors": len(events["error"]),
        "camera_offset_s": timing.get("camera_offset_s"),
        "duration_s": span,
    }
    levels = {
        "changes_up": ups,
        "changes_down": downs,
        "time_at_level_s": {str(i): time_at_levels(s, begin, end) for i, s in enumerate(steps)},
        "final": [s[-1][1] for s in steps],
        "timeline": [[[t, lv] for t, lv in s[1:]] for s in steps],
    }
    return RunReport(
        policy=policy,
        summary=summary,
        levels=levels,
        emulation=config.emulation_summary(),
        timing=dict(timing),
        config=config.to_dict(),
        camera=dict(camera or {}),
        controller=_controller_digest(controller),
        files=dict(files or {}),
        checks={
            "every_request_has_a_result": n_sent > 0 and set(results) >= sent_ids,
            "missing_results": sorted(sent_ids - set(results))[:20],
        },
    )


def aggregate(reports: Sequence[RunReport]) -> RunReport:
    """Several repetitions of one policy as one report: every numeric summary value, nested
    ones included, is the median over the repetitions, ``spread`` holds [min, max] of each
    (dotted keys for nested ones, see :func:`~experiment.compare.merge_summaries`)
    and ``repetitions`` every run's summary; the rest (levels, timing, files) is taken from
    the repetition whose p95 is closest to the median (the representative run)."""
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    summary = merge_summaries([r.summary for r in reports])
    p95 = summary.get("p95_ms")
    rep = min(reports, key=lambda r: abs((r.summary.get("p95_ms") or 0.0) - (p95 or 0.0)))
    checks = {
        "every_request_has_a_result": all(
            r.checks.get("every_request_has_a_result") for r in reports
        ),
        "orphans": [pid for r in reports for pid in r.checks.get("orphans", [])],
        "missing_results": [m for r in reports for m in r.checks.get("missing_results", [])][:20],
    }
    return RunReport(
        policy=first.policy,
        summary=summary,
        levels=rep.levels,
        emulation=first.emulation,
        timing=rep.timing,
        config=first.config,
        camera=rep.camera,
        controller=rep.controller,
        files=rep.files,
        checks=checks,
    )


def _controller_digest(report: Mapping[str, Any] | None) -> dict[str, Any]:
    if not report:
        return {}
    keep = ("counts", "time_at_level_s", "final_levels", "latency", "duration_s")
    return {k: report[k] for k in keep if k in report}


def file_tag(policy: str) -> str:
    """A policy name usable in a file name (``static:5`` -> ``static-5``)."""
    return policy.replace(":", "-")


def static_zero(policies: Sequence[str]) -> str | None:
    """The unpruned static policy among ``policies`` (``static`` or ``static:0``)."""
    return next(
        (p for p in policies if parse_policy(p) == parse_policy("static:0")),
        None,
    )


def compare_summary(
    reports: Mapping[str, RunReport], baseline: str | None = None
) -> dict[str, Any]:
    """The ``--compare --json`` object: per policy its summary (with ``attainment_vs_oracle``
    when the oracle ran), the ``headline`` (SLO attainment, accuracy, p95 and attainment vs
    the oracle: median, min, max), the static levels that beat a dynamic policy on both
    axes (``dominance``), the figures whose ranges overlap (``overlaps``), and ratios against
    ``baseline`` (default: static level 0; p95 speedup = baseline p95 / policy p95; SLO gain =
    policy attainment / baseline attainment; violation reduction = baseline misses / policy
    misses)."""
    summaries = {p: r.summary for p, r in reports.items()}
    vs_oracle = attainment_vs_oracle(summaries)
    out: dict[str, Any] = {
        "policies": {
            p: {**s, "attainment_vs_oracle": vs_oracle.get(p, {}).get("value")}
            for p, s in summaries.items()
        },
        "headline": headline(summaries),
        "dominance": dominance(summaries),
        "overlaps": overlaps(summaries),
    }
    baseline = baseline or static_zero(list(reports))
    base = None if baseline is None else reports.get(baseline)
    if base is None or baseline is None:
        return out
    b = base.summary
    out["baseline"] = baseline
    out["speedup_p95"] = {
        p: _ratio(b["p95_ms"], r.summary["p95_ms"]) for p, r in reports.items() if p != baseline
    }
    out["slo_attainment_gain"] = {
        p: _ratio(r.summary["slo_attainment"], b["slo_attainment"])
        for p, r in reports.items()
        if p != baseline
    }
    out["slo_violation_reduction"] = {
        p: _ratio(_miss(b["slo_attainment"]), _miss(r.summary["slo_attainment"]))
        for p, r in reports.items()
        if p != baseline
    }
    out["accuracy_above_a_min"] = {
        p: (r.summary["accuracy"] is not None and r.summary["accuracy"] >= r.summary["a_min"])
        for p, r in reports.items()
    }
    return out


def _miss(att: float | None) -> float | None:
    return None if att is None else 1.0 - att


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return math.inf if a > 0 else None
    return a / b


# ----------------------------------------------------------------------------- text
TABLE_ROWS = (
    ("SLO attainment", "slo_attainment", "{:.1%}"),
    ("SLO attainment vs oracle", "attainment_vs_oracle", "{:.2f}"),
    ("SLO attainment in slowdowns", "in_slowdown.slo_attainment", "{:.1%}"),
    ("SLO attainment outside", "outside_slowdown.slo_attainment", "{:.1%}"),
    ("p50 latency (ms)", "p50_ms", "{:.0f}"),
    ("p95 latency (ms)", "p95_ms", "{:.0f}"),
    ("p99 latency (ms)", "p99_ms", "{:.0f}"),
    ("throughput (req/s)", "throughput_rps", "{:.1f}"),
    ("accuracy (live)", "accuracy", "{:.1%}"),
    ("requests pruned", "pruned_fraction", "{:.0%}"),
    ("sent / completed", None, None),
    ("prune / restore events", None, None),
)


def _cell(summary: Mapping[str, Any], key: str | None, fmt: str | None, label: str) -> str:
    if key is None:
        if label.startswith("sent"):
            return f"{summary['sent']} / {summary['completed']}"
        return f"{summary['prune_events']} / {summary['restore_events']}"
    value: Any = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return "-"
    text = fmt.format(value) if fmt else str(value)
    spread = summary.get("spread", {}).get(key)
    if spread and fmt:  # several repetitions: median [min - max]
        text += f" [{fmt.format(spread[0])}-{fmt.format(spread[1])}]"
    return text


def table_rows(reports: Mapping[str, RunReport]) -> tuple[list[str], list[list[str]]]:
    """Side-by-side rows: one metric per row, one policy per column."""
    headers = ["metric", *reports]
    vs_oracle = attainment_vs_oracle({p: r.summary for p, r in reports.items()})
    summaries = {
        p: {
            **r.summary,
            "attainment_vs_oracle": vs_oracle.get(p, {}).get("value"),
            "spread": {
                **r.summary.get("spread", {}),
                "attainment_vs_oracle": vs_oracle.get(p, {}).get("range")
                if int(r.summary.get("repeats", 1)) > 1
                else None,
            },
        }
        for p, r in reports.items()
    }
    rows = [
        [label, *(_cell(s, key, fmt, label) for s in summaries.values())]
        for label, key, fmt in TABLE_ROWS
        if key != "attainment_vs_oracle" or vs_oracle
    ]
    return headers, rows


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else ("inf" if math.isinf(value) else f"{value:.2f}x")


def markdown(
    config: ExperimentConfig,
    reports: Mapping[str, RunReport],
    plots: Mapping[str, str],
    command: str | None = None,
    orders: Sequence[Sequence[str]] = (),
) -> str:
    """The Markdown report of one or several runs of the same scenario (``orders``: the
    policies' order in each repetition)."""
    headers, rows = table_rows(reports)
    lines = [f"# Experiment `{config.name}`", ""]
    if config.description:
        lines += [config.description, ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    cmp = compare_summary(reports)
    lines += ["", "## Static levels against the controllers", ""]
    if cmp["dominance"]:
        lines += [
            "A dynamic policy is only better if no static level beats it on both axes at once. "
            "Here one does:",
            "",
        ]
        lines += [f"- **{d['text']}**." for d in cmp["dominance"]]
    else:
        lines += [
            "No static level beats a dynamic policy on both SLO attainment and accuracy (medians)."
        ]
    repeats = max(int(r.summary.get("repeats", 1)) for r in reports.values())
    lines += ["", "## Run-to-run variation", ""]
    if repeats < 2:
        lines += ["One repetition: no ranges (run with `--repeat 3` for medians and ranges)."]
    else:
        lines += [
            f"Every figure is the median over {repeats} repetitions, [min-max] beside it. "
            "Where two policies' ranges overlap, the difference between them is within the "
            "run-to-run variation:",
            "",
        ]
        lines += [f"- {o['text']}." for o in cmp["overlaps"]] or ["- no ranges overlap."]
    if orders:
        lines += [
            "",
            "Policy order per repetition: "
            + "; ".join(f"{k + 1}: {', '.join(o)}" for k, o in enumerate(orders))
            + ".",
        ]
    if "speedup_p95" in cmp:
        lines += [
            "",
            f"Against `{cmp['baseline']}`: "
            + "; ".join(
                f"**{p}** p95 speedup {_ratio_text(cmp['speedup_p95'][p])}, "
                f"SLO attainment {_ratio_text(cmp['slo_attainment_gain'][p])}, "
                f"{_ratio_text(cmp['slo_violation_reduction'][p])} fewer SLO "
                "misses"
                for p in cmp["speedup_p95"]
            ),
        ]
    first = next(iter(reports.values()))
    s = first.summary
    lines += [
        "",
        "## Scenario",
        "",
        f"- SLO {config.slo_ms:g} ms, A_min {config.a_min:g}, objective "
        f"{config.controller_config().objective}; trace {_trace_text(config)}; "
        f"{s['sent']} requests, offered {s['offered_rps'] or 0:.1f} req/s on average.",
        "- Controller settings (besides the defaults): "
        + (", ".join(f"{k} = {v}" for k, v in config.controller.items()) or "none")
        + ".",
        "- Plan: "
        + "; ".join(
            f"stage {n.stage} = blocks [{n.start}, {n.end}) on {n.name}" for n in config.nodes
        )
        + ".",
        "- **Emulated devices** (every node runs the real computation, then waits (k - 1) "
        "x its measured compute time; all processes share this machine's cores, each "
        f"node with {config.threads} torch thread(s)):",
    ]
    lines += [f"  - {text}" for text in first.emulation]
    lines += ["", "## Per policy", ""]
    for policy, r in reports.items():
        s, lv = r.summary, r.levels
        inside, outside = s["in_slowdown"], s["outside_slowdown"]
        lines += [
            f"### {policy}",
            "",
            f"- {s['sent']} sent, {s['completed']} completed, {s['lost']} lost; "
            f"errors reported {s['errors']}; every request has a result: "
            f"{r.checks.get('every_request_has_a_result')}.",
            f"- In slowdown windows: {inside['requests']} requests, SLO attainment "
            f"{_fmt(inside['slo_attainment'], '{:.1%}')}, p95 "
            f"{_fmt(inside['p95_ms'], '{:.0f}')} ms; outside: {outside['requests']} "
            f"requests, {_fmt(outside['slo_attainment'], '{:.1%}')}, p95 "
            f"{_fmt(outside['p95_ms'], '{:.0f}')} ms.",
            "- Level changes per stage (up / down): "
            + ", ".join(
                f"stage {i}: {u} / {d}"
                for i, (u, d) in enumerate(zip(lv["changes_up"], lv["changes_down"], strict=True))
            )
            + "; time at each level (s): "
            + "; ".join(
                f"stage {i}: " + ", ".join(f"L{k} {v:.0f}" for k, v in sorted(t.items()))
                for i, t in lv["time_at_level_s"].items()
            )
            + ".",
            f"- Clock: nodes ready {r.timing.get('nodes_ready_s', 0):.1f} s after launch;"
            f" camera started {r.timing.get('camera_offset_s', 0):+.2f} s from the "
            "shared clock start (slowdown windows are on that clock).",
            "",
        ]
    if plots:
        lines += ["## Plots", ""] + [f"- {name}: `{path}`" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def _trace_text(config: ExperimentConfig) -> str:
    tr = config.trace
    parts = [f"x{tr.compression:g} faster"]
    if tr.max_idle_s is not None:
        parts.append(f"idle gaps capped at {tr.max_idle_s:g} s (trace time)")
    if tr.window is not None:
        parts.append(f"window [{tr.window[0]:g}, {tr.window[1]:g}) s")
    if tr.max_images is not None:
        parts.append(f"first {tr.max_images} images")
    return f"{', '.join(tr.names)} ({', '.join(parts)})"


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
