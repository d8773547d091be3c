"""Outbox records, priority classes and the "outbox full" refusal."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from edgegw.errors import OutboxError
from edgegw.outbox._schema import RECORD_OVERHEAD

PRIORITY_BULK, PRIORITY_TELEMETRY, PRIORITY_ALARM = 0, 1, 2
MAX_PRIORITY = 7

FullReason = Literal["records", "bytes", "disk", "device_share"]


class OutboxFull(OutboxError):
    """Raised by :meth:`Outbox.submit` when the record may not be stored; nothing was queued, no callback runs.

    ``reason``: ``records`` / ``bytes`` (a cap), ``disk`` (the filesystem headroom guard) or ``device_share`` (the
    outbox is nearly full and this device holds more than its fair share). Call :meth:`Outbox.when_room` to be
    told when to try again.
    """

    def __init__(self, device_id: str, reason: FullReason, detail: str) -> None:
        super().__init__(f"outbox full for {device_id!r} ({reason}): {detail}")
        self.device_id = device_id
        self.reason: FullReason = reason


@dataclass(frozen=True, slots=True, init=False)
class Record:
    id: int
    device_id: str
    topic: str
    payload: bytes
    qos: int
    received_at: float
    properties: bytes | None = None
    priority: int = PRIORITY_TELEMETRY

    def __init__(self, id: int, device_id: str, topic: str, payload: bytes, qos: int,
                 received_at: float, properties: bytes | None = None, priority: int = PRIORITY_TELEMETRY) -> None:
        # One Record per device message, built on the event loop: the generated frozen __init__ calls
        # object.__setattr__ per field (1.1 us for these 8); the slots' own setters take half of that. Still frozen:
        # assignment after construction raises FrozenInstanceError.
        _set_id(self, id)
        _set_device_id(self, device_id)
        _set_topic(self, topic)
        _set_payload(self, payload)
        _set_qos(self, qos)
        _set_received_at(self, received_at)
        _set_properties(self, properties)
        _set_priority(self, priority)

    @property
    def size(self) -> int:
        """Bytes counted against ``outbox.max_bytes``."""
        return record_size(self.device_id, self.topic, self.payload, self.properties)


(_set_id, _set_device_id, _set_topic, _set_payload, _set_qos, _set_received_at, _set_properties,
 _set_priority) = (getattr(Record, field.name).__set__ for field in fields(Record))


def record_size(device_id: str, topic: str, payload: bytes, properties: bytes | None) -> int:
    return len(payload) + len(topic) + len(device_id) + (len(properties) if properties else 0) + RECORD_OVERHEAD


def decode_row(row: tuple[Any, ...]) -> Record:
    rid, device, topic, payload, qos, received_at, properties, priority = row
    if not isinstance(payload, bytes):
        raise TypeError(f"payload is {type(payload).__name__}")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos {qos!r}")
    if properties is not None and not isinstance(properties, bytes):
        raise TypeError(f"properties are {type(properties).__name__}")
    return Record(rid, device.decode(), topic.decode(), payload, qos, float(received_at), properties,
                  int(priority))
