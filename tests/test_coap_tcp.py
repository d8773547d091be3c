"""CoAP over TLS (coaps+tcp) with real peers: libcoap's coap-client-openssl and aiocoap devices holding certificates
from `edgegw pki` -> `edgegw run` (a real process) -> mosquitto.

coap-client exits 0 even when the handshake fails; every check here reads its output (error responses print as
"4.03 reason") or looks where the message must have arrived (upstream, or the outbox file).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ops_peers import metrics
from conftest import CertPair, Fleet, GatewayProcess, LabPKI, Mosquitto, free_port, wait_until
from edgegw.config import config_from_mapping
from edgegw.errors import ConfigError

CLIENT = shutil.which("coap-client-openssl")
pytestmark = pytest.mark.skipif(CLIENT is None, reason="libcoap3-bin (coap-client-openssl) not installed")


def coap(pair: CertPair | None, ca: Path, method: str, url: str, payload: str | None = None,
         fmt: str | None = None, *, wait: int = 5) -> str:
    """One request with coap-client-openssl; its stdout + stderr."""
    cmd = [str(CLIENT), "-B", str(wait), "-m", method, "-C", str(ca)]
    if pair is not None:
        cmd += ["-c", str(pair.cert), "-j", str(pair.key)]
    if fmt is not None:
        cmd += ["-t", fmt]
    if payload is not None:
        cmd += ["-e", payload]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=wait + 10)
    return proc.stdout + proc.stderr


def start_gateway(gateway_factory: Any, broker: Mosquitto, extra: str = "",
                  **overrides: dict[str, Any]) -> GatewayProcess:
    """A gateway process with [coap] on a free port (``gw.coap_port``); ``extra`` is appended to its config."""
    sections: dict[str, dict[str, Any]] = {"coap": {"enabled": True, "bind": "127.0.0.1", "port": free_port()}}
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    gw = gateway_factory(broker, overrides=sections)
    gw.coap_port = sections["coap"]["port"]
    if extra:
        with open(gw.config_path, "a", encoding="utf-8") as f:
            f.write(extra)
    return gw.start()


def outbox_rows(gw: GatewayProcess) -> list[tuple[str, str, bytes, dict[str, Any]]]:
    """(device_id, topic, payload, properties) of the committed records, read through a separate connection."""
    db = sqlite3.connect(f"file:{gw.folder / 'outbox.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT device_id, topic, payload, properties FROM records ORDER BY id").fetchall()
    finally:
        db.close()
    return [(d, t, bytes(p), msgpack.unpackb(props) if props else {}) for d, t, p, props in rows]


def test_publish_arrives_upstream_and_refusals_say_why(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                                       sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    content_types: dict[str, str | None] = {}  # the MQTT 5 Content Type each message arrived with upstream
    deliver = sink.client.on_message

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        content_types[message.topic] = getattr(getattr(message, "properties", None), "ContentType", None)
        deliver(client, userdata, message)
    sink.client.on_message = on_message
    admin_port = free_port()
    gw = start_gateway(gateway_factory, mosquitto, acl={"publish": ["devices/{device_id}/telemetry/#"]},
                       admin={"port": admin_port})
    base = f"coaps+tcp://127.0.0.1:{gw.coap_port}"
    dev = fleet.device("dev-04")
    out = coap(dev, fleet.ca, "post", f"{base}/ps/telemetry/env", '{"t":21.5}', "json")
    assert out.strip() == "", out
    out = coap(dev, fleet.ca, "put", f"{base}/ps/telemetry/raw", "\x01\x02", "octet-stream")
    assert out.strip() == "", out
    messages = sink.wait_for(lambda m: len(m) >= 2, 10)
    assert {(m.topic, m.payload) for m in messages} == {("cloud/dev-04/telemetry/env", b'{"t":21.5}'),
                                                         ("cloud/dev-04/telemetry/raw", b"\x01\x02")}
    assert all(m.user_properties["edgegw-device-id"] == "dev-04" for m in messages)
    assert content_types == {"cloud/dev-04/telemetry/env": "application/json",
                             "cloud/dev-04/telemetry/raw": "application/octet-stream"}

    # Refused with a code and a reason the device can read; nothing of it goes upstream.
    assert "4.03" in coap(dev, fleet.ca, "post", f"{base}/ps/config", "{}", "json")
    assert "4.15" in coap(dev, fleet.ca, "post", f"{base}/ps/telemetry/x", "<a/>", "41")
    assert "4.00" in coap(dev, fleet.ca, "post", f"{base}/ps/telemetry/%23", "{}", "json")
    assert "4.04" in coap(dev, fleet.ca, "get", f"{base}/nothing-here")
    assert "4.13" in coap(dev, fleet.ca, "post", f"{base}/ps/telemetry/big", "x" * 70_000, "octet-stream")
    refused = [e["reason"] for e in gw.events("coap.request_refused") if e.get("device_id") == "dev-04"]
    assert any("not allowed" in r for r in refused) and len(refused) >= 5, refused

    # No certificate, and a certificate from another fleet's CA: the handshake fails, logged with who and why.
    for pair in (None, fleet.rogue_device("dev-00")):
        out = coap(pair, fleet.ca, "post", f"{base}/ps/telemetry/x", '{"rogue":1}', "json", wait=3)
        # What it prints varies (an alert, "cannot send", a timeout): the log says why. Its lines start with a
        # timestamp ("22:09:52.061" holds "2.0"): look for a response code only as a word of its own.
        assert not re.search(r"(?<![\d:.])2\.0\d\b", out), out
    reasons = [e["reason"] for e in gw.events("tls.handshake_failed") if e.get("listener") == "coap"]
    assert any("no client certificate" in r for r in reasons), reasons
    assert any("client certificate rejected" in r for r in reasons), reasons

    # Discovery lists what the ACL lets this device use.
    links = coap(dev, fleet.ca, "get", f"{base}/.well-known/core")
    assert links.strip().split(",") == ['</ps>;rt="core.ps";ct=40',
                                        '</ps/telemetry/%23>;rt="core.ps.data";ct="50 60 42"',
                                        '</ps/%23>;rt="core.ps.data";obs'], links

    # Junk on the port (plain bytes, then a TLS hello followed by garbage) kills nothing.
    for junk in (b"\x00" * 64 + b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello" + bytes(range(256))):
        with socket.create_connection(("127.0.0.1", gw.coap_port), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionError, TimeoutError):
                pass
    assert "" == coap(dev, fleet.ca, "post", f"{base}/ps/telemetry/after-junk", "{}", "json").strip()
    sink.wait_for(lambda m: any(x.topic.endswith("after-junk") for x in m), 10)
    assert not any(b"rogue" in m.payload for m in sink.snapshot())
    assert gw.proc is not None and gw.proc.poll() is None

    # /metrics counts what happened above (edgegw/coap/metrics.py).
    samples = metrics(admin_port)
    assert samples[("edgegw_coap_total", (("event", "published"),))] == 3
    assert samples[("edgegw_coap_total", (("event", "refused"),))] >= 5
    assert samples[("edgegw_coap_tcp_connections_total", (("event", "handshake_failed"),))] >= 2
    refusal_events = {labels: n for (name, labels), n in samples.items() if name == "edgegw_refusal_log_events_total"}
    assert refusal_events.get((("event", "coap.request_refused"),), 0) >= 5, refusal_events
    assert gw.terminate() == 0


def test_answer_only_after_the_record_is_committed(fleet: Fleet, mosquitto_factory: Any,
                                                   gateway_factory: Any) -> None:
    # Upstream never comes up, so committed records stay in the outbox file; a 300 ms commit window means an
    # answer sent before the commit would come back long before the row exists.
    broker = mosquitto_factory()
    gw = start_gateway(gateway_factory, broker, outbox={"commit_window_ms": 300.0},
                       coap={"lab": True, "lab_port": free_port()})
    base = f"coaps+tcp://127.0.0.1:{gw.coap_port}"
    for i, (method, fmt, body) in enumerate([("post", "json", '{"n":0}'), ("put", "cbor", "\xa1an\x01"),
                                             ("post", None, "plain")]):
        out = coap(fleet.device("dev-05"), fleet.ca, method, f"{base}/ps/m/{i}", body, fmt)
        assert out.strip() == "", out
        rows = outbox_rows(gw)
        assert len(rows) == i + 1, rows
        device_id, topic, payload, props = rows[-1]
        assert (device_id, topic, payload) == ("dev-05", f"devices/dev-05/m/{i}", body.encode())
        assert props.get("ct") == {"json": "application/json", "cbor": "application/cbor", None: None}[fmt]
        assert len(props["tp"]) == 55

    # The aiocoap client presenting a device certificate (a hook on its credentials map), pipelining requests.
    async def aiocoap_device() -> list[str]:
        import aiocoap
        ctx = await aiocoap.Context.create_client_context(transports=["tlsclient"])
        device_ctx = fleet.device_context("dev-06")
        ctx.client_credentials.ssl_client_context = lambda scheme, hostinfo: device_ctx  # type: ignore[method-assign]
        try:
            requests = [ctx.request(aiocoap.Message(code=aiocoap.POST, uri=f"{base}/ps/a/{i}", payload=b"%d" % i,
                                                    content_format=42)).response for i in range(20)]
            responses = await asyncio.wait_for(asyncio.gather(*requests), 20)
        finally:
            await ctx.shutdown()
        return [str(r.code) for r in responses]

    codes = asyncio.run(aiocoap_device())
    assert codes == ["2.01 Created"] * 20, codes
    rows = [r for r in outbox_rows(gw) if r[0] == "dev-06"]
    assert sorted(r[2] for r in rows) == sorted(b"%d" % i for i in range(20))
    assert rows[0][3]["ct"] == "application/octet-stream"

    # The lab listener (plain UDP): device id from ?c=, refused without it; logged loudly at start.
    opened = gw.events("coap.lab_listener_open")[0]
    assert opened["level"] == "warning" and "NO AUTHENTICATION" in opened["danger"]
    assert opened["receive_buffer"] >= 4 * 1024 * 1024  # SO_RCVBUF (the kernel default drops bursts)
    lab = f"coap://127.0.0.1:{opened['port']}"
    assert "4.01" in coap(None, fleet.ca, "post", f"{lab}/ps/t", "{}", "json")
    assert coap(None, fleet.ca, "post", f"{lab}/ps/t?c=lab-1", "{}", "json").strip() == ""
    assert any(r[:2] == ("lab-1", "devices/lab-1/t") for r in outbox_rows(gw))
    assert gw.terminate() == 0


def test_observe_receives_commands_from_upstream(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                                 sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    # A route of the pipeline (edgegw/pipeline) applies to CoAP publishes as to MQTT ones.
    gw = start_gateway(gateway_factory, mosquitto, '\n[[routes]]\nmatch = "devices/{device_id}/routed"\n'
                                                   'topic = "{prefix}/r/{device_id}"\n',
                       uplink={"command_topic": "{prefix}/+/cmd/#"})
    gw.wait_for_event("uplink.connected")
    out = coap(fleet.device("dev-07"), fleet.ca, "post", f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps/routed", "{}",
               "json")
    assert out.strip() == "", out
    sink.wait_for(lambda m: any(x.topic == "cloud/r/dev-07" for x in m), 10)
    pair = fleet.device("dev-07")
    cmd = [str(CLIENT), "-B", "20", "-s", "15", "-m", "get", "-C", str(fleet.ca), "-c", str(pair.cert),
           "-j", str(pair.key), f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps/cmd/%23"]
    observer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        gw.wait_for_event("coap.observe_started", device_id="dev-07", topic_filter="devices/dev-07/cmd/#")
        sink.client.publish("cloud/dev-07/cmd/reboot", b"reboot-now", qos=1).wait_for_publish(5)
        sink.client.publish("cloud/dev-07/cmd/led", b"blink", qos=1).wait_for_publish(5)
        # Another device's command is not delivered to this observation; commands are handled in order, so once
        # this one is reported undeliverable the two before it were handed to the observation.
        sink.client.publish("cloud/dev-08/cmd/reboot", b"not-for-07", qos=1).wait_for_publish(5)
        gw.wait_for_event("uplink.command_undeliverable", device_id="dev-08")
        # Handed to the observation is not yet read by coap-client, which prints only at exit (its output is a
        # pipe): a SIGINT right away cut the second notification short once, on a loaded machine.
        time.sleep(1.0)
    finally:
        observer.send_signal(signal.SIGINT)  # coap-client ends cleanly (and flushes its output) on SIGINT
        try:
            output = observer.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            observer.kill()
            output = observer.communicate()[0]
    assert "reboot-now" in output and "blink" in output, output
    assert "not-for-07" not in output
    gw.wait_for_event("coap.observe_ended", device_id="dev-07")
    assert gw.terminate() == 0


def test_suspended_and_revoked_devices_are_refused(tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto,
                                                   gateway_factory: Any) -> None:
    d = tmp_path / "pki"
    for args in (("pki", "init", str(d)), ("pki", "issue", str(d), "server", "gateway", "--san", "127.0.0.1"),
                 ("pki", "issue", str(d), "device", "good-1", "sus-1", "bad-1"), ("pki", "crl", str(d))):
        edgegw(*args)
    fleet = Fleet(d)
    gw = start_gateway(gateway_factory, mosquitto,
                       tls={"cert": str(d / "server" / "gateway.crt"), "key": str(d / "server" / "gateway.key"),
                            "ca": str(d / "ca.crt"), "crl": str(d / "crl.pem"), "reload_interval": 0.2},
                       registry={"path": str(d / "registry.db")}, coap={"dtls": True, "dtls_port": free_port()})
    base = f"coaps+tcp://127.0.0.1:{gw.coap_port}"
    dtls = f"coaps://127.0.0.1:{gw.wait_for_event('gateway.ready')['coap_dtls_port']}"
    for device_id in ("good-1", "sus-1", "bad-1"):
        assert coap(fleet.device(device_id), fleet.ca, "post", f"{base}/ps/t", "{}", "json").strip() == ""
    # A live connection (an observation) of the device about to be suspended: closed by the reload.
    pair = fleet.device("sus-1")
    observer = subprocess.Popen([str(CLIENT), "-B", "20", "-s", "20", "-m", "get", "-C", str(fleet.ca), "-c",
                                 str(pair.cert), "-j", str(pair.key), f"{base}/ps/cmd/%23"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        gw.wait_for_event("coap.observe_started", device_id="sus-1")
        reloads = len(gw.events("tls.reloaded"))
        edgegw("devices", "suspend", str(d), "sus-1", "--reason", "unpaid")
        edgegw("pki", "revoke", str(d), "bad-1")
        wait_until(lambda: any(e["blocked_devices"] >= 2 and e["revoked_serials"] >= 1
                               for e in gw.events("tls.reloaded")[reloads:]), 10, what="reload")
        closed = gw.wait_for_event("tls.session_closed", device_id="sus-1", listener="coap")
        assert "unpaid" in closed["reason"]
        gw.wait_for_event("coap.observe_ended", device_id="sus-1")
    finally:
        observer.kill()
        observer.communicate(timeout=10)
    out = coap(fleet.device("sus-1"), fleet.ca, "post", f"{base}/ps/t", "{}", "json")
    assert "4.03" in out and "suspended" in out and "unpaid" in out, out
    refused = gw.wait_for_event("coap.device_refused", device_id="sus-1")
    assert "unpaid" in refused["reason"]
    # Revoked: in the CRL (the handshake fails) and in the registry.
    out = coap(fleet.device("bad-1"), fleet.ca, "post", f"{base}/ps/t", '{"revoked":1}', "json", wait=3)
    assert "2.0" not in out and "4.03" not in out, out
    # The client may give up before the gateway has logged the failed handshake: wait for the line.
    wait_until(lambda: any("revoked" in e["reason"] for e in gw.events("tls.handshake_failed")
                           if e.get("listener") == "coap"), 10, what="tls.handshake_failed (revoked) on coap")
    assert coap(fleet.device("good-1"), fleet.ca, "post", f"{base}/ps/t", "{}", "json").strip() == ""
    # DTLS got the reloaded material too: the suspended and the revoked device get no session, the good one does.
    assert gw.events("dtls.material_replaced")
    for device_id in ("sus-1", "bad-1"):
        out = coap(fleet.device(device_id), fleet.ca, "post", f"{dtls}/ps/t", '{"refused":1}', "json", wait=5)
        assert "2.0" not in out, out
    reasons = " ".join(str(e.get("reason")) for e in gw.events("dtls.handshake_failed"))
    assert "unpaid" in reasons and "revoked" in reasons, reasons
    assert coap(fleet.device("good-1"), fleet.ca, "post", f"{dtls}/ps/t", "{}", "json").strip() == ""
    assert gw.terminate() == 0


def test_bad_coap_config_names_the_key(tmp_path: Path) -> None:
    base = {"tls": {"cert": "c", "key": "k", "ca": "a"}, "uplink": {"host": "h", "ca": "a", "cert": "c", "key": "k"}}
    for key, value in (("max_payload", 0), ("receive_buffer", 1024), ("port", 70000), ("idle_timeout", -1),
                       ("lab", "yes"), ("dtls_port", -1), ("dtls_handshakes_per_second", 0), ("nope", 1)):
        with pytest.raises(ConfigError) as info:
            config_from_mapping({**base, "coap": {key: value}}, base_dir=tmp_path)
        assert info.value.key == f"coap.{key}", (key, info.value.key)


def edgegw(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr



def test_a_port_in_use_stops_the_start_naming_the_key(mosquitto_factory: Any, gateway_factory: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = gateway_factory(mosquitto_factory(), overrides={"coap": {"enabled": True, "bind": "127.0.0.1",
                                                                      "port": port}})
        with pytest.raises(RuntimeError) as info:
            gw.start()
    assert "coap.port" in str(info.value) and "in use" in str(info.value), str(info.value)[-2000:]
    assert gw.proc is not None and gw.proc.returncode not in (0, None)
