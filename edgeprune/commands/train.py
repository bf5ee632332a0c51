"""`edgeprune train`: train a sliceable model and write a checkpoint that carries its config."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeprune.commands._common import add_data_dir, data_dir

# Known here without importing torch (--help stays fast); a unit test checks them against
# pipeline.training.REGIMES and pipeline.models.PRESETS.
DEFAULT_REGIME = "paper-robust"
REGIME_NAMES = ("paper-robust", "standard", "width-robust")
MODEL_PRESETS = ("resnet-s", "resnet-xs", "resnet18-cifar")
REGIME_SUMMARY = (
    "standard: 15 epochs, batch 64, weight decay 0.0005; paper-robust: 20 epochs, "
    "batch 16, weight decay 0.005; width-robust: 15 epochs, batch 64, weight "
    "decay 0.0005, width-robust"
)


def register(sub: argparse._SubParsersAction) -> None:
    regimes = REGIME_SUMMARY
    parser = sub.add_parser(
        "train",
        help="train a model and write a checkpoint",
        description="Train a sliceable ResNet on the default dataset (Animal-MNIST) or on a "
        "folder of images (one sub-folder per species). The checkpoint carries the model, "
        "training and preprocessing configs, the per-epoch history and 256 training images "
        "for BatchNorm re-estimation of pruned variants. A regime presets the options below "
        f"(any option given overrides it): {regimes}. The default regime ({DEFAULT_REGIME}) "
        "won the robustness grid (docs/bench/robust.md): a plain `edgeprune train` "
        "reproduces models/resnet-s.pt. The width-robust regime also trains, at every step, "
        "sub-networks pruned the way the nodes prune (sandwich rule, in-place distillation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--regime", default=DEFAULT_REGIME, choices=REGIME_NAMES, help="training preset"
    )
    parser.add_argument("--model", default="resnet-s", choices=MODEL_PRESETS, help="model preset")
    parser.add_argument(
        "--widths", default=None, help="override stage widths, comma separated (e.g. 80,160,320)"
    )
    parser.add_argument(
        "--depths", default=None, help="override blocks per stage, comma separated (e.g. 1,1,1)"
    )
    parser.add_argument(
        "--dataset",
        default="animal-mnist",
        help="animal-mnist, or a folder with one sub-folder per class",
    )
    add_data_dir(parser)
    parser.add_argument("--epochs", type=int, default=None, help="None: the regime's")
    parser.add_argument("--batch-size", type=int, default=None, help="None: the regime's")
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate, one-cycle; None: the regime's"
    )
    parser.add_argument("--weight-decay", type=float, default=None, help="None: the regime's")
    parser.add_argument("--no-augment", action="store_true", help="no random shifts and flips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    robust = parser.add_argument_group("width-robust training")
    robust.add_argument(
        "--width-robust",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train pruned sub-networks too; None: the regime's",
    )
    robust.add_argument(
        "--ratios",
        default=None,
        help="the system's pruning levels, e.g. 0,0.1,0.2,0.3,0.4,0.5 (None: the regime's)",
    )
    robust.add_argument(
        "--random-subnets",
        type=int,
        default=None,
        help="random sub-networks per step besides the smallest; None: the regime's",
    )
    robust.add_argument(
        "--mixed-prob",
        type=float,
        default=None,
        help="fraction of random sub-networks with random cuts and a level "
        "per slice; None: the regime's",
    )
    robust.add_argument(
        "--distill-weight",
        type=float,
        default=None,
        help="sub-network loss: this x distillation + (1 - this) x labels; None: the regime's",
    )
    robust.add_argument(
        "--mask-refresh",
        type=int,
        default=None,
        help="re-rank channels from the current weights every N steps; None: the regime's",
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="train on only this many training images (quick runs)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("models/resnet-s.pt"), help="checkpoint to write"
    )
    parser.set_defaults(func=run)


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in text.split(",")) if text else None


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import save_checkpoint
    from pipeline.data import load_dataset, split_dataset
    from pipeline.models import preset
    from pipeline.training import accuracy, regime, train_model

    probe = preset(args.model)
    ds = load_dataset(
        args.dataset, data_dir(args), size=probe.input_size, channels=probe.in_channels
    )
    splits = split_dataset(ds)
    if args.limit:
        import numpy as np

        splits = type(splits)(
            splits.train.subset(np.arange(min(args.limit, len(splits.train)))),
            splits.val,
            splits.test,
        )
    model_config = preset(
        args.model,
        widths=_ints(args.widths),
        depths=_ints(args.depths),
        num_classes=len(ds.class_names),
        class_names=ds.class_names,
        in_channels=ds.channels,
    )
    ratios = tuple(float(r) for r in args.ratios.split(",")) if args.ratios else None
    config = regime(
        args.regime,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        augment=not args.no_augment,
        seed=args.seed,
        threads=args.threads,
        width_robust=args.width_robust,
        subnet_ratios=ratios,
        random_subnets=args.random_subnets,
        mixed_prob=args.mixed_prob,
        distill_weight=args.distill_weight,
        mask_refresh=args.mask_refresh,
    )
    ckpt = train_model(model_config, splits, config)
    import torch

    model = ckpt.build()
    test_acc = accuracy(
        model, ckpt.preprocess(splits.test.images), torch.from_numpy(splits.test.labels)
    )
    ckpt.metrics["test_acc"] = test_acc
    path = save_checkpoint(ckpt, args.out)
    print(
        f"wrote {path} ({config.regime} regime): val acc {ckpt.metrics['val_acc']:.4f}, "
        f"test acc {test_acc:.4f}, {ckpt.train['seconds']:.0f} s wall, "
        f"{ckpt.train['cpu_seconds']:.0f} s CPU on {ckpt.train['threads']} thread(s)"
    )
    return 0
