"""`edgeprune data fetch|info`: the default dataset (Animal-MNIST from its PyPI wheel)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeprune.commands._common import add_data_dir, data_dir


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="fetch and inspect the default dataset",
        description="Fetch Animal-MNIST (10 animal classes, 10,000 grey "
        "28x28 images) from its PyPI wheel with `pip download --no-deps`, "
        "read it with a numpy-only unpickler and cache it as .npz.",
    )
    dsub = parser.add_subparsers(dest="data_cmd", metavar="ACTION")
    fetch = dsub.add_parser("fetch", help="download and cache the dataset (idempotent)")
    add_data_dir(fetch)
    fetch.add_argument(
        "--wheel", type=Path, default=None, help="use this already downloaded animal_mnist wheel"
    )
    fetch.add_argument("--quiet", action="store_true", help="print nothing when cached")
    fetch.set_defaults(func=_fetch)
    info = dsub.add_parser("info", help="class counts of the fixed train/val/test split")
    add_data_dir(info)
    info.add_argument(
        "--dataset",
        default="animal-mnist",
        help="animal-mnist, or a folder with one sub-folder per class",
    )
    info.set_defaults(func=_info)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _fetch(args: argparse.Namespace) -> int:
    from pipeline.data import fetch_animal_mnist

    target = data_dir(args) / "animal_mnist.npz"
    existed = target.exists()
    path = fetch_animal_mnist(data_dir(args), wheel=args.wheel, quiet=args.quiet)
    if not (args.quiet and existed):
        print(f"Animal-MNIST cached at {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import numpy as np

    from edgeprune.commands._common import format_table
    from pipeline.data import load_dataset, split_dataset

    ds = load_dataset(args.dataset, data_dir(args))
    splits = split_dataset(ds)
    rows = []
    for c, name in enumerate(ds.class_names):
        rows.append(
            [
                c,
                name,
                *(int(np.sum(s.labels == c)) for s in (splits.train, splits.val, splits.test)),
            ]
        )
    print(f"{ds.name}: {len(ds)} images of shape {ds.images.shape[1:]}")
    print(format_table(["label", "class", "train", "val", "test"], rows))
    return 0
