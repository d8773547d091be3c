"""Provisioning end to end with real peers (issue #7): `edgegw pki batch` bundles used AS THEY ARE (mqtt.sh with
mosquitto_pub, coap.sh and coap-dtls.sh with coap-client-openssl) against `edgegw run` with [coap] on; a fleet issued
by an intermediate CA whose CRL is checked at every handshake on MQTT, coaps+tcp and DTLS and closes live sessions
when reloaded; CA and server certificate rotation without a restart; renewing a bundle; the expiry metrics and
`pki status`; --json and exit codes of every `pki` / `devices` command.

coap-client-openssl exits 0 even when the handshake fails: every CoAP check reads its output (a 2.01 prints nothing,
a refusal prints "4.03 ...") or looks where the message must arrive (upstream, the gateway's log).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CertPair,
    Fleet,
    GatewayProcess,
    LabPKI,
    Mosquitto,
    free_port,
    wait_until,
)
from cryptography import x509
from ops_peers import metrics, sample
from test_coap_tcp import coap
from test_revocation import PahoDevice, openssl_verify

CLIENT = shutil.which("coap-client-openssl")
pytestmark = pytest.mark.skipif(CLIENT is None or shutil.which("mosquitto_pub") is None,
                                reason="needs coap-client-openssl (libcoap3-bin) and mosquitto_pub")
DAY = 86400.0


def edgegw(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, (args, proc.returncode, proc.stderr)
    return proc


def intermediate_pki(d: Path, *devices: str) -> Path:
    edgegw("pki", "init", str(d), "--intermediate")
    edgegw("pki", "issue", str(d), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1")
    if devices:
        edgegw("pki", "issue", str(d), "device", *devices)
    edgegw("pki", "crl", str(d))
    return d


def coap_gateway(folder: Path, d: Path, pki: LabPKI, broker: Mosquitto, *, mqtt_port: int | None = None,
                 **extra: dict[str, Any]) -> GatewayProcess:
    """`edgegw run` on the fleet ``d``: tls.ca = the bundle (ca-chain.pem), CRL, registry, coaps+tcp and DTLS."""
    sections: dict[str, dict[str, Any]] = {
        "tls": {"ca": str(d / "ca-chain.pem"), "crl": str(d / "crl.pem"), "reload_interval": 0.2},
        "registry": {"path": str(d / "registry.db")},
        "coap": {"enabled": True, "bind": "127.0.0.1", "port": free_port(), "dtls": True, "dtls_port": free_port()},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    gw = GatewayProcess(folder, Fleet(d), pki, broker, port=mqtt_port, overrides=sections)
    gw.coap_port, gw.dtls_port = sections["coap"]["port"], sections["coap"]["dtls_port"]  # type: ignore[attr-defined]
    return gw.start()


def run_script(path: Path) -> str:
    proc = subprocess.run(["sh", str(path)], check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_bundle_scripts_work_as_they_are_over_mqtt_coaps_tcp_and_dtls(
        tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto, sink_factory: Any) -> None:
    d = intermediate_pki(tmp_path / "pki")
    ports = {"mqtt": free_port(), "coap": free_port(), "dtls": free_port()}
    csv = tmp_path / "fleet.csv"
    csv.write_text("id,group,tenant\nby-mqtt,a,acme\nby-coap,a,acme\nby-dtls,b,acme\n")
    # --host localhost: the name in the gateway's certificate, as an operator would give it.
    edgegw("pki", "batch", str(d), str(csv), "--out", str(tmp_path / "bundles"), "--host", "localhost",
           "--mqtt-port", str(ports["mqtt"]), "--coap-port", str(ports["coap"]),
           "--coap-dtls-port", str(ports["dtls"]))
    for key_type in ("rsa", "ed25519"):  # on request; EC P-256 above
        (tmp_path / f"{key_type}.csv").write_text(f"id\nkey-{key_type}\n")
        edgegw("pki", "batch", str(d), str(tmp_path / f"{key_type}.csv"), "--out", str(tmp_path / "bundles"),
               "--host", "localhost", "--key-type", key_type, "--mqtt-port", str(ports["mqtt"]), "--coap-port",
               str(ports["coap"]), "--coap-dtls-port", str(ports["dtls"]))
    # A device that made its own key with openssl: its CSR signed by `pki sign-csr` (the key never left it).
    csr_key, csr = tmp_path / "own.key", tmp_path / "own.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(csr_key), "-subj", "/CN=by-csr", "-out", str(csr)],
                   check=True, capture_output=True, timeout=30)
    edgegw("pki", "sign-csr", str(d), str(csr), "--out", str(tmp_path / "own.crt"), "--id", "by-csr")
    bundles = tmp_path / "bundles"
    settings = json.loads((bundles / "by-dtls" / "settings.json").read_text())
    assert (settings["coap_port"], settings["coap_dtls_port"], settings["coap_path"]) == (
        ports["coap"], ports["dtls"], "/ps/telemetry")
    sink = sink_factory(mosquitto, topic="cloud/#")
    gw = GatewayProcess(tmp_path / "gw", Fleet(d), pki, mosquitto, port=ports["mqtt"], overrides={
        "tls": {"ca": str(d / "ca-chain.pem"), "crl": str(d / "crl.pem")},
        "registry": {"path": str(d / "registry.db")},
        "coap": {"enabled": True, "bind": "127.0.0.1", "port": ports["coap"], "dtls": True,
                 "dtls_port": ports["dtls"]}}).start()
    try:
        run_script(bundles / "by-mqtt" / "mqtt.sh")
        # A 2.01 prints nothing; a failed handshake prints "cannot send CoAP pdu", a refusal "4.03 ...".
        assert run_script(bundles / "by-coap" / "coap.sh").strip() == ""
        assert run_script(bundles / "by-dtls" / "coap-dtls.sh").strip() == ""
        for device_id in ("key-rsa", "key-ed25519"):  # all three scripts of each
            run_script(bundles / device_id / "mqtt.sh")
            assert run_script(bundles / device_id / "coap.sh").strip() == ""
            assert run_script(bundles / device_id / "coap-dtls.sh").strip() == ""
        own = CertPair(tmp_path / "own.crt", csr_key)
        for url in (f"coaps+tcp://localhost:{ports['coap']}", f"coaps://localhost:{ports['dtls']}"):
            assert coap(own, d / "root-ca.crt", "post", f"{url}/ps/telemetry", '{"hello":1}', "json").strip() == ""
        expected = {f"cloud/{i}/telemetry": n for i, n in (("by-mqtt", 1), ("by-coap", 1), ("by-dtls", 1),
                                                            ("key-rsa", 3), ("key-ed25519", 3), ("by-csr", 2))}

        def counts(ms: list[Any]) -> dict[str, int]:
            return {t: sum(1 for m in ms if m.topic == t) for t in {m.topic for m in ms}}

        # (at least: the uplink is at-least-once, a duplicate upstream is allowed)
        messages = sink.wait_for(lambda ms: all(counts(ms).get(t, 0) >= n for t, n in expected.items()), 15)
        # Exactly where the bundle says: devices/<id>/telemetry, nothing nested under it.
        assert set(counts(messages)) == set(expected) and {m.payload for m in messages} == {b'{"hello":1}'}
        assert [e["device_id"] for e in gw.events("dtls.session_established")] == ["by-dtls", "key-rsa",
                                                                                   "key-ed25519", "by-csr"]
        assert gw.terminate() == 0
    finally:
        gw.kill()


def test_intermediate_fleet_crl_is_checked_at_every_handshake_and_closes_live_sessions(
        tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto) -> None:
    """root -> fleet intermediate -> devices: the CRL that counts is the intermediate's (`pki revoke` signs it with
    ca.key); the gateway checks it in the TLS/DTLS handshake itself, not only through the registry."""
    d = intermediate_pki(tmp_path / "pki", "keep-1", "rev-1")
    gw = coap_gateway(tmp_path / "gw", d, pki, mosquitto)
    tcp = f"coaps+tcp://127.0.0.1:{gw.coap_port}"  # type: ignore[attr-defined]
    udp = f"coaps://127.0.0.1:{gw.dtls_port}"  # type: ignore[attr-defined]
    fleet, root = Fleet(d), d / "root-ca.crt"
    observers: list[subprocess.Popen[str]] = []
    devices: list[PahoDevice] = []
    try:
        # Live sessions of the device about to be revoked, on all three transports, and one of a device that stays.
        keep = PahoDevice(d, "keep-1", gw.port, anchor=root).connect()
        victim = PahoDevice(d, "rev-1", gw.port, anchor=root).connect()
        devices += [keep, victim]
        assert keep.accepted and victim.accepted, gw.log()[-2000:]
        pair = fleet.device("rev-1")
        for base in (tcp, udp):
            observers.append(subprocess.Popen(
                [str(CLIENT), "-B", "30", "-s", "30", "-m", "get", "-C", str(root), "-c", str(pair.cert), "-j",
                 str(pair.key), f"{base}/ps/cmd/%23"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        wait_until(lambda: len([e for e in gw.events("coap.observe_started") if e["device_id"] == "rev-1"]) >= 2,
                   15, what="rev-1 observing over coaps+tcp and DTLS")

        revoked = json.loads(edgegw("pki", "revoke", str(d), "rev-1", "--reason", "keyCompromise", "--json").stdout)
        crl = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
        inter = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
        assert crl.issuer == inter.subject and crl.is_signature_valid(inter.public_key())  # type: ignore[arg-type]
        assert [format(r.serial_number, "X") for r in crl] == revoked["revoked_serials"]

        # The reload closes every live session of rev-1 and nothing else.
        assert victim.disconnected.wait(10), gw.log()[-3000:]
        assert victim.disconnect_reason.value == 0x87
        gw.wait_for_event("tls.session_closed", device_id="rev-1", listener="coap")
        gw.wait_for_event("dtls.session_closed", device_id="rev-1")
        assert keep.accepted
        # `pki revoke` writes the registry and the CRL one after the other: a reload may have seen the first only
        # (it closed the sessions all the same), and the handshakes below need the one that loaded the CRL.
        gw.wait_for_event("tls.reloaded", revoked_serials=len(revoked["revoked_serials"]))

        # New handshakes of rev-1 are refused by the CRL in the handshake: no CONNACK at all (a registry refusal
        # would be CONNACK 0x87 after it), no CoAP answer (a registry refusal is a 4.03), and for DTLS the verify
        # error of OpenSSL's CRL check (the registry's refusal reads "device is revoked in the registry").
        again = PahoDevice(d, "rev-1", gw.port, anchor=root).connect()
        devices.append(again)
        assert not again.accepted and again.connack is None
        out = coap(pair, root, "post", f"{tcp}/ps/t", '{"revoked":1}', "json", wait=3)
        assert "2.0" not in out and "4.03" not in out, out
        out = coap(pair, root, "post", f"{udp}/ps/t", '{"revoked":1}', "json", wait=3)
        assert "2.0" not in out and "4.03" not in out, out
        # MQTT's line has no listener field, the coaps+tcp one says listener="coap".
        wait_until(lambda: {e.get("listener", "mqtt") for e in gw.events("tls.handshake_failed")
                            if "revoked" in e["reason"]} == {"mqtt", "coap"}, 10,
                   what="revoked handshakes on MQTT and coaps+tcp")
        wait_until(lambda: any(e["reason"] == "certificate revoked (CRL)" for e in gw.events("dtls.handshake_failed")),
                   10, what="DTLS handshake refused by the CRL")

        # The device that stays still works on every transport, and openssl agrees on both.
        for base in (tcp, udp):
            assert coap(fleet.device("keep-1"), root, "post", f"{base}/ps/t", "{}", "json").strip() == ""
        assert openssl_verify(d, d / "devices" / "keep-1.crt", root).returncode == 0
        refused = openssl_verify(d, d / "devices" / "rev-1.crt", root)
        assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
        assert gw.terminate() == 0
    finally:
        for proc in observers:
            proc.kill()
            proc.communicate(timeout=10)
        for device in devices:
            device.close()
        gw.kill()


def test_expiry_metrics_follow_the_registry_and_the_crl(tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d))
    edgegw("pki", "issue", str(d), "server", "gateway", "--san", "127.0.0.1", "--days", "40")
    edgegw("pki", "issue", str(d), "device", "long-1", "--days", "300")
    edgegw("pki", "issue", str(d), "device", "soon-1", "--days", "20")
    edgegw("pki", "crl", str(d), "--days", "7")
    admin = free_port()
    gw = GatewayProcess(tmp_path / "gw", Fleet(d), pki, mosquitto, overrides={
        "tls": {"crl": str(d / "crl.pem"), "reload_interval": 0.2}, "registry": {"path": str(d / "registry.db")},
        "admin": {"port": admin}}).start()

    def days_left(name: str, **labels: str) -> float:
        return (sample(metrics(admin), name, **labels) - time.time()) / DAY

    try:
        assert 39 < days_left("edgegw_certificate_expiry_timestamp_seconds", certificate="server") <= 40
        assert 19 < days_left("edgegw_certificate_expiry_timestamp_seconds", certificate="soonest_device") <= 20
        assert 6 < days_left("edgegw_crl_next_update_timestamp_seconds") <= 7
        # A device issued while the gateway runs: the registry changes, the reload brings the new soonest expiry.
        edgegw("pki", "issue", str(d), "device", "sooner-1", "--days", "3")
        wait_until(lambda: days_left("edgegw_certificate_expiry_timestamp_seconds",
                                     certificate="soonest_device") <= 3, 10, what="soonest device expiry = 3 days")
        # Devices that are not active do not count (as in `pki status`), and a new CRL moves its gauge.
        edgegw("devices", "suspend", str(d), "sooner-1")
        edgegw("pki", "crl", str(d), "--days", "30")
        wait_until(lambda: 19 < days_left("edgegw_certificate_expiry_timestamp_seconds",
                                          certificate="soonest_device") <= 20, 10, what="back to 20 days")
        wait_until(lambda: 29 < days_left("edgegw_crl_next_update_timestamp_seconds") <= 30, 10, what="CRL 30 days")
    finally:
        gw.kill()


def test_every_pki_and_devices_command_has_json_and_exit_codes(tmp_path: Path) -> None:
    from edgegw.cli import main

    d, out = tmp_path / "pki", tmp_path / "out"
    out.mkdir()
    csv = tmp_path / "f.csv"
    csv.write_text("id,group\nb-1,g\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "c.key"), "-subj", "/CN=csr-1", "-out", str(tmp_path / "c.csr")],
                   check=True, capture_output=True, timeout=30)
    ok = [  # (argv, the JSON's type); every one exits 0
        (["pki", "init", str(d), "--intermediate"], dict),
        (["pki", "issue", str(d), "device", "dev-1", "dev-2"], list),
        (["pki", "issue", str(d), "server", "gw", "--san", "localhost"], dict),
        (["pki", "issue", str(d), "client", "up"], dict),
        (["pki", "batch", str(d), str(csv), "--out", str(out / "b"), "--host", "localhost"], list),
        (["pki", "sign-csr", str(d), str(tmp_path / "c.csr"), "--out", str(out / "c.crt")], dict),
        (["pki", "uplink-csr", str(d), "cloud"], dict),
        (["pki", "revoke", str(d), "dev-2"], dict),
        (["pki", "crl", str(d)], dict),
        (["pki", "status", str(d)], dict),
        (["pki", "status", str(d), "--within", "1"], dict),
        (["devices", "list", str(d)], list),
        (["devices", "show", str(d), "dev-1"], dict),
        (["devices", "suspend", str(d), "dev-1", "--reason", "r"], dict),
        (["devices", "resume", str(d), "dev-1"], dict),
    ]
    for argv, kind in ok:
        code, text = _run(main, [*argv, "--json"], tmp_path)
        assert code == 0, (argv, text)
        assert isinstance(json.loads(text), kind), (argv, text)

    failing = [  # (argv, exit code)
        (["pki", "init", str(d)], 2),                                   # never replaced without --force
        (["pki", "issue", str(tmp_path / "none"), "device", "x"], 2),   # no CA
        (["pki", "issue", str(d), "device", "bad/id"], 2),
        (["pki", "batch", str(d), str(csv), "--out", str(out / "b"), "--host", "localhost"], 2),  # exists
        (["pki", "sign-csr", str(d), str(csv), "--out", str(out / "x.crt")], 2),  # not a CSR
        (["pki", "uplink-csr", str(d), "cloud"], 2),                    # exists
        (["pki", "revoke", str(d), "nobody"], 2),
        (["pki", "crl", str(tmp_path / "none")], 2),
        (["pki", "status", str(tmp_path / "none")], 2),
        (["pki", "status", str(d), "--within", "400"], 1),              # something expires: for cron
        (["devices", "list", str(tmp_path / "none.db")], 2),
        (["devices", "show", str(d), "nobody"], 3),
        (["devices", "suspend", str(d), "nobody"], 3),
        (["devices", "resume", str(d), "dev-2"], 4),                    # revoked: a new certificate is needed
    ]
    for argv, expected in failing:
        code, text = _run(main, [*argv, "--json"], tmp_path)
        assert code == expected, (argv, code, text)
        if expected == 1:
            assert json.loads(text)["items"]
        else:
            assert text == "", (argv, text)  # errors go to stderr only: stdout stays parseable
    assert not (tmp_path / "none").exists()  # a failing status/crl creates nothing
    (tmp_path / "empty").mkdir()
    assert _run(main, ["pki", "status", str(tmp_path / "empty"), "--json"], tmp_path) == (2, "")
    assert list((tmp_path / "empty").iterdir()) == []  # not even an empty registry.db


def _run(main: Any, argv: list[str], tmp_path: Path) -> tuple[int, str]:
    """``main(argv)`` with stdout captured (the progress bar of `batch` goes to stderr)."""
    import contextlib
    import io

    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, buf.getvalue()


def test_status_lists_what_expires_soonest_first(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d), "--intermediate", "--days", "50", "--root-days", "100")
    from edgegw.pki import issue_device

    now = datetime.now(UTC)
    issue_device(d, "expired-1", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1))
    edgegw("pki", "issue", str(d), "device", "d-5", "--days", "5")
    edgegw("pki", "crl", str(d), "--days", "10")
    items = json.loads(edgegw("pki", "status", str(d), "--within", "60", "--json", code=1).stdout)["items"]
    assert [(i["kind"], i["name"]) for i in items] == [
        ("device", "expired-1"), ("device", "d-5"), ("crl", "next update"), ("ca", "CN=edgegw fleet CA")]
    assert items[0]["expired"] is True and items[1]["expired"] is False
    text = edgegw("pki", "status", str(d), "--within", "60", code=1).stdout
    assert "EXPIRED" in text.splitlines()[1]


def test_renewing_a_revoked_device_with_batch_force_keeps_its_registry_fields(tmp_path: Path) -> None:
    """The walk-through's renewal: revoke, then re-issue the bundle from a CSV holding only the id."""
    d = intermediate_pki(tmp_path / "pki")
    csv = tmp_path / "fleet.csv"
    csv.write_text('id,group,tenant,metadata\nr-1,line-2,acme,"{""site"": ""p1""}"\n')
    bundles = tmp_path / "bundles"
    edgegw("pki", "batch", str(d), str(csv), "--out", str(bundles), "--host", "localhost")
    old_chain = (bundles / "r-1" / "chain.pem").read_bytes()
    edgegw("pki", "revoke", str(d), "r-1", "--reason", "keyCompromise")
    refused = openssl_verify(d, bundles / "r-1" / "chain.pem", d / "root-ca.crt")
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    only_id = tmp_path / "renew.csv"
    only_id.write_text("id\nr-1\n")
    edgegw("pki", "batch", str(d), str(only_id), "--out", str(bundles), "--host", "localhost", code=2)  # exists
    edgegw("pki", "batch", str(d), str(only_id), "--out", str(bundles), "--host", "localhost", "--force")
    assert (bundles / "r-1" / "chain.pem").read_bytes() != old_chain
    assert openssl_verify(d, bundles / "r-1" / "chain.pem", d / "root-ca.crt").returncode == 0
    shown = json.loads(edgegw("devices", "show", str(d), "r-1", "--json").stdout)
    assert (shown["state"], shown["group"], shown["tenant"], shown["metadata"]) == ("active", "line-2", "acme",
                                                                                     {"site": "p1"})
    assert [c["revoked_at"] is None for c in shown["certificates"]] == [False, True]


def test_ca_and_server_certificate_rotation_keep_sessions_and_admit_the_new_fleet(
        tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto) -> None:
    """docs/PROVISIONING.md "Rotate the CA": tls.ca becomes old + new CA and tls.crl old + new CRL, without a
    restart; the old fleet's sessions stay, the new fleet connects (MQTT and coaps+tcp), its revocations count.
    Then the gateway's own certificate is renewed ("Rotate the gateway's certificate")."""
    old = intermediate_pki(tmp_path / "old", "old-1")
    new = tmp_path / "new"
    edgegw("pki", "init", str(new), "--intermediate")
    edgegw("pki", "issue", str(new), "device", "new-1", "new-2")
    edgegw("pki", "crl", str(new))
    cas, crls = tmp_path / "cas.pem", tmp_path / "crls.pem"
    cas.write_bytes((old / "ca-chain.pem").read_bytes())
    crls.write_bytes((old / "crl.pem").read_bytes())
    gw = coap_gateway(tmp_path / "gw", old, pki, mosquitto, tls={"ca": str(cas), "crl": str(crls)})
    tcp = f"coaps+tcp://127.0.0.1:{gw.coap_port}"  # type: ignore[attr-defined]
    anchor = old / "root-ca.crt"  # what the devices trust: the gateway's certificate is still the old fleet's
    devices: list[PahoDevice] = []
    try:
        first = PahoDevice(old, "old-1", gw.port, anchor=anchor).connect()
        devices.append(first)
        refused = PahoDevice(new, "new-1", gw.port, anchor=anchor).connect()
        devices.append(refused)
        assert first.accepted and not refused.accepted

        tmp = tmp_path / "next.pem"
        tmp.write_bytes((old / "crl.pem").read_bytes() + (new / "crl.pem").read_bytes())
        tmp.replace(crls)  # the CRLs first: a CA without its CRL would refuse all its devices (leaf CRL check)
        tmp.write_bytes((old / "ca-chain.pem").read_bytes() + (new / "ca-chain.pem").read_bytes())
        tmp.replace(cas)
        # Polled every 0.2 s: the two replaces may make one reload or two; wait for the effect.
        deadline = time.monotonic() + 10
        while True:
            joined = PahoDevice(new, "new-1", gw.port, anchor=anchor).connect()
            devices.append(joined)
            if joined.accepted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert joined.accepted, gw.log()[-3000:]
        new_pair = Fleet(new).device("new-2")
        assert coap(new_pair, anchor, "post", f"{tcp}/ps/t", "{}", "json").strip() == ""
        assert first.accepted  # the old fleet's session never dropped

        # The new fleet's CRL is the one that counts for its devices.
        edgegw("pki", "revoke", str(new), "new-2")
        tmp.write_bytes((old / "crl.pem").read_bytes() + (new / "crl.pem").read_bytes())
        tmp.replace(crls)
        wait_until(lambda: any(e["revoked_serials"] == 1 for e in gw.events("tls.reloaded")), 10,
                   what="the reload of the new CRL")
        out = coap(new_pair, anchor, "post", f"{tcp}/ps/t", '{"revoked":1}', "json", wait=3)
        assert "2.0" not in out and "4.03" not in out, out
        assert first.accepted and joined.accepted

        # The gateway's own certificate, renewed: new handshakes on MQTT and coaps+tcp get it, sessions stay.
        before = {served_serial(old, port) for port in (gw.port, gw.coap_port)}  # type: ignore[attr-defined]
        edgegw("pki", "issue", str(old), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1", "--force")
        renewed = x509.load_pem_x509_certificate((old / "server" / "gateway.crt").read_bytes()).serial_number
        wait_until(lambda: {served_serial(old, port) for port in (gw.port, gw.coap_port)} == {renewed}, 10,  # type: ignore[attr-defined]
                   what="the renewed server certificate on both listeners")
        assert len(before) == 1 and renewed not in before
        gw.wait_for_event("dtls.material_replaced")  # DTLS rebuilt its context from the same files
        assert first.accepted and joined.accepted
    finally:
        for device in devices:
            device.close()
        gw.kill()


def served_serial(d: Path, port: int) -> int:
    """The serial of the certificate the gateway presents on ``port`` (a TLS handshake as device old-1)."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(d / "root-ca.crt"))
    ctx.load_cert_chain(str(d / "devices" / "old-1.crt"), str(d / "devices" / "old-1.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
