"""CoAP over DTLS through the whole gateway: `edgegw run` with ``coap.dtls = true`` (edgegw/coap/dtls.py wired by
edgegw/coap/server.py), libcoap's coap-client-openssl with fleet certificates, mosquitto upstream.

The transport itself (cookies, caps, junk) is tested in tests/test_coap_dtls*.py; here: the same site, identity,
ACL and outbox as coaps+tcp, and refusals.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from conftest import Fleet, Mosquitto, free_port
from test_coap_tcp import coap, start_gateway

CLIENT = shutil.which("coap-client-openssl")
pytestmark = pytest.mark.skipif(CLIENT is None, reason="libcoap3-bin (coap-client-openssl) not installed")


def test_dtls_publish_arrives_upstream_and_refusals(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                                     sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    port = free_port()
    gw = start_gateway(gateway_factory, mosquitto, coap={"dtls": True, "dtls_port": port},
                       acl={"publish": ["devices/{device_id}/telemetry/#"]})
    assert gw.wait_for_event("gateway.ready")["coap_dtls_port"] == port
    base = f"coaps://127.0.0.1:{port}"
    dev = fleet.device("dev-09")
    out = coap(dev, fleet.ca, "post", f"{base}/ps/telemetry/dtls", '{"over":"dtls"}', "json")
    assert out.strip() == "", out
    messages = sink.wait_for(lambda m: len(m) >= 1, 10)
    assert (messages[0].topic, messages[0].payload) == ("cloud/dev-09/telemetry/dtls", b'{"over":"dtls"}')
    assert messages[0].user_properties["edgegw-device-id"] == "dev-09"
    # The same ACL as every other transport: 4.03 with the reason.
    assert "4.03" in coap(dev, fleet.ca, "post", f"{base}/ps/config", "{}", "json")
    # No certificate, another fleet's certificate: no session, nothing stored.
    for pair in (None, fleet.rogue_device("dev-00")):
        out = coap(pair, fleet.ca, "post", f"{base}/ps/telemetry/x", '{"rogue":1}', "json", wait=3)
        assert "2.0" not in out and "4.03" not in out, out
    assert coap(dev, fleet.ca, "post", f"{base}/ps/telemetry/after", "{}", "json").strip() == ""
    sink.wait_for(lambda m: any(x.topic.endswith("/after") for x in m), 10)
    assert not any(b"rogue" in m.payload for m in sink.snapshot())
    assert gw.terminate() == 0
