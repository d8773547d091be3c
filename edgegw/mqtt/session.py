"""Per-device MQTT session state: what outlives one network connection (MQTT 5 §4.1). Pure data, no I/O.

A session belongs to a device id (the certificate CN), never to a client id a peer chose, so only the holder of that
certificate can resume it. It holds:

- ``awaiting_rel``: QoS 2 packet ids from the device that were committed and PUBREC'd, whose PUBREL has not come.
  A resend of such an id after a reconnect is answered with PUBREC again and records nothing (no duplicate).
- ``outgoing``: server-to-device QoS 1/2 messages sent and not yet fully acknowledged, by packet id; redelivered
  (DUP, or PUBREL for those already PUBREC'd) when the session resumes (MQTT-4.4.0-1).
- ``queue``: messages waiting for the in-flight window, or for the device to come back (persistent sessions only);
  bounded in count and bytes, the oldest dropped and counted.
- subscriptions (kept by the server's index; the session only lists the filters to remove them on expiry).

Kept in memory and, for persistent sessions, journaled to SQLite in batches (:mod:`edgegw.mqtt.sessiondb`): the
broker tells a :class:`Journal` what changed; nothing here does I/O (see docs/MQTT.md "Across a gateway restart").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from edgegw.mqtt.packets import NO_PROPERTIES, Properties, Will

if TYPE_CHECKING:
    from edgegw.mqtt.subscriptions import Subscription


@dataclass(frozen=True, slots=True)
class Message:
    """An application message as routed inside the gateway (the publisher's topic alias already resolved)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: Properties = NO_PROPERTIES
    """Only the properties forwarded to subscribers (MQTT 5 §3.3.2.3): no topic alias, no subscription id."""
    sender: str | None = None
    """Device id of the publisher (for no-local), None for the uplink / gateway."""
    expires_at: float | None = None
    """Monotonic deadline from the Message Expiry Interval; expired messages are never sent (MQTT-3.3.2-5)."""

    @property
    def size(self) -> int:
        return len(self.topic) + len(self.payload) + 32


@dataclass(slots=True)
class Outgoing:
    """One server-to-device QoS 1/2 publish in flight. ``released`` once the device PUBREC'd a QoS 2 message."""

    message: Message
    qos: int
    subscription_ids: tuple[int, ...] = ()
    retain: bool = False
    released: bool = False
    row: int = 0
    """Its row in the session journal (0: not journaled, e.g. QoS 0 or a session that ends with its connection)."""


@dataclass(slots=True)
class SessionState:
    """The part of a session the protocol engine drives (:class:`edgegw.mqtt.connection.MQTTConnection`)."""

    max_queued: int = 1000
    max_queued_bytes: int = 1 << 20
    awaiting_rel: set[int] = field(default_factory=set)
    qos2_pending: set[int] = field(default_factory=set)
    """QoS 2 ids from the device handed to the outbox and not yet committed (on this or an earlier connection):
    a resend on a new connection waits for that commit instead of becoming a second record."""
    outgoing: dict[int, Outgoing] = field(default_factory=dict)
    queue: deque[Outgoing] = field(default_factory=deque)
    queued_bytes: int = 0
    dropped: int = 0
    """Messages dropped because the queue was full (oldest first)."""
    next_packet_id: int = 1
    on_finished: Callable[[Outgoing], None] | None = None
    """Told when a journaled message leaves the session for good (acknowledged, dropped, expired)."""

    def finished(self, item: Outgoing) -> None:
        if item.row and self.on_finished is not None:
            self.on_finished(item)

    def enqueue(self, item: Outgoing) -> bool:
        """Queue ``item``; past the caps drop the oldest. False if ``item`` itself could not be kept."""
        size = item.message.size
        if size > self.max_queued_bytes:
            self.dropped += 1
            self.finished(item)
            return False
        while self.queue and (len(self.queue) >= self.max_queued or self.queued_bytes + size > self.max_queued_bytes):
            old = self.queue.popleft()
            self.queued_bytes -= old.message.size
            self.dropped += 1
            self.finished(old)
        self.queue.append(item)
        self.queued_bytes += size
        return True

    def dequeue(self) -> Outgoing:
        item = self.queue.popleft()
        self.queued_bytes -= item.message.size
        return item

    def allocate_packet_id(self) -> int:
        """A packet id not in use by an outgoing message (the caller bounds ``outgoing`` below 65535)."""
        pid = self.next_packet_id
        while pid in self.outgoing:
            pid = pid % 65535 + 1
        self.next_packet_id = pid % 65535 + 1
        return pid


@dataclass(slots=True)
class Session:
    """A device's session as the server keeps it between connections."""

    device_id: str
    state: SessionState
    expiry: int = 0
    """Seconds the session outlives its connection (0: ends with it; 0xFFFFFFFF: never, capped by config)."""
    filters: dict[str, Subscription] = field(default_factory=dict)
    """Topic filter -> its subscription (kept here so the server can drop them all from its index)."""
    will: Will | None = None
    protocol_level: int = 4
    disconnected_at: float | None = None
    """Wall-clock time the last connection ended (None while connected): the expiry countdown's start."""
    durable: bool = False
    """Journaled (persistent: session expiry > 0); the journal must hear when it ends."""


class Journal(Protocol):
    """Where the broker reports changes to persistent sessions (:class:`edgegw.mqtt.sessiondb.SessionDB`). Every
    call is synchronous and cheap (an append); the journal writes them in batches."""

    def session_changed(self, session: Session) -> None: ...
    def session_dropped(self, key: str) -> None: ...
    def message_added(self, key: str, item: Outgoing) -> None: ...
    def message_done(self, item: Outgoing) -> None: ...
    def retained_changed(self, topic: str) -> None: ...


class NoJournal:
    """Nothing is written (a broker without a session store, e.g. in unit tests)."""

    def session_changed(self, session: Session) -> None:
        pass

    def session_dropped(self, key: str) -> None:
        pass

    def message_added(self, key: str, item: Outgoing) -> None:
        pass

    def message_done(self, item: Outgoing) -> None:
        pass

    def retained_changed(self, topic: str) -> None:
        pass
