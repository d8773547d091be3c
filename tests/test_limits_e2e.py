"""Rate limits and quotas against a real `edgegw run` process: paho devices (MQTT 3.1.1 and 5) with fleet
certificates, mosquitto upstream with a subscriber, /metrics over HTTP, the usage file across a restart.

No timing assertions: "slowed" is shown by ordering (a quiet device finishes while the chatty one is still held)
and by the counters; waits are bounded."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, GatewayProcess, Mosquitto, free_port, wait_until
from mqtt_peers import V5, V311, PahoDevice
from ops_peers import metrics

from edgegw.registry.store import Registry

QUOTA_EXCEEDED = 0x97


class Publisher(PahoDevice):
    """A PahoDevice that records the PUBACK reason code of each QoS 1 publish (by mid)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acks: dict[int, int] = {}
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            self.acks[mid] = int(reason.value) if hasattr(reason, "value") else int(reason)

    def send(self, topic: str, payloads: list[bytes], qos: int = 1) -> list[int]:
        return [self.client.publish(topic, p, qos=qos).mid for p in payloads]

    def codes(self, mids: list[int]) -> list[int | None]:
        with self._lock:
            return [self.acks.get(m) for m in mids]


def start(gateway_factory: Callable[..., GatewayProcess], broker: Mosquitto, limits: str,
          **overrides: dict[str, Any]) -> tuple[GatewayProcess, int]:
    admin = free_port()
    gw = gateway_factory(broker, overrides={"admin": {"port": admin}, **overrides})
    gw.config_path.write_text(gw.config_path.read_text() + limits)  # arrays of tables: appended as TOML text
    return gw.start(), admin


def sample(port: int, name: str, **labels: str) -> float:
    return metrics(port).get((name, tuple(sorted(labels.items()))), 0.0)


def test_backpressure_slows_a_chatty_device_loses_nothing_and_spares_the_others(
        fleet: Fleet, mosquitto: Mosquitto, sink_factory: Any, gateway_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    gw, admin = start(gateway_factory, mosquitto, """
[[limits.rate]]
scope = "device"
messages_rate = 10.0
messages_burst = 5.0
""")
    chatty = Publisher(fleet.device_context("dev-03"), gw.port, "dev-03", protocol=V311).start()
    quiet = Publisher(fleet.device_context("dev-04"), gw.port, "dev-04", protocol=V5).start()
    try:
        sent = [f"c{i:03d}".encode() for i in range(30)]  # 5 at once, then 10/s: held for about 2.5 s
        chatty_mids = chatty.send("devices/dev-03/t", sent)
        wait_until(lambda: sample(admin, "edgegw_rate_limit_actions_total", protocol="mqtt", scope="device",
                                  limit="device", action="backpressure") > 0, 10, what="the chatty device held")
        quiet_mids = quiet.send("devices/dev-04/t", [f"q{i:03d}".encode() for i in range(5)])
        wait_until(lambda: None not in quiet.codes(quiet_mids), 10, what="the quiet device acknowledged")
        assert quiet.codes(quiet_mids) == [0] * 5
        assert None in chatty.codes(chatty_mids), "the chatty device was not slowed"

        wait_until(lambda: None not in chatty.codes(chatty_mids), 30, what="every chatty publish acknowledged")
        assert chatty.codes(chatty_mids) == [0] * len(sent)  # 3.1.1 PUBACK: no reason codes, all accepted
        got = sink.wait_for(lambda m: {x.payload for x in m if x.topic == "cloud/dev-03/t"} >= set(sent), 30)
        # In order as stored: record ids follow arrival at the gateway (the uplink's live-first lane may send the
        # first records after later ones, so the sink's order alone says nothing about the limiter).
        ids = {x.payload: int(x.user_properties["edgegw-record-id"]) for x in got if x.topic == "cloud/dev-03/t"}
        assert sorted(ids, key=ids.__getitem__) == sent  # nothing lost, in order
        assert chatty.connected.is_set() and not gw.events("mqtt.protocol_error")
        assert sample(admin, "edgegw_rate_limit_hits_total", protocol="mqtt") >= 1
    finally:
        chatty.close()
        quiet.close()
    assert gw.terminate() == 0


def test_reject_is_0x97_on_mqtt5_qos0_drop_is_counted_and_311_falls_back_to_backpressure(
        fleet: Fleet, mosquitto: Mosquitto, sink_factory: Any, gateway_factory: Any, tmp_path: Path) -> None:
    registry = tmp_path / "registry.db"
    shutil.copyfile(fleet.folder / "registry.db", registry)
    with Registry.open(registry) as reg:
        reg.register("dev-06", group="bronze")
    sink = sink_factory(mosquitto, topic="cloud/#")
    # A rate of 0.01/s: nothing refills during the test, so the counts below do not depend on timing.
    gw, admin = start(gateway_factory, mosquitto, """
[[limits.rate]]
name = "bronze"
scope = "device"
group = "bronze"
messages_rate = 0.01
messages_burst = 2.0
action = "drop"

[[limits.rate]]
name = "strict"
scope = "device"
messages_rate = 0.01
messages_burst = 3.0
action = "reject"
""", registry={"path": str(registry)})
    v5 = Publisher(fleet.device_context("dev-05"), gw.port, "dev-05", protocol=V5).start()
    bronze = Publisher(fleet.device_context("dev-06"), gw.port, "dev-06", protocol=V5).start()
    old = Publisher(fleet.device_context("dev-07"), gw.port, "dev-07", protocol=V311).start()
    try:
        mids = v5.send("devices/dev-05/t", [f"r{i}".encode() for i in range(6)])
        wait_until(lambda: None not in v5.codes(mids), 10, what="six PUBACKs")
        assert v5.codes(mids) == [0, 0, 0, QUOTA_EXCEEDED, QUOTA_EXCEEDED, QUOTA_EXCEEDED]

        bronze.send("devices/dev-06/t", [f"b{i}".encode() for i in range(5)], qos=0)
        marker = bronze.send("devices/dev-06/t", [b"marker"])  # QoS 1 under "drop": refused, never dropped
        wait_until(lambda: None not in bronze.codes(marker), 10, what="the marker's PUBACK")
        assert bronze.codes(marker) == [QUOTA_EXCEEDED]
        assert sample(admin, "edgegw_rate_limit_actions_total", protocol="mqtt", scope="device", limit="bronze",
                      action="drop") == 3
        assert sample(admin, "edgegw_rate_limit_actions_total", protocol="mqtt", scope="device", limit="bronze",
                      action="reject") == 1
        assert sample(admin, "edgegw_rate_limit_actions_total", protocol="mqtt", scope="device", limit="strict",
                      action="reject") == 3

        old_mids = old.send("devices/dev-07/t", [f"o{i}".encode() for i in range(4)])
        wait_until(lambda: sample(admin, "edgegw_rate_limit_actions_total", protocol="mqtt", scope="device",
                                  limit="strict", action="backpressure") == 1, 10, what="the 3.1.1 publish held")
        wait_until(lambda: None not in old.codes(old_mids[:3]), 10, what="three 3.1.1 PUBACKs")
        assert old.codes(old_mids)[3] is None  # held unacknowledged (the device keeps it), not refused
        assert old.connected.is_set()

        got = sink.wait_for(lambda m: {x.payload for x in m} >= {b"r0", b"r1", b"r2", b"o0", b"o1", b"o2"}, 15)
        assert sorted(x.payload for x in got if x.topic == "cloud/dev-06/t") == [b"b0", b"b1"]
        assert sorted(x.payload for x in got if x.topic == "cloud/dev-05/t") == [b"r0", b"r1", b"r2"]
        assert sample(admin, "edgegw_rate_limit_hits_total", protocol="mqtt") == 8
    finally:
        for dev in (v5, bronze, old):
            dev.close()
    assert gw.terminate() == 0


def usage_rows(path: Path, device_id: str) -> list[tuple[str, int, int]]:
    """(period, messages, bytes) of a device in the usage file (next to the outbox by default), read-only."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT period, messages, bytes FROM usage WHERE device_id = ? ORDER BY period",
                            (device_id,)).fetchall()
    finally:
        conn.close()


def test_quota_usage_survives_a_clean_restart_and_a_kill(fleet: Fleet, mosquitto: Mosquitto,
                                                         gateway_factory: Any) -> None:
    gw, admin = start(gateway_factory, mosquitto, """
[limits]
flush_interval = 60.0

[[limits.quota]]
name = "daily"
period = "day"
messages = 5
""")
    dev = Publisher(fleet.device_context("dev-08"), gw.port, "dev-08", protocol=V5).start()
    try:
        mids = dev.send("devices/dev-08/t", [b"a", b"b", b"c"])
        wait_until(lambda: None not in dev.codes(mids), 10, what="three PUBACKs")
        assert dev.codes(mids) == [0, 0, 0]
        assert sample(admin, "edgegw_quota_usage", quota="daily", period="day", unit="messages") == 3
    finally:
        dev.close()
    assert gw.terminate() == 0  # the flush interval is long: the usage is written at stop

    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert usage_rows(gw.folder / "usage.db", "dev-08") == [(f"d:{day}", 3, 3), (f"m:{day[:7]}", 3, 3)]

    # Now flushed every 0.2 s, and the gateway killed (SIGKILL): what was flushed survives.
    gw.config_path.write_text(gw.config_path.read_text().replace("flush_interval = 60.0", "flush_interval = 0.2"))
    gw.start()
    assert sample(admin, "edgegw_quota_usage", quota="daily", period="day", unit="messages") == 3
    dev = Publisher(fleet.device_context("dev-08"), gw.port, "dev-08", protocol=V5).start()
    try:
        mids = dev.send("devices/dev-08/t", [b"d"])
        wait_until(lambda: None not in dev.codes(mids), 10, what="a PUBACK")
        wait_until(lambda: usage_rows(gw.folder / "usage.db", "dev-08")[0][1] == 4, 10, what="the periodic flush")
    finally:
        dev.drop()
    gw.kill()

    gw.start()
    assert sample(admin, "edgegw_quota_usage", quota="daily", period="day", unit="messages") == 4
    dev = Publisher(fleet.device_context("dev-08"), gw.port, "dev-08", protocol=V5).start()
    try:
        mids = dev.send("devices/dev-08/t", [b"e", b"f"])
        wait_until(lambda: None not in dev.codes(mids), 10, what="two PUBACKs")
        assert dev.codes(mids) == [0, QUOTA_EXCEEDED]
        assert sample(admin, "edgegw_quota_exhausted_devices", quota="daily", period="day", unit="messages") == 1
        assert sample(admin, "edgegw_quota_device_usage_ratio", device="dev-08", quota="daily", period="day") == 1.0
        gw.wait_for_event("limits.quota_exhausted", device_id="dev-08", quota="daily")
    finally:
        dev.close()
    assert gw.terminate() == 0


COAP_CLIENT = shutil.which("coap-client-openssl")


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin (coap-client-openssl) not installed")
def test_coap_gets_4_29_and_shares_the_device_bucket_with_mqtt(fleet: Fleet, mosquitto: Mosquitto,
                                                              gateway_factory: Any) -> None:
    coap_port = free_port()
    gw, admin = start(gateway_factory, mosquitto, """
[[limits.rate]]
scope = "device"
messages_rate = 0.01
messages_burst = 2.0
action = "reject"
""", coap={"enabled": True, "bind": "127.0.0.1", "port": coap_port})
    dev = fleet.device("dev-09")

    def post(payload: str) -> str:
        cmd = [str(COAP_CLIENT), "-B", "5", "-m", "post", "-C", str(fleet.ca), "-c", str(dev.cert), "-j",
               str(dev.key), "-t", "json", "-e", payload, f"coaps+tcp://127.0.0.1:{coap_port}/ps/telemetry"]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20)
        return proc.stdout + proc.stderr

    mqtt = Publisher(fleet.device_context("dev-09"), gw.port, "dev-09", protocol=V5).start()
    try:
        mids = mqtt.send("devices/dev-09/t", [b"m"])  # the first of the device's two tokens
        wait_until(lambda: None not in mqtt.codes(mids), 10, what="the PUBACK")
        assert mqtt.codes(mids) == [0]
        assert post('{"n":1}').strip() == ""  # 2.01 after the commit: coap-client prints nothing
        out = post('{"n":2}')  # the same device, the same bucket, now empty
        assert "4.29" in out, out
        mids = mqtt.send("devices/dev-09/t", [b"m2"])
        wait_until(lambda: None not in mqtt.codes(mids), 10, what="the PUBACK")
        assert mqtt.codes(mids) == [QUOTA_EXCEEDED]
    finally:
        mqtt.close()
    assert sample(admin, "edgegw_rate_limit_actions_total", protocol="coap", scope="device", limit="device",
                  action="reject") == 1
    assert gw.terminate() == 0


def test_reload_applies_new_limits_keeps_usage_and_refuses_a_broken_one(fleet: Fleet, mosquitto: Mosquitto,
                                                                        gateway_factory: Any) -> None:
    rule = """
[[limits.rate]]
scope = "device"
messages_rate = {rate}
messages_burst = {burst}
action = "{action}"

[[limits.quota]]
name = "daily"
period = "day"
messages = 100
"""
    gw, admin = start(gateway_factory, mosquitto, rule.format(rate=0.01, burst=1.0, action="reject"))
    base = gw.config_path.read_text()[: -len(rule.format(rate=0.01, burst=1.0, action="reject"))]
    dev = Publisher(fleet.device_context("dev-10"), gw.port, "dev-10", protocol=V5).start()
    try:
        mids = dev.send("devices/dev-10/t", [b"1", b"2"])
        wait_until(lambda: None not in dev.codes(mids), 10, what="two PUBACKs")
        assert dev.codes(mids) == [0, QUOTA_EXCEEDED]

        assert gw.proc is not None
        gw.config_path.write_text(base + rule.format(rate=0.01, burst=1.0, action="explode"))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_event("config.reload_refused", key="limits.rate[0].action")
        mids = dev.send("devices/dev-10/t", [b"3"])
        wait_until(lambda: None not in dev.codes(mids), 10, what="a PUBACK")
        assert dev.codes(mids) == [QUOTA_EXCEEDED]  # the running limits stay

        gw.config_path.write_text(base + rule.format(rate=0.01, burst=3.0, action="reject"))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_event("limits.replaced")
        mids = dev.send("devices/dev-10/t", [b"4", b"5"])
        wait_until(lambda: None not in dev.codes(mids), 10, what="two PUBACKs")
        # The same (emptied) device bucket: a larger burst does not refill it, so still refused ...
        assert dev.codes(mids) == [QUOTA_EXCEEDED, QUOTA_EXCEEDED]

        gw.config_path.write_text(base + rule.format(rate=0.01, burst=3.0, action="reject").replace(
            'scope = "device"', 'name = "renamed"\nscope = "device"'))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(gw.events("limits.replaced")) == 2, 10, what="the second reload")
        mids = dev.send("devices/dev-10/t", [b"6", b"7", b"8", b"9"])
        wait_until(lambda: None not in dev.codes(mids), 10, what="four PUBACKs")
        # ... a renamed rule is a new bucket, full.
        assert dev.codes(mids) == [0, 0, 0, QUOTA_EXCEEDED]
        assert dev.connected.is_set()
        assert sample(admin, "edgegw_quota_usage", quota="daily", period="day", unit="messages") == 4  # kept
    finally:
        dev.close()
    assert gw.terminate() == 0
