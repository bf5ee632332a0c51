"""The latency model of a calibration: slice latency against its pruning ratio.

    t_i(p) = a_i p + b_i

(:class:`LinearFit`, ordinary least squares, with R^2), fitted per slice on its device by
:func:`pipeline.calibration.measure.calibrate`. ``a_i`` is normally negative: pruning makes a
slice faster. The accuracy models are in :mod:`pipeline.calibration.accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline.errors import ConfigError


def finite_float(value: Any, what: str) -> float:
    """``value`` as a float; a clear error when it is not a finite number (bools refused)."""
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
            finite_float(getattr(self, name), f"LinearFit.{name}")

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
