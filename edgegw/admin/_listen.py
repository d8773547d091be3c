"""How the admin server listens: its TLS context (HTTPS, optionally client certificates), the Host header names it
accepts when bound to loopback (DNS rebinding), and the host as written in its URL. Split out of
edgegw/admin/app.py, which stays the import path.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain", "ip6-localhost"})


def admin_ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _allowed_hosts(bind: str) -> frozenset[str] | None:
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = bind in ("localhost",)
    return _LOOPBACK_NAMES | {bind} if loopback else None


def _url_host(bind: str) -> str:
    return f"[{bind}]" if ":" in bind else bind
