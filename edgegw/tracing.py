"""W3C Trace Context (https://www.w3.org/TR/trace-context/) at the device edge, kept cheap for the hot path.

Every record gets a ``traceparent`` at ingress: the device's own (MQTT 5 user property ``traceparent``, else a
top-level ``"traceparent"`` field of a small JSON object payload), or a new one (random trace id and parent id,
flags ``01``). It is stored in the record's properties (key ``tp``, docs/MQTT.md), sent upstream as the user
property ``traceparent`` (a frame field in batch frames), and its trace id is in the log lines of the record's
stages (refusal, quarantine, expiry, commit failure) as ``trace_id``.

A device's value is passed on unchanged (the optional span export, edgegw/ops/otel.py, makes our spans its
children and does not rewrite it; docs/OPERATIONS.md). Values that are not a valid version-00 traceparent (or a later version's first 55
characters, as the spec asks) are ignored and a new one is made.
"""

from __future__ import annotations

import json
import random

TRACEPARENT = "traceparent"
PAYLOAD_SCAN_MAX = 4096
"""JSON payloads longer than this are not parsed for a ``traceparent`` field."""

_getrandbits = random.Random().getrandbits  # its own generator, seeded from os.urandom
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def new_traceparent() -> str:
    """``00-{32 hex}-{16 hex}-01`` from 24 random bytes. Python's Mersenne Twister (seeded from the OS at start),
    not ``os.urandom``: a trace id must be unique, not secret, and the syscall per message costs twice as much."""
    h = _getrandbits(192).to_bytes(24, "little").hex()  # Random.randbytes(24), without its Python frame
    if h[:32] == _ZERO_TRACE or h[32:] == _ZERO_SPAN:  # all-zero ids are invalid (never in practice)
        return new_traceparent()
    return f"00-{h[:32]}-{h[32:]}-01"


def parse_traceparent(value: object) -> str | None:
    """The normalised 55-character traceparent, or None if ``value`` is not a valid one."""
    if not isinstance(value, str) or len(value) < 55:
        return None
    version = value[:2]
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    tp = value[:55]
    if (tp[2] != "-" or tp[35] != "-" or tp[52] != "-" or version == "ff"
            or not _HEX.issuperset(version) or not _HEX.issuperset(tp[3:35]) or not _HEX.issuperset(tp[36:52])
            or not _HEX.issuperset(tp[53:55]) or tp[3:35] == _ZERO_TRACE or tp[36:52] == _ZERO_SPAN):
        return None
    return tp if version == "00" else "00" + tp[2:]


def from_user_properties(user: tuple[tuple[str, str], ...]) -> str | None:
    for key, value in user:
        if key == TRACEPARENT:
            return parse_traceparent(value)
    return None


def from_payload(payload: bytes) -> str | None:
    """A top-level ``"traceparent"`` of a small JSON object payload; None otherwise (cheap when absent)."""
    if payload[:1] != b"{" or len(payload) > PAYLOAD_SCAN_MAX or b'"traceparent"' not in payload:
        return None
    try:
        doc = json.loads(payload)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    return parse_traceparent(doc.get(TRACEPARENT)) if isinstance(doc, dict) else None


def trace_id(tp: object) -> str | None:
    """The trace id of a stored ``tp`` (None when absent: records from before tracing)."""
    return tp[3:35] if isinstance(tp, str) and len(tp) == 55 else None


def trace_id_of(properties: bytes | None) -> str | None:
    """The trace id in a record's properties blob, or None (no ``tp``, or undecodable). Not for the hot path."""
    if not properties:
        return None
    try:
        import msgpack

        value = msgpack.unpackb(properties, raw=False)
    except Exception:  # noqa: BLE001 - a damaged blob has no trace id
        return None
    return trace_id(value.get("tp")) if isinstance(value, dict) else None
