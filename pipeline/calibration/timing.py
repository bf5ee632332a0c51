"""The one way this project times a function and measures its peak activation memory.

- :func:`time_calls`: warm-up first, then many timed calls per function on two clocks (wall
  ``perf_counter`` and the thread's CPU ``thread_time``), interleaved across the functions in
  rounds so that a change in background load hits every function alike. Report medians or
  percentiles (:class:`CallTimes`), never one run.
- :func:`torch_threads`: run a body with a given torch thread count (calibration times slices
  on ONE thread, as a node runs them).
- :func:`peak_bytes`: the largest tensor any leaf module produces in one forward pass, the
  basis of every activation-memory estimate (input + 2 x the largest tensor; see
  :mod:`pipeline.profiling`).

Used by the per-block profile (:mod:`pipeline.profiling`), the calibration
(:mod:`pipeline.calibration.measure`), the SlimEdge measurements
(:mod:`pipeline.calibration.slimedge`), the multi-view branch costs and the benches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.errors import ConfigError

if TYPE_CHECKING:  # imported where used: timing plain Python code must not load torch
    import torch
    from torch import nn


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)``; the previous count is restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


Clock = Literal["wall", "cpu"]
CLOCKS: tuple[Clock, ...] = ("wall", "cpu")


@dataclass(frozen=True)
class CallTimes:
    """Per-call times (seconds) of one function on two clocks.

    ``wall``: ``perf_counter``, what a request waits. ``cpu``: the calling thread's CPU time
    (``thread_time``); with torch on one thread the work runs in the calling thread, so on an
    idle machine the two agree, and on a shared one ``cpu`` is not inflated when other
    processes take the core away.
    """

    wall: np.ndarray
    cpu: np.ndarray

    def of(self, clock: Clock) -> np.ndarray:
        if clock not in CLOCKS:
            raise ConfigError(f"clock must be one of {CLOCKS}, got {clock!r}")
        return self.wall if clock == "wall" else self.cpu

    def median(self, clock: Clock = "wall") -> float:
        return float(np.median(self.of(clock)))

    def percentile(self, q: float, clock: Clock = "wall") -> float:
        return float(np.percentile(self.of(clock), q))

    @property
    def busy_ratio(self) -> float:
        """Median wall time over median CPU time: about 1 on an idle machine (1 when the CPU
        clock saw nothing, so the ratio stays finite in JSON)."""
        cpu = self.median("cpu")
        return self.median("wall") / cpu if cpu > 0 else 1.0


def time_calls(
    fns: Sequence[Callable[[], object]],
    *,
    runs: int,
    warmup: int,
    rounds: int = 5,
    on_round: Callable[[], None] | None = None,
    torch_inference: bool = True,
) -> list[CallTimes]:
    """Per-call times of every ``fn``: ``warmup`` untimed calls each, then ``runs`` timed
    calls each, interleaved in ``rounds`` rounds (round r times a chunk of every fn in turn),
    so that a change in background load hits every fn alike. ``on_round`` is called after
    each fn's chunk (for a progress bar: ``rounds * len(fns)`` calls).

    ``torch_inference``: the calls run under ``torch.inference_mode`` (timing torch modules).
    Pass False to time plain Python code without loading torch: importing torch changes how
    glibc hands out large blocks, and with it the time of large copies."""
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ConfigError(
            f"need runs >= 1, warmup >= 0, rounds >= 1 (got {runs}, {warmup}, {rounds})"
        )
    rounds = min(rounds, runs)
    wall = [np.empty(runs) for _ in fns]
    cpu = [np.empty(runs) for _ in fns]
    with _inference_mode() if torch_inference else nullcontext():
        for fn in fns:
            for _ in range(warmup):
                fn()
        edges = [round(r * runs / rounds) for r in range(rounds + 1)]
        for r in range(rounds):
            for k, fn in enumerate(fns):
                w, c = wall[k], cpu[k]
                for i in range(edges[r], edges[r + 1]):
                    c0 = time.thread_time()
                    t0 = time.perf_counter()
                    fn()
                    w[i] = time.perf_counter() - t0
                    c[i] = time.thread_time() - c0
                if on_round is not None:
                    on_round()
    return [CallTimes(w, c) for w, c in zip(wall, cpu, strict=True)]


def _inference_mode() -> AbstractContextManager[Any]:
    import torch

    return torch.inference_mode()


def peak_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, Any]:
    """The bytes of the largest tensor a leaf module of ``module`` produces on ``x``, and
    ``module(x)`` (so a caller that needs the output does not run the module twice)."""
    import torch

    largest = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        for h in handles:
            h.remove()
    return largest, y
