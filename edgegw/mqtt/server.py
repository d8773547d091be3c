"""The thin asyncio shell around :class:`~edgegw.mqtt.connection.MQTTConnection`: TLS, timers, outbox, ACL.

One plain TCP acceptor refuses connections past ``max_connections`` before any TLS work, then hands the socket to
our TLS transport (:mod:`edgegw.mqtt._tls`, no per-connection buffer) so a failed handshake is ours to log (who,
and why). After the handshake the device's identity is its certificate CN; the CONNECT must carry it as the
client id.

The hot path stays synchronous: ``data_received`` -> engine events -> ACL -> ``outbox.submit`` (no await, no task)
-> local subscribers (:class:`~edgegw.mqtt.broker.LocalBroker`, only when any subscription or a retain flag exists).
The outbox calls back after the group commit; the acknowledgements for a whole group are written once per
connection (``_flush_soon``), not once per message. Deliveries to devices are flushed the same way.

One connection is :class:`~edgegw.mqtt.device.DeviceProtocol` (edgegw/mqtt/device.py; its publish path in
``_ingress.py``, its flow control in ``_flow.py``), re-exported here with ``LAB_PREFIX``.

Also here: the downlink entry point for the uplink (:meth:`MQTTServer.deliver_downlink`), wills (into the outbox,
through the pipeline when one is configured, and to local subscribers), the session journal
(:mod:`edgegw.mqtt.sessiondb`: restored at start, written in batches, SUBACK after its commit for persistent
sessions), and the plain-TCP lab listener (``mqtt.lab = true`` only).
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
from edgegw.errors import OutboxError
from edgegw.identity import DeviceIdentity, describe_handshake_error
from edgegw.mqtt._tls import TLSListener, TLSTransport
from edgegw.mqtt.broker import LocalBroker
from edgegw.mqtt.device import LAB_PREFIX, DeviceProtocol
from edgegw.mqtt.forward import forwarded, record_properties
from edgegw.mqtt.packets import NO_PROPERTIES, Properties, ReasonCode
from edgegw.mqtt.session import Message
from edgegw.mqtt.sessiondb import SessionDB
from edgegw.ops.otel import Spans
from edgegw.outbox.store import Outbox
from edgegw.pipeline.engine import Pipeline
from edgegw.policy.acl import ACL
from edgegw.policy.limits import Limiter
from edgegw.tracing import new_traceparent

__all__ = ["LAB_PREFIX", "Authorizer", "DeviceProtocol", "MQTTServer", "MQTTStats"]

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
        self.will_tenants: dict[str, str] = {}
        """Session key -> the tenant its device's certificate gave when it connected with a will (the certificate is
        gone when the will fires; kept across reloads). One entry per device that connected with a will while a
        pipeline was on, replaced at its next such CONNECT: bounded by the fleet."""
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
        # Routing trusts what SUBSCRIBE accepted, under the ACL of its day: restored subscriptions the ACL running
        # now refuses end here, as a reload ends them (edgegw/pipeline/reload.py). The lab's are under no ACL.
        ended = self.broker.unsubscribe_disallowed(self._acl, keep=lambda key: key.startswith(LAB_PREFIX))
        if ended:
            log.info("mqtt.subscriptions_ended", count=ended, reason="no longer allowed by acl.subscribe")
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
        """A device's will (its ACL was checked at CONNECT, and is again now): into the outbox and to local
        subscribers. With routes, transforms or tenants configured it goes through the pipeline as the device's
        publishes do, under the device's tenant: stored as sent, a tenant-less device's will on
        ``devices/{id}/{other-id}/...`` would go up as ``{prefix}/{id}/{other-id}/...``, inside the space of a tenant
        named like the device."""
        device_id = key.removeprefix(LAB_PREFIX)
        if key == device_id and not self._acl.may_publish(device_id, message.topic):
            # Allowed at CONNECT, but a reload or a restart since (a delayed will, a session restored from disk)
            # took that topic from the device: a will is a publish, under the ACL running when it is made.
            self.stats.publish_denied += 1
            log.warning("mqtt.will_denied", device_id=device_id, topic=message.topic, reason="acl")
            return
        tp = new_traceparent()
        log.info("mqtt.will_published", device_id=device_id, topic=message.topic, trace_id=tp[3:35])
        properties = record_properties(message.properties, tp)
        pipeline = self.pipeline
        try:
            if pipeline is not None:
                tenants = pipeline.tenants
                # The lab listener has no certificate: its publishes get the tenant of none, so does its will.
                tenant = (tenants.tenant(device_id, "", None) if key != device_id
                          else tenants.known(device_id, self.will_tenants.get(key)))
                pipeline.submit(self._outbox, device_id, tenant, message.topic, message.payload, message.qos, None,
                                properties)
            else:
                self._outbox.submit(device_id, message.topic, message.payload, message.qos, properties=properties)
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
