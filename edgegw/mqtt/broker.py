"""Local broker semantics: sessions by device id, subscriptions, routing, retained messages, wills, expiry timers.

Synchronous on the hot path: :meth:`LocalBroker.route` matches a topic in the subscription index and hands each
subscriber's copy to its live connection (one engine call, flushed with the others) or to its session queue. Timers
(session expiry, will delay) are ``loop.call_later`` handles, never tasks.

Persistent sessions (session expiry > 0) report every change to a :class:`~edgegw.mqtt.session.Journal`
(:class:`~edgegw.mqtt.sessiondb.SessionDB` in the gateway): their state, and each QoS 1/2 message they hold from the
moment it is routed to them until the device acknowledged it (or it was dropped), so they survive a crash.

Who may see what is decided at SUBSCRIBE time: a filter is accepted only if every topic it can match is inside the
device's subscribe ACL, so routing (and retained delivery) needs no per-message ACL check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from edgegw.config import MQTTSettings
from edgegw.mqtt.connection import ConnectionState, MQTTConnection
from edgegw.mqtt.forward import forwarded
from edgegw.mqtt.packets import (
    MQTT_5,
    Properties,
    PropertyId,
    ReasonCode,
    Subscribe,
    Unsubscribe,
    Will,
)
from edgegw.mqtt.retained import RetainedStore
from edgegw.mqtt.session import (
    Journal,
    Message,
    NoJournal,
    Outgoing,
    Session,
    SessionState,
)
from edgegw.mqtt.subscriptions import (
    InvalidFilter,
    Subscription,
    SubscriptionIndex,
    parse_filter,
)
from edgegw.policy.acl import ACL

log = structlog.get_logger("edgegw.mqtt")


class Peer(Protocol):
    """What the broker needs from a live device connection (``server.DeviceProtocol``)."""

    engine: MQTTConnection

    @property
    def backlogged(self) -> bool:
        """The socket is not draining (a slow or stalled reader): QoS 0 copies are dropped, not buffered."""

    def wrote(self) -> None:
        """Data was queued in the engine: flush it soon."""


@dataclass(slots=True)
class BrokerStats:
    routed: int = 0
    delivered: int = 0
    queued: int = 0
    expired: int = 0
    dropped_too_large: int = 0
    dropped_backlog: int = 0
    subscribe_denied: int = 0
    wills_published: int = 0
    sessions_expired: int = 0
    queue_dropped: int = 0
    """Messages dropped from full session queues (count or bytes cap), oldest first."""


class LocalBroker:
    def __init__(self, settings: MQTTSettings, publish_will: Callable[[str, Message], None],
                 clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.stats = BrokerStats()
        self.sessions: dict[str, Session] = {}
        self.live: dict[str, Peer] = {}
        self.index = SubscriptionIndex()
        self.retained = RetainedStore(settings.retained_max_count, settings.retained_max_bytes)
        self._publish_will = publish_will
        self._clock = clock
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        self._will_timers: dict[str, tuple[asyncio.TimerHandle, Message]] = {}
        self.journal: Journal = NoJournal()

    def pending_will(self, key: str) -> tuple[float, Message] | None:
        """A delayed will waiting to be published: (its monotonic due time, the message)."""
        entry = self._will_timers.get(key)
        return None if entry is None else (entry[0].when(), entry[1])

    def new_session(self, key: str) -> Session:
        state = SessionState(max_queued=self.settings.max_queued_messages,
                             max_queued_bytes=self.settings.max_queued_bytes)
        state.on_finished = self.journal.message_done
        return Session(key, state)

    def reset(self) -> None:
        """Forget every session, subscription and retained message (before start only)."""
        self.close()
        self.sessions.clear()
        self.index = SubscriptionIndex()
        self.retained = RetainedStore(self.settings.retained_max_count, self.settings.retained_max_bytes)

    def schedule_expiry(self, key: str, delay: float) -> None:
        old = self._expiry_timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._expiry_timers[key] = asyncio.get_running_loop().call_later(delay, self._expire, key)

    def schedule_will(self, key: str, message: Message, delay: float) -> None:
        handle = asyncio.get_running_loop().call_later(delay, self._will_due, key)
        self._will_timers[key] = (handle, message)

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # --- sessions ------------------------------------------------------------------------------------------

    def open_session(self, key: str, clean_start: bool) -> tuple[Session, bool]:
        """The device's session and whether it was resumed (CONNACK session present)."""
        timer = self._expiry_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        pending = self._will_timers.pop(key, None)
        if pending is not None:
            pending[0].cancel()
            if clean_start:  # MQTT 5 §3.1.2.5: the old session ends now, so its will goes now
                self._fire_will(key, pending[1])
        session = self.sessions.get(key)
        if session is not None and clean_start:
            self._discard(session)
            session = None
        if session is not None:
            return session, True
        session = self.new_session(key)
        self.sessions[key] = session
        return session, False

    def attach(self, session: Session, peer: Peer, will: Will | None) -> None:
        self.live[session.device_id] = peer
        session.disconnected_at = None
        session.will = will
        session.protocol_level = peer.engine.protocol_level
        # Known from CONNECT: a session that outlives its connection is journaled from now on (a later
        # DISCONNECT may change the expiry, never from 0: MQTT-3.14.2-2).
        session.expiry = peer.engine.session_expiry
        if session.expiry > 0:
            session.durable = True
            self.journal.session_changed(session)
        elif session.durable:  # resumed without expiry: it ends with this connection
            session.durable = False
            self.journal.session_dropped(session.device_id)
        if session.state.dropped:
            # Counted while the queue was full (oldest first), told once when the device is back rather than per
            # message; the count restarts, so each drop is reported once (or at session expiry).
            log.warning("mqtt.session_queue_dropped", device_id=session.device_id, dropped=session.state.dropped)
            session.state.dropped = 0
        self.pump(session, peer)

    def connection_ended(self, session: Session, peer: Peer, expiry: int, reason: ReasonCode) -> None:
        """The device's connection is gone. ``reason`` SUCCESS is a normal DISCONNECT (no will)."""
        key = session.device_id
        current = self.live.get(key)
        if current is peer:
            del self.live[key]
        elif current is not None:
            # Another connection has resumed this session already: its will, expiry and subscriptions are the new
            # connection's now, and an old connection's late end must not publish that will or discard the session.
            return
        if self.sessions.get(key) is not session:
            return  # already replaced by a clean-start connection
        session.expiry = expiry
        will, session.will = session.will, None
        if will is not None and reason is not ReasonCode.SUCCESS:
            delay = will.properties.get(PropertyId.WILL_DELAY_INTERVAL, 0) if session.protocol_level == MQTT_5 else 0
            props = _will_properties(will)
            mei = props.get(PropertyId.MESSAGE_EXPIRY_INTERVAL)
            expires_at = self.now() + mei if isinstance(mei, int) else None
            message = Message(will.topic, will.payload, will.qos, will.retain, props, sender=key,
                              expires_at=expires_at)
            if isinstance(delay, int) and delay > 0 and expiry > 0:
                self.schedule_will(key, message, min(delay, expiry))
            else:
                self._fire_will(key, message)
        if expiry == 0:
            self._discard(session)
        else:
            session.disconnected_at = time.time()
            self.schedule_expiry(key, expiry)
            if session.durable:
                self.journal.session_changed(session)  # expiry countdown and a delayed will

    def _will_due(self, key: str) -> None:
        entry = self._will_timers.pop(key, None)
        if entry is not None:
            self._fire_will(key, entry[1])
            session = self.sessions.get(key)
            if session is not None and session.durable:
                self.journal.session_changed(session)  # the will is gone from its saved state

    def _fire_will(self, key: str, message: Message) -> None:
        self.stats.wills_published += 1
        self._publish_will(key, message)

    def _expire(self, key: str) -> None:
        self._expiry_timers.pop(key, None)
        session = self.sessions.get(key)
        if session is not None and key not in self.live:
            self.stats.sessions_expired += 1
            self._will_due(key)  # the session ends: a delayed will goes now (MQTT 5 §3.1.3.2.2)
            self._discard(session)
            log.info("mqtt.session_expired", device_id=key, dropped=session.state.dropped + len(session.state.queue))

    def _discard(self, session: Session) -> None:
        for topic_filter in session.filters:
            self.index.remove(session.device_id, topic_filter)
        session.filters.clear()
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]
        if session.durable:
            session.durable = False
            self.journal.session_dropped(session.device_id)

    def close(self) -> None:
        for timer in self._expiry_timers.values():
            timer.cancel()
        for handle, _ in self._will_timers.values():
            handle.cancel()
        self._expiry_timers.clear()
        self._will_timers.clear()

    # --- subscriptions -------------------------------------------------------------------------------------

    def subscribe(self, session: Session, packet: Subscribe, acl: ACL, acl_id: str,
                  with_retained: bool = True) -> tuple[tuple[int, ...], list[Outgoing]]:
        """Add the filters the ACL allows. Returns one reason code per filter, and the retained messages to send
        once the SUBACK is out (:meth:`deliver_all`); none without ``with_retained`` (nothing will be sent)."""
        codes: list[int] = []
        sub_ids = packet.properties.subscription_ids
        sub_id = sub_ids[0] if sub_ids else None
        # Filter -> (its filter without a share prefix, the QoS granted) of those whose retained messages go out.
        # Once per filter and packet: its repeats in one SUBACK's packet would each send every matching retained
        # message again, back to back (a 40 KB SUBSCRIBE repeating a filter that matches 2,000 retained messages
        # made 4 million PUBLISHes), so the last repeat's QoS is used, and each retained message is sent once.
        wanted: dict[str, tuple[str, int]] = {}
        for topic_filter, opts in packet.subscriptions:
            try:
                group, flt = parse_filter(topic_filter)
            except InvalidFilter:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            if len(flt) > self.settings.max_topic_length or flt.count("/") >= self.settings.max_topic_levels:
                # The topic-name bounds hold for filters too: a filter of 100,000 levels would grow the index
                # by as many nodes for a single subscription.
                log.warning("mqtt.subscribe_denied", device_id=acl_id, topic_filter=topic_filter[:100],
                            reason="filter too long or too deep")
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            if group is not None and opts.no_local:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)  # MQTT-3.8.3-4
                continue
            if not acl.may_subscribe(acl_id, flt):
                self.stats.subscribe_denied += 1
                log.warning("mqtt.subscribe_denied", device_id=acl_id, topic_filter=topic_filter, reason="acl")
                codes.append(ReasonCode.NOT_AUTHORIZED)
                continue
            if topic_filter not in session.filters and len(session.filters) >= self.settings.max_subscriptions:
                log.warning("mqtt.subscribe_denied", device_id=acl_id, topic_filter=topic_filter,
                            reason="max_subscriptions")
                codes.append(ReasonCode.QUOTA_EXCEEDED)
                continue
            sub = Subscription(session.device_id, topic_filter, opts, sub_id, group)
            new = self.index.add(sub)
            session.filters[topic_filter] = sub
            codes.append(opts.qos)
            # MQTT 5 §3.3.1.3 retain handling: 0 always, 1 only for a new subscription, 2 never; none for shared.
            if group is None and (opts.retain_handling == 0 or (opts.retain_handling == 1 and new)):
                wanted[topic_filter] = (flt, opts.qos)
            elif topic_filter in wanted:
                wanted[topic_filter] = (flt, opts.qos)  # replaced within the packet: the QoS granted last
        retained: list[Outgoing] = []
        now = self.now()
        for flt, qos in wanted.values() if with_retained else ():
            for m in self.retained.matching(flt, now, self.journal.retained_changed):
                # MQTT-3.3.1-9: retained messages sent for a new subscription keep RETAIN set.
                retained.append(Outgoing(m, min(m.qos, qos), (sub_id,) if sub_id else (), retain=True))
        if session.durable:
            self.journal.session_changed(session)
        return tuple(codes), retained

    def unsubscribe_disallowed(self, acl: ACL, keep: Callable[[str], bool] = lambda key: False) -> int:
        """After an ACL reload: end every subscription the new ``acl`` refuses, since routing trusts what SUBSCRIBE
        accepted. Sessions whose key ``keep`` accepts (the lab listener's) are left alone. Returns how many."""
        removed = 0
        for key, session in self.sessions.items():
            if keep(key):
                continue
            gone = [f for f, sub in session.filters.items() if not acl.may_subscribe(key, parse_filter(f)[1])]
            for topic_filter in gone:
                del session.filters[topic_filter]
                self.index.remove(key, topic_filter)
                log.warning("mqtt.subscription_revoked", device_id=key, topic_filter=topic_filter, reason="acl")
            if gone and session.durable:
                self.journal.session_changed(session)
            removed += len(gone)
        return removed

    def deliver_all(self, session: Session, items: list[Outgoing]) -> None:
        for out in items:
            self._deliver(session, out)

    def unsubscribe(self, session: Session, packet: Unsubscribe) -> tuple[int, ...]:
        codes: list[int] = []
        for topic_filter in packet.topic_filters:
            if session.filters.pop(topic_filter, None) is not None:
                self.index.remove(session.device_id, topic_filter)
                codes.append(ReasonCode.SUCCESS)
            else:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
        if session.durable:
            self.journal.session_changed(session)
        return tuple(codes)

    # --- routing -------------------------------------------------------------------------------------------

    def route(self, message: Message) -> int:
        """Deliver ``message`` to every matching subscription; store it if retained. Returns the copies made."""
        if message.retain and self.retained.put(message):
            self.journal.retained_changed(message.topic)
        matches = self.index.match(message.topic)
        if not matches:
            return 0
        self.stats.routed += 1
        # Overlapping subscriptions of one device: one copy, the highest granted QoS, every subscription id
        # (MQTT 5 §3.3.4); a shared subscription's copy is separate.
        per_device: dict[str, list[Subscription]] = {}
        copies = 0
        for sub in matches:
            if sub.options.no_local and sub.device_id == message.sender:
                continue  # MQTT-3.8.3-3
            if sub.share_group is not None:
                copies += self._deliver_to(sub.device_id, message, [sub])
            else:
                per_device.setdefault(sub.device_id, []).append(sub)
        for device_id, subs in per_device.items():
            copies += self._deliver_to(device_id, message, subs)
        return copies

    def _deliver_to(self, key: str, message: Message, subs: list[Subscription]) -> int:
        session = self.sessions.get(key)
        if session is None:
            return 0
        qos = min(message.qos, max(s.options.qos for s in subs))
        retain = message.retain and any(s.options.retain_as_published for s in subs)
        sub_ids = tuple(s.subscription_id for s in subs if s.subscription_id)
        return self._deliver(session, Outgoing(message, qos, sub_ids, retain))

    def deliver_to_session(self, key: str, message: Message) -> int:
        """Deliver ``message`` to the device's own matching subscriptions only (downlink)."""
        session = self.sessions.get(key)
        if session is None:
            return 0
        subs = [s for s in self.index.match(message.topic) if s.device_id == key]
        if not subs:
            return 0
        return self._deliver_to(key, message, subs)

    def _deliver(self, session: Session, out: Outgoing) -> int:
        peer = self.live.get(session.device_id)
        state = session.state
        if out.qos and session.expiry > 0 and session.durable:
            # Journaled until the device acknowledges it (or it is dropped): survives a crash. One append here,
            # written with the next batch (MQTT 5 §4.1: QoS 1/2 messages are part of the session state).
            self.journal.message_added(session.device_id, out)
        if peer is not None and peer.engine.state is ConnectionState.CONNECTED:
            if out.qos == 0 and peer.backlogged:
                self.stats.dropped_backlog += 1
                return 0
            if out.qos == 0 or (not state.queue and peer.engine.can_send):
                self._send(peer, out)
                peer.wrote()
                return 1
            self._enqueue(state, out)
            return 1
        if session.expiry > 0 and out.qos > 0:
            # An offline persistent session: queued, bounded (MQTT 5 §4.1: QoS 0 may be dropped, and is).
            self._enqueue(state, out)
            return 1
        return 0

    def _enqueue(self, state: SessionState, out: Outgoing) -> None:
        before = state.dropped
        state.enqueue(out)
        self.stats.queued += 1
        self.stats.queue_dropped += state.dropped - before

    def _send(self, peer: Peer, out: Outgoing) -> None:
        m = out.message
        now = self.now()
        if m.expires_at is not None and m.expires_at <= now:
            self.stats.expired += 1
            peer.engine.session.finished(out)
            return
        if peer.engine.send_publish(out, now):
            self.stats.delivered += 1
        else:
            self.stats.dropped_too_large += 1

    def pump(self, session: Session, peer: Peer) -> None:
        """Move queued messages into the in-flight window."""
        state = session.state
        engine = peer.engine
        sent = False
        while state.queue and engine.can_send:
            self._send(peer, state.dequeue())
            sent = True
        if sent:
            peer.wrote()


def _will_properties(will: Will) -> Properties:
    return forwarded(will.properties)
