"""An established DTLS session's traffic, mixed into :class:`~edgegw.coap.dtls.DTLSServer`: application records in
(decrypted, decoded, handed to aiocoap's MessageManager; dropped unread while the session is over ``max_inflight``),
answers out (written to the SSL object, flushed once per session and loop turn), datagrams to the socket, and a
session's teardown."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiocoap import error as coap_error
from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from OpenSSL import SSL

from ._dtls_conn import _BIO_CHUNK, _drain, _peer, _reason
from ._dtls_session import DTLSLimits, DTLSStats, ExchangeTuning, Session
from ._dtls_wire import pack_datagrams

log = structlog.get_logger("edgegw.coap.dtls")


class DTLSTraffic:
    """Mixed into :class:`~edgegw.coap.dtls.DTLSServer` (which sets these attributes); runs on the event loop."""

    limits: DTLSLimits
    stats: DTLSStats
    _loop: asyncio.AbstractEventLoop
    _sessions: dict[tuple[Any, ...], Session]
    _transport: asyncio.DatagramTransport | None
    _mman: MessageManager | None
    _tuning: ExchangeTuning
    _unflushed: dict[tuple[Any, ...], Session]
    _draining: bool

    # --- application data ---------------------------------------------------------------------------------

    def _read_app(self, session: Session) -> None:
        conn = session.conn
        heard = False
        while True:
            try:
                plaintext = conn.recv(_BIO_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                log.info("dtls.session_closed", peer=_peer(session), reason="closed by the device (close_notify)")
                self._drop(session, "closed by the device", notify=False)
                return
            except SSL.Error as exc:
                self.stats.record_errors += 1
                log.info("dtls.session_closed", peer=_peer(session), reason=_reason(exc))
                self._drop(session, _reason(exc), notify=False)
                return
            if not heard:
                # Idle expiry counts records that decrypted, not datagrams: anyone can send junk from (spoofing) a
                # session's address, and it would hold a gone device's session and its slot for ever.
                heard = True
                session.last_seen = self._loop.time()
            self._deliver(session, plaintext)
        self._flush(session)

    def _deliver(self, session: Session, plaintext: bytes) -> None:
        mman = self._mman
        remote = session.remote
        if mman is None or remote is None:
            return
        try:
            message = Message.decode(plaintext, remote=remote)
        except (coap_error.UnparsableMessage, UnicodeDecodeError):  # aiocoap: a string option that is not UTF-8
            self.stats.malformed_coap += 1
            log.debug("dtls.coap_malformed", peer=_peer(session), size=len(plaintext))
            return
        if (remote.paused or self._draining or self._answers_queued(mman, remote)) and message.code.is_request():
            # Flow control (docs/COAP.md "Limits"): UDP cannot stop reading one peer, so a session over max_inflight,
            # while the outbox is congested or the gateway drains, loses its new requests before aiocoap sees them
            # (no exchange, no message-id memory). The device retransmits its CON (RFC 7252 §4.2 backoff), which
            # gets through once the commits caught up; ACKs, RSTs and pings still pass.
            self.stats.requests_dropped_busy += 1
            return
        message.transport_tuning = self._tuning
        mman.dispatch_message(message)

    def _answers_queued(self, mman: MessageManager, remote: Any) -> bool:
        """Do this session's requests awaiting their commit and answers waiting for the device's ACK of an earlier
        CON (aiocoap sends one at a time, NSTART = 1; private, pinned: ``MessageManager._backlogs``) reach
        max_inflight? A request leaves max_inflight at its commit, but a separate answer (the commit took longer
        than EMPTY_ACK_DELAY) that the device never ACKs stays queued, holding its request, for the ~90 s of the
        first one's retransmissions."""
        queue = mman._backlogs.get(remote)
        return queue is not None and remote.inflight + len(queue) >= self.limits.max_inflight

    def _send_app(self, session: Session, data: bytes) -> None:
        if self._sessions.get(session.peer) is not session:
            return  # the session ended (closed, expired, replaced) while a response was being made
        try:
            session.conn.send(data)
        except SSL.Error as exc:  # e.g. a message larger than a record: lose it, keep the session
            self.stats.record_errors += 1
            log.warning("dtls.send_failed", peer=_peer(session), size=len(data), reason=_reason(exc))
        # The answers one group commit releases go out together: one drain and one sendto per session and loop
        # iteration (several records in a datagram, RFC 6347 §4.1.1) instead of one each (most of a DTLS answer's
        # cost, measured: docs/COAP.md "Performance").
        if not self._unflushed:
            self._loop.call_soon(self._flush_sent)
        self._unflushed[session.peer] = session

    def _flush_sent(self) -> None:
        sessions, self._unflushed = self._unflushed, {}
        for session in sessions.values():
            if self._sessions.get(session.peer) is session:
                self._flush(session)

    # --- I/O and teardown ---------------------------------------------------------------------------------

    def _flush(self, session: Session) -> None:
        out = _drain(session.conn)
        if out:
            self._sendto(out, session.peer)

    def _sendto(self, stream: bytes, addr: tuple[Any, ...]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        for datagram in pack_datagrams(stream, self.limits.mtu):
            transport.sendto(datagram, addr)

    def _drop(self, session: Session, reason: str, *, notify: bool) -> None:
        if self._sessions.get(session.peer) is session:
            del self._sessions[session.peer]
            self.stats.sessions = len(self._sessions)
        self._cancel_timer(session)
        if notify and session.established:
            try:
                session.conn.shutdown()  # close_notify
            except SSL.Error:
                pass
            self._flush(session)
        session.conn.set_app_data(None)
        remote, session.remote = session.remote, None  # no cycle: the SSL object goes without waiting for the GC
        if remote is not None and self._mman is not None:
            # Ends observations and pending exchanges of this session in aiocoap.
            self._mman.dispatch_error(coap_error.NetworkError(f"DTLS session closed: {reason}"), remote)

    def _cancel_timer(self, session: Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
