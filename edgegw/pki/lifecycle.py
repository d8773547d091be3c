"""After issuance: revocation and the CRL, signing CSRs, and what expires when.

The registry (``DIR/registry.db``) holds every certificate the CA issued; revocation marks rows there and writes
``DIR/crl.pem``, signed by the issuing CA (``ca.key``), which the gateway loads (``tls.crl``) and checks at every
handshake. Certificates issued before the registry existed are found through ``devices/<id>.crt``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgegw.errors import PKIError
from edgegw.registry.store import REGISTRY_FILE, DeviceState, Registry, serial_hex

from ._store import CA_CERT, CRL_FILE, DEVICES_DIR, ROOT_CERT, check_name, write_file
from ._keys import cert_pem as _cert_pem
from .ca import _issue_leaf, _parse_san, _record_in, _validity, load_ca

CRL_DAYS = 90
"""Default CRL validity. Past its nextUpdate OpenSSL refuses EVERY certificate of the CA ("CRL has expired"), so
re-run ``pki crl`` well before (``pki status`` lists it)."""

_REASONS = {flag.value.lower().replace("_", ""): flag for flag in x509.ReasonFlags}


def parse_reason(text: str) -> x509.ReasonFlags:
    """``key-compromise``, ``keyCompromise`` or ``key_compromise`` -> ReasonFlags.key_compromise."""
    key = text.replace("-", "").replace("_", "").lower()
    flag = _REASONS.get(key)
    if flag is None or flag in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.aa_compromise):
        names = sorted(f.value for f in _REASONS.values()
                       if f not in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.aa_compromise))
        raise PKIError(f"invalid revocation reason {text!r}: use one of {', '.join(names)}")
    return flag


@dataclass(frozen=True, slots=True)
class Revocation:
    device_id: str
    serials: list[str]
    reason: str
    crl: Path | None


def revoke_device(pki_dir: Path, device_id: str, reason: str = "unspecified", *, crl_days: int = CRL_DAYS,
                  write: bool = True) -> Revocation:
    """Revoke every unexpired certificate issued to ``device_id``, mark it revoked in the registry and (unless
    ``write`` is false) write a new CRL."""
    pki_dir = Path(pki_dir)
    check_name("device id", device_id)
    flag = parse_reason(reason)
    ca = load_ca(pki_dir)
    now = datetime.now(UTC)
    with Registry.open(pki_dir / REGISTRY_FILE) as registry:
        _adopt_file(registry, pki_dir, device_id)
        records = registry.certificates(kind="device", name=device_id)
        if not records:
            raise PKIError(f"no certificate was issued to device {device_id!r} by the CA in {pki_dir}")
        serials = [r.serial for r in records if r.revoked_at is None and r.not_after > now]
        registry.mark_revoked(serials, flag.value)
        registry.register(device_id)  # known from now on, even if it was issued before the registry existed
        registry.set_state(device_id, DeviceState.REVOKED, f"certificate revoked ({flag.value})")
    crl = write_crl(pki_dir, days=crl_days, ca=ca) if write else None
    return Revocation(device_id, serials, flag.value, crl)


def _adopt_file(registry: Registry, pki_dir: Path, device_id: str) -> None:
    """A device certificate made before the registry existed: record it so it can be revoked."""
    path = pki_dir / DEVICES_DIR / f"{device_id}.crt"
    if path.exists():
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError as exc:
            raise PKIError(f"cannot read {path}: {exc}") from None
        _record_in(registry, "device", device_id, cert)


def write_crl(pki_dir: Path, *, days: int = CRL_DAYS, ca: Any = None) -> Path:
    """Sign a CRL with the issuing CA listing every revoked certificate that has not expired: ``DIR/crl.pem``."""
    pki_dir = Path(pki_dir)
    ca = ca or load_ca(pki_dir)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"invalid CRL validity {days!r} days: must be a whole number >= 1")
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(min(now + timedelta(days=days), ca.cert.not_valid_after_utc))
        # Increasing across runs without any state of its own.
        .add_extension(x509.CRLNumber(time.time_ns() // 1_000_000), critical=False)
        .add_extension(ca.authority_key_id, critical=False)
    )
    with Registry.open(pki_dir / REGISTRY_FILE) as registry:
        revoked = registry.certificates(revoked=True)
    for record in revoked:
        if record.not_after <= now or record.revoked_at is None:
            continue  # an expired certificate fails on its dates alone (RFC 5280 5.1.2.6 allows dropping it)
        entry = x509.RevokedCertificateBuilder().serial_number(int(record.serial, 16)).revocation_date(
            record.revoked_at)
        if record.reason and record.reason != x509.ReasonFlags.unspecified.value:
            # RFC 5280 5.3.1: the reasonCode extension is absent rather than "unspecified".
            entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(record.reason)), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca.key, ca.hash)
    path = pki_dir / CRL_FILE
    write_file(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


# --- CSRs ------------------------------------------------------------------------------------------------


def sign_csr(pki_dir: Path, csr_pem: bytes, *, device_id: str | None = None, days: int = 825,
             sans: list[str] | None = None) -> tuple[str, bytes]:
    """Sign a device's CSR (its key never leaves the device): returns (device id, certificate PEM + chain).

    The subject must be exactly one CN, a valid device id (and equal to ``device_id`` if given). Nothing the CSR
    asks for besides its key and CN is copied: extensions are ours (clientAuth, ``sans`` if given).
    """
    pki_dir = Path(pki_dir)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        try:
            csr = x509.load_der_x509_csr(csr_pem)
        except ValueError as exc:
            raise PKIError(f"not a certificate signing request (PEM or DER): {exc}") from None
    if not csr.is_signature_valid:
        raise PKIError("the CSR's signature does not match its public key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or len(csr.subject.rdns) != 1:
        raise PKIError(f"the CSR subject must be a single CN (the device id), got {csr.subject.rfc4514_string()!r}")
    cn = str(cns[0].value)
    check_name("device id", cn)
    if device_id is not None and cn != device_id:
        raise PKIError(f"the CSR is for {cn!r}, not for {device_id!r}")
    ca = load_ca(pki_dir)
    validity = _validity(days, None, None, issuer_not_after=ca.cert.not_valid_after_utc)
    general_names = [_parse_san(s) for s in dict.fromkeys(sans or [])]
    cert = _issue_leaf(ca, cn, ExtendedKeyUsageOID.CLIENT_AUTH, general_names, validity, csr.public_key())
    with Registry.open(pki_dir / REGISTRY_FILE) as registry:
        _record_in(registry, "device", cn, cert)
        registry.register(cn)
    return cn, _cert_pem(cert) + ca.chain_pem


# --- expiry ----------------------------------------------------------------------------------------------


def pki_status(pki_dir: Path, *, within_days: float | None = None) -> dict[str, Any]:
    """What expires: the CAs, the CRL's nextUpdate, and the newest unrevoked certificate of every device, server
    and client (devices that are not active are skipped). ``within_days`` keeps only what expires by then."""
    pki_dir = Path(pki_dir)
    if not (pki_dir / CA_CERT).exists():
        # Checked first: opening the registry would create an empty registry.db in a folder that is no PKI.
        raise PKIError(f"no CA in {pki_dir}: run `edgegw pki init {pki_dir}` first")
    now = datetime.now(UTC)
    items: list[dict[str, Any]] = []
    for kind, path in (("ca", pki_dir / CA_CERT), ("root-ca", pki_dir / ROOT_CERT)):
        if path.exists():
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            items.append(_item(kind, cert.subject.rfc4514_string(), serial_hex(cert.serial_number),
                               cert.not_valid_after_utc, now, str(path)))
    crl_path = pki_dir / CRL_FILE
    if crl_path.exists():
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        if crl.next_update_utc is not None:
            items.append(_item("crl", "next update", "", crl.next_update_utc, now, str(crl_path)))
    latest: dict[tuple[str, str], Any] = {}
    with Registry.open(pki_dir / REGISTRY_FILE) as registry:
        for record in registry.certificates(revoked=False):
            if record.kind == "ca":
                continue
            latest[(record.kind, record.name)] = record  # ordered by issue time: the newest wins
        inactive = {d.id for d in registry.devices() if d.state is not DeviceState.ACTIVE}
        known = {r.serial for r in registry.certificates()}
    # Certificates issued before the registry existed are only files.
    for kind, subdir in (("device", DEVICES_DIR), ("server", "server"), ("client", "clients")):
        for path in sorted((pki_dir / subdir).glob("*.crt")):
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            if serial_hex(cert.serial_number) not in known and (kind, path.stem) not in latest:
                latest[(kind, path.stem)] = _FileCert(serial_hex(cert.serial_number), cert.not_valid_after_utc)
    for (kind, name), record in sorted(latest.items()):
        if kind == "device" and name in inactive:
            continue
        items.append(_item(kind, name, record.serial, record.not_after, now, None))
    if within_days is not None:
        limit = now + timedelta(days=within_days)
        items = [i for i in items if datetime.fromisoformat(i["not_after"]) <= limit]
    items.sort(key=lambda i: i["not_after"])
    return {"now": now.isoformat(timespec="seconds"), "within_days": within_days, "items": items}


@dataclass(frozen=True, slots=True)
class _FileCert:
    serial: str
    not_after: datetime


def _item(kind: str, name: str, serial: str, not_after: datetime, now: datetime,
          path: str | None) -> dict[str, Any]:
    left = (not_after - now).total_seconds() / 86400
    return {"kind": kind, "name": name, "serial": serial, "not_after": not_after.isoformat(timespec="seconds"),
            "days_left": round(left, 1), "expired": left <= 0, "path": path}
