"""Who a device is: the CN of the client certificate it presented, verified against the fleet CA.

The TLS handshake does the verification (CERT_REQUIRED); this module builds that context and reads the identity out
of a verified peer certificate, and turns handshake failures into a reason an operator can act on.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from edgegw.config import TLSSettings


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    device_id: str
    serial: str
    not_after: str


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS >= 1.2 (or 1.3), client certificate required and verified against the fleet CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(cafile=tls.ca)
    if tls.crl is not None:
        # The CRL goes into the same store; checked for the device's own certificate at every handshake.
        ctx.load_verify_locations(cafile=tls.crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    # Session tickets would let a resumed session skip the certificate check against a reloaded CRL.
    ctx.options |= ssl.OP_NO_TICKET
    # OP_NO_TICKET covers TLS 1.2; TLS 1.3 still issues (and caches the sessions of) two tickets per handshake
    # unless num_tickets is 0 — ~1 KB per idle connection for resumptions we would not want anyway.
    ctx.num_tickets = 0
    return ctx


def identity_from_peercert(peercert: dict | None) -> DeviceIdentity | None:
    """The device identity from ``SSLObject.getpeercert()`` of a verified connection, or None without a CN."""
    if not peercert:
        return None
    common_names = [value for rdn in peercert.get("subject", ()) for (key, value) in rdn if key == "commonName"]
    # Exactly one CN: a certificate with several would make "which device is this" ambiguous.
    if len(common_names) != 1 or not common_names[0]:
        return None
    return DeviceIdentity(common_names[0], str(peercert.get("serialNumber", "")), str(peercert.get("notAfter", "")))


def describe_handshake_error(exc: BaseException) -> str:
    """A short, operator-facing reason for a failed TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate presented"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "CERTIFICATE_VERIFY_FAILED"):
            return f"certificate verification failed ({reason})"
        return f"TLS error: {reason}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionError):
        return f"connection lost during handshake ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"
