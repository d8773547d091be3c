"""On-disk layout of a PKI directory, name validation and safe file writes.

Nothing here knows about X.509; ``ca.py`` builds certificates and hands the PEM bytes to
``write_pair``.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from edgegw.errors import PKIError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ROOT_CERT = "root-ca.crt"
ROOT_KEY = "root-ca.key"
CA_CHAIN = "ca-chain.pem"
CRL_FILE = "crl.pem"
DEVICES_DIR = "devices"
SERVER_DIR = "server"
CLIENTS_DIR = "clients"

KEY_MODE = 0o600
CERT_MODE = 0o644

# Ids become file names and MQTT topic levels, so no '/', '+', '#', whitespace, and no
# leading '.' (hidden files, "." and "..").
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
# RFC 5280 ub-common-name: the CN cannot hold more, and cryptography refuses to encode it.
MAX_CN_LEN = 64


@dataclass(frozen=True, slots=True)
class CertPaths:
    cert: Path
    key: Path


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is usable as a device id / server / client name, else raise."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise PKIError(
            f"invalid {kind} {name!r}: use 1-128 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.'"
        )
    if len(name) > MAX_CN_LEN:
        raise PKIError(
            f"invalid {kind} {name!r}: {len(name)} characters, but an X.509 common name "
            f"holds at most {MAX_CN_LEN}"
        )
    return name


def ca_paths(pki_dir: Path) -> CertPaths:
    return CertPaths(cert=pki_dir / CA_CERT, key=pki_dir / CA_KEY)


def leaf_paths(pki_dir: Path, subdir: str, name: str) -> CertPaths:
    base = pki_dir / subdir
    return CertPaths(cert=base / f"{name}.crt", key=base / f"{name}.key")


def refuse_existing(paths: CertPaths) -> None:
    for path in (paths.key, paths.cert):
        if os.path.lexists(path):
            raise PKIError(f"refusing to overwrite {path}: pass --force (force=True) to replace it")


def write_pair(paths: CertPaths, cert_pem: bytes, key_pem: bytes, *, force: bool) -> None:
    """Write key then certificate; never overwrite unless ``force``."""
    paths.cert.parent.mkdir(parents=True, exist_ok=True)
    if force:
        _replace_pair(paths, cert_pem, key_pem)
        return
    refuse_existing(paths)
    _create_new(paths.key, key_pem, KEY_MODE)
    try:
        _create_new(paths.cert, cert_pem, CERT_MODE)
    except BaseException:
        # Don't leave a key without its certificate behind (e.g. a racing issuer won).
        paths.key.unlink(missing_ok=True)
        raise


def write_file(path: Path, data: bytes, mode: int = CERT_MODE) -> None:
    """Replace ``path`` atomically (temp file + rename): a reader sees the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        _create(tmp, data, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create_new(path: Path, data: bytes, mode: int) -> None:
    try:
        _create(path, data, mode)
    except FileExistsError:
        raise PKIError(
            f"refusing to overwrite {path}: pass --force (force=True) to replace it"
        ) from None


def _replace_pair(paths: CertPaths, cert_pem: bytes, key_pem: bytes) -> None:
    # Write fresh files and rename them over the old ones: opening an existing file with
    # O_TRUNC would keep whatever mode it had (a 0644 key would stay world-readable), and a
    # crash mid-write would leave a truncated key where a good one used to be. Both temp
    # files are complete before either rename, so a mismatched pair needs a crash between
    # two renames.
    token = secrets.token_hex(6)
    tmp_key = paths.key.with_name(f".{paths.key.name}.{token}.tmp")
    tmp_cert = paths.cert.with_name(f".{paths.cert.name}.{token}.tmp")
    try:
        _create(tmp_key, key_pem, KEY_MODE)
        _create(tmp_cert, cert_pem, CERT_MODE)
        os.replace(tmp_key, paths.key)
        os.replace(tmp_cert, paths.cert)
    finally:
        tmp_key.unlink(missing_ok=True)
        tmp_cert.unlink(missing_ok=True)


def _create(path: Path, data: bytes, mode: int) -> None:
    # The mode is given to open() so a key is never readable by others, not even between
    # creation and a later chmod. O_EXCL also refuses to follow a planted symlink.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            # umask may have cleared bits we want (a 0644 certificate under umask 077).
            os.fchmod(f.fileno(), mode)
            f.write(data)
    except BaseException:
        # A half-written key (disk full) must not pass for a real one on the next run.
        path.unlink(missing_ok=True)
        raise
