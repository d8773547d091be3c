"""Acknowledgement latencies of a fleet (or delivery latencies at the sink): a bounded sample and its percentiles."""

from __future__ import annotations

import math
import random


class LatencySamples:
    """Ack latencies in seconds: all of them up to ``cap``, then a uniform reservoir sample (Algorithm R)."""

    __slots__ = ("_cap", "_seen", "samples", "max")

    def __init__(self, cap: int = 200_000) -> None:
        self._cap = cap
        self._seen = 0
        self.samples: list[float] = []
        self.max = 0.0

    def add(self, value: float) -> None:
        self._seen += 1
        if value > self.max:
            self.max = value
        if len(self.samples) < self._cap:
            self.samples.append(value)
        else:
            i = random.randrange(self._seen)
            if i < self._cap:
                self.samples[i] = value

    def __len__(self) -> int:
        return self._seen

    def percentiles(self, *ps: float) -> list[float | None]:
        """Nearest-rank percentiles (``ps`` in 0..100), None without samples."""
        if not self.samples:
            return [None for _ in ps]
        ordered = sorted(self.samples)
        n = len(ordered)
        return [ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] for p in ps]
