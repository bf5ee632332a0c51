"""`edgeprune bench hop`: what one MQTT hop costs next to the compute it carries, and how close
a saturated pipeline gets to its compute bound.

(a) Per-hop overhead: float32 stage messages of each size go from a publisher to a subscriber
(a publisher and an observer, QoS 1) through a real Mosquitto that the bench starts on a free port,
one in flight at a time. Timed with perf_counter from before ``encode_stage`` to after
``decode_stage``; median and p95 over ``--messages`` messages after a warm-up. The sizes are
``--sizes`` plus the real boundary tensors of the model; each is compared with the compute
time (one thread) of the block of the model whose output is closest in size.

(b) Saturated throughput: a 2-stage pipeline of real slice nodes (``--nodes process``: each an
``edgeprune node`` process; ``inproc``: SliceNode tasks in this process; ``both``: one run of
each), threads=1 each, fed by a camera that queues ``--images`` PNGs as fast as it can.
Steady-state results/s (between the 10th and 90th percentile of result arrivals) is compared
with the bound 1 / max(stage compute time), the compute times being the medians the nodes
report in their metrics (``compute_s``: decoding the input and running the slice) during the
same run. Also reported: the bound from the nodes' ``service_s`` (compute plus the hand-off
to and from the worker thread), the bound from an isolated one-thread measurement of each
stage, and the CPU time per request of every process (nodes, broker, this one) from /proc.

With the default model (2 ms stages) each message's ~1 ms of overhead is a large share of the
work; ``--checkpoint`` with a larger model (e.g. ``edgeprune train --model resnet18-cifar``,
then ``--cuts 6``) shows the pipeline with stages of ~10 ms.

Writes ``--out``.json and ``--out``.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.codec import _parse_sizes, _size_bytes
from bench.goals import BenchReport, Goal, GoalSpec
from bus.observer import wait_until
from edgeprune.commands._common import (
    add_checkpoint,
    add_data_dir,
    add_json,
    data_dir,
    format_table,
)

if TYPE_CHECKING:
    from bus.messages import MetricsMessage
    from bus.observer import Observed
    from bus.topics import Topics

log = logging.getLogger(__name__)

DEFAULT_SIZES = ("16KB", "200KB", "800KB")
HOP_GOAL_MS = 1.0  # p50 at 200 KB on loopback
THROUGHPUT_GOAL = 0.9  # of the compute bound
GOALS = (
    GoalSpec("hop_p50_ms_200KB", "<=", HOP_GOAL_MS),
    GoalSpec("throughput_fraction_of_bound", ">=", THROUGHPUT_GOAL),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "hop",
        help="MQTT hop overhead vs slice compute; saturated throughput vs its bound",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=list(DEFAULT_SIZES),
        help="float32 tensor sizes for (a), KB = 1024 B (default 16KB,200KB,800KB)",
    )
    parser.add_argument("--messages", type=int, default=200, help="timed messages per size")
    parser.add_argument("--images", type=int, default=400, help="images queued for (b)")
    parser.add_argument("--cuts", default="3", help="cut point(s) of the pipeline in (b)")
    parser.add_argument(
        "--nodes",
        choices=["process", "inproc", "both"],
        default="process",
        help="slice nodes as processes, as tasks of this process, or both",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="run (a) only")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench/hop"),
        help="output prefix: writes PREFIX.json and PREFIX.png",
    )
    add_checkpoint(parser)
    add_data_dir(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _pctl(xs: list[float]) -> tuple[float, float]:
    """(median, p95) in milliseconds."""
    return statistics.median(xs) * 1e3, statistics.quantiles(xs, n=20, method="inclusive")[-1] * 1e3


# --- compute: every block of the model, and each stage of the pipeline, on one thread ------


def measure_compute(ckpt: Any, cuts: str, repeats: int = 200) -> dict[str, Any]:
    """Per block: output bytes and compute ms; per stage of ``cuts``: what a node's worker does
    per request (decode the wire message's input, run the slice) in ms."""
    import numpy as np
    import torch

    from nodes.camera import encode_image
    from nodes.stage_input import image_to_tensor, tensor_from_message
    from pipeline import codec
    from pipeline.placement import SliceBounds
    from pipeline.reference import build_prunable
    from pipeline.slicing import ModelSlice, parse_cuts

    torch.set_num_threads(1)
    model = ckpt.build().eval()
    blocks = []
    for i, name in enumerate(model.block_names()):
        ms = ModelSlice(model, SliceBounds(i, i + 1)).eval()
        x = torch.zeros(1, *ms.in_shape)
        with torch.no_grad():
            p50, _ = _time(lambda ms=ms, x=x: ms(x), repeats)
        blocks.append(
            {
                "block": i,
                "name": name,
                "out_shape": list(ms.out_shape),
                "out_bytes": 4 * int(np.prod(ms.out_shape)),
                "compute_ms": p50,
            }
        )
    image = encode_image(np.full((ckpt.config.input_size,) * 2, 128, np.uint8), "png")[0]
    stages = []
    x_in: Any = None
    for i, b in enumerate(parse_cuts(cuts, model.num_blocks)):
        s = build_prunable(ckpt, b, ratios=(0.0,), recalibrate_bn=False, model=model)
        if i == 0:
            msg = codec.StageMessage("r", "c", 0, 1.0, 1.0, image=image, image_format="png")
            fn: Any = lambda s=s, m=msg: s(image_to_tensor(m, ckpt.preprocess))  # noqa: E731
        else:
            msg = codec.decode_stage(
                codec.encode_stage(
                    codec.StageMessage("r", "c", i, 1.0, 1.0, tensor=x_in.tensor.numpy())
                )
            )
            fn = lambda s=s, m=msg: s(*tensor_from_message(m, s.model_slice.in_shape))  # noqa: E731
        x_in = fn()
        stages.append({"stage": i, "blocks": [b.start, b.end], "compute_ms": _time(fn, repeats)[0]})
    return {"blocks": blocks, "stages": stages}


def _time(fn: Any, repeats: int, rounds: int = 5) -> tuple[float, float]:
    """(median, p95) ms of ``fn`` after a warm-up: of the round (``repeats / rounds`` calls)
    with the lowest median, so that a burst of load from other processes does not count."""
    for _ in range(max(10, repeats // 10)):
        fn()
    results = []
    for _ in range(rounds):
        out = []
        for _ in range(max(2, repeats // rounds)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        results.append(_pctl(out))
    return min(results)


# --- (a) one hop through the broker --------------------------------------------------------


async def measure_hops(mqtt: Any, sizes: list[int], messages: int) -> list[dict[str, Any]]:
    """Encode -> publish (QoS 1) -> broker -> subscriber -> decode, one message in flight."""
    import numpy as np

    from bus.observer import Observer
    from bus.session import Session
    from bus.topics import Topics
    from pipeline import codec

    topic = Topics(f"bench-{uuid.uuid4().hex[:8]}").stage(1)
    rows = []
    arrived: asyncio.Queue[tuple[float, float]] = asyncio.Queue()

    def on_message(m: Observed) -> None:
        t = time.perf_counter()
        codec.decode_stage(m.payload)
        arrived.put_nowait((t, time.perf_counter()))

    async with (
        Observer(mqtt, [(topic, 1)], on_message).running(),
        Session(mqtt, name="bench-hop") as pub,
    ):
        await pub.wait_connected(20.0)
        for nbytes in sizes:
            x = np.random.default_rng(0).standard_normal((1, nbytes // 4), np.float32)
            msg = codec.StageMessage(
                "cam0-bench-000001",
                "cam0",
                1,
                1.7e9,
                1.7e9,
                hops=(codec.Hop(0, "n0", 0.001, 0.002, 0),),
                tensor=x,
            )
            total, enc, dec = [], [], []
            for i in range(messages + max(20, messages // 10)):
                t0 = time.perf_counter()
                payload = codec.encode_stage(msg)
                t1 = time.perf_counter()
                await pub.publish_now(topic, payload, qos=1)  # no outbox: the bare hop
                got, done = await asyncio.wait_for(arrived.get(), 10)
                if i >= max(20, messages // 10):  # past the warm-up
                    total.append(done - t0)
                    enc.append(t1 - t0)
                    dec.append(done - got)
            p50, p95 = _pctl(total)
            rows.append(
                {
                    "bytes": nbytes,
                    "wire_bytes": len(payload),
                    "hop_p50_ms": p50,
                    "hop_p95_ms": p95,
                    "encode_ms": statistics.median(enc) * 1e3,
                    "decode_ms": statistics.median(dec) * 1e3,
                }
            )
    return rows


# --- (b) a saturated pipeline --------------------------------------------------------------


async def measure_throughput(
    mqtt: Any,
    ckpt: Any,
    ckpt_path: Path | None,
    cuts: str,
    images: Any,
    n_images: int,
    mode: str,
    logs: Path,
    broker_pid: int | None,
) -> dict[str, Any]:
    from bus.observer import Observer
    from bus.topics import Topics
    from nodes.camera import Camera, ImageSource, rate_schedule
    from pipeline.slicing import parse_cuts

    pipe = f"bench-{uuid.uuid4().hex[:8]}"
    bounds = parse_cuts(cuts, ckpt.build().num_blocks)
    listener = _Listener(Topics(pipe))
    async with (
        Observer(mqtt, listener.subscriptions(), listener.on_message).running(),
        _nodes(mode, mqtt, pipe, bounds, ckpt, ckpt_path, logs) as node_pids,
    ):
        await wait_until(lambda: len(listener.online) == len(bounds), 180, "nodes online")
        source = ImageSource(images.images, images.labels)
        warm = max(20, n_images // 10)
        for n, tag in ((warm, "warm"), (n_images, "burst")):
            cam = Camera(
                mqtt,
                pipe,
                source,
                rate_schedule(1e6, n, n_images=len(source)),
                resend_after_s=None,
                track_results=False,
                run_id=tag,
            )
            sent_at = time.time()
            cpu0 = _cpu_s([*node_pids, broker_pid, os.getpid()])
            await cam.run()

            def arrived(n: int = n, tag: str = tag) -> bool:
                return listener.completed.get(tag, 0) >= n

            await wait_until(arrived, 120, f"{n} {tag} results")
        cpu = [
            b - a for a, b in zip(cpu0, _cpu_s([*node_pids, broker_pid, os.getpid()]), strict=True)
        ]
    metrics = listener.metrics
    times = sorted(t for k, t in listener.first_result.items() if k.split("-")[1] == "burst")
    k1, k2 = len(times) // 10, len(times) * 9 // 10
    steady = (k2 - k1) / (times[k2] - times[k1])
    window = [b for t, b in metrics if times[k1] <= t <= times[-1] and b.service_s]
    if {b.stage for b in window} != set(range(len(bounds))):  # a burst shorter than 2 reports
        window = [b for _, b in metrics if b.service_s]
    service = {
        i: statistics.median(b.service_s or 0.0 for b in window if b.stage == i) * 1e3
        for i in range(len(bounds))
    }
    compute = {
        i: statistics.median(b.compute_s or 0.0 for b in window if b.stage == i) * 1e3
        for i in range(len(bounds))
    }
    bound = 1e3 / max(compute.values())
    service_bound = 1e3 / max(service.values())
    return {
        "mode": mode,
        "cuts": cuts,
        "images": n_images,
        "results": len(times),
        "burst_s": times[-1] - sent_at,
        "steady_results_per_s": steady,
        "overall_results_per_s": len(times) / (times[-1] - sent_at),
        "service_ms": list(service.values()),
        "compute_ms": list(compute.values()),
        "bound_results_per_s": bound,
        "fraction_of_bound": steady / bound,
        "service_bound_results_per_s": service_bound,
        "fraction_of_service_bound": steady / service_bound,
        # CPU ms per request during the burst: each node process (inproc: none), the
        # broker, and this process (camera, listener, and the nodes when inproc)
        "cpu_ms_per_request": {
            "nodes": [c * 1e3 / n_images for c in cpu[:-2]],
            "broker": cpu[-2] * 1e3 / n_images,
            "bench": cpu[-1] * 1e3 / n_images,
        },
        "arrivals_s": [t - sent_at for t in times],
    }


class _Listener:
    """What (b) needs of the pipe's traffic, kept as it arrives: the receipt time of each
    request's first result and the completed requests per run tag (from the request id only:
    the bench times results, it does not check them; this listener is on the bench's own CPU
    bill), the nodes whose retained status says online, and the nodes' metrics (validated by
    their classes in :mod:`bus.messages`)."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.first_result: dict[str, float] = {}  # request id -> receipt, epoch seconds
        self.completed: dict[str, int] = {}  # run tag -> requests with a result
        self.online: set[str] = set()
        self.metrics: list[tuple[float, MetricsMessage]] = []  # (receipt, message)

    def subscriptions(self) -> list[tuple[str, int]]:
        from bus.observer import subscriptions_for

        return subscriptions_for(self.topics, ("result", "status", "metrics"))

    def on_message(self, message: Observed) -> None:
        from bus.messages import MetricsMessage, StatusMessage
        from pipeline import codec
        from pipeline.errors import CodecError

        if not message.payload:
            return  # a retained message being cleared
        try:
            if message.topic == self.topics.results:
                rid = codec.decode_json(message.payload, expect_kind="result")["request_id"]
                if isinstance(rid, str) and rid not in self.first_result:
                    self.first_result[rid] = message.rx
                    tag = rid.split("-")[1] if rid.count("-") >= 2 else ""
                    self.completed[tag] = self.completed.get(tag, 0) + 1
            elif (node := self.topics.node_of(message.topic)) is not None and (
                message.topic == self.topics.metrics(node)
            ):
                self.metrics.append((message.rx, MetricsMessage.from_json(message.payload)))
            else:
                status = StatusMessage.from_json(message.payload)
                if status.online:
                    self.online.add(status.node)
                else:
                    self.online.discard(status.node)
        except CodecError as exc:
            log.debug("bench hop: undecodable message on %s: %s", message.topic, exc)


@contextlib.asynccontextmanager
async def _nodes(
    mode: str, mqtt: Any, pipe: str, bounds: Any, ckpt: Any, ckpt_path: Path | None, logs: Path
) -> Any:
    """The pipeline's slice nodes, as processes or as tasks of this event loop."""
    common: dict[str, Any] = {
        "threads": 1,
        "ratios": (0.0,),
        "recalibrate_bn": False,
        "metrics_interval_s": 0.25,
        "queue_size": 5000,
    }
    if mode == "inproc":
        from nodes.node import running_nodes

        async with running_nodes(ckpt, mqtt, pipe, bounds, **common):
            yield []
        return
    procs = []
    for i, b in enumerate(bounds):
        args = [
            sys.executable,
            "-m",
            "edgeprune",
            "--log-level",
            "WARNING",
            "node",
            "--node-id",
            f"n{i}",
            "--pipe",
            pipe,
            "--stage",
            str(i),
            "--start",
            str(b.start),
            "--end",
            str(b.end),
            "--host",
            mqtt.host,
            "--port",
            str(mqtt.port),
            "--threads",
            "1",
            "--ratios",
            "0",
            "--no-bn-recalibrate",
            "--metrics-interval",
            "0.25",
            "--queue-size",
            "5000",
        ]
        if ckpt_path is not None:
            args += ["--checkpoint", str(ckpt_path)]
        with open(logs / f"node{i}.log", "wb") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _cpu_s(pids: list[int | None]) -> list[float]:
    """User + system CPU seconds used so far by each process (Linux /proc; 0 if unknown)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            out.append(0.0)
    return out


# --- the run -------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torch

    from broker.launcher import MosquittoBroker
    from bus.connection import MqttSettings
    from nodes.camera import load_source
    from pipeline.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)
    compute = measure_compute(ckpt, args.cuts)
    sizes = sorted(
        {_size_bytes(s) // 4 * 4 for s in args.sizes}
        | {b["out_bytes"] for b in compute["blocks"][:-1]}
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with MosquittoBroker(port=None) as broker:
        mqtt = MqttSettings(host=broker.host, port=broker.port)
        hops = asyncio.run(measure_hops(mqtt, sizes, args.messages))
        runs = []
        if not args.skip_throughput:
            images = load_source("animal-mnist", data_dir(args), "test")
            for mode in ["inproc", "process"] if args.nodes == "both" else [args.nodes]:
                runs.append(
                    asyncio.run(
                        measure_throughput(
                            mqtt,
                            ckpt,
                            args.checkpoint,
                            args.cuts,
                            images,
                            args.images,
                            mode,
                            args.out.parent,
                            broker.pid,
                        )
                    )
                )
    for h in hops:  # the block whose output is closest in size
        near = min(compute["blocks"][:-1], key=lambda b: abs(b["out_bytes"] - h["bytes"]))
        h.update(
            nearest_block=near["name"],
            nearest_block_bytes=near["out_bytes"],
            nearest_block_compute_ms=near["compute_ms"],
            hop_over_compute=h["hop_p50_ms"] / near["compute_ms"],
        )
    by_size = {h["bytes"]: h for h in hops}
    for b in compute["blocks"][:-1]:
        b["hop_p50_ms"] = by_size[b["out_bytes"]]["hop_p50_ms"]
        b["hop_over_compute"] = b["hop_p50_ms"] / b["compute_ms"]
    at200 = min(hops, key=lambda h: abs(h["bytes"] - 200 * 1024))
    isolated_bound = 1e3 / max(s["compute_ms"] for s in compute["stages"])
    for r in runs:
        r["isolated_bound_results_per_s"] = isolated_bound
        r["fraction_of_isolated_bound"] = r["steady_results_per_s"] / isolated_bound
    main = next((r for r in runs if r["mode"] == "process"), runs[0] if runs else None)
    return {
        "bench": "hop",
        "hop_p50_ms_200KB": at200["hop_p50_ms"],
        "throughput_fraction_of_bound": main["fraction_of_bound"] if main else None,
        "goals": {"hop_p50_ms_200KB_max": HOP_GOAL_MS, "throughput_fraction_min": THROUGHPUT_GOAL},
        "messages": args.messages,
        "hops": hops,
        "compute": compute,
        "throughput": runs,
        "checkpoint": str(args.checkpoint or DEFAULT_CHECKPOINT),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_1m": os.getloadavg()[0],
    }


def render(r: dict[str, Any]) -> str:
    kb = 1024
    out = [
        f"(a) one hop (encode + QoS 1 publish + Mosquitto + deliver + decode), one in "
        f"flight, {r['messages']} messages per size; vs the closest-sized block's compute "
        f"(1 thread)",
        format_table(
            [
                "tensor KB",
                "wire KB",
                "p50 ms",
                "p95 ms",
                "enc ms",
                "dec ms",
                "closest block",
                "its KB",
                "compute ms",
                "hop/compute",
            ],
            [
                [
                    h["bytes"] / kb,
                    h["wire_bytes"] / kb,
                    h["hop_p50_ms"],
                    h["hop_p95_ms"],
                    h["encode_ms"],
                    h["decode_ms"],
                    h["nearest_block"],
                    h["nearest_block_bytes"] / kb,
                    h["nearest_block_compute_ms"],
                    h["hop_over_compute"],
                ]
                for h in r["hops"]
            ],
        ),
        "",
        "every block of the model: its output goes over one hop",
        format_table(
            ["block", "out shape", "out KB", "compute ms", "hop p50 ms", "hop/compute"],
            [
                [
                    b["name"],
                    "x".join(map(str, b["out_shape"])),
                    b["out_bytes"] / kb,
                    b["compute_ms"],
                    b.get("hop_p50_ms", "-"),
                    b.get("hop_over_compute", "-"),
                ]
                for b in r["compute"]["blocks"]
            ],
        ),
    ]
    if r["throughput"]:
        out += [
            "",
            "(b) saturated 2-stage pipeline: steady results/s vs the bound 1 / max(stage "
            "time), stage times per stage (0/1) in ms: compute and service as the nodes "
            "reported them in this run, and isolated compute (1 thread, quiet process)",
            format_table(
                [
                    "nodes",
                    "cuts",
                    "images",
                    "results/s",
                    "compute ms",
                    "bound/s",
                    "fraction",
                    "service ms",
                    "bound/s",
                    "fraction",
                    "isolated ms",
                    "bound/s",
                    "fraction",
                ],
                [
                    [
                        t["mode"],
                        t["cuts"],
                        t["images"],
                        t["steady_results_per_s"],
                        "/".join(f"{s:.2f}" for s in t["compute_ms"]),
                        t["bound_results_per_s"],
                        t["fraction_of_bound"],
                        "/".join(f"{s:.2f}" for s in t["service_ms"]),
                        t["service_bound_results_per_s"],
                        t["fraction_of_service_bound"],
                        "/".join(f"{s['compute_ms']:.2f}" for s in r["compute"]["stages"]),
                        t["isolated_bound_results_per_s"],
                        t["fraction_of_isolated_bound"],
                    ]
                    for t in r["throughput"]
                ],
            ),
            "",
            "CPU ms per request during the burst (user + system, from /proc)",
            format_table(
                ["nodes", "node processes", "broker", "bench process"],
                [
                    [
                        t["mode"],
                        "/".join(f"{c:.2f}" for c in t["cpu_ms_per_request"]["nodes"]) or "-",
                        t["cpu_ms_per_request"]["broker"],
                        t["cpu_ms_per_request"]["bench"],
                    ]
                    for t in r["throughput"]
                ],
            ),
        ]
    frac = r["throughput_fraction_of_bound"]
    out += [
        "",
        f"hop_p50_ms_200KB = {r['hop_p50_ms_200KB']:.3f}; "
        f"throughput_fraction_of_bound = {'-' if frac is None else format(frac, '.3f')}; "
        f"{r['cpus']} CPUs, load average {r['load_avg_1m']:.2f}",
    ]
    return "\n".join(out)


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    kb = [h["bytes"] / 1024 for h in r["hops"]]
    ax.plot(kb, [h["hop_p50_ms"] for h in r["hops"]], "o-", label="hop p50")
    ax.plot(kb, [h["hop_p95_ms"] for h in r["hops"]], "o--", label="hop p95")
    blocks = r["compute"]["blocks"][:-1]
    ax.plot(
        [b["out_bytes"] / 1024 for b in blocks],
        [b["compute_ms"] for b in blocks],
        "k^",
        label="block compute (its output size)",
    )
    for b in blocks:
        ax.annotate(b["name"], (b["out_bytes"] / 1024, b["compute_ms"]), fontsize=8)
    ax.axhline(HOP_GOAL_MS, color="grey", lw=0.8, ls=":", label="goal at 200 KB")
    ax.set(
        xscale="log",
        xlabel="float32 tensor KB",
        ylabel="ms",
        title="(a) one MQTT hop vs compute (loopback)",
    )
    ax.set_xticks(kb, [f"{k:.0f}" for k in kb], minor=False)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    for t in r["throughput"]:
        arr = t["arrivals_s"]
        bx.plot(
            arr,
            range(1, len(arr) + 1),
            label=f"{t['mode']}: {t['steady_results_per_s']:.0f}/s "
            f"({t['fraction_of_bound']:.0%} of bound)",
        )
        bx.plot([0, arr[-1]], [0, arr[-1] * t["bound_results_per_s"]], ls=":", color="grey")
    bx.set_ylim(0, 1.1 * max((len(t["arrivals_s"]) for t in r["throughput"]), default=1))
    bx.set(
        xlabel="s since the burst was sent",
        ylabel="results",
        title="(b) saturated pipeline; dotted: 1 / max(stage compute)",
    )
    if r["throughput"]:
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> BenchReport:
    report = measure(args)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    plot(report, png_path)
    report["files"] = {"json": str(json_path), "png": str(png_path)}
    json_path.write_text(json.dumps(report, indent=2))
    text = f"{render(report)}\nwrote {json_path} and {png_path}"
    return BenchReport(report, text, goals(report, throughput=not args.skip_throughput))


def goals(report: dict[str, Any], *, throughput: bool = True) -> tuple[Goal, ...]:
    """The figures ``GOALS`` name, as measured; without the throughput part, its goal is
    left out (not missed)."""
    return tuple(
        spec.measured(report[spec.figure])
        for spec in GOALS
        if throughput or spec.figure != "throughput_fraction_of_bound"
    )
