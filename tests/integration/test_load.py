"""Load: twenty cameras replaying bursts into one pipeline.

Memory must stay bounded: each node's local queue is limited, and a request arriving at a full
queue is shed — reported on the errors topic with its request id and counted in the node's
metrics, never silently. The cameras' journals re-send shed requests, so nothing accepted is
lost. Broker and node memory are reported.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from nodes.camera import Camera, Shot
from pipeline.slicing import parse_cuts
from tests.helpers import collecting, running_nodes, wait_until


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def burst_shots(
    camera: str, bursts: int, per_burst: int, gap_s: float, offset: float, seed: int
) -> list[Shot]:
    """Camera-trap-like bursts: ``per_burst`` images ~0.05 s apart, every ``gap_s``."""
    return [
        Shot(offset + b * gap_s + i * 0.05, camera, seed * 1000 + b * per_burst + i)
        for b in range(bursts)
        for i in range(per_burst)
    ]


async def test_twenty_cameras_bounded_memory_and_every_shed_reported(
    checkpoint, test_images, mqtt, mosquitto, topic_prefix
):
    queue_size = 8
    async with (
        running_nodes(
            checkpoint,
            mqtt,
            topic_prefix,
            parse_cuts("2", 5),
            queue_size=queue_size,
            metrics_interval_s=0.2,
        ) as nodes,
        collecting(mqtt, topic_prefix) as col,
    ):
        rss_before = rss_mb(os.getpid())
        broker_before = rss_mb(mosquitto.pid)
        cameras = [
            Camera(
                mqtt,
                topic_prefix,
                test_images,
                burst_shots(f"cam{c:02d}", 2, 6, 1.5, c * 0.01, c),
                resend_after_s=2.0,
                drain_s=120,
            )
            for c in range(20)
        ]
        peak_queue = 0

        async def watch() -> None:
            nonlocal peak_queue
            while True:
                peak_queue = max(peak_queue, *(n._queue.qsize() for n in nodes))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        reports = await asyncio.gather(*(c.run() for c in cameras))
        watcher.cancel()
        shed = sum(n.metrics().shed for n in nodes)
        await wait_until(
            lambda: sum(1 for e in col.errors if e.get("shed")) >= shed, 20, "every shed reported"
        )
        rss_after = rss_mb(os.getpid())
        broker_after = rss_mb(mosquitto.pid)
    sent = sum(r.sent for r in reports)
    completed = sum(r.completed for r in reports)
    resent = sum(r.resent for r in reports)
    duplicates = sum(r.duplicates for r in reports)
    print(
        f"load: 20 cameras, {sent} images, {completed} results, {shed} shed "
        f"(all reported), {resent} re-sent, {duplicates} duplicates suppressed; "
        f"peak local queue {peak_queue}/{queue_size}; test process RSS {rss_before:.0f} -> "
        f"{rss_after:.0f} MB, broker RSS {broker_before:.1f} -> {broker_after:.1f} MB"
    )
    assert sent == 240 and completed == sent  # nothing accepted is lost
    assert peak_queue <= queue_size  # the bound holds
    assert shed > 0  # the burst really overflowed the queues ...
    reported = [e for e in col.errors if e.get("shed")]
    assert len(reported) == shed  # ... and every shed request was reported
    assert all(e["request_id"] for e in reported)
    assert rss_after - rss_before < 300 and broker_after < 200
