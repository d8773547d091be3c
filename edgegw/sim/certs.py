"""Device identities (certificate, key, trust anchor) found in a folder, whichever way ``edgegw pki`` wrote it.

Accepted layouts (see edgegw/pki/bundle.py and ``edgegw pki issue``):

- a batch folder of bundles: ``FOLDER/<id>/chain.pem`` (or ``device.crt``), ``device.key``, ``ca.crt``;
- a batch folder of ``FOLDER/<id>.tar.gz`` bundles (unpacked into a private temporary folder);
- one bundle folder (``FOLDER/device.key``);
- a PKI folder: ``FOLDER/devices/<id>.crt`` and ``.key``, anchor ``FOLDER/ca.crt`` (``root-ca.crt`` with an
  intermediate: OpenSSL wants a chain up to a self-signed root).

The SSLContext of a device is built from the files when it is needed (:func:`device_context`); the anchor's PEM is
read once per file and handed over as ``cadata``, so a thousand devices do not parse the same file a thousand times.
"""

from __future__ import annotations

import json
import ssl
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edgegw.errors import ConfigError
from edgegw.pki._store import ROOT_CERT


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    device_id: str
    cert: Path  # what the device presents: the chain when the bundle has one
    key: Path
    ca: Path  # trust anchor for the gateway's certificate
    settings: dict[str, object] | None = None  # the bundle's settings.json (host, ports, topic), if any


def find_identities(folder: Path, *, ca: Path | None = None, key: str = "devices.certs",
                    unpack_dir: Path | None = None) -> list[DeviceIdentity]:
    """Every device identity under ``folder``, sorted by id. ``ca`` overrides each bundle's anchor. Tar bundles
    are unpacked under ``unpack_dir`` (default: a new private temp folder, left for the OS to clean)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(key, f"{folder} is not a folder")
    if (folder / "device.key").is_file():
        found = [_bundle(folder, ca, key)]
    elif (folder / "devices").is_dir():
        found = _pki_dir(folder, ca, key)
    else:
        found = [_bundle(d, ca, key) for d in sorted(folder.iterdir()) if (d / "device.key").is_file()]
        tars = sorted(folder.glob("*.tar.gz"))
        if tars:
            target = unpack_dir or Path(tempfile.mkdtemp(prefix="edgegw-sim-bundles-"))
            for archive in tars:
                found.append(_bundle(_unpack(archive, target, key), ca, key))
    if not found:
        raise ConfigError(key, f"no device certificates in {folder} (want bundles from `edgegw pki batch` or a "
                               "PKI folder with devices/<id>.crt and .key)")
    found.sort(key=lambda d: d.device_id)
    return found


def device_context(identity: DeviceIdentity) -> ssl.SSLContext:
    """A client context for mutual TLS presenting ``identity``: TLS >= 1.2, only its anchor trusted."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=_pem(identity.ca))
    try:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("devices.certs", f"cannot load {identity.cert} with {identity.key}: {exc}") from exc
    return ctx


@lru_cache(maxsize=64)
def _pem(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError("devices.ca", f"cannot read {path}: {exc}") from exc


def _bundle(folder: Path, ca: Path | None, key: str) -> DeviceIdentity:
    cert = folder / "chain.pem" if (folder / "chain.pem").is_file() else folder / "device.crt"
    anchor = ca or folder / "ca.crt"
    settings: dict[str, object] | None = None
    if (folder / "settings.json").is_file():
        try:
            loaded = json.loads((folder / "settings.json").read_text())
        except ValueError as exc:
            raise ConfigError(key, f"{folder / 'settings.json'}: not JSON: {exc}") from None
        settings = loaded if isinstance(loaded, dict) else None
    device_id = str((settings or {}).get("client_id") or folder.name)
    for path in (cert, folder / "device.key", anchor):
        if not path.is_file():
            raise ConfigError(key, f"bundle {folder}: {path.name} is missing")
    return DeviceIdentity(device_id, cert, folder / "device.key", anchor, settings)


def _pki_dir(folder: Path, ca: Path | None, key: str) -> list[DeviceIdentity]:
    anchor = ca or next((p for p in (folder / ROOT_CERT, folder / "ca.crt") if p.is_file()), folder / "ca.crt")
    if not anchor.is_file():
        raise ConfigError(key, f"{folder}: no ca.crt (pass the gateway's CA with --ca)")
    return [DeviceIdentity(crt.stem, crt, crt.with_suffix(".key"), anchor)
            for crt in sorted((folder / "devices").glob("*.crt")) if crt.with_suffix(".key").is_file()]


def _unpack(archive: Path, target: Path, key: str) -> Path:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(target, filter="data")  # no absolute paths, links or devices out of a bundle
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(key, f"cannot unpack {archive}: {exc}") from exc
    folder = target / archive.name.removesuffix(".tar.gz")
    if not (folder / "device.key").is_file():
        raise ConfigError(key, f"{archive}: not an edgegw bundle (no {folder.name}/device.key inside)")
    return folder
