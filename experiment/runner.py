"""Run an experiment: broker, nodes, controller and camera as separate processes, one policy at
a time, and the reports and plots of what happened.

One run of one policy (:meth:`ExperimentRunner.run_policy`):

1. a fresh Mosquitto (in its own process group, on a free port) and the harness's
   :class:`~bus.observer.Recorder`, subscribed before anything else starts;
2. the shared clock: ``clock_start = launch + startup budget``. Every node gets it as
   ``--clock-start``, so its slowdown windows count from it, and the camera is launched so that
   its replay starts at that instant (its real start is measured and reported);
3. ``edgeprune node`` per slice (``--threads``, constant and transient slowdowns, an unbounded
   queue so that nothing is shed), optional CPU hogs (``python -m nodes.hog``), and
   ``edgeprune controller --policy P`` with the experiment's ``[controller]`` table; the run
   waits until every node is online (retained status) and the controller has connected;
4. ``edgeprune camera --json`` replays the trace; a status line per second shows progress;
5. when the camera has every result, the controller (which writes its own report), the nodes
   and the broker are stopped, whatever happened (also on Ctrl-C, SIGTERM, or a failure), and
   no process may survive in their process groups.

The start-up budget grows when a previous run needed more (start-up time varies with load).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from broker.launcher import MosquittoBroker
from bus.connection import MqttSettings
from bus.messages import MetricsMessage, StatusMessage
from bus.observer import Events, Recorder, wait_until
from bus.topics import Topics
from controller.config import parse_policy
from controller.core import ControllerState
from controller.oracle import OracleSchedule
from experiment.calibration import CalibrationInfo, ensure_calibration, load_model
from experiment.config import ExperimentConfig, NodeSpec, resolve_blocks
from experiment.launcher import (
    Child,
    ExperimentError,
    ProcessGroup,
    signals_as_interrupt,
)
from experiment.monitor import LiveStatus
from experiment.oracle import oracle_schedule
from experiment.report import RunReport, build_report, file_tag
from pipeline.calibration import Calibration

log = logging.getLogger(__name__)

_QUEUE_SIZE = 1_000_000  # nodes never shed in an experiment: overload shows as latency


@dataclass
class RunOutcome:
    """One finished run: its report, its recorded messages and its clock."""

    report: RunReport
    events: Events
    clock_start: float
    run_dir: Path


@dataclass
class _Adaptive:
    """Start-up timings learnt from the previous run."""

    startup_s: float = 30.0
    camera_lead_s: float = 0.1  # the delayed camera: loading images and connecting
    history: list[dict[str, float]] = field(default_factory=list)


class ExperimentRunner:
    """Runs one :class:`ExperimentConfig` for one or several policies into ``out_dir``."""

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir: Path,
        *,
        data_dir: Path,
        progress: bool = True,
        stream: IO[str] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.data_dir = Path(data_dir)
        self.progress = progress
        self.stream = stream or sys.stderr
        # children log at INFO at least: their logs are the post-mortem
        self.log_level = "DEBUG" if log_level.upper() == "DEBUG" else "INFO"
        self.ckpt = load_model(config)
        self.config = resolve_blocks(config, self.ckpt.build().num_blocks)
        self.calibration: CalibrationInfo | None = None
        self._adaptive = _Adaptive(startup_s=config.startup_budget_s)

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> CalibrationInfo:
        """Reuse or measure the calibration (once per runner)."""
        if self.calibration is None:
            self.calibration = ensure_calibration(
                self.config, self.ckpt, self.data_dir, progress=self.progress
            )
        return self.calibration

    def expected_schedule(self) -> list[float]:
        """The camera's send times (s after its start), as the camera computes them."""
        from traces.format import load_traces
        from traces.replay import replay_schedule

        tr = self.config.trace
        return [
            s.send_at_s
            for s in replay_schedule(
                load_traces(list(tr.names)),
                compression=tr.compression,
                max_idle_s=tr.max_idle_s,
                window=tr.window,
                max_images=tr.max_images,
            )
        ]

    def _say(self, text: str) -> None:
        if self.progress:
            self.stream.write(text + "\n")
            self.stream.flush()

    # ------------------------------------------------------------------ one run
    def run_policy(self, policy: str, tag: str | None = None) -> RunOutcome:
        """Run the scenario once with ``policy`` (files under ``out_dir/<tag or policy>``);
        processes are always cleaned up."""
        cal = self.prepare()
        run_dir = self.out_dir / file_tag(tag or policy)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "controller.toml").write_text(self.config.controller_toml(policy))
        broker = MosquittoBroker(port=None, run_dir=run_dir / "broker")
        group = ProcessGroup(run_dir / "logs")
        with signals_as_interrupt():
            try:
                broker.start()
                outcome = asyncio.run(self._run(policy, cal, broker, group, run_dir))
            finally:
                group.stop_all()
                broker.stop()
                survivors = group.survivors()
                if survivors:
                    log.error("processes survived the run (killing them): %s", survivors)
                    for pid in survivors:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
        outcome.report.checks["orphans"] = survivors
        return outcome

    async def _run(
        self,
        policy: str,
        cal: CalibrationInfo,
        broker: MosquittoBroker,
        group: ProcessGroup,
        run_dir: Path,
    ) -> RunOutcome:
        cfg = self.config
        mqtt = MqttSettings(host=broker.host, port=broker.port)
        pipe = cfg.name
        recorder = Recorder(mqtt, pipe, run_dir / "events.jsonl")
        schedule = self.expected_schedule()
        if not schedule:
            raise ExperimentError("the trace window holds no images: widen [trace] window")
        async with recorder.running():
            launch = time.time()
            clock_start = launch + self._adaptive.startup_s
            oracle = self._oracle_file(policy, schedule, clock_start, run_dir)
            for node in cfg.nodes:
                cpu = self._cpu_of(node)
                group.start(node.name, self._node_args(node, clock_start, mqtt, pipe), cpu=cpu)
                if node.hog_windows:
                    group.start(
                        f"hog-{node.name}",
                        self._hog_args(node, clock_start, cpu),
                        module="nodes.hog",
                        expect_exit=True,
                        cpu=cpu,
                    )
            controller = group.start(
                "controller", self._controller_args(policy, cal.path, run_dir, mqtt, pipe, oracle)
            )
            first_levels = self._first_levels(policy, cal.path, oracle)
            lead = self._adaptive.camera_lead_s
            camera_at = clock_start - lead
            camera = (
                self._start_camera(group, run_dir, mqtt, pipe, camera_at)
                if camera_at - time.time() > 2.0
                else None
            )
            self._say(
                f"[{policy}] starting {len(cfg.nodes)} nodes, the controller and the "
                f"camera (building every pruning level takes a while)..."
            )
            # everything must be up (and warm) before the camera's first send; otherwise the
            # camera is stopped before it starts and relaunched late (and that is reported)
            in_time = camera is not None and await _until(
                lambda: self._nodes_online(recorder),
                max(0.0, camera_at - 1.0 - time.time()),
                "every node",
                group,
                fail=False,
            )
            if in_time:
                in_time = await _until(
                    lambda: _controller_online(recorder, pipe),
                    max(0.0, camera_at - 1.0 - time.time()),
                    "the controller",
                    group,
                    fail=False,
                )
            if in_time and first_levels is not None:
                in_time = await _until(
                    lambda: self._levels_applied(recorder, first_levels),
                    max(0.0, camera_at - 1.0 - time.time()),
                    f"the nodes to apply the levels {list(first_levels)}",
                    group,
                    fail=False,
                )
            if in_time and cfg.warmup_images:
                await self._warm_up(group, recorder, mqtt, pipe)
                in_time = time.time() < camera_at - 0.3
            ready_s = time.time() - launch
            if not in_time:
                if camera is not None:
                    group.stop(camera, timeout=2.0)
                    recorder.reset()
                await _until(
                    lambda: self._nodes_online(recorder),
                    cfg.startup_timeout_s,
                    "every node to come online",
                    group,
                )
                await _until(
                    lambda: _controller_online(recorder, pipe),
                    cfg.startup_timeout_s,
                    "the controller to connect",
                    group,
                )
                if first_levels is not None:
                    await _until(
                        lambda: self._levels_applied(recorder, first_levels),
                        cfg.startup_timeout_s,
                        f"the nodes to apply the levels {list(first_levels)}",
                        group,
                    )
                if cfg.warmup_images:
                    await self._warm_up(group, recorder, mqtt, pipe)
                ready_s = time.time() - launch
                log.warning(
                    "start-up took %.1f s, more than the %.1f s budget: the trace "
                    "starts late against the slowdown windows (see camera_offset_s)",
                    ready_s,
                    clock_start - launch,
                )
                camera_at = time.time() + 1.0
                camera = self._start_camera(
                    group, run_dir, mqtt, pipe, camera_at, name="camera-late"
                )
            else:
                self._say(
                    f"[{policy}] ready in {ready_s:.1f} s; the trace starts in "
                    f"{clock_start - time.time():.1f} s on the shared clock"
                )
            if camera is None:  # unreachable: both branches above start one
                raise ExperimentError("the camera was not started")
            status = LiveStatus(
                recorder, cfg.nodes, cfg.slo_ms, label=f"[{policy}] ", stream=self.stream
            )
            status.clock_start, status.expected = clock_start, len(schedule)
            ticker = asyncio.create_task(status.run()) if self.progress else None
            try:
                budget = camera_at - time.time() + schedule[-1] + cfg.trace.drain_s + 90.0
                await _until(
                    lambda: camera.proc.poll() is not None, budget, "the camera to finish", group
                )
                results = recorder.completed()
                await _until(
                    lambda: len({e["request_id"] for e in recorder.events["exit"]}) >= results,
                    10.0,
                    "the last exits",
                    group,
                    fail=False,
                )
            finally:
                if ticker is not None:
                    ticker.cancel()
                    await asyncio.gather(ticker, return_exceptions=True)
            group.stop(controller)
        camera_summary = _read_json(run_dir / "camera.json")
        controller_report = _read_json(run_dir / "controller-report.json")
        offset, camera_t0 = _camera_offset(recorder.events, schedule, clock_start)
        timing = {
            "clock_start": clock_start,
            "launch": launch,
            "nodes_ready_s": ready_s,
            "startup_budget_s": clock_start - launch,
            "camera_offset_s": offset,
            "camera_startup_s": camera_t0 - camera_at if camera_t0 else None,
            "camera_exit_code": camera.proc.returncode,
        }
        self._learn(ready_s, timing["camera_startup_s"])
        report = build_report(
            cfg,
            policy,
            recorder.events,
            clock_start=clock_start,
            timing=timing,
            camera=camera_summary,
            controller=controller_report,
            files={"events": str(run_dir / "events.jsonl"), "logs": str(run_dir / "logs")},
        )
        report.config["calibration_info"] = cal.to_dict()
        return RunOutcome(report, recorder.events, clock_start, run_dir)

    async def _warm_up(
        self, group: ProcessGroup, recorder: Recorder, mqtt: MqttSettings, pipe: str
    ) -> None:
        """A few images through the whole pipeline before the clock starts (the first
        inference of a fresh process is slow), published by the harness itself, then
        forgotten by the recorder."""
        import numpy as np

        from bus.session import Session
        from nodes.camera import encode_image, load_source
        from pipeline import codec

        n = self.config.warmup_images
        source = load_source("animal-mnist", self.data_dir, "test")
        rng = np.random.default_rng(self.config.seed)
        async with Session(mqtt, name="warm-up") as session:
            await session.wait_connected(10.0)
            acks = []
            for k, i in enumerate(rng.integers(0, len(source), n)):
                image, _ = encode_image(source.images[int(i)], "png")
                now = time.time()
                msg = codec.StageMessage(
                    request_id=f"warmup-{k:04d}",
                    camera="warmup",
                    stage=0,
                    entry_ts=now,
                    capture_ts=now,
                    label=source.label(int(i)),
                    image=image,
                    image_format="png",
                )
                acks.append(
                    session.publish(
                        Topics(pipe).camera_stage(msg.camera), codec.encode_stage(msg), qos=1
                    )
                )
            await asyncio.gather(*acks)
        await _until(
            lambda: len(recorder.events["exit"]) >= n, 60.0, "the warm-up exits", group, fail=False
        )
        recorder.reset()

    def _start_camera(
        self,
        group: ProcessGroup,
        run_dir: Path,
        mqtt: MqttSettings,
        pipe: str,
        at: float,
        name: str = "camera",
    ) -> Child:
        """The camera, launched now (imports take seconds) and replaying from ``at``."""
        return group.start(
            name,
            ["--at", f"{at:.6f}", "--", *self._camera_args(mqtt, pipe)],
            module="experiment.start_at",
            stdout_path=run_dir / "camera.json",
            expect_exit=True,
        )

    def _learn(self, ready_s: float, camera_startup_s: float | None) -> None:
        a = self._adaptive
        a.history.append({"ready_s": ready_s, "camera_startup_s": camera_startup_s or math.nan})
        a.startup_s = startup_budget(
            self.config.startup_budget_s, [h["ready_s"] for h in a.history]
        )

    # ------------------------------------------------------------------ arguments
    def _cpu_of(self, node: NodeSpec) -> int | None:
        if not self.config.pin_cpus:
            return None
        return node.stage % (os.cpu_count() or 1)

    def _common(self, mqtt: MqttSettings, pipe: str) -> list[str]:
        return ["--host", mqtt.host, "--port", str(mqtt.port), "--pipe", pipe]

    def _node_args(
        self, node: NodeSpec, clock_start: float, mqtt: MqttSettings, pipe: str
    ) -> list[str]:
        cfg = self.config
        args = [
            "--log-level",
            self.log_level,
            "node",
            "--node-id",
            node.name,
            "--stage",
            str(node.stage),
            "--start",
            str(node.start),
            "--end",
            str(node.end),
            "--threads",
            str(cfg.threads),
            "--queue-size",
            str(_QUEUE_SIZE),
            "--metrics-interval",
            f"{cfg.metrics_interval_s:g}",
            "--clock-start",
            f"{clock_start:.6f}",
            *self._common(mqtt, pipe),
        ]
        if cfg.checkpoint:
            args += ["--checkpoint", str(cfg.checkpoint)]
        if cfg.ratios:
            args += ["--ratios", ",".join(f"{r:g}" for r in cfg.ratios)]
        emu = node.emulation
        if emu.factor != 1.0:
            args += ["--slowdown", f"{emu.factor:g}"]
        for w in emu.windows:
            args += ["--slow-window", f"{w.start_s:g}:{w.end_s:g}:{w.factor:g}"]
        return args

    def _hog_args(self, node: NodeSpec, clock_start: float, cpu: int | None) -> list[str]:
        args = ["--clock-start", f"{clock_start:.6f}"]
        for a, b in node.hog_windows:
            args += ["--window", f"{a:g}:{b:g}"]
        if cpu is not None:
            args += ["--cpu", str(cpu)]
        return args

    def _oracle_file(
        self, policy: str, schedule: list[float], clock_start: float, run_dir: Path
    ) -> Path | None:
        """The oracle's schedule for this run (None for the other policies)."""
        if parse_policy(policy).kind != "oracle":
            return None
        known = oracle_schedule(self.config, schedule, clock_start)
        for segment in known.segments:
            log.info("oracle knows: %s", segment.describe())
        return known.save(run_dir / "oracle-schedule.json")

    def _first_levels(
        self, policy: str, calibration: Path, oracle: Path | None
    ) -> tuple[int, ...] | None:
        """The levels the controller sets before the trace starts (``static:<level>``, and
        the oracle's first segment), which the nodes must have applied before the camera's
        first send; None when it sets none (level 0 everywhere)."""
        spec = parse_policy(policy)
        n = len(self.config.nodes)
        levels: tuple[int, ...] = (0,) * n
        if spec.kind == "static":
            levels = (spec.level,) * n
        elif oracle is not None:
            state = ControllerState(
                self.config.controller_config(policy),
                Calibration.load(calibration),
                now=0.0,
                oracle_schedule=OracleSchedule.load(oracle),
            )
            if state.oracle is not None:
                levels = tuple(state.oracle.plans[0].levels)
        return levels if any(levels) else None

    def _levels_applied(self, recorder: Recorder, levels: tuple[int, ...]) -> bool:
        """Every node's latest metrics report the level of its stage."""
        latest: dict[str, int | None] = {}
        for body in recorder.events["metrics"]:
            metrics = MetricsMessage.from_body(body)
            latest[metrics.node] = metrics.level
        return all(latest.get(n.name) == levels[n.stage] for n in self.config.nodes)

    def _controller_args(
        self,
        policy: str,
        calibration: Path,
        run_dir: Path,
        mqtt: MqttSettings,
        pipe: str,
        oracle: Path | None = None,
    ) -> list[str]:
        extra = [] if oracle is None else ["--oracle-schedule", str(oracle)]
        return [
            "--log-level",
            self.log_level,
            "controller",
            *extra,
            "--calibration",
            str(calibration),
            "--config",
            str(run_dir / "controller.toml"),
            "--policy",
            policy,
            "--report",
            str(run_dir / "controller-report.json"),
            *self._common(mqtt, pipe),
        ]

    def _camera_args(self, mqtt: MqttSettings, pipe: str) -> list[str]:
        return [
            "--log-level",
            self.log_level,
            "camera",
            "--dataset",
            "animal-mnist",
            "--split",
            "test",
            "--data-dir",
            str(self.data_dir),
            "--seed",
            str(self.config.seed),
            *self.config.trace.camera_args(),
            "--json",
            *self._common(mqtt, pipe),
        ]

    def _nodes_online(self, recorder: Recorder) -> bool:
        statuses = [StatusMessage.from_body(body) for body in recorder.events["status"]]
        online = {s.node for s in statuses if s.online}
        return all(n.name in online for n in self.config.nodes)


def startup_budget(configured_s: float, ready_s: Sequence[float], recent: int = 3) -> float:
    """The start-up budget of the next run: a wide margin over the SLOWEST of the last
    ``recent`` start-ups, never below the configured one. Start-up time swings by 2-3x with
    the machine's load (16 s, then 38 s, on one busy evening); following only the last one
    made a fast start-up shrink the budget just before a slow one, whose replay then started
    late and had to be run again."""
    if not ready_s:
        return configured_s
    return max(configured_s, max(ready_s[-recent:]) * 1.3 + 5.0)


def _camera_offset(
    events: Events, schedule: list[float], clock_start: float
) -> tuple[float | None, float | None]:
    """(camera replay start - clock start, camera replay start epoch) from the first sends: a
    request id ends with its index in the schedule, and a send is never early."""
    starts = []
    for s in events["send"][:50]:
        try:
            seq = int(str(s["request_id"]).rsplit("-", 1)[1])
        except (ValueError, IndexError):
            continue
        if 0 <= seq < len(schedule) and s.get("attempt", 0) == 0:
            starts.append(float(s["entry_ts"]) - schedule[seq])
    if not starts:
        return None, None
    t0 = min(starts)
    return t0 - clock_start, t0


async def _until(
    predicate: Any,
    timeout: float,
    what: str,
    group: ProcessGroup,
    *,
    fail: bool = True,
    poll_s: float = 0.05,
) -> bool:
    """Wait for ``predicate()``; a child dying meanwhile raises. Past ``timeout``: an
    :class:`ExperimentError`, or with ``fail=False`` a warning and False."""
    try:
        await wait_until(predicate, timeout, what, check=group.check_alive, poll_s=poll_s)
    except TimeoutError as exc:
        if fail:
            raise ExperimentError(str(exc)) from exc
        log.warning("%s", exc)
        return False
    return True


def _controller_online(recorder: Recorder, pipe: str) -> bool:
    """Whether the controller's retained status (``control/status``) last said online: it
    says so once it is connected and subscribed, and offline when it leaves or is lost."""
    topic = Topics(pipe).controller_status
    states = [s.get("state") for s in recorder.events["status"] if s.get("topic") == topic]
    return bool(states) and states[-1] == "online"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
