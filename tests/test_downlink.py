"""Downlink: commands published upstream reach the device they name, and only it. Real peers: `edgegw run` as a
process, mosquitto upstream, `mosquitto_pub` as the cloud (the lab PKI's "sink" certificate), paho devices."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Self

import pytest

from conftest import Fleet, LabPKI, Mosquitto, wait_until
from edgegw.config import MQTTSettings, UplinkSettings
from edgegw.errors import ConfigError
from edgegw.mqtt.broker import LocalBroker
from edgegw.mqtt.packets import Subscribe, SubscriptionOptions
from edgegw.mqtt.session import Message
from edgegw.mqtt.sessiondb import SessionDB
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL
from mqtt_peers import V5, V311, PahoDevice
from test_uplink import eventually, make_uplink, outbox, running, uplink_settings  # noqa: F401 (fixture)

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
pytestmark = pytest.mark.skipif(MOSQUITTO_PUB is None, reason="needs mosquitto_pub (mosquitto-clients)")


def cloud_publish(pki: LabPKI, broker: Mosquitto, topic: str, payload: str, *extra: str) -> None:
    sink = pki.client("sink")
    assert MOSQUITTO_PUB is not None
    subprocess.run([MOSQUITTO_PUB, "-h", broker.host, "-p", str(broker.port), "--cafile", str(pki.ca),
                    "--cert", str(sink.cert), "--key", str(sink.key), "-i", "cloud-app", "-q", "1",
                    "-t", topic, "-m", payload, *extra], check=True, timeout=10, capture_output=True)


def test_a_command_reaches_its_device_and_only_it(fleet: Fleet, pki: LabPKI, mosquitto: Mosquitto,
                                                  gateway_factory: Any) -> None:
    gw = gateway_factory(mosquitto, overrides={"uplink": {"command_topic": "{prefix}/+/cmd/#"}}).start()
    gw.wait_for_event("uplink.command_subscribed", topic_filter="cloud/+/cmd/#")
    dev1 = PahoDevice(fleet.device_context("dev-01"), gw.port, "dev-01").start()
    dev2 = PahoDevice(fleet.device_context("dev-02"), gw.port, "dev-02", protocol=V311).start()
    try:
        assert [c.value for c in dev1.subscribe("devices/dev-01/cmd/#", 1)] == [1]
        dev2.subscribe("devices/dev-02/cmd/#", 0)  # granted QoS 0: a QoS 1 command arrives at QoS 0
        cloud_publish(pki, mosquitto, "cloud/dev-01/cmd/reboot", "now", "-V", "mqttv5",
                      "-D", "publish", "response-topic", "cloud/dev-01/cmd-reply",
                      "-D", "publish", "correlation-data", "req-17",
                      "-D", "publish", "content-type", "text/plain",
                      "-D", "publish", "user-property", "issued-by", "ops")
        (got,) = dev1.wait_messages(1, timeout=10)
        assert (got.topic, got.payload, got.qos) == ("devices/dev-01/cmd/reboot", b"now", 1)
        p = got.properties
        assert p.ResponseTopic == "devices/dev-01/cmd-reply"  # mapped back, so the device may answer there
        assert p.CorrelationData == b"req-17" and p.ContentType == "text/plain"
        assert p.UserProperty == [("issued-by", "ops")]

        cloud_publish(pki, mosquitto, "cloud/dev-02/cmd/blink", "3")
        (got2,) = dev2.wait_messages(1, timeout=10)
        assert (got2.topic, got2.payload, got2.qos) == ("devices/dev-02/cmd/blink", b"3", 0)
        cloud_publish(pki, mosquitto, "cloud/dev-03/cmd/blink", "nobody")  # no session: undeliverable
        gw.wait_for_event("uplink.command_undeliverable", device_id="dev-03")
        time.sleep(0.3)
        assert len(dev1.messages) == 1 and len(dev2.messages) == 1  # dev-02's command never reached dev-01
    finally:
        dev1.close()
        dev2.close()


def test_the_subscription_comes_back_after_an_upstream_restart(fleet: Fleet, pki: LabPKI,
                                                               mosquitto_factory: Any, gateway_factory: Any) -> None:
    broker = mosquitto_factory().start()
    gw = gateway_factory(broker, overrides={"uplink": {"command_topic": "{prefix}/+/cmd/#"}}).start()
    gw.wait_for_event("uplink.command_subscribed")
    dev = PahoDevice(fleet.device_context("dev-04"), gw.port, "dev-04").start()
    try:
        dev.subscribe("devices/dev-04/cmd/#", 1)
        broker.stop()
        broker.start()
        deadline = time.monotonic() + 15
        while len(gw.events("uplink.command_subscribed")) < 2:
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.05)
        cloud_publish(pki, broker, "cloud/dev-04/cmd/x", "again")
        assert [m.payload for m in dev.wait_messages(1, timeout=10)] == [b"again"]
    finally:
        dev.close()


@pytest.mark.parametrize("bad", ["commands/+/#", "{prefix}", "{prefix}/#/x", "{prefix}/dev+/cmd"])
def test_a_command_topic_that_cannot_name_a_device_is_refused(pki: LabPKI, bad: str) -> None:
    pair = pki.client("uplink")
    with pytest.raises(ConfigError) as info:
        UplinkSettings(host="h", ca=pki.ca, cert=pair.cert, key=pair.key, command_topic=bad)
    assert info.value.key == "uplink.command_topic"


async def test_uplink_maps_refuses_and_never_hears_itself(mosquitto: Mosquitto, pki: LabPKI,
                                                          outbox: Outbox) -> None:
    """In process (a recording downlink instead of the MQTT server), with the broadest filter "{prefix}/#": our own
    publishes do not come back (No Local), topics that name no single device are refused, retained messages are
    not replayed at subscribe."""
    calls: list[tuple[Any, ...]] = []

    def downlink(device_id: str, topic: str, payload: bytes, qos: int, properties: Any, *,
                 message_expiry: int | None = None) -> bool:
        calls.append((device_id, topic, payload, qos, message_expiry))
        return device_id == "dev-01"

    await asyncio.to_thread(cloud_publish, pki, mosquitto, "edgegw/dev-01/cmd/old", "stale", "-r")
    settings = uplink_settings(mosquitto, pki, command_topic="{prefix}/#")
    uplink = make_uplink(settings, outbox)
    uplink.downlink = downlink
    async with running(uplink):
        await eventually(lambda: uplink._link is not None and uplink._link.commands_subscribed, 10, "SUBACK")
        outbox.submit("dev-01", "devices/dev-01/cmd/echo", b"mine", 1)  # goes up as edgegw/dev-01/cmd/echo
        await eventually(lambda: uplink.acked == 1, 10, "our publish acknowledged")
        for topic in ("edgegw/dev-01", "edgegw/$x/cmd", "edgegw//cmd"):
            await asyncio.to_thread(cloud_publish, pki, mosquitto, topic, "bad")
        await asyncio.to_thread(cloud_publish, pki, mosquitto, "edgegw/dev-01/cmd/go", "ok", "-V", "mqttv5",
                                "-D", "publish", "message-expiry-interval", "30")
        await asyncio.to_thread(cloud_publish, pki, mosquitto, "edgegw/dev-09/cmd/go", "nobody")
        await eventually(lambda: uplink.commands_delivered + uplink.commands_undeliverable >= 5, 10, "commands")
        await asyncio.sleep(0.3)
    assert [c[:4] for c in calls] == [("dev-01", "devices/dev-01/cmd/go", b"ok", 1),
                                      ("dev-09", "devices/dev-09/cmd/go", b"nobody", 1)]
    assert 0 < calls[0][4] <= 30
    assert uplink.commands_delivered == 1
    assert uplink.commands_undeliverable == 4  # three refused topics, one without a session


async def _queue_offline_sessions(path: Path, *, sessions: int, each: int, size: int) -> None:
    """Add offline persistent sessions with ``each`` queued QoS 1 commands of ``size`` bytes to a stopped gateway's
    session file, through the gateway's own journal (edgegw/mqtt/sessiondb.py)."""
    broker = LocalBroker(MQTTSettings(), lambda key, message: None)
    db = SessionDB(path, broker)
    await db.open()  # what the file holds (the test's own device) stays
    blob = b"x" * size
    for i in range(sessions):
        key = f"fleet-{i:05d}"
        session, _ = broker.open_session(key, clean_start=False)
        session.expiry, session.durable, session.disconnected_at = 3600, True, time.time()
        broker.journal.session_changed(session)
        broker.subscribe(session, Subscribe(1, ((f"devices/{key}/cmd/#", SubscriptionOptions(1)),)),
                         ACL.allow_all(), key)
        for j in range(each):
            broker.deliver_to_session(key, Message(f"devices/{key}/cmd/{j}", blob, 1))
    await db.close()


class CloudCommander:
    """The cloud sending commands to one device without pause (paho MQTT 5 with the "sink" certificate, QoS 1,
    one every ``interval`` seconds, payload the sequence number), in its own thread, until stopped."""

    def __init__(self, pki: LabPKI, broker: Mosquitto, topic: str, interval: float = 0.002) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        self.topic, self.interval = topic, interval
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cloud-commander",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(pki.ssl_context("sink"))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.sent = 0
        self._last: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._last is not None:
            self._last.wait_for_publish(5)  # every command is out before the client goes
        self.client.loop_stop()
        self.client.disconnect()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._last = self.client.publish(self.topic, str(self.sent).encode(), qos=1)
            self.sent += 1
            time.sleep(self.interval)


def test_commands_arriving_while_the_gateway_starts_reach_persistent_sessions(
        fleet: Fleet, pki: LabPKI, mosquitto: Mosquitto, gateway_factory: Any) -> None:
    """A device with a persistent session is offline while the gateway restarts and the cloud keeps sending it
    commands. Every command the uplink takes (and acknowledges upstream) must be queued in the device's session:
    none may be counted undeliverable because the sessions were not restored yet when it came."""
    gw = gateway_factory(mosquitto, overrides={"uplink": {"command_topic": "{prefix}/+/cmd/#"}}).start()
    gw.wait_for_event("uplink.command_subscribed")
    dev = PahoDevice(fleet.device_context("dev-01"), gw.port, "dev-01", protocol=V5, clean=False,
                     session_expiry=3600).start()
    assert [c.value for c in dev.subscribe("devices/dev-01/cmd/#", 1)] == [1]
    dev.close()
    assert gw.terminate() == 0
    # A fleet's sessions with commands queued (150 MB): reading them at start takes a while, as on an SD card.
    asyncio.run(_queue_offline_sessions(gw.folder / "mqtt-sessions.db", sessions=150, each=5, size=200_000))
    with CloudCommander(pki, mosquitto, "cloud/dev-01/cmd/n") as cloud:
        gw.start()
        wait_until(lambda: len(gw.events("uplink.command_subscribed")) >= 2, 10, what="subscribed again")
        time.sleep(0.5)
    lost = [e for e in gw.events("uplink.command_undeliverable") if e.get("device_id") == "dev-01"]
    assert not lost, f"{len(lost)} commands for a persistent session counted undeliverable at start ({cloud.sent} sent)"
    # What the uplink took is queued in the session: from its subscription on, every command, none missing.
    back = PahoDevice(fleet.device_context("dev-01"), gw.port, "dev-01", protocol=V5, clean=False,
                      session_expiry=3600).start()
    try:
        assert back.session_present is True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not back.messages or int(back.messages[-1].payload) < cloud.sent - 1):
            time.sleep(0.05)
        seqs = [int(m.payload) for m in back.messages]
    finally:
        back.close()
    assert seqs and seqs == list(range(seqs[0], cloud.sent)), (seqs[:5], len(seqs), cloud.sent)
