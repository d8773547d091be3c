"""Batch frames: many outbox records in one upstream PUBLISH (``uplink.batch_max_records`` > 1).

A frame is published at QoS 1 to ``{topic_prefix}/_batch`` (``{topic_prefix}/_batch/zlib`` when compressed); over
MQTT 5 it also carries the user property ``edgegw-frame`` = ``msgpack/1`` or ``msgpack+zlib/1``. The payload is a
msgpack map (zlib-deflated when compressed)::

    {"v": 1,
     "fields": ["id", "device_id", "topic", "received_at", "priority", "payload", "traceparent"],
     "records": [[4711, "dev-01", "edgegw/dev-01/telemetry", 1700000000.123, 1, b"...", "00-...-01"], ...]}

``id`` is the outbox record id, stable across resends: the cloud deduplicates on it. ``topic`` is the upstream topic
the record would have had on its own. ``traceparent`` is the record's W3C trace context (edgegw/tracing.py), nil
for records stored before tracing; a reader should go by ``fields``, not by position (fields may be added).
The frame's PUBACK acknowledges every record in it; a frame refused upstream (PUBACK >= 0x80) quarantines all its
records.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgpack

from edgegw.outbox.store import Record

FRAME_VERSION = 1
FIELDS = ("id", "device_id", "topic", "received_at", "priority", "payload", "traceparent")
RECORD_COST = 32
"""Bytes of msgpack framing counted per record on top of payload, topic and device id (an upper bound)."""


def record_cost(record: Record, topic: str, traceparent: str | None = None) -> int:
    # In bytes, as msgpack writes them: a topic or device id in Chinese takes three per character.
    return (len(record.payload) + len(topic.encode()) + len(record.device_id.encode()) + RECORD_COST
            + (len(traceparent) + 2 if traceparent is not None else 0))


_ENVELOPE = len(msgpack.packb({"v": FRAME_VERSION, "fields": list(FIELDS), "records": []}, use_bin_type=True)) + 4
"""Bytes of a frame around its records: the map, version and field names, and the records' array header (an empty
array's one byte grows to at most five)."""


def frame_envelope(max_size: int, compress: bool) -> int:
    """Bytes a frame's payload of at most ``max_size`` bytes adds to the sum of its :func:`record_cost`: the msgpack
    envelope and, compressed, zlib's worst case on incompressible data (deflateBound: +1 per 4,096 bytes and then
    some, +13 bytes of header and checksum)."""
    return _ENVELOPE + (max_size // 2048 + 16 if compress else 0)


def encode_frame(records: list[tuple[Record, str, str | None]], compress: bool) -> bytes:
    """``records``: (record, upstream topic, traceparent or None)."""
    body = msgpack.packb({
        "v": FRAME_VERSION,
        "fields": list(FIELDS),
        "records": [[r.id, r.device_id, topic, r.received_at, r.priority, r.payload, tp]
                    for r, topic, tp in records],
    }, use_bin_type=True)
    return zlib.compress(body, 6) if compress else body


def decode_frame(data: bytes, compressed: bool = False) -> list[dict[str, Any]]:
    """For the cloud side and tests: the records of a frame as dicts keyed by ``fields``."""
    frame = msgpack.unpackb(zlib.decompress(data) if compressed else data, raw=False)
    if frame.get("v") != FRAME_VERSION:
        raise ValueError(f"unknown frame version {frame.get('v')!r}")
    fields = frame["fields"]
    return [dict(zip(fields, row, strict=True)) for row in frame["records"]]
