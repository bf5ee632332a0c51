"""bench/robust_grid.py chooses the training recipe on the validation split and measures the
test split once, for the chosen recipe only. No training: rows are made up or faked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import robust_grid as grid

RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def _row(name: str, split: str, accs: tuple[float, ...], **extra: Any) -> dict[str, Any]:
    acc = {f"{r:g}": a for r, a in zip(RATIOS, accs, strict=True)}
    return {
        "name": name,
        "split": split,
        "checkpoint": f"/nowhere/{name}.pt",
        "train_config": {"epochs": 1, "batch_size": 16, "weight_decay": 5e-3},
        "size_bytes": 1,
        "accuracy_by_ratio": acc,
        "accuracy_by_ratio_no_bn": acc,
        **extra,
    }


# On val, "flat" is best; on test, "steep" would be: a choice that peeked at test picks "steep".
VAL = {
    "standard": (0.985, 0.97, 0.95, 0.93, 0.80, 0.66),
    "flat": (0.990, 0.990, 0.990, 0.985, 0.980, 0.975),
    "steep": (0.992, 0.990, 0.985, 0.975, 0.960, 0.930),
}
TEST = {
    "standard": (0.99, 0.98, 0.96, 0.94, 0.80, 0.67),
    "flat": (0.980, 0.975, 0.970, 0.965, 0.960, 0.950),
    "steep": (0.999, 0.999, 0.998, 0.998, 0.997, 0.996),
}


def test_chooses_on_val_and_measures_test_once_for_the_choice() -> None:
    rows = [_row(name, "val", accs) for name, accs in VAL.items()]
    measured: list[str] = []

    def measure_test(name: str) -> dict[str, Any]:
        measured.append(name)
        return _row(name, "test", TEST[name])

    selection = grid.select_and_report(rows, measure_test)
    assert selection["chosen"] == "flat" and selection["split"] == "val"
    assert measured == ["flat"]  # once, and only for the chosen recipe
    assert selection["test"]["split"] == "test"
    assert selection["test"]["accuracy_by_ratio"]["0.5"] == TEST["flat"][-1]
    assert selection["meets_goals"]
    scores = {s["name"]: s for s in selection["scores"]}
    assert not scores["standard"]["meets_goals"]  # 0.66 / 0.985 at ratio 0.5


def test_refuses_to_choose_on_anything_but_val() -> None:
    rows = [_row(name, "val", accs) for name, accs in VAL.items()]
    with pytest.raises(ValueError, match="chosen on 'val' only"):
        grid.choose_recipe([*rows[:2], _row("steep", "test", TEST["steep"])])
    legacy = _row("flat", "val", VAL["flat"])
    del legacy["split"]  # a row of an older grid, measured on test
    with pytest.raises(ValueError, match="chosen on 'val' only"):
        grid.choose_recipe([legacy])
    with pytest.raises(ValueError, match="must be on 'test'"):
        grid.select_and_report(rows, lambda name: _row(name, "val", VAL[name]))


def test_a_missed_goal_outweighs_a_higher_mean() -> None:
    fits = {"2": {"max_abs_error": 0.05}}  # the controller's fit is off by 5 points
    rows = [
        _row("flat", "val", VAL["flat"]),
        _row("better-but-unfittable", "val", (0.995,) * 6, fit=fits),
    ]
    chosen, scores = grid.choose_recipe(rows)
    assert chosen.name == "flat"
    missed = [g for g, met in scores[1].goals.items() if not met]
    assert missed == ["fit error on cuts 2 <= 3 points"]


def test_when_no_recipe_meets_the_goals_the_best_mean_is_chosen_and_flagged() -> None:
    rows = [
        _row("a", "val", (0.99, 0.9, 0.8, 0.7, 0.6, 0.5)),
        _row("b", "val", (0.98,) + (0.6,) * 5),
    ]
    selection = grid.select_and_report(rows, lambda name: _row(name, "test", (0.9,) * 6))
    assert selection["chosen"] == "a" and not selection["meets_goals"]


def test_the_grid_measures_val_for_every_row_and_test_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main() end to end with the evaluation faked: every recipe on val, then the chosen one
    on test, and the written report says which split each figure comes from."""
    calls: list[tuple[str, str]] = []

    def fake_evaluate(
        name: str,
        path: Path,
        ratios: Any,
        cuts: Any,
        data_dir: Any,
        fit_cuts: Any,
        split: str = "val",
    ) -> dict[str, Any]:
        calls.append((name, split))
        return _row(name, split, (VAL if split == "val" else TEST)[name])

    monkeypatch.setattr(grid, "evaluate", fake_evaluate)
    out = tmp_path / "grid"
    argv = ["--regimes", "", "--out", str(out)]
    for name in VAL:
        argv += ["--checkpoint", f"{name}={tmp_path / name}.pt"]
    assert grid.main(argv) == 0
    assert calls == [("standard", "val"), ("flat", "val"), ("steep", "val"), ("flat", "test")]
    results = json.loads((out / "results.json").read_text())
    assert {r["split"] for r in results["rows"]} == {"val"}
    assert results["selection"]["chosen"] == "flat"
    text = (out / "table.md").read_text()
    assert text.startswith("Val accuracy (%)")
    assert "Chosen: **flat** (meets every goal)" in text
    assert text.count("Test accuracy (%)") == 1
