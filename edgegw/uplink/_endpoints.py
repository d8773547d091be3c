"""Upstream endpoints: which broker the next connection attempt goes to, with a circuit breaker per endpoint.

``priority``: the first endpoint whose circuit is closed (or whose cool-down is over: one trial, "half-open").
While connected to a lower one, the uplink probes the higher ones (a TCP connect) every ``breaker_cooldown``
seconds and fails back when one answers. ``round-robin``: the next endpoint in turn whose circuit is closed.

A circuit opens after ``breaker_failures`` consecutive failures: failed attempts, and connections lost within
``FLAP_SECONDS`` of being established (a broker that accepts and drops at once is as down as one that refuses).
When every circuit is open, the one closest to the end of its cool-down is tried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgegw.config import UplinkSettings

FLAP_SECONDS = 5.0


@dataclass
class Endpoint:
    host: str
    port: int
    rank: int
    failures: int = 0
    open_until: float = 0.0
    tripped: bool = False  # the circuit opened and no connection succeeded since: after the cool-down, one trial

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def available(self, now: float) -> bool:
        return now >= self.open_until


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


class Endpoints:
    def __init__(self, settings: UplinkSettings) -> None:
        self.policy = settings.endpoint_policy
        self.breaker_failures = settings.breaker_failures
        self.cooldown = settings.breaker_cooldown
        pairs = [(settings.host, settings.port)] + [parse_endpoint(e) for e in settings.endpoints]
        self.all = [Endpoint(h, p, i) for i, (h, p) in enumerate(pairs)]
        self._next = 0

    def choose(self, now: float | None = None) -> Endpoint:
        now = time.monotonic() if now is None else now
        n = len(self.all)
        start = 0 if self.policy == "priority" else self._next
        for i in range(n):
            endpoint = self.all[(start + i) % n]
            if endpoint.available(now):
                if self.policy == "round-robin":
                    self._next = (endpoint.rank + 1) % n
                return endpoint
        return min(self.all, key=lambda e: e.open_until)

    def succeeded(self, endpoint: Endpoint) -> None:
        endpoint.failures = 0
        endpoint.open_until = 0.0
        endpoint.tripped = False

    def failed(self, endpoint: Endpoint, now: float | None = None) -> bool:
        """Count a failure; True if this one opened the circuit."""
        now = time.monotonic() if now is None else now
        endpoint.failures += 1
        # Half-open: a failed trial after the cool-down opens the circuit again at once, not after another
        # breaker_failures attempts at an endpoint already known dead.
        if (endpoint.tripped or endpoint.failures >= self.breaker_failures) and len(self.all) > 1:
            endpoint.open_until = now + self.cooldown
            endpoint.failures = 0
            endpoint.tripped = True
            return True
        return False

    def better_than(self, endpoint: Endpoint, now: float | None = None) -> list[Endpoint]:
        """Under ``priority``: the higher-ranked endpoints worth probing for a fail-back."""
        if self.policy != "priority":
            return []
        now = time.monotonic() if now is None else now
        return [e for e in self.all[: endpoint.rank] if e.available(now)]
