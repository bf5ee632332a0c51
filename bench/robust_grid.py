"""The robustness grid: training regimes against accuracy per pruning level (issue 5).

Trains each regime on the default dataset and model with the same code as `edgeprune train`,
then measures validation accuracy at every level with the same code as `edgeprune prune-curve`
(the whole model as one slice, L1-ranked structured pruning, no fine-tuning), with BatchNorm
statistics re-estimated per level on the checkpoint's 256 calibration images (what the nodes
do) and without. Optionally also with the model cut into slices (``--cuts``), every slice at
the same level. Writes OUT/{table.md,results.json,plot.png} and keeps each checkpoint as
OUT/<name>.pt.

The recipe is chosen on the validation split only (:func:`choose_recipe`; the split of
pipeline.data.split_dataset, 10% of each class, disjoint from train and test), and the test
split is measured once, for the chosen recipe only (:func:`select_and_report`).

    .venv/bin/python -m bench.robust_grid                      # all regimes (about 25 min)
    .venv/bin/python -m bench.robust_grid --regimes width-robust --reuse
    .venv/bin/python -m bench.robust_grid --checkpoint standard=models/resnet-s-standard.pt
    .venv/bin/python -m bench.robust_grid --variant wr-20ep:width-robust:epochs=20

Run one grid at a time: it trains one model after another on all cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("robust_grid")

SELECTION_SPLIT = "val"  # every figure a recipe is chosen on
REPORT_SPLIT = "test"  # measured once, for the chosen recipe
# The goals of docs/bench/robust.md ("Must-show"), checked on SELECTION_SPLIT:
GOAL_RELATIVE = {"0.3": 0.97, "0.5": 0.90}  # accuracy at the ratio / unpruned accuracy
GOAL_VS_STANDARD = -0.01  # unpruned accuracy minus the standard regime's
GOAL_FIT_MAX_ERROR = 0.03  # the controller's logistic fit over per-slice level vectors
SELECTION_RULE = (
    f"among the recipes that meet every goal on {SELECTION_SPLIT} (all recipes if none does), "
    "the highest mean accuracy over the pruning ratios (whole model, BN re-estimated); "
    "ties: the higher unpruned accuracy, then the name"
)


@dataclass(frozen=True)
class RecipeScore:
    """One recipe's figures on the validation split, as the choice sees them."""

    name: str
    mean_accuracy: float  # over the ratios, whole model, BN re-estimated
    unpruned: float
    goals: dict[str, bool]  # goal -> met; goals without the data to check them are absent

    @property
    def meets_goals(self) -> bool:
        return all(self.goals.values())


def score_recipe(row: dict[str, Any], standard: dict[str, Any] | None) -> RecipeScore:
    """The validation figures of one grid row (``standard``: the standard regime's row)."""
    for r in (row, standard):
        if r is not None and r.get("split") != SELECTION_SPLIT:
            raise ValueError(
                f"row {r['name']!r} was measured on {r.get('split')!r}: a recipe is chosen on "
                f"{SELECTION_SPLIT!r} only"
            )
    acc = row["accuracy_by_ratio"]
    unpruned = acc["0"]
    goals: dict[str, bool] = {}
    for ratio, floor in GOAL_RELATIVE.items():
        if ratio in acc:
            goals[f"ratio {ratio} >= {floor:.0%} of unpruned"] = acc[ratio] >= floor * unpruned
    if standard is not None and standard is not row:
        goals[f"unpruned >= standard {GOAL_VS_STANDARD * 100:+g} points"] = (
            unpruned - standard["accuracy_by_ratio"]["0"] >= GOAL_VS_STANDARD
        )
    for cuts, fit in row.get("fit", {}).items():
        goals[f"fit error on cuts {cuts} <= {GOAL_FIT_MAX_ERROR * 100:g} points"] = (
            fit["max_abs_error"] <= GOAL_FIT_MAX_ERROR
        )
    return RecipeScore(row["name"], sum(acc.values()) / len(acc), unpruned, goals)


def choose_recipe(rows: list[dict[str, Any]]) -> tuple[RecipeScore, list[RecipeScore]]:
    """The chosen recipe and every recipe's score, by :data:`SELECTION_RULE`.

    Raises:
        ValueError: no rows, or a row not measured on the validation split.
    """
    if not rows:
        raise ValueError("no recipes to choose from")
    standard = next((r for r in rows if r["name"] == "standard"), None)
    scores = [score_recipe(r, standard) for r in rows]
    eligible = [s for s in scores if s.meets_goals] or scores
    chosen = min(eligible, key=lambda s: (-s.mean_accuracy, -s.unpruned, s.name))
    return chosen, scores


def select_and_report(
    rows: list[dict[str, Any]], measure_test: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """Choose on the validation rows, then measure the test split once, for the chosen
    recipe only (``measure_test(name)`` returns its test row)."""
    chosen, scores = choose_recipe(rows)
    test = measure_test(chosen.name)
    if test.get("split") != REPORT_SPLIT:
        raise ValueError(f"the report of {chosen.name!r} must be on {REPORT_SPLIT!r}")
    return {
        "split": SELECTION_SPLIT,
        "rule": SELECTION_RULE,
        "chosen": chosen.name,
        "meets_goals": chosen.meets_goals,
        "scores": [{**asdict(s), "meets_goals": s.meets_goals} for s in scores],
        "test": test,
    }


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``name:regime:key=value,key=value`` -> (name, regime, overrides)."""
    from pipeline.training import TrainConfig

    parts = text.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--variant needs NAME:REGIME[:key=value,...], got {text!r}")
    name, base = parts[0], parts[1]
    types = {f.name: f.type for f in fields(TrainConfig)}
    overrides: dict[str, Any] = {}
    for item in parts[2].split(",") if len(parts) == 3 and parts[2] else []:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in types:
            raise SystemExit(f"unknown TrainConfig field {key!r}")
        kind = str(types[key])
        if "bool" in kind:
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif "tuple" in kind:
            overrides[key] = tuple(float(v) for v in value.split("/"))
        elif "int" in kind:
            overrides[key] = int(value)
        elif "float" in kind:
            overrides[key] = float(value)
        else:
            overrides[key] = value
    return name, base, overrides


def train(name: str, config: Any, out: Path, data_dir: Path) -> Path:
    """Train one regime exactly as `edgeprune train` does; returns the checkpoint path.
    Nothing here looks at the test split."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.data import load_dataset, split_dataset
    from pipeline.models import preset
    from pipeline.training import train_model

    ds = load_dataset("animal-mnist", data_dir)
    splits = split_dataset(ds)
    model_config = preset(
        "resnet-s",
        num_classes=len(ds.class_names),
        class_names=ds.class_names,
        in_channels=ds.channels,
    )
    log.info("training %s: %s", name, config.to_dict())
    ckpt = train_model(model_config, splits, config, progress=False)
    path = save_checkpoint(ckpt, out / f"{name}.pt")
    log.info(
        "%s: val acc %.4f, %.0f s wall, %.0f s CPU",
        name,
        ckpt.metrics["val_acc"],
        ckpt.train["seconds"],
        ckpt.train.get("cpu_seconds", float("nan")),
    )
    return path


def evaluate(
    name: str,
    path: Path,
    ratios: tuple[float, ...],
    cuts: list[str],
    data_dir: Path,
    fit_cuts: list[str],
    split: str = SELECTION_SPLIT,
) -> dict[str, Any]:
    """Accuracy per level (and the fits on ``fit_cuts``) of one checkpoint on ``split``."""
    from edgeprune.commands.prune_curve import curve
    from pipeline.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    row: dict[str, Any] = {
        "name": name,
        "split": split,
        "checkpoint": str(path),
        "train_config": ckpt.train.get("config", {}),
        "train_seconds": ckpt.train.get("seconds"),
        "train_cpu_seconds": ckpt.train.get("cpu_seconds"),
        "threads": ckpt.train.get("threads"),
        "val_acc": ckpt.metrics.get("val_acc"),
        "size_bytes": path.stat().st_size,
    }
    started = time.perf_counter()
    for c in ["", *cuts]:
        result = curve(path, ratios, c, 8, data_dir, split)
        suffix = f"_cuts_{c.replace(',', '-')}" if c else ""
        row[f"accuracy_by_ratio{suffix}"] = result["accuracy_by_ratio"]
        row[f"accuracy_by_ratio_no_bn{suffix}"] = result["accuracy_by_ratio_no_bn"]
    for c in fit_cuts:
        row.setdefault("fit", {})[c] = fit_check(
            path, ratios, c, data_dir, bn="per-slice", split=split
        )
        row.setdefault("fit_per_vector_bn", {})[c] = fit_check(
            path, ratios, c, data_dir, bn="per-vector", split=split
        )
    acc = row["accuracy_by_ratio"]
    base = acc["0"]
    row["relative"] = {k: v / base for k, v in acc.items()} if base else {}
    log.info(
        "%s evaluated on %s in %.0f s: %s",
        name,
        split,
        time.perf_counter() - started,
        {k: round(v, 4) for k, v in acc.items()},
    )
    return row


def fit_check(
    path: Path,
    ratios: tuple[float, ...],
    cuts: str,
    data_dir: Path,
    *,
    bn: str = "per-slice",
    split: str = SELECTION_SPLIT,
) -> dict[str, Any]:
    """Accuracy at every per-slice level vector on ``cuts`` and the logistic fit's error.

    ``bn="per-slice"``: :class:`~pipeline.reference.ComposedPipeline`, i.e. what the nodes do:
    each slice keeps BatchNorm statistics per (own level, upstream level), estimated on what
    the upstream prefix produces when pruned uniformly at that level. ``bn="per-vector"``
    (measured here only, as a reference): for each level vector, every slice re-estimates its
    statistics on what the upstream slices produce at their actual, possibly different,
    levels. The two agree for two slices.
    Uses the controller's fit (:func:`pipeline.calibration.accuracy.fit_logistic_accuracy`,
    default form).
    """
    import itertools

    import torch

    from pipeline.calibration.accuracy import fit_logistic_accuracy
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import load_dataset, split_dataset
    from pipeline.pruning import PrunableSlice, recalibrate_batchnorm, scatter_channels
    from pipeline.reference import ComposedPipeline
    from pipeline.slicing import ModelSlice, parse_cuts
    from pipeline.training import accuracy

    ckpt = load_checkpoint(path)
    ds = getattr(split_dataset(load_dataset("animal-mnist", data_dir)), split)
    x, y = ckpt.preprocess(ds.images), torch.from_numpy(ds.labels)
    model = ckpt.build()
    bounds = parse_cuts(cuts, model.num_blocks)
    pipe = ComposedPipeline(ckpt, bounds, ratios=ratios)
    calib = ckpt.calibration_tensor()
    if bn == "per-vector":
        if calib is None:
            raise SystemExit(f"{path} carries no calibration images")
        pipe.slices = [PrunableSlice(ModelSlice(model, b), ratios) for b in bounds]
    elif bn != "per-slice":
        raise SystemExit(f"unknown BN mode {bn!r}")
    stored = [
        [{k: v.clone() for k, v in var.module.state_dict().items()} for var in s.variants]
        for s in pipe.slices
    ]
    points, accs = [], []
    for levels in itertools.product(range(len(ratios)), repeat=len(bounds)):
        pipe.set_levels(list(levels))
        if bn == "per-vector" and calib is not None:
            h, channels = calib, None
            for j, (s, level, saved) in enumerate(zip(pipe.slices, levels, stored, strict=True)):
                variant = s.variants[level]
                variant.module.load_state_dict(saved[level])
                if any(levels[: j + 1]):  # this slice or one upstream of it is pruned
                    full = scatter_channels(h, channels, s.model_slice.in_channels)
                    recalibrate_batchnorm(variant.module, full)
                out = s(h, channels)
                h, channels = out.tensor, out.channels
        points.append([ratios[i] for i in levels])
        accs.append(accuracy(pipe, x, y))
    fit = fit_logistic_accuracy(points, accs, num_classes=ckpt.config.num_classes)
    return {
        "cuts": cuts,
        "bn": bn,
        "split": split,
        "points": points,
        "accuracies": accs,
        "fit": fit.to_dict(),
        "max_abs_error": fit.max_abs_error,
    }


def table(
    rows: list[dict[str, Any]], ratios: tuple[float, ...], cuts: list[str], *, timing: bool = True
) -> str:
    keys = [f"{r:g}" for r in ratios]
    split = _split_name(rows)
    lines = [
        f"{split.capitalize()} accuracy (%) per pruning ratio, whole model as one slice, "
        "L1-ranked structured pruning, no fine-tuning.",
        "",
    ]
    head = "| regime | train | BN | " + " | ".join(keys) + " | 0.3 / 0 | 0.5 / 0 |"
    sep = "|" + "---|" * (len(keys) + 5)
    lines += [head, sep]
    for row in rows:
        cfg = row["train_config"]
        train_desc = (
            f"{cfg.get('epochs')} ep, b{cfg.get('batch_size')}, "
            f"wd {cfg.get('weight_decay'):g}"
            + (", width-robust" if cfg.get("width_robust") else "")
        )
        for label, key in (
            ("re-estimated", "accuracy_by_ratio"),
            ("stored", "accuracy_by_ratio_no_bn"),
        ):
            acc = row[key]
            base = acc["0"]
            rel = [100 * acc[k] / base if base else 0.0 for k in ("0.3", "0.5")]
            lines.append(
                f"| {row['name']} | {train_desc} | {label} | "
                + " | ".join(f"{100 * acc[k]:.1f}" for k in keys)
                + f" | {rel[0]:.1f}% | {rel[1]:.1f}% |"
            )
    for c in cuts:
        suffix = f"_cuts_{c.replace(',', '-')}"
        lines += [
            "",
            f"Same, model cut at blocks {c} (every slice at the same ratio; BN re-estimated):",
            "",
            "| regime | " + " | ".join(keys) + " |",
            "|" + "---|" * (len(keys) + 1),
        ]
        for row in rows:
            acc = row[f"accuracy_by_ratio{suffix}"]
            lines.append(
                f"| {row['name']} | " + " | ".join(f"{100 * acc[k]:.1f}" for k in keys) + " |"
            )
    fitted = [r for r in rows if r.get("fit")]
    if fitted:
        lines += [
            "",
            f"Every per-slice level vector on the cuts, {split} split, and the "
            "controller's logistic accuracy fit (pipeline.calibration.accuracy, default form). BN "
            "'nodes': ComposedPipeline, what the nodes do (statistics per own level x "
            "upstream level, upstream prefix pruned uniformly). BN 'exact': every "
            "slice re-estimated on the upstream's actual output for each vector "
            "(reference; equal to 'nodes' for two slices).",
            "",
            "| regime | cuts | BN | points | fit max abs error (points) | min acc | mean acc |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in fitted:
            for key, label in (("fit", "nodes"), ("fit_per_vector_bn", "exact")):
                for c, f in row.get(key, {}).items():
                    accs = f["accuracies"]
                    lines.append(
                        f"| {row['name']} | {c} | {label} | {len(f['points'])} | "
                        f"{100 * f['max_abs_error']:.2f} | "
                        f"{100 * min(accs):.1f} | {100 * sum(accs) / len(accs):.1f} |"
                    )
    if not timing:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Training time (2-core machine shared with other work; CPU seconds are the process's own):",
        "",
        "| regime | wall s | CPU s | threads | checkpoint MB |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        wall, cpu = row.get("train_seconds"), row.get("train_cpu_seconds")
        cells = [
            f"{wall:.0f}" if wall is not None else "n/a",
            f"{cpu:.0f}" if cpu is not None else "n/a",
            str(row.get("threads") or "n/a"),
            f"{row['size_bytes'] / 1e6:.1f}",
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _split_name(rows: list[dict[str, Any]]) -> str:
    splits = {r.get("split") for r in rows}
    if len(splits) != 1 or None in splits:
        raise ValueError(f"rows from different or unknown splits: {splits}")
    return str(splits.pop())


def selection_text(selection: dict[str, Any], ratios: tuple[float, ...], cuts: list[str]) -> str:
    """The choice made on the validation split and the chosen recipe's test figures."""
    lines = [
        "",
        f"## Choice of recipe ({selection['split']} split)",
        "",
        f"Rule: {selection['rule']}.",
        "",
        "| regime | mean acc over ratios | unpruned | goals met | goals missed |",
        "|---|---|---|---|---|",
    ]
    for score in selection["scores"]:
        missed = [goal for goal, met in score["goals"].items() if not met]
        lines.append(
            f"| {score['name']} | {100 * score['mean_accuracy']:.2f} | "
            f"{100 * score['unpruned']:.1f} | "
            f"{sum(score['goals'].values())}/{len(score['goals'])} | "
            f"{'; '.join(missed) or '-'} |"
        )
    verdict = "meets every goal" if selection["meets_goals"] else "misses a goal (none met all)"
    lines += [
        "",
        f"Chosen: **{selection['chosen']}** ({verdict}). Its {selection['test']['split']} "
        "split, measured once, after the choice:",
        "",
        table([selection["test"]], ratios, cuts, timing=False),
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, title in (
        (axes[0], "accuracy_by_ratio", "BN re-estimated per level"),
        (axes[1], "accuracy_by_ratio_no_bn", "stored BN statistics"),
    ):
        for row in rows:
            acc = row[key]
            ax.plot(
                [float(k) for k in acc], [100 * v for v in acc.values()], "o-", label=row["name"]
            )
        ax.axhline(10, color="grey", lw=0.8, ls=":", label="chance")
        ax.set_title(title)
        ax.set_xlabel("pruning ratio (every prunable layer, one slice)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{_split_name(rows)} accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Training regime vs. accuracy after structured L1 pruning, no fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from pipeline.training import REGIMES, regime

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--regimes",
        default=",".join(REGIMES),
        help="regimes to train (from pipeline.training.REGIMES); '' for none",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="an extra row NAME:REGIME:key=value,... (TrainConfig fields; tuples as 0/0.25/0.5)",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="evaluate an existing checkpoint instead of training: NAME=PATH",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="do not retrain a row whose OUT/<name>.pt exists"
    )
    parser.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5")
    parser.add_argument(
        "--cuts",
        action="append",
        default=[],
        help="also evaluate with the model cut here, e.g. 2 (repeatable)",
    )
    parser.add_argument(
        "--fit-cuts",
        action="append",
        default=[],
        help="also measure every per-slice level vector on these cuts and "
        "fit the controller's logistic accuracy model (repeatable)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("runs") / "robust-grid")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    ratios = tuple(float(r) for r in args.ratios.split(","))
    args.out.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, Any]] = [(n, regime(n)) for n in args.regimes.split(",") if n]
    for text in args.variant:
        name, base, overrides = parse_variant(text)
        jobs.append((name, regime(base, **overrides)))
    existing = dict(item.split("=", 1) for item in args.checkpoint)

    results_path = args.out / "results.json"
    previous: dict[str, Any] = {}
    if results_path.exists():  # rows of an older grid measured on the test split are dropped
        previous = {
            r["name"]: r
            for r in json.loads(results_path.read_text())["rows"]
            if r.get("split") == SELECTION_SPLIT
        }
    done: dict[str, dict[str, Any]] = dict(previous)
    for name, path_text in existing.items():
        done[name] = evaluate(
            name, Path(path_text), ratios, args.cuts, args.data_dir, args.fit_cuts
        )
    for name, config in jobs:
        path = args.out / f"{name}.pt"
        if not (args.reuse and path.exists()):
            path = train(name, config, args.out, args.data_dir)
        done[name] = evaluate(name, path, ratios, args.cuts, args.data_dir, args.fit_cuts)
        _write(args.out, done, ratios, args.cuts)  # keep partial results
    rows = _write(args.out, done, ratios, args.cuts)
    selection = select_and_report(
        rows,
        lambda name: evaluate(
            name,
            Path(done[name]["checkpoint"]),
            ratios,
            args.cuts,
            args.data_dir,
            args.fit_cuts,
            split=REPORT_SPLIT,
        ),
    )
    _write(args.out, done, ratios, args.cuts, selection)
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out / 'table.md'}, {results_path} and {args.out / 'plot.png'}")
    return 0


def _write(
    out: Path,
    done: dict[str, dict[str, Any]],
    ratios: tuple[float, ...],
    cuts: list[str],
    selection: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    from pipeline.training import REGIMES

    order = list(REGIMES)
    rows = sorted(
        done.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)
    )
    usable_cuts = [
        c for c in cuts if all(f"accuracy_by_ratio_cuts_{c.replace(',', '-')}" in r for r in rows)
    ]
    results: dict[str, Any] = {"ratios": list(ratios), "rows": rows}
    text = table(rows, ratios, usable_cuts)
    if selection is not None:
        results["selection"] = selection
        text += selection_text(selection, ratios, usable_cuts)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(text)
    plot(rows, out / "plot.png")
    return rows


if __name__ == "__main__":
    sys.exit(main())
