"""The accuracy side of a calibration: how accurate the split model is at given pruning levels,
measured (:func:`accuracy_at_levels`, the one function that runs slices at levels and counts
correct answers) and modelled. Two models, each fitted to such measurements:

- **The logistic fit** (:class:`LogisticAccuracyFit`, the calibration file's model, DESIGN.md
  "Control loop"): accuracy of the whole pipeline at per-slice ratios ``p = (p_1, ..., p_n)``::

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
  (``1 / num_classes``). With ``lo = 0, hi = 1`` a curve that passes through 0.92 at
  ``p = 0`` is already on the steep part of the sigmoid, so it cannot be both flat for light
  pruning and level off at chance for heavy pruning: the fit trades errors at the two ends.
  The ``"scaled"`` form fixes ``lo`` at chance and fits ``hi`` (the plateau the unpruned model
  sits on, bounded by ``[max(A) - 0.1, 1]``), which fits such curves well; it is the default.
  The constraint ``a(p) >= A_min`` stays linear in ``p`` in both forms (see
  :meth:`LogisticAccuracyFit.score_threshold`), which is what the optimizer relies on.

- **The measured importance table** (:class:`AccuracyModel`, the SlimEdge planner's model,
  fitted to :class:`~pipeline.calibration.slimedge.Measurements`). With
  ``u(a) = (a - lo) / (hi - lo)`` (``lo`` = chance, ``hi`` = 1) and ``z = logit(u)``, a unit's
  importance in logit units is ``delta[r, l] = z(unpruned) - z(acc[r, l])`` (clipped at 0,
  non-decreasing in l), where ``acc[r, l]`` is the measured accuracy when ONLY unit r (a
  contiguous block range, or a view) is pruned, at level l. A configuration with slices
  ``(r_t, l_t)`` is predicted by

      z = z(unpruned) - kappa * sum_t delta[r_t, l_t]

  ``kappa`` (how pruning several slices compounds) is fitted on measured combos and validated
  by leave-one-out. A configuration with one pruned slice is predicted exactly when
  ``kappa = 1``. The same model serves per-view levels of a multi-view model (units = views).

:class:`MeasuredAccuracy` is not a model but the real thing, measured once per configuration
and remembered (the planner's measured veto).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import least_squares, minimize_scalar

from pipeline.calibration.latency import finite_float
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it runs: the controller loads fits without it
    import torch

    from pipeline.calibration.slimedge import Measurements, Range, SliceBank
    from pipeline.data import ArrayDataset
    from pipeline.pruning import PrunableSlice

log = logging.getLogger(__name__)

AccuracyForm = Literal["paper", "scaled"]
FORMS: tuple[AccuracyForm, ...] = ("paper", "scaled")
LevelVector = tuple[int, ...]
DEFAULT_A_MIN = 0.8  # the accuracy floor the paper keeps (for the fit check)


# ----------------------------------------------------------------------------------------------
# Measuring accuracy at levels


def accuracy_at_levels(
    slices: Sequence[PrunableSlice],
    vectors: Sequence[Sequence[int]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 500,
    on_point: Callable[[], None] | None = None,
) -> list[float]:
    """End-to-end accuracy on ``(x, y)`` of ``slices`` run back to back at each level vector
    (one level per slice; results in the given order), as the nodes run them: the kept
    channels and the upstream level (BatchNorm statistics) pass on. ``x`` is the input of the
    first slice (images, or a cached activation).

    Vectors are visited in lexicographic order and a slice's output is reused while the levels
    before and at it are unchanged (a prefix cache): the same numbers as running every vector
    from scratch, faster. The slices are left at the last vector visited.
    """
    import torch

    n = len(slices)
    order = sorted(range(len(vectors)), key=lambda k: tuple(vectors[k]))
    results = [0.0] * len(vectors)
    # stack[i]: (level of slice i, its output chunks, the kept channels) for the current prefix
    stack: list[tuple[int, list[torch.Tensor], torch.Tensor | None]] = []
    for k in order:
        vec = tuple(int(v) for v in vectors[k])
        if len(vec) != n:
            raise ConfigError(f"need {n} levels per vector, got {vec}")
        for s, level in zip(slices, vec, strict=True):
            s.set_level(level)
        keep = 0
        while keep < len(stack) and keep < n - 1 and stack[keep][0] == vec[keep]:
            keep += 1
        del stack[keep:]
        chunks = list(torch.split(x, batch_size)) if keep == 0 else stack[-1][1]
        channels = None if keep == 0 else stack[-1][2]
        with torch.no_grad():
            for i in range(keep, n):
                upstream = vec[i - 1] if i > 0 else None
                outs = [slices[i](c, channels, upstream) for c in chunks]
                chunks = [o.tensor for o in outs]
                channels = outs[0].channels if outs else None
                stack.append((vec[i], chunks, channels))
        predicted = torch.cat([c.argmax(1) for c in chunks])
        results[k] = float((predicted == y).float().mean())
        if on_point is not None:
            on_point()
    return results


class MeasuredAccuracy:
    """The real end-to-end accuracy of configurations (slice bounds, a level per slice) on one
    labelled set, measured once each (:func:`accuracy_at_levels`) and remembered, in a JSON file too
    when ``cache`` is given (keyed by the configuration; name the file after the model and the
    set). Callable as the planner's measured veto (``Planner(measured=...)``)."""

    def __init__(self, bank: SliceBank, data: ArrayDataset, cache: Path | None = None) -> None:
        self.bank, self.data, self.cache = bank, data, cache
        self._xy: tuple[torch.Tensor, torch.Tensor] | None = None  # preprocessed on first use
        self.known: dict[str, float] = {}
        if cache is not None and cache.exists():
            try:
                self.known = {str(k): float(v) for k, v in json.loads(cache.read_text()).items()}
            except (OSError, ValueError, AttributeError) as exc:
                raise ConfigError(f"cannot read measured accuracies {cache}: {exc}") from exc
        self._saved = len(self.known)

    @staticmethod
    def key(bounds: Sequence[Range], levels: Sequence[int]) -> str:
        return json.dumps(
            [[int(i), int(j), int(lv)] for (i, j), lv in zip(bounds, levels, strict=True)]
        )

    def __call__(self, bounds: Sequence[Range], levels: Sequence[int]) -> float:
        key = self.key(bounds, levels)
        if key not in self.known:
            if self._xy is None:
                import torch

                x = self.bank.ckpt.preprocess(self.data.images)
                self._xy = x, torch.from_numpy(self.data.labels)
            slices = self.bank.slices([(int(i), int(j)) for i, j in bounds])
            self.known[key] = accuracy_at_levels(slices, [levels], *self._xy)[0]
            log.debug("measured %s on %s: %.4f", key, self.data.name, self.known[key])
        return self.known[key]

    def save(self) -> None:
        """Write the cache file if something new was measured."""
        if self.cache is None or len(self.known) == self._saved:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.known, indent=0))
        tmp.replace(self.cache)
        self._saved = len(self.known)


def accuracy_cache(m: Measurements, data: ArrayDataset, root: Path = Path("runs/slimedge")) -> Path:
    """Where :class:`MeasuredAccuracy` keeps the accuracies of ``m``'s model on ``data``: the
    file is named after the model and the set's name and content (images and labels), so a
    changed data set never reads another's accuracies."""
    digest = hashlib.sha256(np.ascontiguousarray(data.images).tobytes())
    digest.update(np.ascontiguousarray(data.labels).tobytes())
    name = data.name.replace("/", "-")
    return root / f"accuracy-{m.model_name}-{m.model_hash}-{name}-{digest.hexdigest()[:12]}.json"


# ----------------------------------------------------------------------------------------------
# The logistic fit


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
            finite_float(gi, f"LogisticAccuracyFit.g[{i}]")
        for name in ("d", "max_abs_error", "lo", "hi"):
            finite_float(getattr(self, name), f"LogisticAccuracyFit.{name}")
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
        """Accuracy at ratio vector(s) ``p``: a float for shape ``(n,)``, an array for
        ``(m, n)``."""
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


def accuracy_fit_check(
    points: Sequence[Sequence[float]],
    accuracies: Sequence[float],
    fit: LogisticAccuracyFit,
    a_min: float = DEFAULT_A_MIN,
) -> dict[str, Any]:
    """How far the accuracy fit is off, overall and where the controller looks: the points
    measured or predicted at or above ``a_min``, and how many the fit calls feasible
    (predicted >= a_min) although they measured below (the costly mistake)."""
    A = np.asarray(accuracies, dtype=np.float64)
    pred = np.asarray(fit.predict(np.asarray(points, dtype=np.float64)))
    err = np.abs(pred - A)
    near = (a_min <= A) | (pred >= a_min)
    return {
        "max_abs_error": float(err.max()),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "a_min": a_min,
        "points_near_a_min": int(near.sum()),
        "max_abs_error_near_a_min": float(err[near].max()) if near.any() else None,
        "falsely_feasible": int(((pred >= a_min) & (a_min > A)).sum()),
    }


# ----------------------------------------------------------------------------------------------
# The measured importance table


def _logit(a: NDArray[np.float64], lo: float, hi: float) -> NDArray[np.float64]:
    u = np.clip((np.asarray(a, dtype=np.float64) - lo) / (hi - lo), 1e-4, 1 - 1e-4)
    return np.asarray(np.log(u / (1 - u)))


@dataclass(frozen=True)
class AccuracyModel:
    """``a = lo + (hi - lo) sigmoid(z0 - (max_t d_t + kappa (sum_t d_t - max_t d_t)))`` with
    ``d_t = delta[unit_t, level_t]``.

    ``delta`` is ``[units, levels]`` (logit units, >= 0, non-decreasing in the level);
    ``validation`` holds the leave-one-out errors on the measured combos.
    """

    z0: float
    delta: NDArray[np.float64]
    kappa: float
    lo: float
    hi: float = 1.0
    validation: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_importance(
        cls, unpruned: float, accuracy: NDArray[np.float64], num_classes: int, kappa: float = 1.0
    ) -> AccuracyModel:
        """From measured accuracies ``[units, levels]`` (level 0 = unpruned)."""
        lo = 1.0 / num_classes
        z0 = float(_logit(np.asarray([unpruned]), lo, 1.0)[0])
        delta = np.maximum(z0 - _logit(accuracy, lo, 1.0), 0.0)
        delta[:, 0] = 0.0
        delta = np.maximum.accumulate(delta, axis=1)
        return cls(z0=z0, delta=delta, kappa=kappa, lo=lo)

    def predict(self, units: NDArray[np.intp], levels: NDArray[np.intp]) -> NDArray[np.float64]:
        """Accuracy of configurations ``[C, s]`` (unit index and level of each of s slices)."""
        d = self.delta[units, levels]
        top = d.max(axis=-1)
        z = self.z0 - (top + self.kappa * (d.sum(axis=-1) - top))
        return np.asarray(self.lo + (self.hi - self.lo) / (1.0 + np.exp(-z)))

    def predict_views(self, levels: NDArray[np.intp]) -> NDArray[np.float64]:
        """Accuracy of per-unit level vectors ``[C, units]`` (every unit present: views)."""
        return self.predict(np.broadcast_to(np.arange(levels.shape[-1]), levels.shape), levels)

    def predict_one(self, units: Sequence[int], levels: Sequence[int]) -> float:
        return float(self.predict(np.asarray([units]), np.asarray([levels]))[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "z0": self.z0,
            "kappa": self.kappa,
            "lo": self.lo,
            "hi": self.hi,
            "delta": self.delta.tolist(),
            "validation": self.validation,
        }


def fit_accuracy_model(m: Measurements) -> AccuracyModel:
    """The range-importance model with ``kappa`` fitted on the combos (leave-one-out errors
    in ``validation``; with fewer than 3 combos, ``kappa = 1`` unvalidated)."""
    base = AccuracyModel.from_importance(m.unpruned_accuracy, m.range_accuracy, m.num_classes)
    idx = m.range_index()
    # per combo, the largest importance of its slices and the sum of the others
    ds = [
        np.asarray([base.delta[idx[b], lv] for b, lv in zip(c.bounds, c.levels, strict=True)])
        for c in m.combos
    ]
    top = np.asarray([d.max() for d in ds])
    rest = np.asarray([d.sum() - d.max() for d in ds])
    acc = np.asarray([c.accuracy for c in m.combos])
    if len(acc) < 3:
        return base

    def predict(k: float, where: Any = slice(None)) -> NDArray[np.float64]:
        z = base.z0 - top[where] - k * rest[where]
        return np.asarray(base.lo + (base.hi - base.lo) / (1 + np.exp(-z)))

    def fit(where: Any) -> float:
        res = minimize_scalar(
            lambda k: float(np.sum((predict(k, where) - acc[where]) ** 2)),
            bounds=(0.0, 5.0),
            method="bounded",
        )
        return float(res.x)

    loo = np.asarray([predict(fit(np.arange(len(acc)) != k), k) - acc[k] for k in range(len(acc))])
    err, add = np.abs(loo), np.abs(predict(1.0) - acc)
    validation = {
        "combos": float(len(acc)),
        "loo_mae": float(err.mean()),
        "loo_max_abs": float(err.max()),
        "loo_bias": float(loo.mean()),
        "additive_mae": float(add.mean()),
        "additive_max_abs": float(add.max()),
    }
    return replace(base, kappa=fit(slice(None)), validation=validation)
