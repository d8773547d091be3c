"""Keys and encodings: which key types the PKI makes, how they sign, and PEM/DER helpers."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)

from edgegw.errors import PKIError

KEY_TYPES = ("ec", "rsa", "ed25519")
_CURVE = ec.SECP256R1()
_HASH = hashes.SHA256()


def new_key(key_type: str) -> CertificateIssuerPrivateKeyTypes:
    check_key_type(key_type)
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(_CURVE)


def check_key_type(key_type: str) -> None:
    if key_type not in KEY_TYPES:
        raise PKIError(f"invalid key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else _HASH


def spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
