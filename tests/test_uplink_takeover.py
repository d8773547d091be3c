"""Two gateways with one ``gateway.id`` (so one upstream client id) on one real mosquitto: each connection takes the
other's session over (MQTT-3.1.4-3). mosquitto 2.0.11 closes the older connection without a DISCONNECT, over MQTT 5
as over 3.1.1 (checked with raw sockets: the old client reads EOF). Unchecked, each gateway reconnected at once and
they took each other over ~1,500 times in 45 s, every time logged only as "connection closed by the server".

Here the uplink must name the cause (``uplink.session_taken_over`` with the client id and a hint), count it (the
``edgegw_uplink_session_takeovers`` counter) and back off exponentially, so the reconnects stay few."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
from conftest import free_port
from test_uplink import make_uplink, outbox  # noqa: F401

from edgegw.config import UplinkSettings

if TYPE_CHECKING:
    from conftest import GatewayProcess, Mosquitto

WATCH_SECONDS = 6.0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_two_gateways_with_one_id_are_detected_and_back_off(
        protocol: str, mosquitto: Mosquitto, gateway_factory: Callable[..., GatewayProcess]) -> None:
    admin_port = free_port()
    # reconnect_min 0.1 s: without the backoff, each gateway would reconnect ~10 times a second
    uplink: dict[str, Any] = {"reconnect_min": 0.1, "reconnect_max": 4.0, "protocol": protocol}
    first = gateway_factory(mosquitto, overrides={"gateway": {"id": "gw-twin"}, "uplink": uplink,
                                                  "admin": {"bind": "127.0.0.1", "port": admin_port}}).start()
    first.wait_for_event("uplink.connected")
    second = gateway_factory(mosquitto, overrides={"gateway": {"id": "gw-twin"}, "uplink": uplink}).start()
    second.wait_for_event("uplink.connected")
    started = time.monotonic()
    time.sleep(WATCH_SECONDS)
    connects = len(first.events("uplink.connected")) + len(second.events("uplink.connected"))
    elapsed = time.monotonic() - started
    detected = first.events("uplink.session_taken_over") + second.events("uplink.session_taken_over")
    client_id = first.events("uplink.connected")[0]["client_id"]
    assert second.events("uplink.connected")[0]["client_id"] == client_id  # the premise: one client id
    # mosquitto logs every takeover of the older connection; it must have happened, or the test proves nothing
    assert "already connected, closing old connection" in mosquitto.log()

    # Without backoff: ~2 x 10 connections a second (~120 here). With it, the delays double from 0.1 s to 4 s.
    assert connects <= 4 * elapsed, f"{connects} connections in {elapsed:.1f} s"
    assert detected, first.log()[-3000:]
    event = detected[0]
    assert event["level"] == "error" and event["client_id"] == client_id
    assert "gateway.id unique" in event["hint"]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    counted = [line for line in metrics.splitlines() if line.startswith("edgegw_uplink_session_takeovers_total")]
    assert counted and float(counted[0].split()[-1]) >= 1, counted
    assert first.terminate() == 0 and second.terminate() == 0


async def test_a_streak_told_by_closes_alone_counts_its_first_takeover_too(pki: Any, outbox: Any) -> None:  # noqa: F811
    """mosquitto 2.0 sends no 0x8E: a takeover shows only as the second clean close in a row, and the first close
    of that streak was one too. A DISCONNECT 0x8E is certain at once and counts one."""
    pair = pki.client("uplink")
    uplink = make_uplink(UplinkSettings(host="127.0.0.1", port=1, ca=pki.ca, cert=pair.cert, key=pair.key), outbox)
    link = SimpleNamespace(taken_over=False, host="127.0.0.1", port=1)
    uplink._taken_over(link, 2)  # type: ignore[arg-type]
    assert uplink.session_takeovers == 2
    uplink._taken_over(link, 3)  # type: ignore[arg-type]
    assert uplink.session_takeovers == 3
    link.taken_over = True
    uplink._taken_over(link, 0)  # type: ignore[arg-type]
    assert uplink.session_takeovers == 4
