"""The session journal (edgegw/mqtt/sessiondb.py) keeps writing after an error that is not SQLite's: a commit
callback that raises, or a batch that fails for an unexpected reason (a bug), costs that batch or that callback,
never the writer task (which would leave every later change in memory only and make close() raise at the stop).
And the one format of stored subscriptions (edgegw/mqtt/persist.py ``filter_rows`` / ``restore_filters``) that
both the SQLite journal and the legacy snapshot use. Real SQLite files, a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
from structlog.testing import capture_logs
from test_sessions_store import flushed, persistent, rows

from edgegw.config import MQTTSettings
from edgegw.mqtt import persist
from edgegw.mqtt.broker import LocalBroker
from edgegw.mqtt.packets import Properties, Subscribe, SubscriptionOptions
from edgegw.mqtt.session import Message, Outgoing
from edgegw.mqtt.sessiondb import SessionDB
from edgegw.policy.acl import ACL


async def journal(tmp_path: Path) -> tuple[LocalBroker, SessionDB]:
    broker = LocalBroker(MQTTSettings(session_store=tmp_path / "s.msgpack"), lambda k, m: None)
    db = SessionDB(tmp_path / "s.db", broker)
    await db.open()
    return broker, db


def session_ids(path: Path) -> list[str]:
    return sorted(str(r[0]) for r in rows(path, "SELECT id FROM sessions"))


async def test_a_raising_commit_callback_neither_skips_the_others_nor_stops_the_writer(tmp_path: Path) -> None:
    broker, db = await journal(tmp_path)
    await persistent(broker, "dev-1", "cmd/#")
    told: list[bool] = []

    def broken(ok: bool) -> None:
        raise RuntimeError("a bug in one device's SUBACK path")

    with capture_logs() as logs:
        db.after_commit(broken)
        db.after_commit(told.append)  # another device's SUBACK, in the same batch
        await flushed(db)  # a later batch: the writer task is still running
    assert told == [True]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["mqtt.sessions_callback_failed"]

    await persistent(broker, "dev-2", "x/#")  # changes after the error still reach the disk
    await flushed(db)
    assert session_ids(tmp_path / "s.db") == ["dev-1", "dev-2"]
    await asyncio.wait_for(db.close(), 10)  # the daemon's stop: no exception
    broker.close()


async def test_an_unexpected_error_in_a_batch_fails_that_batch_only(tmp_path: Path) -> None:
    broker, db = await journal(tmp_path)
    await persistent(broker, "dev-1", "cmd/#")
    await flushed(db)
    # A value msgpack cannot pack (a bug elsewhere): TypeError on the writer thread, not sqlite3.Error.
    db.message_added("dev-1", Outgoing(Message("cmd/1", object(), 1), 1))  # type: ignore[arg-type]
    told: list[bool] = []
    with capture_logs() as logs:
        db.after_commit(told.append)
        await flushed(db)  # would time out if the writer had died with the batch
    assert told == [False]  # that SUBACK is not sent: the device subscribes again
    assert db.failures == 1
    assert any(e["event"] == "mqtt.sessions_batch_failed" and e["log_level"] == "error" for e in logs)
    assert rows(tmp_path / "s.db", "SELECT row FROM messages") == []  # the batch was rolled back as a whole

    await persistent(broker, "dev-2", "x/#")
    await flushed(db)
    assert session_ids(tmp_path / "s.db") == ["dev-1", "dev-2"]
    await asyncio.wait_for(db.close(), 10)
    broker.close()


def subscribed(broker: LocalBroker, key: str) -> None:
    session, _ = broker.open_session(key, clean_start=False)
    session.expiry, session.durable = 600, True
    broker.subscribe(session, Subscribe(1, (("cmd/#", SubscriptionOptions(1, True, True, 2)),
                                            ("$share/g/tele/+", SubscriptionOptions(2)))),
                     ACL.allow_all(), key)
    broker.subscribe(session, Subscribe(2, (("cfg/+/set", SubscriptionOptions(0)),),
                                        Properties(subscription_ids=(7,))),
                     ACL.allow_all(), key)


async def test_stored_filters_restore_alike_from_the_journal_and_from_a_legacy_snapshot(tmp_path: Path) -> None:
    settings = MQTTSettings(session_store=tmp_path / "s.msgpack")
    source = LocalBroker(settings, lambda k, m: None)
    subscribed(source, "dev-1")
    expected = persist.filter_rows(source.sessions["dev-1"])
    assert expected == [["cmd/#", 1, True, True, 2, None], ["$share/g/tele/+", 2, False, False, 0, None],
                        ["cfg/+/set", 0, False, False, 0, 7]]

    # One helper, with a filter this version refuses among the rows: skipped, the others kept.
    target = LocalBroker(settings, lambda k, m: None)
    session = target.new_session("dev-1")
    assert persist.restore_filters(target, session, [*expected, ["a/#/b", 1, False, False, 0, None]]) == 1
    assert persist.filter_rows(session) == expected
    assert [s.share_group for s in target.index.match("tele/t1")] == ["g"]
    assert [s.subscription_id for s in target.index.match("cfg/x/set")] == [7]
    target.close()

    # The legacy snapshot, imported by the journal, then the journal's own file after a restart: same filters.
    persist.save(settings.session_store, source)
    source.close()
    imported = LocalBroker(settings, lambda k, m: None)
    db = SessionDB(tmp_path / "s.db", imported)
    await db.open(legacy_snapshot=settings.session_store)
    assert persist.filter_rows(imported.sessions["dev-1"]) == expected
    await flushed(db)
    (state,) = rows(tmp_path / "s.db", "SELECT state FROM sessions")
    assert msgpack.unpackb(state[0])["filters"] == expected
    await db.close()
    imported.close()

    restarted = LocalBroker(settings, lambda k, m: None)
    db = SessionDB(tmp_path / "s.db", restarted)
    await db.open()
    assert persist.filter_rows(restarted.sessions["dev-1"]) == expected
    assert [s.device_id for s in restarted.index.match("cmd/reboot")] == ["dev-1"]
    await db.close()
    restarted.close()
