"""The DTLS server's OpenSSL context: our certificate, the fleet CA, the CRL, client certificates required.

Built whole from files and only then handed to the server, so a reload that fails leaves the running context alone
(the same rule as ``edgegw/registry/reload.py``, whose ``tls.*`` file layout this reuses). pyOpenSSL is pinned
exactly in pyproject.toml: ``ERR_clear_error`` below comes from its private ``_util``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from edgegw.config import TLSSettings
from edgegw.errors import ConfigError
from edgegw.identity import DeviceIdentity
from edgegw.registry.reload import load_crls

DTLS1_2_VERSION = 0xFEFD  # OpenSSL's constant; pyOpenSSL does not export it

VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]
CookieGenerate = Callable[[SSL.Connection], bytes]
CookieVerify = Callable[[SSL.Connection, bytes], bool]
PSKLookup = Callable[[SSL.Connection, str], "bytes | None"]
"""(connection, PSK identity) -> the key, or None to refuse; pyOpenSSL has no PSK API, so this goes through cffi."""

PSK_CIPHERS = b"DEFAULT:PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384"
"""Certificate suites as before, plus the PSK suites CoAP devices use (RFC 7252 §9.1.3.1:
TLS_PSK_WITH_AES_128_CCM_8)."""

# X509_V_ERR_* codes a device most often hits, named for the operator (the rest are reported by number).
_VERIFY_ERRORS = {
    2: "unknown issuer (certificate not from the fleet CA)",
    3: "no CRL for the issuer",
    7: "bad certificate signature",
    9: "certificate not yet valid",
    10: "certificate expired",
    11: "CRL not yet valid",
    12: "CRL expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unknown issuer (certificate not from the fleet CA)",
    21: "unknown issuer (certificate not from the fleet CA)",
    23: "certificate revoked (CRL)",
    26: "certificate not meant for client authentication",
}


def describe_verify_error(errno: int) -> str:
    return _VERIFY_ERRORS.get(errno, f"certificate verification failed (X509 error {errno})")


def clear_openssl_errors() -> None:
    """DTLSv1_listen leaves parse errors on the thread's queue; a later call must not report them as its own."""
    _lib.ERR_clear_error()


@dataclass(frozen=True, slots=True, kw_only=True)
class DTLSMaterial:
    """Files of the DTLS listener: the same ``tls.*`` files as the MQTT listener (one fleet, one CA, one CRL)."""

    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None
    """PEM, one or more CRLs (one per issuing CA); None: no revocation check at the handshake (the registry and
    :class:`Credentials` still refuse revoked serials through ``authorize``)."""

    @classmethod
    def from_tls(cls, tls: TLSSettings) -> DTLSMaterial:
        return cls(cert=tls.cert, key=tls.key, ca=tls.ca, crl=tls.crl)


def build_context(material: DTLSMaterial, *, verify: VerifyCallback, cookie_generate: CookieGenerate,
                  cookie_verify: CookieVerify, psk: PSKLookup | None = None,
                  mtu_query_off: bool = True) -> SSL.Context:
    """A DTLS 1.2 server context; raises ConfigError naming the ``tls.*`` key whose file does not load."""
    for key, path in (("tls.cert", material.cert), ("tls.key", material.key), ("tls.ca", material.ca),
                      ("tls.crl", material.crl)):
        if path is not None and not path.is_file():
            raise ConfigError(key, f"certificate material not found: {path}")
    ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    # No renegotiation: the identity read at the handshake is the session's for its whole life.
    options = SSL.OP_NO_TICKET | (SSL.OP_COOKIE_EXCHANGE or 0) | (SSL.OP_NO_RENEGOTIATION or 0)
    if mtu_query_off:
        options |= SSL.OP_NO_QUERY_MTU  # a memory BIO has no path MTU: keep the one we set
    ctx.set_options(options)
    # Measured: ~100 KB per idle established session with OpenSSL's read/write buffers kept, far less without.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # No session cache and no tickets: a resumed session would skip the certificate check against a newer CRL.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        ctx.use_certificate_chain_file(str(material.cert))
    except SSL.Error as exc:
        raise ConfigError("tls.cert", f"cannot load {material.cert}: {_first(exc)}") from None
    try:
        ctx.use_privatekey_file(str(material.key))
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError("tls.key", f"cannot load {material.key} (or it does not match tls.cert): "
                                     f"{_first(exc)}") from None
    try:
        ctx.load_verify_locations(str(material.ca))
    except SSL.Error as exc:
        raise ConfigError("tls.ca", f"cannot load {material.ca}: {_first(exc)}") from None
    if material.crl is not None:
        store = ctx.get_cert_store()
        assert store is not None
        for crl in load_crls(material.crl, material.ca):  # the same checks as the MQTT listener's
            store.add_crl(crl)
        # Leaf only, as the MQTT listener (ssl.VERIFY_CRL_CHECK_LEAF): the device's own certificate at each handshake.
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    ctx.set_cookie_generate_callback(cookie_generate)
    ctx.set_cookie_verify_callback(cookie_verify)
    if psk is not None:
        _enable_psk(ctx, psk)
    return ctx


def _enable_psk(ctx: SSL.Context, lookup: PSKLookup) -> None:
    """A PSK handshake has no CertificateRequest, so VERIFY_FAIL_IF_NO_PEER_CERT does not apply to it; the lookup
    (registry identity and key) is then the whole authentication."""

    def callback(ssl: Any, identity: Any, out: Any, max_len: int) -> int:
        try:
            conn = SSL.Connection._reverse_mapping[ssl]
            key = lookup(conn, _ffi.string(identity).decode("utf-8"))
            if not key or len(key) > max_len:
                return 0
            _ffi.memmove(out, key, len(key))
            return len(key)
        except Exception:  # noqa: BLE001 - an exception must not cross into OpenSSL: refuse instead
            return 0

    handle = _ffi.callback("unsigned int (*)(SSL *, const char *, unsigned char *, unsigned int)", callback)
    ctx._edgegw_psk_callback = handle  # type: ignore[attr-defined]  # keeps the cffi callback alive
    _lib.SSL_CTX_set_psk_server_callback(ctx._context, handle)
    ctx.set_cipher_list(PSK_CIPHERS)


def _first(exc: SSL.Error) -> str:
    args: Any = exc.args[0] if exc.args else None
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        return str(args[0][-1])
    return str(exc)


def identity_from_certificate(cert: x509.Certificate) -> DeviceIdentity | None:
    """The device identity of a verified peer certificate: its single CN (same rule as ``identity.py``)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        return None
    # Same text forms as ssl.getpeercert(): serial in upper-case hex of even length, notAfter in OpenSSL's format.
    serial = format(cert.serial_number, "X")
    if len(serial) % 2:
        serial = "0" + serial
    not_after: datetime = cert.not_valid_after_utc
    return DeviceIdentity(names[0].value, serial, not_after.strftime("%b %e %H:%M:%S %Y GMT"))
