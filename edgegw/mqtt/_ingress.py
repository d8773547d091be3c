"""The publish path of a device connection (a mixin of :class:`~edgegw.mqtt.device.DeviceProtocol`).

Synchronous for every message: rate limit (:mod:`edgegw.mqtt._flow`) -> trace context -> ACL (a small per-connection
cache) -> ``outbox.submit`` or the pipeline (no await, no task) -> local subscribers. After the group commit the
outbox calls ``records_committed`` once with the packet ids of all of this connection's records in the group:
PUBACK/PUBREC then, one write per connection and loop turn (``flush_soon``).
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

import structlog

from edgegw.errors import OutboxError
from edgegw.mqtt._flow import _Held
from edgegw.mqtt.connection import ConnectionState, MQTTConnection, PublishReceived
from edgegw.mqtt.forward import forwarded, record_properties
from edgegw.mqtt.packets import (
    MQTT_5,
    NO_PROPERTIES,
    Properties,
    PropertyId,
    ReasonCode,
)
from edgegw.mqtt.session import Message, Session
from edgegw.outbox._record import OutboxFull
from edgegw.policy.acl import ACL
from edgegw.tracing import from_payload, from_user_properties, new_traceparent

if TYPE_CHECKING:
    from edgegw.identity import DeviceIdentity
    from edgegw.mqtt.server import MQTTServer

log = structlog.get_logger("edgegw.mqtt")


class PublishIngress:
    """PUBLISH from the device: admitted, checked, stored, acknowledged after the commit, routed locally."""

    # Set by DeviceProtocol.__init__ (this class holds no state of its own).
    server: MQTTServer
    engine: MQTTConnection
    transport: asyncio.Transport | None
    identity: DeviceIdentity | None
    device_id: str | None
    session_key: str | None
    session: Session | None
    acl: ACL
    _loop: asyncio.AbstractEventLoop
    _paused: bool
    _allowed: set[str]
    _allowed_by: ACL | None

    def _on_publish(self, event: PublishReceived) -> None:
        # Runs once per device message: the checks for features that are off (limits, properties, trace context
        # in the payload) are each one test here, before any call.
        server = self.server
        limiter = server.limiter
        if limiter is not None and limiter.active and self._rate_limited(limiter, event):
            return
        device_id = self.device_id
        assert device_id is not None
        publish = event.publish
        stats = server.stats
        stats.publish_received += 1
        stats.publish_received_by_qos[publish.qos] += 1
        props = publish.properties
        # W3C trace context (edgegw/tracing.py): the device's, else a new one. Cheap: a scan of the user
        # properties, a JSON parse only for a small "{" payload that names the field (tested here first, so a
        # payload without it costs no call).
        tp = None
        if props.user:
            tp = from_user_properties(props.user)
        if tp is None:
            payload = publish.payload
            if payload[:1] == b"{" and b'"traceparent"' in payload:
                tp = from_payload(payload)
            if tp is None:
                tp = new_traceparent()
        topic = event.topic
        # The ACL cache's hit (a topic this connection was allowed under the current ACL) without a call.
        if not (self._allowed_by is self.acl and topic in self._allowed) and not self._may_publish(device_id, topic):
            stats.publish_denied += 1
            log.warning("mqtt.publish_denied", device_id=device_id, topic=event.topic, reason="acl",
                        trace_id=tp[3:35])
            if publish.packet_id is not None:
                self.engine.ack_publish(publish.packet_id, ReasonCode.NOT_AUTHORIZED)  # 3.1.1: closes
            elif self.engine.protocol_level != MQTT_5:
                self.engine.close(ReasonCode.NOT_AUTHORIZED, f"publish to {event.topic!r} not allowed")
            if self.engine.state is ConnectionState.CLOSED:
                self._log_closed(self.engine.close_reason)  # type: ignore[arg-type]
            return
        fwd = NO_PROPERTIES
        expires_at = None
        if props is not NO_PROPERTIES and props:
            if props.values.get(PropertyId.PAYLOAD_FORMAT_INDICATOR) == 1 and not _is_utf8(publish.payload):
                self._refuse_publish(publish.packet_id, ReasonCode.PAYLOAD_FORMAT_INVALID, "payload is not UTF-8",
                                     tp[3:35])
                return
            fwd = forwarded(props)
            mei = props.values.get(PropertyId.MESSAGE_EXPIRY_INTERVAL)
            if isinstance(mei, int):
                expires_at = self._loop.time() + mei
        record_props = record_properties(props, tp)
        try:
            self._submit(event, record_props, tp)
        except OutboxError as exc:
            # Full (reject-new policy) or closing: not stored, so not acknowledged as stored and not delivered
            # locally. MQTT 5 gets 0x97 and may retry. 3.1.1 has no negative ack: the publish is held, unanswered,
            # and the connection not read until the outbox has room (_hold). The outbox logs "outbox.full" at most
            # every 10 s: nothing per message.
            if (isinstance(exc, OutboxFull) and publish.packet_id is not None
                    and self.engine.protocol_level != MQTT_5 and self._fits(event, record_props)):
                self._hold(_Held(event, record_props, fwd, expires_at))
                return
            self.server.stats.publish_rejected += 1
            if publish.packet_id is not None:
                self.engine.ack_publish(publish.packet_id, ReasonCode.QUOTA_EXCEEDED)
                if self.engine.state is ConnectionState.CLOSED:
                    self._log_closed(self.engine.close_reason)  # type: ignore[arg-type]
            return
        self._stored(event, fwd, expires_at)

    def _may_publish(self, device_id: str, topic: str) -> bool:
        acl = self.acl
        allowed = self._allowed
        if self._allowed_by is not acl:
            allowed.clear()
            self._allowed_by = acl
        elif topic in allowed:
            return True
        if not acl.may_publish(device_id, topic):
            return False
        if len(allowed) >= _ALLOWED_TOPICS_CACHED:
            allowed.clear()  # a device walking through many topics: start over rather than grow
        allowed.add(topic)
        return True

    def _submit(self, event: PublishReceived, record_props: bytes | None, tp: str | None = None) -> None:
        """Into the outbox; raises OutboxError (OutboxFull) when it may not be stored."""
        publish = event.publish
        assert self.device_id is not None
        server = self.server
        pipeline = server.pipeline
        if pipeline is not None:  # routes/transforms/tenants configured (edgegw/pipeline): 0..n records, one ack
            serial = self.identity.serial if self.identity is not None else ""
            tenant = pipeline.tenants.tenant(self.device_id, serial, self._peercert)
            # The pipeline joins 0..n records into one callback: a callback per message here (not the default).
            done = (None if publish.packet_id is None
                    else functools.partial(self._committed_one, publish.packet_id))
            spans = None
            if self.server.otel is not None and tp is not None:  # the span ends with the first record's commit
                done, spans = self.server.otel.ingress(tp, done)
            first = pipeline.submit(self.server._outbox, self.device_id, tenant, event.topic, publish.payload,
                                    0 if publish.packet_id is None else publish.qos, done, record_props)
            if spans is not None and first is not None:
                spans.append(first)
            return
        packet_id = publish.packet_id
        # QoS 1/2: acknowledged by records_committed, once per group for all of this connection's records in it.
        acker = None if packet_id is None else self
        otel = server.otel
        if otel is not None and tp is not None:  # span export on (edgegw.ingress: arrival -> commit)
            on_commit, holder = otel.ingress(tp, None)
            holder.append(server._outbox.submit(self.device_id, event.topic, publish.payload,
                                                0 if packet_id is None else publish.qos, on_commit, record_props,
                                                acker=acker, token=packet_id or 0))
            return
        server._outbox.submit(self.device_id, event.topic, publish.payload, 0 if packet_id is None else publish.qos,
                              None, record_props, acker=acker, token=packet_id or 0)

    def _peercert(self) -> dict | None:
        """The verified client certificate (for a tenant from its O/OU); None on the lab listener."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        return ssl_object.getpeercert() if ssl_object is not None else None

    def _stored(self, event: PublishReceived, fwd: Properties, expires_at: float | None) -> None:
        """After a successful submit: local subscribers, then flow control."""
        publish = event.publish
        outbox = self.server._outbox
        broker = self.server.broker
        if publish.retain or broker.index.count:
            broker.route(Message(event.topic, publish.payload, publish.qos, publish.retain, fwd,
                                 self.session_key, expires_at))
        if publish.packet_id is not None and self.engine.inflight >= self.server.settings.receive_maximum:
            self.pause(reason="receive_maximum")
        if outbox.congested:
            self.pause(reason="outbox_congested")
            outbox.when_decongested(self._maybe_resume)

    def _refuse_publish(self, packet_id: int | None, reason: ReasonCode, detail: str,
                        trace_id: str | None = None) -> None:
        log.warning("mqtt.publish_refused", device_id=self.device_id, reason=reason.name, detail=detail,
                    trace_id=trace_id)
        if packet_id is not None:
            self.engine.ack_publish(packet_id, reason)  # 3.1.1: closes
        else:
            self.engine.close(reason, detail)
        if self.engine.state is ConnectionState.CLOSED:
            self._log_closed(self.engine.close_reason)  # type: ignore[arg-type]

    def records_committed(self, packet_ids: list[int], ok: bool) -> None:
        """From the outbox (:class:`~edgegw.outbox.store.CommitAcker`), once per group commit: this connection's
        publishes in the group, in the order they were received. Acknowledged if committed."""
        engine = self.engine
        server = self.server
        if ok:
            reason = ReasonCode.SUCCESS
            qos2 = engine.ack_committed(packet_ids)
            stats = server.stats
            stats.publish_acked += len(packet_ids)
            by_qos = stats.publish_acked_by_qos
            by_qos[1] += len(packet_ids) - qos2
            by_qos[2] += qos2
        else:
            # Not durable, so not acknowledged: the device keeps the messages and resends after reconnecting.
            reason = ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR
            for packet_id in packet_ids:
                engine.ack_publish(packet_id, reason)  # 3.1.1: the first one closes, the others only free their ids
            if engine.state is ConnectionState.CONNECTED:
                self._log_closed(engine.close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "outbox commit failed"))
        server.flush_soon(self)
        if engine.state is ConnectionState.CLOSED and self.session_key is not None:
            # The device may already be back on a new connection of the same session and have resent these QoS 2
            # messages, which that connection adopted (no second record): it gets the PUBRECs now.
            live = server.devices.get(self.session_key)
            if live is not None and live is not self and live.session is self.session:
                adopted = [packet_id for packet_id in packet_ids if live.engine.awaits_ack(packet_id)]
                for packet_id in adopted:
                    live.engine.ack_publish(packet_id, reason)
                if adopted:
                    server.flush_soon(live)
        if self._paused:
            self._maybe_resume()

    def _committed_one(self, packet_id: int, ok: bool) -> None:
        """A commit callback of one publish (the pipeline's path)."""
        self.records_committed([packet_id], ok)


_ALLOWED_TOPICS_CACHED = 64
"""Topics per connection remembered as allowed by the ACL (DeviceProtocol._may_publish)."""


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
