"""Two structlog processors for operations: a per-event-name rate limit, and a ring of recent refusals.

:class:`RateLimiter` keeps a flood of bad clients (handshake failures, refused CONNECTs, protocol errors) from
filling the disk: at most ``limit`` events of one name per ``interval`` seconds reach the renderer; the rest are
counted. The next event of that name that passes carries ``suppressed`` (how many were dropped since the last one
that passed), and :meth:`RateLimiter.report` (called once a second by the ops sampler) logs ``log.suppressed`` for
names whose flood stopped, so no count is ever lost silently.

:class:`RecentEvents` keeps the last refusals (who, why, when) for the status page and ``/api/stats``. It sits
before the rate limiter, so a suppressed log line is still counted and remembered.

Both are module-level singletons (:data:`RECENT_REFUSALS`, :data:`RATE_LIMITER`) because structlog's configuration
is process-wide too; :func:`edgegw.logs.configure_logging` puts them in the chain.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

REFUSAL_EVENTS = frozenset({
    "mqtt.connection_refused",   # capacity / draining, at accept
    "tls.handshake_failed",      # no certificate, unknown CA, expired ...
    "tls.identity_refused",      # certificate without a single CN
    "mqtt.connect_timeout",
    "mqtt.connect_refused",      # client id != CN, registry, empty client id
    "mqtt.publish_denied",       # ACL
    "mqtt.subscribe_denied",
    "mqtt.publish_refused",      # payload format, ...
    "mqtt.protocol_error",
    "outbox.full",
    "uplink.publish_refused",    # the upstream refused a record (quarantined)
    "coap.connection_refused",   # capacity / draining, at accept
    "coap.device_refused",       # registry / CRL
    "coap.request_refused",      # 4.01, 4.03 (ACL), 4.13, 4.15, 4.29 ...
    "coap.protocol_error",
})
"""Log events that mean "something was refused"; their names are stable (tests and dashboards rely on them)."""

_KEEP = ("device_id", "cert_cn", "client_id", "peer", "reason", "detail", "topic", "record_id", "listener")


class RecentEvents:
    """A bounded ring of recent events of interest, plus a count per event name since start."""

    def __init__(self, names: frozenset[str] = REFUSAL_EVENTS, size: int = 200) -> None:
        self.names = names
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()  # paho or executor threads may log too

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        name = event_dict.get("event")
        if name in self.names:
            entry = {"time": time.time(), "event": name}
            for key in _KEEP:
                value = event_dict.get(key)
                if value is not None:
                    entry[key] = value if isinstance(value, int | float | bool) else str(value)[:200]
            with self._lock:
                self._ring.append(entry)
                self.counts[name] = self.counts.get(name, 0) + 1  # type: ignore[index]
        return event_dict

    def snapshot(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent ``limit`` entries, newest first."""
        with self._lock:
            items = list(self._ring)
        return items[::-1][:limit]

    def clear(self) -> None:
        with self._lock:
            self._ring.clear()
            self.counts.clear()


class RateLimiter:
    """At most ``limit`` events per event name per fixed window of ``interval`` seconds; 0 disables."""

    def __init__(self, limit: int = 100, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.interval = interval
        self._clock = clock
        self._windows: dict[str, list[float | int]] = {}  # name -> [window start, passed, suppressed]
        self._lock = threading.Lock()
        self.suppressed_total = 0

    def configure(self, limit: int, interval: float) -> None:
        with self._lock:
            self.limit, self.interval = limit, interval
            self._windows.clear()

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if self.limit <= 0:
            return event_dict
        name = str(event_dict.get("event"))
        now = self._clock()
        with self._lock:
            window = self._windows.get(name)
            if window is None or now - window[0] >= self.interval:
                carried = int(window[2]) if window is not None else 0
                window = self._windows[name] = [now, 0, 0]
                if carried:
                    event_dict["suppressed"] = carried
            if window[1] >= self.limit:
                window[2] = int(window[2]) + 1
                self.suppressed_total += 1
                raise structlog.DropEvent
            window[1] = int(window[1]) + 1
        return event_dict

    def report(self) -> dict[str, int]:
        """Counts suppressed in windows that have ended (and not yet reported by a passing event); resets them."""
        now = self._clock()
        out: dict[str, int] = {}
        with self._lock:
            for name, window in list(self._windows.items()):
                if now - window[0] >= self.interval:
                    if window[2]:
                        out[name] = int(window[2])
                    del self._windows[name]
        return out


RECENT_REFUSALS = RecentEvents()
RATE_LIMITER = RateLimiter()


def report_suppressed(logger: Any = None) -> None:
    """Log one ``log.suppressed`` line for floods that ended without a later event to carry the count."""
    counts = RATE_LIMITER.report()
    if counts:
        (logger or structlog.get_logger("edgegw.logs")).warning(
            "log.suppressed", counts=counts, interval=RATE_LIMITER.interval)
