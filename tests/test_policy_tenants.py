"""Tenants and tiers the same way over every ingress, and commands that never cross tenants (issue #6 items 1, 5, 7).

Real peers: `edgegw run` as a process, device certificates with O / OU made here and signed by the fleet CA,
coap-client-openssl over coaps+tcp and DTLS, paho MQTT 5 devices, mosquitto upstream with `mosquitto_pub` as the
cloud application. No timing assertions: waits are bounded, absences are checked after a later message arrived.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import CertPair, Fleet, LabPKI, Mosquitto, free_port, wait_until
from mqtt_peers import V5, PahoDevice
from test_coap_tcp import coap, start_gateway
from test_downlink import cloud_publish

from edgegw.policy.certattrs import attribute_oid, peercert_of, subject_value
from edgegw.registry.store import Registry

COAP_CLIENT = shutil.which("coap-client-openssl")
needs_coap = pytest.mark.skipif(None in (COAP_CLIENT, shutil.which("mosquitto_pub"), shutil.which("stdbuf")),
                                reason="needs coap-client-openssl (libcoap3-bin), mosquitto_pub and stdbuf")


def issue(fleet: Fleet, folder: Path, device_id: str, **subject: str) -> CertPair:
    """A device certificate with extra subject attributes (``O``, ``OU``, ``title``...), signed by the fleet CA
    (``edgegw pki`` issues CN-only subjects)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(fleet.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((fleet.folder / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    names = [x509.NameAttribute(x509.ObjectIdentifier(attribute_oid("test", f"cert:{k}") or ""), v)
             for k, v in subject.items()]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([*names, x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    pair = CertPair(folder / f"{device_id}.crt", folder / f"{device_id}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def context(fleet: Fleet, pair: CertPair) -> Any:
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(fleet.ca))
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


# --- the attribute names, without sockets ---------------------------------------------------------------------


def test_certificate_attributes_by_name_or_oid_read_alike_from_both_certificate_shapes() -> None:
    assert attribute_oid("k", "cert-ou") == attribute_oid("k", "cert:OU") == attribute_oid(
        "k", "cert:organizationalUnitName") == "2.5.4.11"
    assert attribute_oid("k", "cert:1.3.6.1.4.1.99999.7") == "1.3.6.1.4.1.99999.7"
    assert attribute_oid("k", "registry") is None
    from edgegw.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        attribute_oid("limits.group_source", "cert:nonsense")
    assert info.value.key == "limits.group_source"
    # getpeercert() (OpenSSL long names, dotted for unknown OIDs) and peercert_of (DTLS) name alike.
    cert = {"subject": ((("organizationName", "acme"),), (("organizationalUnitName", "gold"),),
                        (("1.3.6.1.4.1.99999.7", "tier-x"),), (("commonName", "d1"),))}
    assert subject_value(cert, "2.5.4.10") == "acme" and subject_value(cert, "2.5.4.11") == "gold"
    assert subject_value(cert, "1.3.6.1.4.1.99999.7") == "tier-x"
    assert subject_value({"subject": ((("OU", "a"),), (("OU", "b"),))}, "2.5.4.11") is None  # ambiguous: none
    assert peercert_of(object()) is None  # the lab listener: no certificate


@pytest.mark.parametrize(("raw", "key"), [
    ({"limits": {"group_source": "cert:nope"}}, "limits.group_source"),
    ({"limits": {"group_source": 3}}, "limits.group_source"),
    ({"tenants": {"source": "cert:nope"}}, "tenants.source"),
    ({"tenants": {"source": "certificate"}}, "tenants.source"),
])
def test_bad_certificate_sources_name_the_key(raw: dict[str, Any], key: str, tmp_path: Path) -> None:
    from test_pipeline import BASE

    from edgegw.config import config_from_mapping
    from edgegw.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**BASE, **raw}, base_dir=tmp_path)
    assert info.value.key == key, str(info.value)
    good = config_from_mapping({**BASE, "limits": {"group_source": "cert:title"},
                                "tenants": {"source": "cert:1.3.6.1.4.1.99999.7"}}, base_dir=tmp_path)
    assert good.limits.group_source == "cert:title" and good.pipeline.tenants.source == "cert:1.3.6.1.4.1.99999.7"


# --- tenant and tier from the certificate, over MQTT, coaps+tcp and DTLS ----------------------------------------


@needs_coap
def test_tenant_and_tier_come_from_the_certificate_over_mqtt_coap_tcp_and_dtls(
        fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any, sink_factory: Any, tmp_path: Path) -> None:
    """O is the tenant, OU the tier: a bronze device gets one message then 4.29 / 0x97, a gold one is not limited,
    and every record goes up under its certificate tenant's prefix — whatever the transport."""
    sink = sink_factory(mosquitto, topic="#")
    dtls_port = free_port()
    gw = start_gateway(gateway_factory, mosquitto, """
[tenants]
source = "cert-o"
default = "nobody"
prefixes = { umbrella = "customers/umbrella" }

[limits]
group_source = "cert-ou"

[[limits.rate]]
scope = "device"
group = "bronze"
messages_rate = 0.01
messages_burst = 1.0
action = "reject"
""", coap={"dtls": True, "dtls_port": dtls_port})
    certs = {d: issue(fleet, tmp_path, d, O=o, OU=ou) for d, o, ou in (
        ("dev-20", "initech", "bronze"), ("dev-21", "umbrella", "gold"), ("dev-22", "initech", "bronze"),
        ("dev-23", "umbrella", "gold"), ("dev-24", "initech", "bronze"))}
    tcp, dtls = f"coaps+tcp://127.0.0.1:{gw.coap_port}", f"coaps://127.0.0.1:{dtls_port}"
    for device_id, base in (("dev-20", tcp), ("dev-21", tcp), ("dev-22", dtls), ("dev-23", dtls)):
        first = coap(certs[device_id], fleet.ca, "post", f"{base}/ps/t", '{"n":1}', "json")
        second = coap(certs[device_id], fleet.ca, "post", f"{base}/ps/t", '{"n":2}', "json")
        assert first.strip() == "", (device_id, first)  # 2.01 after the commit: coap-client prints nothing
        if device_id in ("dev-20", "dev-22"):
            assert "4.29" in second, (device_id, second)  # bronze, from the OU: its bucket is empty
        else:
            assert second.strip() == "", (device_id, second)  # gold: no rule
    mqtt = PahoDevice(context(fleet, certs["dev-24"]), gw.port, "dev-24", protocol=V5).start()
    try:
        for n in (1, 2):  # the second is refused 0x97 (bronze, from the OU), so never stored
            mqtt.client.publish("devices/dev-24/t", f'{{"n":{n}}}'.encode(), qos=1).wait_for_publish(10)
        messages = sink.wait_for(lambda m: len(m) >= 7, 15)
        time.sleep(0.3)
        messages = sink.snapshot()
    finally:
        mqtt.close()
    got = sorted({m.topic for m in messages})
    assert got == ["cloud/initech/dev-20/t", "cloud/initech/dev-22/t", "cloud/initech/dev-24/t",
                   "customers/umbrella/dev-21/t", "customers/umbrella/dev-23/t"], got
    assert sorted(m.topic for m in messages).count("cloud/initech/dev-24/t") == 1  # the second: 0x97
    assert gw.terminate() == 0


# --- commands: from the tenant's own space, to the tenant's own devices ----------------------------------------


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto_pub (mosquitto-clients)")
@pytest.mark.parametrize("client", ["native", "paho"])  # both uplink clients subscribe to the tenants' filters
def test_commands_come_from_and_reach_only_their_own_tenant(fleet: Fleet, pki: LabPKI, mosquitto: Mosquitto,
                                                           gateway_factory: Any, sink_factory: Any,
                                                           tmp_path: Path, client: str) -> None:
    registry = tmp_path / "registry.db"
    with Registry.open(registry) as reg:
        reg.register("dev-30", tenant="acme")
        reg.register("dev-31", tenant="globex")
        reg.register("dev-32")  # no tenant: no commands while tenants are on
    sink = sink_factory(mosquitto, topic="#")
    gw = gateway_factory(mosquitto, overrides={
        "uplink": {"command_topic": "{prefix}/+/cmd/#", "client": client}, "registry": {"path": str(registry)},
        "acl": {"publish": ["devices/{device_id}/#"], "subscribe": ["devices/{device_id}/#"]}})
    with open(gw.config_path, "a", encoding="utf-8") as f:
        f.write('\n[tenants]\nsource = "registry"\nprefixes = { globex = "gx/edge" }\n')
    gw.start()
    subscribed = gw.wait_for_event("uplink.command_subscribed")
    assert set(subscribed["topic_filter"].split(",")) == {"gx/edge/+/cmd/#", "cloud/+/+/cmd/#"}, subscribed
    acme, globex, loner = (PahoDevice(context(fleet, issue(fleet, tmp_path, d)), gw.port, d, protocol=V5).start()
                           for d in ("dev-30", "dev-31", "dev-32"))
    try:
        for dev, device_id in ((acme, "dev-30"), (globex, "dev-31"), (loner, "dev-32")):
            dev.subscribe(f"devices/{device_id}/cmd/#", 1)
        # Downlink: each tenant's space reaches its own device ...
        cloud_publish(pki, mosquitto, "cloud/acme/dev-30/cmd/a", "acme-to-acme", "-V", "mqttv5",
                      "-D", "publish", "response-topic", "cloud/acme/dev-30/reply")
        cloud_publish(pki, mosquitto, "gx/edge/dev-31/cmd/g", "globex-to-globex")
        # ... and never another tenant's, nor a device without a tenant, nor through the old gateway-wide layout.
        cloud_publish(pki, mosquitto, "cloud/acme/dev-31/cmd/x", "acme-to-globex")
        cloud_publish(pki, mosquitto, "gx/edge/dev-30/cmd/x", "globex-to-acme")
        cloud_publish(pki, mosquitto, "cloud/globex/dev-31/cmd/x", "globex-default-layout")  # gx/edge is its own
        cloud_publish(pki, mosquitto, "cloud/acme/dev-32/cmd/x", "acme-to-loner")
        cloud_publish(pki, mosquitto, "cloud/dev-30/cmd/x", "untenanted-to-acme")
        cloud_publish(pki, mosquitto, "cloud/acme/dev-30/cmd/last", "acme-last")  # a marker: after the others
        got_acme = acme.wait_messages(2, timeout=10)
        got_globex = globex.wait_messages(1, timeout=10)
        wait_until(lambda: len(gw.events("uplink.command_refused")) >= 4, 10, what="the refusals")
        time.sleep(0.3)
        assert [(m.topic, m.payload) for m in acme.messages] == [("devices/dev-30/cmd/a", b"acme-to-acme"),
                                                                 ("devices/dev-30/cmd/last", b"acme-last")]
        assert [(m.topic, m.payload) for m in globex.messages] == [("devices/dev-31/cmd/g", b"globex-to-globex")]
        assert loner.messages == []
        assert acme.messages[0].properties.ResponseTopic == "devices/dev-30/reply"  # its own space: mapped back
        assert got_acme and got_globex
        # Uplink: each device's records go up under its own tenant's prefix only.
        acme.client.publish("devices/dev-30/up", b"a", qos=1).wait_for_publish(10)
        globex.client.publish("devices/dev-31/up", b"g", qos=1).wait_for_publish(10)
        ups = sink.wait_for(lambda m: sum(x.topic.endswith("/up") for x in m) >= 2, 10)
        assert sorted((m.topic, m.user_properties["edgegw-tenant"]) for m in ups if m.topic.endswith("/up")) == [
            ("cloud/acme/dev-30/up", "acme"), ("gx/edge/dev-31/up", "globex")]  # the record keeps its tenant
    finally:
        for dev in (acme, globex, loner):
            dev.close()
    assert gw.terminate() == 0


# --- hot reload keeps CoAP sessions -------------------------------------------------------------------------


@needs_coap
def test_a_reload_keeps_a_live_coap_observation_and_applies_the_new_acl(fleet: Fleet, pki: LabPKI,
                                                                        mosquitto: Mosquitto,
                                                                        gateway_factory: Any,
                                                                        tmp_path: Path) -> None:
    """A coaps+tcp observation (coap-client-openssl -s) open across SIGHUP still gets commands afterwards, on the
    same connection; the reloaded ACL applies to that device's next request."""
    gw = start_gateway(gateway_factory, mosquitto, uplink={"command_topic": "{prefix}/+/cmd/#"})
    gw.wait_for_event("uplink.command_subscribed")
    dev = issue(fleet, tmp_path, "dev-33")
    assert COAP_CLIENT is not None
    seen: list[str] = []
    # stdbuf: coap-client's stdout is a pipe here; unbuffered, each notification shows up as it arrives.
    observer = subprocess.Popen(["stdbuf", "-o0", COAP_CLIENT, "-B", "30", "-s", "30", "-m", "get", "-C", str(fleet.ca),
                                 "-c", str(dev.cert), "-j", str(dev.key),
                                 f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps/cmd/%23"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert observer.stdout is not None
    # Chunks, not lines: coap-client prints a notification's payload without a newline.
    reader = threading.Thread(target=lambda: seen.extend(c.decode(errors="replace") for c in iter(
        lambda: observer.stdout.read1(4096), b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        gw.wait_for_event("coap.observe_started", device_id="dev-33")
        connected = len(gw.events("coap.connected"))
        assert gw.proc is not None
        gw.config_path.write_text(gw.config_path.read_text() + '\n[acl]\npublish = ["devices/{device_id}/ok/#"]\n'
                                  'subscribe = ["devices/{device_id}/#"]\n')
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_event("config.reloaded")
        cloud_publish(pki, mosquitto, "cloud/dev-33/cmd/after-reload", "still-here")
        wait_until(lambda: "still-here" in "".join(seen), 10, what="the command, after the reload")
        assert len(gw.events("coap.connected")) == connected  # the same connection: no reconnect
        assert not gw.events("coap.observe_ended")  # the observation lived through the reload
        # The new ACL applies to the next request at once.
        assert "4.03" in coap(dev, fleet.ca, "post", f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps/t", "{}", "json")
        assert coap(dev, fleet.ca, "post", f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps/ok/t", "{}",
                    "json").strip() == ""
    finally:
        observer.terminate()
        observer.wait(timeout=10)
        reader.join(timeout=5)
    assert gw.terminate() == 0
