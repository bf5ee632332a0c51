"""A camera-trap device for a real Raspberry Pi: capture an image, publish it to stage 0.

This one file is meant to be copied to the device alone. It needs ONLY paho-mqtt (2.x),
msgpack and Pillow (``pip install paho-mqtt msgpack pillow``), plus picamera2 when a Pi
camera is used (Raspberry Pi OS ships it). It imports neither torch, numpy nor any edgeprune
package, so the few wire-format facts it needs are copied here from ``pipeline/codec.py``
and ``bus/topics.py`` (keep them in sync if the schema version changes):

- topic ``edgeprune/<pipe>/stage/0/<camera id>``, QoS 1, not retained (the secure broker
  lets user ``camera-<id>`` write only its own camera's topic);
- payload: one msgpack map ``{v: 1, kind: "stage", id, cam, st: 0, t0, tc, att: 0,
  hops: [], meta: {...}, img: {fmt: "png" | "jpeg", data: <bin>}}`` where ``id`` is the
  request id, ``cam`` the camera id (1 to 128 characters each), ``tc`` the capture time and
  ``t0`` the time the request entered the pipeline (epoch seconds), ``meta`` small
  str -> str / int / float entries (here the image's source name).

Images come from ``--folder`` (its image files in name order, cycled), else ``--glob``, else
picamera2 when importable. Each capture is optionally shrunk (``--max-side``), encoded as PNG
or JPEG and published with a request id ``<camera>-<run>-<seq>``. The slice node at stage 0
decodes the image and resizes it to the model's input, so any size works.

The MQTT client runs in paho's network thread (``loop_start``): it connects in the
background, reconnects with backoff (``reconnect_delay_set``) when the broker goes away, and
QoS 1 messages published meanwhile are kept (at most ``--queue``) and sent on reconnection.
Ctrl-C or SIGTERM stops capturing; messages still unacknowledged get ``--drain`` seconds to
go out, then the client disconnects. Exit code 0 on a clean stop.

    python nodes/pi_camera.py --host 192.168.1.10 --port 1883 --pipe default \\
        --camera-id trap-3 --folder ./images --interval 2
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
from PIL import Image

# --- copied from pipeline/codec.py and bus/topics.py ----------------------------------
SCHEMA_VERSION = 1
TOPIC_ROOT = "edgeprune"
MAX_NAME = 128  # characters in a request id, camera id or meta value
PIPE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# -------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
log = logging.getLogger("pi_camera")


def stage0_topic(pipe: str, camera: str) -> str:
    """Where camera ``camera`` of pipe ``pipe`` publishes (``bus.topics.Topics.camera_stage``
    for the names ``parse_args`` accepts)."""
    return f"{TOPIC_ROOT}/{pipe}/stage/0/{camera}"


def stage0_payload(
    request_id: str,
    camera: str,
    image: bytes,
    fmt: str,
    capture_ts: float,
    entry_ts: float,
    meta: dict[str, str | int | float] | None = None,
) -> bytes:
    """The msgpack bytes of a stage-0 message, as ``pipeline.codec.decode_stage`` reads it."""
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image format must be png or jpeg, not {fmt!r}")
    for what, value in (("request id", request_id), ("camera id", camera)):
        if not 0 < len(value) <= MAX_NAME:
            raise ValueError(f"{what} must have 1 to {MAX_NAME} characters")
    msg: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "kind": "stage",
        "id": request_id,
        "cam": camera,
        "st": 0,
        "t0": float(entry_ts),
        "tc": float(capture_ts),
        "att": 0,
        "hops": [],
    }
    if meta:
        msg["meta"] = {
            k[:MAX_NAME]: v[:MAX_NAME] if isinstance(v, str) else v for k, v in meta.items()
        }
    msg["img"] = {"fmt": fmt, "data": image}
    return msgpack.packb(msg, use_bin_type=True)


def encode_image(img: Image.Image, fmt: str, quality: int = 90, max_side: int = 0) -> bytes:
    """PNG or JPEG bytes of ``img``, shrunk to at most ``max_side`` pixels a side if > 0."""
    if max_side > 0 and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side))
    if (fmt == "jpeg" and img.mode not in ("L", "RGB")) or (
        fmt == "png" and img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
    ):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=quality)
    return buf.getvalue()


# --- image sources: each yields (source name, image) forever --------------------------------


def file_images(paths: Sequence[Path]) -> Iterator[tuple[str, Image.Image]]:
    """The images in ``paths``, cycled; an unreadable file is logged and skipped."""
    if not paths:
        raise FileNotFoundError("no image files to send")
    while True:
        readable = 0
        for path in paths:
            try:
                with Image.open(path) as img:
                    img.load()
                    yield path.name, img
                readable += 1
            except OSError as exc:
                log.warning("skipping %s: %s", path, exc)
        if readable == 0:
            raise FileNotFoundError("none of the image files could be read")


def folder_paths(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, in name order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def picamera_images(size: tuple[int, int] | None) -> Iterator[tuple[str, Image.Image]]:
    """Stills from the Pi camera (picamera2), one per call."""
    from picamera2 import Picamera2  # type: ignore[import-not-found]

    cam = Picamera2()
    main = {"size": size} if size else {}
    cam.configure(cam.create_still_configuration(main=main))
    cam.start()
    try:
        while True:
            yield "picamera2", cam.capture_image("main")
    finally:
        cam.stop()
        cam.close()


def have_picamera() -> bool:
    """Whether picamera2 can be imported (without importing it: it pulls in numpy)."""
    import importlib.util

    return importlib.util.find_spec("picamera2") is not None


# --- the MQTT side ---------------------------------------------------------------------------


class Publisher:
    """One paho client in its network thread; counts what the broker acknowledged."""

    def __init__(self, args: argparse.Namespace, client_id: str) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=args.reconnect_max)
        self.client.max_queued_messages_set(args.queue)
        if args.username:
            self.client.username_pw_set(args.username, args.password)
        if args.tls_ca:
            self.client.tls_set(ca_certs=str(args.tls_ca))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish
        self._cond = threading.Condition()
        self._pending: set[int] = set()
        self._acked_early: set[int] = set()
        self.connected = threading.Event()
        self.acked = 0
        self.url = f"{'mqtts' if args.tls_ca else 'mqtt'}://{args.host}:{args.port}"
        self.client.connect_async(args.host, args.port, keepalive=args.keepalive)
        self.client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self.url, reason)
            return
        self.connected.set()
        log.info("connected to %s", self.url)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach the broker at %s; retrying", self.url)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connected.clear()
        log.warning("disconnected from %s (%s); reconnecting", self.url, reason)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        with self._cond:
            self.acked += 1
            if mid in self._pending:
                self._pending.discard(mid)
            else:  # acknowledged before publish() returned its mid to us
                self._acked_early.add(mid)
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> bool:
        """Queue ``payload`` with QoS 1; False when the local queue is full (dropped)."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return False
        with self._cond:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._pending.add(info.mid)
        return True

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, drain_s: float) -> int:
        """Wait up to ``drain_s`` for unacknowledged messages, disconnect; returns how many
        were still unacknowledged."""
        deadline = time.monotonic() + drain_s
        with self._cond:
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = len(self._pending)
        self.client.disconnect()
        self.client.loop_stop()
        return left


# --- the program -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pi_camera.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883, help="broker port")
    p.add_argument("--username", default=None, help="MQTT user name")
    p.add_argument(
        "--password",
        default=os.environ.get("EDGEPRUNE_MQTT_PASSWORD"),
        help="MQTT password (default: $EDGEPRUNE_MQTT_PASSWORD)",
    )
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate: enables TLS")
    p.add_argument("--pipe", default="default", help="pipeline name (edgeprune/<pipe>/...)")
    p.add_argument(
        "--camera-id",
        default=None,
        help="camera id carried by every message (default: <id> of a camera-<id> user, else picam)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="send the image files of this folder, in name order, cycled",
    )
    src.add_argument("--glob", default=None, help="send the files matching this pattern")
    p.add_argument(
        "--camera-size",
        default=None,
        metavar="WxH",
        help="picamera2 still size (default: the sensor's)",
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between captures")
    p.add_argument("--count", type=int, default=0, help="stop after N images (0: never)")
    p.add_argument("--format", choices=["png", "jpeg"], default="png", help="wire encoding")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument(
        "--max-side",
        type=int,
        default=0,
        help="shrink images to at most this many pixels a side (0: as captured)",
    )
    p.add_argument(
        "--queue",
        type=int,
        default=1000,
        help="images kept while the broker is unreachable; beyond, captures drop",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=10.0,
        help="seconds to wait for unacknowledged images at exit",
    )
    p.add_argument("--keepalive", type=int, default=15, help="MQTT keepalive seconds")
    p.add_argument("--reconnect-max", type=int, default=30, help="longest reconnect delay (s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    if not PIPE_NAME.match(args.pipe):
        p.error(f"pipe name {args.pipe!r} must be 1-64 of letters, digits, '_', '.', '-'")
    user = args.username or ""
    user_camera = user.removeprefix("camera-") if user.startswith("camera-") else None
    if args.camera_id is None:
        args.camera_id = user_camera or "picam"
    elif user_camera is not None and args.camera_id != user_camera:
        p.error(
            f"user {args.username} may publish only as camera {user_camera!r}, "
            f"not {args.camera_id!r}"
        )
    if not 0 < len(args.camera_id) <= 64 or not PIPE_NAME.match(args.camera_id):
        p.error("camera id must be 1-64 of letters, digits, '_', '.', '-'")
    if args.interval < 0 or args.count < 0 or args.queue < 1 or not 1 <= args.quality <= 95:
        p.error("interval and count must be >= 0, queue >= 1, quality in 1..95")
    return args


def open_source(args: argparse.Namespace) -> Iterator[tuple[str, Image.Image]]:
    if args.folder is not None:
        return file_images(folder_paths(args.folder))
    if args.glob is not None:
        return file_images(sorted(Path(p) for p in glob.glob(args.glob)))
    if have_picamera():
        size = (
            tuple(int(v) for v in args.camera_size.lower().split("x")) if args.camera_size else None
        )
        return picamera_images(size)  # type: ignore[arg-type]
    raise FileNotFoundError("picamera2 is not installed: pass --folder or --glob")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
    )
    try:
        source = open_source(args)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run = uuid.uuid4().hex[:8]
    topic = stage0_topic(args.pipe, args.camera_id)
    pub = Publisher(args, f"edgeprune-picam-{args.camera_id}-{run}"[:64])
    sent = dropped = 0
    next_at = time.monotonic()
    try:
        while not stop.is_set() and (args.count == 0 or sent + dropped < args.count):
            try:
                name, img = next(source)
            except (FileNotFoundError, OSError) as exc:
                log.error("capture failed: %s", exc)
                return 2
            captured = time.time()
            data = encode_image(img, args.format, args.quality, args.max_side)
            rid = f"{args.camera_id}-{run}-{sent + dropped:06d}"
            payload = stage0_payload(
                rid, args.camera_id, data, args.format, captured, time.time(), {"src": name}
            )
            if pub.publish(topic, payload):
                sent += 1
                log.debug("published %s (%d bytes) from %s", rid, len(payload), name)
            else:
                dropped += 1
                log.warning("local queue full (%d): dropped %s", args.queue, rid)
            next_at += args.interval
            stop.wait(max(0.0, next_at - time.monotonic()))
    finally:
        left = pub.close(args.drain)
        log.info(
            "stopped: %d images sent, %d acknowledged by the broker, %d dropped (queue "
            "full), %d never acknowledged",
            sent,
            pub.acked,
            dropped,
            left,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
