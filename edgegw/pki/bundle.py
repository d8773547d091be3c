"""Batch issuance from a CSV into one bundle per device, and the uplink key with a CSR for the cloud's CA.

A bundle (folder ``OUT/<id>/`` or file ``OUT/<id>.tar.gz``) holds everything a device needs::

    device.crt    its certificate (leaf only)
    device.key    its private key (0600)
    chain.pem     the certificate followed by the intermediate, if any: what the device presents
    ca.crt        the trust anchor that verifies the gateway's certificate (the root with an intermediate PKI)
    settings.json host, ports, client id, topic, CoAP path, file names
    mqtt.sh       a ready mosquitto_pub command line (MQTT over TLS)
    coap.sh       a ready coap-client-openssl command line (CoAP over TLS, coaps+tcp)
    coap-dtls.sh  the same over DTLS (coaps, UDP)

The scripts run as they are against a gateway with ``[coap] enabled`` (and ``dtls = true``); tests/
test_provisioning.py runs them. CoAP paths are relative to the device's namespace (``/ps/telemetry`` publishes to
``devices/<id>/telemetry``, docs/COAP.md).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from edgegw.errors import PKIError

from ._keys import KEY_TYPES, hash_for, key_pem, new_key
from ._store import (
    CA_CERT,
    CLIENTS_DIR,
    KEY_MODE,
    ROOT_CERT,
    CertPaths,
    check_name,
    refuse_existing,
    write_file,
)
from .ca import issue_devices


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One CSV line; a field is None when its column is absent, so re-issuing from an id-only CSV (renewal) keeps
    what the registry holds."""

    id: str
    group: str | None
    tenant: str | None
    metadata: dict[str, Any] | None

    def registry_fields(self) -> dict[str, Any]:
        return {k: v for k, v in (("group", self.group), ("tenant", self.tenant), ("metadata", self.metadata))
                if v is not None}


def read_csv(path: Path) -> list[DeviceRow]:
    """Columns ``id`` (required), ``group``, ``tenant``, ``metadata`` (a JSON object); a header row is required."""
    rows: list[DeviceRow] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            raise PKIError(f"{path}: the first line must be a header with an 'id' column (id,group,tenant,metadata)")
        columns = set(reader.fieldnames)
        unknown = columns - {"id", "group", "tenant", "metadata"}
        if unknown:
            raise PKIError(f"{path}: unknown column(s) {', '.join(sorted(unknown))}")
        for n, row in enumerate(reader, start=2):
            device_id = (row.get("id") or "").strip()
            try:
                check_name("device id", device_id)
            except PKIError as exc:
                raise PKIError(f"{path}:{n}: {exc}") from None
            raw_meta = (row.get("metadata") or "").strip()
            try:
                metadata = json.loads(raw_meta) if raw_meta else {}
            except ValueError as exc:
                raise PKIError(f"{path}:{n}: metadata is not JSON: {exc}") from None
            if not isinstance(metadata, dict):
                raise PKIError(f"{path}:{n}: metadata must be a JSON object, got {raw_meta!r}")
            rows.append(DeviceRow(device_id, _cell(row, columns, "group"), _cell(row, columns, "tenant"),
                                  metadata if "metadata" in columns else None))
    return rows


def _cell(row: dict[str, str | None], columns: set[str], column: str) -> str | None:
    return (row.get(column) or "").strip() if column in columns else None


class Progress:
    """``[#####.....] 500/1000 dev-0499`` on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self._last = 0.0

    def step(self, label: str) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= 0.1 or self.done == self.total:
            self._last = now
            width = 30
            filled = width * self.done // max(self.total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label[:40]:<40}")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def batch_issue(pki_dir: Path, csv_path: Path, out: Path, *, host: str, mqtt_port: int = 8883,
                coap_port: int = 5684, coap_dtls_port: int = 5684, tar: bool = False, days: int = 825,
                key_type: str = "ec", force: bool = False,
                progress: Progress | None = None) -> list[dict[str, str]]:
    """Issue, register (group, tenant, metadata) and bundle every device of ``csv_path``. All ids are checked
    before anything is written."""
    pki_dir, out = Path(pki_dir), Path(out)
    _check_target(host, {"--mqtt-port": mqtt_port, "--coap-port": coap_port, "--coap-dtls-port": coap_dtls_port})
    rows = read_csv(csv_path)
    if not rows:
        raise PKIError(f"{csv_path}: no devices")
    by_id = {r.id: r for r in rows}
    if len(by_id) != len(rows):
        raise PKIError(f"{csv_path}: a device id appears more than once")
    if not force:
        for r in rows:
            target = out / (f"{r.id}.tar.gz" if tar else r.id)
            if target.exists():
                raise PKIError(f"refusing to overwrite {target}: pass --force to replace it")
    anchor = pki_dir / ROOT_CERT if (pki_dir / ROOT_CERT).exists() else pki_dir / CA_CERT
    anchor_pem = anchor.read_bytes() if anchor.exists() else b""
    progress = progress or Progress(len(rows))
    written: list[dict[str, str]] = []

    def on_issued(device_id: str, paths: CertPaths) -> None:
        target = _write_bundle(out, device_id, paths, anchor_pem, host, (mqtt_port, coap_port, coap_dtls_port), tar)
        written.append({"id": device_id, "bundle": str(target)})
        progress.step(device_id)

    fields = {r.id: r.registry_fields() for r in rows}
    issue_devices(pki_dir, [r.id for r in rows], days=days, key_type=key_type, force=force, on_issued=on_issued,
                  registry_fields=fields)
    return written


def _check_target(host: str, ports: dict[str, int]) -> None:
    # The host goes into shell scripts and URIs: a typo must fail here, not in a device's first connection.
    if not host or any(c.isspace() or c in "/'\"\\$`;&|<>()[]{}" for c in host.strip("[]")):
        raise PKIError(f"invalid --host {host!r}: a host name or IP address")
    for flag, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise PKIError(f"invalid {flag} {port!r}: must be 1 .. 65535")


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _write_bundle(out: Path, device_id: str, paths: CertPaths, anchor_pem: bytes, host: str,
                  ports: tuple[int, int, int], tar: bool) -> Path:
    mqtt_port, coap_port, coap_dtls_port = ports
    chain = paths.cert.read_bytes()
    leaf = x509.load_pem_x509_certificate(chain).public_bytes(serialization.Encoding.PEM)
    topic = f"devices/{device_id}/telemetry"
    # CoAP publishes are relative to the device's own namespace: /ps/telemetry -> devices/<id>/telemetry.
    coap_path = "/ps/telemetry"
    settings = {"id": device_id, "host": host, "mqtt_port": mqtt_port, "coap_port": coap_port,
                "coap_dtls_port": coap_dtls_port, "client_id": device_id, "topic": topic, "coap_path": coap_path,
                "cert": "device.crt", "chain": "chain.pem", "key": "device.key", "ca": "ca.crt"}
    mqtt = (f"mosquitto_pub -h {shlex.quote(host)} -p {mqtt_port} --cafile ca.crt --cert chain.pem "
            f"--key device.key -i {shlex.quote(device_id)} -q 1 -t {shlex.quote(topic)} -m '{{\"hello\":1}}'")
    coap = ("coap-client-openssl -B 5 -c chain.pem -j device.key -C ca.crt -m post -t json "
            "-e '{\"hello\":1}' ")
    uri = _uri_host(host)
    script = "#!/bin/sh\n# Run from anywhere; extra arguments are passed on.\ncd \"$(dirname \"$0\")\" || exit 1\n"
    # libcoap (4.3) sends only the first certificate of chain.pem: with an intermediate CA the gateway's tls.ca
    # must hold it (ca-chain.pem), or the handshake fails with "unable to get local issuer certificate".
    coap_note = "# coap-client-openssl exits 0 even when nothing was sent: read its output (empty = 2.01).\n"
    files: list[tuple[str, bytes, int]] = [
        ("device.crt", leaf, 0o644), ("device.key", paths.key.read_bytes(), KEY_MODE), ("chain.pem", chain, 0o644),
        ("ca.crt", anchor_pem, 0o644), ("settings.json", (json.dumps(settings, indent=2) + "\n").encode(), 0o644),
        ("mqtt.sh", f"{script}exec {mqtt} \"$@\"\n".encode(), 0o755),
        ("coap.sh", (f"{script}{coap_note}exec {coap}\"$@\" "
                     f"{shlex.quote(f'coaps+tcp://{uri}:{coap_port}{coap_path}')}\n").encode(), 0o755),
        ("coap-dtls.sh", (f"{script}{coap_note}exec {coap}\"$@\" "
                          f"{shlex.quote(f'coaps://{uri}:{coap_dtls_port}{coap_path}')}\n").encode(), 0o755),
    ]
    out.mkdir(parents=True, exist_ok=True)
    if tar:
        target = out / f"{device_id}.tar.gz"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for name, data, mode in files:
                info = tarfile.TarInfo(f"{device_id}/{name}")
                info.size, info.mode, info.mtime = len(data), mode, int(time.time())
                t.addfile(info, io.BytesIO(data))
        write_file(target, buf.getvalue(), KEY_MODE)  # holds a private key
        return target
    target = out / device_id
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    for name, data, mode in files:
        write_file(target / name, data, mode)
    return target


def uplink_csr(pki_dir: Path, name: str, *, common_name: str | None = None, key_type: str = "ec",
               force: bool = False) -> CertPaths:
    """``clients/<name>.key`` and ``clients/<name>.csr`` for the cloud's CA; put its answer in ``<name>.crt``."""
    check_name("client name", name)
    key_path = Path(pki_dir) / CLIENTS_DIR / f"{name}.key"
    csr_path = key_path.with_suffix(".csr")
    if not force:
        refuse_existing(CertPaths(csr_path, key_path))
    key = new_key(key_type)
    cn = common_name or name
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hash_for(key)))
    write_file(key_path, key_pem(key), KEY_MODE)
    write_file(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return CertPaths(csr_path, key_path)


# --- argparse ----------------------------------------------------------------------------------------------


def add_bundle_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    from .cli import _days

    batch = commands.add_parser("batch", parents=[common],
                                help="issue and register the devices of a CSV, one bundle per device")
    batch.add_argument("pki_dir", metavar="DIR", type=Path)
    batch.add_argument("pki_csv", metavar="CSV", type=Path, help="columns: id,group,tenant,metadata (JSON)")
    batch.add_argument("--out", dest="pki_out", type=Path, required=True, metavar="FOLDER")
    batch.add_argument("--host", dest="pki_host", required=True,
                       help="the gateway host name devices connect to (a SAN of its server certificate)")
    batch.add_argument("--mqtt-port", dest="pki_mqtt_port", type=int, default=8883)
    batch.add_argument("--coap-port", dest="pki_coap_port", type=int, default=5684, help="coaps+tcp (coap.port)")
    batch.add_argument("--coap-dtls-port", dest="pki_coap_dtls_port", type=int, default=5684,
                       help="coaps over UDP (coap.dtls_port)")
    batch.add_argument("--tar", dest="pki_tar", action="store_true", help="FOLDER/ID.tar.gz instead of FOLDER/ID/")
    batch.add_argument("--days", dest="pki_days", type=_days, default=825, metavar="N")
    batch.add_argument("--key-type", dest="pki_key_type", choices=KEY_TYPES, default="ec")
    batch.set_defaults(func=_cmd_batch)

    up = commands.add_parser("uplink-csr", parents=[common],
                             help="the uplink key and a CSR for the cloud's CA: DIR/clients/NAME.key/.csr")
    up.add_argument("pki_dir", metavar="DIR", type=Path)
    up.add_argument("pki_name", metavar="NAME")
    up.add_argument("--cn", dest="pki_cn", default=None, help="subject CN (default: NAME)")
    up.add_argument("--key-type", dest="pki_key_type", choices=KEY_TYPES, default="ec")
    up.set_defaults(func=_cmd_uplink_csr)


def _cmd_batch(args: argparse.Namespace) -> int:
    from .cli_lifecycle import run

    return run(args, lambda: batch_issue(
        args.pki_dir, args.pki_csv, args.pki_out, host=args.pki_host, mqtt_port=args.pki_mqtt_port,
        coap_port=args.pki_coap_port, coap_dtls_port=args.pki_coap_dtls_port, tar=args.pki_tar, days=args.pki_days, key_type=args.pki_key_type,
        force=args.pki_force), lambda r: "".join(f"wrote {i['bundle']}\n" for i in r))


def _cmd_uplink_csr(args: argparse.Namespace) -> int:
    from .cli_lifecycle import run

    def action() -> dict[str, str]:
        p = uplink_csr(args.pki_dir, args.pki_name, common_name=args.pki_cn, key_type=args.pki_key_type,
                       force=args.pki_force)
        return {"name": args.pki_name, "csr": str(p.cert), "key": str(p.key)}

    return run(args, action, lambda r: f"wrote {r['key']}\nwrote {r['csr']}\n")
