"""The thin asyncio shell around :class:`~edgegw.mqtt.connection.MQTTConnection`: TLS, timers, outbox, ACL.

One plain TCP acceptor refuses connections past ``max_connections`` before any TLS work, then hands the socket to
our TLS transport (:mod:`edgegw.mqtt._tls`, no per-connection buffer) so a failed handshake is ours to log (who,
and why). After the handshake the device's identity is its certificate CN; the CONNECT must carry it as the
client id.

The hot path stays synchronous: ``data_received`` -> engine events -> ACL -> ``outbox.submit`` (no await, no task)
-> local subscribers (:class:`~edgegw.mqtt.broker.LocalBroker`, only when any subscription or a retain flag exists).
The outbox calls back after the group commit; the acknowledgements for a whole group are written once per
connection (``_flush_soon``), not once per message. Deliveries to devices are flushed the same way.

Also here: the downlink entry point for the uplink (:meth:`MQTTServer.deliver_downlink`), wills (into the outbox
and to local subscribers), the session journal (:mod:`edgegw.mqtt.sessiondb`: restored at start, written in
batches, SUBACK after its commit for persistent sessions), and the plain-TCP lab
listener (``mqtt.lab = true`` only).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import sqlite3
import ssl
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from edgegw.config import MQTTSettings
from edgegw.identity import DeviceIdentity, describe_handshake_error, identity_from_peercert
from edgegw.mqtt._tls import TLSListener, TLSTransport
from edgegw.mqtt.connection import (
    ConnectionClosed,
    ConnectionState,
    ConnectRequested,
    Event,
    MQTTConnection,
    PublishReceived,
    SubscribeRequested,
    UnsubscribeRequested,
)
from edgegw.errors import OutboxError
from edgegw.mqtt.sessiondb import SessionDB
from edgegw.mqtt.broker import LocalBroker
from edgegw.mqtt.forward import forwarded, record_properties
from edgegw.mqtt.packets import MQTT_5, NO_PROPERTIES, Properties, PropertyId, ReasonCode
from edgegw.mqtt.session import Message, Outgoing, Session
from edgegw.ops.otel import Spans
from edgegw.outbox._record import OutboxFull, record_size
from edgegw.outbox.store import Outbox
from edgegw.pipeline.engine import Pipeline
from edgegw.policy.acl import ACL
from edgegw.policy.limits import Limiter
from edgegw.tracing import from_payload, from_user_properties, new_traceparent

log = structlog.get_logger("edgegw.mqtt")


@dataclass(slots=True)
class MQTTStats:
    accepted: int = 0
    refused_capacity: int = 0
    handshake_failed: int = 0
    connect_refused: int = 0
    connected: int = 0
    publish_received: int = 0
    publish_acked: int = 0
    publish_denied: int = 0
    protocol_errors: int = 0
    takeovers: int = 0
    publish_rejected: int = 0
    """Refused by the outbox (full): PUBACK/PUBREC 0x97 over MQTT 5, QoS 0 dropped; 3.1.1 QoS 1/2: see held."""
    publish_held: int = 0
    """MQTT 3.1.1 QoS 1/2 publishes refused by a full outbox and held (not acknowledged, reading paused) until
    there is room again (docs/OUTBOX.md)."""
    downlink_delivered: int = 0
    downlink_undeliverable: int = 0
    publish_received_by_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    """``publish_received`` by QoS (index 0, 1, 2)."""
    publish_acked_by_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    """``publish_acked`` by QoS (1, 2; QoS 0 has no acknowledgement and stays 0)."""


Authorizer = Callable[[DeviceIdentity], str | None]
"""Decides, after the TLS handshake, whether a verified identity may connect: None, or the reason it may not
(e.g. "suspended in the registry"). Runs once per connection, synchronously."""


class MQTTServer:
    def __init__(self, settings: MQTTSettings, ssl_context: ssl.SSLContext, acl: ACL, outbox: Outbox,
                 *, authorizer: Authorizer | None = None, otel: Spans | None = None) -> None:
        self.settings = settings
        self.otel = otel
        """OpenTelemetry span hooks (edgegw/ops/otel.py), or None: export off, one check per record."""
        self.stats = MQTTStats()
        # Replaced as a whole on reload (new CA bundle, CRL or server certificate): new handshakes use the new one,
        # established sessions keep theirs.
        self.ssl_context = ssl_context
        self.authorizer = authorizer
        self._acl = acl
        self.pipeline: Pipeline | None = None
        """Routes, transforms, tenants (edgegw/pipeline); None: records stored as sent. Replaced whole on reload."""
        self.limiter: Limiter | None = None
        """Rate limits and quotas (edgegw/policy/limits.py), checked first for every publish; None: no limits."""
        self._outbox = outbox
        self._server: TLSListener | None = None
        self._connections: set[DeviceProtocol] = set()
        self._handshakes: set[TLSTransport] = set()
        # One read buffer for every device connection (edgegw/mqtt/_tls.py): decrypted bytes are copied out of it
        # before the next connection reads. No TLS buffer is kept per connection.
        self._tls_scratch = memoryview(bytearray(settings.tls_read_buffer))
        self.devices: dict[str, DeviceProtocol] = {}
        self._dirty: set[DeviceProtocol] = set()
        self._flush_scheduled = False
        self._draining = False
        self.broker = LocalBroker(settings, self._publish_will)
        # Persistent sessions live in a SQLite file next to ``session_store`` (which, if present, is an older
        # version's msgpack snapshot: imported once).
        self.session_db = SessionDB(settings.session_store.with_suffix(".db"), self.broker)
        self._lab_acl = ACL.allow_all()
        self._lab_server: asyncio.Server | None = None

    async def start(self) -> None:
        # Device MQTT connections use our own TLS transport (edgegw/mqtt/_tls.py: no per-connection buffer).
        # asyncio's TLS, still used by other listeners in this process (CoAP over TLS), allocates max_size bytes
        # per connection (256 KiB by default; BRIEF §2); the attribute is per class, so this bounds all of them.
        sslproto.SSLProtocol.max_size = self.settings.tls_read_buffer
        await self.session_db.open(legacy_snapshot=self.settings.session_store)
        loop = asyncio.get_running_loop()
        self._server = await TLSListener.create(self.settings.bind, self.settings.port, self._on_accept,
                                                backlog=1024)
        log.info("mqtt.listening", bind=self.settings.bind, port=self.port,
                 max_connections=self.settings.max_connections)
        if self.settings.lab:
            self._lab_server = await loop.create_server(
                lambda: DeviceProtocol(self, "", lab=True), self.settings.lab_bind, self.settings.lab_port,
                reuse_address=True)
            log.warning("mqtt.lab_listener_open", bind=self.settings.lab_bind, port=self.lab_port,
                        danger="PLAIN TCP, NO AUTHENTICATION: the client id is the identity and every topic is "
                               "allowed. For interoperability tests and firmware bring-up only, never production.")

    @property
    def lab_port(self) -> int | None:
        if self._lab_server is None or not self._lab_server.sockets:
            return None
        return int(self._lab_server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # --- accept and handshake ------------------------------------------------------------------------------

    def _on_accept(self, sock: socket.socket, peer: str) -> None:
        if self._draining or len(self._connections) >= self.settings.max_connections:
            # Refuse at accept, never queue (mosquitto's max_connections; amqtt queues, BRIEF §2).
            self.stats.refused_capacity += 1
            log.warning("mqtt.connection_refused", peer=peer, reason="draining" if self._draining else "capacity",
                        max_connections=self.settings.max_connections)
            sock.close()
            return
        proto = DeviceProtocol(self, peer)
        self._connections.add(proto)
        # The context is read here, per connection: after a reload (registry/reload.py) the next handshake uses
        # the new one. No task per handshake: the transport calls back.
        transport = TLSTransport(sock, self.ssl_context, proto, self._tls_scratch,
                                 handshake_timeout=self.settings.connect_timeout,
                                 on_handshake=functools.partial(self._handshake_done, proto))
        self._handshakes.add(transport)

    def _handshake_done(self, proto: DeviceProtocol, transport: TLSTransport, exc: BaseException | None) -> None:
        self._handshakes.discard(transport)
        if exc is None:
            proto.attach(transport)
            return
        proto._closed_logged = True
        self._forget(proto)
        if self._draining and isinstance(exc, ConnectionAbortedError):
            return  # ended by drain(), not by the device
        self.stats.handshake_failed += 1
        log.warning("tls.handshake_failed", peer=proto.peer, reason=describe_handshake_error(exc))

    def _forget(self, proto: DeviceProtocol) -> None:
        self._connections.discard(proto)
        self._dirty.discard(proto)
        if proto.session_key is not None and self.devices.get(proto.session_key) is proto:
            del self.devices[proto.session_key]

    # --- messages that do not come from the device's own connection ------------------------------------------

    def deliver_downlink(self, device_id: str, topic: str, payload: bytes, qos: int,
                         properties: Properties = NO_PROPERTIES, *, message_expiry: int | None = None) -> bool:
        """Deliver a command from upstream to ``device_id``'s own subscriptions matching ``topic`` (a device-side
        topic such as ``devices/{device_id}/cmd/reboot``), at most ``qos``. Synchronous; no ack is awaited.

        True if the device has a session (live, or offline and persistent: queued, bounded) with a matching
        subscription; False otherwise (the caller decides: acknowledge upstream anyway, or hold it back).
        ``properties``: MQTT 5 properties to forward (user properties, content type, response topic, correlation
        data, payload format); ``message_expiry`` seconds, if any.
        """
        expires_at = self.broker.now() + message_expiry if message_expiry else None
        message = Message(topic, payload, qos, False, forwarded(properties), sender=None, expires_at=expires_at)
        copies = self.broker.deliver_to_session(device_id, message)
        if copies:
            self.stats.downlink_delivered += 1
            return True
        self.stats.downlink_undeliverable += 1
        return False

    def _publish_will(self, key: str, message: Message) -> None:
        """A device's will (its ACL was checked at CONNECT): into the outbox and to local subscribers."""
        device_id = key[len(LAB_PREFIX):] if key.startswith(LAB_PREFIX) else key
        tp = new_traceparent()
        log.info("mqtt.will_published", device_id=device_id, topic=message.topic, trace_id=tp[3:35])
        try:
            self._outbox.submit(device_id, message.topic, message.payload, message.qos,
                                properties=record_properties(message.properties, tp))
        except OutboxError as exc:
            log.warning("mqtt.will_not_recorded", device_id=device_id, reason=str(exc), trace_id=tp[3:35])
        self.broker.route(message)

    def disconnect_device(self, device_id: str, reason: ReasonCode, detail: str) -> bool:
        """Close the device's live session (e.g. revoked or suspended). True if it was connected."""
        proto = self.devices.get(device_id)
        if proto is None:
            return False
        proto.close(reason, detail)
        return True

    # --- output coalescing ---------------------------------------------------------------------------------

    def flush_soon(self, proto: DeviceProtocol) -> None:
        self._dirty.add(proto)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for proto in dirty:
            proto.flush()

    # --- shutdown ------------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._draining = True
        if self._server is not None:
            self._server.close()
        if self._lab_server is not None:
            self._lab_server.close()

    async def drain(self, timeout: float) -> None:
        """Stop reading every device, let their in-flight publishes commit and be acknowledged, then close them.

        The outbox writer must still be running while this waits.
        """
        self.stop_accepting()
        for proto in list(self._connections):
            proto.pause(reason="draining")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A publish held back for room in the outbox (3.1.1) is not waited for: it was never acknowledged.
        while any(p.engine.inflight > p.held_inflight for p in self._connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._flush_dirty()
        for proto in list(self._connections):
            proto.close(ReasonCode.SERVER_SHUTTING_DOWN, "gateway shutting down")
        while self._connections and loop.time() < deadline + 1:
            await asyncio.sleep(0.01)
        for proto in list(self._connections):
            proto.abort()
        for transport in list(self._handshakes):
            transport.abort()
        try:
            await self.session_db.close()  # the exact state of every persistent session, committed
        except (OSError, sqlite3.Error) as exc:
            log.error("mqtt.sessions_not_saved", path=str(self.session_db.path), error=str(exc))
        self.broker.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self._lab_server is not None:
            await self._lab_server.wait_closed()


LAB_PREFIX = "\x00lab:"
"""Session keys of lab-listener clients: never equal to a certificate CN, so a lab client cannot take over (or
read the session of) a real device."""


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class DeviceProtocol(asyncio.Protocol):
    """One device connection after TLS. Owns the engine, the timers and the flow control."""

    def __init__(self, server: MQTTServer, peer: str, *, lab: bool = False) -> None:
        self.server = server
        self.peer = peer
        self.lab = lab
        settings = server.settings
        self.engine = MQTTConnection(
            max_packet_size=settings.max_packet_size, receive_maximum=settings.receive_maximum,
            topic_alias_maximum=settings.topic_alias_maximum, max_topic_length=settings.max_topic_length,
            max_topic_levels=settings.max_topic_levels, max_keepalive=settings.max_keepalive,
            max_session_expiry=settings.max_session_expiry, max_inflight_out=settings.max_inflight_messages)
        self.acl = server._lab_acl if lab else server._acl
        self.transport: asyncio.Transport | None = None
        self.identity: DeviceIdentity | None = None
        self.device_id: str | None = None
        self.session_key: str | None = None
        self.session: Session | None = None
        self._ended = False
        self._loop = asyncio.get_running_loop()
        self._accepted_at = self._loop.time()
        self._early: list[bytes] = []  # data that arrived before attach() (kept for transports that do that)
        self._last_rx = self._accepted_at
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._closed_logged = False
        self._held: _Held | None = None  # 3.1.1: the publish the full outbox refused, and what came after it
        self._admitted: PublishReceived | None = None  # a rate-limited publish being released (tokens taken)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.lab:
            return  # TLS connections are attached by MQTTServer._handshake_done once the handshake completes
        assert isinstance(transport, asyncio.Transport)
        self.peer = _peer(transport)
        server = self.server
        if server._draining or len(server._connections) >= server.settings.max_connections:
            server.stats.refused_capacity += 1
            log.warning("mqtt.connection_refused", peer=self.peer, reason="capacity", listener="lab")
            self._closed_logged = True
            transport.abort()
            return
        server._connections.add(self)
        self.attach(transport)

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if self.lab:
            self.server.stats.accepted += 1
            self._timer = self._loop.call_later(self.server.settings.connect_timeout, self._connect_timed_out)
            return
        ssl_object = transport.get_extra_info("ssl_object")
        self.identity = identity_from_peercert(ssl_object.getpeercert() if ssl_object else None)
        if self.identity is None:
            self.server.stats.handshake_failed += 1
            log.warning("tls.identity_refused", peer=self.peer, reason="client certificate has no single CN")
            self.abort()
            return
        self.server.stats.accepted += 1
        remaining = self.server.settings.connect_timeout - (self._loop.time() - self._accepted_at)
        self._timer = self._loop.call_later(max(remaining, 0.0), self._connect_timed_out)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.engine.state is not ConnectionState.CLOSED:
            closed = self.engine.close(ReasonCode.UNSPECIFIED_ERROR,
                                       f"connection lost ({type(exc).__name__})" if exc else "connection lost")
            self._log_closed(closed)
        elif self.engine.close_reason is not None:
            self._release_held()
            self._end(self.engine.close_reason)
        self.server._forget(self)

    def _connect_timed_out(self) -> None:
        if self.engine.state in (ConnectionState.AWAIT_CONNECT, ConnectionState.AUTHORIZING):
            log.warning("mqtt.connect_timeout", peer=self.peer, cert_cn=self._cn,
                        timeout=self.server.settings.connect_timeout)
            self.close(ReasonCode.MALFORMED_PACKET, "no CONNECT in time")

    def _check_keepalive(self) -> None:
        # MQTT-3.1.2-24: close if nothing arrived for one and a half keep-alive periods.
        limit = 1.5 * self.engine.keepalive
        idle = self._loop.time() - self._last_rx
        if self._held is not None:
            # We stopped reading (a publish held for room in the outbox): its silence says nothing. A device
            # that gave up closes its socket, which is seen once reading resumes.
            self._last_rx = self._loop.time()
            self._timer = self._loop.call_later(limit, self._check_keepalive)
        elif idle >= limit:
            self.close(ReasonCode.KEEP_ALIVE_TIMEOUT, f"keepalive: nothing received for {idle:.1f}s")
        else:
            self._timer = self._loop.call_later(limit - idle, self._check_keepalive)

    @property
    def _cn(self) -> str | None:
        return self.identity.device_id if self.identity else None

    # --- input ---------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            self._early.append(data)
            return
        self._last_rx = self._loop.time()
        events = self.engine.receive_data(data)
        if self._held is not None:  # read although paused (bytes the TLS layer had decrypted): queue behind it
            self._held.rest.extend(events)
            self.flush()
            return
        self._process(events)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def _process(self, events: list[Event]) -> None:
        for i, event in enumerate(events):
            if self._held is not None:  # a publish is held for room in the outbox: the rest waits, in order
                self._held.rest.extend(events[i:])
                break
            if isinstance(event, PublishReceived):
                self._on_publish(event)
            elif isinstance(event, ConnectRequested):
                self._on_connect(event)
            elif isinstance(event, ConnectionClosed):
                self._log_closed(event)
            elif isinstance(event, SubscribeRequested):
                self._on_subscribe(event)
            elif isinstance(event, UnsubscribeRequested):
                assert self.session is not None
                codes = self.server.broker.unsubscribe(self.session, event.unsubscribe)
                ack = functools.partial(self._unsubscribed, event.unsubscribe.packet_id, codes)
                if self.session.durable:
                    self.server.session_db.after_commit(ack)
                else:
                    ack(True)
        session = self.session
        if session is not None and session.state.queue and self.engine.can_send:
            self.server.broker.pump(session, self)
        self.flush()

    def _on_subscribe(self, event: SubscribeRequested) -> None:
        assert self.session is not None and self.device_id is not None
        packet = event.subscribe
        if any(sid == 0 for sid in packet.properties.subscription_ids):
            self._log_closed(self.engine.close(ReasonCode.PROTOCOL_ERROR, "subscription identifier 0"))
            return
        codes, retained = self.server.broker.subscribe(self.session, packet, self.acl, self.device_id)
        ack = functools.partial(self._subscribed, packet.packet_id, codes, retained)
        if self.session.durable:
            self.server.session_db.after_commit(ack)  # SUBACK once the subscription is on disk
        else:
            ack(True)

    def _subscribed(self, packet_id: int, codes: tuple[int, ...], retained: list[Outgoing], ok: bool) -> None:
        if self.engine.state is not ConnectionState.CONNECTED or self.session is None:
            return
        if not ok:
            self._log_closed(self.engine.close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "session store failed"))
        else:
            self.engine.ack_subscribe(packet_id, codes)
            self.server.broker.deliver_all(self.session, retained)  # retained messages after the SUBACK
        self.server.flush_soon(self)

    def _unsubscribed(self, packet_id: int, codes: tuple[int, ...], ok: bool) -> None:
        if self.engine.state is not ConnectionState.CONNECTED:
            return
        if not ok:
            self._log_closed(self.engine.close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "session store failed"))
        else:
            self.engine.ack_unsubscribe(packet_id, codes)
        self.server.flush_soon(self)

    @property
    def backlogged(self) -> bool:
        transport = self.transport
        return transport is None or transport.get_write_buffer_size() > self.server.settings.max_queued_bytes

    def wrote(self) -> None:
        """The broker queued output in the engine (a delivery): write it with this loop iteration's others."""
        self.server.flush_soon(self)

    def _refuse(self, reason: ReasonCode, why: str, client_id: str) -> None:
        self.server.stats.connect_refused += 1
        log.warning("mqtt.connect_refused", peer=self.peer, reason=why, client_id=client_id, cert_cn=self._cn)
        self.engine.refuse(reason, why)
        self._closed_logged = True

    def _on_connect(self, event: ConnectRequested) -> None:
        connect = event.connect
        client_id = connect.client_id
        if not client_id:
            # Identity comes from the certificate: a server-assigned client identifier is never offered.
            self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "empty client_id", client_id)
            return
        if self.lab:
            self.identity = DeviceIdentity(client_id, "", "")
        assert self.identity is not None
        if client_id != self.identity.device_id:
            self.server.stats.connect_refused += 1
            log.warning("mqtt.connect_refused", peer=self.peer, reason="client_id does not match certificate CN",
                        client_id=client_id, cert_cn=self.identity.device_id)
            self.engine.refuse(ReasonCode.NOT_AUTHORIZED, "client_id does not match certificate CN")
            self._closed_logged = True
            return
        device_id = self.identity.device_id
        refusal = None
        if self.server.authorizer is not None and not self.lab:
            refusal = self.server.authorizer(self.identity)
        if refusal is not None:
            # Answered with a CONNACK rather than a dropped socket, so firmware can tell "refused" from "network".
            self.server.stats.connect_refused += 1
            log.warning("mqtt.connect_refused", peer=self.peer, reason=refusal, client_id=client_id,
                        cert_cn=device_id)
            self.engine.refuse(ReasonCode.NOT_AUTHORIZED, refusal)
            self._closed_logged = True
            return
        if connect.properties.get(PropertyId.AUTHENTICATION_METHOD) is not None:
            self._refuse(ReasonCode.BAD_AUTHENTICATION_METHOD, "enhanced authentication not supported", client_id)
            return
        will = connect.will
        if will is not None:
            problem = self.engine.topic_problem(will.topic)
            if problem is not None:
                self._refuse(ReasonCode.TOPIC_NAME_INVALID, f"will: {problem}", client_id)
                return
            if not self.acl.may_publish(device_id, will.topic):
                # A will is a publish like any other: refused up front rather than dropped when it fires.
                self._refuse(ReasonCode.NOT_AUTHORIZED, "will topic not allowed", client_id)
                return
        key = LAB_PREFIX + device_id if self.lab else device_id
        self.device_id = device_id
        self.session_key = key
        previous = self.server.devices.get(key)
        if previous is not None and previous is not self:
            self.server.stats.takeovers += 1
            log.info("mqtt.session_taken_over", device_id=device_id, old_peer=previous.peer, new_peer=self.peer)
            previous.close(ReasonCode.SESSION_TAKEN_OVER, f"taken over by {self.peer}")
        self.server.devices[key] = self
        broker = self.server.broker
        session, present = broker.open_session(key, connect.clean_start)
        self.session = session
        self.engine.accept(session_present=present, session=session.state)
        broker.attach(session, self, will)
        self.server.stats.connected += 1
        log.info("mqtt.connected", device_id=device_id, peer=self.peer,
                 protocol=5 if self.engine.protocol_level == MQTT_5 else "3.1.1",
                 keepalive=self.engine.keepalive, clean_start=connect.clean_start, session_present=present,
                 session_expiry=self.engine.session_expiry, lab=self.lab)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.engine.keepalive:
            self._timer = self._loop.call_later(1.5 * self.engine.keepalive, self._check_keepalive)
        # Packets pipelined behind CONNECT were held back until now (MQTT-3.1.4-5).
        self._process(self.engine.pending_events())

    def _on_publish(self, event: PublishReceived) -> None:
        limiter = self.server.limiter
        if limiter is not None and self._rate_limited(limiter, event):
            return
        device_id = self.device_id
        assert device_id is not None
        publish = event.publish
        stats = self.server.stats
        stats.publish_received += 1
        stats.publish_received_by_qos[publish.qos] += 1
        props = publish.properties
        # W3C trace context (edgegw/tracing.py): the device's, else a new one. Cheap: a scan of the user
        # properties, a JSON parse only for a small "{" payload that names the field.
        tp = None
        if props and props.user:
            tp = from_user_properties(props.user)
        if tp is None:
            payload = publish.payload
            if payload[:1] == b"{":
                tp = from_payload(payload)
            if tp is None:
                tp = new_traceparent()
        if not self.acl.may_publish(device_id, event.topic):
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
        if props:
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

    def _submit(self, event: PublishReceived, record_props: bytes | None, tp: str | None = None) -> None:
        """Into the outbox; raises OutboxError (OutboxFull) when it may not be stored."""
        publish = event.publish
        assert self.device_id is not None
        pipeline = self.server.pipeline
        if pipeline is not None:  # routes/transforms/tenants configured (edgegw/pipeline): 0..n records, one ack
            serial = self.identity.serial if self.identity is not None else ""
            tenant = pipeline.tenants.tenant(self.device_id, serial, self._peercert)
            done = (None if publish.packet_id is None
                    else functools.partial(self._committed, publish.packet_id, publish.qos))
            spans = None
            if self.server.otel is not None and tp is not None:  # the span ends with the first record's commit
                done, spans = self.server.otel.ingress(tp, done)
            first = pipeline.submit(self.server._outbox, self.device_id, tenant, event.topic, publish.payload,
                                    0 if publish.packet_id is None else publish.qos, done, record_props)
            if spans is not None and first is not None:
                spans.append(first)
            return
        otel = self.server.otel
        if otel is not None and tp is not None:  # span export on (edgegw.ingress: arrival -> commit)
            on_commit = (None if publish.packet_id is None
                         else functools.partial(self._committed, publish.packet_id, publish.qos))
            on_commit, holder = otel.ingress(tp, on_commit)
            holder.append(self.server._outbox.submit(self.device_id, event.topic, publish.payload,
                                                     0 if publish.packet_id is None else publish.qos,
                                                     on_commit, record_props))
            return
        if publish.packet_id is None:
            self.server._outbox.submit(self.device_id, event.topic, publish.payload, 0, properties=record_props)
        else:
            self.server._outbox.submit(self.device_id, event.topic, publish.payload, publish.qos,
                                       functools.partial(self._committed, publish.packet_id, publish.qos),
                                       record_props)

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
        if publish.packet_id is not None:
            if self.engine.inflight >= self.server.settings.receive_maximum:
                self.pause(reason="receive_maximum")
        if outbox.congested:
            self.pause(reason="outbox_congested")
            outbox.when_decongested(self._maybe_resume)

    # --- 3.1.1 backpressure on a full outbox (docs/OUTBOX.md) ------------------------------------------------

    def _fits(self, event: PublishReceived, record_props: bytes | None) -> bool:
        """Could this record ever be stored? One larger than the whole byte limit never will: holding it would
        stall the connection for good, so it is refused as before (3.1.1: closed)."""
        assert self.device_id is not None
        size = record_size(self.device_id, event.topic, event.publish.payload, record_props)
        return size <= self.server._outbox.byte_limit

    def _hold(self, held: _Held) -> None:
        """Keep the refused publish unacknowledged, stop reading, and try again when the outbox has room."""
        self._held = held
        self.server.stats.publish_held += 1
        self.pause(reason="outbox_full")
        log.debug("mqtt.publish_held", device_id=self.device_id, packet_id=held.event.publish.packet_id)
        self.server._outbox.when_room(self._retry_held)

    def _retry_held(self) -> None:
        held = self._held
        if held is None or held.limited:
            return
        if self.engine.state is not ConnectionState.CONNECTED:
            self._release_held()
            return
        try:
            self._submit(held.event, held.record_props)
        except OutboxFull:
            # Still no room for this device (e.g. its fair share): ask again a little later, so a "room" signal
            # that does not help this device cannot turn into a busy loop.
            self._loop.call_later(_HOLD_RETRY, self.server._outbox.when_room, self._retry_held)
            return
        except OutboxError:
            return  # the outbox is closing: the gateway is draining and closes this connection
        self._held = None
        log.debug("mqtt.publish_released", device_id=self.device_id, packet_id=held.event.publish.packet_id)
        self._stored(held.event, held.fwd, held.expires_at)
        self._process(held.rest)  # may hold again
        if self._held is None:
            self._maybe_resume()

    def _release_held(self) -> None:
        """The connection ended with publishes held: they were never acknowledged (the device resends them).
        Forget their packet ids, QoS 2 ones included, so a resend on a later connection is not mistaken for one
        being committed."""
        held = self._held
        if held is None or self.engine.state is not ConnectionState.CLOSED:
            return
        self._held = None
        for event in (held.event, *held.rest):
            if isinstance(event, PublishReceived) and event.publish.packet_id is not None \
                    and self.engine.awaits_ack(event.publish.packet_id):
                self.engine.ack_publish(event.publish.packet_id, ReasonCode.QUOTA_EXCEEDED)  # closed: sends nothing

    @property
    def held_inflight(self) -> int:
        """QoS 1/2 publishes held back (counted in ``engine.inflight``, never submitted)."""
        held = self._held
        if held is None:
            return 0
        return sum(1 for e in (held.event, *held.rest) if isinstance(e, PublishReceived)
                   and e.publish.packet_id is not None and self.engine.awaits_ack(e.publish.packet_id))

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

    def _committed(self, packet_id: int, qos: int, ok: bool) -> None:
        reason = ReasonCode.SUCCESS if ok else ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR
        if ok:
            self.engine.ack_publish(packet_id)
            stats = self.server.stats
            stats.publish_acked += 1
            stats.publish_acked_by_qos[qos] += 1
        else:
            # Not durable, so not acknowledged: the device keeps the message and resends after reconnecting.
            self.engine.ack_publish(packet_id, reason)
            if self.engine.state is ConnectionState.CONNECTED:
                self._log_closed(self.engine.close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "outbox commit failed"))
        self.server.flush_soon(self)
        if self.engine.state is ConnectionState.CLOSED and self.session_key is not None:
            # The device may already be back on a new connection of the same session and have resent this QoS 2
            # message, which that connection adopted (no second record): it gets the PUBREC now.
            live = self.server.devices.get(self.session_key)
            if (live is not None and live is not self and live.session is self.session
                    and live.engine.awaits_ack(packet_id)):
                live.engine.ack_publish(packet_id, reason)
                self.server.flush_soon(live)
        if self._paused:
            self._maybe_resume()

    # --- rate limits and quotas (edgegw/policy/limits.py, docs/POLICY.md) -------------------------------------

    def _rate_limited(self, limiter: Limiter, event: PublishReceived) -> bool:
        """First thing for every publish: True if the limiter delayed, refused or dropped it (then nothing else
        is done with it now).

        Nothing is lost unless the rule says ``drop`` and the publish is QoS 0. ``reject`` needs a MQTT 5 QoS 1/2
        acknowledgement to carry 0x97, and ``drop`` of a QoS 1/2 publish is refused like ``reject``; what cannot
        be honoured (3.1.1, QoS 0 under ``reject``) becomes backpressure: the publish is held unacknowledged, the
        socket is not read, and after the wait it is admitted again and processed, in order, before what followed.
        """
        if event is self._admitted:  # released by _retry_limited: its tokens are taken
            self._admitted = None
            return False
        publish = event.publish
        assert self.device_id is not None
        admission = limiter.admit(self.device_id, len(publish.payload))
        if not admission.wait_s:
            return False
        packet_id = publish.packet_id
        if admission.action == "drop" and packet_id is None:
            limiter.record(admission, "drop", "mqtt")
        elif admission.action != "backpressure" and packet_id is not None and self.engine.protocol_level == MQTT_5:
            limiter.record(admission, "reject", "mqtt")
            self.engine.ack_publish(packet_id, ReasonCode.QUOTA_EXCEEDED)
        else:
            limiter.record(admission, "backpressure", "mqtt")
            self._held = _Held(event, None, NO_PROPERTIES, None, limited=True)
            self.pause(reason="rate_limited")
            self._loop.call_later(_limit_wait(admission.wait_s), self._retry_limited)
            return True
        stats = self.server.stats  # refused or dropped: received all the same
        stats.publish_received += 1
        stats.publish_received_by_qos[publish.qos] += 1
        return True

    def _retry_limited(self) -> None:
        held = self._held
        if held is None or not held.limited:
            return
        if self.engine.state is not ConnectionState.CONNECTED:
            self._release_held()
            return
        limiter = self.server.limiter
        if limiter is not None:
            assert self.device_id is not None
            admission = limiter.admit(self.device_id, len(held.event.publish.payload))
            if admission.wait_s:  # still over (or another device took the shared tokens): wait again
                self._loop.call_later(_limit_wait(admission.wait_s), self._retry_limited)
                return
        self._held = None
        self._admitted = held.event
        self._on_publish(held.event)  # may be held again, by a full outbox
        if self._held is not None:
            self._held.rest.extend(held.rest)
            self.flush()
            return
        self._process(held.rest)  # may hold again
        if self._held is None:
            self._maybe_resume()

    # --- flow control and output ---------------------------------------------------------------------------

    def pause(self, *, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            log.debug("mqtt.paused", device_id=self.device_id, reason=reason)

    def _maybe_resume(self) -> None:
        if (self._paused and self._held is None and not self.server._draining and self.transport is not None
                and self.engine.state is ConnectionState.CONNECTED
                and self.engine.inflight <= self.server.settings.receive_maximum // 2
                and not self.server._outbox.congested):
            self._paused = False
            self.transport.resume_reading()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self.engine.data_to_send()
        if data:
            transport.write(data)
        if self.engine.state is ConnectionState.CLOSED:
            transport.close()  # after the buffered CONNACK / DISCONNECT is written

    def close(self, reason: ReasonCode, detail: str) -> None:
        if self.engine.state is not ConnectionState.CLOSED:
            self._log_closed(self.engine.close(reason, detail))
        self.flush()
        if self.transport is None:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.server._forget(self)

    def _end(self, event: ConnectionClosed) -> None:
        """Once per connection that had a session: hand it back to the broker (will, expiry)."""
        if self._ended or self.session is None:
            return
        self._ended = True
        # No will for a normal DISCONNECT, nor when the gateway itself shuts down (that says nothing about the
        # device, and would flood upstream with "offline" wills on every restart).
        normal = (event.by_peer and event.reason_code is ReasonCode.SUCCESS) or (
            event.reason_code is ReasonCode.SERVER_SHUTTING_DOWN and not event.by_peer)
        self.server.broker.connection_ended(self.session, self, self.engine.session_expiry,
                                            ReasonCode.SUCCESS if normal else event.reason_code)

    def _log_closed(self, event: ConnectionClosed) -> None:
        if self._held is not None:
            self._release_held()
        self._end(event)
        if self._closed_logged:
            return
        self._closed_logged = True
        if event.by_peer and event.reason_code not in (ReasonCode.SUCCESS, ReasonCode.DISCONNECT_WITH_WILL):
            self.server.stats.protocol_errors += 1
            log.warning("mqtt.protocol_error", device_id=self.device_id, cert_cn=self._cn, peer=self.peer,
                        reason=event.reason_code.name, detail=event.detail)
        else:
            log.info("mqtt.disconnected", device_id=self.device_id or self._cn, peer=self.peer,
                     reason=event.reason_code.name, detail=event.detail, by_peer=event.by_peer)


_HOLD_RETRY = 0.05
"""Seconds before a held publish that was refused again asks the outbox for room again."""

_LIMIT_WAIT = (0.01, 5.0)
"""A rate-limited device is looked at again after its wait, but not sooner than 10 ms (tokens for a batch
accumulate: one timer per batch, not per message) nor later than 5 s (a quota raised by a reload is noticed)."""


@dataclass(slots=True)
class _Held:
    """A 3.1.1 QoS 1/2 publish the full outbox refused, kept unacknowledged until it can be stored, and the events
    parsed after it (processed, in order, once it is)."""

    event: PublishReceived
    record_props: bytes | None
    fwd: Properties
    expires_at: float | None
    rest: list[Event] = field(default_factory=list)
    limited: bool = False
    """Held by a rate limit or quota (not yet admitted, nothing computed: released by ``_retry_limited``)."""


def _limit_wait(wait_s: float) -> float:
    low, high = _LIMIT_WAIT
    return max(low, min(wait_s, high))


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
