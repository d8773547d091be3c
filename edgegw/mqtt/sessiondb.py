"""Persistent sessions and retained messages on disk, written continuously so they survive ``kill -9``.

The broker reports changes through the :class:`~edgegw.mqtt.session.Journal` calls, which only append to a list
(no await, no task, no SQLite on the hot path). One writer task wakes at the first change, lingers ``window``
seconds to gather the rest, then hands the whole batch to one thread that owns the SQLite connection: one
transaction, ``synchronous=FULL`` (one fsync per batch, like the outbox's group commit), one await per batch.

What is written, and when it is current (docs/MQTT.md "Across a gateway restart" says what a crash can lose):

- ``sessions``: one row per persistent session (expiry, subscriptions, a delayed will, QoS 2 ids awaiting
  PUBREL, which journaled messages were in flight under which packet id), rewritten when the session connects,
  subscribes, unsubscribes or disconnects, and at a clean stop. SUBACK/UNSUBACK wait for the commit that holds the
  change (:meth:`SessionDB.after_commit`): an acknowledged subscription is on disk, as a PUBACK means "in the
  outbox".
- ``messages``: each QoS 1/2 message routed to a persistent session, inserted in the batch after it was routed and
  deleted in the batch after the device acknowledged it (or it was dropped from the bounded queue, or expired).
- ``retained``: the retained message of each topic (an empty payload deletes it).

Rows are msgpack (``edgegw.mqtt.forward`` schema for properties). Expiry deadlines are stored as wall-clock times,
so countdowns continue across a restart. A file that cannot be read is moved aside (``mqtt.sessions_unreadable``,
error) and the gateway starts with no sessions. A failed batch is logged (``mqtt.sessions_write_failed``; any other
error in a batch ``mqtt.sessions_batch_failed``) and the SUBACKs waiting for it are not sent (the connection is
closed): the device subscribes again. Either way the writer goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import structlog

from edgegw.errors import ConfigError
from edgegw.mqtt import persist
from edgegw.mqtt.broker import LocalBroker
from edgegw.mqtt.forward import (
    decode_record_properties,
    properties_from_record,
    record_properties,
)
from edgegw.mqtt.session import Message, NoJournal, Outgoing, Session

log = structlog.get_logger("edgegw.mqtt")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS messages (row INTEGER PRIMARY KEY, session TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session, row);
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, body BLOB NOT NULL);
"""

Committed = Callable[[bool], None]
"""Called after the batch holding a change was committed (True) or failed (False)."""


class SessionDB:
    """The gateway's :class:`~edgegw.mqtt.session.Journal`: batches of changes into one SQLite file."""

    def __init__(self, path: Path, broker: LocalBroker, *, window: float = 0.005) -> None:
        self.path = path
        self.broker = broker
        self.window = window
        self.batches = 0
        self.failures = 0
        self._ops: list[tuple[Any, ...]] = []
        self._dirty_sessions: set[str] = set()
        self._dirty_retained: set[str] = set()
        self._callbacks: list[Committed] = []
        self._next_row = 1
        self._unwritten: set[int] = set()
        """Rows added since the last batch: one acknowledged before it is written is never written at all."""
        self._cancelled: set[int] = set()
        self._closing = False
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqtt-sessions")
        self._db: sqlite3.Connection | None = None  # used only on the executor's thread

    # --- the Journal calls (synchronous, an append each) -----------------------------------------------------

    def session_changed(self, session: Session) -> None:
        if session.device_id not in self._dirty_sessions:
            self._dirty_sessions.add(session.device_id)
            self._ops.append(("s", session.device_id))
            self._wake.set()

    def session_dropped(self, key: str) -> None:
        self._dirty_sessions.discard(key)
        self._ops.append(("d", key))
        self._wake.set()

    def message_added(self, key: str, item: Outgoing) -> None:
        item.row = self._next_row
        self._next_row += 1
        self._unwritten.add(item.row)
        self._ops.append(("m", item.row, key, item.message, item.qos, item.subscription_ids, item.retain))
        self._wake.set()

    def message_done(self, item: Outgoing) -> None:
        row, item.row = item.row, 0
        if row in self._unwritten:  # a live device acknowledged it within the batch window: nothing to write
            self._unwritten.discard(row)
            self._cancelled.add(row)
            return
        self._ops.append(("x", row))
        self._wake.set()

    def retained_changed(self, topic: str) -> None:
        if topic not in self._dirty_retained:
            self._dirty_retained.add(topic)
            self._ops.append(("r", topic))
            self._wake.set()

    def after_commit(self, callback: Committed) -> None:
        """Call ``callback`` once everything reported so far is committed (e.g. send the SUBACK)."""
        self._callbacks.append(callback)
        self._wake.set()

    # --- lifetime ------------------------------------------------------------------------------------------

    async def open(self, legacy_snapshot: Path | None = None) -> None:
        """Restore what the file holds into the (empty) broker, then start journaling. A msgpack snapshot from an
        older version (``legacy_snapshot``) is imported once, when there is no database yet."""
        loop = asyncio.get_running_loop()
        fresh = not self.path.exists()
        try:
            try:
                rows = await loop.run_in_executor(self._executor, self._open_and_read)
            except sqlite3.OperationalError:
                raise  # cannot open or lock it (permissions, missing directory): not the file's fault
            except sqlite3.DatabaseError as exc:  # not a database, damaged, or an unknown version
                aside = _move_aside(self.path)
                log.error("mqtt.sessions_unreadable", path=str(self.path), moved_to=str(aside), error=repr(exc))
                self.broker.reset()
                rows = await loop.run_in_executor(self._executor, self._open_and_read)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError("mqtt.session_store", f"cannot use the session database {self.path}: {exc}") from None
        self.broker.journal = self
        if fresh and legacy_snapshot is not None and legacy_snapshot != self.path and legacy_snapshot.exists():
            persist.load(legacy_snapshot, self.broker)
            self._journal_everything()
        else:
            sessions, retained = self._restore(*rows)
            if not fresh:
                log.info("mqtt.sessions_restored", path=str(self.path), sessions=sessions, retained=retained)
        self._writer = loop.create_task(self._run(), name="mqtt-sessions-writer")

    async def close(self) -> None:
        """At a clean stop, after every device connection ended: write every persistent session exactly (packet
        ids in flight, QoS 2 ids awaiting PUBREL), commit, close."""
        for session in self.broker.sessions.values():
            if session.durable:
                self.session_changed(session)
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        await self._flush()
        durable = sum(1 for s in self.broker.sessions.values() if s.durable)
        log.info("mqtt.sessions_saved", path=str(self.path), sessions=durable, retained=len(self.broker.retained))
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_db)
        self._executor.shutdown(wait=True)
        self.broker.journal = NoJournal()  # closed: nothing more is written (the broker is going away)

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            if not self._closing:
                await asyncio.sleep(self.window)  # gather what else arrives: one transaction, one fsync
            await self._flush()

    async def _flush(self) -> None:
        self._wake.clear()
        ops, self._ops = self._ops, []
        callbacks, self._callbacks = self._callbacks, []
        cancelled, self._cancelled = self._cancelled, set()
        self._unwritten = set()
        if not ops and not callbacks:
            return
        self._dirty_sessions.clear()
        self._dirty_retained.clear()
        ok = False
        try:
            batch = self._resolve(ops, cancelled)
            if batch:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._write, batch,
                                                                 self.broker.now(), time.time())
                self.batches += 1
            ok = True
        except (sqlite3.Error, OSError) as exc:  # disk full, I/O error, file gone: the next batch may succeed
            self.failures += 1
            log.error("mqtt.sessions_write_failed", path=str(self.path), error=repr(exc), changes=len(ops))
        except Exception:  # a bug (e.g. a value msgpack cannot pack): this batch is lost, the journal goes on
            self.failures += 1
            log.exception("mqtt.sessions_batch_failed", path=str(self.path), changes=len(ops))
        # One callback that raises must not keep the others (other devices' SUBACKs) from running, nor end the
        # writer task (every later change would then stay in memory only, and close() would re-raise).
        for callback in callbacks:
            try:
                callback(ok)
            except Exception:
                log.exception("mqtt.sessions_callback_failed", path=str(self.path))

    def _resolve(self, ops: list[tuple[Any, ...]], cancelled: set[int]) -> list[tuple[Any, ...]]:
        """Session and retained changes are read now (their latest state, once per batch); messages are immutable
        and packed on the writer thread."""
        out: list[tuple[Any, ...]] = []
        mono, now = self.broker.now(), time.time()
        for op in ops:
            kind = op[0]
            if kind == "s":
                session = self.broker.sessions.get(op[1])
                if session is not None and session.durable:
                    out.append(("s", op[1], msgpack.packb(self._session_state(session, mono, now),
                                                          use_bin_type=True)))
            elif kind == "r":
                message = self.broker.retained._messages.get(op[1])
                out.append(("r", op[1], None if message is None else _pack_message(message, mono, now)))
            elif kind != "m" or op[1] not in cancelled:
                out.append(op)
        return out

    def _session_state(self, s: Session, mono: float, now: float) -> dict[str, Any]:
        will = self.broker.pending_will(s.device_id)
        return {
            "expiry": s.expiry, "level": s.protocol_level, "disconnected_at": s.disconnected_at,
            "next_pid": s.state.next_packet_id, "awaiting_rel": sorted(s.state.awaiting_rel),
            "dropped": s.state.dropped,
            "filters": persist.filter_rows(s),
            "inflight": [[o.row, pid, o.released] for pid, o in s.state.outgoing.items() if o.row],
            "will": None if will is None else [_pack_message(will[1], mono, now), now + (will[0] - mono)],
        }

    def _journal_everything(self) -> None:
        """After importing a legacy snapshot: every session and retained message into the (new) database."""
        for session in self.broker.sessions.values():
            session.durable = True
            session.state.on_finished = self.message_done
            for item in (*session.state.outgoing.values(), *session.state.queue):
                self.message_added(session.device_id, item)
            self.session_changed(session)
        for topic in self.broker.retained._messages:
            self.retained_changed(topic)

    # --- restore (loop side) -------------------------------------------------------------------------------

    def _restore(self, sessions: list[tuple[str, bytes]], messages: list[tuple[int, str, bytes]],
                 retained: list[bytes]) -> tuple[int, int]:
        broker = self.broker
        mono, now = broker.now(), time.time()
        held: dict[str, list[tuple[int, bytes]]] = {}
        for row, key, body in messages:
            held.setdefault(key, []).append((row, body))
            self._next_row = max(self._next_row, row + 1)
        restored = 0
        for key, blob in sessions:
            st = msgpack.unpackb(blob, raw=False)
            # A session whose connection was alive at the crash counts down from now (its end was not seen).
            left = st["expiry"] - (now - st["disconnected_at"]) if st["disconnected_at"] else st["expiry"]
            rows = held.pop(key, [])
            if left <= 0:
                self.session_dropped(key)
                continue
            session = broker.new_session(key)
            session.expiry, session.protocol_level, session.durable = st["expiry"], st["level"], True
            session.disconnected_at = st["disconnected_at"] or now
            state = session.state
            state.next_packet_id, state.dropped = st["next_pid"], st["dropped"]
            state.awaiting_rel = set(st["awaiting_rel"])
            inflight = {row: (pid, released) for row, pid, released in st["inflight"]}
            for row, body in rows:
                item = _unpack_outgoing(body, mono, now)
                if item is None:  # expired while stored
                    self._ops.append(("x", row))
                    continue
                item.row = row
                if row in inflight and inflight[row][0] not in state.outgoing:
                    pid, item.released = inflight[row]
                    state.outgoing[pid] = item  # resent with DUP (or PUBREL) when the device is back
                else:
                    state.enqueue(item)
            persist.restore_filters(broker, session, st["filters"])
            broker.sessions[key] = session
            broker.schedule_expiry(key, left)
            if st["will"] is not None:
                message = _unpack_message(st["will"][0], mono, now)
                if message is not None:
                    broker.schedule_will(key, message, max(0.0, st["will"][1] - now))
            restored += 1
        for rows in held.values():  # messages of sessions that are gone
            self._ops.extend(("x", row) for row, _ in rows)
        count = 0
        for body in retained:
            packed = msgpack.unpackb(body, raw=False)
            message = _unpack_message(packed, mono, now)
            if message is None:  # expired while stored: out of the file too
                self.retained_changed(packed[0])
                continue
            if broker.retained.put(message, fair=False):
                count += 1
        if self._ops:
            self._wake.set()
        return restored, count

    # --- the writer thread ---------------------------------------------------------------------------------

    def _open_and_read(self) -> tuple[list[tuple[str, bytes]], list[tuple[int, str, bytes]], list[bytes]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # one fsync per batch: what was committed survives power loss
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown session database version {version}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            sessions = db.execute("SELECT id, state FROM sessions").fetchall()
            messages = db.execute("SELECT row, session, body FROM messages ORDER BY row").fetchall()
            retained = [r[0] for r in db.execute("SELECT body FROM retained")]
        except BaseException:
            db.close()
            raise
        self._db = db
        return sessions, messages, retained

    def _write(self, batch: list[tuple[Any, ...]], mono: float, now: float) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            for op in batch:
                kind = op[0]
                if kind == "m":
                    _, row, key, message, qos, sub_ids, retain = op
                    body = msgpack.packb([_pack_message(message, mono, now), qos, list(sub_ids), retain],
                                         use_bin_type=True)
                    db.execute("INSERT OR REPLACE INTO messages (row, session, body) VALUES (?, ?, ?)",
                               (row, key, body))
                elif kind == "x":
                    db.execute("DELETE FROM messages WHERE row = ?", (op[1],))
                elif kind == "s":
                    db.execute("INSERT OR REPLACE INTO sessions (id, state) VALUES (?, ?)", (op[1], op[2]))
                elif kind == "d":
                    db.execute("DELETE FROM sessions WHERE id = ?", (op[1],))
                    db.execute("DELETE FROM messages WHERE session = ?", (op[1],))
                elif kind == "r":
                    if op[2] is None:
                        db.execute("DELETE FROM retained WHERE topic = ?", (op[1],))
                    else:
                        db.execute("INSERT OR REPLACE INTO retained (topic, body) VALUES (?, ?)",
                                   (op[1], msgpack.packb(op[2], use_bin_type=True)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _pack_message(m: Message, mono: float, now: float) -> list[Any]:
    expires = None if m.expires_at is None else now + (m.expires_at - mono)
    return [m.topic, m.payload, m.qos, m.retain, record_properties(m.properties), m.sender, expires]


def _unpack_message(v: list[Any], mono: float, now: float) -> Message | None:
    topic, payload, qos, retain, props, sender, expires = v
    expires_at = None
    if expires is not None:
        if expires <= now:
            return None
        expires_at = mono + (expires - now)
    return Message(topic, payload, qos, retain, properties_from_record(decode_record_properties(props)), sender,
                   expires_at)


def _unpack_outgoing(body: bytes, mono: float, now: float) -> Outgoing | None:
    message, qos, sub_ids, retain = msgpack.unpackb(body, raw=False)
    m = _unpack_message(message, mono, now)
    return None if m is None else Outgoing(m, qos, tuple(sub_ids), retain)


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            os.replace(source, Path(str(aside) + suffix))
    return aside

