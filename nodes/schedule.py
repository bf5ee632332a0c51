"""Camera send schedules from a replayed trace (the fixed-rate one is nodes.camera.rate_schedule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nodes.camera import Shot
from traces.format import Trace
from traces.replay import replay_schedule


def trace_shots(
    traces: Sequence[Trace],
    labels: np.ndarray | None,
    *,
    compression: float = 1.0,
    max_idle_s: float | None = None,
    window: tuple[float, float] | None = None,
    max_images: int | None = None,
    n_images: int = 1,
    seed: int = 0,
) -> list[Shot]:
    """One shot per trace arrival, at the compressed trace time.

    When an arrival carries a label and the image source has labels, an image of that class is
    sent; otherwise images are drawn in a seeded order.
    """
    schedule = replay_schedule(
        traces, compression=compression, max_idle_s=max_idle_s, window=window, max_images=max_images
    )
    rng = np.random.default_rng(seed)
    by_class: dict[int, np.ndarray] = {}
    if labels is not None:
        by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    shots = []
    for item in schedule:
        label = item.arrival.label
        pool = by_class.get(label) if label is not None else None
        index = (
            int(rng.choice(pool))
            if pool is not None and len(pool)
            else int(rng.integers(0, max(n_images, 1)))
        )
        shots.append(Shot(item.send_at_s, item.arrival.camera, index))
    return shots
