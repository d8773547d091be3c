"""Quarantined records for an operator: list, show, replay, purge (``edgegw quarantine ...``).

Two tables, one listing: the outbox's ``quarantine`` (positive ids: records the upstream refused or that could not
be read back, as they were queued) and the pipeline's ``quarantine.db`` next to it (negative ids, ``-rowid``:
messages that failed decoding, validation or a transform, as the device sent them, reason ``pipeline: ...``).

:func:`replay` here works on the files, with the gateway stopped (it owns the outbox's id sequence and per-device
counters in memory, and rows inserted behind its back would break both); a running gateway replays poison messages
itself (edgegw/pipeline/replay.py). A pipeline row goes through the pipeline of the config given (the fixed one,
typically) and its records go into ``records``; a row that fails again stays, with the new reason. Any other row
goes back into ``records`` as it was. List and show work any time; purge of the outbox's rows only with the gateway
stopped (the CLI checks).
"""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgegw.errors import EdgegwError
from edgegw.pipeline.poison import FILE as POISON_FILE
from edgegw.pipeline.poison import PIPELINE_REASON
from edgegw.pipeline.poison import SCHEMA as POISON_SCHEMA


class QuarantineError(EdgegwError):
    """The outbox file cannot be opened, or an id is unknown."""


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    device_id: str
    topic: str
    payload: bytes
    qos: int
    received_at: float
    properties: bytes | None
    reason: str
    quarantined_at: float

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "device_id": self.device_id, "topic": display_topic(self.topic),
                "bytes": len(self.payload), "reason": self.reason, "received_at": self.received_at,
                "quarantined_at": self.quarantined_at}

    def detail(self) -> dict[str, Any]:
        from edgegw.mqtt.forward import decode_record_properties

        out = self.summary()
        out["qos"] = self.qos
        try:
            out["payload"] = self.payload.decode("utf-8")
            out["payload_encoding"] = "utf-8"
        except UnicodeDecodeError:
            out["payload"] = base64.b64encode(self.payload).decode()
            out["payload_encoding"] = "base64"
        try:
            props = decode_record_properties(self.properties)
            out["properties"] = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in props.items()}
        except Exception as exc:  # noqa: BLE001 - a damaged blob is shown as such
            out["properties"] = {"error": str(exc)}
        return out


def display_topic(topic: str) -> str:
    """A routed record's stored topic (U+0000 + upstream topic) as ``-> upstream``."""
    return f"-> {topic[1:]}" if topic.startswith("\x00") else topic


@contextmanager
def open_outbox(path: Path) -> Iterator[sqlite3.Connection]:
    """The outbox file, with the pipeline's quarantine file (edgegw/pipeline/poison.py) attached as ``pq``."""
    if not path.is_file():
        raise QuarantineError(f"no outbox at {path} (outbox.path)")
    try:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise QuarantineError(f"cannot open outbox {path}: {exc}") from None
    with closing(conn):
        try:
            conn.execute("SELECT 1 FROM quarantine LIMIT 0")
            conn.execute("ATTACH DATABASE ? AS pq", (str(path.parent / POISON_FILE),))
            conn.executescript(POISON_SCHEMA.replace("IF NOT EXISTS quarantine", "IF NOT EXISTS pq.quarantine"))
        except sqlite3.Error as exc:
            raise QuarantineError(f"{path}: {exc} (not an edgegw outbox?)") from None
        yield conn


_COLUMNS = ("id, CAST(device_id AS TEXT), CAST(topic AS TEXT), payload, qos, received_at, properties, reason,"
            " quarantined_at")
_BOTH = (f"SELECT {_COLUMNS} FROM main.quarantine UNION ALL"
         f" SELECT -id, CAST(device_id AS TEXT), CAST(topic AS TEXT), payload, qos, received_at, properties, reason,"
         f" quarantined_at FROM pq.quarantine")


def _table(rid: int) -> tuple[str, int]:
    """Negative ids are the pipeline's rows (pq), positive ones the outbox's."""
    return ("pq.quarantine", -rid) if rid < 0 else ("main.quarantine", rid)


def _row(r: Sequence[Any]) -> Row:
    payload = r[3] if isinstance(r[3], bytes) else str(r[3]).encode()
    return Row(int(r[0]), str(r[1]), str(r[2]), payload, int(r[4]), float(r[5]), r[6], str(r[7]), float(r[8]))


def list_rows(conn: sqlite3.Connection, *, device: str | None = None, limit: int = 100) -> list[Row]:
    rows = conn.execute(f"SELECT * FROM ({_BOTH}) ORDER BY 9, 1")
    out: list[Row] = []
    for r in rows:
        row = _row(r)
        if device is None or row.device_id == device:
            out.append(row)
            if len(out) >= limit:
                break
    return out


def get_rows(conn: sqlite3.Connection, ids: Sequence[int] | None) -> list[Row]:
    """The rows with these ids (all rows for None); QuarantineError naming an unknown id."""
    if ids is None:
        return [_row(r) for r in conn.execute(f"SELECT * FROM ({_BOTH}) ORDER BY 9, 1")]
    out = []
    for rid in ids:
        table, key = _table(rid)
        r = conn.execute(f"SELECT {_COLUMNS} FROM {table} WHERE id = ?", (key,)).fetchone()
        if r is None:
            raise QuarantineError(f"no quarantined record with id {rid}")
        out.append(_row((rid, *r[1:])))
    return out


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute(f"SELECT count(*) FROM ({_BOTH})").fetchone()[0])


def purge(conn: sqlite3.Connection, ids: Sequence[int] | None, older_than: float | None = None) -> int:
    """Delete rows (these ids, those quarantined more than ``older_than`` seconds ago, or all); returns how many."""
    n = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        if ids is not None:
            get_rows(conn, ids)  # unknown id: an error, nothing deleted
            for rid in ids:
                table, key = _table(rid)
                n += conn.execute(f"DELETE FROM {table} WHERE id = ?", (key,)).rowcount
        else:
            for table in ("main.quarantine", "pq.quarantine"):
                if older_than is not None:
                    n += conn.execute(f"DELETE FROM {table} WHERE quarantined_at < ?",
                                      (time.time() - older_than,)).rowcount
                else:
                    n += conn.execute(f"DELETE FROM {table}").rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return n


@dataclass(frozen=True, slots=True)
class Replayed:
    id: int
    records: int
    """Records put into the outbox (0: dropped on purpose by the pipeline, e.g. a filter)."""
    error: str | None = None
    """Set when it failed again (the row stays, with this reason)."""


def replay(conn: sqlite3.Connection, rows: Sequence[Row], pipeline: Any | None) -> list[Replayed]:
    """Put rows back into ``records`` (through ``pipeline`` for pipeline rows), in one transaction."""
    from edgegw.mqtt.forward import decode_record_properties
    from edgegw.outbox._record import PRIORITY_TELEMETRY, record_size
    from edgegw.pipeline.steps import StepError

    results: list[Replayed] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for row in rows:
            outputs: list[tuple[str, bytes, int, int, bytes | None]]
            if row.reason.startswith(PIPELINE_REASON) and pipeline is not None:
                try:
                    props = decode_record_properties(row.properties)
                except Exception:  # noqa: BLE001
                    props = {}
                tenant = props.get("tn") if isinstance(props.get("tn"), str) else ""
                try:
                    produced = pipeline.process(row.device_id, tenant, row.topic, row.payload, row.qos,
                                                row.properties, row.received_at)
                except (StepError, RecursionError) as exc:
                    reason = f"{PIPELINE_REASON}{exc}"[:520]
                    table, key = _table(row.id)
                    conn.execute(f"UPDATE {table} SET reason = ?, quarantined_at = ? WHERE id = ?",
                                 (reason, time.time(), key))
                    results.append(Replayed(row.id, 0, str(exc)))
                    continue
                outputs = [(o.topic, o.payload, o.qos, o.priority, o.properties) for o in produced]
            else:
                outputs = [(row.topic, row.payload, row.qos, PRIORITY_TELEMETRY, row.properties)]
            for topic, payload, qos, priority, properties in outputs:
                # id NULL: AUTOINCREMENT gives a new, never used id (the gateway starts above it next time)
                conn.execute(
                    "INSERT INTO main.records (id, device_id, topic, payload, qos, received_at, properties, priority, size)"
                    " VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.device_id, topic, payload, qos, row.received_at, properties, priority,
                     record_size(row.device_id, topic, payload, properties)))
            table, key = _table(row.id)
            conn.execute(f"DELETE FROM {table} WHERE id = ?", (key,))
            results.append(Replayed(row.id, len(outputs)))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return results
