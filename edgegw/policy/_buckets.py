"""Token buckets with lazy refill (Envoy's local rate limit, EMQX's messages_rate / bytes_rate with burst).

A bucket holds at most ``burst`` tokens and gains ``rate`` per second of the monotonic clock, computed when asked:
no timer per bucket, O(1) per check. The clock value is passed in, so tests drive time by hand.
"""

from __future__ import annotations

_EPS = 1e-9
"""Float slack: a refill that lands a hair below a whole token must not turn into a microsecond wait."""


class Bucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst  # a new (or forgotten and re-created) bucket starts full
        self.stamp = now

    def level(self, now: float) -> float:
        """Tokens now (negative while in debt)."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        return min(tokens, self.burst)

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` can be taken; 0.0 if it can be now. Takes nothing.

        A cost above the burst could never be covered; it needs a full bucket instead and leaves it in debt
        (``take``), so a large message is delayed, not refused for ever, and the long-run rate still holds.
        """
        need = min(cost, self.burst)
        tokens = self.level(now)
        if tokens + _EPS >= need:
            return 0.0
        return (need - tokens) / self.rate

    def take(self, cost: float, now: float) -> None:
        self.tokens = self.level(now) - cost
        self.stamp = now

    def retune(self, rate: float, burst: float, now: float) -> None:
        """New rate and burst (a reload): what was earned at the old rate is kept, capped at the new burst."""
        tokens = self.level(now)
        self.rate = rate
        self.burst = burst
        self.tokens = min(tokens, burst)
        self.stamp = now

    def full(self, now: float) -> bool:
        """Forgetting a full bucket loses nothing: a new one starts full."""
        return self.level(now) + _EPS >= self.burst
