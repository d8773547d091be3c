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

Layout: this module holds the state machine (:class:`MQTTConnection`: CONNECT, accept / refuse, DISCONNECT,
close, errors; every import path names it here); the rest of its methods live in one mixin per job, on the same
instance: :mod:`edgegw.mqtt._connection_inbound` (device -> gateway publishes: checks, PUBACK / PUBREC) and
:mod:`edgegw.mqtt._connection_outbound` (gateway -> device publishes: window, send, their acks). The states and
events are in :mod:`edgegw.mqtt._connection_events`; the names below are the same objects.
"""

from __future__ import annotations

from collections import deque

from edgegw.mqtt._connection_events import (
    ConnectionClosed,
    ConnectionState,
    ConnectRequested,
    Event,
    PublishReceived,
    SubscribeRequested,
    UnsubscribeRequested,
)
from edgegw.mqtt._connection_inbound import InboundPublishes
from edgegw.mqtt._connection_outbound import OutboundPublishes
from edgegw.mqtt.codec import (
    FrameReader,
    MalformedPacket,
    MQTTProtocolError,
    decode_packet,
    decode_publish,
    encode_packet,
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
from edgegw.mqtt.session import SessionState

__all__ = [
    "SESSION_EXPIRY_NEVER",
    "ConnectRequested",
    "ConnectionClosed",
    "ConnectionState",
    "Event",
    "MQTTConnection",
    "PublishReceived",
    "SubscribeRequested",
    "UnsubscribeRequested",
]

SESSION_EXPIRY_NEVER = 0xFFFFFFFF


_PUBLISH = PacketType.PUBLISH.value  # a plain int: compared once per received packet

# Protocol levels we can say a CONNACK in, to refuse a version cleanly (MQTT-3.1.2-2).
_SUPPORTED_LEVELS = (MQTT_311, MQTT_5)


class MQTTConnection(InboundPublishes, OutboundPublishes):
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
        # QoS 1/2 publishes not answered yet, in the order they came, and answers decided but waiting for earlier
        # ones (_connection_inbound.InboundPublishes._emit): PUBACKs and PUBRECs leave in that order.
        self._order: deque[int] = deque()
        self._held: dict[int, bytes] = {}

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
        """QoS 1/2 publishes received and not yet answered on the wire: waiting for the shell, or answered and held
        for an earlier one (the device still counts them in flight, and the shell pauses reading on this)."""
        return len(self._awaiting_ack) + len(self._held)

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
            elif not self._send_publish(pid, out, dup=True, now=None):
                # Larger than this connection's Maximum Packet Size (the device came back with a smaller one):
                # dropped as if delivered, as send_publish does, rather than hold a slot of the window for ever.
                del self.session.outgoing[pid]
                self.session.finished(out)

    def refuse(self, reason: ReasonCode, detail: str) -> ConnectionClosed:
        self._require(ConnectionState.AUTHORIZING, "refuse")
        self._send(Connack(False, reason))
        return self._close(reason, detail, by_peer=False)

    def ack_subscribe(self, packet_id: int, reason_codes: tuple[int, ...]) -> None:
        self._require(ConnectionState.CONNECTED, "ack_subscribe")
        if self.protocol_level == MQTT_311:
            # 3.1.1 SUBACK return codes: granted QoS or 0x80 failure (MQTT-3.9.3).
            reason_codes = tuple(0x80 if c >= 0x80 else c for c in reason_codes)
        self._send(Suback(packet_id, reason_codes))

    def ack_unsubscribe(self, packet_id: int, reason_codes: tuple[int, ...]) -> None:
        self._require(ConnectionState.CONNECTED, "ack_unsubscribe")
        self._send(Unsuback(packet_id, reason_codes))

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
