"""The server side of one MQTT connection as a pure state machine: bytes in, events out, bytes to send.

No sockets, no clocks, no asyncio. The shell (:mod:`edgegw.mqtt.server`) feeds received bytes with
:meth:`MQTTConnection.receive_data`, acts on the events, answers with the explicit actions (:meth:`accept`,
:meth:`refuse`, :meth:`ack_publish`, ...) and writes whatever :meth:`data_to_send` returns.

Rule (as in h11's ``_state.py``): everything that decides a state transition lives in this file.

States::

    AWAIT_CONNECT --CONNECT--> AUTHORIZING --accept()--> CONNECTED --DISCONNECT / error / close()--> CLOSED
                                          \\--refuse()--> CLOSED

Packets that arrive after CONNECT but before the shell's decision stay buffered, unparsed (MQTT-3.1.4-5: the server
must not process them before it has accepted the connection); :meth:`accept` makes them available to
:meth:`pending_events`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, auto
from itertools import repeat

from edgegw.mqtt.codec import (
    FrameReader,
    MalformedPacket,
    MQTTProtocolError,
    decode_packet,
    decode_publish,
    encode_packet,
    encode_puback_ok,
    encode_publish,
    misplaced_property,
)
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    NO_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from edgegw.mqtt.session import Outgoing, SessionState

SESSION_EXPIRY_NEVER = 0xFFFFFFFF


class ConnectionState(Enum):
    AWAIT_CONNECT = auto()
    AUTHORIZING = auto()
    CONNECTED = auto()
    CLOSED = auto()


# --- Events (what the peer did) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    connect: Connect


@dataclass(slots=True)
class PublishReceived:
    """A PUBLISH that is new to this connection. At QoS 1/2 the shell must answer with :meth:`ack_publish`.

    Treated as immutable, but not frozen: one per device message (see :class:`~edgegw.mqtt.packets.Publish`)."""

    publish: Publish
    topic: str  # after topic-alias resolution (MQTT 5 §3.3.2.3.4)


@dataclass(frozen=True, slots=True)
class SubscribeRequested:
    subscribe: Subscribe


@dataclass(frozen=True, slots=True)
class UnsubscribeRequested:
    unsubscribe: Unsubscribe


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over. ``reason_code`` is SUCCESS for a clean client DISCONNECT."""

    reason_code: ReasonCode
    detail: str
    by_peer: bool


Event = ConnectRequested | PublishReceived | SubscribeRequested | UnsubscribeRequested | ConnectionClosed

_PUBLISH = PacketType.PUBLISH.value  # a plain int: compared once per received packet

# The bytes of codec.encode_puback_ok (type, remaining length 2, packet id), packed in the C-level map of
# ack_committed: no Python call per acknowledged message.
_PUBACK_OK_HEAD = (PacketType.PUBACK << 4) << 8 | 2
_PUBACK_OK_PACK = struct.Struct("!HH").pack

# Protocol levels we can say a CONNACK in, to refuse a version cleanly (MQTT-3.1.2-2).
_SUPPORTED_LEVELS = (MQTT_311, MQTT_5)


class MQTTConnection:
    """One device connection, server side.

    ``receive_maximum`` bounds QoS 1/2 publishes that await our acknowledgement (MQTT 5 §3.3.4); for 3.1.1 peers
    the shell applies the same bound as backpressure by not reading (see :attr:`inflight`).
    """

    def __init__(self, *, max_packet_size: int, receive_maximum: int = 64, topic_alias_maximum: int = 0,
                 max_topic_length: int = 65535, max_topic_levels: int = 0, max_keepalive: int = 0,
                 max_session_expiry: int = SESSION_EXPIRY_NEVER, max_inflight_out: int = 65535) -> None:
        self.state = ConnectionState.AWAIT_CONNECT
        self.protocol_level = MQTT_311
        self.keepalive = 0
        """Effective keep-alive in seconds: the client's, or ``max_keepalive`` if it asked for 0 or more."""
        self.client_id = ""
        self.close_reason: ConnectionClosed | None = None
        self.session = SessionState()
        self.session_expiry = 0
        """Seconds the session outlives this connection, as granted (capped by ``max_session_expiry``)."""
        self.client_receive_maximum = 65535  # MQTT 5 §3.1.2.11.3: absent means 65,535
        self.client_max_packet_size: int | None = None  # MQTT 5 §3.1.2.11.4: absent means no limit
        self.dropped_too_large = 0
        """Outgoing publishes dropped because they exceed the client's Maximum Packet Size (MQTT-3.1.2-25)."""
        self._frames = FrameReader(max_packet_size)
        self._receive_maximum = receive_maximum
        self._max_packet_size = max_packet_size
        self._topic_alias_maximum = topic_alias_maximum
        self._max_topic_length = max_topic_length
        self._max_topic_levels = max_topic_levels
        self._max_keepalive = max_keepalive
        self._max_session_expiry = max_session_expiry
        self._max_inflight_out = min(max_inflight_out, 65535)
        self._requested_session_expiry = 0
        self._keepalive_overridden = False
        self._aliases: dict[int, str] = {}  # client -> server topic aliases (MQTT 5 §3.3.2.3.4), per connection
        # The last topic name that passed topic_problem (whose limits are fixed per connection); None at first, so an
        # empty topic name is checked (and refused) like any other.
        self._valid_topic: str | None = None
        self._out: list[bytes] = []
        # Packet ids of QoS 1/2 publishes handed to the shell and not yet acknowledged, with their QoS.
        self._awaiting_ack: dict[int, int] = {}
        # QoS 2 ids PUBREC'd on this connection whose PUBREL has not come: they still count against our Receive
        # Maximum until PUBCOMP (MQTT 5 §4.9). Per connection: the quota starts afresh on each one.
        self._rel_here: set[int] = set()

    @property
    def _awaiting_rel(self) -> set[int]:
        # QoS 2 packet ids we sent PUBREC for and whose PUBREL has not come (MQTT 5 §4.3.3, method B). Kept in the
        # session so that a resend after a reconnect is recognised and not recorded twice.
        return self.session.awaiting_rel

    # --- input ---------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Buffer ``data`` and return the events it completes. After CLOSED, input is ignored."""
        if self.state is ConnectionState.CLOSED:
            return []
        self._frames.feed(data)
        return self.pending_events()

    def pending_events(self) -> list[Event]:
        events: list[Event] = []
        frames = self._frames
        try:
            while (state := self.state) is ConnectionState.CONNECTED or state is ConnectionState.AWAIT_CONNECT:
                frame = frames.next_frame()
                if frame is None:
                    break
                if frame[0] >> 4 == _PUBLISH and state is ConnectionState.CONNECTED:
                    # One per device message: straight to _on_publish, without the generic decode dispatch and
                    # _handle's type tests (what _handle does for a PUBLISH when CONNECTED, no more).
                    publish = decode_publish(frame[0], frame[1], self.protocol_level)
                    if self.protocol_level == MQTT_5 and publish.properties:
                        problem = misplaced_property(publish)
                        if problem is not None:
                            raise MalformedPacket(problem)  # MQTT 5 §2.2.2.2
                    event = self._on_publish(publish)
                    if event is not None:
                        events.append(event)
                    continue
                packet = decode_packet(frame[0], frame[1], self.protocol_level)
                if self.protocol_level == MQTT_5 or (isinstance(packet, Connect) and packet.protocol_level == MQTT_5):
                    problem = misplaced_property(packet)
                    if problem is not None:
                        raise MalformedPacket(problem)  # MQTT 5 §2.2.2.2
                event = self._handle(packet)
                if event is not None:
                    events.append(event)
        except MQTTProtocolError as exc:
            events.append(self._fail(exc.reason_code, str(exc)))
        return events

    @property
    def inflight(self) -> int:
        """QoS 1/2 publishes received and not yet acknowledged by the shell."""
        return len(self._awaiting_ack)

    def _handle(self, packet: Packet) -> Event | None:
        if self.state is ConnectionState.AWAIT_CONNECT:
            if not isinstance(packet, Connect):
                raise MQTTProtocolError("first packet is not CONNECT")  # MQTT-3.1.0-1
            return self._on_connect(packet)
        if isinstance(packet, Publish):
            return self._on_publish(packet)
        if isinstance(packet, Pubrel):
            # MQTT 5 §4.3.3: answer PUBCOMP whether or not we still know the id (a resend after reconnect).
            known = packet.packet_id in self._awaiting_rel
            self._awaiting_rel.discard(packet.packet_id)
            self._rel_here.discard(packet.packet_id)
            reason = ReasonCode.SUCCESS if known else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
            self._send(Pubcomp(packet.packet_id, reason if self.protocol_level == MQTT_5 else ReasonCode.SUCCESS))
            return None
        if isinstance(packet, Pingreq):
            self._send(Pingresp())
            return None
        if isinstance(packet, Subscribe):
            return SubscribeRequested(packet)
        if isinstance(packet, Unsubscribe):
            return UnsubscribeRequested(packet)
        if isinstance(packet, Puback | Pubrec | Pubcomp):
            self._on_delivery_ack(packet)
            return None
        if isinstance(packet, Disconnect):
            expiry = packet.properties.get(PropertyId.SESSION_EXPIRY_INTERVAL)
            if isinstance(expiry, int):
                if self._requested_session_expiry == 0 and expiry != 0:
                    raise MQTTProtocolError("session expiry set on DISCONNECT after 0 on CONNECT")  # MQTT-3.14.2-2
                self.session_expiry = min(expiry, self._max_session_expiry)
            self.state = ConnectionState.CLOSED
            self.close_reason = ConnectionClosed(packet.reason_code, "client disconnected", by_peer=True)
            return self.close_reason
        if isinstance(packet, Connect):
            raise MQTTProtocolError("second CONNECT on one connection")  # MQTT-3.1.0-2
        # Client-bound packets (CONNACK, SUBACK, PINGRESP, ...) from a client.
        raise MQTTProtocolError(f"unexpected {type(packet).__name__.upper()} from client")

    def _on_connect(self, c: Connect) -> Event:
        self.protocol_level = c.protocol_level if c.protocol_level in _SUPPORTED_LEVELS else MQTT_311
        if c.protocol_name != "MQTT" or c.protocol_level not in _SUPPORTED_LEVELS:
            # MQTT-3.1.2-2: answer 0x01 (3.1.1) / 0x84 (5) and close. MQTT 3.1 ("MQIsdp", level 3) lands here.
            self._send(Connack(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION))
            return self._close(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                               f"unsupported protocol {c.protocol_name!r} level {c.protocol_level}", by_peer=False)
        props = c.properties
        if self.protocol_level == MQTT_5:
            receive_max = props.get(PropertyId.RECEIVE_MAXIMUM)
            max_packet = props.get(PropertyId.MAXIMUM_PACKET_SIZE)
            if receive_max == 0 or max_packet == 0:
                raise MQTTProtocolError("Receive Maximum or Maximum Packet Size of 0")  # MQTT 5 §3.1.2.11.3/4
            if isinstance(receive_max, int):
                self.client_receive_maximum = receive_max
            if isinstance(max_packet, int):
                self.client_max_packet_size = max_packet
            expiry = props.get(PropertyId.SESSION_EXPIRY_INTERVAL, 0)
            self._requested_session_expiry = expiry if isinstance(expiry, int) else 0
        else:
            # MQTT 3.1.1: a clean session ends with the connection; otherwise it never expires (capped below).
            self._requested_session_expiry = 0 if c.clean_start else SESSION_EXPIRY_NEVER
        self.session_expiry = min(self._requested_session_expiry, self._max_session_expiry)
        self.keepalive = c.keepalive
        if self._max_keepalive and (c.keepalive == 0 or c.keepalive > self._max_keepalive):
            # MQTT 5 §3.2.2.3.14 Server Keep Alive: the client must use ours. A 3.1.1 client cannot be told, so it
            # is held to the same bound: silent for 1.5 x max_keepalive means gone.
            self.keepalive = self._max_keepalive
            self._keepalive_overridden = True
        self.client_id = c.client_id
        self.state = ConnectionState.AUTHORIZING
        return ConnectRequested(c)

    def topic_problem(self, topic: str) -> str | None:
        """Why ``topic`` is not an acceptable topic name here, or None (also used by the shell for wills)."""
        if not topic or "+" in topic or "#" in topic:
            return f"invalid topic name {topic!r}"  # MQTT-3.3.2-2 (no wildcards), MQTT-4.7.3-1 (not empty)
        if len(topic) > self._max_topic_length:
            return f"topic longer than {self._max_topic_length} characters"
        if self._max_topic_levels and topic.count("/") >= self._max_topic_levels:
            return f"topic has more than {self._max_topic_levels} levels"
        return None

    def _on_publish(self, p: Publish) -> Event | None:
        topic = p.topic
        if self.protocol_level == MQTT_5:
            alias = p.properties.values.get(PropertyId.TOPIC_ALIAS)
            if alias is not None:
                # MQTT-3.3.2-8/9: 0 or above the Topic Alias Maximum we sent is invalid.
                if not isinstance(alias, int) or not 0 < alias <= self._topic_alias_maximum:
                    raise MQTTProtocolError(f"topic alias {alias} outside 1..{self._topic_alias_maximum}",
                                            ReasonCode.TOPIC_ALIAS_INVALID)
                if topic:
                    problem = self.topic_problem(topic)
                    if problem is not None:
                        raise MQTTProtocolError(problem, ReasonCode.TOPIC_NAME_INVALID)
                    self._aliases[alias] = topic
                else:
                    known = self._aliases.get(alias)
                    if known is None:
                        # MQTT 5 §3.3.2.3.4: an alias with no mapping on this connection is a Protocol Error.
                        raise MQTTProtocolError(f"topic alias {alias} has no mapping")
                    topic = known
            if p.properties.subscription_ids:
                raise MQTTProtocolError("subscription identifier in a client PUBLISH")  # MQTT-3.3.4-6
        if topic != self._valid_topic:  # a device publishes to the same topic again and again: checked once
            problem = self.topic_problem(topic)
            if problem is not None:
                raise MQTTProtocolError(problem, ReasonCode.TOPIC_NAME_INVALID)
            self._valid_topic = topic
        if p.qos == 0:
            return PublishReceived(p, topic)
        assert p.packet_id is not None  # the codec guarantees it for QoS > 0
        if p.packet_id in self._awaiting_ack:
            # The same id while its first copy is still being committed: a retransmission (DUP), which the pending
            # acknowledgement will answer. Without DUP the client reused an id in flight (MQTT 5 §4.3.2).
            if p.dup:
                return None
            raise MQTTProtocolError(f"packet id {p.packet_id} reused while in flight",
                                    ReasonCode.PACKET_IDENTIFIER_IN_USE)
        if p.qos == 2 and p.packet_id in self._awaiting_rel:
            # Already committed and PUBREC'd; the device missed our PUBREC. Answer again, record nothing new.
            self._send(Pubrec(p.packet_id))
            return None
        if p.qos == 2 and p.packet_id in self.session.qos2_pending:
            # Sent on an earlier connection of this session and still being committed: adopt it; the shell
            # acknowledges it here once that commit completes (:meth:`awaits_ack`). No second record.
            self._awaiting_ack[p.packet_id] = 2
            return None
        if (self.protocol_level == MQTT_5
                and len(self._awaiting_ack) + len(self._rel_here) >= self._receive_maximum):
            raise MQTTProtocolError("receive maximum exceeded", ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)  # §3.3.4
        self._awaiting_ack[p.packet_id] = p.qos
        if p.qos == 2:
            self.session.qos2_pending.add(p.packet_id)
        return PublishReceived(p, topic)

    # --- actions -------------------------------------------------------------------------------------------

    def accept(self, *, session_present: bool = False, properties: Properties = NO_PROPERTIES,
               session: SessionState | None = None) -> None:
        """Send CONNACK. ``session`` is the device's resumed (or new) session state; in-flight server-to-device
        messages in it are sent again (DUP PUBLISH, or PUBREL once PUBREC'd: MQTT-4.4.0-1)."""
        self._require(ConnectionState.AUTHORIZING, "accept")
        if session is not None:
            self.session = session
        if self.protocol_level == MQTT_5 and not properties:
            # Absent capability properties mean "available" (retain, wildcards, subscription ids, shared
            # subscriptions, QoS 2: MQTT 5 §3.2.2.3); only the limits are stated.
            values: dict[PropertyId, int | str | bytes] = {
                PropertyId.RECEIVE_MAXIMUM: self._receive_maximum,
                PropertyId.MAXIMUM_PACKET_SIZE: self._max_packet_size,
                PropertyId.TOPIC_ALIAS_MAXIMUM: self._topic_alias_maximum,
            }
            if self._keepalive_overridden:
                values[PropertyId.SERVER_KEEP_ALIVE] = self.keepalive
            if self.session_expiry != self._requested_session_expiry:
                values[PropertyId.SESSION_EXPIRY_INTERVAL] = self.session_expiry
            properties = Properties(values=values)
        self._send(Connack(session_present, ReasonCode.SUCCESS, properties))
        self.state = ConnectionState.CONNECTED
        for pid, out in list(self.session.outgoing.items()):
            if out.released:
                self._send(Pubrel(pid))
            else:
                self._send_publish(pid, out, dup=True, now=None)

    def refuse(self, reason: ReasonCode, detail: str) -> ConnectionClosed:
        self._require(ConnectionState.AUTHORIZING, "refuse")
        self._send(Connack(False, reason))
        return self._close(reason, detail, by_peer=False)

    def ack_publish(self, packet_id: int, reason: ReasonCode = ReasonCode.SUCCESS) -> None:
        """Acknowledge a QoS 1/2 publish (PUBACK / PUBREC). Call only once it is durable, or refused."""
        qos = self._awaiting_ack.pop(packet_id, None)
        if qos is None:
            raise RuntimeError(f"no publish {packet_id} awaits acknowledgement")  # a bug in the shell
        if qos == 2:
            self.session.qos2_pending.discard(packet_id)
            if not reason.is_error:
                # Recorded in the session even if this connection died meanwhile: the device resends after
                # reconnecting and must get PUBREC, not a second record.
                self._awaiting_rel.add(packet_id)
                self._rel_here.add(packet_id)
        if self.state is not ConnectionState.CONNECTED:
            return  # the connection died first; the device resends and gets a duplicate record at worst
        if self.protocol_level == MQTT_311 and reason.is_error:
            # 3.1.1 has no negative acknowledgement: the only refusal is closing (MQTT-3.3.5-2).
            self.close(reason, f"publish {packet_id} refused: {reason.name}")
            return
        if qos == 1:
            # The common answer, one per device message, without building a Puback to encode it.
            self._out.append(encode_puback_ok(packet_id) if reason is ReasonCode.SUCCESS
                             else encode_packet(Puback(packet_id, reason), self.protocol_level))
        else:
            self._send(Pubrec(packet_id, reason))

    def ack_committed(self, packet_ids: list[int]) -> int:
        """:meth:`ack_publish` with Success for each of ``packet_ids`` (publishes now durable), in order. Returns
        how many of them were QoS 2.

        One call per device connection and group commit: the QoS 1 ids of a group cost a dict pop and a PUBACK
        each inside two C-level maps, instead of a Python call per message."""
        try:
            qos = list(map(self._awaiting_ack.pop, packet_ids))
        except KeyError as exc:
            raise RuntimeError(f"no publish {exc.args[0]} awaits acknowledgement") from None  # a bug in the shell
        qos2 = qos.count(2)
        if qos2:
            for packet_id, q in zip(packet_ids, qos):
                if q == 2:  # as in ack_publish: recorded in the session even if this connection died meanwhile
                    self.session.qos2_pending.discard(packet_id)
                    self._awaiting_rel.add(packet_id)
                    self._rel_here.add(packet_id)
        if self.state is not ConnectionState.CONNECTED:
            return qos2  # the connection died first; the device resends and gets a duplicate record at worst
        if not qos2:
            self._out.append(b"".join(map(_PUBACK_OK_PACK, repeat(_PUBACK_OK_HEAD), packet_ids)))
        else:
            for packet_id, q in zip(packet_ids, qos):
                if q == 1:
                    self._out.append(encode_puback_ok(packet_id))
                else:
                    self._send(Pubrec(packet_id))
        return qos2

    def awaits_ack(self, packet_id: int) -> bool:
        """True if a QoS 1/2 publish with this id awaits :meth:`ack_publish` on this connection."""
        return packet_id in self._awaiting_ack

    def ack_subscribe(self, packet_id: int, reason_codes: tuple[int, ...]) -> None:
        self._require(ConnectionState.CONNECTED, "ack_subscribe")
        if self.protocol_level == MQTT_311:
            # 3.1.1 SUBACK return codes: granted QoS or 0x80 failure (MQTT-3.9.3).
            reason_codes = tuple(0x80 if c >= 0x80 else c for c in reason_codes)
        self._send(Suback(packet_id, reason_codes))

    def ack_unsubscribe(self, packet_id: int, reason_codes: tuple[int, ...]) -> None:
        self._require(ConnectionState.CONNECTED, "ack_unsubscribe")
        self._send(Unsuback(packet_id, reason_codes))

    # --- server -> device publishes ---------------------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """Room in the outgoing in-flight window (the client's Receive Maximum, capped by ours)."""
        return (self.state is ConnectionState.CONNECTED
                and len(self.session.outgoing) < min(self.client_receive_maximum, self._max_inflight_out))

    def send_publish(self, out: Outgoing, now: float) -> bool:
        """Send a message to the device; QoS 1/2 only while :attr:`can_send`. ``now`` (monotonic) adjusts the
        Message Expiry Interval (MQTT-3.3.2-6). False if it was dropped because it exceeds the client's Maximum
        Packet Size (MQTT-3.1.2-25: as if delivered)."""
        self._require(ConnectionState.CONNECTED, "send_publish")
        pid = None
        if out.qos:
            pid = self.session.allocate_packet_id()
            self.session.outgoing[pid] = out
        if self._send_publish(pid, out, dup=False, now=now):
            return True
        if pid is not None:
            del self.session.outgoing[pid]
            self.session.finished(out)  # dropped as if delivered: its journal row goes too
        return False

    def _send_publish(self, pid: int | None, out: Outgoing, *, dup: bool, now: float | None) -> bool:
        m = out.message
        props = m.properties
        if self.protocol_level == MQTT_5 and (out.subscription_ids or (m.expires_at is not None and now is not None)):
            values = dict(props.values)
            if m.expires_at is not None and now is not None:
                values[PropertyId.MESSAGE_EXPIRY_INTERVAL] = max(1, int(m.expires_at - now + 0.5))
            props = Properties(values=values, user=props.user, subscription_ids=out.subscription_ids)
        data = encode_publish(Publish(m.topic, m.payload, out.qos, out.retain, dup, pid, props), self.protocol_level)
        if self.client_max_packet_size is not None and len(data) > self.client_max_packet_size:
            self.dropped_too_large += 1
            return False
        self._out.append(data)
        return True

    def _on_delivery_ack(self, packet: Puback | Pubrec | Pubcomp) -> None:
        pid = packet.packet_id
        out = self.session.outgoing.get(pid)
        if isinstance(packet, Puback):
            if out is None or out.qos != 1:
                raise MQTTProtocolError(f"PUBACK for unknown packet id {pid}")
            self.session.finished(self.session.outgoing.pop(pid))
        elif isinstance(packet, Pubrec):
            if out is None or out.qos != 2:
                raise MQTTProtocolError(f"PUBREC for unknown packet id {pid}")
            if packet.reason_code.is_error:  # MQTT 5 §4.3.3: the exchange ends, the id is free
                self.session.finished(self.session.outgoing.pop(pid))
                return
            out.released = True
            self._send(Pubrel(pid))
        else:
            if out is None or not out.released:
                raise MQTTProtocolError(f"PUBCOMP for unknown packet id {pid}")
            self.session.finished(self.session.outgoing.pop(pid))

    def close(self, reason: ReasonCode, detail: str) -> ConnectionClosed:
        """Server-initiated close. MQTT 5 peers get a DISCONNECT with the reason (§3.14); 3.1.1 peers just EOF."""
        if self.state is ConnectionState.CLOSED:
            assert self.close_reason is not None
            return self.close_reason
        if self.state is ConnectionState.CONNECTED and self.protocol_level == MQTT_5:
            self._send(Disconnect(reason))
        return self._close(reason, detail, by_peer=False)

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    # --- internals -----------------------------------------------------------------------------------------

    def _fail(self, reason: ReasonCode, detail: str) -> ConnectionClosed:
        # A CONNECT that failed to decode leaves the version unknown, so there is no CONNACK we could say it in:
        # just close (MQTT 5 §4.13.1 allows that for any malformed packet).
        if self.state is ConnectionState.CONNECTED and self.protocol_level == MQTT_5:
            self._send(Disconnect(reason))
        return self._close(reason, detail, by_peer=True)

    def _close(self, reason: ReasonCode, detail: str, *, by_peer: bool) -> ConnectionClosed:
        self.state = ConnectionState.CLOSED
        self.close_reason = ConnectionClosed(reason, detail, by_peer)
        return self.close_reason

    def _send(self, packet: Packet) -> None:
        self._out.append(encode_packet(packet, self.protocol_level))

    def _require(self, state: ConnectionState, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{action}() in state {self.state.name}")
