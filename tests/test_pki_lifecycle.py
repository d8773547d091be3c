"""PKI beyond one CA: root -> intermediate, key types, CSRs from `openssl req`, CSV batches into bundles that
mosquitto_pub uses as they are against the real gateway, the uplink CSR, and `pki status`."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import Fleet, GatewayProcess, LabPKI, Mosquitto


def edgegw(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def verify(d: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    anchor = d / "root-ca.crt" if (d / "root-ca.crt").exists() else d / "ca.crt"
    cmd = ["openssl", "verify", "-CAfile", str(anchor), *extra]
    if (d / "root-ca.crt").exists():
        cmd += ["-untrusted", str(d / "ca.crt")]
    return subprocess.run([*cmd, str(cert)], capture_output=True, text=True, timeout=10)


def test_root_and_intermediate(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d), "--intermediate", "--days", "100")
    root = x509.load_pem_x509_certificate((d / "root-ca.crt").read_bytes())
    inter = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert root.issuer == root.subject and inter.issuer == root.subject
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert oct((d / "root-ca.key").stat().st_mode & 0o777) == "0o600"
    assert [c.subject for c in x509.load_pem_x509_certificates((d / "ca-chain.pem").read_bytes())] == [
        inter.subject, root.subject]
    edgegw("pki", "issue", str(d), "device", "dev-1")
    chain = x509.load_pem_x509_certificates((d / "devices" / "dev-1.crt").read_bytes())
    assert [c.subject for c in chain][1] == inter.subject  # leaf + intermediate: what the device presents
    assert verify(d, d / "devices" / "dev-1.crt", "-purpose", "sslclient").returncode == 0
    # Against the bundle alone (no -untrusted) as well.
    result = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca-chain.pem"),
                             str(d / "devices" / "dev-1.crt")], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert edgegw("pki", "init", str(d), "--intermediate", check=False).returncode == 2  # never silently replaced


@pytest.mark.parametrize(("key_type", "cls"), [("ec", ec.EllipticCurvePublicKey), ("rsa", rsa.RSAPublicKey),
                                               ("ed25519", ed25519.Ed25519PublicKey)])
def test_key_types(tmp_path: Path, key_type: str, cls: type) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d), "--key-type", key_type)
    edgegw("pki", "issue", str(d), "device", "dev-1", "--key-type", key_type, "--days", "30",
           "--san", "dev-1.fleet.example")
    cert = x509.load_pem_x509_certificate((d / "devices" / "dev-1.crt").read_bytes())
    assert isinstance(cert.public_key(), cls)
    assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=30)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-1.fleet.example"]
    assert verify(d, d / "devices" / "dev-1.crt").returncode == 0


def openssl_csr(folder: Path, subject: str) -> Path:
    key, csr = folder / "dev.key", folder / "dev.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-subj", subject, "-addext", "basicConstraints=critical,CA:TRUE",
                    "-out", str(csr)], check=True, capture_output=True, timeout=30)
    return csr


def test_sign_csr_made_with_openssl(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d), "--intermediate")
    csr = openssl_csr(tmp_path, "/CN=sensor-77")
    out = json.loads(edgegw("pki", "sign-csr", str(d), str(csr), "--out", str(tmp_path / "dev.crt"), "--id",
                            "sensor-77", "--json").stdout)
    assert out == {"id": "sensor-77", "cert": str(tmp_path / "dev.crt")}
    assert verify(d, tmp_path / "dev.crt", "-purpose", "sslclient").returncode == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "dev.crt").read_bytes())
    csr_obj = x509.load_pem_x509_csr(csr.read_bytes())
    assert cert.public_key() == csr_obj.public_key()
    assert cert.subject.rfc4514_string() == "CN=sensor-77"
    # The CSR asked for CA:TRUE; it gets a leaf with clientAuth.
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    # The key pair matches: openssl agrees the key belongs to the certificate.
    mod = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "dev.crt"), "-noout", "-pubkey"],
                         capture_output=True, text=True, timeout=10).stdout
    pub = subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "dev.key"), "-pubout"],
                         capture_output=True, text=True, timeout=10).stdout
    assert mod == pub
    shown = json.loads(edgegw("devices", "show", str(d), "sensor-77", "--json").stdout)
    assert shown["state"] == "active" and len(shown["certificates"]) == 1

    wrong = edgegw("pki", "sign-csr", str(d), str(csr), "--out", str(tmp_path / "x.crt"), "--id", "other",
                   check=False)
    assert wrong.returncode == 2 and "not for 'other'" in wrong.stderr
    bad = openssl_csr(tmp_path, "/CN=bad name")
    out2 = edgegw("pki", "sign-csr", str(d), str(bad), "--out", str(tmp_path / "x.crt"), check=False)
    assert out2.returncode == 2 and "invalid device id" in out2.stderr
    two = openssl_csr(tmp_path, "/O=acme/CN=dev-9")
    out3 = edgegw("pki", "sign-csr", str(d), str(two), "--out", str(tmp_path / "x.crt"), check=False)
    assert out3.returncode == 2 and "single CN" in out3.stderr
    assert not (tmp_path / "x.crt").exists()


def test_uplink_csr(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d))
    edgegw("pki", "uplink-csr", str(d), "uplink", "--cn", "gw-17")
    result = subprocess.run(["openssl", "req", "-in", str(d / "clients" / "uplink.csr"), "-noout", "-verify",
                             "-subject"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0 and "CN = gw-17" in result.stdout, result.stderr
    assert oct((d / "clients" / "uplink.key").stat().st_mode & 0o777) == "0o600"
    assert edgegw("pki", "uplink-csr", str(d), "uplink", check=False).returncode == 2


def test_status_within(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d))
    edgegw("pki", "issue", str(d), "device", "long-1")
    edgegw("pki", "issue", str(d), "device", "short-1", "--days", "5")
    edgegw("pki", "issue", str(d), "server", "gw", "--san", "localhost", "--days", "20")
    edgegw("pki", "crl", str(d), "--days", "7")
    out = edgegw("pki", "status", str(d), "--within", "10", "--json", check=False)
    assert out.returncode == 1
    items = json.loads(out.stdout)["items"]
    assert [(i["kind"], i["name"]) for i in items] == [("device", "short-1"), ("crl", "next update")]
    assert edgegw("pki", "status", str(d), "--within", "1").returncode == 0
    everything = json.loads(edgegw("pki", "status", str(d), "--json").stdout)["items"]
    assert {(i["kind"], i["name"]) for i in everything} >= {("device", "long-1"), ("server", "gw"), ("ca", "CN=edgegw fleet CA")}
    text = edgegw("pki", "status", str(d), "--within", "10", check=False).stdout
    assert "short-1" in text and "long-1" not in text


def test_batch_from_csv_into_bundles_that_mosquitto_pub_uses(
        tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto, sink_factory: object) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d), "--intermediate")
    edgegw("pki", "issue", str(d), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1")
    csv = tmp_path / "fleet.csv"
    rows = ["id,group,tenant,metadata"] + [f'b-{i:03d},line-{i % 2},acme,"{{""slot"": {i}}}"' for i in range(20)]
    csv.write_text("\n".join(rows) + "\n")
    gw = GatewayProcess(tmp_path / "gw", Fleet(d), pki, mosquitto, overrides={
        "tls": {"ca": str(d / "root-ca.crt")}, "registry": {"path": str(d / "registry.db")}})
    proc = edgegw("pki", "batch", str(d), str(csv), "--out", str(tmp_path / "bundles"), "--host", "localhost",
                  "--mqtt-port", str(gw.port))
    assert "20/20" in proc.stderr  # the progress bar
    bundle = tmp_path / "bundles" / "b-007"
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.crt", "chain.pem", "coap-dtls.sh", "coap.sh",
                                                       "device.crt", "device.key", "mqtt.sh", "settings.json"]
    assert oct(bundle.stat().st_mode & 0o777) == "0o700" and oct((bundle / "device.key").stat().st_mode & 0o777) == "0o600"
    settings = json.loads((bundle / "settings.json").read_text())
    assert settings["client_id"] == "b-007" and settings["mqtt_port"] == gw.port
    # CoAP paths are relative to the device's namespace (tests/test_provisioning.py runs these scripts).
    assert "coaps+tcp://localhost:5684/ps/telemetry" in (bundle / "coap.sh").read_text()
    assert "coaps://localhost:5684/ps/telemetry" in (bundle / "coap-dtls.sh").read_text()
    shown = json.loads(edgegw("devices", "show", str(d), "b-007", "--json").stdout)
    assert (shown["group"], shown["tenant"], shown["metadata"]) == ("line-1", "acme", {"slot": 7})

    # The bundle as it is: its mqtt.sh (mosquitto_pub) against the real gateway, message seen upstream.
    sink = sink_factory(mosquitto, topic="cloud/#")  # type: ignore[operator]
    gw.start()
    try:
        run = subprocess.run(["sh", str(bundle / "mqtt.sh")], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr + gw.log()[-2000:]
        sink.wait_for(lambda ms: any(m.topic == "cloud/b-007/telemetry" for m in ms), 10)
    finally:
        gw.kill()

    # --tar: one file per device, mode 0600, the same members.
    csv2 = tmp_path / "more.csv"
    csv2.write_text("id\nt-1\n")
    edgegw("pki", "batch", str(d), str(csv2), "--out", str(tmp_path / "tars"), "--host", "localhost", "--tar")
    tar_path = tmp_path / "tars" / "t-1.tar.gz"
    assert oct(tar_path.stat().st_mode & 0o777) == "0o600"
    with tarfile.open(tar_path) as t:
        names = sorted(t.getnames())
        assert t.getmember("t-1/device.key").mode == 0o600
    assert names == [f"t-1/{n}" for n in ("ca.crt", "chain.pem", "coap-dtls.sh", "coap.sh", "device.crt",
                                         "device.key", "mqtt.sh", "settings.json")]


def test_batch_checks_the_csv_before_writing(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d))
    csv = tmp_path / "bad.csv"
    csv.write_text("id,group\nok-1,a\nbad/id,b\n")
    out = edgegw("pki", "batch", str(d), str(csv), "--out", str(tmp_path / "b"), "--host", "h", check=False)
    assert out.returncode == 2 and "bad.csv:3" in out.stderr
    assert not (d / "devices").exists() and not (tmp_path / "b").exists()
    csv.write_text('id,metadata\nok-1,"[1]"\n')
    out = edgegw("pki", "batch", str(d), str(csv), "--out", str(tmp_path / "b"), "--host", "h", check=False)
    assert out.returncode == 2 and "JSON object" in out.stderr


def test_rsa_and_ed25519_devices_connect_to_the_gateway(tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto) -> None:
    from test_revocation import PahoDevice

    d = tmp_path / "pki"
    edgegw("pki", "init", str(d))
    edgegw("pki", "issue", str(d), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1",
           "--key-type", "rsa")
    edgegw("pki", "issue", str(d), "device", "rsa-1", "--key-type", "rsa")
    edgegw("pki", "issue", str(d), "device", "ed-1", "--key-type", "ed25519")
    gw = GatewayProcess(tmp_path / "gw", Fleet(d), pki, mosquitto).start()
    devices = []
    try:
        for device_id in ("rsa-1", "ed-1"):
            device = PahoDevice(d, device_id, gw.port).connect()
            devices.append(device)
            assert device.accepted, gw.log()[-2000:]
    finally:
        for device in devices:
            device.close()
        gw.kill()


def test_status_sees_certificates_issued_before_the_registry(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d))
    edgegw("pki", "issue", str(d), "device", "old-1", "--days", "3")
    (d / "registry.db").unlink()  # as a PKI made before the registry existed
    items = json.loads(edgegw("pki", "status", str(d), "--within", "5", "--json", check=False).stdout)["items"]
    assert [(i["kind"], i["name"]) for i in items] == [("device", "old-1")]
    edgegw("pki", "revoke", str(d), "old-1")  # found through its file
    items = json.loads(edgegw("pki", "status", str(d), "--within", "5", "--json", check=False).stdout)["items"]
    assert items == []
