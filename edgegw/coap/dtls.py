"""CoAP over DTLS 1.2 (coaps://, UDP) with X.509 client certificates, as one more aiocoap request interface.

Why our own: aiocoap's DTLS server (tinydtls) is PSK-only (BRIEF §2). This one is pyOpenSSL with memory BIOs on one
UDP socket; aiocoap's MessageManager/TokenManager above it, so the SAME resource site serves DTLS requests.

Wiring (the composition root does this once the aiocoap context exists)::

    from edgegw.coap.dtls import DTLSLimits, DTLSMaterial, identity_of, start_dtls_server
    dtls = await start_dtls_server(context, host="0.0.0.0", port=5684,
                                   material=DTLSMaterial.from_tls(settings.tls), limits=DTLSLimits(),
                                   authorize=credentials.authorize)  # optional: message_manager=factory
    ...
    dtls.replace_material(DTLSMaterial.from_tls(settings.tls))  # on reload; ConfigError keeps the old one
    dtls.revalidate()                                            # then close sessions ``authorize`` now refuses
    ...
    await dtls.close()   # or ``await context.shutdown()``, which closes it too

In a resource, ``identity_of(request.remote)`` is the :class:`DeviceIdentity` (certificate CN) of a DTLS request,
or None. It reads the ``device_identity`` attribute of the remote, so a coaps+tcp remote that carries the same
attribute answers the same way. ``request.remote.authenticated_claims`` is ``(identity,)`` as well.

Design, per datagram (``datagram_received``, no task and no await per datagram):

1. From a peer with a session: into its SSL object; handshake step, or decrypt and hand each CoAP message to
   aiocoap's MessageManager (``Message.decode`` -> ``dispatch_message``). Responses go out through
   :meth:`DTLSRemote.send` -> ``SSL.send`` -> the write BIO -> ``sendto``.
2. From a peer without one, only an epoch-0 ClientHello is looked at (anything else is counted and dropped). It goes
   to ONE shared listener SSL object through ``DTLSv1_listen``: without a valid cookie OpenSSL answers a
   HelloVerifyRequest and nothing is kept (the cookie is an HMAC of the address, :class:`CookieJar`). With a valid
   cookie the admission check runs (session cap, handshake token bucket); only then does the listener become that
   peer's session and a fresh listener is made.
3. The client certificate is verified by OpenSSL against ``tls.ca`` (and ``tls.crl``: leaf CRL check); the verify
   callback reads the single CN and asks ``authorize(identity)`` (e.g. ``Credentials.authorize``: registry state and
   revoked serials); a refusal fails the handshake with an alert. Identity = CN, as for MQTT.
4. A ClientHello from an address that has a session starts a new handshake (cookie first) and replaces it once
   the cookie proves the address: a device that rebooted is not locked out until idle expiry.
5. DTLS-PSK, only when ``psk_keys`` (PSK identity -> key or None) is given: PSK suites are added next to the
   certificate ones (RFC 7252's TLS_PSK_WITH_AES_128_CCM_8 among them); identity = the PSK identity, and
   ``authorize`` is asked as for a certificate (serial and not_after are ""). A wrong key fails the Finished
   check, which DTLS drops silently: it ends as a handshake timeout. The registry holds no PSKs yet: whoever
   adds them passes the lookup here.

Limits (:class:`DTLSLimits`, defaults; ConfigError keys ``coap.dtls_<field>``): ``max_sessions`` 1000 (handshaking
ones included; refused past it, counted), ``handshakes_per_second`` 50 with ``handshake_burst`` 50 (token bucket;
a refused ClientHello gets no answer and the client retries), ``handshake_timeout`` 10 s, ``idle_timeout`` 300 s
(sessions with no record from the device that decrypts are closed with close_notify: an observer stays alive through its
ACKs of confirmable notifications, or a CoAP ping), ``rcvbuf`` 4 MiB (SO_RCVBUFFORCE, else SO_RCVBUF; the
effective size is logged, a cap by net.core.rmem_max is a warning), ``mtu`` 1400 (the largest datagram we send;
handshake flights are fragmented to it), ``cookie_rotation`` 60 s, ``exchange_lifetime`` 30 s (aiocoap's
message-id memory; RFC 7252's 247 s costs ~2.3 KB per request for 4 minutes), ``max_inflight`` 32
(``coap.max_inflight``: requests of one session awaiting their commit; past it, while the outbox is congested or
once :meth:`DTLSServer.stop_reading` ran, that session's new requests are dropped unread and the device retransmits
its CON; counted in ``requests_dropped_busy``). Memory: sessions <= max_sessions, each one SSL object whose BIOs
are drained at every datagram (measured ~80 KB of RSS per established session with P-256 certificates: the default
cap bounds them near 80 MB); nothing else is kept per peer. Half-open handshakes
(a peer that answered the cookie but has no valid certificate) hold a slot for at most ``handshake_timeout``, so
they take at most ``handshakes_per_second`` x ``handshake_timeout`` slots (500 of the 1000 by default).
Counters: :class:`DTLSStats` (``server.stats``); ``server.sessions``, ``server.rcvbuf`` (as the kernel reports it).

Not here: ``bind`` on a wildcard address replies from the address the kernel picks (bind one address on
multi-homed hosts). aiocoap (0.4.17) and pyOpenSSL are pinned exactly: TokenManager/MessageManager construction,
``OpenSSL._util`` (ERR_clear_error, the PSK callback) are not public API.

Where the code is: this module holds :class:`DTLSServer` (its state, the socket protocol, reload, the sweep,
shutdown) and :func:`start_dtls_server`, and is the import path of the names in ``__all__``. The server's methods
of one job each are in mixins: ``_dtls_handshake.py`` (new peers: cookie exchange, admission, the handshake and its
timer), ``_dtls_traffic.py`` (application data in and out, datagrams, a session's teardown); ``_dtls_conn.py`` holds
their small helpers (drain a BIO, the peer and the failure as text). Unchanged: ``_dtls_context.py`` (the pyOpenSSL
context, identity from a certificate), ``_dtls_session.py`` (limits, stats, sessions, the aiocoap remote),
``_dtls_wire.py`` (ClientHello, cookie, datagram packing), ``_dtls_client.py`` (a test and bench client).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import structlog
from aiocoap.messagemanager import MessageManager
from aiocoap.tokenmanager import TokenManager
from aiocoap.util import hostportjoin
from OpenSSL import SSL

from ._dtls_conn import _peer
from ._dtls_context import DTLSMaterial, build_context
from ._dtls_handshake import Authorize, DTLSHandshakes, PSKKeys
from ._dtls_session import (
    DTLSLimits,
    DTLSRemote,
    DTLSStats,
    ExchangeTuning,
    MessageInterface,
    Session,
    identity_of,
)
from ._dtls_wire import CookieJar, client_random, is_client_hello

__all__ = ["DTLSLimits", "DTLSMaterial", "DTLSRemote", "DTLSServer", "DTLSStats", "identity_of",
           "start_dtls_server"]

log = structlog.get_logger("edgegw.coap.dtls")


class DTLSServer(DTLSHandshakes, asyncio.DatagramProtocol):
    """The UDP socket, the sessions and their SSL objects. Build with :func:`start_dtls_server`."""

    def __init__(self, material: DTLSMaterial, limits: DTLSLimits, authorize: Authorize,
                 loop: asyncio.AbstractEventLoop, psk_keys: PSKKeys | None = None) -> None:
        self.limits = limits
        self._psk_keys = psk_keys
        self.stats = DTLSStats()
        self.hostinfo_local = ""
        self._authorize = authorize
        self._loop = loop
        self._cookies = CookieJar(limits.cookie_rotation, loop.time)
        self._context = self._build(material)
        self._listener = self._new_listener()
        self._admission: str | None = None
        self._listening_for: tuple[Any, ...] = ()
        self._sessions: dict[tuple[Any, ...], Session] = {}
        self._tokens = float(limits.handshake_burst)
        self._tokens_at = loop.time()
        self._transport: asyncio.DatagramTransport | None = None
        self._mman: MessageManager | None = None
        self._tuning = ExchangeTuning(limits.exchange_lifetime)
        self.rcvbuf = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._unflushed: dict[tuple[Any, ...], Session] = {}
        """Sessions with application records written since the last flush (see :meth:`_send_app`)."""
        self._draining = False
        self.inflight = 0
        """Requests of all sessions awaiting their commit (kept by :class:`DTLSRemote`); the drain waits for it."""

    # --- material -----------------------------------------------------------------------------------------

    def _build(self, material: DTLSMaterial) -> SSL.Context:
        return build_context(material, verify=self._verify, cookie_generate=self._cookie_generate,
                             cookie_verify=self._cookie_verify, psk=self._psk if self._psk_keys else None)

    def replace_material(self, material: DTLSMaterial) -> None:
        """New handshakes use the new cert/key/CA/CRL; running sessions keep theirs. ConfigError: nothing changes."""
        self._context = self._build(material)
        self._listener = self._new_listener()
        log.info("dtls.material_replaced", cert=str(material.cert), crl=str(material.crl) if material.crl else None)

    def revalidate(self) -> list[str]:
        """Ask ``authorize`` again for every established session; close (close_notify) those it now refuses."""
        closed: list[str] = []
        for session in list(self._sessions.values()):
            if session.identity is None or not session.established:
                continue
            refusal = self._ask(session.identity)
            if refusal is not None:
                log.warning("dtls.session_closed", peer=_peer(session), device_id=session.identity.device_id,
                            reason=refusal)
                self._drop(session, refusal, notify=True)
                closed.append(session.identity.device_id)
        return closed

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def address(self) -> tuple[Any, ...]:
        assert self._transport is not None
        return tuple(self._transport.get_extra_info("sockname"))

    # --- asyncio DatagramProtocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on an unconnected socket cannot be tied to a session; idle expiry cleans up.
        log.debug("dtls.socket_error", error=repr(exc))

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.stats.datagrams += 1
        try:
            session = self._sessions.get(addr)
            if session is None or (session.established and is_client_hello(data)
                                   and client_random(data) != session.client_random):  # not a late duplicate
                self._new_peer(data, addr, session)
                return
            try:
                session.conn.bio_write(data)
            except SSL.Error:
                self.stats.record_errors += 1
                return
            if session.established:
                self._read_app(session)
            else:
                self._handshake(session)
        except Exception as exc:  # a bug here must cost one datagram, never the listener
            log.exception("dtls.datagram_crashed", peer=f"{addr[0]}:{addr[1]}", error=repr(exc))

    # --- expiry and shutdown ------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """One task for all sessions: handshake timeouts and idle expiry, once a second at most."""
        interval = min(1.0, self.limits.handshake_timeout / 2, self.limits.idle_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            now = self._loop.time()
            for session in list(self._sessions.values()):
                try:
                    self._sweep_one(session, now)
                except Exception as exc:
                    # One teardown that raises (OpenSSL, aiocoap's dispatch_error) must not end the sweep: without
                    # it no handshake times out and no session expires, and dtls_max_sessions fills for good.
                    log.exception("dtls.sweep_failed", peer=_peer(session), error=repr(exc))
                    if self._sessions.get(session.peer) is session:  # its slot is freed even so
                        del self._sessions[session.peer]
                        self.stats.sessions = len(self._sessions)

    def _sweep_one(self, session: Session, now: float) -> None:
        if not session.established and now - session.created > self.limits.handshake_timeout:
            self.stats.handshake_timeouts += 1
            self._fail(session, f"handshake timed out after {self.limits.handshake_timeout} s")
        elif session.established and now - session.last_seen > self.limits.idle_timeout:
            self.stats.sessions_expired += 1
            log.info("dtls.session_expired", peer=_peer(session),
                     device_id=session.identity.device_id if session.identity else None)
            self._drop(session, "idle", notify=True)

    @property
    def queued(self) -> int:
        """Our confirmable messages not sent at all yet: aiocoap sends one CON per remote at a time (NSTART = 1), so
        the separate 2.01s released by one commit go out one per ACK of the device. The drain waits for them too
        (private aiocoap state, pinned: ``MessageManager._backlogs``)."""
        mman = self._mman
        backlogs = getattr(mman, "_backlogs", None) or {}
        return sum(len(queue) for queue in backlogs.values())

    def stop_reading(self) -> None:
        """The gateway drains: no new handshakes and no new requests from here on; requests awaiting their commit
        (:attr:`inflight`) are still answered, and the devices' ACKs still pass."""
        self._draining = True

    def detach(self) -> None:
        """aiocoap's message layer is shutting down: stop handing it messages and errors."""
        self._mman = None

    async def close(self) -> None:
        """Close every session (close_notify), the sweeper and the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
        for session in list(self._sessions.values()):
            self._drop(session, "gateway shutting down", notify=True)
        if self._transport is not None:
            self._transport.close()
        log.info("dtls.closed")


def _udp_socket(host: str, port: int, rcvbuf: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # Without this, a burst of ClientHellos overflows the default ~208 KiB buffer (BRIEF §2: 744 of 1,000 lost).
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, rcvbuf)
                break
            except OSError:
                continue
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_dtls_server(context: Any, *, host: str, port: int, material: DTLSMaterial,
                            limits: DTLSLimits | None = None, authorize: Authorize = lambda identity: None,
                            message_manager: Callable[[TokenManager], MessageManager] = MessageManager,
                            psk_keys: PSKKeys | None = None,
                            token_manager: Callable[[Any], TokenManager] = TokenManager) -> DTLSServer:
    """Listen for coaps:// on ``host:port`` and serve it with ``context``'s site (an ``aiocoap.Context``).

    ``message_manager`` builds aiocoap's message layer above the transport (a subclass may count or tune).
    ``psk_keys`` (PSK identity -> key, or None) turns on DTLS-PSK next to certificates; None (default): PSK off.
    ``token_manager`` builds aiocoap's token layer (edgegw's server passes its publish fast path,
    :class:`edgegw.coap._fastpath.PublishTokenManager`).

    Raises ConfigError (a ``tls.*`` file does not load) or OSError (the port is taken).
    """
    limits = limits or DTLSLimits()
    loop = asyncio.get_running_loop()
    server = DTLSServer(material, limits, authorize, loop, psk_keys)
    sock = _udp_socket(host, port, limits.rcvbuf)
    await loop.create_datagram_endpoint(lambda: server, sock=sock)
    got = server.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if got < limits.rcvbuf:  # Linux reports twice what it grants
        log.warning("dtls.rcvbuf_capped", asked=limits.rcvbuf, got=got,
                    hint="raise net.core.rmem_max or run with CAP_NET_ADMIN")
    bound = server.address
    server.hostinfo_local = str(hostportjoin(bound[0], bound[1]))
    # The same layering aiocoap builds for its own UDP transports (Context._append_tokenmanaged_...).
    tman = token_manager(context)
    mman = message_manager(tman)
    mman.message_interface = MessageInterface(server)
    tman.token_interface = mman
    context.request_interfaces.append(tman)
    server._mman = mman
    server._sweeper = asyncio.create_task(server._sweep(), name="dtls sweeper")
    log.info("dtls.listening", address=server.hostinfo_local, rcvbuf=got, max_sessions=limits.max_sessions,
             handshakes_per_second=limits.handshakes_per_second, idle_timeout=limits.idle_timeout)
    return server
