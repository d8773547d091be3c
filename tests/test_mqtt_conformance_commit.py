"""Issue #3 item 2, proved on the wire: a QoS 2 PUBREC is sent only after the commit holding the record. The
outbox file of a real `edgegw run` is locked by another SQLite connection (a real second writer, as a backup tool
would be), so the gateway's commit waits on it and then fails: no PUBREC while it waits, PUBREC 0x83 and
DISCONNECT 0x83 when it fails, and the device's resend after reconnecting becomes exactly one record upstream.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from conftest import Fleet, Mosquitto
from mqtt_peers import RawClient

from edgegw.mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Properties,
    PropertyId,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
)

PERSISTENT = Properties({PropertyId.SESSION_EXPIRY_INTERVAL: 60})


def test_pubrec_only_after_the_commit_0x83_when_it_fails_and_the_resend_is_one_record(
        fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any, sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    # outbox.lock_timeout 1.5 s: how long the gateway's commit waits for the lock held below before it fails.
    gw = gateway_factory(mosquitto, overrides={"outbox": {"lock_timeout": 1.5}}).start()
    ctx = fleet.device_context("dev-01")
    c = RawClient(ctx, gw.port, MQTT_5)
    c.send(Connect(MQTT_5, "dev-01", True, 30, properties=PERSISTENT))
    assert isinstance(c.read(), Connack)
    lock = sqlite3.connect(gw.folder / "outbox.db", timeout=1, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # holds the write lock: the gateway's commit waits (lock_timeout)
        c.send(Publish("devices/dev-01/q2", b"once", 2, packet_id=3))
        try:
            early = c.read(1.0)  # within the 1.5 s the commit waits: nothing may come back yet
        except TimeoutError:
            early = None
        assert early is None, f"acknowledged before the commit: {early}"
        assert c.read(15) == Pubrec(3, ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR)
        assert c.read() == Disconnect(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        c.close()
    gw.wait_for_event("outbox.commit_failed")
    again = RawClient(ctx, gw.port, MQTT_5)
    try:
        again.send(Connect(MQTT_5, "dev-01", False, 30, properties=PERSISTENT))
        ack = again.read()
        assert isinstance(ack, Connack) and ack.session_present
        again.send(Publish("devices/dev-01/q2", b"once", 2, dup=True, packet_id=3))
        assert again.read(10) == Pubrec(3)
        again.send(Pubrel(3))
        assert again.read() == Pubcomp(3)
    finally:
        again.close()
    sink.wait_for(lambda ms: any(m.payload == b"once" for m in ms), 10)
    time.sleep(0.5)
    assert [m.payload for m in sink.snapshot()] == [b"once"]
