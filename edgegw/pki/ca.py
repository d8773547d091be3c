"""Fleet CA: create it, load it, and issue device, server and client certificates.

Every key is EC P-256 (small, fast to generate, and supported by the TLS stacks on
constrained devices); every signature is ECDSA with SHA-256.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgegw.errors import PKIError

from ._store import (
    CLIENTS_DIR,
    DEVICES_DIR,
    SERVER_DIR,
    CertPaths,
    ca_paths,
    check_name,
    leaf_paths,
    refuse_existing,
    write_pair,
)

_CURVE = ec.SECP256R1()
_HASH = hashes.SHA256()
# Edge boxes and devices often boot with a clock that is a little behind; a certificate
# that becomes valid "in 30 seconds" fails the handshake, so validity starts slightly early.
_BACKDATE = timedelta(minutes=5)

# '_' is not hostname syntax, but OpenSSL and Python match it, and socket.gethostname() on
# some boxes returns one (`edgegw init` puts the host name into the server certificate).
_DNS_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_DNS_RE = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*")


@dataclass(frozen=True, slots=True)
class CA:
    """A loaded CA certificate and its private key, ready to sign."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            # A CA made elsewhere may lack an SKI; derive the same value from its key.
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def init_ca(
    pki_dir: Path,
    *,
    common_name: str = "edgegw fleet CA",
    days: int = 3650,
    force: bool = False,
) -> CertPaths:
    """Create a new self-signed fleet CA in ``pki_dir`` (ca.crt, ca.key)."""
    pki_dir = Path(pki_dir)
    paths = ca_paths(pki_dir)
    if not force:
        # Replacing the CA silently would orphan every certificate it ever issued.
        refuse_existing(paths)
    if not common_name or len(common_name) > 64:
        raise PKIError(f"invalid CA common name {common_name!r}: use 1-64 characters")
    not_before, not_after = _validity(days, None, None, issuer_not_after=None)
    key = ec.generate_private_key(_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _HASH)
    )
    write_pair(paths, _cert_pem(cert), _key_pem(key), force=force)
    return paths


def load_ca(pki_dir: Path) -> CA:
    """Load and sanity-check the CA in ``pki_dir``."""
    pki_dir = Path(pki_dir)
    paths = ca_paths(pki_dir)
    have_cert, have_key = paths.cert.exists(), paths.key.exists()
    if not have_cert and not have_key:
        raise PKIError(f"no CA in {pki_dir}: run `edgegw pki init {pki_dir}` first")
    if not (have_cert and have_key):
        missing = paths.key if have_cert else paths.cert
        raise PKIError(f"incomplete CA in {pki_dir}: {missing} is missing")
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    except ValueError as exc:
        raise PKIError(f"cannot read CA certificate {paths.cert}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot read CA key {paths.key}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"CA key {paths.key} is not an EC key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise PKIError(f"CA key {paths.key} does not belong to {paths.cert}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PKIError(f"{paths.cert} is not a CA certificate (basicConstraints CA:true missing)")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        expired = f"{cert.not_valid_after_utc:%Y-%m-%d}"
        raise PKIError(f"CA certificate {paths.cert} expired on {expired}")
    return CA(cert=cert, key=key)


def issue_device(
    pki_dir: Path,
    device_id: str,
    *,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    force: bool = False,
) -> CertPaths:
    """Issue ``devices/<device_id>.crt/.key``: CN = device id = MQTT client id."""
    (paths,) = issue_devices(
        pki_dir, [device_id], days=days, not_before=not_before, not_after=not_after, force=force
    )
    return paths


def issue_devices(
    pki_dir: Path,
    device_ids: Iterable[str],
    *,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    force: bool = False,
) -> list[CertPaths]:
    """Issue many device certificates with one CA load.

    Every id is checked (valid, not repeated, not already issued unless ``force``) before
    anything is written, so a bad id in a batch of thousands leaves the directory untouched.
    """
    pki_dir = Path(pki_dir)
    ids = [check_name("device id", d) for d in device_ids]
    seen: set[str] = set()
    for device_id in ids:
        if device_id in seen:
            raise PKIError(f"device id {device_id!r} given more than once")
        seen.add(device_id)
    targets = [leaf_paths(pki_dir, DEVICES_DIR, d) for d in ids]
    if not force:
        for paths in targets:
            refuse_existing(paths)
    ca = load_ca(pki_dir)
    validity = _validity(
        days, not_before, not_after, issuer_not_after=ca.cert.not_valid_after_utc
    )
    for device_id, paths in zip(ids, targets, strict=True):
        cert_pem, key_pem = _issue_leaf(
            ca, device_id, ExtendedKeyUsageOID.CLIENT_AUTH, (), validity
        )
        write_pair(paths, cert_pem, key_pem, force=force)
    return targets


def issue_server(
    pki_dir: Path,
    name: str,
    sans: Sequence[str],
    *,
    days: int = 825,
    force: bool = False,
) -> CertPaths:
    """Issue ``server/<name>.crt/.key`` for the gateway's TLS listener.

    Each SAN is an IP address if :func:`ipaddress.ip_address` accepts it, else a DNS name.
    """
    pki_dir = Path(pki_dir)
    check_name("server name", name)
    if isinstance(sans, str):
        raise PKIError(f"sans must be a list of host names, not the string {sans!r}")
    general_names = list(dict.fromkeys(_parse_san(s) for s in sans))
    if not general_names:
        # Clients match the host name against the SANs only (RFC 6125); the CN is ignored.
        raise PKIError(f"server certificate {name!r} needs at least one SAN (--san HOST)")
    return _issue_one(
        pki_dir, SERVER_DIR, name, ExtendedKeyUsageOID.SERVER_AUTH, general_names, days, force
    )


def issue_client(pki_dir: Path, name: str, *, days: int = 825, force: bool = False) -> CertPaths:
    """Issue ``clients/<name>.crt/.key``: the gateway's identity towards the cloud broker."""
    pki_dir = Path(pki_dir)
    check_name("client name", name)
    return _issue_one(pki_dir, CLIENTS_DIR, name, ExtendedKeyUsageOID.CLIENT_AUTH, (), days, force)


def _issue_one(
    pki_dir: Path,
    subdir: str,
    name: str,
    eku: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    days: int,
    force: bool,
) -> CertPaths:
    paths = leaf_paths(pki_dir, subdir, name)
    if not force:
        refuse_existing(paths)
    ca = load_ca(pki_dir)
    validity = _validity(days, None, None, issuer_not_after=ca.cert.not_valid_after_utc)
    cert_pem, key_pem = _issue_leaf(ca, name, eku, sans, validity)
    write_pair(paths, cert_pem, key_pem, force=force)
    return paths


def _issue_leaf(
    ca: CA,
    common_name: str,
    eku: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    validity: tuple[datetime, datetime],
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(_CURVE)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDHE key exchange only needs the key to sign the handshake.
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(ca.authority_key_id, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return _cert_pem(builder.sign(ca.key, _HASH)), _key_pem(key)


def _validity(
    days: int,
    not_before: datetime | None,
    not_after: datetime | None,
    *,
    issuer_not_after: datetime | None,
) -> tuple[datetime, datetime]:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"invalid validity {days!r} days: must be a whole number >= 1")
    for label, value in (("not_before", not_before), ("not_after", not_after)):
        # cryptography reads a naive datetime as UTC; a local time would shift validity.
        if value is not None and value.utcoffset() is None:
            raise PKIError(f"{label} must be timezone-aware, got {value!r}")
    now = datetime.now(UTC)
    start = not_before if not_before is not None else now - _BACKDATE
    if not_after is not None:
        end = not_after
    else:
        end = (not_before if not_before is not None else now) + timedelta(days=days)
    if issuer_not_after is not None and end > issuer_not_after:
        # A certificate is useless once its issuer has expired; say so in the certificate.
        end = issuer_not_after
    if start >= end:
        raise PKIError(f"empty validity period: not_before {start} is not before not_after {end}")
    return start, end


def _parse_san(san: str) -> x509.GeneralName:
    if not isinstance(san, str):  # ip_address(5) would happily return 0.0.0.5
        raise PKIError(f"invalid SAN {san!r}: not a string")
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        pass
    # Reject an all-digit last label so a mistyped IP ("10.0.0.300") is not taken as a name.
    if (
        len(san) > 253
        or _DNS_RE.fullmatch(san) is None
        or san.rsplit(".", 1)[-1].isdigit()
    ):
        raise PKIError(f"invalid SAN {san!r}: not an IP address or DNS name")
    return x509.DNSName(san.lower())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
