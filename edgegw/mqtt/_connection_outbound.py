"""Gateway -> device publishes in the engine (a mixin of :class:`~edgegw.mqtt.connection.MQTTConnection`): the
outgoing in-flight window (the client's Receive Maximum), sending (Message Expiry, subscription ids, the client's
Maximum Packet Size) and the device's PUBACK / PUBREC / PUBCOMP for them.

No state transition happens here (those stay in connection.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgegw.mqtt._connection_events import ConnectionState
from edgegw.mqtt.codec import MQTTProtocolError, encode_publish
from edgegw.mqtt.packets import (
    MQTT_5,
    Packet,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
)
from edgegw.mqtt.session import Outgoing, SessionState


class OutboundPublishes:
    """Delivering to the device; the attributes are :class:`~edgegw.mqtt.connection.MQTTConnection`'s."""

    state: ConnectionState
    protocol_level: int
    session: SessionState
    client_receive_maximum: int
    client_max_packet_size: int | None
    dropped_too_large: int
    _max_inflight_out: int
    _out: list[bytes]

    if TYPE_CHECKING:
        def _send(self, packet: Packet) -> None: ...

        def _require(self, state: ConnectionState, action: str) -> None: ...

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
