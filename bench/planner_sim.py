"""The simulation behind `edgeprune bench planner`: random device mixes, the deployments it
compares, the measured accuracy of the plans, the margin of the measured veto, the summary and
the plot (see ``bench.planner`` for what is compared and why)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# name, speed relative to the profiling machine (the estimates of devices/three-mixed.toml:
# Pi 4B 0.10, Pi 3B+ 0.04, Pi 5 0.25; Pi Zero 2 W, a 1 GHz A53, ~0.03), memory options (GB),
# Wi-Fi only
CLASSES = (
    ("pi-zero-2w", 0.03, (0.5,), True),
    ("pi-3b", 0.04, (1.0,), False),
    ("pi-4b", 0.10, (1.0, 2.0, 4.0, 8.0), False),
    ("pi-5", 0.25, (2.0, 4.0, 8.0), False),
)
# margins of the measured veto tried on the validation split, smallest first
MARGINS = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03)
_TIE = 1e-9  # relative: bottlenecks this close are the same plan speed

Accuracy = Callable[[Sequence[tuple[int, int]], Sequence[int]], float]


@dataclass(frozen=True)
class Scenarios:
    """How scenarios are drawn (the bench's options)."""

    count: int
    seed: int
    devices: tuple[int, int]
    drop: tuple[float, float]
    full_model_gb: float
    objective: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, count: int, seed: int) -> Scenarios:
        lo, hi = (int(v) for v in args.devices.split(","))
        drop_lo, drop_hi = (float(v) for v in args.drop.split(","))
        return cls(count, seed, (lo, hi), (drop_lo, drop_hi), args.full_model_gb, args.objective)


def random_devices(rng: np.random.Generator, m: int, mib_per_gb: float) -> list[Any]:
    from pipeline.devices import Device

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


def _config(plan: Any) -> list[list[int]] | None:
    return (
        None
        if plan is None
        else [[s.bounds.start, s.bounds.end, s.level] for s in plan.placement.stages]
    )


def simulate(
    planner: Any,
    costs: Any,
    unpruned_acc: float,
    how: Scenarios,
    *,
    baselines: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One record per scenario: what each deployment runs at after its failover. Without
    ``baselines`` only SlimEdge (what choosing the veto margin needs)."""
    from tqdm import tqdm

    rng = np.random.default_rng(how.seed)
    lo, hi = how.devices
    mib_per_gb = costs.footprint(0) / 2**20 / how.full_model_gb
    records = []
    for _ in tqdm(range(how.count), desc="scenarios", disable=not progress, leave=False):
        m = int(rng.integers(lo, hi + 1))
        devices = random_devices(rng, m, mib_per_gb)
        floor = unpruned_acc - float(rng.uniform(*how.drop))
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

        def uniform_best(devs: list[Any], floor: float = floor) -> Any:
            return planner.best_uniform(devs, floor)

        se, se_hit = _deploy(lambda d: best(d, objective=how.objective), devices, failed)
        record = {
            "devices": m,
            "failures": k,
            "floor": floor,
            "exact": planner.count(m) <= planner.exact_limit,
            "se_b": se and se.bottleneck_s,
            "se_acc": se and se.accuracy,
            "se_config": _config(se),
            "se_hit": se_hit,
            "se_mem_ok": se is not None
            and all(m <= c for m, c in zip(se.memory_bytes, se.cap_bytes, strict=True)),
        }
        if baselines:
            blind, blind_hit = _deploy(lambda d: best(d), devices, failed)
            un, _ = _deploy(lambda d: best(d, levels=0), devices, failed)
            uni, _ = _deploy(uniform, devices, failed)
            uni_best, _ = _deploy(uniform_best, devices, failed)
            record.update(
                {
                    "blind_b": blind and blind.bottleneck_s,
                    "blind_hit": blind_hit,
                    "un_b": un and un.bottleneck_s,
                    "uni_b": uni and uni.bottleneck_s,
                    "uni_level": uni and uni.levels[0],
                    "uni_best_b": uni_best and uni_best.bottleneck_s,
                    "uni_best_level": uni_best and uni_best.levels[0],
                    "uni_best_config": _config(uni_best),
                }
            )
        records.append(record)
    return records


def measure_plans(
    records: list[dict[str, Any]], accuracy: Accuracy, key: str = "se_config"
) -> list[float | None]:
    """The measured accuracy of every record's ``key`` configuration (None: no plan)."""
    out: list[float | None] = []
    for r in records:
        cfg = r.get(key)
        out.append(
            None
            if cfg is None
            else accuracy([(int(a), int(b)) for a, b, _ in cfg], [int(lv) for _, _, lv in cfg])
        )
    return out


def met_fraction(records: list[dict[str, Any]], measured: Sequence[float | None]) -> float | None:
    """Among the plans (records with one), the fraction whose measured accuracy meets the
    scenario's floor and whose slices fit their memory caps."""
    met = [
        a >= r["floor"] - _TIE and bool(r.get("se_mem_ok", True))
        for r, a in zip(records, measured, strict=True)
        if a is not None
    ]
    return float(np.mean(met)) if met else None


def choose_margin(
    planner_with: Callable[[float], Any],
    costs: Any,
    unpruned_acc: float,
    how: Scenarios,
    check: Accuracy,
    target: float,
    margins: Sequence[float] = MARGINS,
) -> dict[str, Any]:
    """The smallest veto margin whose SlimEdge plans meet their floor, measured on ``check``
    (data the veto did not see), in at least ``target`` of the plans; the largest margin if
    none does. Validation data only: the test split is not touched here."""
    tried: list[dict[str, Any]] = []
    for margin in margins:
        records = simulate(planner_with(margin), costs, unpruned_acc, how, baselines=False)
        fraction = met_fraction(records, measure_plans(records, check))
        tried.append(
            {
                "margin": margin,
                "bounds_met_fraction": fraction,
                "plans": sum(r["se_config"] is not None for r in records),
            }
        )
        if fraction is not None and fraction >= target:
            return {"margin": margin, "reached": True, "target": target, "tried": tried}
    return {"margin": margins[-1], "reached": False, "target": target, "tried": tried}


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


def _ratios(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] / r["se_b"] for r in records if r.get(key) and r["se_b"]]


def _median(xs: list[float]) -> float | None:
    return _q(xs)["median"]


def _fraction(values: Sequence[bool]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarize(
    records: list[dict[str, Any]],
    test: Sequence[float | None],
    uniform_test: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """The figures of the report; ``test``: the measured test accuracy of each SlimEdge plan
    (``uniform_test``: of each best-uniform plan)."""
    vs_best = _ratios(records, "uni_best_b")
    predicted_ok = [
        r["se_mem_ok"] and r["se_acc"] >= r["floor"] - _TIE for r in records if r["se_b"]
    ]
    by_k = {}
    for k in range(4):
        idx = [i for i, r in enumerate(records) if r["failures"] == k]
        sub = [records[i] for i in idx]
        if sub:
            by_k[str(k)] = {
                "scenarios": len(sub),
                "median_speedup_vs_unpruned": _median(_ratios(sub, "un_b")),
                "median_speedup_vs_uniform": _median(_ratios(sub, "uni_best_b")),
                "median_speedup_vs_smallest_fitting_uniform": _median(_ratios(sub, "uni_b")),
                "bounds_met_fraction_measured": met_fraction(sub, [test[i] for i in idx]),
                "slimedge_infeasible_fraction": float(np.mean([r["se_b"] is None for r in sub])),
                "unpruned_violation_fraction": float(np.mean([r["un_b"] is None for r in sub])),
            }
    aware = [r["blind_b"] / r["se_b"] for r in records if r["blind_b"] and r["se_b"]]
    out = {
        "scenarios": len(records),
        "bounds_met_fraction_measured": met_fraction(records, test),
        "plans": sum(r["se_b"] is not None for r in records),
        "median_speedup_vs_uniform": _median(vs_best),
        "median_speedup_vs_smallest_fitting_uniform": _median(_ratios(records, "uni_b")),
        "median_speedup_vs_unpruned": _median(_ratios(records, "un_b")),
        "vs_uniform": {
            "compared": len(vs_best),
            "faster_fraction": _fraction([v > 1 + _TIE for v in vs_best]),
            "tie_fraction": _fraction([abs(v - 1) <= _TIE for v in vs_best]),
            "slower_fraction": _fraction([v < 1 - _TIE for v in vs_best]),
            "min": min(vs_best) if vs_best else None,
        },
        "bounds_met_fraction_predicted": _fraction(predicted_ok),
        "speedup_vs_uniform": _q(vs_best),
        "speedup_vs_smallest_fitting_uniform": _q(_ratios(records, "uni_b")),
        "speedup_vs_unpruned": _q(_ratios(records, "un_b")),
        "unpruned_violation_fraction": float(np.mean([r["un_b"] is None for r in records])),
        "uniform_violation_fraction": float(np.mean([r["uni_b"] is None for r in records])),
        "slimedge_infeasible_fraction": float(np.mean([r["se_b"] is None for r in records])),
        "exact_fraction": float(np.mean([r["exact"] for r in records])),
        "disrupted_fraction_failure_aware": float(np.mean([r["se_hit"] for r in records])),
        "disrupted_fraction_failure_blind": float(np.mean([r["blind_hit"] for r in records])),
        "failure_blind_over_aware_bottleneck": _q(aware),
        "by_failures": by_k,
    }
    if uniform_test is not None:
        out["uniform_bounds_met_fraction_measured"] = _fraction(
            [
                a >= r["floor"] - _TIE
                for r, a in zip(records, uniform_test, strict=True)
                if a is not None
            ]
        )
    return out


def distinct_configs(records: list[dict[str, Any]], key: str = "se_config") -> dict[str, int]:
    """How often each configuration was planned, most frequent first."""
    counts: dict[str, int] = {}
    for r in records:
        if r.get(key) is not None:
            name = " ".join(f"[{a},{b})@{lv}" for a, b, lv in r[key])
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


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


def plot(records: list[dict[str, Any]], summary: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for a, key, name in (
        (ax[0], "un_b", "unpruned"),
        (ax[1], "uni_best_b", "the best uniform level"),
    ):
        xs = _ratios(records, key)
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
            ("bounds_met_fraction_measured", "SlimEdge plans: floor met on test"),
            ("slimedge_infeasible_fraction", "SlimEdge: no plan"),
            ("unpruned_violation_fraction", "unpruned: nothing fits"),
        )
    ):
        ax[2].bar(
            np.arange(len(ks)) + i * w,
            [summary["by_failures"][k][key] or 0.0 for k in ks],
            w,
            label=name,
        )
    ax[2].set_xticks(np.arange(len(ks)) + w, [f"{k} failed" for k in ks])
    ax[2].set_ylim(0, 1.05)
    ax[2].set_title("by simultaneous failures")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
