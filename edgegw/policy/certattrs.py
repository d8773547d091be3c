"""Device classes (tenant, group/tier) read from the device's verified certificate, the same way for every ingress.

A source is written ``cert-o``, ``cert-ou`` or ``cert:NAME`` where NAME is an X.520 attribute of the subject by its
short or long name (``OU``, ``organizationalUnitName``, ``title``, ``UID``, ``businessCategory``...) or a dotted OID
(``1.3.6.1.4.1.99999.1`` for a private attribute). Inside, every attribute is compared by OID, so the MQTT listener
(``SSLObject.getpeercert()``: OpenSSL's long names) and the DTLS transport (pyOpenSSL/cryptography: OIDs) agree.

:func:`peercert_of` gives the ``getpeercert()``-shaped subject of any CoAP remote (coaps+tcp connection or DTLS
session); :class:`Subjects` remembers the subject a device last presented, so the limiter (asked per device, not
per message) classifies a CoAP device like an MQTT one. Imports nothing from edgegw but the errors, so config
parsing can use :func:`attribute_oid`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from edgegw.errors import ConfigError

# (dotted OID, OpenSSL long name, other names); compared case-insensitively.
_NAMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("2.5.4.3", "commonName", ("CN",)),
    ("2.5.4.4", "surname", ("SN",)),
    ("2.5.4.5", "serialNumber", ()),
    ("2.5.4.6", "countryName", ("C",)),
    ("2.5.4.7", "localityName", ("L",)),
    ("2.5.4.8", "stateOrProvinceName", ("ST",)),
    ("2.5.4.9", "streetAddress", ("street",)),
    ("2.5.4.10", "organizationName", ("O",)),
    ("2.5.4.11", "organizationalUnitName", ("OU",)),
    ("2.5.4.12", "title", ()),
    ("2.5.4.13", "description", ()),
    ("2.5.4.15", "businessCategory", ()),
    ("2.5.4.17", "postalCode", ()),
    ("2.5.4.42", "givenName", ("GN",)),
    ("2.5.4.43", "initials", ()),
    ("2.5.4.44", "generationQualifier", ()),
    ("2.5.4.45", "x500UniqueIdentifier", ()),
    ("2.5.4.46", "dnQualifier", ()),
    ("2.5.4.65", "pseudonym", ()),
    ("2.5.4.97", "organizationIdentifier", ()),
    ("0.9.2342.19200300.100.1.1", "userId", ("UID",)),
    ("0.9.2342.19200300.100.1.25", "domainComponent", ("DC",)),
    ("1.2.840.113549.1.9.1", "emailAddress", ()),
)
_OID_OF: dict[str, str] = {}
for _oid, _long, _others in _NAMES:
    for _name in (_long, *_others, _oid):
        _OID_OF[_name.lower()] = _oid
_LONG_OF = {oid: long for oid, long, _ in _NAMES}
_SHORTHANDS = {"cert-o": "2.5.4.10", "cert-ou": "2.5.4.11"}


def attribute_oid(key: str, source: str) -> str | None:
    """The OID a source reads (``cert-o``, ``cert-ou``, ``cert:NAME``), None for non-certificate sources.
    ConfigError naming ``key`` for an unknown name or a malformed OID."""
    if source in _SHORTHANDS:
        return _SHORTHANDS[source]
    if not source.startswith("cert:"):
        return None
    name = source[5:].strip()
    oid = _OID_OF.get(name.lower())
    if oid is not None:
        return oid
    parts = name.split(".")
    if len(parts) >= 2 and all(p.isdigit() for p in parts) and parts[0] in ("0", "1", "2"):
        return name
    raise ConfigError(key, f"cert:NAME needs an X.520 attribute name (O, OU, title, UID, ...) or a dotted OID, "
                           f"got {name!r}")


def subject_value(peercert: Mapping[str, Any] | None, oid: str) -> str | None:
    """The single value of attribute ``oid`` in a ``getpeercert()``-shaped subject; None when absent or ambiguous
    (two values would make the class depend on an order)."""
    if not peercert:
        return None
    values = [value for rdn in peercert.get("subject", ()) for (key, value) in rdn
              if _OID_OF.get(str(key).lower(), key) == oid]
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


def peercert_of(remote: Any) -> dict[str, Any] | None:
    """The verified client certificate's subject of a CoAP remote, shaped like ``SSLObject.getpeercert()``: a
    coaps+tcp connection (its TLS transport) or a DTLS session (pyOpenSSL); None for anything else (lab)."""
    transport = getattr(remote, "_transport", None)
    if transport is not None:
        ssl_object = transport.get_extra_info("ssl_object")
        return ssl_object.getpeercert() if ssl_object is not None else None
    session = getattr(remote, "_session", None)
    conn = getattr(session, "conn", None)
    if conn is None:
        return None
    cert = conn.get_peer_certificate()
    if cert is None:
        return None
    subject = cert.to_cryptography().subject
    return {"subject": tuple(((_LONG_OF.get(a.oid.dotted_string, a.oid.dotted_string), a.value),) for a in subject)}


class Subjects:
    """The certificate subject each device last presented (any ingress), by device id: what the limiter's
    classifier reads. Updated once per certificate (the serial changes), never parsed per message. Bounded."""

    MAX = 100_000

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._by_device: dict[str, tuple[str, Mapping[str, Any] | None]] = {}
        self.on_change = on_change
        """Called when a known device comes back with a different subject (its classes may have changed)."""

    def note(self, device_id: str, serial: str, peercert: Callable[[], Mapping[str, Any] | None]) -> None:
        known = self._by_device.get(device_id)
        if known is not None and known[0] == serial:
            return
        cert = peercert()
        subject = {"subject": cert.get("subject", ())} if cert else None
        if len(self._by_device) >= self.MAX and known is None:
            self._by_device.clear()
        self._by_device[device_id] = (serial, subject)
        if known is not None and known[1] != subject and self.on_change is not None:
            self.on_change()

    def note_remote(self, device_id: str, remote: Any) -> None:
        """The CoAP site's hook, before the limiter is asked: the certificate of a coaps+tcp or DTLS remote."""
        identity = getattr(remote, "device_identity", None)
        if identity is not None and identity.serial:
            self.note(device_id, identity.serial, lambda: peercert_of(remote))

    def peercert(self, device_id: str) -> Mapping[str, Any] | None:
        known = self._by_device.get(device_id)
        return known[1] if known is not None else None

    def serial(self, device_id: str) -> str:
        known = self._by_device.get(device_id)
        return known[0] if known is not None else ""

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._by_device
