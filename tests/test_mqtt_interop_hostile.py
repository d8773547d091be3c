"""Security cases of issue #3 sent to a real `edgegw run` over TLS with device certificates: malformed variable
byte integers and property lists, a misplaced property, an oversized packet. Each must cost the sender its own
connection (MQTT 5: DISCONNECT with the reason code docs/MQTT.md lists) and nothing else: the gateway keeps
serving a well-behaved device. (Flood / slow CONNECT, impersonation, foreign subscriptions, retained leaks and
foreign wills are in tests/test_mqtt_broker_e2e.py; persistent sessions across kill -9 in tests/test_sessions_crash.py.)
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import Fleet, GatewayProcess, Mosquitto
from mqtt_peers import V5, PahoDevice, RawClient

from edgegw.mqtt.packets import MQTT_5, Connack, Connect, Disconnect, ReasonCode

HOSTILE: list[tuple[str, bytes, ReasonCode]] = [
    # PUBLISH topic "a"; then the property length / property list (MQTT 5 §2.2.2, §1.5.5).
    ("property length as a 5-byte variable byte integer", bytes.fromhex("300a000161ffffffff010000"),
     ReasonCode.MALFORMED_PACKET),
    ("remaining length as a 5-byte variable byte integer", bytes.fromhex("30ffffffff01"),
     ReasonCode.MALFORMED_PACKET),
    ("property length past the end of the packet", bytes.fromhex("3005000161" "0901"), ReasonCode.MALFORMED_PACKET),
    ("unknown property identifier", bytes.fromhex("3006000161" "027f00"), ReasonCode.MALFORMED_PACKET),
    ("the same property twice", bytes.fromhex("3008000161" "0401010101"), ReasonCode.PROTOCOL_ERROR),
    ("a CONNECT-only property in a PUBLISH", bytes.fromhex("3009000161" "05110000000a"), ReasonCode.MALFORMED_PACKET),
    ("a user property cut short", bytes.fromhex("300a000161" "06260003616263"), ReasonCode.MALFORMED_PACKET),
    ("a subscription identifier as a 5-byte integer", bytes.fromhex("820d0001" "060bffffffff01" "000161" "00"),
     ReasonCode.MALFORMED_PACKET),
    # Larger than max_packet_size (4096 here): refused from the fixed header, before any body is sent.
    ("oversized PUBLISH, header only", bytes.fromhex("30" "80807f"), ReasonCode.PACKET_TOO_LARGE),
]


@pytest.fixture
def gw(mosquitto: Mosquitto, gateway_factory: Any) -> GatewayProcess:
    return gateway_factory(mosquitto, overrides={"mqtt": {"max_packet_size": 4096}}).start()


def round_trip(dev: PahoDevice, n: int) -> None:
    for i in range(n):
        dev.client.publish("devices/dev-11/rtt", str(i).encode(), qos=1).wait_for_publish(10)


def test_malformed_and_oversized_packets_cost_only_their_own_connection(fleet: Fleet, gw: GatewayProcess) -> None:
    good = PahoDevice(fleet.device_context("dev-11"), gw.port, "dev-11", protocol=V5).start()
    try:
        round_trip(good, 3)
        for what, data, reason in HOSTILE:
            raw = RawClient(fleet.device_context("dev-10"), gw.port, MQTT_5)
            try:
                raw.send(Connect(MQTT_5, "dev-10", True, 30))
                assert isinstance(raw.read(), Connack), what
                raw.sock.sendall(data)
                answer = raw.read()
                assert answer == Disconnect(reason), f"{what}: {answer}"
                assert raw.read(2) is None, f"{what}: the connection stays open"
            finally:
                raw.close()
            round_trip(good, 1)  # the well-behaved device is served between every attack
        assert good.connected.is_set()
    finally:
        good.close()
    errors = [e for e in gw.events("mqtt.protocol_error") if e.get("device_id") == "dev-10"]
    assert len(errors) == len(HOSTILE), errors
    assert gw.proc is not None and gw.proc.poll() is None  # still running


def test_malformed_connect_gets_no_connack_and_no_session(fleet: Fleet, gw: GatewayProcess) -> None:
    """A CONNECT whose property list is malformed is closed before any session is looked up (MQTT 5 §4.13: no
    CONNACK is owed for a malformed CONNECT); a CONNECT with a misplaced property likewise."""
    cases = [
        bytes.fromhex("101000044d5154540502003c" "05" "26000161" "00"),  # user property cut short (length 5)
        bytes.fromhex("101200044d5154540502003c" "0403000178" "0001" "61"),  # Content Type: PUBLISH-only
    ]
    for data in cases:
        raw = RawClient(fleet.device_context("dev-09"), gw.port, MQTT_5)
        try:
            raw.sock.sendall(data)
            assert raw.read(5) is None
        finally:
            raw.close()
    time.sleep(0.2)
    assert not [e for e in gw.events("mqtt.connected") if e.get("device_id") == "dev-09"]
