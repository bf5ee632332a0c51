"""Calibration fits: slice latency against pruning ratio, and accuracy against per-slice ratios.

Two models, fitted offline once per model and device (see DESIGN.md, "Control loop"):

- **Latency** of slice i at pruning ratio p: ``t_i(p) = a_i p + b_i`` (:class:`LinearFit`,
  ordinary least squares, with R^2). ``a_i`` is normally negative: pruning makes a slice faster.
- **Accuracy** of the whole pipeline at per-slice ratios ``p = (p_1, ..., p_n)``
  (:class:`LogisticAccuracyFit`)::

      a(p) = lo + (hi - lo) / (1 + exp(-(sum_i g_i p_i - d)))

  The paper's form is ``lo = 0, hi = 1``. Write ``z(p) = g . p - d`` (the logit). With
  ``p = 0`` the accuracy is ``lo + (hi - lo) * sigmoid(-d)``, so a good unpruned model has
  ``d < 0``; accuracy FALLS as any ratio rises, so in this convention every ``g_i`` is
  NEGATIVE. A more negative ``g_i`` means slice i is more sensitive to pruning. By default the
  fit enforces ``g_i <= 0`` (``monotone=True``): a positive ``g_i`` would claim that pruning
  helps accuracy, which is measurement noise, and the optimizer would then prune that slice for
  free.

Why two forms. The paper's sigmoid runs from 1 (at ``z -> +inf``) to 0 (at ``z -> -inf``).
A real pruning curve instead runs from the unpruned accuracy (say 0.92) down to chance
(``1 / num_classes``). With ``lo = 0, hi = 1`` a curve that passes through 0.92 at ``p = 0``
is already on the steep part of the sigmoid, so it cannot be both flat for light pruning and
level off at chance for heavy pruning: the fit trades errors at the two ends. The ``"scaled"``
form fixes ``lo`` at chance and fits ``hi`` (the plateau the unpruned model sits on, bounded by
``[max(A) - 0.1, 1]``), which fits such curves well; it is the default. The constraint
``a(p) >= A_min`` stays linear in ``p`` in both forms (see :meth:`LogisticAccuracyFit.score_threshold`),
which is what the optimizer relies on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import least_squares

from pipeline.errors import ConfigError

AccuracyForm = Literal["paper", "scaled"]
FORMS: tuple[AccuracyForm, ...] = ("paper", "scaled")


def _finite_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LinearFit:
    """``t(p) = a p + b``, fitted by least squares; ``r2`` is the coefficient of determination."""

    a: float
    b: float
    r2: float

    def __post_init__(self) -> None:
        for name in ("a", "b", "r2"):
            _finite_float(getattr(self, name), f"LinearFit.{name}")

    @overload
    def predict(self, p: float) -> float: ...
    @overload
    def predict(self, p: NDArray[Any]) -> NDArray[np.float64]: ...

    def predict(self, p: float | NDArray[Any]) -> float | NDArray[np.float64]:
        """Predicted value at ratio ``p`` (a float, or an array of any shape)."""
        if isinstance(p, np.ndarray):
            return self.a * p.astype(np.float64) + self.b
        return self.a * float(p) + self.b

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "linear", "a": self.a, "b": self.b, "r2": self.r2}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinearFit:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a linear fit must be an object, got {type(data).__name__}")
        if data.get("kind", "linear") != "linear":
            raise ConfigError(f"expected a linear fit, got kind {data.get('kind')!r}")
        try:
            return cls(a=data["a"], b=data["b"], r2=data["r2"])
        except KeyError as exc:
            raise ConfigError(f"linear fit is missing {exc.args[0]!r}") from exc


def fit_linear(p: ArrayLike, t: ArrayLike) -> LinearFit:
    """Least-squares line through ``(p, t)``; needs at least two distinct ``p``."""
    x = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(t, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ConfigError(f"fit_linear: {x.size} ratios but {y.size} times")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ConfigError("fit_linear: ratios and times must be finite")
    if np.unique(x).size < 2:
        raise ConfigError("fit_linear needs at least two distinct ratios")
    design = np.column_stack([x, np.ones_like(x)])
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (a * x + b)
    ss_res = float(residual @ residual)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-30 else 0.0)
    return LinearFit(a=float(a), b=float(b), r2=r2)


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    # Split by sign so that exp never overflows.
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


@dataclass(frozen=True)
class LogisticAccuracyFit:
    """``a(p) = lo + (hi - lo) / (1 + exp(-(g . p - d)))``; ``g_i < 0`` (accuracy falls with p).

    ``max_abs_error`` is the largest absolute error of the fit on the points it was fitted to.
    ``lo = 0, hi = 1`` is the paper's form.
    """

    g: tuple[float, ...]
    d: float
    max_abs_error: float
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.g, tuple) or not self.g:
            raise ConfigError("LogisticAccuracyFit.g must be a non-empty tuple")
        for i, gi in enumerate(self.g):
            _finite_float(gi, f"LogisticAccuracyFit.g[{i}]")
        for name in ("d", "max_abs_error", "lo", "hi"):
            _finite_float(getattr(self, name), f"LogisticAccuracyFit.{name}")
        if not 0.0 <= self.lo < self.hi <= 1.0:
            raise ConfigError(f"need 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}")

    @property
    def n_slices(self) -> int:
        return len(self.g)

    @property
    def form(self) -> AccuracyForm:
        return "paper" if self.lo == 0.0 and self.hi == 1.0 else "scaled"

    def score(self, p: ArrayLike) -> NDArray[np.float64]:
        """``g . p`` for one ratio vector (shape ``(n,)``) or many (shape ``(m, n)``)."""
        arr = np.asarray(p, dtype=np.float64)
        if arr.shape[-1:] != (self.n_slices,):
            raise ConfigError(f"expected {self.n_slices} ratios per point, got shape {arr.shape}")
        return np.asarray(arr @ np.asarray(self.g, dtype=np.float64))

    @overload
    def predict(self, p: NDArray[Any]) -> NDArray[np.float64]: ...
    @overload
    def predict(self, p: ArrayLike) -> float | NDArray[np.float64]: ...

    def predict(self, p: ArrayLike) -> float | NDArray[np.float64]:
        """Accuracy at ratio vector(s) ``p``: a float for shape ``(n,)``, an array for ``(m, n)``."""
        z = np.atleast_1d(self.score(p) - self.d).astype(np.float64)
        acc = self.lo + (self.hi - self.lo) * _sigmoid(z)
        return float(acc[0]) if np.ndim(p) == 1 else acc

    def score_threshold(self, a_min: float) -> float:
        """The ``c`` such that ``a(p) >= a_min`` exactly when ``g . p >= c``.

        ``-inf`` when every ``p`` qualifies (``a_min <= lo``), ``+inf`` when none does
        (``a_min >= hi``: the sigmoid never reaches 1). This is what makes the accuracy
        constraint linear for the optimizer.
        """
        u = (a_min - self.lo) / (self.hi - self.lo)
        if u <= 0.0:
            return -math.inf
        if u >= 1.0:
            return math.inf
        return self.d + math.log(u / (1.0 - u))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "logistic_accuracy",
            "form": self.form,
            "g": list(self.g),
            "d": self.d,
            "lo": self.lo,
            "hi": self.hi,
            "max_abs_error": self.max_abs_error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogisticAccuracyFit:
        if not isinstance(data, Mapping):
            raise ConfigError(f"an accuracy fit must be an object, got {type(data).__name__}")
        if data.get("kind", "logistic_accuracy") != "logistic_accuracy":
            raise ConfigError(f"expected a logistic accuracy fit, got kind {data.get('kind')!r}")
        try:
            g = data["g"]
            if not isinstance(g, list | tuple):
                raise ConfigError(f"accuracy fit 'g' must be a list, got {g!r}")
            return cls(
                g=tuple(g),
                d=data["d"],
                max_abs_error=data["max_abs_error"],
                lo=data.get("lo", 0.0),
                hi=data.get("hi", 1.0),
            )
        except KeyError as exc:
            raise ConfigError(f"accuracy fit is missing {exc.args[0]!r}") from exc


def fit_logistic_accuracy(
    ratios: ArrayLike,
    accuracies: ArrayLike,
    *,
    form: AccuracyForm = "scaled",
    num_classes: int | None = None,
    monotone: bool = True,
) -> LogisticAccuracyFit:
    """Fit :class:`LogisticAccuracyFit` to ratio vectors ``P`` (m x n) and accuracies ``A`` (m).

    ``form="paper"`` fits ``g, d`` with ``lo = 0, hi = 1``. ``form="scaled"`` (the default)
    fixes ``lo = 1 / num_classes`` (chance; 0 when ``num_classes`` is not given) and fits
    ``hi`` as well, within ``[max(A) - 0.1, 1]``. ``monotone`` keeps every ``g_i <= 0``.
    Uses :func:`scipy.optimize.least_squares` from a linearised (logit) starting point.
    """
    if form not in FORMS:
        raise ConfigError(f"form must be one of {FORMS}, got {form!r}")
    P = np.asarray(ratios, dtype=np.float64)
    A = np.asarray(accuracies, dtype=np.float64).ravel()
    if P.ndim != 2 or P.shape[0] != A.size:
        raise ConfigError(
            f"need P of shape (points, slices) and one accuracy per point, got "
            f"P {P.shape}, A {A.shape}"
        )
    m, n = P.shape
    if not (np.all(np.isfinite(P)) and np.all(np.isfinite(A))):
        raise ConfigError("ratios and accuracies must be finite")
    if np.any(A < 0) or np.any(A > 1):
        raise ConfigError("accuracies must lie in [0, 1]")
    if m < n + (2 if form == "scaled" else 1):
        raise ConfigError(f"{m} points are too few to fit a {form} curve over {n} slices")
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")

    lo = 0.0 if form == "paper" or num_classes is None else 1.0 / num_classes
    if form == "scaled" and A.max() <= lo:
        raise ConfigError(f"every accuracy is at or below chance ({lo:.3g}); nothing to fit")
    hi0 = 1.0 if form == "paper" else min(1.0, float(A.max()) + 0.01)

    # Starting point: least squares on the logit of the rescaled accuracies.
    u = np.clip((A - lo) / (hi0 - lo), 1e-3, 1 - 1e-3)
    design = np.column_stack([P, -np.ones(m)])
    x0, *_ = np.linalg.lstsq(design, np.log(u / (1 - u)), rcond=None)
    g_upper = 0.0 if monotone else np.inf
    if monotone:
        x0[:n] = np.minimum(x0[:n], -1e-6)
    lower = [-np.inf] * (n + 1)
    upper = [g_upper] * n + [np.inf]
    if form == "scaled":
        hi_lo = max(lo + 1e-3, float(A.max()) - 0.1)
        x0 = np.append(x0, np.clip(hi0, hi_lo, 1.0))
        lower.append(hi_lo)
        upper.append(1.0)

    def model(x: NDArray[np.float64]) -> NDArray[np.float64]:
        hi = x[n + 1] if form == "scaled" else 1.0
        return lo + (hi - lo) * _sigmoid(P @ x[:n] - x[n])

    result = least_squares(
        lambda x: model(x) - A,
        x0,
        bounds=(lower, upper),
        method="trf",
        x_scale="jac",
        max_nfev=2000 * (n + 2),
    )
    x = result.x
    hi = float(x[n + 1]) if form == "scaled" else 1.0
    max_err = float(np.max(np.abs(model(x) - A)))
    return LogisticAccuracyFit(
        g=tuple(float(v) for v in x[:n]), d=float(x[n]), max_abs_error=max_err, lo=lo, hi=hi
    )
