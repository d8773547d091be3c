"""W3C trace context (edgegw/tracing.py): accepted from devices or made at ingress, stored with the record, sent
upstream unchanged (user property, or a frame field), and in the log lines of the record's stages. Real peers: paho
devices (MQTT 5 and 3.1.1), `edgegw run` as a process, mosquitto upstream with a paho MQTT 5 subscriber."""

from __future__ import annotations

import json
import re
from typing import Any

import msgpack
import pytest

from conftest import Fleet, LabPKI
from edgegw.mqtt.forward import decode_record_properties, record_properties
from edgegw.mqtt.packets import NO_PROPERTIES, Properties
from edgegw.tracing import from_payload, new_traceparent, parse_traceparent, trace_id_of
from edgegw.uplink.frames import decode_frame
from mqtt_peers import V311, PahoDevice, props

TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")
TP_USER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP_JSON = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
TP_JSON_311 = "00-11111111111111111111111111111111-2222222222222222-01"
TP_DENIED = "00-abcdefabcdefabcdefabcdefabcdef12-1234567890abcdef-01"


def test_parse_and_make() -> None:
    assert parse_traceparent(TP_USER) == TP_USER
    assert TRACEPARENT.fullmatch(new_traceparent())
    assert new_traceparent() != new_traceparent()
    for bad in ("", "garbage", TP_USER.upper(), TP_USER + "-x", "ff" + TP_USER[2:],
                "00-" + "0" * 32 + TP_USER[35:], TP_USER[:36] + "0" * 16 + "-01", TP_USER.replace("-", "_"), 42):
        assert parse_traceparent(bad) is None, bad
    # A later version: its first 55 characters, as version 00 (W3C: parse what we know).
    assert parse_traceparent("01" + TP_USER[2:] + "-future") == TP_USER
    assert from_payload(json.dumps({"traceparent": TP_JSON, "t": 1}).encode()) == TP_JSON
    assert from_payload(b'{"traceparent": 5}') is None
    assert from_payload(b'[{"traceparent": "x"}]') is None
    assert from_payload(b'{"traceparent": "' + TP_JSON.encode() + b'", "pad": "' + b"x" * 5000 + b'"}') is None
    # Stored in the record's properties as "tp"; a traceparent user property is not kept twice.
    blob = record_properties(NO_PROPERTIES, TP_USER)
    assert decode_record_properties(blob) == {"tp": TP_USER} and trace_id_of(blob) == TP_USER[3:35]
    user = Properties(values={}, user=(("traceparent", TP_USER), ("k", "v")))
    assert decode_record_properties(record_properties(user, TP_USER)) == {"tp": TP_USER, "up": [["k", "v"]]}
    # Records from before tracing (no "tp") still decode; saved sessions (tp None) store none.
    assert trace_id_of(msgpack.packb({"ct": "x"})) is None and record_properties(NO_PROPERTIES) is None


@pytest.mark.parametrize("batch", [1, 50], ids=["single", "frames"])
def test_traceparent_from_the_device_arrives_upstream_unchanged_or_is_made_at_ingress(
        fleet: Fleet, pki: LabPKI, mosquitto: Any, gateway_factory: Any, batch: int) -> None:
    sub = PahoDevice(pki.ssl_context("sink"), mosquitto.port, f"trace-sink-{batch}").start()
    assert sub.connected.is_set(), mosquitto.log()
    sub.subscribe("cloud/#", 1)
    gw = gateway_factory(mosquitto, overrides={"uplink": {"batch_max_records": batch}}).start()
    v5 = PahoDevice(fleet.device_context("dev-03"), gw.port, "dev-03").start()
    v311 = PahoDevice(fleet.device_context("dev-04"), gw.port, "dev-04", protocol=V311).start()
    try:
        assert v5.connected.is_set() and v311.connected.is_set()
        p = props()
        p.UserProperty = [("traceparent", TP_USER), ("site", "plant-7")]
        sent = [
            v5.client.publish("devices/dev-03/t", b"user-property", qos=1, properties=p),
            v5.client.publish("devices/dev-03/t", json.dumps({"traceparent": TP_JSON, "n": 1}).encode(), qos=1),
            v5.client.publish("devices/dev-03/t", b"v5-none", qos=1),
            v311.client.publish("devices/dev-04/t", json.dumps({"n": 2, "traceparent": TP_JSON_311}).encode(), qos=1),
            v311.client.publish("devices/dev-04/t", b"v311-none", qos=0),
        ]
        bad = props()
        bad.UserProperty = [("traceparent", "not-a-traceparent")]
        sent.append(v5.client.publish("devices/dev-03/t", b"invalid", qos=1, properties=bad))
        for info in sent:
            info.wait_for_publish(5)

        # What arrives upstream, by payload: the traceparent of each record.
        got: dict[bytes, str | None] = {}

        def collect() -> bool:
            for m in sub.wait_messages(0, 0):
                if "/_batch" in m.topic:
                    for record in decode_frame(m.payload, m.topic.endswith("/zlib")):
                        got[record["payload"]] = record["traceparent"]
                else:
                    tps = [v for k, v in getattr(m.properties, "UserProperty", []) if k == "traceparent"]
                    assert len(tps) == 1, m.properties  # never two
                    got[m.payload] = tps[0]
            return len(got) >= len(sent)

        from conftest import wait_until
        wait_until(collect, 15, what="every record upstream")
        assert got[b"user-property"] == TP_USER
        assert got[json.dumps({"traceparent": TP_JSON, "n": 1}).encode()] == TP_JSON
        assert got[json.dumps({"n": 2, "traceparent": TP_JSON_311}).encode()] == TP_JSON_311
        generated = [got[b"v5-none"], got[b"v311-none"], got[b"invalid"]]
        for tp in generated:
            assert tp is not None and TRACEPARENT.fullmatch(tp), tp
            assert tp.endswith("-01")
        assert len({tp[3:35] for tp in generated}) == 3  # a new trace each

        # A refusal's log line names the trace (the device's own here).
        denied = props()
        denied.UserProperty = [("traceparent", TP_DENIED)]
        v5.client.publish("devices/dev-04/t", b"not mine", qos=1, properties=denied).wait_for_publish(5)
        entry = gw.wait_for_event("mqtt.publish_denied", device_id="dev-03")
        assert entry["trace_id"] == TP_DENIED[3:35]
    finally:
        v5.close()
        v311.close()
        sub.close()
    assert gw.terminate() == 0
