"""One device connection after TLS (or on the lab listener): :class:`DeviceProtocol`, an asyncio protocol around
the sans-I/O :class:`~edgegw.mqtt.connection.MQTTConnection`, owned by :class:`~edgegw.mqtt.server.MQTTServer`.

Here: the connection's lifecycle (attach after the handshake, CONNECT timeout, keep-alive), CONNECT with its
identity checks and session takeover, SUBSCRIBE/UNSUBSCRIBE (acknowledged after the session journal's commit for
persistent sessions), output and close. The publish path is :mod:`edgegw.mqtt._ingress`, the holds and
pause/resume of reading :mod:`edgegw.mqtt._flow`; both are mixins of this class and share its state.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, cast

import structlog

from edgegw.identity import DeviceIdentity, identity_from_peercert
from edgegw.mqtt._flow import FlowControl, _Held, output_mark
from edgegw.mqtt._ingress import PublishIngress
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
from edgegw.mqtt.packets import MQTT_5, PropertyId, ReasonCode
from edgegw.mqtt.session import Outgoing, Session
from edgegw.policy.acl import ACL

if TYPE_CHECKING:
    from edgegw.mqtt.server import MQTTServer

log = structlog.get_logger("edgegw.mqtt")


LAB_PREFIX = "\x00lab:"
"""Session keys of lab-listener clients: never equal to a certificate CN, so a lab client cannot take over (or
read the session of) a real device."""


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class DeviceProtocol(PublishIngress, FlowControl, asyncio.Protocol):
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
        self._write_blocked = False  # our write buffer is above its high-water mark (_flow.pause_writing)
        self._blocked_output = 0  # output_mark when the keep-alive last looked (_output_drains)
        self._closed_logged = False
        self._held: _Held | None = None  # 3.1.1: the publish the full outbox refused, and what came after it
        self._admitted: PublishReceived | None = None  # a rate-limited publish being released (tokens taken)
        self._deferred: list[Event] | None = None  # parsed, waiting for the output to drain (_flow._defer)
        self._deferred_scheduled = False
        self._retained_waiting = 0  # retained copies of SUBSCRIBEs awaiting the session journal's commit
        # Topics this connection was allowed to publish to under ``_allowed_by`` (the ACL object: a reload replaces
        # it, and with it this cache). A device publishes to a few topics, and the ACL splits the topic and expands
        # every pattern per check.
        self._allowed: set[str] = set()
        self._allowed_by: ACL | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.lab:
            return  # TLS connections are attached by MQTTServer._handshake_done once the handshake completes
        # Not an isinstance check: uvloop's transports are no subclasses of asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
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
        deferred = self._deferred is not None and not self._write_blocked  # waits for the journal, not the device
        if self._held is not None or self._output_drains() or deferred:
            # We stopped reading (a publish held for room in the outbox, packets deferred until a SUBSCRIBE's
            # retained messages are committed, or our answers read only slowly): its silence says nothing. A device
            # that gave up closes its socket, which is seen once reading resumes.
            self._last_rx = self._loop.time()
            self._timer = self._loop.call_later(limit, self._check_keepalive)
        elif idle >= limit:
            self.close(ReasonCode.KEEP_ALIVE_TIMEOUT, f"keepalive: nothing received for {idle:.1f}s")
        else:
            self._timer = self._loop.call_later(limit - idle, self._check_keepalive)

    def _output_drains(self) -> bool:
        """Reading is paused because the device does not take our answers (pause_writing): still alive if it took
        some since the last look, however slowly. One that takes none is closed at its keep-alive, as a silent one
        is, rather than hold its buffers for as long as its TCP stack acknowledges a zero window."""
        if not self._write_blocked or self.transport is None:
            return False
        mark = output_mark(self.transport)
        progressed = mark > self._blocked_output
        self._blocked_output = mark
        return progressed

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
        if self._deferred is not None:  # the same, behind packets waiting for the output to drain
            self._deferred.extend(events)
            if self.engine.state is ConnectionState.CONNECTED:
                self.flush()
                return
            # Closed by what just came (DISCONNECT, a bad packet): no output will be sent any more, so nothing
            # waits for it; the packets are processed now, in order (a SUBSCRIBE then looks up no retained message).
            events, self._deferred = self._deferred, None
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
                # A SUBSCRIBE may add thousands of retained PUBLISHes: past the output's bound, it and what follows
                # wait for the output to drain (_flow._defer); after it, the same, so memory stays within one
                # SUBSCRIBE's retained messages and the bound.
                if not self._output_room() and self.engine.state is ConnectionState.CONNECTED:
                    self._defer(events[i:])
                    break
                self._on_subscribe(event)
                self.flush()  # its output into the transport, whose write buffer may pass its high-water mark
                if not self._output_room() and self.engine.state is ConnectionState.CONNECTED:
                    self._defer(events[i + 1:])
                    break
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
        # Closed (by a packet parsed in the same read): its retained messages would never be sent.
        live = self.engine.state is ConnectionState.CONNECTED
        codes, retained = self.server.broker.subscribe(self.session, packet, self.acl, self.device_id,
                                                       with_retained=live)
        if self.session.durable:
            self._retained_waiting += len(retained)  # held until the commit: bounded by _output_room
            self.server.session_db.after_commit(  # SUBACK once the subscription is on disk
                functools.partial(self._subscribe_committed, packet.packet_id, codes, retained))
        else:
            self._subscribed(packet.packet_id, codes, retained, True)

    def _subscribe_committed(self, packet_id: int, codes: tuple[int, ...], retained: list[Outgoing],
                             ok: bool) -> None:
        self._retained_waiting -= len(retained)
        # Its output is flushed soon (server.flush_soon), before a _run_deferred scheduled now: deferred packets
        # go on only if the write buffer is then below its high-water mark. Not flushed here: the next SUBACK of
        # this commit would find the buffer full and drop its QoS 0 retained copies as backlogged.
        self._subscribed(packet_id, codes, retained, ok)
        if retained:
            self._maybe_resume()

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
        pipeline = self.server.pipeline
        if will is not None and pipeline is not None and not self.lab:
            # Resolved now, while the certificate is at hand: the will goes through the pipeline under the device's
            # tenant when it fires, after this connection is gone (MQTTServer._publish_will).
            self.server.will_tenants[key] = pipeline.tenants.tenant(
                device_id, self.identity.serial if self.identity is not None else "", self._peercert)
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

    # --- output and close ---------------------------------------------------------------------------------

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
        elif self.engine.close_reason is not None:
            # Closed by a packet still queued behind a held publish: the session is handed back now, before a
            # takeover resumes it (connection_lost would do it later, too late for this connection's will).
            self._end(self.engine.close_reason)
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
        if self._held is not None or self._deferred is not None:
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

