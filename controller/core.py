"""The controller's pure core: what it knows about the pipeline, and its decisions.

:class:`ControllerState` ingests decoded messages (``exits``, node ``metrics``, node
``status``, retained ``control/stage/<i>``) with the time they arrived, and
:meth:`ControllerState.decide` returns a :class:`ControlDecision` or None. It reads no clock
and does no I/O, so tests drive it with a synthetic timeline; :mod:`controller.service` wires
it to MQTT.

Per stage it keeps the commanded level (learned from the retained control messages at start-up,
then set by its own decisions), the node serving it, its queue depth and its live slowdown
(:mod:`controller.estimates`). Per node (:class:`~controller.node_table.NodeTable`, the one
record of node liveness, which failover reads) it keeps the last status (online / offline, the
Last Will), when the node was last heard and whether it is lost, and returns a
:class:`NodeEvent` when a node goes offline or comes back.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bus.messages import (
    DecisionMessage,
    ExitMessage,
    LevelMessage,
    MetricsMessage,
    StatusMessage,
)
from controller.config import ControllerConfig
from controller.estimates import ArrivalTracker, StageSlowdown
from controller.level_change import LevelChange, PlanInputs, evaluate, plan_prune, plan_restore
from controller.node_table import NodeEvent, NodeInfo, NodeTable
from controller.oracle import OraclePolicy, OracleSchedule
from controller.policy import (
    Action,
    ActionKind,
    LatencyWindow,
    ProactivePolicy,
    ReactivePolicy,
)
from pipeline.calibration import Calibration
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

MAX_DECISIONS = 10_000  # kept in memory for the report
MAX_LATENCIES = 100_000


@dataclass
class StageState:
    index: int
    slowdown: StageSlowdown
    level: int = 0
    level_since: float = 0.0
    seq: int | None = None
    node: str | None = None
    queue_depth: float | None = None
    metrics_at: float | None = None
    time_at_level: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ControlDecision:
    """One PRUNE or RESTORE: the trigger, the chosen levels and every input behind them."""

    seq: int
    at: float
    ts: float | None
    policy: str
    objective: str
    action: Action
    plan: LevelChange
    levels_before: tuple[int, ...]
    ratios: tuple[float, ...]
    inputs: dict[str, Any]

    @property
    def kind(self) -> ActionKind:
        return self.action.kind

    @property
    def levels(self) -> tuple[int, ...]:
        return self.plan.levels

    @property
    def changed(self) -> tuple[int, ...]:
        return tuple(
            i
            for i, (a, b) in enumerate(zip(self.levels_before, self.levels, strict=True))
            if a != b
        )

    def level_messages(self) -> list[LevelMessage]:
        """The ``level`` message of every stage whose level changed."""
        return [
            LevelMessage(
                stage=i,
                level=self.levels[i],
                ratio=self.ratios[self.levels[i]],
                seq=self.seq,
                reason=f"{self.kind.value}: {self.action.reason}",
            )
            for i in self.changed
        ]

    def to_message(self) -> DecisionMessage:
        """What ``control/decisions`` carries (the fields of :meth:`to_dict`)."""
        return DecisionMessage.from_body(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        p = self.plan.predicted
        return _finite(
            {
                "seq": self.seq,
                "at": self.at,
                "ts": self.ts,
                "policy": self.policy,
                "objective": self.objective,
                "action": self.kind.value,
                "reason": self.action.reason,
                "how": self.plan.how,
                "levels_before": list(self.levels_before),
                "levels": list(self.levels),
                "changed": list(self.changed),
                "target_s": self.plan.target_s,
                "predicted": {
                    "latency_s": p.predicted_latency_s,
                    "bottleneck_s": p.predicted_bottleneck_s,
                    "accuracy": p.predicted_accuracy,
                    "stage_s": list(p.stage_s),
                    "feasible": p.feasible,
                },
                "feasible": p.feasible,
                "trigger": self.action.to_dict(),
                **self.inputs,
            }
        )

    def log_line(self) -> str:
        p = self.plan.predicted
        moves = ", ".join(
            f"stage {i} {self.levels_before[i]}->{self.levels[i]}" for i in self.changed
        )
        rate = self.inputs["arrival"]["rate"]
        slow = "/".join(f"{s['slowdown']:.2f}" for s in self.inputs["stages"])
        return (
            f"decision {self.seq}: {self.kind.value} {moves} ({self.plan.how}); "
            f"{self.action.reason}; rate "
            f"{'?' if rate is None else f'{rate:.1f}'}/s ({self.inputs['arrival']['source']}),"
            f" slowdowns {slow}, predicted bottleneck {p.predicted_bottleneck_s * 1e3:.1f} ms,"
            f" sum {p.predicted_latency_s * 1e3:.1f} ms, accuracy "
            f"{p.predicted_accuracy:.3f}{'' if p.feasible else ' (below A_min)'}"
        )


def _finite(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (the codec refuses NaN and infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class ControllerState:
    """Everything the controller knows, and the decision logic (no clock, no I/O)."""

    def __init__(
        self,
        config: ControllerConfig,
        calibration: Calibration,
        *,
        now: float,
        oracle_schedule: OracleSchedule | None = None,
    ) -> None:
        """``oracle_schedule`` is required by (and only used with) the ``oracle`` policy.

        Raises:
            ConfigError: a static level the calibration does not have, or the oracle without
                its schedule.
        """
        self.config = config
        self.calibration = calibration
        self.ratios = tuple(calibration.ratios)
        self.n_stages = len(calibration.slices)
        self.spec = config.policy_spec
        self.spec.check_levels(len(self.ratios))
        self.started = now
        self.stages = [
            StageState(
                i,
                StageSlowdown(
                    s.fit,
                    self.ratios,
                    window_s=config.slowdown_window_s,
                    tau_s=config.slowdown_tau_s,
                    lo=config.slowdown_min,
                    hi=config.slowdown_max,
                ),
                level_since=now,
                time_at_level=[0.0] * len(self.ratios),
            )
            for i, s in enumerate(calibration.slices)
        ]
        self.nodes = NodeTable()  # the one record of the nodes and their liveness
        self.observed = LatencyWindow(config.window_s)
        self.arrivals = ArrivalTracker(config.rate_tau_s, now, config.metrics_max_age_s)
        kind = self.spec.kind
        self.reactive = ReactivePolicy(config.reactive_config()) if kind == "reactive" else None
        self.proactive = (
            ProactivePolicy(
                config.proactive_config(), self.n_stages, arrivals=self.arrivals.from_stage0
            )
            if kind == "proactive"
            else None
        )
        self.oracle: OraclePolicy | None = None
        if kind == "oracle":
            if oracle_schedule is None:
                raise ConfigError(
                    "the oracle policy needs the scenario's slowdown schedule "
                    "(--oracle-schedule; `edgeprune experiment` writes it)"
                )
            self.oracle = OraclePolicy(
                oracle_schedule,
                self.plan_inputs(now),
                settle_s=config.slowdown_window_s + 2 * config.slowdown_tau_s,
            )
        self.decisions: deque[ControlDecision] = deque(maxlen=MAX_DECISIONS)
        self.events: list[NodeEvent] = []
        self.counts: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=MAX_LATENCIES)
        self.seq = 0
        self.held: str | None = None  # why the policy no longer acts (see hold())
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ intake
    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(s.level for s in self.stages)

    def on_exit(self, now: float, message: ExitMessage) -> None:
        """A finished request: its end-to-end latency and per-stage busy times."""
        latency = message.causal_latency_s()
        self.counts["exits"] += 1
        self.latencies.append(latency)
        self.observed.add(now, latency)
        self.arrivals.on_exit(now)
        if self.reactive is not None:
            self.reactive.observe(now, latency)
        for hop in message.stages:
            stage = hop.stage
            if stage < self.n_stages:
                self.stages[stage].slowdown.add_hop(now, hop.level, hop.compute_s)
            else:
                self._warn_once(
                    f"hop-stage-{stage}",
                    "exit reports stage %d; the calibration has %d stages",
                    stage,
                    self.n_stages,
                )

    def on_metrics(self, now: float, message: MetricsMessage, *, node: str | None = None) -> None:
        """A node's periodic metrics: queue depth, service time, level, counters; the node is
        heard. ``node``: the writer named by the topic (the service passes it); by default the
        message's field."""
        node = node or message.node
        stage, level = message.stage, message.level
        self.nodes.heard(node, now)
        info = self.nodes.info(node, now)
        changes = message.level_changes
        if info.metrics_at is None or level != info.level or changes != info.level_changes:
            info.level_stable_since = now
        info.level, info.level_changes, info.metrics_at = level, changes, now
        if stage is None:
            return
        info.stage = stage
        if not stage < self.n_stages:
            self._warn_once(
                f"metrics-stage-{stage}",
                "node %s serves stage %d; the calibration has %d stages",
                node,
                stage,
                self.n_stages,
            )
            return
        st = self.stages[stage]
        st.node, st.metrics_at = node, now
        st.queue_depth = float(message.queue_depth)
        service = message.service_s
        if (
            service is not None
            and level is not None
            and now - info.level_stable_since >= self.config.slowdown_window_s
        ):
            st.slowdown.add_metrics(now, level, service)
        self._backlog_throughput(now, info, st, message)
        self._check_placement(node, stage, message)
        if stage == 0:
            self.arrivals.on_stage0_metrics(now, node, message.received)

    def _backlog_throughput(
        self, now: float, info: NodeInfo, st: StageState, message: MetricsMessage
    ) -> None:
        """A cycle-time sample when the node stayed backlogged (queue >= 2 at both reports)
        at one level since its previous report; times from the node's own clock."""
        processed, t = message.processed, message.ts
        previous, queue = info.last_report, st.queue_depth
        if queue is None:
            return
        info.last_report = (t, processed, queue)
        # the level changed with this report (or it is the first one): no clean interval
        if previous is None or info.level is None or info.level_stable_since >= now:
            return
        t0, processed0, queue0 = previous
        done, dt = processed - processed0, t - t0
        if done > 0 and dt > 0 and queue >= 2 and queue0 >= 2:
            st.slowdown.add_busy(now, info.level, dt, done)

    def _check_placement(self, node: str, stage: int, message: MetricsMessage) -> None:
        s = self.calibration.slices[stage]
        bounds = message.bounds
        if bounds is not None and bounds != (s.start, s.end):
            self._warn_once(
                f"bounds-{node}-{bounds}",
                "node %s runs blocks %s for stage %d but "
                "the calibration is for [%d, %d): stale calibration?",
                node,
                list(bounds),
                stage,
                s.start,
                s.end,
            )
        level, ratio = message.level, message.ratio
        if (
            level is not None
            and ratio is not None
            and level < len(self.ratios)
            and abs(self.ratios[level] - ratio) > 1e-6
        ):
            self._warn_once(
                f"ratios-{node}",
                "node %s has ratio %.3f at level %d, the calibration %.3f: the level sets differ",
                node,
                ratio,
                level,
                self.ratios[level],
            )

    def on_status(
        self, now: float, message: StatusMessage, *, node: str | None = None
    ) -> NodeEvent | None:
        """A node's status (online, or offline from its Last Will or shutdown). ``node``: the
        writer named by the topic (the service passes it); by default the message's field."""
        event = self.nodes.on_status(now, node or message.node, message)
        if event is not None:
            self.events.append(event)
        return event

    def on_level(self, now: float, stage: int, message: LevelMessage | None) -> bool:
        """A retained ``control/stage/<i>`` message (None: cleared). Adopts a level set by
        someone else (a previous controller, an operator); ignores the echo of our own and
        anything older than what we applied. Returns whether the level changed.

        Raises:
            CodecError: a level the calibration does not have.
        """
        if not 0 <= stage < self.n_stages:
            return False
        level, seq = 0, None
        if message is not None:
            level, seq = message.level_of(len(self.ratios)), message.seq
        st = self.stages[stage]
        if seq is not None:
            self.seq = max(self.seq, seq)
            if st.seq is not None and seq < st.seq:
                return False
        st.seq = seq
        if level == st.level:
            return False
        self._set_level(now, stage, level)
        return True

    # ------------------------------------------------------------------ deciding
    def refresh(self, now: float) -> None:
        """Advance the live estimates to ``now`` (called by :meth:`decide`)."""
        for st in self.stages:
            st.slowdown.update(now)
        self.observed.prune(now)

    def plan_inputs(self, now: float) -> PlanInputs:
        rate, _ = self.arrivals.rate(now)
        return PlanInputs(
            fits=tuple(s.fit for s in self.calibration.slices),
            accuracy=self.calibration.accuracy_fit,
            a_min=self.config.a_min,
            ratios=self.ratios,
            slowdowns=tuple(st.slowdown.value for st in self.stages),
            current=self.levels,
            rate=rate,
            rho_target=self.config.rho_target,
            objective=self.config.objective,
            rho_low=self.config.rho_low,
            rho_restore=self.config.rho_low if self.spec.kind == "proactive" else None,
        )

    def decide(self, now: float, *, wall: float | None = None) -> ControlDecision | None:
        """Run the policy at ``now``; apply and return its decision, if any. ``wall`` is the
        epoch time recorded in the decision."""
        self.refresh(now)
        if self.held is not None:
            return None  # the calibration no longer describes the pipeline
        inputs = self.plan_inputs(now)
        if self.spec.kind == "static" or self.oracle is not None:
            fixed = self._fixed_plan(now, wall, inputs)
            return None if fixed is None else self._apply(now, wall, inputs, *fixed)
        prune, restore = plan_prune(inputs), plan_restore(inputs)
        action: Action | None
        if self.reactive is not None:
            action = self.reactive.decide(
                now, can_prune=prune is not None, can_restore=restore is not None
            )
        elif self.proactive is not None:
            for st in self.stages:
                if st.metrics_at is not None and st.queue_depth is not None:
                    self.proactive.observe_stage(
                        st.metrics_at, st.index, st.queue_depth, st.slowdown.live_s(st.level)
                    )
            action = self.proactive.decide(
                now,
                restore_service_s=restore.predicted.stage_s if restore else None,
                can_prune=prune is not None,
                can_restore=restore is not None,
            )
        else:
            return None
        plan = prune if action is not None and action.kind is ActionKind.PRUNE else restore
        if action is None or plan is None:
            return None
        return self._apply(now, wall, inputs, action, plan)

    def _fixed_plan(
        self, now: float, wall: float | None, inputs: PlanInputs
    ) -> tuple[Action, LevelChange] | None:
        """``static:<level>`` holds every stage at its level (``static:0`` only observes, so
        that it never fights a level set by an operator or a failover re-plan); the oracle
        follows its schedule."""
        if self.oracle is not None:
            if wall is None:
                return None
            live = [
                None if st.slowdown.source == "prior" else st.slowdown.value for st in self.stages
            ]
            self.oracle.observe(wall, inputs.current, live)
            return self.oracle.decide(now, wall, inputs.current)
        level = self.spec.level
        target = (level,) * self.n_stages
        if level == 0 or inputs.current == target:
            return None
        up = any(new > old for new, old in zip(target, inputs.current, strict=True))
        action = Action(
            kind=ActionKind.PRUNE if up else ActionKind.RESTORE,
            at=now,
            reason=f"{self.spec.name}: every stage held at level {level}",
            latency_s=math.nan,
            samples=0,
            since=now,
        )
        return action, LevelChange(target, evaluate(inputs, target), None, "static")

    def _apply(
        self, now: float, wall: float | None, inputs: PlanInputs, action: Action, plan: LevelChange
    ) -> ControlDecision:
        self.seq += 1
        decision = ControlDecision(
            seq=self.seq,
            at=now,
            ts=wall,
            policy=self.spec.name,
            objective=self.config.objective,
            action=action,
            plan=plan,
            levels_before=inputs.current,
            ratios=self.ratios,
            inputs=self._inputs(now, inputs),
        )
        for i in decision.changed:
            self._set_level(now, i, plan.levels[i])
            self.stages[i].seq = self.seq
        self.decisions.append(decision)
        self.counts[action.kind.value] += 1
        return decision

    def hold(self, reason: str) -> None:
        """Stop pruning and restoring (observe only) from now on: e.g. a failover re-plan
        moved the slice bounds, so the calibrated per-slice curves describe slices that no
        longer exist. Calibrate the new partition and restart the controller to resume."""
        if self.held is None:
            self.held = reason
            log.warning("controller policy on hold: %s", reason)

    def _inputs(self, now: float, inputs: PlanInputs) -> dict[str, Any]:
        rate, source = self.arrivals.rate(now)
        q = self.config.quantile
        return {
            "slo_s": self.config.slo_s,
            "a_min": self.config.a_min,
            "window": {
                "quantile": q,
                "latency_s": self.observed.quantile(q),
                "samples": self.observed.count,
                "window_s": self.observed.window_s,
            },
            "arrival": {"rate": rate, "source": source},
            "stages": [self._stage_view(st) for st in self.stages],
        }

    def _stage_view(self, st: StageState) -> dict[str, Any]:
        sd = st.slowdown
        return {
            "stage": st.index,
            "node": st.node,
            "level": st.level,
            "service_s": sd.live_s(st.level),
            "calibrated_s": sd.calibrated_s(st.level),
            "slowdown": sd.value,
            "slowdown_source": sd.source,
            "queue_depth": st.queue_depth,
        }

    def _set_level(self, now: float, stage: int, level: int) -> None:
        st = self.stages[stage]
        st.time_at_level[st.level] += max(0.0, now - st.level_since)
        st.level, st.level_since = level, now

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------------ reporting
    def snapshot(self, now: float) -> dict[str, Any]:
        """What the controller sees now (for the status log and the report)."""
        rate, source = self.arrivals.rate(now)
        q = self.config.quantile
        return _finite(
            {
                "levels": list(self.levels),
                "latency_quantile_s": self.observed.quantile(q),
                "samples": self.observed.count,
                "arrival_rate": rate,
                "arrival_source": source,
                "stages": [self._stage_view(st) for st in self.stages],
                "nodes": {n.node: n.state for n in self.nodes.values()},
            }
        )

    def report(self, now: float) -> dict[str, Any]:
        """A JSON summary: decisions, time at each level per stage, counts, latency."""
        time_at: dict[str, dict[str, float]] = {}
        for st in self.stages:
            spent = list(st.time_at_level)
            spent[st.level] += max(0.0, now - st.level_since)
            time_at[str(st.index)] = {str(lv): t for lv, t in enumerate(spent) if t > 0}
        lat = np.asarray(self.latencies, dtype=np.float64)
        return _finite(
            {
                "kind": "controller-report",
                "duration_s": now - self.started,
                "config": self.config.to_dict(),
                "calibration": {
                    "model_hash": self.calibration.model_hash,
                    "plan_hash": self.calibration.plan_hash,
                    "ratios": list(self.ratios),
                },
                "counts": {
                    "prune": self.counts["prune"],
                    "restore": self.counts["restore"],
                    "exits": self.counts["exits"],
                    "decisions": len(self.decisions),
                },
                "latency": {
                    "count": int(lat.size),
                    "p50_s": float(np.percentile(lat, 50)) if lat.size else None,
                    "p95_s": float(np.percentile(lat, 95)) if lat.size else None,
                },
                "time_at_level_s": time_at,
                "final_levels": list(self.levels),
                "held": self.held,
                "node_events": [e.to_dict() for e in self.events],
                "decisions": [d.to_dict() for d in self.decisions],
            }
        )
