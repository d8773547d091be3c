"""The durable outbox (SQLite, group commit, caps, fairness, quarantine). See docs/OUTBOX.md."""

from edgegw.outbox.store import (
    PRIORITY_ALARM,
    PRIORITY_BULK,
    PRIORITY_TELEMETRY,
    CommitCallback,
    Outbox,
    OutboxFull,
    Record,
)

__all__ = ["CommitCallback", "Outbox", "OutboxFull", "Record", "PRIORITY_BULK", "PRIORITY_TELEMETRY",
           "PRIORITY_ALARM"]
