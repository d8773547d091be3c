"""Fleet CA: create it (optionally as root -> issuing intermediate), load it, and issue device, server and client
certificates.

Keys are EC P-256 by default (small, fast to generate, and supported by the TLS stacks on constrained devices);
RSA-2048 and Ed25519 on request (``key_type``). Signatures are SHA-256 (none for an Ed25519 CA, which signs the
message itself). Every certificate issued is recorded in the registry (``DIR/registry.db``), and every device issued
is registered there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgegw.errors import PKIError
from edgegw.registry.store import REGISTRY_FILE, Registry

from ._fields import _key_usage, _parse_san, _validity
from ._keys import KEY_TYPES, cert_pem, check_key_type, hash_for, key_pem, new_key, spki

from ._store import (
    CA_CHAIN,
    CLIENTS_DIR,
    ROOT_CERT,
    ROOT_KEY,
    DEVICES_DIR,
    SERVER_DIR,
    CertPaths,
    ca_paths,
    check_name,
    leaf_paths,
    refuse_existing,
    write_file,
    write_pair,
)


_REGISTRY_CHUNK = 50
"""Devices per registry commit when issuing many (measured with 1,000: 8.8 s -> see docs/PROVISIONING.md)."""


@dataclass(frozen=True, slots=True)
class CA:
    """A loaded CA certificate and its private key, ready to sign."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    pki_dir: Path | None = None

    @property
    def is_intermediate(self) -> bool:
        return self.cert.issuer != self.cert.subject

    @property
    def chain_pem(self) -> bytes:
        """Appended to every leaf certificate file an intermediate issues: what a TLS peer must send along."""
        return cert_pem(self.cert) if self.is_intermediate else b""

    @property
    def hash(self) -> hashes.HashAlgorithm | None:
        return hash_for(self.key)

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
    intermediate: bool = False,
    root_days: int | None = None,
    key_type: str = "ec",
) -> CertPaths:
    """Create a new fleet CA in ``pki_dir``: ``ca.crt``/``ca.key`` is the CA that issues certificates.

    With ``intermediate``, ``root-ca.crt``/``root-ca.key`` is a self-signed root (pathlen 1) that signs the issuing
    CA (pathlen 0); ``ca-chain.pem`` is the issuing CA followed by the root. The root key is needed again only to
    sign a new intermediate: move it offline.
    """
    pki_dir = Path(pki_dir)
    paths = ca_paths(pki_dir)
    root_paths = CertPaths(pki_dir / ROOT_CERT, pki_dir / ROOT_KEY)
    if not force:
        # Replacing the CA silently would orphan every certificate it ever issued.
        refuse_existing(paths)
        if intermediate:
            refuse_existing(root_paths)
    if not common_name or len(common_name) > 64:
        raise PKIError(f"invalid CA common name {common_name!r}: use 1-64 characters")
    if not intermediate:
        key = new_key(key_type)
        cert = _ca_cert(common_name, key, None, None, _validity(days, None, None, issuer_not_after=None), 0)
        write_pair(paths, cert_pem(cert), key_pem(key), force=force)
        _record(pki_dir, "ca", common_name, cert)
        return paths
    root_key = new_key(key_type)
    root_validity = _validity(root_days or max(days, 2 * days), None, None, issuer_not_after=None)
    root_name = f"{common_name} root"[:64]
    root = _ca_cert(root_name, root_key, None, None, root_validity, 1)
    key = new_key(key_type)
    cert = _ca_cert(common_name, key, root, root_key,
                    _validity(days, None, None, issuer_not_after=root.not_valid_after_utc), 0)
    write_pair(root_paths, cert_pem(root), key_pem(root_key), force=force)
    write_pair(paths, cert_pem(cert), key_pem(key), force=force)
    write_file(pki_dir / CA_CHAIN, cert_pem(cert) + cert_pem(root))
    _record(pki_dir, "ca", root_name, root)
    _record(pki_dir, "ca", common_name, cert)
    return paths


def _ca_cert(
    common_name: str,
    key: CertificateIssuerPrivateKeyTypes,
    issuer: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes | None,
    validity: tuple[datetime, datetime],
    path_length: int,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        # path_length=0: this CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None and issuer_key is not None:
        builder = builder.add_extension(CA(issuer, issuer_key).authority_key_id, critical=False)
    signer = issuer_key or key
    return builder.sign(signer, hash_for(signer))


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
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise PKIError(f"CA key {paths.key} is not an EC, RSA or Ed25519 key")
    if spki(key.public_key()) != spki(cert.public_key()):
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
    return CA(cert=cert, key=key, pki_dir=pki_dir)


def issue_device(
    pki_dir: Path,
    device_id: str,
    *,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    force: bool = False,
    key_type: str = "ec",
) -> CertPaths:
    """Issue ``devices/<device_id>.crt/.key``: CN = device id = MQTT client id."""
    (paths,) = issue_devices(
        pki_dir, [device_id], days=days, not_before=not_before, not_after=not_after, force=force,
        key_type=key_type,
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
    key_type: str = "ec",
    sans: Sequence[str] = (),
    on_issued: Callable[[str, CertPaths], None] | None = None,
    registry_fields: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[CertPaths]:
    """Issue many device certificates with one CA load, and register each device (state active; group, tenant,
    metadata from ``registry_fields[id]`` if given).

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
    check_key_type(key_type)
    general_names = [_parse_san(s) for s in _san_list(sans)]
    targets = [leaf_paths(pki_dir, DEVICES_DIR, d) for d in ids]
    if not force:
        for paths in targets:
            refuse_existing(paths)
    ca = load_ca(pki_dir)
    validity = _validity(
        days, not_before, not_after, issuer_not_after=ca.cert.not_valid_after_utc
    )
    pending = list(zip(ids, targets, strict=True))
    with _registry(pki_dir) as registry:
        for start in range(0, len(pending), _REGISTRY_CHUNK):
            # One registry commit per chunk: a crash loses at most a chunk's rows, whose certificate files
            # `pki revoke` and `pki status` still find; the gateway's reload retries while a chunk holds the lock.
            with registry.transaction():
                for device_id, paths in pending[start:start + _REGISTRY_CHUNK]:
                    key = new_key(key_type)
                    cert = _issue_leaf(ca, device_id, ExtendedKeyUsageOID.CLIENT_AUTH, general_names, validity,
                                       key.public_key())
                    write_pair(paths, cert_pem(cert) + ca.chain_pem, key_pem(key), force=force)
                    _record_in(registry, "device", device_id, cert)
                    registry.register(device_id, **(registry_fields or {}).get(device_id, {}))
                    if on_issued is not None:
                        on_issued(device_id, paths)
    return targets


def issue_server(
    pki_dir: Path,
    name: str,
    sans: Sequence[str],
    *,
    days: int = 825,
    force: bool = False,
    key_type: str = "ec",
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
        pki_dir, SERVER_DIR, name, ExtendedKeyUsageOID.SERVER_AUTH, general_names, days, force, key_type
    )


def issue_client(pki_dir: Path, name: str, *, days: int = 825, force: bool = False,
                 key_type: str = "ec") -> CertPaths:
    """Issue ``clients/<name>.crt/.key``: the gateway's identity towards the cloud broker."""
    pki_dir = Path(pki_dir)
    check_name("client name", name)
    return _issue_one(pki_dir, CLIENTS_DIR, name, ExtendedKeyUsageOID.CLIENT_AUTH, (), days, force, key_type)


def _issue_one(
    pki_dir: Path,
    subdir: str,
    name: str,
    eku: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    days: int,
    force: bool,
    key_type: str,
) -> CertPaths:
    check_key_type(key_type)
    paths = leaf_paths(pki_dir, subdir, name)
    if not force:
        refuse_existing(paths)
    ca = load_ca(pki_dir)
    validity = _validity(days, None, None, issuer_not_after=ca.cert.not_valid_after_utc)
    key = new_key(key_type)
    cert = _issue_leaf(ca, name, eku, sans, validity, key.public_key())
    write_pair(paths, cert_pem(cert) + ca.chain_pem, key_pem(key), force=force)
    _record(pki_dir, {SERVER_DIR: "server", CLIENTS_DIR: "client"}.get(subdir, subdir), name, cert)
    return paths


def _issue_leaf(
    ca: CA,
    common_name: str,
    eku: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    validity: tuple[datetime, datetime],
    public_key: CertificatePublicKeyTypes,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDHE key exchange only needs the key to sign the handshake; RSA keys may also be used for RSA key
        # transport by old TLS 1.2 peers.
        .add_extension(
            _key_usage(cert_sign=False, encipher=isinstance(public_key, rsa.RSAPublicKey)), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(ca.authority_key_id, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, ca.hash)


def _san_list(sans: Sequence[str]) -> list[str]:
    if isinstance(sans, str):
        raise PKIError(f"sans must be a list of host names, not the string {sans!r}")
    return list(dict.fromkeys(sans))


def _registry(pki_dir: Path) -> AbstractContextManager[Registry]:
    return Registry.open(pki_dir / REGISTRY_FILE)


def _record(pki_dir: Path, kind: str, name: str, cert: x509.Certificate) -> None:
    with _registry(pki_dir) as registry:
        _record_in(registry, kind, name, cert)


def _record_in(registry: Registry, kind: str, name: str, cert: x509.Certificate) -> None:
    registry.record_certificate(kind, name, cert.serial_number, cert.not_valid_before_utc,
                                cert.not_valid_after_utc, cert_pem(cert).decode())


