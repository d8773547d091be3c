"""Device -> gateway publishes in the engine (a mixin of :class:`~edgegw.mqtt.connection.MQTTConnection`): the
checks of a received PUBLISH (topic alias, topic name, duplicate and reused packet ids, our Receive Maximum) and
its acknowledgement once durable or refused (PUBACK / PUBREC, one by one or per group commit), in the order the
PUBLISHes came (MQTT-4.6.0-2, -3): an answer decided early (a refusal, a message the pipeline drops) waits for the
answers of earlier PUBLISHes still being committed.

No state transition happens here (those stay in connection.py); a refusal that must close calls ``close``.
"""

from __future__ import annotations

import struct
from collections import deque
from itertools import repeat
from typing import TYPE_CHECKING

from edgegw.mqtt._connection_events import (
    ConnectionClosed,
    ConnectionState,
    Event,
    PublishReceived,
)
from edgegw.mqtt.codec import MQTTProtocolError, encode_packet, encode_puback_ok
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Packet,
    PacketType,
    PropertyId,
    Puback,
    Publish,
    Pubrec,
    ReasonCode,
)
from edgegw.mqtt.session import SessionState

# The bytes of codec.encode_puback_ok (type, remaining length 2, packet id), packed in the C-level map of
# ack_committed: no Python call per acknowledged message.
_PUBACK_OK_HEAD = (PacketType.PUBACK << 4) << 8 | 2
_PUBACK_OK_PACK = struct.Struct("!HH").pack


class InboundPublishes:
    """Receiving device publishes; the attributes are :class:`~edgegw.mqtt.connection.MQTTConnection`'s."""

    state: ConnectionState
    protocol_level: int
    session: SessionState
    _topic_alias_maximum: int
    _max_topic_length: int
    _max_topic_levels: int
    _receive_maximum: int
    _aliases: dict[int, str]
    _valid_topic: str | None
    _out: list[bytes]
    _awaiting_ack: dict[int, int]
    _rel_here: set[int]
    _order: deque[int]
    _held: dict[int, bytes]

    if TYPE_CHECKING:
        @property
        def _awaiting_rel(self) -> set[int]: ...

        def _send(self, packet: Packet) -> None: ...

        def close(self, reason: ReasonCode, detail: str) -> ConnectionClosed: ...

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
        if p.packet_id in self._awaiting_ack or (self._held and p.packet_id in self._held):
            # The same id while its first copy is still being committed (or its answer waits for an earlier one):
            # a retransmission (DUP), which the pending answer covers. Without DUP the client reused an id in
            # flight (MQTT 5 §4.3.2).
            if p.dup:
                return None
            raise MQTTProtocolError(f"packet id {p.packet_id} reused while in flight",
                                    ReasonCode.PACKET_IDENTIFIER_IN_USE)
        if p.qos == 2 and p.packet_id in self._awaiting_rel:
            # Already committed and PUBREC'd; the device missed our PUBREC. Answer again, record nothing new.
            self._order.append(p.packet_id)
            self._emit(p.packet_id, encode_packet(Pubrec(p.packet_id), self.protocol_level))
            return None
        if p.qos == 2 and p.packet_id in self.session.qos2_pending:
            # Sent on an earlier connection of this session and still being committed: adopt it; the shell
            # acknowledges it here once that commit completes (:meth:`awaits_ack`). No second record.
            self._awaiting_ack[p.packet_id] = 2
            self._order.append(p.packet_id)
            return None
        if (self.protocol_level == MQTT_5
                and len(self._awaiting_ack) + len(self._rel_here) + len(self._held) >= self._receive_maximum):
            raise MQTTProtocolError("receive maximum exceeded", ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)  # §3.3.4
        self._awaiting_ack[p.packet_id] = p.qos
        self._order.append(p.packet_id)
        if p.qos == 2:
            self.session.qos2_pending.add(p.packet_id)
        return PublishReceived(p, topic)

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
            self._emit(packet_id, encode_puback_ok(packet_id) if reason is ReasonCode.SUCCESS
                       else encode_packet(Puback(packet_id, reason), self.protocol_level))
        else:
            self._emit(packet_id, encode_packet(Pubrec(packet_id, reason), self.protocol_level))

    def _emit(self, packet_id: int, data: bytes) -> None:
        """The answer to the PUBLISH ``packet_id``: sent now if every earlier PUBLISH has been answered, else held
        until they are (MQTT-4.6.0-2, -3); then whatever was held behind it goes too."""
        order = self._order
        if not order or order[0] != packet_id:
            self._held[packet_id] = data
            return
        order.popleft()
        out = self._out
        out.append(data)
        held = self._held
        while held and order and order[0] in held:
            out.append(held.pop(order.popleft()))

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
        order = self._order
        n = len(packet_ids)
        if not qos2 and not self._held and len(order) >= n and order[0] == packet_ids[0] \
                and order[n - 1] == packet_ids[-1]:
            # The common group: exactly the n oldest PUBLISHes still unanswered (the group's ids are in the order
            # they came, so matching ends mean a matching run), answered in one join.
            for _ in range(n):
                order.popleft()
            self._out.append(b"".join(map(_PUBACK_OK_PACK, repeat(_PUBACK_OK_HEAD), packet_ids)))
            return qos2
        for packet_id, q in zip(packet_ids, qos):
            self._emit(packet_id, encode_puback_ok(packet_id) if q == 1
                       else encode_packet(Pubrec(packet_id), self.protocol_level))
        return qos2

    def awaits_ack(self, packet_id: int) -> bool:
        """True if a QoS 1/2 publish with this id awaits :meth:`ack_publish` on this connection."""
        return packet_id in self._awaiting_ack
