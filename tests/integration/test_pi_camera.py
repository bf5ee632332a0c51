"""The Raspberry Pi camera script (nodes/pi_camera.py) as a separate process, against the
session broker and an in-process pipeline: every image gets its result, Ctrl-C is a clean
stop, it reconnects after the broker restarts, and it never imports torch or numpy."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bus.connection import MqttSettings
from pipeline import codec
from pipeline.slicing import parse_cuts
from pipeline.training import predict
from tests.helpers import REPO, collecting, running_nodes, wait_until

SCRIPT = REPO / "nodes" / "pi_camera.py"
BOUNDS = parse_cuts("3", 5)
FAST_NODES: dict[str, Any] = {"ratios": (0.0, 0.5), "recalibrate_bn": False}


def _write_pngs(folder: Path, images: Any, n: int) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"img{i:02d}.png" for i in range(n)]
    for path, pixels in zip(paths, images[:n], strict=True):
        Image.fromarray(pixels).save(path)
    return paths


@contextlib.asynccontextmanager
async def pi_camera(
    mqtt: MqttSettings, pipe: str, log: Path, *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The script as a child process (asyncio, so the in-process nodes keep serving)."""
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--host",
            mqtt.host,
            "--port",
            str(mqtt.port),
            "--pipe",
            pipe,
            *args,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_every_image_from_the_folder_gets_its_result(
    checkpoint, test_images, mqtt, topic_prefix, tmp_path
):
    n = 6
    _write_pngs(tmp_path / "images", test_images.images, n)
    model = checkpoint.build().eval()
    with torch.no_grad():
        expected = predict(model, checkpoint.preprocess(test_images.images[:n])).tolist()
    async with (
        running_nodes(checkpoint, mqtt, topic_prefix, BOUNDS, **FAST_NODES),
        collecting(mqtt, topic_prefix) as col,
    ):
        async with pi_camera(
            mqtt,
            topic_prefix,
            tmp_path / "picam.log",
            "--camera-id",
            "trap-7",
            "--folder",
            str(tmp_path / "images"),
            "--interval",
            "0.05",
            "--count",
            str(n),
        ) as proc:
            code = await asyncio.wait_for(proc.wait(), 60)
        log = (tmp_path / "picam.log").read_text()
        assert code == 0, log
        assert f"{n} images sent, {n} acknowledged by the broker, 0 dropped" in log, log
        await wait_until(lambda: len(col.results) >= n, what=f"{n} results")
    assert not col.errors
    by_seq = {int(r["request_id"].rsplit("-", 1)[1]): r for r in col.results}
    assert sorted(by_seq) == list(range(n)) and len(col.results) == n  # one result each
    for seq, result in by_seq.items():
        assert result["camera"] == "trap-7" and result["request_id"].startswith("trap-7-")
        assert result["label_index"] == expected[seq], seq  # PNG is lossless: same prediction
        assert result["levels"] == [0, 0] and result["true_label"] is None
    assert all(e["latency_s"] > 0 for e in col.exits)


async def test_reconnects_after_a_broker_restart_and_stops_cleanly_on_ctrl_c(
    checkpoint, test_images, broker_factory, topic_prefix, tmp_path
):
    broker = broker_factory(port=None)
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    _write_pngs(tmp_path / "images", test_images.images, 3)
    async with (
        running_nodes(checkpoint, mqtt, topic_prefix, BOUNDS, **FAST_NODES) as nodes,
        collecting(mqtt, topic_prefix) as col,
        pi_camera(
            mqtt,
            topic_prefix,
            tmp_path / "picam.log",
            "--camera-id",
            "cam",
            "--folder",
            str(tmp_path / "images"),
            "--interval",
            "0.1",
        ) as proc,
    ):
        await wait_until(lambda: len(col.results) >= 3, 30, "results before the restart")
        before = max(int(r["request_id"].rsplit("-", 1)[1]) for r in col.results)
        broker.restart()
        await wait_until(lambda: all(n.connected.is_set() for n in nodes), 30, "nodes reconnected")
        async with collecting(mqtt, topic_prefix) as after:  # the first one died
            await wait_until(
                lambda: (
                    sum(int(r["request_id"].rsplit("-", 1)[1]) > before for r in after.results) >= 3
                ),
                30,
                "results of images captured after the restart",
            )
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = await asyncio.wait_for(proc.wait(), 30)
    log = (tmp_path / "picam.log").read_text()
    assert code == 0, log
    assert "disconnected from" in log and log.count("connected to mqtt://") >= 2, log
    assert "stopped:" in log and "Traceback" not in log, log


def test_importing_it_pulls_in_neither_torch_nor_numpy_and_codec_accepts_its_messages():
    code = (
        "import sys; sys.path.insert(0, 'nodes'); import pi_camera as pc\n"
        "from PIL import Image\n"
        "png = pc.encode_image(Image.new('L', (40, 30), 128), 'png')\n"
        "jpg = pc.encode_image(Image.new('RGB', (40, 30)), 'jpeg', max_side=20)\n"
        "for fmt, img in (('png', png), ('jpeg', jpg)):\n"
        "    p = pc.stage0_payload('cam-run-000001', 'cam', img, fmt, 1.5, 2.5, {'src': 'a.png'})\n"
        "    sys.stdout.write(p.hex() + '\\n')\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules}\n"
        "             & {'torch', 'numpy', 'pipeline', 'nodes', 'edgeprune'})\n"
        "sys.stderr.write(repr(bad)); sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == "[]"
    for line, fmt in zip(run.stdout.split(), ("png", "jpeg"), strict=True):
        msg = codec.decode_stage(bytes.fromhex(line))
        assert (msg.request_id, msg.camera, msg.stage, msg.image_format) == (
            "cam-run-000001",
            "cam",
            0,
            fmt,
        )
        assert (msg.capture_ts, msg.entry_ts, msg.hops, msg.attempt) == (1.5, 2.5, (), 0)
        assert dict(msg.meta) == {"src": "a.png"}
        with Image.open(io.BytesIO(msg.image)) as img:
            assert img.size == ((40, 30) if fmt == "png" else (20, 15))
