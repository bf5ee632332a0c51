"""Calibration fits recover known parameters; the accuracy constraint is linear in p."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.calibration.accuracy import LogisticAccuracyFit, fit_logistic_accuracy
from pipeline.calibration.latency import LinearFit, fit_linear
from pipeline.errors import ConfigError

RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def test_linear_recovers_noiseless_line() -> None:
    p = np.array(RATIOS)
    fit = fit_linear(p, -0.04 * p + 0.07)
    assert fit.a == pytest.approx(-0.04)
    assert fit.b == pytest.approx(0.07)
    assert fit.r2 == pytest.approx(1.0)


def test_linear_noisy_is_close_and_r2_below_one() -> None:
    rng = np.random.default_rng(0)
    p = np.repeat(RATIOS, 20)
    t = -0.04 * p + 0.07 + rng.normal(0, 0.001, p.size)
    fit = fit_linear(p, t)
    assert fit.a == pytest.approx(-0.04, abs=0.002)
    assert fit.b == pytest.approx(0.07, abs=0.001)
    assert 0.9 < fit.r2 < 1.0


def test_linear_predict_scalar_and_array() -> None:
    fit = LinearFit(a=-2.0, b=1.0, r2=1.0)
    assert fit.predict(0.25) == pytest.approx(0.5)
    assert isinstance(fit.predict(0.25), float)
    np.testing.assert_allclose(fit.predict(np.array([[0.0, 0.5]])), [[1.0, 0.0]])


@pytest.mark.parametrize(("p", "t"), [([0.1, 0.1], [1, 2]), ([0, 1], [1]), ([0, math.nan], [1, 2])])
def test_linear_rejects_bad_input(p: list[float], t: list[float]) -> None:
    with pytest.raises(ConfigError):
        fit_linear(p, t)


def _points(n_slices: int, m: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(RATIOS, size=(m, n_slices))


def test_paper_form_recovers_noiseless_parameters() -> None:
    true = LogisticAccuracyFit(g=(-8.0, -5.0, -12.0), d=-3.0, max_abs_error=0.0)
    P = _points(3, 150, 1)
    fit = fit_logistic_accuracy(P, true.predict(P), form="paper")
    assert fit.form == "paper" and (fit.lo, fit.hi) == (0.0, 1.0)
    np.testing.assert_allclose(fit.g, true.g, rtol=1e-4)
    assert fit.d == pytest.approx(true.d, rel=1e-4)
    assert fit.max_abs_error < 1e-6


def test_scaled_form_recovers_noiseless_parameters() -> None:
    true = LogisticAccuracyFit(g=(-8.0, -5.0, -12.0), d=-3.0, max_abs_error=0.0, lo=0.1, hi=0.93)
    P = _points(3, 200, 2)
    fit = fit_logistic_accuracy(P, true.predict(P), num_classes=10)
    assert fit.form == "scaled" and fit.lo == pytest.approx(0.1)
    np.testing.assert_allclose(fit.g, true.g, rtol=1e-4)
    assert fit.d == pytest.approx(true.d, rel=1e-4)
    assert fit.hi == pytest.approx(0.93, abs=1e-5)
    assert fit.max_abs_error < 1e-6


def test_scaled_form_noisy_data() -> None:
    true = LogisticAccuracyFit(g=(-8.0, -5.0, -12.0), d=-3.0, max_abs_error=0.0, lo=0.1, hi=0.93)
    P = _points(3, 300, 3)
    rng = np.random.default_rng(4)
    A = np.clip(true.predict(P) + rng.normal(0, 0.01, len(P)), 0, 1)
    fit = fit_logistic_accuracy(P, A, num_classes=10)
    np.testing.assert_allclose(fit.g, true.g, rtol=0.1)
    assert fit.hi == pytest.approx(0.93, abs=0.01)
    assert fit.max_abs_error == pytest.approx(np.max(np.abs(fit.predict(P) - A)))
    assert fit.max_abs_error < 0.05


def test_paper_form_fits_a_curve_from_092_to_chance_worse() -> None:
    """Why "scaled" is the default: the paper's 0..1 sigmoid cannot be both near 0.92 when
    unpruned and near chance when heavily pruned."""
    true = LogisticAccuracyFit(g=(-8.0, -5.0, -12.0), d=-3.0, max_abs_error=0.0, lo=0.1, hi=0.93)
    P = _points(3, 200, 5)
    A = true.predict(P)
    paper = fit_logistic_accuracy(P, A, form="paper")
    scaled = fit_logistic_accuracy(P, A, num_classes=10)
    assert paper.max_abs_error > 0.05 > 1e-3 > scaled.max_abs_error


def test_monotone_keeps_g_non_positive() -> None:
    # Slice 1 "helps" accuracy in this (noisy) data; the monotone fit clamps its g to 0.
    P = _points(2, 100, 6)
    A = 1 / (1 + np.exp(-(-10 * P[:, 0] + 0.5 * P[:, 1] + 3)))
    assert fit_logistic_accuracy(P, A, form="paper").g[1] == pytest.approx(0.0, abs=1e-6)
    assert fit_logistic_accuracy(P, A, form="paper", monotone=False).g[1] > 0.4


def test_predict_is_vectorised() -> None:
    fit = LogisticAccuracyFit(g=(-8.0, -5.0), d=-3.0, max_abs_error=0.0, lo=0.1, hi=0.9)
    P = _points(2, 7, 7)
    many = fit.predict(P)
    assert many.shape == (7,)
    for row, value in zip(P, many, strict=True):
        one = fit.predict(row)
        assert isinstance(one, float)
        assert one == pytest.approx(value)
    assert fit.predict(np.zeros(2)) == pytest.approx(0.1 + 0.8 / (1 + math.exp(-3.0)))
    # accuracy falls as any ratio rises (g < 0)
    assert fit.predict(np.array([0.1, 0.0])) < fit.predict(np.zeros(2))


@pytest.mark.parametrize("form", ["paper", "scaled"])
def test_score_threshold_is_the_accuracy_constraint(form: str) -> None:
    lo, hi = (0.0, 1.0) if form == "paper" else (0.1, 0.93)
    fit = LogisticAccuracyFit(g=(-8.0, -5.0, -12.0), d=-3.0, max_abs_error=0.0, lo=lo, hi=hi)
    P = np.random.default_rng(8).uniform(0, 0.5, size=(2000, 3))
    for a_min in (0.3, 0.6, 0.85):
        c = fit.score_threshold(a_min)
        np.testing.assert_array_equal(fit.predict(P) >= a_min, fit.score(P) >= c)
    assert fit.score_threshold(lo) == -math.inf
    assert fit.score_threshold(hi) == math.inf


def test_json_round_trip() -> None:
    for fit in (
        LinearFit(a=-0.01, b=0.05, r2=0.99),
        LogisticAccuracyFit(g=(-1.0, -2.0), d=-3.0, max_abs_error=0.01, lo=0.1, hi=0.9),
    ):
        back = type(fit).from_dict(json.loads(json.dumps(fit.to_dict())))
        assert back == fit


@pytest.mark.parametrize(
    "data",
    [
        {"g": [-1.0], "d": 0.0},
        {"g": "x", "d": 0.0, "max_abs_error": 0.0},
        {"g": [], "d": 0.0, "max_abs_error": 0.0},
        {"g": [-1.0], "d": 0.0, "max_abs_error": 0.0, "lo": 0.5, "hi": 0.4},
        {"kind": "linear", "g": [-1.0], "d": 0.0, "max_abs_error": 0.0},
        [1, 2],
    ],
)
def test_logistic_from_dict_rejects_bad_input(data: object) -> None:
    with pytest.raises(ConfigError):
        LogisticAccuracyFit.from_dict(data)  # type: ignore[arg-type]


def test_fit_logistic_rejects_bad_input() -> None:
    P = _points(2, 10, 9)
    with pytest.raises(ConfigError):
        fit_logistic_accuracy(P, np.full(9, 0.5))
    with pytest.raises(ConfigError):
        fit_logistic_accuracy(P, np.full(10, 1.5))
    with pytest.raises(ConfigError):
        fit_logistic_accuracy(P, np.full(10, 0.5), form="cubic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        fit_logistic_accuracy(P[:2], np.full(2, 0.5))
