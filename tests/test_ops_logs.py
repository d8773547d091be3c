"""Logs: a flood of bad clients is rate-limited per event name, and what was dropped is counted and reported."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import structlog

from conftest import Mosquitto, wait_until
from edgegw.logs import configure_logging
from edgegw.ops.logsink import RATE_LIMITER, RECENT_REFUSALS, RateLimiter, RecentEvents, report_suppressed
from ops_peers import admin_gateway, bad_handshakes, get_json, metrics, sample


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_passes_a_burst_then_counts_and_reports() -> None:
    clock = Clock()
    limiter = RateLimiter(limit=3, interval=10.0, clock=clock)
    passed = []
    for i in range(10):
        try:
            passed.append(limiter(None, "warning", {"event": "tls.handshake_failed", "i": i}))
        except structlog.DropEvent:
            pass
    assert [e["i"] for e in passed] == [0, 1, 2]
    # Another event name has its own budget.
    assert limiter(None, "info", {"event": "mqtt.connected"})["event"] == "mqtt.connected"
    assert limiter.suppressed_total == 7
    assert limiter.report() == {}  # the window has not ended yet
    clock.now += 10.0
    # The first event of a new window carries how many were dropped in the last one.
    event = limiter(None, "warning", {"event": "tls.handshake_failed"})
    assert event["suppressed"] == 7
    # A flood that stops with no later event is reported by report() once its window ended.
    for _ in range(5):
        try:
            limiter(None, "warning", {"event": "mqtt.protocol_error"})
        except structlog.DropEvent:
            pass
    assert limiter.report() == {}
    clock.now += 10.0
    assert limiter.report() == {"mqtt.protocol_error": 2}
    assert limiter.report() == {}


def test_rate_limit_zero_disables() -> None:
    limiter = RateLimiter(limit=0, interval=1.0)
    for _ in range(1000):
        limiter(None, "info", {"event": "x"})
    assert limiter.suppressed_total == 0


def test_recent_events_ring_is_bounded_and_keeps_who_and_why() -> None:
    ring = RecentEvents(size=3)
    for i in range(5):
        ring(None, "warning", {"event": "mqtt.connect_refused", "peer": f"10.0.0.{i}:1", "reason": "bad",
                               "payload": b"never kept"})
    ring(None, "info", {"event": "mqtt.connected"})  # not a refusal
    items = ring.snapshot()
    assert [i["peer"] for i in items] == ["10.0.0.4:1", "10.0.0.3:1", "10.0.0.2:1"]
    assert all("payload" not in i for i in items)
    assert ring.counts == {"mqtt.connect_refused": 5}


def test_configured_chain_limits_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    RECENT_REFUSALS.clear()
    try:
        configure_logging("info", "json", stream, rate_limit=2, rate_interval=0.05)
        log = structlog.get_logger("test")
        for _ in range(6):
            log.warning("tls.handshake_failed", peer="p", reason="r")
        import time
        time.sleep(0.06)
        report_suppressed()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [e["event"] for e in lines] == ["tls.handshake_failed"] * 2 + ["log.suppressed"]
        assert lines[-1]["counts"] == {"tls.handshake_failed": 4}
        assert RECENT_REFUSALS.counts["tls.handshake_failed"] == 6  # remembered even when not written
    finally:
        RATE_LIMITER.configure(100, 10.0)
        structlog.reset_defaults()
        RECENT_REFUSALS.clear()


def test_flood_of_bad_clients_cannot_fill_the_log(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto, log={"rate_limit": 5, "rate_interval": 2.0})
    bad_handshakes(gw.port, 40)
    wait_until(lambda: sample(metrics(port), "edgegw_refusals_total", protocol="mqtt", reason="tls_handshake") == 40,
               10, what="40 handshake failures counted")
    m = metrics(port)
    assert sample(m, "edgegw_refusal_log_events_total", event="tls.handshake_failed") == 40
    assert sample(m, "edgegw_log_events_suppressed_total") >= 35 - 5  # at most two windows' worth got through
    written = len(gw.events("tls.handshake_failed"))
    assert 5 <= written <= 15, written
    # The dropped lines are accounted for in the log itself: once the window ends, "log.suppressed" says how many.
    entry = gw.wait_for_event("log.suppressed", timeout=10)
    assert entry["counts"]["tls.handshake_failed"] >= 1

    def accounted() -> int:
        reported = sum(e["counts"].get("tls.handshake_failed", 0) for e in gw.events("log.suppressed"))
        carried = sum(e.get("suppressed", 0) for e in gw.events("tls.handshake_failed"))
        return len(gw.events("tls.handshake_failed")) + reported + carried

    wait_until(lambda: accounted() == 40, 10, what="every handshake failure written or counted in the log")
    # The status page still lists the most recent refusals, including ones that were not written.
    status, stats = get_json(port, "/api/stats")
    assert len([r for r in stats["refusals"] if r["event"] == "tls.handshake_failed"]) == 40
    assert gw.terminate() == 0
