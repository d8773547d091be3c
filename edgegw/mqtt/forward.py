"""What of a device's MQTT 5 PUBLISH properties travels on: to local subscribers, and into the outbox record.

Outbox record ``properties`` (msgpack, only when at least one key is present; ``None`` otherwise):

==========  ==================  =====================================================================
key         msgpack type        meaning (MQTT 5 §3.3.2.3)
==========  ==================  =====================================================================
``"pfi"``   int 0/1             Payload Format Indicator (1: UTF-8 text, checked at ingress)
``"ct"``    str                 Content Type
``"rt"``    str                 Response Topic (as the device sent it: a device topic, not upstream)
``"cd"``    bin                 Correlation Data
``"mei"``   int                 Message Expiry Interval in seconds as received; the message expires at
                                ``received_at + mei`` (the uplink sends the remainder, drops it after)
``"up"``    array of [str,str]  User Properties in order, repeats allowed (a ``traceparent`` one moves to ``tp``)
``"tp"``    str                 W3C ``traceparent`` (55 chars, :mod:`edgegw.tracing`): the device's or made at
                                ingress; absent in records written before tracing and in saved sessions
==========  ==================  =====================================================================

The topic alias, subscription identifiers and anything else the device sent are not carried.
"""

from __future__ import annotations

from typing import Any

import msgpack

from edgegw.mqtt.packets import NO_PROPERTIES, Properties, PropertyId
from edgegw.tracing import TRACEPARENT

_FORWARDED = (PropertyId.PAYLOAD_FORMAT_INDICATOR, PropertyId.MESSAGE_EXPIRY_INTERVAL, PropertyId.CONTENT_TYPE,
              PropertyId.RESPONSE_TOPIC, PropertyId.CORRELATION_DATA)
_KEYS = {
    PropertyId.PAYLOAD_FORMAT_INDICATOR: "pfi",
    PropertyId.CONTENT_TYPE: "ct",
    PropertyId.RESPONSE_TOPIC: "rt",
    PropertyId.CORRELATION_DATA: "cd",
    PropertyId.MESSAGE_EXPIRY_INTERVAL: "mei",
}


def forwarded(props: Properties) -> Properties:
    """The properties a server forwards with the message (MQTT-3.3.2-4/-15/-17/-18): no alias, no sub ids."""
    if not props:
        return NO_PROPERTIES
    values = {pid: props.values[pid] for pid in _FORWARDED if pid in props.values}
    if not values and not props.user:
        return NO_PROPERTIES
    if len(values) == len(props.values) and not props.subscription_ids:
        return props
    return Properties(values=values, user=props.user)


_TP_ONLY = b"\x81\xa2tp\xd9\x37"
"""msgpack of ``{"tp": <str of 55 bytes>}`` up to the string's bytes: the common record, built without msgpack."""


def record_properties(props: Properties, tp: str | None = None) -> bytes | None:
    """msgpack for the outbox record (schema above), or None when nothing is to be carried. ``tp``: a normalised
    55-character traceparent (:mod:`edgegw.tracing`) to store, None for none (saved sessions)."""
    if props is NO_PROPERTIES or not props:  # the identity test first: no __bool__ call for most messages
        return _TP_ONLY + tp.encode() if tp is not None else None
    out: dict[str, Any] = {key: props.values[pid] for pid, key in _KEYS.items() if pid in props.values}
    if props.user:
        if tp is None:
            out["up"] = [list(pair) for pair in props.user]
        else:
            up = [list(pair) for pair in props.user if pair[0] != TRACEPARENT]
            if up:
                out["up"] = up
    if tp is not None:
        out["tp"] = tp
    return msgpack.packb(out, use_bin_type=True) if out else None


def decode_record_properties(data: bytes | None) -> dict[str, Any]:
    """The inverse of :func:`record_properties`, for the uplink and tests (``{}`` for None)."""
    if not data:
        return {}
    value = msgpack.unpackb(data, raw=False)
    if not isinstance(value, dict):
        raise ValueError("record properties are not a msgpack map")
    return value


def properties_from_record(value: dict[str, Any]) -> Properties:
    """The inverse of :func:`record_properties` on the decoded map (used to restore saved sessions)."""
    if not value:
        return NO_PROPERTIES
    values = {pid: value[key] for pid, key in _KEYS.items() if key in value}
    user = tuple((str(k), str(v)) for k, v in value.get("up", ()))
    return Properties(values=values, user=user)
