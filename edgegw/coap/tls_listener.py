"""The coaps+tcp listener (RFC 8323 over TLS): our accept and handshake, aiocoap's framing and token handling.

aiocoap's own ``tlsserver`` hands the SSLContext to ``loop.create_server`` (private ``_ssl_context``), listens on
port + 1 of its ``bind``, never limits connections, keeps the context for its lifetime and lets a failed handshake
vanish into asyncio's logger. So this module replaces only the accepting half, exactly as ``mqtt/server.py`` does:
a plain TCP acceptor (``mqtt/_tls_listener.py``) refuses past ``max_connections`` before any TLS work,
``loop.connect_accepted_socket(ssl=...)`` runs the handshake with the *current* context (replaced on reload), a
failure is logged with who and why (``tls.handshake_failed``), and the verified certificate's CN becomes the
connection's :attr:`DeviceConnection.device_identity`. The connection is then
an ordinary aiocoap ``TcpConnection`` (CSM, Ping/Pong, Release, Abort, message framing) registered with the Context's
token manager, so the resource site serves it like any aiocoap remote.

Private aiocoap API used (pinned: aiocoap==0.4.17): ``transports.tcp.TcpConnection`` / ``TCPServer`` internals
(``_spool``, ``_transport``, ``_my_max_message_size``, ``_pool``, ``_tokenmanager``; ``data_received``'s body is
:meth:`DeviceConnection._frame`, with ``_extract_message_size``, ``_decode_message``, ``_process_signaling``,
``_remote_settings``, ``_ctx._dispatch_incoming`` / ``_dispatch_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiocoap import COAPS_PORT
from aiocoap import error as coap_error
from aiocoap.transports import rfc8323common
from aiocoap.transports.tcp import (
    TcpConnection,
    TCPServer,
    _decode_message,
    _extract_message_size,
    _serialize,
)

from edgegw.config import CoAPSettings
from edgegw.identity import (
    DeviceIdentity,
    describe_handshake_error,
    identity_from_peercert,
)
from edgegw.mqtt._tls_listener import TLSListener as PlainListener

log = structlog.get_logger("edgegw.coap")

Authorizer = Callable[[DeviceIdentity], "str | None"]
"""None, or why a verified identity may not use the gateway (registry: suspended/revoked; CRL)."""

_HEADER_SLACK = 1024
"""Bytes of a CoAP-over-TCP message besides its payload that we accept (length, code, token, options)."""


class DeviceConnection(TcpConnection):
    """One device's coaps+tcp connection. Also the aiocoap remote of its requests (``request.remote``).

    ``device_identity``: the verified certificate identity (the attribute every edgegw CoAP remote carries; the
    DTLS transport's remotes do too). ``refused``: why this identity may not publish (registry, CRL), answered
    4.03 to each request. ``inflight``: requests being processed, for flow control.
    """

    def __init__(self, listener: TLSListener, peer: str) -> None:
        super().__init__(listener, listener.log, asyncio.get_running_loop(), is_server=True)
        self._my_max_message_size = listener.settings.max_payload + _HEADER_SLACK
        self.listener = listener
        self.peer = peer
        self.device_identity: DeviceIdentity | None = None
        self.refused: str | None = None
        self.inflight = 0
        self.observing = 0
        """Observations open on this connection: it may stay silent for hours (the idle sweep spares it; TCP
        keep-alive finds a peer that is gone)."""
        self.last_rx = self.loop.time()
        self._early: list[bytes] = []
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._paused = False
        self._write_blocked = False
        """The device does not read our answers (the transport's write buffer is over its high-water mark)."""
        self._reading = True
        self._held = bytearray()
        """Bytes read and not yet framed (:meth:`_frame`): a partial message, or at most one read past a pause."""
        self._lost = False

    # --- output: the responses of one commit group go out in one write (one TLS record, one send) -------------

    def _send_message(self, msg: Any) -> None:
        # aiocoap writes each message at once: one TLS record and one send() per response (most of the CPU of a
        # request, measured). Responses released by the same group commit are written together instead.
        if self._transport is None:
            return
        self._out.append(_serialize(msg))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            transport.write(b"".join(out))

    def _abort_with(self, abort_msg: Any) -> None:
        if self._transport is not None:
            self._send_message(abort_msg)
            self._flush()
            self._transport.close()
        else:
            self._ctx = None  # as aiocoap does: a poisoned connection cannot reach the server any more

    # --- asyncio protocol (data arrives only after attach; bytes the TLS layer delivered early are kept) -------

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            self._early.append(data)
            return
        self.last_rx = self.loop.time()
        held = self._held
        if held:  # the rest of an earlier read waits (a pause, a partial message): behind it, in order
            held += data
            self._feed()
            return
        pos = self._frame(data)  # the common case: the read framed as it is, no copy into the buffer
        if pos < len(data):
            held += memoryview(data)[pos:]

    def _feed(self) -> None:
        """Frame and dispatch what is held (:meth:`_frame`); keep what it did not take."""
        held = self._held
        del held[:self._frame(held)]

    def _frame(self, buf: bytes | bytearray) -> int:
        """Frame and dispatch ``buf`` as aiocoap's ``TcpConnection.data_received`` does (its body, pinned 0.4.17),
        but one message at a time and none while reading is paused; returns how many bytes were taken. aiocoap
        dispatches every message of a read at once, so a device pipelining requests had as many awaiting their
        commit as one read holds (2,000 with max_inflight = 4, measured), past max_inflight and the write high-water
        mark. What is left waits in ``_held`` for :meth:`_read_or_not` to read again (the device may send nothing
        more meanwhile). One length parse and one copy per message (none for a read that is exactly one message)."""
        pos = 0
        n = len(buf)
        try:
            while self._reading and pos < n:
                transport = self._transport
                if transport is None or transport.is_closing():
                    return n  # closed meanwhile (an Abort, a refused device): the rest is not served
                size = _extract_message_size(buf[pos:pos + 5])  # the length field: 1 + at most 4 bytes
                if size is None:
                    break
                end = pos + sum(size)
                if end - pos > self._my_max_message_size:
                    self.abort("Overly large message announced")
                    return n
                if end > n:
                    break  # the rest of this message is still to come
                chunk = buf[pos:end]
                try:
                    msg = _decode_message(chunk if type(chunk) is bytes else bytes(chunk))
                except coap_error.UnparsableMessage:
                    self.abort("Failed to parse message")
                    return n
                pos = end
                msg.remote = self
                if msg.code.is_signalling():
                    try:
                        self._process_signaling(msg)
                    except rfc8323common.CloseConnection as exc:
                        self._ctx._dispatch_error(self, exc.args[0])
                        transport.close()
                        return n
                    continue
                if self._remote_settings is None:
                    self.abort("No CSM received")
                    return n
                self._ctx._dispatch_incoming(self, msg)
        except Exception as exc:  # noqa: BLE001 - junk must close this connection, never reach the loop
            log.warning("coap.protocol_error", peer=self.peer, device_id=self._device_id, error=repr(exc)[:200])
            self.close()
            return n
        return pos

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.listener._forget(self)
        if self._transport is not None:
            super().connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called by the TLS layer once the handshake is done; aiocoap's part (host info, our CSM) waits for attach,
        # after the listener checked the identity. Until then data_received keeps what arrives in _early.
        pass

    def attach(self, transport: asyncio.Transport) -> None:
        TcpConnection.connection_made(self, transport)  # aiocoap: host info, our CSM
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def abort(self, errormessage: str | None = None, bad_csm_option: int | None = None) -> None:
        # aiocoap calls this on a message it cannot frame or parse (RFC 8323 Abort, then close): junk is logged
        # here, once, with who sent it.
        self.listener.stats.protocol_errors += 1
        log.warning("coap.protocol_error", peer=self.peer, device_id=self._device_id, reason=errormessage)
        super().abort(errormessage, bad_csm_option)

    def shut(self, reason: str) -> None:
        """Our decision (e.g. the device was revoked): an RFC 8323 Abort carrying ``reason``, then close."""
        TcpConnection.abort(self, reason[:128])

    @property
    def _device_id(self) -> str | None:
        return self.device_identity.device_id if self.device_identity else None

    # --- flow control, used by the site ------------------------------------------------------------------------

    def request_started(self) -> None:
        self.inflight += 1
        if self.inflight >= self.listener.settings.max_inflight:
            self.pause()

    def request_done(self) -> None:
        self.inflight -= 1
        if self._paused and self.inflight <= self.listener.settings.max_inflight // 2:
            self.resume()

    def pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._read_or_not()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.listener.draining:
            self._paused = False
            self._read_or_not()

    def pause_writing(self) -> None:
        # asyncio: the write buffer passed its high-water mark, the device does not read what we answer. Every
        # request it sends makes an answer (a refusal, discovery: several times its size), so reading on would grow
        # that buffer without bound (aiocoap's pause_writing does nothing); its requests wait in its socket.
        self._write_blocked = True
        self._read_or_not()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._read_or_not()

    def _read_or_not(self) -> None:
        """Read while neither flow control (:meth:`pause`) nor an unread output (:meth:`pause_writing`) holds it."""
        transport = self._transport
        reading = not (self._paused or self._write_blocked)
        if transport is None or reading == self._reading or transport.is_closing():
            return
        self._reading = reading
        if reading:
            transport.resume_reading()
            if self._held:  # requests that came in one read with those that paused it (not from within on_commit)
                self.loop.call_soon(self._feed)
        else:
            transport.pause_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()  # after what is buffered (a last response) is written
        else:
            self.listener._forget(self)

    def hard_close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self.listener._forget(self)


@dataclass(slots=True)
class TLSListenerStats:
    accepted: int = 0
    refused_capacity: int = 0
    handshake_failed: int = 0
    devices_refused: int = 0
    """Verified devices the registry/CRL refuses (answered 4.03)."""
    protocol_errors: int = 0
    idle_closed: int = 0


class TLSListener(TCPServer):
    """An aiocoap token interface (``TokenInterface``) serving coaps+tcp on ``settings.bind:settings.port``."""

    _scheme = "coaps+tcp"
    _default_port = COAPS_PORT

    def __init__(self, settings: CoAPSettings, ssl_context: ssl.SSLContext, log_: Any,
                 authorizer: Authorizer | None) -> None:
        super().__init__()
        self.settings = settings
        self.ssl_context = ssl_context
        """Replaced as a whole on reload: new handshakes use the new one, established connections keep theirs."""
        self.authorizer = authorizer
        self.log = log_
        self.stats = TLSListenerStats()
        self.draining = False
        self.devices: dict[str, set[DeviceConnection]] = {}
        """The live connections of each device id. CoAP has no session to take over, and a client may open
        several (aiocoap's opens one per concurrent first request): all are kept, within ``max_connections``."""
        self._handshakes: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    @classmethod
    async def start(cls, tman: Any, settings: CoAPSettings, ssl_context: ssl.SSLContext, log_: Any,
                    authorizer: Authorizer | None) -> TLSListener:
        self = cls(settings, ssl_context, log_, authorizer)
        self._tokenmanager = tman
        loop = asyncio.get_running_loop()
        # Plain accepted sockets, TLS from their first byte (connect_accepted_socket(ssl=...)): no plain-text
        # protocol that could be handed the ClientHello (uvloop starts reading after connection_made whatever
        # it did there, so "pause, then start_tls" loses a ClientHello that came early).
        self.server = await PlainListener.create(settings.bind, settings.port, self._on_accept, backlog=1024)
        if settings.idle_timeout > 0:
            self._sweeper = loop.call_later(settings.idle_timeout / 4, self._sweep)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    # --- accept and handshake ----------------------------------------------------------------------------------

    def _on_accept(self, sock: socket.socket, peer: str) -> None:
        if self.draining or len(self._pool) >= self.settings.max_connections:
            self.stats.refused_capacity += 1
            log.warning("coap.connection_refused", peer=peer, reason="draining" if self.draining else "capacity",
                        max_connections=self.settings.max_connections)
            sock.close()
            return
        _keepalive(sock, self.settings.idle_timeout)
        conn = DeviceConnection(self, peer)
        self._pool.add(conn)
        task = asyncio.get_running_loop().create_task(self._handshake(sock, conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, conn: DeviceConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            # TLS from the first byte (no plain-text protocol in between); conn.connection_made, called when the
            # handshake is done, waits for attach() below, after the identity check.
            tls, _ = await loop.connect_accepted_socket(lambda: conn, sock, ssl=self.ssl_context,
                                                        ssl_handshake_timeout=self.settings.handshake_timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            self.stats.handshake_failed += 1
            log.warning("tls.handshake_failed", peer=conn.peer, reason=describe_handshake_error(exc),
                        listener="coap")
            self._forget(conn)  # the socket is the loop's: it closed it with the failed transport
            return
        if tls is None or conn._lost:
            self._forget(conn)
            return
        ssl_object = tls.get_extra_info("ssl_object")
        identity = identity_from_peercert(ssl_object.getpeercert() if ssl_object else None)
        if identity is None:
            self.stats.handshake_failed += 1
            log.warning("tls.identity_refused", peer=conn.peer, reason="client certificate has no single CN",
                        listener="coap")
            tls.abort()
            self._forget(conn)
            return
        conn.device_identity = identity
        if self.authorizer is not None:
            conn.refused = self.authorizer(identity)
        if conn.refused is not None:
            # Kept open so that its requests are answered 4.03 with the reason: firmware can tell "refused" from
            # "network" (the MQTT listener answers CONNACK 0x87 for the same reason).
            self.stats.devices_refused += 1
            log.warning("coap.device_refused", device_id=identity.device_id, peer=conn.peer, reason=conn.refused)
        else:
            self.devices.setdefault(identity.device_id, set()).add(conn)
        self.stats.accepted += 1
        log.info("coap.connected", device_id=identity.device_id, peer=conn.peer, refused=conn.refused is not None)
        conn.attach(tls)

    def _forget(self, conn: DeviceConnection) -> None:
        self._pool.discard(conn)
        identity = conn.device_identity
        if identity is not None:
            mine = self.devices.get(identity.device_id)
            if mine is not None:
                mine.discard(conn)
                if not mine:
                    del self.devices[identity.device_id]

    def _sweep(self) -> None:
        """Close connections silent for ``idle_timeout`` (one timer for all connections, not one each)."""
        loop = asyncio.get_running_loop()
        limit = self.settings.idle_timeout
        try:
            now = loop.time()
            for conn in list(self._pool):
                try:
                    if (conn._transport is not None and conn.inflight == 0 and conn.observing == 0
                            and now - conn.last_rx > limit):
                        self.stats.idle_closed += 1
                        log.info("coap.idle_closed", device_id=conn._device_id, peer=conn.peer, idle_timeout=limit)
                        conn.close()
                except Exception as exc:
                    # One close that raises must not end the sweep (no more idle expiry: max_connections fills).
                    log.exception("coap.sweep_failed", device_id=conn._device_id, peer=conn.peer, error=repr(exc))
                    with contextlib.suppress(Exception):  # its slot is freed below even so
                        conn.hard_close()
                    self._forget(conn)
        finally:
            if not self.draining:  # stop_accepting cancelled the timer for good
                self._sweeper = loop.call_later(limit / 4, self._sweep)

    # --- reload --------------------------------------------------------------------------------------------------

    def close_refused(self, authorize: Authorizer) -> list[str]:
        """After a reload: close the connections of devices no longer allowed; the device ids closed."""
        closed = []
        for device_id, conns in list(self.devices.items()):
            for conn in list(conns):
                assert conn.device_identity is not None
                refusal = authorize(conn.device_identity)
                if refusal is None:
                    continue  # each connection has its own certificate (an old one may be revoked, a new not)
                log.warning("tls.session_closed", device_id=device_id, reason=refusal, listener="coap")
                conn.shut(f"not authorized: {refusal}")
                self._forget(conn)
                closed.append(device_id)
        return closed

    # --- shutdown ------------------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()
        for task in list(self._handshakes):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    @property
    def inflight(self) -> int:
        return sum(c.inflight for c in self._pool)

    def pause_all(self) -> None:
        for conn in list(self._pool):
            conn.pause()

    async def shutdown(self) -> None:
        """aiocoap's Context.shutdown: RFC 8323 Release to every connection, then close them."""
        self.stop_accepting()
        self._tokenmanager = None
        for conn in list(self._pool):
            if conn._transport is not None and not conn._transport.is_closing():
                try:
                    await conn.release()
                except Exception:  # noqa: BLE001 - a connection that broke meanwhile needs no Release
                    pass
            conn.close()
        if self.server is not None:
            await self.server.wait_closed()


def _keepalive(sock: socket.socket, idle: float) -> None:
    """TCP keep-alive probes after ``idle`` seconds of silence (10 min when 0), so a device that lost power while
    observing is found and its connection freed without any traffic of ours."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle or 600)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    except OSError:
        pass
