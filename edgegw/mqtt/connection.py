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

from dataclasses import dataclass
from enum import Enum, auto

from edgegw.mqtt.codec import FrameReader, MQTTProtocolError, decode_packet, encode_packet
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    NO_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Packet,
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


class ConnectionState(Enum):
    AWAIT_CONNECT = auto()
    AUTHORIZING = auto()
    CONNECTED = auto()
    CLOSED = auto()


# --- Events (what the peer did) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    connect: Connect


@dataclass(frozen=True, slots=True)
class PublishReceived:
    """A PUBLISH that is new to this connection. At QoS 1/2 the shell must answer with :meth:`ack_publish`."""

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

# Protocol levels we can say a CONNACK in, to refuse a version cleanly (MQTT-3.1.2-2).
_SUPPORTED_LEVELS = (MQTT_311, MQTT_5)


class MQTTConnection:
    """One device connection, server side.

    ``receive_maximum`` bounds QoS 1/2 publishes that await our acknowledgement (MQTT 5 §3.3.4); for 3.1.1 peers
    the shell applies the same bound as backpressure by not reading (see :attr:`inflight`).
    """

    def __init__(self, *, max_packet_size: int, receive_maximum: int = 64) -> None:
        self.state = ConnectionState.AWAIT_CONNECT
        self.protocol_level = MQTT_311
        self.keepalive = 0
        self.client_id = ""
        self.close_reason: ConnectionClosed | None = None
        self._frames = FrameReader(max_packet_size)
        self._receive_maximum = receive_maximum
        self._max_packet_size = max_packet_size
        self._out: list[bytes] = []
        # Packet ids of QoS 1/2 publishes handed to the shell and not yet acknowledged, with their QoS.
        self._awaiting_ack: dict[int, int] = {}
        # QoS 2 packet ids we sent PUBREC for and whose PUBREL has not come (MQTT 5 §4.3.3, method B).
        self._awaiting_rel: set[int] = set()

    # --- input ---------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Buffer ``data`` and return the events it completes. After CLOSED, input is ignored."""
        if self.state is ConnectionState.CLOSED:
            return []
        self._frames.feed(data)
        return self.pending_events()

    def pending_events(self) -> list[Event]:
        events: list[Event] = []
        try:
            while self.state in (ConnectionState.AWAIT_CONNECT, ConnectionState.CONNECTED):
                frame = self._frames.next_frame()
                if frame is None:
                    break
                event = self._handle(decode_packet(frame[0], frame[1], self.protocol_level))
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
        if isinstance(packet, Disconnect):
            self.state = ConnectionState.CLOSED
            self.close_reason = ConnectionClosed(packet.reason_code, "client disconnected", by_peer=True)
            return self.close_reason
        if isinstance(packet, Connect):
            raise MQTTProtocolError("second CONNECT on one connection")  # MQTT-3.1.0-2
        # PUBACK/PUBREC/PUBCOMP answer server-to-device publishes (downlink, MQTT engine issue); until the server
        # sends any, receiving one is a protocol error, as are client-bound packets (CONNACK, SUBACK, ...).
        raise MQTTProtocolError(f"unexpected {type(packet).__name__.upper()} from client")

    def _on_connect(self, c: Connect) -> Event:
        self.protocol_level = c.protocol_level if c.protocol_level in _SUPPORTED_LEVELS else MQTT_311
        if c.protocol_name != "MQTT" or c.protocol_level not in _SUPPORTED_LEVELS:
            # MQTT-3.1.2-2: answer 0x01 (3.1.1) / 0x84 (5) and close. MQTT 3.1 ("MQIsdp", level 3) lands here.
            self._send(Connack(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION))
            return self._close(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                               f"unsupported protocol {c.protocol_name!r} level {c.protocol_level}", by_peer=False)
        self.keepalive = c.keepalive
        self.client_id = c.client_id
        self.state = ConnectionState.AUTHORIZING
        return ConnectRequested(c)

    def _on_publish(self, p: Publish) -> Event | None:
        if not p.topic or "+" in p.topic or "#" in p.topic:
            # MQTT-3.3.2-2 (no wildcards); an empty topic needs a topic alias, which we do not offer yet.
            raise MQTTProtocolError(f"invalid topic name {p.topic!r}", ReasonCode.TOPIC_NAME_INVALID)
        if self.protocol_level == MQTT_5:
            if PropertyId.TOPIC_ALIAS in p.properties.values:
                # We advertise Topic Alias Maximum 0 (MQTT-3.3.2-8 makes any alias a protocol error then).
                raise MQTTProtocolError("topic alias not offered", ReasonCode.TOPIC_ALIAS_INVALID)
            if p.properties.subscription_ids:
                raise MQTTProtocolError("subscription identifier in a client PUBLISH")  # MQTT-3.3.4-6
        if p.qos == 0:
            return PublishReceived(p, p.topic)
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
        if len(self._awaiting_ack) >= self._receive_maximum and self.protocol_level == MQTT_5:
            raise MQTTProtocolError("receive maximum exceeded", ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)  # §3.3.4
        self._awaiting_ack[p.packet_id] = p.qos
        return PublishReceived(p, p.topic)

    # --- actions -------------------------------------------------------------------------------------------

    def accept(self, *, session_present: bool = False, properties: Properties = NO_PROPERTIES) -> None:
        self._require(ConnectionState.AUTHORIZING, "accept")
        if self.protocol_level == MQTT_5 and not properties:
            properties = Properties(values={
                PropertyId.RECEIVE_MAXIMUM: self._receive_maximum,
                PropertyId.MAXIMUM_PACKET_SIZE: self._max_packet_size,
                PropertyId.TOPIC_ALIAS_MAXIMUM: 0,
                PropertyId.RETAIN_AVAILABLE: 0,
                PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE: 0,
                PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE: 0,
                PropertyId.SHARED_SUBSCRIPTION_AVAILABLE: 0,
                PropertyId.MAXIMUM_QOS: 2,
            })
        self._send(Connack(session_present, ReasonCode.SUCCESS, properties))
        self.state = ConnectionState.CONNECTED

    def refuse(self, reason: ReasonCode, detail: str) -> ConnectionClosed:
        self._require(ConnectionState.AUTHORIZING, "refuse")
        self._send(Connack(False, reason))
        return self._close(reason, detail, by_peer=False)

    def ack_publish(self, packet_id: int, reason: ReasonCode = ReasonCode.SUCCESS) -> None:
        """Acknowledge a QoS 1/2 publish (PUBACK / PUBREC). Call only once it is durable, or refused."""
        qos = self._awaiting_ack.pop(packet_id, None)
        if qos is None:
            raise RuntimeError(f"no publish {packet_id} awaits acknowledgement")  # a bug in the shell
        if self.state is not ConnectionState.CONNECTED:
            return  # the connection died first; the device resends and gets a duplicate record at worst
        if self.protocol_level == MQTT_311 and reason.is_error:
            # 3.1.1 has no negative acknowledgement: the only refusal is closing (MQTT-3.3.5-2).
            self.close(reason, f"publish {packet_id} refused: {reason.name}")
            return
        if qos == 1:
            self._send(Puback(packet_id, reason))
        else:
            if not reason.is_error:
                self._awaiting_rel.add(packet_id)
            self._send(Pubrec(packet_id, reason))

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
