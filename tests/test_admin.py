"""The admin server of a real `edgegw run` process, over real HTTP: health, metrics, the JSON API, OpenAPI."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from http.client import BadStatusLine, HTTPSConnection
from typing import Any

import pytest

from conftest import Fleet, Mosquitto, free_port, wait_until
from ops_peers import (
    PahoDevice,
    admin_gateway,
    bad_handshakes,
    get_json,
    http,
    metrics,
    post_json,
    sample,
)


def test_health_metrics_and_api_of_a_running_gateway(mosquitto: Mosquitto, gateway_factory: Any,
                                                     fleet: Fleet) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto)
    gw.wait_for_event("admin.listening", port=port)
    old = PahoDevice(fleet, gw.port, "dev-01")
    new = PahoDevice(fleet, gw.port, "dev-02", v5=True, reconnect_on_failure=False)  # disconnected below
    try:
        old.publish(20)
        new.publish(30)
        bad_handshakes(gw.port, 2)
        gw.wait_for_event("uplink.connected")

        status, body = get_json(port, "/healthz")
        assert status == 200 and body["status"] == "alive"
        status, body = get_json(port, "/readyz")
        assert status == 200, body
        assert body["ready"] is True
        assert body["checks"]["mqtt_listener"] == {"ok": True, "port": gw.port}
        assert body["checks"]["outbox_writable"]["ok"] is True
        assert body["uplink"]["state"] == "connected"

        m = metrics(port)
        assert sample(m, "edgegw_connections", protocol="mqtt", version="3.1.1") == 1
        assert sample(m, "edgegw_connections", protocol="mqtt", version="5") == 1
        assert sample(m, "edgegw_messages_received_total", protocol="mqtt", qos="1") == 50
        assert sample(m, "edgegw_messages_acknowledged_total", protocol="mqtt", qos="1") == 50
        assert sample(m, "edgegw_uplink_state", state="connected") == 1
        assert sample(m, "edgegw_uplink_state", state="down") == 0
        assert sample(m, "edgegw_uplink_up") == 1
        assert sample(m, "edgegw_refusals_total", protocol="mqtt", reason="tls_handshake") == 2
        assert sample(m, "edgegw_refusal_log_events_total", event="tls.handshake_failed") == 2
        assert sample(m, "edgegw_outbox_records") >= 0
        assert sample(m, "edgegw_outbox_oldest_age_seconds") >= 0
        assert sample(m, "edgegw_quarantine_records") == 0
        assert 0 <= sample(m, "edgegw_event_loop_lag_seconds") < 1
        expiry = sample(m, "edgegw_certificate_expiry_timestamp_seconds", certificate="server")
        assert expiry > time.time() + 86400
        wait_until(lambda: ("edgegw_uplink_rtt_seconds", ()) in metrics(port), 10, what="an uplink RTT sample")
        wait_until(lambda: sample(metrics(port), "edgegw_uplink_acked_total") >= 50, 10, what="50 acked upstream")

        status, body = get_json(port, "/api/devices")
        assert status == 200
        by_id = {d["device_id"]: d for d in body["devices"]}
        assert set(by_id) == {"dev-01", "dev-02"} and body["count"] == 2
        assert by_id["dev-01"]["version"] == "3.1.1" and by_id["dev-02"]["version"] == "5"
        assert by_id["dev-01"]["peer"].startswith("127.0.0.1:")

        status, body = get_json(port, "/api/outbox")
        assert status == 200
        assert body["committed_records"] >= 50 and body["depth"] >= 0 and body["quarantined"] == 0
        assert body["quarantine_dropped"] == {}

        status, body = get_json(port, "/api/quarantine?limit=10")
        assert status == 200 and body == {"count": 0, "records": []}
        status, body = get_json(port, "/api/quarantine?limit=0")
        assert status == 400

        # Disconnect: MQTT 5 hears DISCONNECT 0x98 (Administrative action); a second try finds nobody.
        status, body = post_json(port, "/api/devices/dev-02/disconnect")
        assert status == 200 and body == {"device_id": "dev-02", "disconnected": True}
        assert new.disconnected.wait(5)
        assert new.disconnect_reason is not None and int(new.disconnect_reason.value) == 0x98
        gw.wait_for_event("admin.device_disconnected", device_id="dev-02")
        new.client.loop_stop()  # no reconnect: the next answer must be 404
        wait_until(lambda: "dev-02" not in {d["device_id"] for d in get_json(port, "/api/devices")[1]["devices"]},
                   5, what="dev-02 gone")
        status, body = post_json(port, "/api/devices/dev-02/disconnect")
        assert status == 404 and "not connected" in body["error"]

        status, body = post_json(port, "/api/reload")
        assert status == 200 and body == {"reloaded": True}, body
        gw.wait_for_event("tls.reloaded", trigger="admin-api")

        status, body = get_json(port, "/api/stats")
        assert status == 200
        assert body["gateway_id"] == "gw-test"
        assert [r["event"] for r in body["refusals"]].count("tls.handshake_failed") == 2
        assert body["mqtt"]["publish_received"] == 50
        assert body["history"], body
    finally:
        old.close()
        new.client.loop_stop()
    assert gw.terminate() == 0


def test_openapi_documents_every_route(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto)
    status, doc = get_json(port, "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    # Every route the server answers is documented, and the table is what the server serves.
    served = {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/api/stats"),
              ("GET", "/api/devices"), ("POST", "/api/devices/{device_id}/disconnect"),
              ("POST", "/api/devices/{device_id}/suspend"), ("POST", "/api/devices/{device_id}/resume"),
              ("GET", "/api/outbox"),
              ("GET", "/api/quarantine"), ("POST", "/api/reload"), ("GET", "/openapi.json"),
              ("GET", "/asyncapi.json"), ("GET", "/docs")}
    assert documented == served
    for method, path in served:
        concrete = path.replace("{device_id}", "nobody")
        status, _, _ = http(port, method, concrete, b"{}" if method == "POST" else None,
                            {"Content-Type": "application/json"} if method == "POST" else {})
        assert status not in (404, 405) or concrete.endswith("/disconnect"), (method, path, status)
    op = doc["paths"]["/api/devices/{device_id}/disconnect"]["post"]
    assert op["parameters"][0] == {"name": "device_id", "in": "path", "required": True, "schema": {"type": "string"}}
    assert doc["paths"]["/api/quarantine"]["get"]["parameters"][0]["name"] == "limit"
    # Undocumented paths and methods are refused.
    assert http(port, "GET", "/api/nothing")[0] == 404
    assert http(port, "DELETE", "/api/devices")[0] == 405
    assert gw.terminate() == 0


def test_admin_refuses_foreign_hosts_and_non_json_posts(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto)
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host header.
    status, _, body = http(port, "GET", "/api/devices", headers={"Host": "evil.example:9180"})
    assert status == 403, body
    # A cross-site form can send text/plain, not JSON without a preflight we never answer.
    status, _, body = http(port, "POST", "/api/reload", b"x=1", {"Content-Type": "text/plain"})
    assert status == 415, body
    status, _, body = http(port, "POST", "/api/reload", b"{}", {"Content-Type": "application/json",
                                                               "Origin": "http://evil.example"})
    assert status == 403, body
    status, _, body = http(port, "POST", "/api/reload", b"x" * 70_000, {"Content-Type": "application/json"})
    assert status == 413
    assert http(port, "HEAD", "/healthz")[0] == 200
    assert gw.terminate() == 0


def test_uplink_down_does_not_make_the_gateway_unready(mosquitto: Mosquitto, gateway_factory: Any,
                                                       fleet: Fleet) -> None:
    dead = free_port()  # nothing listens there: the uplink never connects
    gw, port = admin_gateway(gateway_factory, mosquitto, uplink={"port": dead})
    device = PahoDevice(fleet, gw.port, "dev-03")
    try:
        device.publish(10)
    finally:
        device.close()
    status, body = get_json(port, "/readyz")
    assert status == 200 and body["ready"] is True
    assert body["uplink"]["state"] in ("down", "connecting")
    m = metrics(port)
    assert sample(m, "edgegw_uplink_up") == 0
    assert sample(m, "edgegw_outbox_records") == 10
    wait_until(lambda: sample(metrics(port), "edgegw_outbox_oldest_age_seconds") > 0, 5, what="oldest age")
    status, body = get_json(port, "/api/outbox")
    assert body["depth"] == 10 and body["oldest_age_seconds"] is not None
    assert gw.terminate() == 0


def test_admin_disabled_and_port_taken(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    gw = gateway_factory(mosquitto, overrides={"admin": {"enabled": False}}).start()
    assert not gw.events("admin.listening")
    assert gw.terminate() == 0
    # The admin port is taken: logged as an error, the data path runs anyway.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        gw = gateway_factory(mosquitto, overrides={"admin": {"port": taken}}).start()
        entry = gw.wait_for_event("admin.bind_failed")
        assert entry["port"] == taken and entry["level"] == "error"
        assert gw.terminate() == 0


def test_asyncapi_document_from_the_config(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto,
                             acl={"publish": ["devices/{device_id}/#", "alarms/+/{device_id}"]})
    # The CLI: edgegw docs --config FILE
    proc = subprocess.run([sys.executable, "-m", "edgegw", "docs", "--config", str(gw.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {"devices/{device_id}/{rest}", "alarms/{level1}/{device_id}"} <= addresses
    for op in doc["operations"].values():
        assert op["channel"]["$ref"].split("/")[-1] in doc["channels"]
    assert doc["servers"]["mqtts"]["host"] == f"127.0.0.1:{gw.port}"
    assert doc["components"]["securitySchemes"]["deviceCertificate"]["type"] == "X509"
    # The admin server serves the same document, and a page of it.
    status, served = get_json(port, "/asyncapi.json")
    assert status == 200 and served["channels"] == doc["channels"]
    status, headers, page = http(port, "GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"alarms/{level1}/{device_id}" in page and b"X509" in page
    assert gw.terminate() == 0


def test_quarantine_lists_records_the_upstream_refused(mosquitto_factory: Any, gateway_factory: Any,
                                                      fleet: Fleet) -> None:
    # The cloud only accepts cloud/dev-06/ok/...: everything else gets PUBACK 0x87 and is quarantined, where only
    # the most recent refusal is kept (outbox.quarantine_max_records = 1).
    broker = mosquitto_factory(acl="user uplink\ntopic write cloud/dev-06/ok/#\n").start()
    gw, port = admin_gateway(gateway_factory, broker, outbox={"quarantine_max_records": 1})
    device = PahoDevice(fleet, gw.port, "dev-06")
    try:
        for topic, payload in (("ok/t", b"fine"), ("secret/old", b"refused-first"), ("secret", b"refused-payload")):
            device.client.publish(f"devices/dev-06/{topic}", payload, qos=1).wait_for_publish(10)
    finally:
        device.close()
    wait_until(lambda: get_json(port, "/api/outbox")[1]["quarantine_dropped"] == {"dev-06": 1}, 15,
               what="the older refusal dropped from the quarantine")
    status, body = get_json(port, "/api/quarantine")
    assert body["count"] == 1
    record = body["records"][0]
    assert record["device_id"] == "dev-06" and record["topic"] == "devices/dev-06/secret"
    assert "0x87" in record["reason"] or "87" in record["reason"], record
    assert record["payload_bytes"] == len(b"refused-payload") and "payload" not in record
    m = metrics(port)
    assert sample(m, "edgegw_quarantine_records") == 1
    assert sample(m, "edgegw_uplink_refused_total") == 2
    assert sample(m, "edgegw_outbox_quarantine_dropped_records_total") == 1
    status, stats = get_json(port, "/api/stats")
    assert any(r["event"] == "uplink.publish_refused" for r in stats["refusals"])
    assert gw.terminate() == 0


def test_admin_over_mtls_requires_a_client_certificate(mosquitto: Mosquitto, gateway_factory: Any,
                                                       fleet: Fleet) -> None:
    server = fleet.folder / "server"
    gw, port = admin_gateway(gateway_factory, mosquitto, admin={
        "bind": "127.0.0.1", "tls_cert": str(server / "gateway.crt"), "tls_key": str(server / "gateway.key"),
        "tls_client_ca": str(fleet.ca)})
    entry = gw.wait_for_event("admin.listening", port=port)
    assert entry["tls"] is True and entry["client_certificates"] is True and entry["url"].startswith("https://")

    def get(context: ssl.SSLContext) -> int:
        conn = HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status
        finally:
            conn.close()

    # A client certificate from the fleet CA (an operator's or a monitoring agent's) gets in.
    assert get(fleet.device_context("dev-07")) == 200
    # No client certificate, or one from another CA: the handshake fails, nothing is served.
    for context in (fleet.device_context("dev-07", with_cert=False), fleet.device_context("dev-00", rogue=True)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(context)
    # Plain HTTP on the TLS port is not answered either.
    with pytest.raises((ConnectionError, OSError, BadStatusLine)):
        http(port, "GET", "/readyz")
    assert gw.terminate() == 0
