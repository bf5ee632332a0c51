"""`edgeprune bench planner`: SlimEdge plans over random device mixes against its baselines.

Uses the measured per-block costs and importance of the checkpoint (pipeline.calibration.slimedge,
measured once and cached under runs/slimedge/). Each scenario draws 2-6 Raspberry-Pi-class
devices (speed relative to this machine, memory scaled to the model: ``--full-model-gb`` GB
hold exactly the whole model at level 0, so 0.5-1 GB boards cannot hold it), links, failure
probabilities, an accuracy floor (unpruned validation accuracy minus 0.5-4 points) and 0-3
simultaneous failures (which devices fail: drawn in proportion to their failure probability).
Each deployment is planned on all devices and, if a failure hits a device it uses, re-planned
on the survivors (failover); the bottleneck it then runs at is compared:

- SlimEdge: partition + per-slice levels (``--objective``, default the failure-aware one);
- uniform (``median_speedup_vs_uniform``): the strongest uniform baseline, the one level
  everywhere whose plan has the smallest bottleneck among those meeting the memory caps and
  the floor (as much pruning as the floor allows); ``..._smallest_fitting_uniform``: the
  smallest such level (the weaker baseline reported before);
- unpruned: the best level-0 partition that fits memory (none: a bound violation).

Accuracy, measured: every plan must meet the floor predicted by the importance model AND,
measured on half a of the validation split, the floor plus a margin (the planner's measured
veto; the uniform baselines get the same veto). The margin is the smallest of 0-3 points with
which SlimEdge's plans on ``--margin-scenarios`` other scenarios meet their floor, measured on
half b of the validation split, in at least ``--veto-target`` of the plans. The headline
``bounds_met_fraction_measured`` is the fraction of SlimEdge's plans whose accuracy measured
on the TEST split meets the floor (test data is used for nothing else). Also: the same without
the veto, SlimEdge's failure-blind variant (how often a failure disrupts each), NSGA-II against
exact enumeration on ``--nsga-check`` scenarios. ``--multiview`` adds the multi-view model's
accuracy table (all views, per-view levels, lost views).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.goals import BenchReport, Goal, GoalSpec
from edgeprune.commands._common import (
    add_checkpoint,
    add_data_dir,
    add_json,
    data_dir,
    format_table,
)

GOALS = (
    GoalSpec("bounds_met_fraction_measured", ">=", 0.95),
    # not slower than the best uniform level in the median scenario
    GoalSpec("median_speedup_vs_uniform", ">=", 1.0),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "planner",
        help="SlimEdge planner vs the best uniform level and unpruned",
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
    veto = parser.add_mutually_exclusive_group()
    veto.add_argument(
        "--veto-margin",
        type=float,
        default=None,
        help="use this margin instead of choosing it on the validation split",
    )
    veto.add_argument(
        "--no-veto", action="store_true", help="predicted accuracy only (no measured veto)"
    )
    parser.add_argument(
        "--veto-target",
        type=float,
        default=0.95,
        help="fraction of plans that must meet the floor on validation half b (default 0.95)",
    )
    parser.add_argument(
        "--margin-scenarios",
        type=int,
        default=300,
        help="scenarios (another seed) on which the margin is chosen (default 300)",
    )
    parser.add_argument(
        "--nsga-check",
        type=int,
        default=30,
        help="scenarios on which NSGA-II is compared with exact search",
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


def goals(out: dict[str, Any]) -> tuple[Goal, ...]:
    """The figures ``GOALS`` name, as measured."""
    return tuple(spec.measured(out.get(spec.figure)) for spec in GOALS)


def run(args: argparse.Namespace) -> BenchReport:
    from bench.planner_sim import (
        Scenarios,
        choose_margin,
        distinct_configs,
        measure_plans,
        met_fraction,
        nsga_check,
        plot,
        simulate,
        summarize,
    )
    from controller.slimedge import Planner
    from pipeline.calibration.accuracy import MeasuredAccuracy, accuracy_cache, fit_accuracy_model
    from pipeline.calibration.slimedge import SliceBank, load_or_measure, split_halves
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import load_animal_mnist, split_dataset

    started = time.perf_counter()
    ckpt = load_checkpoint(args.checkpoint)
    splits = split_dataset(load_animal_mnist(data_dir(args)))
    m = load_or_measure(ckpt, splits.val, args.measurements, progress=not args.json)
    accuracy = fit_accuracy_model(m)
    bank = SliceBank(ckpt, m.costs.ratios, int(m.meta.get("round_to", 8)))
    veto_half, check_half = split_halves(splits.val)

    def measured_on(data: Any) -> MeasuredAccuracy:
        return MeasuredAccuracy(bank, data, accuracy_cache(m, data))

    veto, check, test = measured_on(veto_half), measured_on(check_half), measured_on(splits.test)

    def planner_with(margin: float | None) -> Planner:
        if margin is None:
            return Planner(m.costs, accuracy)
        return Planner(m.costs, accuracy, measured=veto, measured_margin=margin)

    unpruned = m.unpruned_accuracy
    evaluation = Scenarios.from_args(args, args.scenarios, args.seed)
    choice: dict[str, Any] | None = None
    margin: float | None = None
    if args.veto_margin is not None:
        margin, choice = args.veto_margin, {"margin": args.veto_margin, "given": True}
    elif not args.no_veto:
        calibration = Scenarios.from_args(args, args.margin_scenarios, args.seed + 1)
        choice = choose_margin(
            planner_with, m.costs, unpruned, calibration, check, args.veto_target
        )
        margin = choice["margin"]
    records = simulate(planner_with(margin), m.costs, unpruned, evaluation, progress=not args.json)
    out = summarize(
        records, measure_plans(records, test), measure_plans(records, test, "uni_best_config")
    )
    out["veto"] = None
    if margin is not None:
        plain = simulate(planner_with(None), m.costs, unpruned, evaluation, baselines=False)
        out["veto"] = {
            "measured_on": f"{veto_half.name} ({len(veto_half)} images)",
            "margin_chosen_on": f"{check_half.name} ({len(check_half)} images)",
            "margin": margin,
            "choice": choice,
            "without_veto": {
                "bounds_met_fraction_measured": met_fraction(plain, measure_plans(plain, test)),
                "plans": sum(r["se_b"] is not None for r in plain),
            },
        }
    out["slimedge_configs"] = distinct_configs(records)
    out["nsga_vs_exact"] = nsga_check(
        planner_with(None), m.costs, unpruned, args.nsga_check, args.seed, args.full_model_gb
    )
    for measured in (veto, check, test):
        measured.save()
    if args.multiview:
        from bench.planner_multiview import multiview_table

        out["multiview"] = multiview_table(args)
    out["model"] = {
        "name": m.model_name,
        "hash": m.model_hash,
        "unpruned_val": unpruned,
        "accuracy_model": {"kappa": accuracy.kappa, **accuracy.validation},
    }
    out["objective"], out["seed"] = args.objective, args.seed
    out["plot"] = str(plot(records, out, args.out_dir / "planner.png"))
    out["seconds"] = time.perf_counter() - started
    (args.out_dir / "records.json").write_text(json.dumps(records))
    return BenchReport(out, render(out), goals(out))


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(out: dict[str, Any]) -> str:
    rows = [
        [
            k,
            v["scenarios"],
            v["median_speedup_vs_unpruned"],
            v["median_speedup_vs_uniform"],
            v["median_speedup_vs_smallest_fitting_uniform"],
            v["bounds_met_fraction_measured"],
            v["slimedge_infeasible_fraction"],
            v["unpruned_violation_fraction"],
        ]
        for k, v in out["by_failures"].items()
    ]
    vu = out["vs_uniform"]
    lines = [
        f"{out['scenarios']} scenarios (seed {out['seed']}, objective {out['objective']}, "
        f"{out['seconds']:.0f} s); exact search in {out['exact_fraction']:.0%}",
        format_table(
            [
                "failures",
                "scenarios",
                "x unpruned",
                "x uniform (best level)",
                "x uniform (smallest fitting)",
                "floor met (test)",
                "no plan",
                "unpruned: none fits",
            ],
            rows,
        ),
        f"median_speedup_vs_uniform (best uniform level) = "
        f"{_f(out['median_speedup_vs_uniform'])}: SlimEdge faster in "
        f"{_f(vu['faster_fraction'], '.1%')}, tied in {_f(vu['tie_fraction'], '.1%')}, slower "
        f"in {_f(vu['slower_fraction'], '.1%')} of {vu['compared']} scenarios (slowest "
        f"{_f(vu['min'])}x)",
        f"median_speedup_vs_smallest_fitting_uniform = "
        f"{_f(out['median_speedup_vs_smallest_fitting_uniform'])}, median_speedup_vs_unpruned "
        f"= {_f(out['median_speedup_vs_unpruned'])}",
        f"bounds_met_fraction_measured = {_f(out['bounds_met_fraction_measured'])} of "
        f"{out['plans']} plans (test split; predicted: "
        f"{_f(out['bounds_met_fraction_predicted'])}; best uniform level's plans: "
        f"{_f(out.get('uniform_bounds_met_fraction_measured'))}); no plan in "
        f"{_f(out['slimedge_infeasible_fraction'], '.1%')} of the scenarios",
    ]
    veto = out["veto"]
    if veto is None:
        lines.append("measured veto: off (predicted accuracy only)")
    else:
        plain = veto["without_veto"]
        lines.append(
            f"measured veto on {veto['measured_on']}, margin {veto['margin']:g} (chosen on "
            f"{veto['margin_chosen_on']}); without the veto: "
            f"{_f(plain['bounds_met_fraction_measured'])} of {plain['plans']} plans"
        )
    nc = out["nsga_vs_exact"]
    lines.append(
        f"NSGA-II vs exact on {nc['compared']} scenarios: optimal {nc['optimal_fraction']}, "
        f"median gap {nc['median_gap']}, max gap {nc['max_gap']}"
    )
    if "multiview" in out:
        lines.append(
            format_table(
                ["case", "levels", "present", "accuracy"],
                [
                    [r["case"], r["levels"], r["present"], r["accuracy"]]
                    for r in out["multiview"]["rows"]
                ],
            )
        )
    lines.append(f"plot: {out['plot']}")
    return "\n".join(lines)
