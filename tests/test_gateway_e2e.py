"""The whole path with real peers: paho / mosquitto_pub devices -> `edgegw run` (a real process) -> mosquitto.

Devices hold certificates made by `edgegw pki`; mosquitto requires the gateway's client certificate.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import defaultdict
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from conftest import Fleet, GatewayProcess, Mosquitto, Received, wait_until
from edgegw.mqtt.codec import FrameReader, decode_packet, encode_packet
from edgegw.mqtt.packets import MQTT_311, Connack, Connect, Publish


class Device:
    """A paho device (its own network thread) that remembers which of its messages the gateway acknowledged."""

    def __init__(self, fleet: Fleet, gw: GatewayProcess, device_id: str, *, client_id: str | None = None,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311, rogue: bool = False,
                 with_cert: bool = True, max_inflight: int = 20) -> None:
        self.device_id = device_id
        self.connack: Any = None
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self._sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        # No automatic reconnect: a refused or dropped device stays down (the tests count connections), and its
        # network thread ends with the connection, so loop_stop() does not wait out paho's reconnect sleep (<= 1 s).
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or device_id, protocol=protocol,
                             reconnect_on_failure=False)
        client.tls_set_context(fleet.device_context(device_id, rogue=rogue, with_cert=with_cert))
        client.max_inflight_messages_set(max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a: self.disconnected.set()
        self.client = client
        self.gw = gw

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason
        if not reason.is_failure:
            self.connected.set()
        else:
            self.disconnected.set()

    @property
    def acked(self) -> list[int]:
        """Seq numbers whose PUBACK arrived (paho marks a QoS 1 message published only then). A publish attempted
        after the connection dropped has a failure rc (is_published() would raise): never acknowledged."""
        return [seq for seq, info in list(self._sent) if info.rc == 0 and info.is_published()]

    def connect(self, timeout: float = 5.0) -> Device:
        self.client.connect("127.0.0.1", self.gw.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not (self.connected.is_set() or self.disconnected.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def publish(self, seq: int, topic: str | None = None, qos: int = 1) -> None:
        payload = json.dumps({"device": self.device_id, "seq": seq}).encode()
        info = self.client.publish(topic or f"devices/{self.device_id}/telemetry", payload, qos=qos)
        self._sent.append((seq, info))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def seqs_by_device(messages: list[Received]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        body = json.loads(m.payload)
        out[body["device"]].append(body["seq"])
    return out


@pytest.fixture
def setup(mosquitto: Mosquitto, gateway_factory: Any, sink_factory: Any) -> tuple[Mosquitto, GatewayProcess, Any]:
    sink = sink_factory(mosquitto, topic="cloud/#")
    gw = gateway_factory(mosquitto).start()
    # Records committed before the uplink's first connection are backlog, which live records may overtake
    # (docs/OUTBOX.md, live-first); the order assertions here are about a connected uplink.
    gw.wait_for_event("uplink.connected")
    return mosquitto, gw, sink


def test_1000_messages_from_10_devices_arrive_in_order(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    devices = [Device(fleet, gw, f"dev-{i:02d}").connect() for i in range(10)]
    try:
        assert all(d.connected.is_set() for d in devices)
        for seq in range(100):
            for d in devices:
                d.publish(seq)
        wait_until(lambda: all(len(d.acked) == 100 for d in devices), 30, what="all PUBACKs")
        messages = sink.wait_for(lambda m: len(m) >= 1000, 30)
    finally:
        for d in devices:
            d.close()
    per_device = seqs_by_device(messages)
    assert set(per_device) == {d.device_id for d in devices}
    for device_id, seqs in per_device.items():
        assert seqs == list(range(100)), f"{device_id} out of order or duplicated"
    first = messages[0]
    assert first.topic.startswith("cloud/dev-") and first.topic.endswith("/telemetry")
    assert first.user_properties["edgegw-device-id"] == json.loads(first.payload)["device"]
    assert int(first.user_properties["edgegw-record-id"]) > 0
    assert "edgegw-received-at" in first.user_properties
    ids = [int(m.user_properties["edgegw-record-id"]) for m in messages]
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
def test_mosquitto_pub_as_device(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    pair = fleet.device("dev-11")
    proc = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gw.port), "--cafile", str(fleet.ca),
                           "--cert", str(pair.cert), "--key", str(pair.key), "-i", "dev-11", "-q", "1",
                           "-t", "devices/dev-11/env/temp", "-m", '{"device":"dev-11","seq":7}'],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    messages = sink.wait_for(lambda m: len(m) >= 1, 10)
    assert messages[0].topic == "cloud/dev-11/env/temp"
    assert messages[0].payload == b'{"device":"dev-11","seq":7}'


def test_refused_devices_are_logged_with_who_and_why(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    cases = {
        "no certificate": Device(fleet, gw, "dev-00", with_cert=False),
        "other CA": Device(fleet, gw, "dev-00", rogue=True),
        "expired": Device(fleet, gw, "expired-01"),
    }
    for name, device in cases.items():
        try:
            device.connect(timeout=3)
        except (ssl.SSLError, OSError):
            pass  # TLS 1.2 fails in connect(); with TLS 1.3 the client learns it at its first read
        finally:
            device.client.loop_stop()
        assert not device.connected.is_set(), name
    failures = [e["reason"] for e in gw.events("tls.handshake_failed")]
    wait_until(lambda: len(gw.events("tls.handshake_failed")) >= 3, 10, what="3 handshake failures logged")
    failures = [e["reason"] for e in gw.events("tls.handshake_failed")]
    assert any("no client certificate" in r for r in failures), failures
    assert any("certificate has expired" in r for r in failures), failures
    assert any("unknown ca" in r.lower() or "unable to get local issuer" in r for r in failures), failures

    mismatch = Device(fleet, gw, "dev-01", client_id="dev-02").connect()
    try:
        assert mismatch.disconnected.wait(5)
        assert not mismatch.connected.is_set()
        assert mismatch.connack is not None and mismatch.connack.value == 0x87  # paho maps 3.1.1 rc 5 to 0x87
    finally:
        mismatch.close()
    entry = gw.wait_for_event("mqtt.connect_refused")
    assert entry["client_id"] == "dev-02" and entry["cert_cn"] == "dev-01"


def test_publish_outside_own_namespace_closes_the_connection(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    device = Device(fleet, gw, "dev-03").connect()
    try:
        device.publish(1, topic="devices/dev-04/telemetry")
        assert device.disconnected.wait(5)
        assert device.acked == []
    finally:
        device.close()
    entry = gw.wait_for_event("mqtt.publish_denied")
    assert entry["device_id"] == "dev-03" and entry["topic"] == "devices/dev-04/telemetry"
    time.sleep(0.5)
    assert sink.snapshot() == []


def test_upstream_down_then_back_delivers_everything(fleet: Fleet, mosquitto_factory: Any, gateway_factory: Any,
                                                     sink_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True).start()
    sink = sink_factory(broker, topic="cloud/#", persistent=True)
    gw = gateway_factory(broker).start()
    gw.wait_for_event("uplink.connected")
    broker.stop()
    device = Device(fleet, gw, "dev-05").connect()
    try:
        for seq in range(300):
            device.publish(seq)
        wait_until(lambda: len(device.acked) == 300, 20, what="PUBACKs from the outbox while upstream is down")
        broker.start()
        messages = sink.wait_for(lambda m: len(set(seqs_by_device(m).get("dev-05", []))) >= 300, 30)
    finally:
        device.close()
    seqs = seqs_by_device(messages)["dev-05"]
    assert sorted(set(seqs)) == list(range(300))
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == list(range(300)), "backlog not drained oldest first"


def test_kill_9_loses_nothing_that_was_acknowledged(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    device = Device(fleet, gw, "dev-06").connect()
    stop = threading.Event()
    sent = 0

    def stream() -> None:
        nonlocal sent
        while not stop.is_set() and not device.disconnected.is_set():
            device.publish(sent)
            sent += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_until(lambda: len(device.acked) > 300, 20, what="a stream under way")
        gw.kill()  # SIGKILL mid-stream: no shutdown code runs
        assert device.disconnected.wait(10)
    finally:
        stop.set()
        thread.join(10)
        device.close()
    acked = set(device.acked)
    assert acked and sent > len(acked) - 1
    gw.start()  # the same outbox file, the same port
    messages = sink.wait_for(lambda m: acked <= set(seqs_by_device(m).get("dev-06", [])), 30)
    seqs = seqs_by_device(messages)["dev-06"]
    duplicates = len(seqs) - len(set(seqs))
    print(f"kill -9: sent {sent}, acknowledged {len(acked)}, delivered {len(set(seqs))}, duplicates {duplicates}")
    assert acked <= set(seqs)


def test_sigterm_drains_and_exits_zero(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    device = Device(fleet, gw, "dev-07").connect()
    try:
        for seq in range(200):
            device.publish(seq)
        wait_until(lambda: len(device.acked) == 200, 20, what="PUBACKs")
        assert gw.terminate() == 0
        assert device.disconnected.wait(5)
    finally:
        device.close()
    gw.wait_for_event("gateway.stopped")
    gw.start()
    messages = sink.wait_for(lambda m: set(range(200)) <= set(seqs_by_device(m).get("dev-07", [])), 20)
    assert set(seqs_by_device(messages)["dev-07"]) >= set(range(200))


def raw_tls(fleet: Fleet, gw: GatewayProcess, device_id: str) -> ssl.SSLSocket:
    ctx = fleet.device_context(device_id)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def read_packet(sock: ssl.SSLSocket, timeout: float = 5.0) -> Any:
    sock.settimeout(timeout)
    frames = FrameReader(1 << 20)
    while True:
        frame = frames.next_frame()
        if frame is not None:
            return decode_packet(frame[0], frame[1], MQTT_311)
        data = sock.recv(4096)
        if not data:
            return None
        frames.feed(data)


def closed_by_peer(sock: ssl.SSLSocket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def test_garbage_on_one_connection_does_not_disturb_another(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    good = Device(fleet, gw, "dev-08").connect()
    try:
        good.publish(0)
        bad = raw_tls(fleet, gw, "dev-09")
        bad.sendall(b"\x10\xff\xff\xff\xff\x7fgarbage")  # a CONNECT whose length field is 5 bytes long
        assert closed_by_peer(bad, 5)
        bad.close()
        bad = raw_tls(fleet, gw, "dev-09")
        bad.sendall(encode_packet(Connect(MQTT_311, "dev-09", True, 30), MQTT_311))
        assert isinstance(read_packet(bad), Connack)
        bad.sendall(b"\x32\x05\x00\x01" + b"\x00" * 40)  # PUBLISH whose topic is longer than the packet
        assert closed_by_peer(bad, 5)
        bad.close()
        for seq in range(1, 50):
            good.publish(seq)
        wait_until(lambda: len(good.acked) == 50, 10, what="the other device's PUBACKs")
        assert not good.disconnected.is_set()
    finally:
        good.close()
    messages = sink.wait_for(lambda m: len(seqs_by_device(m).get("dev-08", [])) >= 50, 10)
    assert seqs_by_device(messages)["dev-08"] == list(range(50))
    errors = gw.events("mqtt.protocol_error")
    assert any(e.get("cert_cn") == "dev-09" for e in errors), errors
    assert any(e.get("device_id") == "dev-09" for e in errors), errors


def test_same_device_connecting_again_takes_over(fleet: Fleet, setup: Any) -> None:
    broker, gw, sink = setup
    first = raw_tls(fleet, gw, "dev-10")
    first.sendall(encode_packet(Connect(MQTT_311, "dev-10", True, 30), MQTT_311))
    assert isinstance(read_packet(first), Connack)
    second = raw_tls(fleet, gw, "dev-10")
    second.sendall(encode_packet(Connect(MQTT_311, "dev-10", True, 30), MQTT_311))
    assert isinstance(read_packet(second), Connack)
    assert closed_by_peer(first, 5)
    second.sendall(encode_packet(Publish("devices/dev-10/x", b'{"device":"dev-10","seq":1}', 1, packet_id=1),
                                 MQTT_311))
    ack = read_packet(second)
    assert type(ack).__name__ == "Puback" and ack.packet_id == 1
    gw.wait_for_event("mqtt.session_taken_over", device_id="dev-10")
    first.close()
    second.close()


def test_limits_connections_keepalive_packet_size(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any) -> None:
    gw = gateway_factory(mosquitto, overrides={"mqtt": {"max_connections": 2, "max_packet_size": 1024,
                                                        "connect_timeout": 2.0}}).start()
    a = raw_tls(fleet, gw, "dev-00")
    a.sendall(encode_packet(Connect(MQTT_311, "dev-00", True, 1), MQTT_311))  # keepalive 1 s
    assert isinstance(read_packet(a), Connack)
    b = raw_tls(fleet, gw, "dev-01")  # no CONNECT: closed after connect_timeout
    with pytest.raises((ssl.SSLError, OSError)):
        c = raw_tls(fleet, gw, "dev-02")  # the third is refused at accept
        c.settimeout(3)
        if not c.recv(1):
            raise ConnectionResetError("closed at accept")
    gw.wait_for_event("mqtt.connection_refused", reason="capacity")
    started = time.monotonic()
    assert closed_by_peer(a, 5)  # silent for 1.5 x keepalive
    assert time.monotonic() - started < 4
    gw.wait_for_event("mqtt.disconnected", device_id="dev-00", reason="KEEP_ALIVE_TIMEOUT")
    assert closed_by_peer(b, 5)
    gw.wait_for_event("mqtt.connect_timeout", cert_cn="dev-01")
    a.close()
    b.close()
    big = raw_tls(fleet, gw, "dev-03")
    big.sendall(encode_packet(Connect(MQTT_311, "dev-03", True, 30), MQTT_311))
    assert isinstance(read_packet(big), Connack)
    big.sendall(encode_packet(Publish("devices/dev-03/x", b"x" * 2000, 1, packet_id=1), MQTT_311))
    assert closed_by_peer(big, 5)
    entry = gw.wait_for_event("mqtt.protocol_error", device_id="dev-03")
    assert entry["reason"] == "PACKET_TOO_LARGE"
    big.close()


def test_unusable_outbox_fails_at_start_naming_the_file(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    import sys
    gw = gateway_factory(mosquitto)
    blocker = gw.folder / "not-a-folder"
    blocker.write_text("a file where the outbox folder should be")
    gw.config_path.write_text(gw.config_path.read_text().replace(
        str(gw.folder / "outbox.db"), str(blocker / "outbox.db")))
    proc = subprocess.run([sys.executable, "-m", "edgegw", "run", "--config", str(gw.config_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert str(blocker / "outbox.db") in proc.stderr
