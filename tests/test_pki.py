from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgegw import pki
from edgegw.pki import PKIError, init_ca, issue_client, issue_device, issue_devices, issue_server
from edgegw.pki.cli import add_pki_parser

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "pki")
    return tmp_path / "pki"


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_verify(ca_dir: Path, cert: Path, *purpose: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    cmd = [OPENSSL, "verify", "-CAfile", str(ca_dir / "ca.crt"), *purpose, str(cert)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edgegw")
    add_pki_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# --- CA ---------------------------------------------------------------------------------


def test_init_ca_writes_ec_ca(tmp_path: Path) -> None:
    paths = init_ca(tmp_path / "pki", days=30)
    assert paths == pki.CertPaths(tmp_path / "pki" / "ca.crt", tmp_path / "pki" / "ca.key")
    cert = load(paths.cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edgegw fleet CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert timedelta(days=29) < cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=30)
    assert mode(paths.key) == 0o600 and mode(paths.cert) == 0o644
    assert paths.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, clear


def test_init_ca_refuses_existing_unless_forced(ca_dir: Path) -> None:
    old = (ca_dir / "ca.crt").read_bytes()
    with pytest.raises(PKIError, match="ca.key"):
        init_ca(ca_dir)
    assert (ca_dir / "ca.crt").read_bytes() == old
    init_ca(ca_dir, force=True)
    assert (ca_dir / "ca.crt").read_bytes() != old
    assert mode(ca_dir / "ca.key") == 0o600


def test_missing_ca_tells_you_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(PKIError) as err:
        issue_device(tmp_path, "dev-1")
    assert str(err.value) == f"no CA in {tmp_path}: run `edgegw pki init {tmp_path}` first"
    assert not (tmp_path / "devices").exists()


def test_mismatched_ca_key_is_refused(tmp_path: Path, ca_dir: Path) -> None:
    init_ca(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "ca.key", ca_dir / "ca.key")
    with pytest.raises(PKIError, match="does not belong"):
        issue_device(ca_dir, "dev-1")


# --- leaf certificates ------------------------------------------------------------------


@needs_openssl
def test_device_cert_verifies_and_carries_identity(ca_dir: Path) -> None:
    paths = issue_device(ca_dir, "sensor-001")
    assert paths.cert == ca_dir / "devices" / "sensor-001.crt"
    assert paths.key == ca_dir / "devices" / "sensor-001.key"
    result = openssl_verify(ca_dir, paths.cert, "-purpose", "sslclient")
    assert result.returncode == 0, result.stdout + result.stderr

    cert, ca = load(paths.cert), load(ca_dir / "ca.crt")
    assert cert.subject.rfc4514_string() == "CN=sensor-001"
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert mode(paths.key) == 0o600 and mode(paths.cert) == 0o644


@needs_openssl
def test_server_cert_has_dns_and_ip_sans(ca_dir: Path) -> None:
    paths = issue_server(ca_dir, "gateway", ["gw.example.com", "localhost", "127.0.0.1", "::1"])
    assert paths.cert == ca_dir / "server" / "gateway.crt"
    result = openssl_verify(ca_dir, paths.cert, "-purpose", "sslserver")
    assert result.returncode == 0, result.stdout + result.stderr

    cert = load(paths.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.com", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert mode(paths.key) == 0o600


@needs_openssl
def test_client_cert_verifies(ca_dir: Path) -> None:
    paths = issue_client(ca_dir, "uplink")
    assert paths.cert == ca_dir / "clients" / "uplink.crt"
    result = openssl_verify(ca_dir, paths.cert, "-purpose", "sslclient")
    assert result.returncode == 0, result.stdout + result.stderr
    assert eku(load(paths.cert)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert mode(paths.key) == 0o600


@needs_openssl
def test_expired_device_cert_is_rejected_by_openssl(ca_dir: Path) -> None:
    now = datetime.now(UTC)
    paths = issue_device(
        ca_dir, "old-dev", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )
    result = openssl_verify(ca_dir, paths.cert)
    assert result.returncode != 0
    assert "expired" in result.stdout + result.stderr


@needs_openssl
def test_cert_from_another_ca_is_rejected(tmp_path: Path, ca_dir: Path) -> None:
    init_ca(tmp_path / "rogue")
    paths = issue_device(tmp_path / "rogue", "dev-1")
    assert openssl_verify(ca_dir, paths.cert).returncode != 0


def test_validity_is_clamped_to_the_ca(tmp_path: Path) -> None:
    init_ca(tmp_path, days=30)
    cert = load(issue_device(tmp_path, "dev-1").cert)
    assert cert.not_valid_after_utc == load(tmp_path / "ca.crt").not_valid_after_utc


def test_naive_datetimes_and_bad_days_are_refused(ca_dir: Path) -> None:
    with pytest.raises(PKIError, match="timezone-aware"):
        issue_device(ca_dir, "dev-1", not_after=datetime(2030, 1, 1))
    with pytest.raises(PKIError, match="days"):
        issue_device(ca_dir, "dev-1", days=0)
    assert not (ca_dir / "devices" / "dev-1.key").exists()


def test_serials_are_random(ca_dir: Path) -> None:
    serials = {load(p.cert).serial_number for p in issue_devices(ca_dir, ["a", "b", "c"])}
    assert len(serials) == 3 and all(s > 2**64 for s in serials)


# --- names, overwrite, modes ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["", ".hidden", "..", "a/b", "../x", "dev+1", "dev#", "dev 1", "dév", "dev\n", "x" * 129],
)
def test_bad_device_ids_are_refused_by_name(ca_dir: Path, bad: str) -> None:
    with pytest.raises(PKIError) as err:
        issue_device(ca_dir, bad)
    assert repr(bad) in str(err.value)
    assert not (ca_dir / "devices").exists()


def test_id_length_follows_the_common_name_limit(ca_dir: Path) -> None:
    issue_device(ca_dir, "x" * 64)
    with pytest.raises(PKIError, match="at most 64"):
        issue_device(ca_dir, "y" * 65)


def test_bad_server_and_client_names_are_refused(ca_dir: Path) -> None:
    with pytest.raises(PKIError, match="'a/b'"):
        issue_server(ca_dir, "a/b", ["localhost"])
    with pytest.raises(PKIError, match="'#'"):
        issue_client(ca_dir, "#")


@pytest.mark.parametrize("bad", ["-bad.example", "a..b", "10.0.0.300", "host name", "a/b"])
def test_bad_sans_are_refused(ca_dir: Path, bad: str) -> None:
    with pytest.raises(PKIError, match="invalid SAN"):
        issue_server(ca_dir, "gw", ["ok.example", bad])
    assert not (ca_dir / "server").exists()


def test_host_name_sans_as_edgegw_init_passes_them(ca_dir: Path) -> None:
    # `edgegw init` passes socket.gethostname(), which may hold '_' or upper case.
    paths = issue_server(ca_dir, "gateway", sorted({"localhost", "127.0.0.1", "Edge_Box-7"}))
    san = load(paths.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "edge_box-7"}


def test_pki_error_is_an_edgegw_error() -> None:
    from edgegw.errors import EdgegwError

    assert issubclass(PKIError, EdgegwError)


def test_server_needs_a_san(ca_dir: Path) -> None:
    with pytest.raises(PKIError, match="at least one SAN"):
        issue_server(ca_dir, "gw", [])


def test_reissue_is_refused_without_force(ca_dir: Path) -> None:
    first = issue_device(ca_dir, "dev-1")
    old_cert, old_key = first.cert.read_bytes(), first.key.read_bytes()
    with pytest.raises(PKIError, match="--force"):
        issue_device(ca_dir, "dev-1")
    assert first.cert.read_bytes() == old_cert and first.key.read_bytes() == old_key

    issue_device(ca_dir, "dev-1", force=True)
    assert first.cert.read_bytes() != old_cert and first.key.read_bytes() != old_key
    assert [p.name for p in (ca_dir / "devices").iterdir()].count("dev-1.key") == 1
    assert not [p for p in (ca_dir / "devices").iterdir() if p.name.endswith(".tmp")]


def test_force_tightens_a_loose_key_mode(ca_dir: Path) -> None:
    paths = issue_client(ca_dir, "uplink")
    paths.key.chmod(0o644)
    issue_client(ca_dir, "uplink", force=True)
    assert mode(paths.key) == 0o600


def test_modes_do_not_depend_on_umask(ca_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        strict = issue_device(ca_dir, "strict")
        os.umask(0)
        loose = issue_device(ca_dir, "loose")
    finally:
        os.umask(old)
    assert mode(strict.cert) == mode(loose.cert) == 0o644
    assert mode(strict.key) == mode(loose.key) == 0o600


def test_batch_is_checked_before_anything_is_written(ca_dir: Path) -> None:
    issue_device(ca_dir, "taken")
    with pytest.raises(PKIError, match="'a/b'"):
        issue_devices(ca_dir, ["ok-1", "a/b"])
    with pytest.raises(PKIError, match="taken"):
        issue_devices(ca_dir, ["ok-1", "taken"])
    with pytest.raises(PKIError, match="more than once"):
        issue_devices(ca_dir, ["ok-1", "ok-1"])
    assert sorted(p.name for p in (ca_dir / "devices").iterdir()) == ["taken.crt", "taken.key"]


# --- CLI --------------------------------------------------------------------------------


@needs_openssl
def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert run_cli("pki", "init", str(d), "--days", "100") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"wrote {d / 'ca.crt'}", f"wrote {d / 'ca.key'}"]

    assert run_cli("pki", "issue", str(d), "device", "dev-1", "dev-2", "--days", "10") == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and f"wrote {d / 'devices' / 'dev-2.key'}" in out
    cert = load(d / "devices" / "dev-1.crt")
    assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=10)

    assert run_cli("pki", "issue", str(d), "server", "gw", "--san", "gw.local",
                   "--san", "10.0.0.1", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "name": "gw", "cert": str(d / "server" / "gw.crt"), "key": str(d / "server" / "gw.key"),
    }

    assert run_cli("pki", "issue", str(d), "client", "uplink", "--json") == 0
    assert json.loads(capsys.readouterr().out)["cert"] == str(d / "clients" / "uplink.crt")

    assert run_cli("pki", "issue", str(d), "device", "dev-3", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [
        {"id": "dev-3", "cert": str(d / "devices" / "dev-3.crt"),
         "key": str(d / "devices" / "dev-3.key")},
    ]

    for cert_path in sorted(d.glob("*/*.crt")):
        result = openssl_verify(d, cert_path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_cli_errors_go_to_stderr_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "pki"
    assert run_cli("pki", "issue", str(d), "device", "dev-1") == 2
    err = capsys.readouterr()
    assert err.out == ""
    assert err.err == f"edgegw: error: no CA in {d}: run `edgegw pki init {d}` first\n"

    assert run_cli("pki", "init", str(d)) == 0
    assert run_cli("pki", "init", str(d)) == 2
    assert run_cli("pki", "issue", str(d), "device", "dev-1") == 0
    capsys.readouterr()
    assert run_cli("pki", "issue", str(d), "device", "dev-1", "--json") == 2
    err = capsys.readouterr()
    assert err.out == "" and err.err.startswith("edgegw: error: refusing to overwrite")
    assert run_cli("pki", "issue", str(d), "device", "dev-1", "--force") == 0

    assert run_cli("pki", "issue", str(d), "device", "bad/id") == 2
    assert "'bad/id'" in capsys.readouterr().err


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["pki"],
        ["pki", "issue", str(tmp_path), "server", "gw"],  # --san is required
        ["pki", "init", str(tmp_path), "--days", "0"],
        ["pki", "issue", str(tmp_path), "device"],
    ):
        with pytest.raises(SystemExit) as exc:
            run_cli(*argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_cli_bulk_issue_loads_the_ca_once(
    ca_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgegw.pki import ca as ca_module

    calls = 0
    real_load = ca_module.load_ca

    def counting_load(pki_dir: Path) -> pki.CA:
        nonlocal calls
        calls += 1
        return real_load(pki_dir)

    monkeypatch.setattr(ca_module, "load_ca", counting_load)
    ids = [f"dev-{i:04d}" for i in range(300)]
    assert run_cli("pki", "issue", str(ca_dir), "device", *ids) == 0
    assert calls == 1
    assert len(capsys.readouterr().out.splitlines()) == 600
    assert len(list((ca_dir / "devices").iterdir())) == 600
