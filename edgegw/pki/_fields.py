"""What goes into a certificate besides keys: validity, subject alternative names, key usage."""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime, timedelta

from cryptography import x509

from edgegw.errors import PKIError

# Edge boxes and devices often boot with a clock that is a little behind; a certificate
# that becomes valid "in 30 seconds" fails the handshake, so validity starts slightly early.
_BACKDATE = timedelta(minutes=5)

# '_' is not hostname syntax, but OpenSSL and Python match it, and socket.gethostname() on
# some boxes returns one (`edgegw init` puts the host name into the server certificate).
_DNS_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_DNS_RE = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*")


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


def _key_usage(*, cert_sign: bool, encipher: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
