"""CoAP over DTLS through the whole gateway: `edgegw run` with ``coap.dtls = true`` (edgegw/coap/dtls.py wired by
edgegw/coap/server.py), libcoap's coap-client-openssl with fleet certificates, mosquitto upstream.

The transport itself (cookies, caps, junk) is tested in tests/test_coap_dtls*.py; here: the same site, identity,
ACL and outbox as coaps+tcp, and refusals.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
from typing import Any

import pytest

from conftest import Fleet, Mosquitto, free_port, wait_until
from test_coap_tcp import coap, outbox_rows, start_gateway

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


def test_dtls_observe_receives_commands_and_discovery(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                                      sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    port = free_port()
    gw = start_gateway(gateway_factory, mosquitto, coap={"dtls": True, "dtls_port": port},
                       uplink={"command_topic": "{prefix}/+/cmd/#"})
    gw.wait_for_event("uplink.connected")
    base = f"coaps://127.0.0.1:{port}"
    dev = fleet.device("dev-10")
    links = coap(dev, fleet.ca, "get", f"{base}/.well-known/core")
    assert links.strip().split(",") == ['</ps>;rt="core.ps";ct=40',
                                        '</ps/%23>;rt="core.ps.data";ct="50 60 42";obs'], links
    # Unbuffered output, read by a thread: the test sees the notification as soon as the client printed it.
    observer = subprocess.Popen(["stdbuf", "-o0", str(CLIENT), "-B", "20", "-s", "15", "-m", "get", "-C",
                                 str(fleet.ca), "-c", str(dev.cert), "-j", str(dev.key), f"{base}/ps/cmd/%23"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = bytearray()

    def read() -> None:
        assert observer.stdout is not None
        while chunk := observer.stdout.read1(4096):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        gw.wait_for_event("coap.observe_started", device_id="dev-10", topic_filter="devices/dev-10/cmd/#")
        sink.client.publish("cloud/dev-10/cmd/reboot", b"reboot-over-dtls", qos=1).wait_for_publish(5)
        sink.client.publish("cloud/dev-11/cmd/reboot", b"not-for-10", qos=1).wait_for_publish(5)
        gw.wait_for_event("uplink.command_undeliverable", device_id="dev-11")  # in order: the first was handed over
        wait_until(lambda: b"reboot-over-dtls" in seen, 10, what="the command on the observer's output")
    finally:
        observer.send_signal(signal.SIGINT)  # coap-client ends cleanly on SIGINT
        try:
            observer.wait(10)
        except subprocess.TimeoutExpired:
            observer.kill()
            observer.wait(5)
        reader.join(5)
    assert b"not-for-10" not in seen, bytes(seen)
    gw.wait_for_event("coap.observe_ended", device_id="dev-10")
    assert gw.terminate() == 0


def test_dtls_con_answered_after_the_commit_non_best_effort(fleet: Fleet, mosquitto_factory: Any,
                                                           gateway_factory: Any) -> None:
    # No upstream: committed records stay in the outbox. A 300 ms commit window: a 2.01 sent before the commit
    # would come back long before the row exists.
    port = free_port()
    gw = start_gateway(gateway_factory, mosquitto_factory(), coap={"dtls": True, "dtls_port": port},
                       outbox={"commit_window_ms": 300.0})
    base = f"coaps://127.0.0.1:{port}"
    dev = fleet.device("dev-11")
    # Junk first (not DTLS, a DTLS header with garbage, a truncated ClientHello, an empty datagram): dropped, the
    # daemon goes on serving.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
        for data in (b"GET / HTTP/1.0\r\n\r\n", b"\x16\xfe\xfd" + bytes(range(200)),
                     b"\x16\xfe\xff\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x01\x00", b""):
            junk.sendto(data, ("127.0.0.1", port))
    for i in range(3):
        assert coap(dev, fleet.ca, "post", f"{base}/ps/con/{i}", f'{{"n":{i}}}', "json").strip() == ""
        assert [r[:3] for r in outbox_rows(gw)][-1] == ("dev-11", f"devices/dev-11/con/{i}", f'{{"n":{i}}}'.encode())
        assert len(outbox_rows(gw)) == i + 1
    out = coap_non(dev, fleet.ca, f"{base}/ps/non")
    assert "4." not in out and "5." not in out, out
    wait_until(lambda: len(outbox_rows(gw)) == 4, 10, what="the NON record")
    db = sqlite3.connect(f"file:{gw.folder / 'outbox.db'}?mode=ro", uri=True, timeout=5)
    try:
        qos = dict(db.execute("SELECT topic, qos FROM records").fetchall())
    finally:
        db.close()
    # NON: answered at once, stored as QoS 0; CON: QoS 1, answered after its commit.
    assert qos == {"devices/dev-11/con/0": 1, "devices/dev-11/con/1": 1, "devices/dev-11/con/2": 1,
                   "devices/dev-11/non": 0}, qos
    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.terminate() == 0


def coap_non(pair: Any, ca: Any, url: str) -> str:
    proc = subprocess.run([str(CLIENT), "-B", "5", "-N", "-m", "post", "-t", "json", "-e", "{}", "-C", str(ca),
                           "-c", str(pair.cert), "-j", str(pair.key), url], capture_output=True, text=True,
                          timeout=20, check=False)
    return proc.stdout + proc.stderr
