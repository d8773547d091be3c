"""MQTT 3.1.1 backpressure on a full outbox (``full_policy = "reject-new"``): the refused publish is held, not
acknowledged, the connection stays open and is not read, and everything goes through once the upstream drains the
outbox. Real peers: `edgegw run` as a process, a paho 3.1.1 device, mosquitto upstream, a persistent subscriber."""

from __future__ import annotations

import time
from typing import Any

from conftest import Fleet, wait_until
from mqtt_peers import V311, PahoDevice

CAP = 10
SENT = 25


def test_311_device_is_held_not_dropped_while_the_outbox_is_full(fleet: Fleet, mosquitto_factory: Any,
                                                                  sink_factory: Any, gateway_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True).start()
    sink = sink_factory(broker, topic="cloud/#", persistent=True)  # its session queues what comes while it is away
    broker.stop()  # the upstream is down
    gw = gateway_factory(broker, overrides={
        "outbox": {"full_policy": "reject-new", "max_records": CAP},
        "log": {"level": "debug"},
    }).start()
    dev = PahoDevice(fleet.device_context("dev-07"), gw.port, "dev-07", protocol=V311, keepalive=60).start()
    try:
        assert dev.connected.is_set()
        infos = [dev.client.publish("devices/dev-07/t", f"m{i:03d}".encode(), qos=1) for i in range(SENT)]
        wait_until(lambda: sum(i.is_published() for i in infos) >= CAP, 10, what="the first publishes acknowledged")
        time.sleep(1.5)  # nothing more gets acknowledged while the outbox is full ...
        acked = [i.is_published() for i in infos]
        assert acked == [True] * CAP + [False] * (SENT - CAP)
        assert dev.connected.is_set()  # ... and the connection stays open
        gw.wait_for_event("mqtt.publish_held", device_id="dev-07")
        assert not gw.events("mqtt.disconnected")

        broker.start()  # the outbox drains upstream; the held publish and those behind it go through
        wait_until(lambda: all(i.is_published() for i in infos), 30, what="every publish acknowledged")
        assert dev.connected.is_set()
        sink.wait_for(lambda m: {x.payload for x in m} >= {f"m{i:03d}".encode() for i in range(SENT)}, 30)
        received = [x.payload for x in sink.snapshot() if x.topic == "cloud/dev-07/t"]
        assert sorted(set(received)) == [f"m{i:03d}".encode() for i in range(SENT)]  # nothing acknowledged lost
        released = gw.events("mqtt.publish_released")
        assert released, "the held publish was never retried"
    finally:
        dev.close()
    assert gw.terminate() == 0
