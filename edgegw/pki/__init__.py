"""Provisioning: the fleet CA and the certificates it issues (see certs/README.md)."""

from __future__ import annotations

from edgegw.errors import PKIError

from ._store import CertPaths, check_name
from .ca import (
    CA,
    init_ca,
    issue_client,
    issue_device,
    issue_devices,
    issue_server,
    load_ca,
)
from .lifecycle import parse_reason, pki_status, revoke_device, sign_csr, write_crl
from .bundle import batch_issue, uplink_csr

__all__ = [
    "CA",
    "CertPaths",
    "PKIError",
    "check_name",
    "init_ca",
    "issue_client",
    "issue_device",
    "issue_devices",
    "issue_server",
    "load_ca",
    "batch_issue",
    "parse_reason",
    "pki_status",
    "revoke_device",
    "sign_csr",
    "uplink_csr",
    "write_crl",
]
