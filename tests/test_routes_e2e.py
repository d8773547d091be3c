"""Routes, transforms, tenants and quarantine end to end: paho devices -> `edgegw run` (a real process) -> mosquitto,
and the `edgegw quarantine` commands on the real outbox file."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
import pytest
from conftest import Fleet, GatewayProcess, Mosquitto, free_port, wait_until
from mqtt_peers import drop_link
from ops_peers import metrics, sample
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgegw.registry.store import Registry

PIPELINE = """
[transforms.telemetry]
steps = [
  {op = "rename", fields = {t = "temp_f", h = "humidity"}},
  {op = "convert", field = "temp_f", from = "degF", to = "degC"},
  {op = "rename", fields = {temp_f = "temp_c"}},
  {op = "filter", expr = "humidity >= 0"},
  {op = "validate", schema = {type = "object", required = ["temp_c", "humidity"]}},
  {op = "enrich", fields = ["site", "tenant"]},
]

[[routes]]
name = "telemetry"
match = "devices/{device_id}/telemetry"
topic = "{prefix}/telemetry/{device_id}"
decode = "json"
encode = "msgpack"
transforms = ["telemetry"]
priority = "telemetry"
"""


def edgegw(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


class Device:
    """A paho MQTT 5 device that records PUBACK reason codes by message id."""

    def __init__(self, fleet: Fleet, gw: GatewayProcess, device_id: str, *, will: tuple[str, bytes] | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        self.acks: dict[int, int] = {}
        self.suback: list[int] = []
        # No automatic reconnect: a device the gateway closes stays down, and its network thread ends with the
        # connection, so loop_stop() does not wait out paho's reconnect sleep (<= 1 s).
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=MQTTProtocolVersion.MQTTv5,
                             reconnect_on_failure=False)
        client.tls_set_context(context or fleet.device_context(device_id))
        if will is not None:
            client.will_set(will[0], will[1], qos=1)
        client.on_publish = lambda c, u, mid, reason, props: self.acks.__setitem__(mid, int(reason.value))
        client.on_subscribe = lambda c, u, mid, reasons, props: self.suback.extend(int(r.value) for r in reasons)
        self.connected = False
        client.on_connect = lambda c, u, f, reason, p: setattr(self, "connected", not reason.is_failure)
        client.on_disconnect = lambda *a: setattr(self, "connected", False)
        client.connect("127.0.0.1", gw.port, keepalive=30)
        client.loop_start()
        self.client = client
        wait_until(lambda: self.connected, 10, what=f"{device_id} connected")

    def publish(self, topic: str, payload: Any) -> int:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.client.publish(topic, body, qos=1).mid

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """The link lost without a DISCONNECT (the will is published)."""
        drop_link(self.client)


def start(gateway_factory: Any, broker: Mosquitto, extra: str, **overrides: Any) -> GatewayProcess:
    gw = gateway_factory(broker, overrides=overrides)
    with open(gw.config_path, "a", encoding="utf-8") as f:
        f.write(extra)
    gw.start()
    gw.wait_for_event("uplink.connected")
    return gw


def test_routed_transformed_filtered_and_poison_messages(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                                         sink_factory: Any, tmp_path: Path) -> None:
    registry = tmp_path / "registry.db"
    with Registry.open(registry) as reg:
        reg.register("dev-03", tenant="acme", metadata={"site": "plant-7"})
    sink = sink_factory(mosquitto, topic="#")
    admin = free_port()
    gw = start(gateway_factory, mosquitto, '[tenants]\nsource = "registry"\n' + PIPELINE,
               registry={"path": str(registry)}, admin={"port": admin})
    device = Device(fleet, gw, "dev-03")
    try:
        good = device.publish("devices/dev-03/telemetry", {"t": 212, "h": 40})
        filtered = device.publish("devices/dev-03/telemetry", {"t": 50, "h": -1})
        poison = device.publish("devices/dev-03/telemetry", b"{not json")
        invalid = device.publish("devices/dev-03/telemetry", {"t": 1})  # the filter's field is missing: poison
        after = device.publish("devices/dev-03/telemetry", {"t": 32, "h": 10})
        plain = device.publish("devices/dev-03/status", b"online")  # unmatched: default mapping, tenant prefix
        wait_until(lambda: all(m in device.acks for m in (good, filtered, poison, invalid, after, plain)), 10,
                   what="every PUBACK")
        assert {device.acks[m] for m in (good, filtered, poison, invalid, after, plain)} == {0}
        messages = sink.wait_for(lambda m: len(m) >= 3, 10)
    finally:
        device.close()
    by_topic = {m.topic: m for m in messages}
    assert set(by_topic) == {"cloud/acme/telemetry/dev-03", "cloud/acme/dev-03/status"}, by_topic.keys()
    telemetry = [msgpack.unpackb(m.payload) for m in messages if m.topic == "cloud/acme/telemetry/dev-03"]
    assert telemetry == [{"temp_c": pytest.approx(100.0), "humidity": 40, "site": "plant-7", "tenant": "acme"},
                         {"temp_c": pytest.approx(0.0), "humidity": 10, "site": "plant-7", "tenant": "acme"}]
    assert by_topic["cloud/acme/dev-03/status"].payload == b"online"
    assert int(by_topic["cloud/acme/telemetry/dev-03"].user_properties["edgegw-record-id"]) > 0
    m = metrics(admin)
    assert sample(m, "edgegw_pipeline_route_messages_total", route="telemetry") == 5
    assert sample(m, "edgegw_pipeline_dropped_messages_total", route="telemetry") == 1
    assert sample(m, "edgegw_pipeline_quarantined_messages_total") == 2

    # Both poison messages are in the quarantine table, with the reason, while the gateway runs.
    listed = json.loads(edgegw("quarantine", "list", "--config", str(gw.config_path), "--json", check=True).stdout)
    reasons = sorted(r["reason"] for r in listed["records"])
    assert listed["total"] == 2
    assert reasons[0].startswith("pipeline: decode json") and "filter: field 'humidity' is missing" in reasons[1]
    first = listed["records"][0]["id"]
    shown = json.loads(edgegw("quarantine", "show", "--config", str(gw.config_path), "--json", str(first),
                              check=True).stdout)
    assert shown[0]["device_id"] == "dev-03" and shown[0]["topic"] == "devices/dev-03/telemetry"
    assert shown[0]["properties"]["tn"] == "acme"
    assert edgegw("quarantine", "show", "--config", str(gw.config_path), "999").returncode == 2
    # Replayed by the running gateway through the same chain: both fail again and stay (exit 1).
    live = edgegw("quarantine", "replay", "--config", str(gw.config_path), "--all", "--json")
    assert live.returncode == 1, live.stderr
    assert sorted(f["id"] for f in json.loads(live.stdout)["failed"]) == sorted(r["id"] for r in listed["records"])
    assert edgegw("quarantine", "replay", "--config", str(gw.config_path), "1").returncode == 1  # upstream refusals:
    assert gw.terminate() == 0  # only with the gateway stopped

    # Fix the chain (no filter on a missing field), replay offline: the one that still is not JSON stays.
    config = gw.config_path.read_text()
    gw.config_path.write_text(config.replace('{op = "filter", expr = "humidity >= 0"},', "")
                              .replace('required = ["temp_c", "humidity"]', 'required = ["temp_c"]'))
    replay = edgegw("quarantine", "replay", "--config", str(gw.config_path), "--all", "--json")
    assert replay.returncode == 1, replay.stderr  # one failed again
    result = json.loads(replay.stdout)
    assert len(result["replayed"]) == 1 and result["replayed"][0]["records"] == 1
    assert len(result["failed"]) == 1 and "decode json" in result["failed"][0]["error"]
    gw.start()
    messages = sink.wait_for(lambda m: len(m) >= 4, 15)
    assert messages[-1].topic == "cloud/acme/telemetry/dev-03"
    assert msgpack.unpackb(messages[-1].payload) == {"temp_c": pytest.approx((1 - 32) * 5 / 9), "site": "plant-7",
                                                     "tenant": "acme"}
    # While it runs, the outbox's own table is left alone.
    assert edgegw("quarantine", "purge", "--config", str(gw.config_path), "--all").returncode == 1
    [left] = json.loads(edgegw("quarantine", "list", "--config", str(gw.config_path), "--json",
                               check=True).stdout)["records"]
    assert left["id"] < 0 and "decode json" in left["reason"]
    # Reload a route that takes the payload as it is, and let the running gateway replay the last one.
    gw.config_path.write_text(gw.config_path.read_text().replace(
        'decode = "json"\nencode = "msgpack"\ntransforms = ["telemetry"]\n', ""))
    assert edgegw("reload", "--config", str(gw.config_path)).returncode == 0
    live = edgegw("quarantine", "replay", "--config", str(gw.config_path), str(left["id"]), "--json")
    assert live.returncode == 0, live.stderr + live.stdout
    assert json.loads(live.stdout)["replayed"] == [{"id": left["id"], "records": 1}]
    messages = sink.wait_for(lambda m: len(m) >= 5, 15)
    assert (messages[-1].topic, messages[-1].payload) == ("cloud/acme/telemetry/dev-03", b"{not json")
    assert json.loads(edgegw("quarantine", "list", "--config", str(gw.config_path), "--json",
                             check=True).stdout)["total"] == 0
    unknown = edgegw("quarantine", "purge", "--config", str(gw.config_path), "-5")
    assert unknown.returncode == 2 and "no quarantined record with id -5" in unknown.stderr


def test_tenants_stay_in_their_own_space(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                         sink_factory: Any, tmp_path: Path) -> None:
    registry = tmp_path / "registry.db"
    with Registry.open(registry) as reg:
        reg.register("dev-04", tenant="acme")
        reg.register("dev-05", tenant="globex")
    sink = sink_factory(mosquitto, topic="#")
    gw = start(gateway_factory, mosquitto, """
[tenants]
source = "registry"
prefixes = { globex = "gx/edge" }

[routing]
unmatched = "drop"

[[routes]]
name = "tenant-space"
match = "tenants/{tenant}/devices/{device_id}/#"
topic = "{prefix}/{device_id}/{rest}"

[[routes]]
name = "own"
match = "devices/{device_id}/#"
topic = "{prefix}/{device_id}/{rest}"
""", registry={"path": str(registry)},
               acl={"publish": ["devices/{device_id}/#", "tenants/+/devices/{device_id}/#"],
                    "subscribe": ["devices/{device_id}/#", "tenants/+/devices/{device_id}/#"]})
    acme, globex = Device(fleet, gw, "dev-04"), Device(fleet, gw, "dev-05")
    try:
        mids = [acme.publish("devices/dev-04/t", b"a1"),
                acme.publish("tenants/acme/devices/dev-04/t", b"a2"),
                acme.publish("tenants/globex/devices/dev-04/t", b"a-into-globex"),  # dropped: not its tenant
                globex.publish("devices/dev-05/t", b"g1")]
        wait_until(lambda: all(m in acme.acks or m in globex.acks for m in mids), 10, what="PUBACKs")
        stray = acme.publish("devices/dev-05/t", b"a-as-dev-05")  # another device's space: refused (ACL)
        acme.client.subscribe("devices/dev-05/#", qos=1)
        wait_until(lambda: stray in acme.acks and acme.suback, 10, what="refusals")
        assert acme.acks[stray] == 0x87 and acme.suback == [0x87]
        messages = sink.wait_for(lambda m: len(m) >= 3, 10)
    finally:
        acme.close()
        globex.close()
    got = sorted((m.topic, m.payload) for m in messages)
    assert got == [("cloud/acme/dev-04/t", b"a1"), ("cloud/acme/dev-04/t", b"a2"), ("gx/edge/dev-05/t", b"g1")]
    assert not any(b"a-" in m.payload for m in sink.snapshot())


def test_a_device_without_a_tenant_cannot_publish_into_a_tenants_space(fleet: Fleet, mosquitto: Mosquitto,
                                                                       gateway_factory: Any, sink_factory: Any,
                                                                       tmp_path: Path) -> None:
    """Tenant "dev-07" holds device dev-04; dev-07 itself has no tenant (and no tenants.default). Its publish on
    devices/dev-07/dev-04/t once went up as cloud/dev-07/dev-04/t: tenant dev-07's device dev-04. It now goes
    under the reserved level no tenant can have (docs/POLICY.md "Tenants"), by a route or unmatched alike."""
    registry = tmp_path / "registry.db"
    with Registry.open(registry) as reg:
        reg.register("dev-04", tenant="dev-07")
        reg.register("dev-07")
    sink = sink_factory(mosquitto, topic="#")
    gw = start(gateway_factory, mosquitto, """
[tenants]
source = "registry"

[[routes]]
name = "own"
match = "devices/{device_id}/routed/#"
topic = "{prefix}/{device_id}/{rest}"
""", registry={"path": str(registry)})
    tenanted, untenanted = Device(fleet, gw, "dev-04"), Device(fleet, gw, "dev-07")
    try:
        mids = [tenanted.publish("devices/dev-04/t", b"real"),
                untenanted.publish("devices/dev-07/dev-04/t", b"spoof-unmatched"),
                untenanted.publish("devices/dev-07/routed/dev-04/t", b"spoof-routed")]
        wait_until(lambda: mids[0] in tenanted.acks and all(m in untenanted.acks for m in mids[1:]), 10,
                   what="PUBACKs")
        messages = sink.wait_for(lambda m: len(m) >= 3, 10)
    finally:
        tenanted.close()
        untenanted.close()
    got = sorted((m.topic, m.payload) for m in messages)
    assert got == [("cloud/_untenanted/dev-07/dev-04/t", b"spoof-routed"),
                   ("cloud/_untenanted/dev-07/dev-04/t", b"spoof-unmatched"),
                   ("cloud/dev-07/dev-04/t", b"real")]


def test_a_will_goes_up_under_its_devices_tenant_never_in_another_tenants_space(
        fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any, sink_factory: Any, tmp_path: Path) -> None:
    """A will is a publish the device made in advance: with tenants on it goes through the pipeline like one.
    Stored as sent, dev-07's (no tenant) will on devices/dev-07/dev-04/t went up as cloud/dev-07/dev-04/t, where
    tenant dev-07's device dev-04 publishes (as in the test above); now under the reserved _untenanted level. And
    dev-04's own will goes up under its tenant's prefix, as its publishes do."""
    registry = tmp_path / "registry.db"
    with Registry.open(registry) as reg:
        reg.register("dev-04", tenant="dev-07")
        reg.register("dev-07")
    sink = sink_factory(mosquitto, topic="#")
    gw = start(gateway_factory, mosquitto, '[tenants]\nsource = "registry"\n', registry={"path": str(registry)})
    spoofer = Device(fleet, gw, "dev-07", will=("devices/dev-07/dev-04/t", b"spoof-will"))
    owner = Device(fleet, gw, "dev-04", will=("devices/dev-04/status", b"dev-04-offline"))
    spoofer.drop()
    owner.drop()
    messages = sink.wait_for(lambda m: len(m) >= 2, 15)
    got = sorted((m.topic, m.payload) for m in messages)
    assert got == [("cloud/_untenanted/dev-07/dev-04/t", b"spoof-will"), ("cloud/dev-07/dev-04/status", b"dev-04-offline")]
    assert gw.wait_for_event("mqtt.will_published")


def test_a_will_gets_the_tenant_of_the_certificate_the_device_connected_with(
        fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any, sink_factory: Any, tmp_path: Path) -> None:
    """From a certificate attribute the tenant is known only while the connection is up: it is noted at CONNECT,
    so the will, published after the connection is gone, still goes up under that tenant; also after a reload
    (SIGHUP) in between, which builds a new pipeline with a new tenant resolver."""
    sink = sink_factory(mosquitto, topic="#")
    gw = start(gateway_factory, mosquitto, '[tenants]\nsource = "cert-o"\n')
    device = Device(fleet, gw, "dev-08", will=("devices/dev-08/status", b"gone"),
                    context=_device_cert_with_org(fleet, tmp_path, "dev-08", "initech"))
    with open(gw.config_path, "a", encoding="utf-8") as f:  # a changed pipeline: rebuilt, not kept
        f.write('\n[[routes]]\nname = "other"\nmatch = "devices/{device_id}/other/#"\n'
                'topic = "{prefix}/{device_id}/{rest}"\n')
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    assert gw.wait_for_event("config.reloaded", trigger="SIGHUP")["routes"] == 1
    device.drop()
    messages = sink.wait_for(lambda m: len(m) >= 1, 15)
    assert [(m.topic, m.payload) for m in messages] == [("cloud/initech/dev-08/status", b"gone")]


def _device_cert_with_org(fleet: Fleet, folder: Path, device_id: str, org: str) -> ssl.SSLContext:
    """A device certificate with an Organization, signed by the fleet CA (edgegw pki has no O option)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(fleet.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((fleet.folder / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                                     x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    crt, pem = folder / f"{device_id}.crt", folder / f"{device_id}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(fleet.ca))
    ctx.load_cert_chain(str(crt), str(pem))
    return ctx


def test_tenant_from_the_certificate_organization(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                                  sink_factory: Any, tmp_path: Path) -> None:
    sink = sink_factory(mosquitto, topic="#")
    gw = start(gateway_factory, mosquitto, '[tenants]\nsource = "cert-o"\ndefault = "nobody"\n')
    clients = []
    for device_id, ctx in (("dev-07", _device_cert_with_org(fleet, tmp_path, "dev-07", "initech")),
                           ("dev-08", fleet.device_context("dev-08"))):  # no O: the default tenant
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=MQTTProtocolVersion.MQTTv5)
        client.tls_set_context(ctx)
        client.connect("127.0.0.1", gw.port, keepalive=30)
        client.loop_start()
        clients.append(client)
        client.publish(f"devices/{device_id}/hello", device_id.encode(), qos=1).wait_for_publish(10)  # PUBACK
    try:
        messages = sink.wait_for(lambda m: len(m) >= 2, 10)
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
    assert sorted((m.topic, m.payload) for m in messages) == [("cloud/initech/dev-07/hello", b"dev-07"),
                                                              ("cloud/nobody/dev-08/hello", b"dev-08")]


def test_routed_records_keep_their_trace_spans(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                               sink_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With [tracing] on, a routed + transformed record still gets its edgegw.ingress span (ends at its commit)."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    import threading

    from test_otel import TP, _Receiver, _spans

    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    sink = sink_factory(mosquitto, topic="#")
    gw = start(gateway_factory, mosquitto, PIPELINE, tracing={
        "exporter": "otlp-http", "endpoint": f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"})
    device = Device(fleet, gw, "dev-09")
    try:
        device.publish("devices/dev-09/telemetry", {"t": 50, "h": 1, "traceparent": TP})
        messages = sink.wait_for(lambda m: len(m) >= 1, 10)
        assert messages[0].topic == "cloud/telemetry/dev-09" and messages[0].user_properties["traceparent"] == TP
        wait_until(lambda: "edgegw.ingress" in {s.name for _, s in _spans(receiver.bodies)
                                                if s.trace_id == bytes.fromhex(TP[3:35])}, 15, what="ingress span")
        # The span names the topic the record is published to, not its stored U+0000 form (edgegw/ops/otel.py).
        ingress = next(s for _, s in _spans(receiver.bodies) if s.name == "edgegw.ingress")
        attributes = {a.key: a.value.string_value for a in ingress.attributes}
        assert attributes["messaging.destination.name"] == "cloud/telemetry/dev-09"
    finally:
        device.close()
        receiver.shutdown()
        receiver.server_close()


def test_a_quarantine_replay_running_at_stop_is_cancelled_and_awaited(fleet: Fleet, mosquitto: Mosquitto,
                                                                      gateway_factory: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGUSR1 replay is a task outside the TaskGroup: the stop must end it before the quarantine file and the
    outbox it uses are closed, never leave it pending. The gateway runs in this process (a real Gateway, real
    outbox and mosquitto); the replay itself is held at its first step so that it is surely running at stop."""
    import asyncio

    from edgegw import daemon
    from edgegw.config import load_config

    gw = gateway_factory(mosquitto)
    config = load_config(gw.config_path)
    started = asyncio.Event()
    seen: list[asyncio.Task[Any]] = []

    async def held_replay(gateway: Any, folder: Path) -> None:
        seen.append(asyncio.current_task())  # type: ignore[arg-type]
        started.set()
        await asyncio.sleep(3600)  # a replay waiting on a commit that will not come before the stop

    monkeypatch.setattr(daemon, "replay_live", held_replay)

    async def main() -> None:
        stop = asyncio.Event()
        ready = asyncio.Event()
        gateway = daemon.Gateway(config)
        run = asyncio.create_task(gateway.run(stop, on_ready=lambda _g: ready.set()))
        await asyncio.wait_for(ready.wait(), 20)
        gateway.replay()
        await asyncio.wait_for(started.wait(), 5)
        stop.set()
        await asyncio.wait_for(run, 30)
        assert seen and seen[0].done() and seen[0].cancelled()  # ended by the stop, not left pending
        gateway.replay()  # a SIGUSR1 after the stop starts nothing
        assert len(seen) == 1

    import gc
    try:
        asyncio.run(main())
    finally:
        gc.unfreeze()  # the gateway froze what its start built (daemon.py): give it back to this test process
