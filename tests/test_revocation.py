"""Revocation and hot reload with real peers: `edgegw pki` CLI, `openssl verify -crl_check`, paho devices and the
gateway as a real process (`edgegw run`), SIGHUP and file-change reloads."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from conftest import Fleet, GatewayProcess, LabPKI, Mosquitto, wait_until


def edgegw(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def make_pki(folder: Path, *, intermediate: bool = False) -> Path:
    edgegw("pki", "init", str(folder), *(["--intermediate"] if intermediate else []))
    edgegw("pki", "issue", str(folder), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1")
    edgegw("pki", "issue", str(folder), "device", "good-1", "good-2", "bad-1", "sus-1")
    from edgegw.pki import issue_device
    now = datetime.now(UTC)
    issue_device(folder, "old-1", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1))
    edgegw("pki", "crl", str(folder))
    return folder


class PahoDevice:
    """A paho MQTT 5 device; ``connack`` is its CONNACK reason (None: no CONNACK, e.g. the handshake failed)."""

    def __init__(self, pki_dir: Path, device_id: str, port: int, *, anchor: Path | None = None) -> None:
        self.device_id = device_id
        self.connack: Any = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: Any = None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(anchor or pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(pki_dir / "devices" / f"{device_id}.crt"), str(pki_dir / "devices" / f"{device_id}.key"))
        # No automatic reconnect within a test: the network thread ends with the connection, so close() does not
        # wait out paho's reconnect sleep (up to 1 s per refused device).
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=MQTTProtocolVersion.MQTTv5,
                             reconnect_on_failure=False)
        client.tls_set_context(ctx)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self.client = client
        self.port = port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason
        (self.disconnected if reason.is_failure else self.connected).set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def connect(self, timeout: float = 5.0) -> PahoDevice:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError):
            self.disconnected.set()
            return self
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not (self.connected.is_set() or self.disconnected.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    @property
    def accepted(self) -> bool:
        return self.connected.is_set() and not self.disconnected.is_set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_gateway(folder: Path, pki_dir: Path, pki: LabPKI, broker: Mosquitto, *, anchor: Path | None = None,
                  reload_interval: float = 0.3) -> GatewayProcess:
    gw = GatewayProcess(folder, Fleet(pki_dir), pki, broker, overrides={
        "tls": {"ca": str(anchor or pki_dir / "ca.crt"), "crl": str(pki_dir / "crl.pem"),
                "reload_interval": reload_interval},
        "registry": {"path": str(pki_dir / "registry.db")},
    })
    return gw.start()


def openssl_verify(pki_dir: Path, cert: Path, anchor: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["openssl", "verify", "-crl_check", "-CAfile", str(anchor), "-CRLfile", str(pki_dir / "crl.pem")]
    if (pki_dir / "root-ca.crt").exists():
        cmd += ["-untrusted", str(pki_dir / "ca.crt")]
    return subprocess.run([*cmd, str(cert)], capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("anchor_name", ["ca.crt", "root-ca.crt", "ca-chain.pem"],
                         ids=["single-ca", "intermediate,tls.ca=root", "intermediate,tls.ca=bundle"])
def test_openssl_and_the_gateway_agree_on_good_revoked_and_expired(
        tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto, anchor_name: str) -> None:
    d = make_pki(tmp_path / "pki", intermediate=anchor_name != "ca.crt")
    edgegw("pki", "revoke", str(d), "bad-1", "--reason", "keyCompromise")
    anchor = d / anchor_name
    gw = start_gateway(tmp_path / "gw", d, pki, mosquitto, anchor=anchor)
    try:
        verdicts = {}
        for device_id in ("good-1", "bad-1", "old-1"):
            result = openssl_verify(d, d / "devices" / f"{device_id}.crt", anchor)
            device = PahoDevice(d, device_id, gw.port, anchor=anchor).connect()
            verdicts[device_id] = (result.returncode == 0, device.accepted)
            device.close()
            if device_id == "bad-1":
                assert "certificate revoked" in result.stdout + result.stderr
            if device_id == "old-1":
                assert "expired" in result.stdout + result.stderr
        assert verdicts == {"good-1": (True, True), "bad-1": (False, False), "old-1": (False, False)}
        reasons = [e["reason"] for e in gw.events("tls.handshake_failed")]
        assert any("revoked" in r for r in reasons), reasons
        assert any("expired" in r for r in reasons), reasons
    finally:
        gw.kill()


def test_reload_keeps_sessions_rotates_the_server_cert_and_closes_revoked_and_suspended(
        tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto) -> None:
    d = make_pki(tmp_path / "pki")
    gw = start_gateway(tmp_path / "gw", d, pki, mosquitto)
    devices: list[PahoDevice] = []
    try:
        keep, revoke, suspend = (PahoDevice(d, i, gw.port).connect() for i in ("good-1", "bad-1", "sus-1"))
        devices += [keep, revoke, suspend]
        assert keep.accepted and revoke.accepted and suspend.accepted
        old_serial = server_serial(gw.port, d)

        # 1. Rotate the server certificate; SIGHUP. The connected device stays, new handshakes see the new cert.
        edgegw("pki", "issue", str(d), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1", "--force")
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_event("tls.reloaded", trigger="SIGHUP")
        wait_until(lambda: server_serial(gw.port, d) != old_serial, 5, what="the new server certificate")
        new = PahoDevice(d, "good-2", gw.port).connect()
        devices.append(new)
        assert new.accepted

        # 2. Revoke a connected device: the file change is picked up and its session closes within the reload.
        edgegw("pki", "revoke", str(d), "bad-1")
        assert revoke.disconnected.wait(10), gw.log()[-3000:]
        assert revoke.disconnect_reason.value == 0x87
        gw.wait_for_event("tls.session_closed", device_id="bad-1")

        # 3. Suspend a connected device from the registry CLI: closed; reconnecting is refused with 0x87.
        edgegw("devices", "suspend", str(d), "sus-1", "--reason", "unpaid")
        assert suspend.disconnected.wait(10), gw.log()[-3000:]
        again = PahoDevice(d, "sus-1", gw.port).connect()
        devices.append(again)
        assert again.connack is not None and again.connack.value == 0x87
        refused = gw.wait_for_event("mqtt.connect_refused", client_id="sus-1")
        assert "suspended" in refused["reason"] and "unpaid" in refused["reason"]
        retry = PahoDevice(d, "bad-1", gw.port).connect()
        devices.append(retry)
        assert not retry.accepted and retry.connack is None  # refused in the TLS handshake (CRL)

        edgegw("devices", "resume", str(d), "sus-1")
        # The resume is picked up by the next reload; which reload that is depends on when the file poll runs
        # (earlier changes may be seen in one reload or two), so wait for the effect rather than counting reloads.
        deadline = time.monotonic() + 15
        while True:
            back = PahoDevice(d, "sus-1", gw.port).connect()
            devices.append(back)
            if back.accepted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert back.accepted, gw.log()[-3000:]

        # The untouched devices were never disconnected.
        assert keep.accepted and new.accepted
    finally:
        for device in devices:
            device.close()
        gw.kill()


def test_broken_material_is_refused_and_the_running_material_stays(
        tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto) -> None:
    d = make_pki(tmp_path / "pki")
    gw = start_gateway(tmp_path / "gw", d, pki, mosquitto)
    devices: list[PahoDevice] = []
    try:
        first = PahoDevice(d, "good-1", gw.port).connect()
        devices.append(first)
        assert first.accepted
        good_crl = (d / "crl.pem").read_bytes()
        replace_file(d / "crl.pem", good_crl[: len(good_crl) // 2])  # truncated
        failed = gw.wait_for_event("tls.reload_failed")
        assert failed["key"] == "tls.crl" and "crl.pem" in failed["reason"]
        # A CRL signed by another CA would refuse every device: refused too.
        edgegw("pki", "init", str(tmp_path / "other"))
        edgegw("pki", "crl", str(tmp_path / "other"))
        replace_file(d / "crl.pem", (tmp_path / "other" / "crl.pem").read_bytes())
        wait_until(lambda: len(gw.events("tls.reload_failed")) >= 2, 10, what="second reload_failed")
        assert "is not signed by the CA" in gw.events("tls.reload_failed")[-1]["reason"]
        replace_file(d / "server" / "gateway.key", b"garbage\n")
        wait_until(lambda: len(gw.events("tls.reload_failed")) >= 3, 10, what="third reload_failed")

        second = PahoDevice(d, "good-2", gw.port).connect()
        devices.append(second)
        assert first.accepted and second.accepted
        assert not gw.events("tls.reloaded")
    finally:
        for device in devices:
            device.close()
        gw.kill()


def test_gateway_refuses_to_start_with_an_expired_crl(tmp_path: Path, pki: LabPKI, mosquitto: Mosquitto) -> None:
    from edgegw.pki import load_ca
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = make_pki(tmp_path / "pki")
    ca = load_ca(d)
    now = datetime.now(UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(now - timedelta(days=2)).next_update(now - timedelta(days=1)).sign(ca.key, ca.hash))
    (d / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    gw = GatewayProcess(tmp_path / "gw", Fleet(d), pki, mosquitto,
                        overrides={"tls": {"crl": str(d / "crl.pem")}})
    proc = subprocess.run([sys.executable, "-m", "edgegw", "run", "--config", str(gw.config_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "tls.crl" in proc.stderr and "expired" in proc.stderr


def replace_file(path: Path, data: bytes) -> None:
    """Swap the file's content in one rename, as deployment tools do: an in-place write can be seen half done (an
    empty file first) by the reload poll, which then reports that state as a failure of its own."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def server_serial(port: int, d: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(str(d / "devices" / "good-2.crt"), str(d / "devices" / "good-2.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


def test_revoke_cli_errors(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    edgegw("pki", "init", str(d))
    proc = edgegw("pki", "revoke", str(d), "nobody", check=False)
    assert proc.returncode == 2 and "no certificate was issued to device 'nobody'" in proc.stderr
    edgegw("pki", "issue", str(d), "device", "dev-1")
    proc = edgegw("pki", "revoke", str(d), "dev-1", "--reason", "bored", check=False)
    assert proc.returncode == 2 and "invalid revocation reason 'bored'" in proc.stderr
    out = json.loads(edgegw("pki", "revoke", str(d), "dev-1", "--reason", "superseded", "--json").stdout)
    assert out["id"] == "dev-1" and len(out["revoked_serials"]) == 1 and out["reason"] == "superseded"
    text = subprocess.run(["openssl", "crl", "-in", str(d / "crl.pem"), "-noout", "-text"], capture_output=True,
                          text=True, timeout=10).stdout
    assert out["revoked_serials"][0] in text.replace(":", "").upper() and "Superseded" in text
    shown = json.loads(edgegw("devices", "show", str(d), "dev-1", "--json").stdout)
    assert shown["state"] == "revoked" and shown["certificates"][0]["reason"] == "superseded"
