"""The device-facing credentials of a running gateway, and their reload without dropping sessions.

:class:`Credentials` owns what decides who may connect: the server certificate and key, the CA bundle, the CRL
(``tls.*``) and the registry snapshot (``registry.path``). On SIGHUP, or when one of those files changes (polled
every ``tls.reload_interval`` seconds), it builds a complete NEW :class:`ssl.SSLContext` and only then assigns it to
the ``ssl_context`` of every attached listener (MQTT, CoAP): new handshakes use it, established sessions keep
theirs (and a fresh context also has a fresh session cache, so nothing resumes past a new CRL). Material that does
not load (a truncated key, a CRL not signed by the CA, an expired CRL, ...) is refused with ``tls.reload_failed``
naming the file, and the running material stays. After a successful reload, live sessions of devices whose
certificate the CRL now revokes, or which the registry says are suspended or revoked, are closed (MQTT 5:
DISCONNECT 0x87; CoAP: the connection is closed after an RFC 8323 Abort).

For a metrics module: :attr:`Credentials.server_cert_not_after`, :attr:`soonest_device_not_after` (from the
registry; None without one) and :attr:`crl_next_update` (datetimes, UTC), reachable as ``Gateway.credentials``.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog
from cryptography import x509

from edgegw.config import RegistrySettings, TLSSettings
from edgegw.errors import ConfigError
from edgegw.identity import DeviceIdentity, server_ssl_context
from edgegw.mqtt.packets import ReasonCode

from .store import DeviceState, RegistryError, blocked_devices, soonest_device_expiry

log = structlog.get_logger("edgegw.credentials")

Fingerprint = tuple[tuple[str, int, int, int] | None, ...]


class _Material:
    """Everything loaded from the files, checked; building it never touches the running server."""

    def __init__(self, tls: TLSSettings, registry: Path | None) -> None:
        crls = load_crls(tls.crl, tls.ca) if tls.crl is not None else []  # first: its errors name tls.crl
        self.context = _build_context(tls)
        self.server_not_after = _load_cert(tls.cert, "tls.cert").not_valid_after_utc
        self.revoked: frozenset[int] = frozenset()
        self.crl_next_update: datetime | None = None
        if crls:
            self.revoked = frozenset(r.serial_number for crl in crls for r in crl)
            updates = [c.next_update_utc for c in crls if c.next_update_utc is not None]
            self.crl_next_update = min(updates) if updates else None
        self.blocked: dict[str, tuple[DeviceState, str]] = {}
        self.soonest_device: datetime | None = None
        if registry is not None:
            if not registry.exists():
                raise ConfigError("registry.path", f"{registry} does not exist (`edgegw pki init` creates it)")
            try:
                self.blocked = blocked_devices(registry)
            except RegistryError as exc:
                raise ConfigError("registry.path", str(exc)) from None
            self.soonest_device = soonest_device_expiry(registry)


def _build_context(tls: TLSSettings) -> ssl.SSLContext:
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key), ("tls.ca", tls.ca), ("tls.crl", tls.crl)):
        if path is not None and not path.is_file():
            raise ConfigError(key, f"certificate material not found: {path}")
    try:
        return server_ssl_context(tls)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError("tls", f"cannot load certificate material: {exc}") from None


def _load_cert(path: Path, key: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot read {path}: {exc}") from None


def load_crls(path: Path, ca_path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL in ``path`` (one per issuing CA), each checked against ``tls.ca``: readable, signed by its CA,
    not expired. Errors name the key (``tls.crl`` / ``tls.ca``). The MQTT and the DTLS listeners load through this."""
    marker = b"-----BEGIN X509 CRL-----"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("tls.crl", f"cannot read {path}: {exc}") from None
    blocks = [marker + part for part in data.split(marker)[1:]]
    if not blocks:
        raise ConfigError("tls.crl", f"{path} holds no PEM CRL")
    try:
        cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError("tls.ca", f"cannot read {ca_path}: {exc}") from None
    return [_check_crl(block, path, ca_path, cas) for block in blocks]


def _check_crl(block: bytes, path: Path, ca_path: Path, cas: list[x509.Certificate]) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(block)
    except ValueError as exc:
        raise ConfigError("tls.crl", f"{path} is not a PEM CRL: {exc}") from None
    # A CRL from another CA, or an expired one, would make OpenSSL refuse every device: refuse the CRL instead.
    issuers = [c for c in cas if c.subject == crl.issuer]
    if issuers and not any(_signed_by(crl, c) for c in issuers):
        raise ConfigError("tls.crl", f"{path} is not signed by the CA {crl.issuer.rfc4514_string()} in {ca_path}")
    if not issuers:
        # tls.ca is the root and devices send their intermediate: OpenSSL checks the CRL against the intermediate
        # in the presented chain at each handshake, but here its signature cannot be checked in advance.
        log.warning("tls.crl_issuer_not_in_ca_bundle", crl=str(path), issuer=crl.issuer.rfc4514_string(),
                    hint="use the bundle (ca-chain.pem) as tls.ca so a wrong CRL is refused at load")
    if crl.next_update_utc is not None and crl.next_update_utc <= datetime.now(UTC):
        raise ConfigError("tls.crl", f"{path} expired on {crl.next_update_utc:%Y-%m-%d %H:%M} UTC "
                                     "(every device would be refused): run `edgegw pki crl DIR`")
    return crl


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


class Credentials:
    def __init__(self, tls: TLSSettings, registry: RegistrySettings) -> None:
        self.tls = tls
        self.registry_path = registry.path
        self.server: object | None = None
        """The first listener attached (the MQTTServer), kept for callers that expect one."""
        self.listeners: list[object] = []
        self._material: _Material | None = None
        self._fingerprint: Fingerprint = ()
        self.reloads = 0
        self.reload_failures = 0

    # --- what a metrics module reads ----------------------------------------------------------------------

    @property
    def server_cert_not_after(self) -> datetime | None:
        return self._material.server_not_after if self._material else None

    @property
    def soonest_device_not_after(self) -> datetime | None:
        return self._material.soonest_device if self._material else None

    @property
    def crl_next_update(self) -> datetime | None:
        return self._material.crl_next_update if self._material else None

    # --- start, authorize, reload -------------------------------------------------------------------------

    def load(self) -> ssl.SSLContext:
        """The first load, at start: raises ConfigError naming the key."""
        self._fingerprint = self._stat()
        self._material = _Material(self.tls, self.registry_path)
        return self._material.context

    def attach(self, server: object) -> None:
        """Manage one more device-facing listener: its ``authorizer`` is set now; on every successful reload its
        ``ssl_context`` is replaced and the devices no longer allowed are closed. The MQTTServer's live sessions
        are walked here (``devices`` / ``disconnect_device``); any other listener (CoAP) says itself whom it closed
        through ``close_refused(authorize) -> list[device_id]``."""
        if self.server is None:
            self.server = server
        self.listeners.append(server)
        server.authorizer = self.authorize  # type: ignore[attr-defined]

    def authorize(self, identity: DeviceIdentity) -> str | None:
        material = self._material
        if material is None:
            return None
        blocked = material.blocked.get(identity.device_id)
        if blocked is not None:
            state, reason = blocked
            return f"device is {state} in the registry" + (f": {reason}" if reason else "")
        if _serial(identity.serial) in material.revoked:
            return "certificate revoked (CRL)"
        return None

    def reload(self, trigger: str) -> bool:
        """Load everything again; on success swap it in and close what it no longer allows. False if refused."""
        fingerprint = self._stat()
        previous, self._fingerprint = self._fingerprint, fingerprint  # a broken file is reported once, not per poll
        try:
            material = _Material(self.tls, self.registry_path)
        except ConfigError as exc:
            if "locked" in str(exc):
                self._fingerprint = previous  # `pki batch` is writing the registry: try again at the next poll
            self.reload_failures += 1
            log.error("tls.reload_failed", trigger=trigger, reason=str(exc), key=exc.key,
                      kept="the running certificate material, CRL and registry")
            return False
        self._material = material
        self.reloads += 1
        closed: list[str] = []
        for server in self.listeners:
            server.ssl_context = material.context  # type: ignore[attr-defined]
            close_refused = getattr(server, "close_refused", None)
            if close_refused is not None:
                closed += close_refused(self.authorize)
                continue
            for key, proto in list(server.devices.items()):  # type: ignore[attr-defined]
                identity = getattr(proto, "identity", None)
                if getattr(proto, "lab", False) or identity is None:
                    continue
                refusal = self.authorize(identity)
                if refusal is not None:
                    server.disconnect_device(key, ReasonCode.NOT_AUTHORIZED, refusal)  # type: ignore[attr-defined]
                    log.warning("tls.session_closed", device_id=identity.device_id, reason=refusal)
                    closed.append(identity.device_id)
        log.info("tls.reloaded", trigger=trigger, revoked_serials=len(material.revoked),
                 blocked_devices=len(material.blocked), sessions_closed=len(closed),
                 server_cert_not_after=material.server_not_after.isoformat(),
                 crl_next_update=material.crl_next_update.isoformat() if material.crl_next_update else None)
        return True

    def changed(self) -> bool:
        return self._stat() != self._fingerprint

    async def watch(self, sleep: Callable[[float], object] = asyncio.sleep) -> None:
        """Poll the files every ``tls.reload_interval`` seconds; reload when one changed. Runs until cancelled."""
        interval = self.tls.reload_interval
        if interval <= 0:
            return
        while True:
            await sleep(interval)  # type: ignore[misc]
            if self.changed():
                try:
                    self.reload("file change")
                except Exception as exc:  # never let a reload bug take the gateway down
                    log.exception("tls.reload_crashed", error=repr(exc))

    def _stat(self) -> Fingerprint:
        paths = [self.tls.cert, self.tls.key, self.tls.ca, self.tls.crl, self.registry_path]
        out: list[tuple[str, int, int, int] | None] = []
        for path in paths:
            if path is None:
                out.append(None)
                continue
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
                continue
            out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)


def _serial(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        return -1
