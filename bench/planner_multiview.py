"""The multi-view part of `edgeprune bench planner --multiview`: the accuracy of the multi-view
model on the test split with all views, per-view levels and lost views, and the planner's
per-view levels (view importance measured on the validation split)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from bench.planner_sim import random_devices
from edgeprune.commands._common import data_dir


def multiview_table(args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy of the multi-view model (test split): all views, per-view levels, lost views."""
    import torch

    from pipeline.calibration.accuracy import AccuracyModel
    from pipeline.data import load_animal_mnist, split_dataset
    from pipeline.multiview import (
        MultiViewCheckpoint,
        MultiViewConfig,
        MultiViewTraining,
        PrunedMultiView,
        train_multiview,
        view_levels,
    )

    splits = split_dataset(load_animal_mnist(data_dir(args)))
    if args.train or not args.multiview_checkpoint.exists():
        ckpt = train_multiview(
            MultiViewConfig(), splits, MultiViewTraining(), progress=not args.json
        )
        ckpt.save(args.multiview_checkpoint)
    ckpt = MultiViewCheckpoint.load(args.multiview_checkpoint)
    pm = PrunedMultiView(ckpt)
    names = [v.name for v in ckpt.config.views]
    y = torch.from_numpy(splits.test.labels)
    views = ckpt.view_tensors(splits.test.images)
    n_views, n_levels = len(names), len(pm.ratios)
    rows: list[dict[str, Any]] = []

    def add(what: str, levels: list[int], present: list[bool]) -> None:
        rows.append(
            {
                "case": what,
                "levels": levels,
                "present": present,
                "accuracy": pm.accuracy(views, y, levels, present),
            }
        )

    add("all views, unpruned", [0] * n_views, [True] * n_views)
    for lv in range(1, n_levels):
        add(f"all views, uniform level {lv}", [lv] * n_views, [True] * n_views)
    for uneven in ([0, 2, 5], [5, 2, 0], [2, 5, 0], [5, 5, 0], [0, 5, 5], [3, 1, 4]):
        add("per-view levels", uneven, [True] * n_views)
    for lost in range(n_views):
        add(f"view {names[lost]} lost", [0] * n_views, [v != lost for v in range(n_views)])
    for kept in range(n_views):
        add(f"only {names[kept]} (2 lost)", [0] * n_views, [v == kept for v in range(n_views)])
    val = ckpt.view_tensors(splits.val.images)
    yv = torch.from_numpy(splits.val.labels)
    imp = np.asarray(
        [
            [
                pm.accuracy(val, yv, [lv if u == v else 0 for u in range(n_views)])
                for lv in range(n_levels)
            ]
            for v in range(n_views)
        ]
    )
    model = AccuracyModel.from_importance(float(imp[0, 0]), imp, 10)
    t, mem = pm.branch_costs()
    rng = np.random.default_rng(args.seed)
    devs = random_devices(rng, n_views, mem[:, 0].max() / 2**20 / 1.0)
    chosen = view_levels(t, mem, devs, model.predict_views, float(imp[0, 0]) - 0.03)
    if chosen is not None:
        add("planner's per-view levels (floor val-0.03)", list(chosen[0]), [True] * n_views)
    return {
        "checkpoint": str(args.multiview_checkpoint),
        "views": names,
        "val_acc": ckpt.metrics.get("val_acc"),
        "train_s": ckpt.train.get("seconds"),
        "rows": rows,
        "view_importance_val": imp.tolist(),
        "branch_cpu_ms": (t * 1e3).tolist(),
        "branch_memory_kib": (mem / 1024).tolist(),
        "planned": None
        if chosen is None
        else {"levels": chosen[0], "bottleneck_s": chosen[1], "predicted_accuracy": chosen[2]},
    }
