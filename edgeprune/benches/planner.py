"""`edgeprune bench planner`: SlimEdge plans over random device mixes against two baselines.

Uses the measured per-block costs and importance of the checkpoint (controller.importance,
measured once and cached under runs/slimedge/). Each scenario draws 2-6 Raspberry-Pi-class
devices (speed relative to this machine, memory scaled to the model: ``--full-model-gb`` GB
hold exactly the whole model at level 0, so 0.5-1 GB boards cannot hold it), links, failure
probabilities, an accuracy floor (unpruned minus 0.5-4 points) and 0-3 simultaneous failures
(which devices fail: drawn in proportion to their failure probability). Three deployments are
planned on all devices and, if a failure hits a device they use, re-planned on the survivors
(failover); the bottleneck they then run at is compared:

- SlimEdge: partition + per-slice levels (``--objective``, default the failure-aware one);
- unpruned: the best level-0 partition that fits memory (none: a bound violation);
- uniform: one level everywhere, the smallest with a plan that fits memory and meets the floor
  (none: violation); ``_best``: the uniform level with the smallest bottleneck (the strongest
  uniform baseline: as much pruning as the floor allows).

Also: SlimEdge's failure-blind variant (how often a failure disrupts each), NSGA-II against
exact enumeration on ``--nsga-check`` scenarios, and the real accuracy of the most frequent
SlimEdge configurations on the test split (``--verify``). ``--multiview`` adds the multi-view
model's accuracy table (all views, per-view levels, lost views).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.commands._common import (
    add_checkpoint,
    add_data_dir,
    add_json,
    data_dir,
    format_table,
    print_json,
)

# name, speed relative to the profiling machine (the estimates of devices/three-mixed.toml:
# Pi 4B 0.10, Pi 3B+ 0.04, Pi 5 0.25; Pi Zero 2 W, a 1 GHz A53, ~0.03), memory options (GB),
# Wi-Fi only
CLASSES = (
    ("pi-zero-2w", 0.03, (0.5,), True),
    ("pi-3b", 0.04, (1.0,), False),
    ("pi-4b", 0.10, (1.0, 2.0, 4.0, 8.0), False),
    ("pi-5", 0.25, (2.0, 4.0, 8.0), False),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "planner",
        help="SlimEdge planner vs unpruned and uniform pruning",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", default="2,6", help="min,max devices per scenario")
    parser.add_argument(
        "--full-model-gb",
        type=float,
        default=2.0,
        help="simulated GB that hold exactly the whole unpruned model",
    )
    parser.add_argument("--objective", choices=["expected", "bottleneck"], default="expected")
    parser.add_argument(
        "--drop", default="0.005,0.04", help="accuracy floor = unpruned - U(lo, hi)"
    )
    parser.add_argument(
        "--nsga-check",
        type=int,
        default=30,
        help="scenarios on which NSGA-II is compared with exact search",
    )
    parser.add_argument(
        "--verify",
        type=int,
        default=8,
        help="measure the real accuracy of this many most frequent plans",
    )
    parser.add_argument("--multiview", action="store_true", help="add the multi-view table")
    parser.add_argument("--multiview-checkpoint", type=Path, default=Path("models/multiview-xs.pt"))
    parser.add_argument(
        "--train",
        action="store_true",
        help="(re)train the multi-view checkpoint first (a few minutes)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench/planner"))
    parser.add_argument("--measurements", type=Path, default=None)
    add_checkpoint(parser)
    add_data_dir(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def random_devices(rng: np.random.Generator, m: int, mib_per_gb: float) -> list[Any]:
    from pipeline.partition import Device

    out = []
    for k in range(m):
        name, speed, mems, wifi = CLASSES[int(rng.integers(len(CLASSES)))]
        eth = not wifi and rng.random() < 0.5
        out.append(
            Device(
                f"{name}-{k}",
                speed * float(rng.uniform(0.85, 1.15)),
                float(rng.choice(mems)) * mib_per_gb,
                float(rng.uniform(100, 900) if eth else rng.uniform(20, 80)),
                float(rng.uniform(0.3, 1.0) if eth else rng.uniform(2, 8)),
                float(rng.uniform(0.01, 0.3)),
            )
        )
    return out


def _deploy(plan_fn: Any, devices: list[Any], failed: set[str]) -> tuple[Any, bool]:
    """Plan on all devices; re-plan on the survivors if a failure hits a used device."""
    first = plan_fn(devices)
    hit = first is not None and bool(failed & set(first.devices))
    if first is None or hit:
        return plan_fn([d for d in devices if d.name not in failed]), hit
    return first, False


def simulate(
    planner: Any, costs: Any, unpruned_acc: float, args: argparse.Namespace
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    lo, hi = (int(v) for v in args.devices.split(","))
    drop_lo, drop_hi = (float(v) for v in args.drop.split(","))
    mib_per_gb = costs.footprint(0) / 2**20 / args.full_model_gb
    records = []
    for _ in tqdm(range(args.scenarios), desc="scenarios", disable=args.json, leave=False):
        m = int(rng.integers(lo, hi + 1))
        devices = random_devices(rng, m, mib_per_gb)
        floor = unpruned_acc - float(rng.uniform(drop_lo, drop_hi))
        k = int(rng.integers(0, min(3, m - 1) + 1))
        p = np.asarray([d.failure_prob for d in devices])
        failed = {devices[i].name for i in rng.choice(m, k, replace=False, p=p / p.sum())}

        def best(devs: list[Any], floor: float = floor, **kw: Any) -> Any:
            return planner.plan(devs, floor, **kw).best

        def uniform(devs: list[Any]) -> Any:
            return next(
                (b for lv in range(costs.n_levels) if (b := best(devs, levels=lv)) is not None),
                None,
            )

        def uniform_best(devs: list[Any]) -> Any:
            plans = [b for lv in range(costs.n_levels) if (b := best(devs, levels=lv))]
            return min(plans, key=lambda b: b.bottleneck_s) if plans else None

        se, se_hit = _deploy(lambda d: best(d, objective=args.objective), devices, failed)
        blind, blind_hit = _deploy(lambda d: best(d), devices, failed)
        un, _ = _deploy(lambda d: best(d, levels=0), devices, failed)
        uni, _ = _deploy(uniform, devices, failed)
        uni_best, _ = _deploy(uniform_best, devices, failed)
        records.append(
            {
                "devices": m,
                "failures": k,
                "floor": floor,
                "exact": planner.count(m) <= planner.exact_limit,
                "se_b": se and se.bottleneck_s,
                "se_acc": se and se.accuracy,
                "se_config": se and [[s.start, s.end, s.level] for s in se.stages],
                "se_hit": se_hit,
                "blind_b": blind and blind.bottleneck_s,
                "blind_hit": blind_hit,
                "un_b": un and un.bottleneck_s,
                "uni_b": uni and uni.bottleneck_s,
                "uni_level": uni and uni.levels[0],
                "uni_best_b": uni_best and uni_best.bottleneck_s,
                "uni_best_level": uni_best and uni_best.levels[0],
                "se_mem_ok": se is not None
                and all(s.memory_bytes <= s.cap_bytes for s in se.stages),
            }
        )
    return records


def _q(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    a = np.asarray(xs)
    return {
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "n": len(xs),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    vs_un = [r["un_b"] / r["se_b"] for r in records if r["un_b"] and r["se_b"]]
    vs_uni = [r["uni_b"] / r["se_b"] for r in records if r["uni_b"] and r["se_b"]]
    vs_best = [r["uni_best_b"] / r["se_b"] for r in records if r["uni_best_b"] and r["se_b"]]
    ok = [
        r["se_b"] is not None and r["se_mem_ok"] and r["se_acc"] >= r["floor"] - 1e-9
        for r in records
    ]
    n = len(records)
    by_k = {}
    for k in range(4):
        sub = [r for r in records if r["failures"] == k]
        if sub:
            by_k[str(k)] = {
                "scenarios": len(sub),
                "median_speedup_vs_unpruned": _q(
                    [r["un_b"] / r["se_b"] for r in sub if r["un_b"] and r["se_b"]]
                )["median"],
                "median_speedup_vs_uniform": _q(
                    [r["uni_b"] / r["se_b"] for r in sub if r["uni_b"] and r["se_b"]]
                )["median"],
                "median_speedup_vs_uniform_best": _q(
                    [r["uni_best_b"] / r["se_b"] for r in sub if r["uni_best_b"] and r["se_b"]]
                )["median"],
                "bounds_met_fraction": float(
                    np.mean([o for o, r in zip(ok, records, strict=True) if r["failures"] == k])
                ),
                "unpruned_violation_fraction": float(np.mean([r["un_b"] is None for r in sub])),
            }
    aware = [r["blind_b"] / r["se_b"] for r in records if r["blind_b"] and r["se_b"]]
    return {
        "scenarios": n,
        "median_speedup_vs_unpruned": _q(vs_un)["median"],
        "median_speedup_vs_uniform": _q(vs_uni)["median"],
        "median_speedup_vs_uniform_best": _q(vs_best)["median"],
        "bounds_met_fraction": float(np.mean(ok)),
        "speedup_vs_unpruned": _q(vs_un),
        "speedup_vs_uniform": _q(vs_uni),
        "unpruned_violation_fraction": float(np.mean([r["un_b"] is None for r in records])),
        "uniform_violation_fraction": float(np.mean([r["uni_b"] is None for r in records])),
        "slimedge_infeasible_fraction": float(np.mean([r["se_b"] is None for r in records])),
        "exact_fraction": float(np.mean([r["exact"] for r in records])),
        "disrupted_fraction_failure_aware": float(np.mean([r["se_hit"] for r in records])),
        "disrupted_fraction_failure_blind": float(np.mean([r["blind_hit"] for r in records])),
        "failure_blind_over_aware_bottleneck": _q(aware),
        "by_failures": by_k,
    }


def nsga_check(
    planner: Any, costs: Any, unpruned_acc: float, count: int, seed: int, full_gb: float
) -> dict[str, Any]:
    """NSGA-II vs exact enumeration on random 4-6 device scenarios (same objective)."""
    rng = np.random.default_rng(seed + 1)
    mib_per_gb = costs.footprint(0) / 2**20 / full_gb
    gaps, t_exact, t_nsga = [], [], []
    for _ in range(count):
        devices = random_devices(rng, int(rng.integers(4, 7)), mib_per_gb)
        floor = unpruned_acc - float(rng.uniform(0.005, 0.04))
        ex = planner.plan(devices, floor, method="exact")
        ns = planner.plan(devices, floor, method="nsga2", seed=seed)
        t_exact.append(ex.seconds)
        t_nsga.append(ns.seconds)
        if ex.best is not None:
            gaps.append(ns.best.objective_s / ex.best.objective_s - 1 if ns.best else np.inf)
    g = np.asarray(gaps)
    return {
        "scenarios": count,
        "compared": len(gaps),
        "optimal_fraction": float(np.mean(g < 1e-9)) if len(g) else None,
        "median_gap": float(np.median(g)) if len(g) else None,
        "max_gap": float(g.max()) if len(g) else None,
        "median_exact_s": statistics.median(t_exact) if t_exact else None,
        "median_nsga_s": statistics.median(t_nsga) if t_nsga else None,
    }


def verify(
    ckpt: Any, records: list[dict[str, Any]], top: int, cache: Path, data: Path
) -> dict[str, Any]:
    """Real test-split accuracy of the ``top`` most frequent SlimEdge configurations."""
    import torch

    from controller.importance import SliceBank, accuracy_of
    from pipeline.data import load_animal_mnist, split_dataset

    known = json.loads(cache.read_text()) if cache.exists() else {}
    counts = Counter(json.dumps(r["se_config"]) for r in records if r["se_config"])
    chosen = [c for c, _ in counts.most_common(top)]
    if any(c not in known for c in chosen):
        test = split_dataset(load_animal_mnist(data)).test
        bank = SliceBank(ckpt)
        x, y = ckpt.preprocess(test.images), torch.from_numpy(test.labels)
        for c in chosen:
            if c not in known:
                cfg = json.loads(c)
                known[c] = accuracy_of(
                    bank, x, y, [(a, b) for a, b, _ in cfg], [lv for _, _, lv in cfg]
                )
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    hits = [r for r in records if r["se_config"] and json.dumps(r["se_config"]) in chosen]
    met = [known[json.dumps(r["se_config"])] >= r["floor"] for r in hits]
    errs = [known[json.dumps(r["se_config"])] - r["se_acc"] for r in hits]
    return {
        "configs": len(chosen),
        "distinct_configs": len(counts),
        "scenarios_covered": len(hits) / max(1, len(records)),
        "floor_met_measured_fraction": float(np.mean(met)) if met else None,
        "measured_minus_predicted_median": float(np.median(errs)) if errs else None,
        "measured": {c: known[c] for c in chosen},
    }


def plot(records: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for a, key, name in ((ax[0], "un_b", "unpruned"), (ax[1], "uni_b", "uniform pruning")):
        xs = [r[key] / r["se_b"] for r in records if r[key] and r["se_b"]]
        a.hist(xs, bins=40, color="tab:blue")
        a.axvline(float(np.median(xs)) if xs else 1, color="k", ls="--", label="median")
        a.set_xlabel(f"bottleneck {name} / SlimEdge")
        a.set_ylabel("scenarios")
        a.set_title(f"speedup vs {name} ({len(xs)} scenarios where both fit)")
        a.legend()
    ks = sorted(summary["by_failures"])
    w = 0.27
    for i, (key, name) in enumerate(
        (
            ("bounds_met_fraction", "SlimEdge bounds met"),
            ("unpruned_violation_fraction", "unpruned: nothing fits"),
        )
    ):
        ax[2].bar(
            np.arange(len(ks)) + i * w, [summary["by_failures"][k][key] for k in ks], w, label=name
        )
    ax[2].set_xticks(np.arange(len(ks)) + w / 2, [f"{k} failed" for k in ks])
    ax[2].set_ylim(0, 1.05)
    ax[2].set_title("by simultaneous failures")
    ax[2].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def multiview_table(args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy of the multi-view model (test split): all views, per-view levels, lost views."""
    import torch

    from controller.importance import AccuracyModel
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


def run(args: argparse.Namespace) -> int:
    from controller.importance import fit_accuracy_model, load_or_measure
    from controller.planner import Planner
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import load_animal_mnist, split_dataset

    started = time.perf_counter()
    ckpt = load_checkpoint(args.checkpoint)
    splits = split_dataset(load_animal_mnist(data_dir(args)))
    m = load_or_measure(ckpt, splits.val, args.measurements, progress=not args.json)
    accuracy = fit_accuracy_model(m)
    planner = Planner(m.costs, accuracy)
    records = simulate(planner, m.costs, m.unpruned_accuracy, args)
    out = summarize(records)
    out["nsga_vs_exact"] = nsga_check(
        planner, m.costs, m.unpruned_accuracy, args.nsga_check, args.seed, args.full_model_gb
    )
    if args.verify:
        out["verified"] = verify(
            ckpt,
            records,
            args.verify,
            args.out_dir / (f"verified-{m.model_hash}.json"),
            data_dir(args),
        )
    if args.multiview:
        out["multiview"] = multiview_table(args)
    out["model"] = {
        "name": m.model_name,
        "hash": m.model_hash,
        "unpruned_val": m.unpruned_accuracy,
        "accuracy_model": {"kappa": accuracy.kappa, **accuracy.validation},
    }
    out["objective"], out["seed"] = args.objective, args.seed
    out["plot"] = str(plot(records, out, args.out_dir / "planner.png"))
    out["seconds"] = time.perf_counter() - started
    (args.out_dir / "records.json").write_text(json.dumps(records))
    if args.json:
        print_json(out)
        return 0
    rows = [
        [
            k,
            v["scenarios"],
            v["median_speedup_vs_unpruned"],
            v["median_speedup_vs_uniform"],
            v["median_speedup_vs_uniform_best"],
            v["bounds_met_fraction"],
            v["unpruned_violation_fraction"],
        ]
        for k, v in out["by_failures"].items()
    ]
    print(
        f"{out['scenarios']} scenarios (seed {args.seed}, objective {args.objective}, "
        f"{out['seconds']:.0f} s); exact search in {out['exact_fraction']:.0%}"
    )
    print(
        format_table(
            [
                "failures",
                "scenarios",
                "x unpruned",
                "x uniform (min level)",
                "x uniform (best level)",
                "bounds met",
                "unpruned: none fits",
            ],
            rows,
        )
    )
    print(
        f"median_speedup_vs_unpruned = {out['median_speedup_vs_unpruned']:.3f}, "
        f"median_speedup_vs_uniform = {out['median_speedup_vs_uniform']:.3f} (best uniform "
        f"level: {out['median_speedup_vs_uniform_best']:.3f}), "
        f"bounds_met_fraction = {out['bounds_met_fraction']:.3f}"
    )
    nc = out["nsga_vs_exact"]
    print(
        f"NSGA-II vs exact on {nc['compared']} scenarios: optimal {nc['optimal_fraction']}, "
        f"median gap {nc['median_gap']}, max gap {nc['max_gap']}"
    )
    if "verified" in out:
        v = out["verified"]
        print(
            f"measured accuracy of the {v['configs']} most frequent plans ("
            f"{v['scenarios_covered']:.0%} of scenarios): floor met in "
            f"{v['floor_met_measured_fraction']}"
        )
    if "multiview" in out:
        print(
            format_table(
                ["case", "levels", "present", "accuracy"],
                [
                    [r["case"], r["levels"], r["present"], r["accuracy"]]
                    for r in out["multiview"]["rows"]
                ],
            )
        )
    print(f"plot: {out['plot']}")
    return 0
