"""Several upstream endpoints: priority failover with a circuit breaker, fail-back, round-robin. Real mosquittos."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from edgegw.config import UplinkSettings
from edgegw.outbox.store import Outbox
from edgegw.uplink._endpoints import Endpoints
from test_uplink import eventually, make_uplink, outbox, running, submit, uplink_settings  # noqa: F401 - fixture

if TYPE_CHECKING:
    from conftest import LabPKI, Mosquitto, Sink


def dead_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_priority_fails_over_and_the_breaker_stops_hammering_the_dead_endpoint(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    dead = dead_port()
    settings = uplink_settings(mosquitto, pki, port=dead, endpoints=(f"127.0.0.1:{mosquitto.port}",),
                               breaker_failures=2, breaker_cooldown=60.0)
    uplink = make_uplink(settings, outbox)
    records = submit(outbox, ["f1", "f2"], 300)
    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            await eventually(lambda: outbox.depth == 0, 15, "every record delivered through the second endpoint")
            assert uplink.endpoint == f"127.0.0.1:{mosquitto.port}"
            await sink.until(lambda m: len(m) >= len(records), 10)
            # drop the connection: the next attempt must skip the dead endpoint, whose circuit is open
            assert uplink._link is not None
            uplink._link.set_lost("test: connection dropped")
            await eventually(lambda: uplink.reconnects >= 1 and uplink.connected, 10, "the reconnect")
    attempts_on_dead = [e for e in logs if e["event"] == "uplink.connect_failed" and e["port"] == dead]
    assert len(attempts_on_dead) == 2, "the open circuit did not keep the dead endpoint out"
    opened = [e for e in logs if e["event"] == "uplink.circuit_open"]
    assert len(opened) == 1 and opened[0]["port"] == dead


async def test_priority_fails_back_when_the_first_endpoint_returns_and_nothing_is_lost(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    primary = mosquitto_factory()  # down at first
    secondary = mosquitto_factory().start()
    sink_b = sink_factory(secondary, topic="edgegw/#")
    settings = uplink_settings(primary, pki, endpoints=(f"127.0.0.1:{secondary.port}",), breaker_failures=1,
                               breaker_cooldown=0.5)
    uplink = make_uplink(settings, outbox)
    first = submit(outbox, ["b1"], 100)
    async with running(uplink):
        await eventually(lambda: uplink.endpoint == f"127.0.0.1:{secondary.port}" and outbox.depth == 0, 10,
                         "delivery through the secondary")
        primary.start()
        sink_a = sink_factory(primary, topic="edgegw/#")
        await eventually(lambda: uplink.endpoint == f"127.0.0.1:{primary.port}", 10, "the fail-back")
        second = submit(outbox, ["b1"], 100, start=100)
        await eventually(lambda: outbox.depth == 0, 10, "delivery through the primary")
        got_a = await sink_a.until(lambda m: len(m) >= 100, 10)
    got_b = sink_b.snapshot()
    assert {r.payload for r in first} <= {m.payload for m in got_b}
    assert {r.payload for r in second} <= {m.payload for m in got_a}


def test_after_its_cool_down_an_endpoint_gets_one_trial() -> None:
    """docs/OUTBOX.md: the breaker keeps an endpoint out for breaker_cooldown s, "then it gets one trial". A failed
    trial opens the circuit again at once; it used to take another breaker_failures failures (three attempts at a
    dead primary, each with its connect timeout and backoff, while the records waited), and a success closes it."""
    settings = UplinkSettings(host="a", port=1, ca="ca", cert="c", key="k",  # type: ignore[arg-type]
                              endpoints=("b:2",), breaker_failures=3, breaker_cooldown=10.0)
    eps = Endpoints(settings)
    a = eps.all[0]
    assert [eps.failed(a, now=0) for _ in range(3)] == [False, False, True]
    assert eps.choose(5).name == "b:2"
    assert eps.choose(10).name == "a:1"  # cool-down over: the trial
    assert eps.failed(a, now=10) and eps.choose(11).name == "b:2"  # the trial failed: out again at once
    assert eps.choose(20).name == "a:1"
    eps.succeeded(a)  # the trial worked: closed, and the count starts over
    assert [eps.failed(a, now=30) for _ in range(3)] == [False, False, True]


def test_round_robin_and_breaker_selection() -> None:
    settings = UplinkSettings(host="a", port=1, ca="ca", cert="c", key="k",  # type: ignore[arg-type]
                              endpoints=("b:2", "[::1]:3"), endpoint_policy="round-robin", breaker_failures=2,
                              breaker_cooldown=10.0)
    eps = Endpoints(settings)
    assert [eps.choose(0).name for _ in range(4)] == ["a:1", "b:2", "::1:3", "a:1"]
    b = eps.all[1]
    assert not eps.failed(b, now=0) and eps.failed(b, now=0)  # the second consecutive failure opens it
    assert [eps.choose(1).name for _ in range(3)] == ["::1:3", "a:1", "::1:3"]
    assert eps.choose(10).name == "a:1" and eps.choose(10).name == "b:2"  # cool-down over: back in turn
    for e in eps.all:
        e.open_until = 50 + e.rank
    assert eps.choose(20).name == "a:1"  # all open: the one closest to the end of its cool-down
