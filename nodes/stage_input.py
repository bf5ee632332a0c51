"""Turning a decoded stage message into the tensor a slice runs on, with checks.

Every check failure raises :class:`~pipeline.errors.CodecError` with the request id, which the
node reports on the ``errors`` topic.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.codec import StageMessage
from pipeline.data import Preprocess
from pipeline.errors import CodecError, DatasetError

MAX_IMAGE_PIXELS = 4096 * 4096


def image_to_tensor(msg: StageMessage, preprocess: Preprocess) -> torch.Tensor:
    """The stage-0 image (PNG, JPEG or raw uint8 pixels) -> normalised [1, C, H, W]."""
    if msg.image is None:
        raise CodecError("stage 0 expects an image, got a tensor", msg.request_id)
    if msg.image_format == "raw":
        pixels = _raw_pixels(msg)
    else:
        pixels = _decode_image(msg, preprocess.channels)
    try:
        return preprocess(pixels[None])
    except DatasetError as exc:
        raise CodecError(str(exc), msg.request_id) from exc


def _raw_pixels(msg: StageMessage) -> np.ndarray:
    shape = tuple(msg.image_shape or ())
    if len(shape) not in (2, 3) or int(np.prod(shape)) != len(msg.image or b""):
        raise CodecError(
            f"raw image of {len(msg.image or b'')} bytes does not fit shape {shape}", msg.request_id
        )
    return np.frombuffer(msg.image or b"", dtype=np.uint8).reshape(shape)


def _decode_image(msg: StageMessage, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(msg.image or b"")) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise CodecError(
                    f"image of {img.width}x{img.height} pixels is too large", msg.request_id
                )
            return np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CodecError(f"image does not decode: {exc}", msg.request_id) from exc


def tensor_from_message(
    msg: StageMessage, in_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The activation in a stage message -> (float32 [B, k, H, W], kept channel indices).

    ``in_shape`` is the slice's full per-sample input shape (C, H, W).
    """
    if msg.tensor is None:
        raise CodecError("this stage expects a tensor, got an image", msg.request_id)
    t = msg.tensor
    full = int(in_shape[0])
    if t.dtype != np.float32:
        raise CodecError(f"expected float32 activations, got {t.dtype}", msg.request_id)
    if t.ndim != len(in_shape) + 1 or tuple(t.shape[2:]) != tuple(in_shape[1:]):
        raise CodecError(
            f"activation shape {tuple(t.shape)} does not fit this slice's input "
            f"[B, {full}, {', '.join(map(str, in_shape[1:]))}]",
            msg.request_id,
        )
    if msg.full_channels is not None and msg.full_channels != full:
        raise CodecError(
            f"sender's full width {msg.full_channels} != this slice's {full}", msg.request_id
        )
    channels = None
    if msg.channels is not None:
        if len(msg.channels) != t.shape[1]:
            raise CodecError("channel index list does not match the tensor", msg.request_id)
        channels = torch.from_numpy(msg.channels.astype(np.int64))
    elif t.shape[1] != full:
        raise CodecError(
            f"{t.shape[1]} channels without indices; this slice needs {full}", msg.request_id
        )
    # np.frombuffer arrays are read-only; torch needs a writable buffer
    return torch.from_numpy(np.array(t, copy=True)), channels
