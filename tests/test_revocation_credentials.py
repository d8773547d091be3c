"""`Credentials` without a gateway process: what it allows, what a reload closes, what it refuses to load, and the
expiry values a metrics module reads."""

from __future__ import annotations

import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from edgegw.config import RegistrySettings, TLSSettings
from edgegw.errors import ConfigError
from edgegw.identity import DeviceIdentity
from edgegw.pki import init_ca, issue_device, issue_server
from edgegw.pki.lifecycle import revoke_device, write_crl
from edgegw.registry.reload import Credentials
from edgegw.registry.store import DeviceState, Registry


class FakeServer:
    def __init__(self) -> None:
        self.ssl_context: ssl.SSLContext | None = None
        self.authorizer: Any = None
        self.devices: dict[str, Any] = {}
        self.closed: list[tuple[str, int, str]] = []

    def connect(self, pki_dir: Path, device_id: str) -> None:
        cert = x509.load_pem_x509_certificate((pki_dir / "devices" / f"{device_id}.crt").read_bytes())
        identity = DeviceIdentity(device_id, format(cert.serial_number, "X"), "")
        self.devices[device_id] = SimpleNamespace(identity=identity, lab=False)

    def disconnect_device(self, device_id: str, reason: int, detail: str) -> bool:
        self.closed.append((device_id, int(reason), detail))
        self.devices.pop(device_id)
        return True


def identity(pki_dir: Path, device_id: str) -> DeviceIdentity:
    cert = x509.load_pem_x509_certificate((pki_dir / "devices" / f"{device_id}.crt").read_bytes())
    return DeviceIdentity(device_id, format(cert.serial_number, "X"), "")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Credentials, FakeServer]:
    d = tmp_path / "pki"
    init_ca(d)
    issue_server(d, "gateway", ["localhost"], days=40)
    for device_id in ("a", "b", "c"):
        issue_device(d, device_id, days=30 if device_id == "c" else 300)
    write_crl(d)
    tls = TLSSettings(cert=d / "server" / "gateway.crt", key=d / "server" / "gateway.key", ca=d / "ca.crt",
                      crl=d / "crl.pem", reload_interval=0.1)
    creds = Credentials(tls, RegistrySettings(path=d / "registry.db"))
    server = FakeServer()
    server.ssl_context = creds.load()
    creds.attach(server)
    for device_id in ("a", "b", "c"):
        server.connect(d, device_id)
    return d, creds, server


def test_expiry_values_for_metrics(setup: tuple[Path, Credentials, FakeServer]) -> None:
    d, creds, _ = setup
    now = datetime.now(UTC)
    assert creds.server_cert_not_after is not None
    assert timedelta(days=39) < creds.server_cert_not_after - now <= timedelta(days=40)
    assert creds.soonest_device_not_after is not None
    assert timedelta(days=29) < creds.soonest_device_not_after - now <= timedelta(days=30)
    assert creds.crl_next_update is not None and creds.crl_next_update > now + timedelta(days=80)


def test_reload_swaps_the_context_and_closes_only_revoked_and_suspended(
        setup: tuple[Path, Credentials, FakeServer]) -> None:
    d, creds, server = setup
    old_context = server.ssl_context
    assert server.authorizer(identity(d, "a")) is None
    revoke_device(d, "b", "keyCompromise")
    with Registry.open(d / "registry.db") as reg:
        reg.set_state("c", DeviceState.SUSPENDED, "maintenance")
    assert creds.changed()
    assert creds.reload("test")
    assert server.ssl_context is not old_context
    assert sorted((i, code) for i, code, _ in server.closed) == [("b", 0x87), ("c", 0x87)]
    assert set(server.devices) == {"a"}
    assert server.authorizer(identity(d, "c")) == "device is suspended in the registry: maintenance"
    assert "revoked" in server.authorizer(identity(d, "b"))
    assert not creds.changed()


def test_broken_material_keeps_the_running_context(setup: tuple[Path, Credentials, FakeServer]) -> None:
    d, creds, server = setup
    running = server.ssl_context
    (d / "server" / "gateway.key").write_text("not a key\n")
    assert creds.reload("test") is False
    assert server.ssl_context is running and creds.reload_failures == 1
    assert not creds.changed()  # reported once, not at every poll


def test_several_crls_in_one_file(tmp_path: Path, setup: tuple[Path, Credentials, FakeServer]) -> None:
    d, creds, server = setup
    other = tmp_path / "other"
    init_ca(other, common_name="second fleet CA")
    issue_device(other, "z")
    revoke_device(other, "z")
    revoke_device(d, "a")
    (d / "bundle.crt").write_bytes((d / "ca.crt").read_bytes() + (other / "ca.crt").read_bytes())
    (d / "crls.pem").write_bytes((d / "crl.pem").read_bytes() + (other / "crl.pem").read_bytes())
    tls = TLSSettings(cert=d / "server" / "gateway.crt", key=d / "server" / "gateway.key", ca=d / "bundle.crt",
                      crl=d / "crls.pem")
    both = Credentials(tls, RegistrySettings())
    both.load()
    assert both.authorize(identity(other, "z")) == "certificate revoked (CRL)"
    assert both.authorize(identity(d, "a")) == "certificate revoked (CRL)"
    assert both.authorize(identity(d, "b")) is None


def test_start_errors_name_the_key(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    init_ca(d)
    issue_server(d, "gateway", ["localhost"])
    base = dict(cert=d / "server" / "gateway.crt", key=d / "server" / "gateway.key", ca=d / "ca.crt")
    with pytest.raises(ConfigError) as err:
        Credentials(TLSSettings(**base, crl=d / "missing.pem"), RegistrySettings()).load()
    assert err.value.key == "tls.crl"
    with pytest.raises(ConfigError) as err:
        Credentials(TLSSettings(**base), RegistrySettings(path=d / "nope.db")).load()
    assert err.value.key == "registry.path"
    (d / "empty.pem").write_text("")
    with pytest.raises(ConfigError, match="no PEM CRL"):
        Credentials(TLSSettings(**base, crl=d / "empty.pem"), RegistrySettings()).load()
    os.remove(d / "server" / "gateway.key")
    with pytest.raises(ConfigError) as err:
        Credentials(TLSSettings(**base), RegistrySettings()).load()
    assert err.value.key == "tls.key"
