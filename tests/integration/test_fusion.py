"""Multi-view on a real Mosquitto: branch nodes at per-view levels chosen by the planner, a
fusion node, and one view that never publishes. Fusion waits for it up to the timeout, then
drops it and answers at once; every request gets exactly one result, equal to the offline
fused prediction over the views that arrived; when the view returns it is fused again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiomqtt
import msgpack
import numpy as np
import pytest
import torch

from nodes.fusion import BranchNode, FusionNode, ViewTopics, publish_view_levels, view_message
from pipeline.calibration.accuracy import AccuracyModel
from pipeline.data import load_animal_mnist, split_dataset
from pipeline.devices import MIB, Device
from pipeline.multiview import MultiViewCheckpoint, PrunedMultiView, view_levels
from tests.helpers import DATA_DIR, collecting, wait_until

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "multiview-xs.pt"
TIMEOUT_S, FAIL_AFTER, N = 0.5, 3, 30


def _planned_levels(pm: PrunedMultiView) -> tuple[int, ...]:
    """Per-view levels from the planner: measured view importance (300 validation images),
    measured branch costs, three small devices (the second too small for its branch unpruned)."""
    val = split_dataset(load_animal_mnist(DATA_DIR)).val
    x, y = pm.ckpt.view_tensors(val.images[:300]), torch.from_numpy(val.labels[:300])
    n_levels = len(pm.ratios)
    imp = np.asarray(
        [
            [pm.accuracy(x, y, [lv if u == v else 0 for u in range(3)]) for lv in range(n_levels)]
            for v in range(3)
        ]
    )
    model = AccuracyModel.from_importance(float(imp[0, 0]), imp, 10)
    t, mem = pm.branch_costs(runs=5, warmup=1)
    caps = [mem[0, 0], 0.8 * mem[1, 0], mem[2, 0]]
    devices = [Device(f"cam{v}", 1.0, caps[v] / MIB, 50.0, 2.0) for v in range(3)]
    chosen = view_levels(t, mem, devices, model.predict_views, float(imp[0, 0]) - 0.1)
    assert chosen is not None and chosen[0][1] > 0  # the small device's branch is pruned
    return chosen[0]


@pytest.mark.timeout(90)
async def test_fusion_drops_a_silent_view_and_goes_on(mqtt, topic_prefix):
    assert CHECKPOINT.exists(), "train it: edgeprune bench planner --multiview --train"
    pm = PrunedMultiView(MultiViewCheckpoint.load(CHECKPOINT))
    levels = _planned_levels(pm)
    test = split_dataset(load_animal_mnist(DATA_DIR)).test
    images, labels = test.images[: N + 6], test.labels[: N + 6]
    crops = [v.crop(images) for v in pm.ckpt.config.views]
    topics = ViewTopics(topic_prefix)
    stop = asyncio.Event()
    fusion = FusionNode(mqtt, topic_prefix, pm, timeout_s=TIMEOUT_S, fail_after=FAIL_AFTER)
    branches = [BranchNode(mqtt, topic_prefix, v, pm) for v in range(3)]
    async with aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client:
        await publish_view_levels(client, topic_prefix, levels, pm.ratios)
        tasks = [asyncio.create_task(s.run(stop)) for s in (fusion, *branches[:2])]  # view 2 down
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    fusion.ready.wait(), branches[0].ready.wait(), branches[1].ready.wait()
                ),
                20,
            )
            await wait_until(
                lambda: [b.level for b in branches[:2]] == list(levels[:2]), 10, "retained levels"
            )

            async def send(i: int) -> None:
                for v in range(3):
                    await client.publish(
                        topics.view(v),
                        view_message(f"r{i:03d}", "cam", crops[v][i], int(labels[i])),
                        qos=1,
                    )

            for i in range(N):  # one at a time: each result's wait is its own
                await send(i)
                await wait_until(lambda i=i: len(fusion.results) > i, 10, f"result {i}")
            tasks.append(asyncio.create_task(branches[2].run(stop)))  # view 2 comes back
            await asyncio.wait_for(branches[2].ready.wait(), 20)
            for i in range(N, N + 6):
                await send(i)
                await wait_until(lambda i=i: len(fusion.results) > i, 10, f"result {i}")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    results = {r.request_id: r.body() for r in fusion.results}  # the fields as on the wire
    assert len(results) == len(fusion.results) == N + 6  # exactly one result per request
    first = [results[f"r{i:03d}"] for i in range(N)]
    assert all(2 in r["missing"] for r in first)
    # on a loaded machine a live view may miss the timeout now and then: it is dropped for
    # that request, which is the point; almost all requests have both live views
    both = [i for i, r in enumerate(first) if r["views"] == [0, 1]]
    assert len(both) >= N - 2
    assert all(first[i]["levels"][:2] == list(levels[:2]) for i in both)
    # the first FAIL_AFTER waited for view 2 up to the timeout; after that it was dropped and
    # fusion went ahead as soon as the other views were in
    assert all(
        r["fused_on"] == "timeout" and r["waited_s"] >= TIMEOUT_S * 0.9 for r in first[:FAIL_AFTER]
    )
    assert (
        sum(r["fused_on"] == "failed views dropped" for r in first[FAIL_AFTER:])
        >= N - FAIL_AFTER - 2
    )
    last = results[f"r{N + 5:03d}"]  # view 2 is back, waited for and fused again
    assert last["views"] == [0, 1, 2] and last["fused_on"] == "all views"
    with torch.no_grad():  # the fused answers are the offline ones over the same views
        x = [pm.ckpt.preprocess(c[:N]) for c in crops]
        outs = [pm.branch(v, x[v], levels[v]) for v in range(2)]
        offline = pm.fuse([outs[0], outs[1], None]).argmax(1).tolist()
    assert [first[i]["label_index"] for i in both] == [offline[i] for i in both]
    accuracy = np.mean([r["correct"] for r in first])
    print(
        f"\nfusion: levels {list(levels)}, {N} requests without view 2: accuracy {accuracy:.3f}"
        f", waited {np.median([r['waited_s'] for r in first[:FAIL_AFTER]]) * 1e3:.0f} ms "
        f"before dropping it, then {np.median([r['waited_s'] for r in first[FAIL_AFTER:]]) * 1e3:.1f}"
        f" ms; late views {fusion.stats.late}"
    )
    assert accuracy > 0.5


@pytest.mark.timeout(90)
async def test_branch_and_fusion_commands_serve_the_topology(mqtt, topic_prefix, tmp_path):
    """Smoke of the CLI: `edgeprune fusion` as a process, three branch nodes built from parsed
    `edgeprune branch` arguments (in-process, sharing one model); every request gets one
    result fused from all three views, at the retained per-view levels."""
    from edgeprune.cli import build_parser
    from edgeprune.commands.multiview import build_branch
    from tests.helpers import REPO, collecting, stop_process

    broker = ["--host", mqtt.host, "--port", str(mqtt.port), "--pipe", topic_prefix]
    log_path = tmp_path / "fusion.log"
    with open(log_path, "wb") as out:
        fusion = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeprune",
                "fusion",
                "--checkpoint",
                str(CHECKPOINT),
                "--timeout",
                "2",
                *broker,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    pm = PrunedMultiView(MultiViewCheckpoint.load(CHECKPOINT))
    parser = build_parser()
    branches = [
        build_branch(
            parser.parse_args(
                ["branch", "--view", str(v), "--checkpoint", str(CHECKPOINT), *broker]
            ),
            pm,
        )
        for v in range(3)
    ]
    assert [b.node_id for b in branches] == ["view0", "view1", "view2"]
    levels = (0, 2, 1)
    test = split_dataset(load_animal_mnist(DATA_DIR)).test
    crops = [v.crop(test.images[:5]) for v in pm.ckpt.config.views]
    topics = ViewTopics(topic_prefix)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(b.run(stop)) for b in branches]
    try:
        async with (
            collecting(mqtt, topic_prefix) as col,
            aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client,
        ):
            await publish_view_levels(client, topic_prefix, levels, pm.ratios)
            await wait_until(lambda: [b.level for b in branches] == list(levels), 20, "levels")
            await wait_until(
                lambda: any(s["node"] == "fusion" and s["state"] == "online" for s in col.statuses),
                60,
                "the fusion node",
            )
            for i in range(5):
                for v in range(3):
                    await client.publish(
                        topics.view(v),
                        view_message(f"s{i}", "cam", crops[v][i], int(test.labels[i])),
                        qos=1,
                    )
            await wait_until(lambda: len(col.results) >= 5, 30, "five results")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        rc = stop_process(fusion)
    assert rc == 0, log_path.read_text()
    assert sorted(r["request_id"] for r in col.results) == [f"s{i}" for i in range(5)]
    assert all(r["views"] == [0, 1, 2] and r["levels"] == list(levels) for r in col.results)


async def test_fusion_reports_bad_features_on_errors_and_serves_on(mqtt, topic_prefix):
    """NaN features are refused at intake, features so large that the fused output overflows
    are refused after fusing (before: the service died on the NaN score), and a good request
    afterwards gets its result."""
    pm = PrunedMultiView(MultiViewCheckpoint.load(CHECKPOINT))
    test = split_dataset(load_animal_mnist(DATA_DIR)).test
    crops = [v.crop(test.images[:1]) for v in pm.ckpt.config.views]
    topics = ViewTopics(topic_prefix)
    branches = [BranchNode(mqtt, topic_prefix, v, pm) for v in range(3)]  # run offline here

    def features(rid: str, v: int, value: float | None = None) -> tuple[str, bytes]:
        [(topic, body)] = branches[v].handle(topics.view(v), view_message(rid, "cam", crops[v][0]))
        if value is None:
            return topic, body
        wire = msgpack.unpackb(body)
        x = np.frombuffer(wire["x"]["data"], dtype=np.float32).copy()
        x[:] = value
        wire["x"]["data"] = x.tobytes()
        return topic, msgpack.packb(wire)

    fusion = FusionNode(mqtt, topic_prefix, pm, timeout_s=10.0)
    stop = asyncio.Event()
    async with (
        collecting(mqtt, topic_prefix) as col,
        aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client,
    ):
        task = asyncio.create_task(fusion.run(stop))
        try:
            await asyncio.wait_for(fusion.ready.wait(), 20)
            sent = [features("nan", 0, float("nan"))]
            sent += [features("huge", v, 3e38) for v in range(3)]
            sent += [features("good", v) for v in range(3)]
            for topic, body in sent:
                await client.publish(topic, body, qos=1)
            await wait_until(lambda: len(col.results) == 1, 20, "the good request's result")
            await wait_until(lambda: len(col.errors) == 2, 20, "two errors")
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
    nan_error, huge_error = col.errors
    assert nan_error["node"] == "fusion" and nan_error["request_id"] == "nan"
    assert "non-finite" in nan_error["reason"] and nan_error["topic"] == topics.features(0)
    assert (
        huge_error["request_id"] == "huge" and "fused output is not finite" in huge_error["reason"]
    )
    [result] = col.results
    assert result["request_id"] == "good" and result["views"] == [0, 1, 2]
    assert fusion.stats.errors == 2
