"""The msgpack session snapshot of earlier versions (written at shutdown only). Sessions now live in SQLite
(:mod:`edgegw.mqtt.sessiondb`, written in batches, survives kill -9); this format is still read once, when a gateway
that has no session database yet finds a snapshot at ``mqtt.session_store`` (``SessionDB.open``), and :func:`save`
remains as an export of the in-memory state.

Snapshot (msgpack map, ``"v": 1``)::

    {"v": 1, "saved_at": <unix s>,
     "sessions": [{"id", "expiry", "level", "disconnected_at", "next_pid", "awaiting_rel": [pid...],
                   "filters": [[filter, qos, no_local, rap, retain_handling, sub_id|None]...],
                   "outgoing": [[pid, released, <out>]...], "queue": [<out>...], "dropped"}],
     "retained": [<msg>...],
     "wills": [[session id, <msg>, seconds left]...]}
    <out> = [<msg>, qos, [sub ids], retain]
    <msg> = [topic, payload, qos, retain, properties (edgegw.mqtt.forward schema), sender|None, seconds left|None]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgpack
import structlog

from edgegw.mqtt.broker import LocalBroker
from edgegw.mqtt.forward import (
    decode_record_properties,
    properties_from_record,
    record_properties,
)
from edgegw.mqtt.packets import SubscriptionOptions
from edgegw.mqtt.session import Message, Outgoing, Session, SessionState
from edgegw.mqtt.subscriptions import InvalidFilter, Subscription, parse_filter

log = structlog.get_logger("edgegw.mqtt")

VERSION = 1


def _msg(m: Message, mono: float) -> list[Any]:
    left = None if m.expires_at is None else m.expires_at - mono
    return [m.topic, m.payload, m.qos, m.retain, record_properties(m.properties), m.sender, left]


def _unmsg(v: list[Any], mono: float, elapsed: float) -> Message | None:
    topic, payload, qos, retain, props, sender, left = v
    expires_at = None
    if left is not None:
        if left - elapsed <= 0:
            return None
        expires_at = mono + left - elapsed
    return Message(topic, payload, qos, retain, properties_from_record(decode_record_properties(props)), sender,
                   expires_at)


def _out(o: Outgoing, mono: float) -> list[Any]:
    return [_msg(o.message, mono), o.qos, list(o.subscription_ids), o.retain]


def _unout(v: list[Any], mono: float, elapsed: float) -> Outgoing | None:
    m = _unmsg(v[0], mono, elapsed)
    return None if m is None else Outgoing(m, v[1], tuple(v[2]), v[3])


def filter_rows(session: Session) -> list[list[Any]]:
    """A session's subscriptions as stored (both here and in :mod:`edgegw.mqtt.sessiondb`):
    ``[filter, qos, no_local, retain_as_published, retain_handling, subscription id | None]``."""
    return [[f, sub.options.qos, sub.options.no_local, sub.options.retain_as_published, sub.options.retain_handling,
             sub.subscription_id] for f, sub in session.filters.items()]


def restore_filters(broker: LocalBroker, session: Session, rows: list[list[Any]]) -> int:
    """Put the :func:`filter_rows` of ``session`` back into the broker's index and the session. A filter this
    version no longer accepts is skipped (the device subscribes again): one such filter must not cost the device
    its other subscriptions. Returns how many were skipped."""
    skipped = 0
    for f, qos, nl, rap, rh, sid in rows:
        try:
            group, _ = parse_filter(f)
        except InvalidFilter:
            skipped += 1
            continue
        sub = Subscription(session.device_id, f, SubscriptionOptions(qos, nl, rap, rh), sid, group)
        broker.index.add(sub)
        session.filters[f] = sub
    return skipped


def snapshot(broker: LocalBroker) -> bytes:
    mono = broker.now()
    now = time.time()
    sessions = []
    for s in broker.sessions.values():
        if s.expiry == 0:
            continue
        st = s.state
        sessions.append({
            "id": s.device_id, "expiry": s.expiry, "level": s.protocol_level,
            "disconnected_at": s.disconnected_at if s.disconnected_at is not None else now,
            "next_pid": st.next_packet_id, "awaiting_rel": sorted(st.awaiting_rel), "dropped": st.dropped,
            "filters": filter_rows(s),
            "outgoing": [[pid, o.released, _out(o, mono)] for pid, o in st.outgoing.items()],
            "queue": [_out(o, mono) for o in st.queue],
        })
    wills = [[key, _msg(m, mono), handle.when() - mono] for key, (handle, m) in broker._will_timers.items()]
    return msgpack.packb({"v": VERSION, "saved_at": now, "sessions": sessions, "wills": wills,
                          "retained": [_msg(m, mono) for m in broker.retained._messages.values()]},
                         use_bin_type=True)


def restore(broker: LocalBroker, data: bytes) -> tuple[int, int]:
    """Load a snapshot into an empty broker. Returns (sessions, retained messages) restored."""
    snap = msgpack.unpackb(data, raw=False)
    if not isinstance(snap, dict) or snap.get("v") != VERSION:
        raise ValueError(f"unknown session snapshot version {snap.get('v') if isinstance(snap, dict) else None!r}")
    mono = broker.now()
    now = time.time()
    elapsed = max(0.0, now - float(snap["saved_at"]))
    restored = 0
    for s in snap["sessions"]:
        key = s["id"]
        left = s["expiry"] - (now - s["disconnected_at"])
        if left <= 0:
            continue
        state = SessionState(max_queued=broker.settings.max_queued_messages,
                             max_queued_bytes=broker.settings.max_queued_bytes)
        state.next_packet_id = s["next_pid"]
        state.awaiting_rel = set(s["awaiting_rel"])
        state.dropped = s["dropped"]
        for pid, released, o in s["outgoing"]:
            out = _unout(o, mono, elapsed)
            if out is not None:
                out.released = released
                state.outgoing[pid] = out
        for o in s["queue"]:
            out = _unout(o, mono, elapsed)
            if out is not None:
                state.enqueue(out)
        session = Session(key, state, expiry=s["expiry"], protocol_level=s["level"],
                          disconnected_at=s["disconnected_at"])
        restore_filters(broker, session, s["filters"])
        broker.sessions[key] = session
        broker.schedule_expiry(key, left)
        restored += 1
    for key, m, left in snap["wills"]:
        message = _unmsg(m, mono, elapsed)
        if message is not None:
            broker.schedule_will(key, message, max(0.0, left - elapsed))
    retained = 0
    for m in snap["retained"]:
        message = _unmsg(m, mono, elapsed)
        if message is not None and broker.retained.put(message, fair=False):
            retained += 1
    return restored, retained


def save(path: Path, broker: LocalBroker) -> None:
    """Write the snapshot atomically (temp file, fsync, rename); nothing when there is nothing to keep."""
    if not (any(s.expiry for s in broker.sessions.values()) or len(broker.retained) or broker._will_timers):
        return
    data = snapshot(broker)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("mqtt.sessions_saved", path=str(path), sessions=len(broker.sessions), retained=len(broker.retained),
             bytes=len(data))


def load(path: Path, broker: LocalBroker) -> None:
    """Restore from ``path`` if it exists, then remove it (so a later crash cannot resurrect stale state).
    An unreadable snapshot is moved aside with a loud error; the gateway starts with no sessions."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    try:
        sessions, retained = restore(broker, data)
    except Exception as exc:  # noqa: BLE001 - any damage: keep the file for inspection, start clean
        aside = path.with_name(path.name + f".corrupt-{int(time.time())}")
        os.replace(path, aside)
        broker.reset()
        log.error("mqtt.sessions_unreadable", path=str(path), moved_to=str(aside), error=repr(exc))
        return
    path.unlink()
    log.info("mqtt.sessions_restored", path=str(path), sessions=sessions, retained=retained)
