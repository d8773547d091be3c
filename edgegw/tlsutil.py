"""TLS contexts built in one place, so every client side of edgegw makes the same choices (TLS >= 1.2, CA pinned)."""

from __future__ import annotations

import ssl
from pathlib import Path

from edgegw.errors import PKIError


def client_ssl_context(ca: Path, cert: Path, key: Path, server_hostname_check: bool = True) -> ssl.SSLContext:
    """A client context for mutual TLS: trust only ``ca``, present ``cert``/``key``, TLS 1.2 or newer.

    ``server_hostname_check=False`` still verifies the server's chain against ``ca`` but not its name (for a lab
    where the upstream is reached by an address its certificate does not list); prefer naming the server instead.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname=True by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise PKIError(f"cannot load CA certificates from {ca}: {exc}") from exc
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise PKIError(f"cannot load client certificate {cert} with key {key}: {exc}") from exc
    if not server_hostname_check:
        ctx.check_hostname = False
    return ctx
