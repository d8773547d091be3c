"""The pipeline applies to CoAP publishes as to MQTT ones (issue #6: "the same way to MQTT and CoAP"): versioned
device APIs with an adapter and a deprecated version counted per device, and a poison message quarantined with
its normal acknowledgement. Real peers: `edgegw run`, coap-client-openssl (coaps+tcp), a paho MQTT 5 device,
mosquitto upstream, /metrics over HTTP, `edgegw quarantine list`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
from conftest import Fleet, Mosquitto, free_port
from mqtt_peers import V5, PahoDevice
from ops_peers import metrics, sample
from test_coap_tcp import coap, start_gateway

pytestmark = pytest.mark.skipif(shutil.which("coap-client-openssl") is None,
                                reason="libcoap3-bin (coap-client-openssl) not installed")

VERSIONED = """
[transforms.v1_to_v2]
steps = [{op = "rename", fields = {tmp = "temp"}}]

[transforms.telemetry]
steps = [{op = "validate", schema = {type = "object", required = ["temp"], properties = {temp = {type = "number"}}}}]

[versions.v1]
adapter = "v1_to_v2"
deprecated = true
sunset = "2027-06-30"

[versions.v2]

[[routes]]
name = "telemetry"
match = "devices/{device_id}/+/telemetry"
topic = "{prefix}/telemetry/{device_id}"
decode = "json"
transforms = ["telemetry"]
"""


def test_versions_adapters_and_poison_messages_over_coap_and_mqtt_alike(fleet: Fleet, mosquitto: Mosquitto,
                                                                        gateway_factory: Any,
                                                                        sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="#")
    admin = free_port()
    gw = start_gateway(gateway_factory, mosquitto, VERSIONED, admin={"port": admin})
    base = f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps"
    dev = fleet.device("dev-10")
    assert coap(dev, fleet.ca, "post", f"{base}/v1/telemetry", '{"tmp": 20.5}', "json").strip() == ""
    assert coap(dev, fleet.ca, "post", f"{base}/v2/telemetry", '{"temp": 21.5}', "json").strip() == ""
    # A poison message over CoAP: kept in the quarantine, answered 2.01 like any committed publish.
    assert coap(dev, fleet.ca, "post", f"{base}/v2/telemetry", '{"temp": "hot"}', "json").strip() == ""
    mqtt = PahoDevice(fleet.device_context("dev-11"), gw.port, "dev-11", protocol=V5).start()
    try:
        mqtt.client.publish("devices/dev-11/v1/telemetry", b'{"tmp": 19}', qos=1).wait_for_publish(10)
        messages = sink.wait_for(lambda m: len(m) >= 3, 10)
    finally:
        mqtt.close()
    # One schema upstream, whichever version and transport.
    assert sorted((m.topic, json.loads(m.payload)["temp"]) for m in messages) == [
        ("cloud/telemetry/dev-10", 20.5), ("cloud/telemetry/dev-10", 21.5), ("cloud/telemetry/dev-11", 19)]
    samples = metrics(admin)
    assert sample(samples, "edgegw_pipeline_deprecated_device_messages", device="dev-10") == 1
    assert sample(samples, "edgegw_pipeline_deprecated_device_messages", device="dev-11") == 1
    assert sample(samples, "edgegw_pipeline_quarantined_messages_total") == 1
    assert {e["device_id"] for e in gw.events("pipeline.version_deprecated")} == {"dev-10", "dev-11"}
    listed = subprocess.run([sys.executable, "-m", "edgegw", "quarantine", "list", "--config", str(gw.config_path),
                             "--json"], capture_output=True, text=True, timeout=60, check=True)
    [poison] = json.loads(listed.stdout)["records"]
    assert (poison["device_id"], poison["topic"]) == ("dev-10", "devices/dev-10/v2/telemetry")
    assert poison["reason"] == "pipeline: schema: data.temp must be number", poison
    assert gw.terminate() == 0
