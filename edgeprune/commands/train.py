"""`edgeprune train`: train a sliceable model and write a checkpoint that carries its config."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeprune.commands._common import add_data_dir, data_dir


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.models import PRESETS

    parser = sub.add_parser(
        "train", help="train a model and write a checkpoint",
        description="Train a sliceable ResNet on the default dataset (Animal-MNIST) or on a "
        "folder of images (one sub-folder per species). The checkpoint carries the model, "
        "training and preprocessing configs, the per-epoch history and 256 training images "
        "for BatchNorm re-estimation of pruned variants. The paper's pruning-aware regimes are "
        "plain options: e.g. --batch-size 16 --weight-decay 5e-3 --epochs 30.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet-s", choices=sorted(PRESETS),
                        help="model preset")
    parser.add_argument("--widths", default=None,
                        help="override stage widths, comma separated (e.g. 80,160,320)")
    parser.add_argument("--depths", default=None,
                        help="override blocks per stage, comma separated (e.g. 1,1,1)")
    parser.add_argument("--dataset", default="animal-mnist",
                        help="animal-mnist, or a folder with one sub-folder per class")
    add_data_dir(parser)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (one-cycle)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--no-augment", action="store_true", help="no random shifts and flips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--limit", type=int, default=0,
                        help="train on only this many training images (quick runs)")
    parser.add_argument("--out", type=Path, default=Path("models/resnet-s.pt"),
                        help="checkpoint to write")
    parser.set_defaults(func=run)


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in text.split(",")) if text else None


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import save_checkpoint
    from pipeline.data import load_dataset, split_dataset
    from pipeline.models import preset
    from pipeline.training import TrainConfig, accuracy, train_model

    probe = preset(args.model)
    ds = load_dataset(args.dataset, data_dir(args), size=probe.input_size,
                      channels=probe.in_channels)
    splits = split_dataset(ds)
    if args.limit:
        import numpy as np

        splits = type(splits)(splits.train.subset(np.arange(min(args.limit, len(splits.train)))),
                              splits.val, splits.test)
    model_config = preset(args.model, widths=_ints(args.widths), depths=_ints(args.depths),
                          num_classes=len(ds.class_names), class_names=ds.class_names,
                          in_channels=ds.channels)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, augment=not args.no_augment,
                         seed=args.seed, threads=args.threads)
    ckpt = train_model(model_config, splits, config)
    import torch

    model = ckpt.build()
    test_acc = accuracy(model, ckpt.preprocess(splits.test.images),
                        torch.from_numpy(splits.test.labels))
    ckpt.metrics["test_acc"] = test_acc
    path = save_checkpoint(ckpt, args.out)
    print(f"wrote {path}: val acc {ckpt.metrics['val_acc']:.4f}, test acc {test_acc:.4f}, "
          f"{ckpt.train['seconds']:.0f} s on {ckpt.train['threads']} thread(s)")
    return 0
