"""Persistent sessions survive `kill -9` (edgegw/mqtt/sessiondb.py). Real peers: `edgegw run` as a process killed
with SIGKILL, paho v5 / 3.1.1 devices with certificates, a real mosquitto upstream, `mosquitto_pub` as the cloud
sending a command; the session file is read with sqlite3 to know when the batch holding the message committed."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, GatewayProcess, LabPKI, Mosquitto, wait_until
from mqtt_peers import V5, V311, PahoDevice

ACL = {"acl": {"publish": ["devices/{device_id}/#", "shared/#"],
               "subscribe": ["devices/{device_id}/#", "shared/#"]},
       "uplink": {"command_topic": "{prefix}/+/cmd/#"}}
MOSQUITTO_PUB = shutil.which("mosquitto_pub")


def session_db(gw: GatewayProcess) -> Path:
    return gw.folder / "mqtt-sessions.db"


def rows(gw: GatewayProcess, sql: str) -> list[tuple[Any, ...]]:
    """What a crash would leave: only committed data is visible to another connection (WAL)."""
    db = sqlite3.connect(session_db(gw), timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def device(fleet: Fleet, gw: GatewayProcess, device_id: str, **kw: Any) -> PahoDevice:
    return PahoDevice(fleet.device_context(device_id), gw.port, device_id, **kw).start()


def cloud_command(pki: LabPKI, broker: Mosquitto, topic: str, payload: str) -> None:
    sink = pki.client("sink")
    assert MOSQUITTO_PUB is not None
    subprocess.run([MOSQUITTO_PUB, "-h", broker.host, "-p", str(broker.port), "--cafile", str(pki.ca),
                    "--cert", str(sink.cert), "--key", str(sink.key), "-i", "cloud-app", "-q", "1",
                    "-t", topic, "-m", payload], check=True, timeout=10, capture_output=True)


@pytest.mark.skipif(MOSQUITTO_PUB is None, reason="needs mosquitto_pub (mosquitto-clients)")
def test_v5_session_subscription_and_queue_survive_kill_9(fleet: Fleet, pki: LabPKI, mosquitto: Mosquitto,
                                                          gateway_factory: Any) -> None:
    gw = gateway_factory(mosquitto, overrides=ACL).start()
    gw.wait_for_event("uplink.command_subscribed")
    sub = device(fleet, gw, "dev-01", protocol=V5, clean=False, session_expiry=3600)
    # SUBACK comes only after the commit holding the subscription: it is on disk the moment paho has it.
    assert [c.value for c in sub.subscribe([("devices/dev-01/cmd/#", 2), ("shared/crash/#", 1)])] == [2, 1]
    assert {r[0] for r in rows(gw, "SELECT id FROM sessions")} == {"dev-01"}
    sub.close()
    wait_until(lambda: any(e.get("device_id") == "dev-01" for e in gw.events("mqtt.disconnected")), 5)

    cloud_command(pki, mosquitto, "cloud/dev-01/cmd/reboot", "now")  # downlink, queued for the offline device
    pub = device(fleet, gw, "dev-02")
    try:
        pub.client.publish("shared/crash/a", b"local-q1", qos=1).wait_for_publish(5)
        pub.client.publish("shared/crash/b", b"local-q0", qos=0).wait_for_publish(5)  # QoS 0: not queued
    finally:
        pub.close()
    wait_until(lambda: len(rows(gw, "SELECT row FROM messages")) == 2, 10, what="queued messages committed")
    # Another device's certificate with dev-01's client id and clean start: refused before any session is looked
    # up, so it can neither end dev-01's session nor touch what is on disk for it.
    thief = PahoDevice(fleet.device_context("dev-03"), gw.port, "dev-01", protocol=V5, clean=True,
                       reconnect_on_failure=False).start()  # refused: no retry after its 1 s delay to wait out
    thief.client.loop_stop()
    assert thief.connack is not None and thief.connack.value == 0x87
    time.sleep(0.2)
    assert len(rows(gw, "SELECT row FROM messages")) == 2 and rows(gw, "SELECT id FROM sessions") == [("dev-01",)]

    gw.kill()  # SIGKILL: no shutdown code runs
    assert not gw.events("mqtt.sessions_saved")
    gw.start()
    restored = gw.wait_for_event("mqtt.sessions_restored")
    assert restored["sessions"] == 1

    back = device(fleet, gw, "dev-01", protocol=V5, clean=False, session_expiry=3600)
    try:
        assert back.session_present is True
        got = back.wait_messages(2, timeout=10)
        assert sorted((m.topic, m.payload, m.qos) for m in got) == [
            ("devices/dev-01/cmd/reboot", b"now", 1), ("shared/crash/a", b"local-q1", 1)]
        # The subscription came back too: a new command reaches the device without subscribing again.
        cloud_command(pki, mosquitto, "cloud/dev-01/cmd/blink", "3")
        (cmd,) = back.wait_messages(3, timeout=10)[2:]
        assert (cmd.topic, cmd.payload) == ("devices/dev-01/cmd/blink", b"3")
        # Acknowledged messages leave the file (in the next batch).
        wait_until(lambda: rows(gw, "SELECT row FROM messages") == [], 5, what="acked rows deleted")
    finally:
        back.close()


def test_clean_session_and_unsubscribe_are_durable_too(fleet: Fleet, mosquitto: Mosquitto,
                                                        gateway_factory: Any) -> None:
    """What a crash must not bring back: a subscription removed (UNSUBACK) or a session ended by a clean start."""
    gw = gateway_factory(mosquitto, overrides=ACL).start()
    a = device(fleet, gw, "dev-03", protocol=V311, clean=False)
    a.subscribe([("shared/u/1", 1), ("shared/u/2", 1)])
    a.client.unsubscribe("shared/u/1")
    wait_until(lambda: a.client.is_connected(), 5)
    b = device(fleet, gw, "dev-04", protocol=V5, clean=False, session_expiry=600)
    b.subscribe("shared/u/#", 1)
    b.close()
    c = device(fleet, gw, "dev-04", protocol=V5, clean=True)  # clean start: dev-04's old session ends
    c.close()
    a.close()

    def filters() -> dict[str, Any]:
        import msgpack
        return {k: [f[0] for f in msgpack.unpackb(v)["filters"]] for k, v in rows(gw, "SELECT id, state FROM sessions")}

    wait_until(lambda: filters() == {"dev-03": ["shared/u/2"]}, 5, what=f"durable state, got {filters()}")
    gw.kill()
    gw.start()
    assert gw.wait_for_event("mqtt.sessions_restored")["sessions"] == 1
    again = device(fleet, gw, "dev-03", protocol=V311, clean=False)
    pub = device(fleet, gw, "dev-05")
    try:
        assert again.session_present
        pub.client.publish("shared/u/1", b"gone", qos=1).wait_for_publish(5)
        pub.client.publish("shared/u/2", b"kept", qos=1).wait_for_publish(5)
        (m,) = again.wait_messages(1)
        assert m.payload == b"kept"
        time.sleep(0.3)
        assert len(again.messages) == 1
    finally:
        again.close()
        pub.close()
    back = device(fleet, gw, "dev-04", protocol=V5, clean=False, session_expiry=600)
    try:
        assert back.session_present is False
    finally:
        back.close()
