"""Calibration: what each slice costs and how accurate the split model is at each pruning level,
measured on this machine and fitted to the models the controller and the planner use.

One package, one module per concept:

- :mod:`~pipeline.calibration.file`: the calibration file (:class:`Calibration`, JSON, version
  1) the controller loads: per-slice latency points and fits, accuracy points and the fit.
- :mod:`~pipeline.calibration.measure`: the calibration procedure (:func:`calibrate`, used by
  ``edgeprune calibrate`` and the experiment harness), in small steps.
- :mod:`~pipeline.calibration.slimedge`: the SlimEdge measurements (per-block costs, per-range
  importance, combos; :class:`Measurements`, cached per model) the planner works from.
- :mod:`~pipeline.calibration.latency`: the latency model ``t(p) = a p + b``.
- :mod:`~pipeline.calibration.accuracy`: the one accuracy-at-levels function and both accuracy
  models: the logistic fit (the calibration file's) and the measured importance table (the
  planner's), plus the measured veto.
- :mod:`~pipeline.calibration.timing`: the one timing helper (median of interleaved timed
  calls) and the one peak-memory helper.

This ``__init__`` exports what the controller needs to read a calibration file; it imports no
torch (the measuring modules do, when imported).
"""

from pipeline.calibration.accuracy import LogisticAccuracyFit
from pipeline.calibration.file import CALIBRATION_VERSION, Calibration, SliceLatency
from pipeline.calibration.latency import LinearFit

__all__ = [
    "CALIBRATION_VERSION",
    "Calibration",
    "LinearFit",
    "LogisticAccuracyFit",
    "SliceLatency",
]
