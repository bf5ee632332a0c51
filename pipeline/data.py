"""Datasets: the default Animal-MNIST, and an ImageFolder-style loader for one's own images.

Animal-MNIST (10 animal silhouette classes, 10,000 grey 28x28 images, MIT licence) ships its
data inside the PyPI wheel ``animal-mnist``. We fetch that wheel with ``pip download --no-deps``
(never installing its TensorFlow dependency), read its two gzip'ed pickles with an unpickler
that only allows numpy arrays, and cache them as ``.npz``.

Every dataset is held as uint8 images ``[N, H, W]`` (grey) or ``[N, H, W, C]`` plus int64
labels; :class:`Preprocess` turns them into normalised float tensors ``[N, C, H, W]``.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.errors import DatasetError

log = logging.getLogger(__name__)

ANIMAL_MNIST_WHEEL = "animal-mnist==0.4"
# Class order as listed in the package's description (labels 0..9).
ANIMAL_MNIST_CLASSES = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
_MEMBERS = {"images": "animal_data_version_3.gz", "labels": "animal_label_version_3.gz"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ArrayDataset:
    """uint8 images [N, H, W] or [N, H, W, C], int64 labels [N], and the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise DatasetError("images must be uint8 of shape [N, H, W] or [N, H, W, C]")
        if len(self.images) != len(self.labels):
            raise DatasetError("images and labels differ in length")
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise DatasetError("a label is outside the class list")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    def subset(self, index: np.ndarray, name: str | None = None) -> ArrayDataset:
        return ArrayDataset(
            self.images[index], self.labels[index], self.class_names, name or self.name
        )


@dataclass(frozen=True)
class Splits:
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def split_dataset(ds: ArrayDataset, val: float = 0.1, test: float = 0.1, seed: int = 0) -> Splits:
    """A fixed, seeded, stratified train / validation / test split."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(len(ds.class_names)):
        idx = np.flatnonzero(ds.labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test, n_val = round(len(idx) * test), round(len(idx) * val)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    return Splits(*(ds.subset(out[k], f"{ds.name}/{k}") for k in ("train", "val", "test")))


@dataclass(frozen=True)
class Preprocess:
    """uint8 pixels -> normalised float32 [N, C, H, W]; stored with every checkpoint."""

    mean: float
    std: float
    size: int
    channels: int

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).div_(255.0)
        if x.ndim == 2:
            x = x[None]
        # [N, H, W] grey, or [N, H, W, C]
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[1] != self.channels:
            raise DatasetError(f"expected {self.channels} channel(s), got {x.shape[1]}")
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        return (x - self.mean) / self.std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def fit(cls, ds: ArrayDataset, size: int) -> Preprocess:
        pixels = ds.images.astype(np.float32) / 255.0
        return cls(float(pixels.mean()), float(pixels.std() + 1e-6), size, ds.channels)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (the data files are third-party pickles)."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 array pickles
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol 2 pickles store bytes through it
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module.startswith("numpy") and name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]

            return _reconstruct
        if module.startswith("numpy") and name == "_frombuffer":
            from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]

            return _frombuffer
        return super().find_class(module, name)


def load_numpy_pickle(raw: bytes) -> np.ndarray:
    """Read a (gzip'ed or plain) pickle that must hold one numpy array."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DatasetError(f"not a numpy-only pickle: {exc}") from exc
    if not isinstance(obj, np.ndarray):
        raise DatasetError(f"expected a numpy array, got {type(obj).__name__}")
    return obj


def _download_wheel(dest: Path, quiet: bool) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        ANIMAL_MNIST_WHEEL,
    ]
    if quiet:
        cmd.insert(4, "-q")
    log.info("fetching the Animal-MNIST wheel from PyPI (pip download --no-deps)")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("animal_mnist-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DatasetError(
            f"pip download of {ANIMAL_MNIST_WHEEL} failed: {proc.stderr.strip()[-500:]}"
        )
    return wheels[0]


def fetch_animal_mnist(data_dir: Path, *, wheel: Path | None = None, quiet: bool = False) -> Path:
    """Make sure ``data_dir/animal_mnist.npz`` exists; return its path (idempotent)."""
    data_dir = Path(data_dir)
    cache = data_dir / "animal_mnist.npz"
    if cache.exists():
        return cache
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        whl = wheel or _download_wheel(Path(tmp), quiet)
        arrays: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(whl) as zf:
                for key, member in _MEMBERS.items():
                    names = [n for n in zf.namelist() if n.endswith("/" + member)]
                    if not names:
                        raise DatasetError(f"{member} is not in {whl.name}")
                    arrays[key] = load_numpy_pickle(zf.read(names[0]))
        except zipfile.BadZipFile as exc:
            raise DatasetError(f"{whl} is not a wheel: {exc}") from exc
    images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DatasetError(f"unexpected Animal-MNIST shapes {images.shape} / {labels.shape}")
    tmp_path = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp_path, images=images.astype(np.uint8), labels=labels)
    shutil.move(tmp_path, cache)
    log.info("cached Animal-MNIST (%d images) at %s", len(labels), cache)
    return cache


def load_animal_mnist(data_dir: Path, *, fetch: bool = True) -> ArrayDataset:
    cache = Path(data_dir) / "animal_mnist.npz"
    if not cache.exists():
        if not fetch:
            raise DatasetError(f"{cache} is missing: run `edgeprune data fetch`")
        fetch_animal_mnist(Path(data_dir))
    with np.load(cache) as npz:
        return ArrayDataset(npz["images"], npz["labels"], ANIMAL_MNIST_CLASSES, "animal-mnist")


def load_image_folder(root: Path, *, size: int, channels: int = 1) -> ArrayDataset:
    """One sub-folder per class (e.g. ``root/zebra/*.jpg``); images resized to size x size."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected root/<class>/<images>)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    mode = "L" if channels == 1 else "RGB"
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    arr = np.asarray(
                        img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    )
            except (UnidentifiedImageError, OSError) as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            images.append(arr)
            labels.append(label)
    if not images:
        raise DatasetError(f"no readable images under {root}")
    return ArrayDataset(
        np.stack(images).astype(np.uint8), np.asarray(labels, np.int64), tuple(classes), root.name
    )


def load_dataset(name: str, data_dir: Path, *, size: int = 28, channels: int = 1) -> ArrayDataset:
    """``animal-mnist`` or a path to an ImageFolder-style directory."""
    if name in ("animal-mnist", "animal_mnist", "default"):
        return load_animal_mnist(data_dir)
    path = Path(name)
    if path.is_dir():
        return load_image_folder(path, size=size, channels=channels)
    raise DatasetError(
        f"unknown dataset {name!r}: use 'animal-mnist' or a folder of class sub-folders"
    )
