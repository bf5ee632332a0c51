"""Datasets: the numpy-only unpickler, the Animal-MNIST wheel reader and cache, the split,
preprocessing and the image-folder loader. No network: wheels and images are made in tmp_path."""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (
    ANIMAL_MNIST_CLASSES,
    ArrayDataset,
    Preprocess,
    fetch_animal_mnist,
    load_animal_mnist,
    load_dataset,
    load_image_folder,
    load_numpy_pickle,
    split_dataset,
)
from pipeline.errors import DatasetError

WHEEL_DIR = "animal_mnist/data/Animal_MNIST/"


class _Evil:
    """Unpickling this runs a shell command (what a malicious data file would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


# --- the numpy-only unpickler ------------------------------------------------------------


_NOT_YET = "needs a change in pipeline/data.py: allow {}"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_pickle_round_trips(protocol):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    out = load_numpy_pickle(pickle.dumps(arr, protocol=protocol))
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_legacy_numpy_core_module_name_is_accepted():
    # files pickled by numpy 1.x name numpy.core.multiarray; protocol 3 names globals as text
    arr = np.linspace(0, 1, 10, dtype=np.float32)
    raw = pickle.dumps(arr, protocol=3)
    assert b"numpy._core.multiarray" in raw
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    np.testing.assert_array_equal(load_numpy_pickle(legacy), arr)


def test_gzipped_pickle_is_read():
    arr = np.random.default_rng(0).integers(0, 10, 50).astype(np.int64)
    np.testing.assert_array_equal(load_numpy_pickle(gzip.compress(pickle.dumps(arr, 4))), arr)


@pytest.mark.parametrize("compress", [False, True])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capfd, compress):
    marker = tmp_path / "pwned"
    raw = pickle.dumps(_Evil(f"echo pwned > {marker}"))
    if compress:
        raw = gzip.compress(raw)
    with pytest.raises(DatasetError, match=r"refusing to unpickle .*system"):
        load_numpy_pickle(raw)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out


def test_evil_payload_nested_inside_an_array_list_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    raw = pickle.dumps([np.zeros(3), _Evil(f"touch {marker}")])
    with pytest.raises(DatasetError):
        load_numpy_pickle(raw)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [{"a": 1}, [1, 2, 3], "text"])
def test_a_pickle_that_is_not_an_array_is_refused(obj):
    with pytest.raises(DatasetError, match="expected a numpy array"):
        load_numpy_pickle(pickle.dumps(obj))


def test_truncated_or_garbage_pickles_are_refused():
    raw = pickle.dumps(np.arange(100))
    with pytest.raises(DatasetError):
        load_numpy_pickle(raw[: len(raw) // 2])
    with pytest.raises(DatasetError):
        load_numpy_pickle(b"definitely not a pickle")


# --- the Animal-MNIST wheel and its cache --------------------------------------------------


def _fake_animal_wheel(
    path: Path,
    n: int = 40,
    *,
    images_dtype: type = np.uint8,
    members: tuple[str, ...] = ("data", "label"),
    shape: tuple[int, int] = (28, 28),
) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, *shape)).astype(images_dtype)
    labels = np.arange(n) % 10
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("animal_mnist/__init__.py", "")
        if "data" in members:
            zf.writestr(WHEEL_DIR + "animal_data_version_3.gz", gzip.compress(pickle.dumps(images)))
        if "label" in members:
            zf.writestr(
                WHEEL_DIR + "animal_label_version_3.gz", gzip.compress(pickle.dumps(labels))
            )
    return path, images, labels


def test_fetch_from_a_local_wheel_caches_an_npz_and_is_idempotent(tmp_path):
    wheel, images, labels = _fake_animal_wheel(tmp_path / "animal_mnist-0.4-py3-none-any.whl")
    data = tmp_path / "data"
    cache = fetch_animal_mnist(data, wheel=wheel)
    assert cache == data / "animal_mnist.npz" and cache.exists()
    assert sorted(p.name for p in data.iterdir()) == ["animal_mnist.npz"]  # no temp left
    with np.load(cache) as npz:
        np.testing.assert_array_equal(npz["images"], images)
        np.testing.assert_array_equal(npz["labels"], labels)
        assert npz["images"].dtype == np.uint8 and npz["labels"].dtype == np.int64
    stamp = cache.stat().st_mtime_ns
    wheel.unlink()  # a second fetch must not need the wheel again
    assert fetch_animal_mnist(data, wheel=wheel) == cache
    assert cache.stat().st_mtime_ns == stamp
    ds = load_animal_mnist(data, fetch=False)
    assert len(ds) == len(labels) and ds.class_names == ANIMAL_MNIST_CLASSES
    assert ds.channels == 1 and ds.name == "animal-mnist"


def test_fetch_converts_float_images_to_uint8(tmp_path):
    wheel, images, _ = _fake_animal_wheel(tmp_path / "w.whl", images_dtype=np.float64)
    with np.load(fetch_animal_mnist(tmp_path / "d", wheel=wheel)) as npz:
        assert npz["images"].dtype == np.uint8
        np.testing.assert_array_equal(npz["images"], images.astype(np.uint8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"members": ("data",)}, "animal_label_version_3.gz is not in"),
        ({"shape": (32, 32)}, "unexpected Animal-MNIST shapes"),
    ],
)
def test_fetch_rejects_a_wrong_wheel(tmp_path, kwargs, match):
    wheel, *_ = _fake_animal_wheel(tmp_path / "w.whl", **kwargs)
    with pytest.raises(DatasetError, match=match):
        fetch_animal_mnist(tmp_path / "d", wheel=wheel)
    assert not (tmp_path / "d" / "animal_mnist.npz").exists()


def test_fetch_rejects_a_file_that_is_not_a_zip(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match="is not a wheel"):
        fetch_animal_mnist(tmp_path / "d", wheel=bad)


def test_fetch_refuses_a_wheel_carrying_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(
            WHEEL_DIR + "animal_data_version_3.gz",
            gzip.compress(pickle.dumps(_Evil(f"touch {marker}"))),
        )
        zf.writestr(
            WHEEL_DIR + "animal_label_version_3.gz",
            gzip.compress(pickle.dumps(np.zeros(3, np.int64))),
        )
    with pytest.raises(DatasetError, match="refusing"):
        fetch_animal_mnist(tmp_path / "d", wheel=wheel)
    assert not marker.exists()


def test_missing_cache_without_fetch_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="edgeprune data fetch"):
        load_animal_mnist(tmp_path, fetch=False)


# --- datasets, the split and preprocessing -------------------------------------------------


def _indexed_dataset(counts: list[int]) -> ArrayDataset:
    """Images that carry their own index in two pixels; ``counts[c]`` samples of class c."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    labels = labels[np.random.default_rng(3).permutation(len(labels))]
    images = np.zeros((len(labels), 4, 4), np.uint8)
    idx = np.arange(len(labels))
    images[:, 0, 0], images[:, 0, 1] = idx // 256, idx % 256
    return ArrayDataset(images, labels, tuple(f"c{c}" for c in range(len(counts))), "toy")


def _ids(ds: ArrayDataset) -> np.ndarray:
    return ds.images[:, 0, 0].astype(np.int64) * 256 + ds.images[:, 0, 1]


def test_split_is_disjoint_covers_everything_and_keeps_labels():
    ds = _indexed_dataset([100, 60, 240])
    splits = split_dataset(ds, val=0.1, test=0.2, seed=0)
    ids = [_ids(s) for s in (splits.train, splits.val, splits.test)]
    every = np.concatenate(ids)
    assert len(every) == len(ds) and len(np.unique(every)) == len(ds)
    for part, part_ids in zip((splits.train, splits.val, splits.test), ids, strict=True):
        np.testing.assert_array_equal(part.labels, ds.labels[part_ids])
        assert part.class_names == ds.class_names
    assert splits.val.name == "toy/val"


def test_split_is_stratified():
    counts = [100, 60, 240]
    splits = split_dataset(_indexed_dataset(counts), val=0.1, test=0.2, seed=5)
    for c, n in enumerate(counts):
        assert (splits.val.labels == c).sum() == round(0.1 * n)
        assert (splits.test.labels == c).sum() == round(0.2 * n)
        assert (splits.train.labels == c).sum() == n - round(0.1 * n) - round(0.2 * n)


def test_split_is_deterministic_per_seed():
    ds = _indexed_dataset([50, 50, 50])
    a, b = split_dataset(ds, seed=7), split_dataset(ds, seed=7)
    for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        np.testing.assert_array_equal(_ids(x), _ids(y))
    other = split_dataset(ds, seed=8)
    assert not np.array_equal(_ids(a.test), _ids(other.test))


@pytest.mark.parametrize(
    ("images", "labels", "names"),
    [
        (np.zeros((3, 4, 4), np.float32), np.zeros(3, np.int64), ("a",)),  # not uint8
        (np.zeros((3, 4), np.uint8), np.zeros(3, np.int64), ("a",)),  # wrong rank
        (np.zeros((3, 4, 4), np.uint8), np.zeros(2, np.int64), ("a",)),  # lengths differ
        (np.zeros((3, 4, 4), np.uint8), np.array([0, 1, 2]), ("a", "b")),  # label out of range
    ],
)
def test_array_dataset_validates(images, labels, names):
    with pytest.raises(DatasetError):
        ArrayDataset(images, labels, names)


def test_preprocess_grey_shapes_and_normalisation():
    pre = Preprocess(mean=0.5, std=0.25, size=28, channels=1)
    images = np.array([np.zeros((28, 28)), np.full((28, 28), 255)], np.uint8)
    x = pre(images)
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((1, 28, 28), -2.0))
    assert torch.allclose(x[1], torch.full((1, 28, 28), 2.0))
    assert pre(images[0]).shape == (1, 1, 28, 28)  # one image [H, W]
    assert Preprocess(**pre.to_dict()) == pre


def test_preprocess_rgb_resizes_and_checks_channels():
    rgb = np.random.default_rng(0).integers(0, 256, (3, 40, 30, 3)).astype(np.uint8)
    x = Preprocess(0.0, 1.0, 32, 3)(rgb)
    assert x.shape == (3, 3, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # no resize when the size already fits: pixels are just scaled
    square = rgb[:, :30, :30]
    assert torch.allclose(
        Preprocess(0.0, 1.0, 30, 3)(square),
        torch.from_numpy(square).permute(0, 3, 1, 2).float() / 255,
    )
    with pytest.raises(DatasetError, match="channel"):
        Preprocess(0.0, 1.0, 32, 1)(rgb)


def test_preprocess_fit_standardises():
    ds = _indexed_dataset([30, 30])
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(20, 200, (60, 8, 8)).astype(np.uint8), ds.labels, ds.class_names)
    pre = Preprocess.fit(ds, size=8)
    x = pre(ds.images)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-2
    assert pre.channels == 1 and pre.size == 8


# --- image folders -------------------------------------------------------------------------


def _image_folder(root: Path) -> dict[str, int]:
    """Three classes of PNG/JPEG images of different sizes and modes, a corrupt file and a
    note. Class 'bright' is white, 'dark' black, 'mixed' grey. Returns good images per class."""
    specs = {"bright": 255, "dark": 0, "mixed": 128}
    good = {}
    for k, (cls, value) in enumerate(specs.items()):
        folder = root / cls
        folder.mkdir(parents=True)
        n = 0
        for i, (size, mode, ext) in enumerate(
            [((20, 30), "L", "png"), ((64, 48), "RGB", "jpg"), ((28, 28), "RGB", "png")][: k + 1]
        ):
            colour = value if mode == "L" else (value,) * 3
            Image.new(mode, size, colour).save(folder / f"img{i}.{ext}")
            n += 1
        good[cls] = n
    (root / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    (root / "bright" / "notes.txt").write_text("not an image")
    return good


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_loads_classes_sizes_and_skips_a_corrupt_file(tmp_path, caplog, channels):
    root = tmp_path / "species"
    good = _image_folder(root)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        ds = load_image_folder(root, size=16, channels=channels)
    assert ds.class_names == ("bright", "dark", "mixed") and ds.name == "species"
    assert len(ds) == sum(good.values())
    assert ds.images.dtype == np.uint8
    assert ds.images.shape == ((len(ds), 16, 16) if channels == 1 else (len(ds), 16, 16, 3))
    assert ds.channels == channels
    for label, cls in enumerate(ds.class_names):
        assert (ds.labels == label).sum() == good[cls]
        mean = ds.images[ds.labels == label].astype(float).mean()
        expected = {"bright": 255, "dark": 0, "mixed": 128}[cls]
        assert abs(mean - expected) < 3  # JPEG is lossy, flat colours nearly survive
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.png" in warnings[0].getMessage()


def test_image_folder_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path / "missing", size=16)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no readable images"):
        load_image_folder(tmp_path / "empty", size=16)


def test_load_dataset_by_name_or_folder(tmp_path):
    root = tmp_path / "species"
    _image_folder(root)
    ds = load_dataset(str(root), tmp_path, size=12, channels=3)
    assert ds.images.shape[1:] == (12, 12, 3)
    wheel, images, _ = _fake_animal_wheel(tmp_path / "w.whl")
    fetch_animal_mnist(tmp_path / "data", wheel=wheel)
    mnist = load_dataset("animal-mnist", tmp_path / "data")
    np.testing.assert_array_equal(mnist.images, images)


def test_load_dataset_unknown_name_says_what_is_accepted(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar-100'.*animal-mnist"):
        load_dataset("cifar-100", tmp_path)


def test_npz_cache_holds_no_pickles(tmp_path):
    wheel, *_ = _fake_animal_wheel(tmp_path / "w.whl")
    cache = fetch_animal_mnist(tmp_path / "d", wheel=wheel)
    with np.load(io.BytesIO(cache.read_bytes()), allow_pickle=False) as npz:
        assert set(npz.files) == {"images", "labels"}
