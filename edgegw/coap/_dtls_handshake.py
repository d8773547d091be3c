"""A DTLS peer's way to a session, mixed into :class:`~edgegw.coap.dtls.DTLSServer`: a ClientHello from a peer
without a session (the shared listener's cookie exchange, then admission: session cap, handshake token bucket), the
handshake (certificate or PSK, ``authorize`` asked, an alert on refusal) and its retransmission timer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from OpenSSL import SSL, crypto

from edgegw.identity import DeviceIdentity

from ._dtls_conn import _drain, _peer, _reason
from ._dtls_context import (
    clear_openssl_errors,
    describe_verify_error,
    identity_from_certificate,
)
from ._dtls_session import DTLSRemote, Session
from ._dtls_traffic import DTLSTraffic
from ._dtls_wire import CookieJar, client_random, is_client_hello

log = structlog.get_logger("edgegw.coap.dtls")

Authorize = Callable[[DeviceIdentity], "str | None"]
PSKKeys = Callable[[str], "bytes | None"]


class DTLSHandshakes(DTLSTraffic):
    """Mixed into :class:`~edgegw.coap.dtls.DTLSServer` (which sets these attributes); runs on the event loop."""

    hostinfo_local: str
    inflight: int
    _authorize: Authorize
    _psk_keys: PSKKeys | None
    _cookies: CookieJar
    _context: SSL.Context
    _listener: SSL.Connection
    _admission: str | None
    _listening_for: tuple[Any, ...]
    _tokens: float
    _tokens_at: float
    _closed: bool

    if TYPE_CHECKING:  # DTLSServer's; a DTLSRemote, made here, calls them
        def detach(self) -> None: ...

        async def close(self) -> None: ...

    # --- new peers: cookie first, state after -------------------------------------------------------------

    def _new_peer(self, data: bytes, addr: tuple[Any, ...], old: Session | None) -> None:
        if self._draining and not self._closed:
            log.debug("dtls.datagram_dropped", peer=f"{addr[0]}:{addr[1]}", reason="gateway draining")
            return
        if self._closed or not is_client_hello(data):
            self.stats.dropped_junk += 1
            log.debug("dtls.datagram_dropped", peer=f"{addr[0]}:{addr[1]}", size=len(data),
                      reason="not a ClientHello from a peer without a session")
            return
        listener = self._listener
        self._listening_for = addr
        self._admission = None
        try:
            listener.bio_write(data)
            listener.DTLSv1_listen()
        except SSL.WantReadError:
            clear_openssl_errors()
            answer = _drain(listener)
            if self._admission is not None:  # valid cookie, but no room: say nothing, the client retries later
                log.info("dtls.handshake_refused", peer=f"{addr[0]}:{addr[1]}", reason=self._admission)
            elif answer:
                self.stats.hello_verify_sent += 1
                self._sendto(answer, addr)
            return
        except SSL.Error as exc:
            clear_openssl_errors()
            self.stats.dropped_junk += 1
            log.debug("dtls.client_hello_dropped", peer=f"{addr[0]}:{addr[1]}", reason=_reason(exc))
            self._listener = self._new_listener()  # its state after an error is not worth trusting
            return
        # The cookie proved the address: the listener becomes this peer's session.
        self._listener = self._new_listener()
        if old is not None:
            self.stats.sessions_replaced += 1
            self._drop(old, "new handshake from the same address", notify=False)
        session = Session(listener, addr, self._loop.time(), client_random(data))
        listener.set_app_data(session)
        self._sessions[addr] = session
        self.stats.handshakes_started += 1
        self.stats.sessions = len(self._sessions)
        self._handshake(session)

    def _new_listener(self) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self.limits.mtu)
        return conn

    def _cookie_peer(self, conn: SSL.Connection) -> tuple[Any, ...]:
        session: Session | None = conn.get_app_data()
        return session.peer if session is not None else self._listening_for

    def _cookie_generate(self, conn: SSL.Connection) -> bytes:
        return self._cookies.generate(self._cookie_peer(conn))

    def _cookie_verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        session: Session | None = conn.get_app_data()
        if session is not None:  # OpenSSL checks the cookie again when the session processes that ClientHello
            return self._cookies.verify(session.peer, cookie)
        if not self._cookies.verify(self._listening_for, cookie):
            return False
        # Admission happens here, the one moment we know the peer owns its address and before any state exists.
        if len(self._sessions) >= self.limits.max_sessions and self._listening_for not in self._sessions:
            self.stats.refused_capacity += 1
            self._admission = f"session cap reached (coap.dtls_max_sessions = {self.limits.max_sessions})"
            return False
        if not self._take_token():
            self.stats.refused_rate += 1
            self._admission = f"handshake rate (coap.dtls_handshakes_per_second = {self.limits.handshakes_per_second})"
            return False
        return True

    def _take_token(self) -> bool:
        now = self._loop.time()
        self._tokens = min(float(self.limits.handshake_burst),
                           self._tokens + (now - self._tokens_at) * self.limits.handshakes_per_second)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    # --- handshake ----------------------------------------------------------------------------------------

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        session: Session | None = conn.get_app_data()
        if session is None:  # cannot happen: only sessions handshake
            return False
        if not ok:
            session.refusal = describe_verify_error(errno)
            return False
        if depth > 0:
            return True
        identity = identity_from_certificate(cert.to_cryptography())
        if identity is None:
            session.refusal = "client certificate has no single CN"
            return False
        refusal = self._ask(identity)
        if refusal is not None:
            session.refusal = refusal
            return False
        session.identity = identity
        return True

    def _psk(self, conn: SSL.Connection, psk_identity: str) -> bytes | None:
        session: Session | None = conn.get_app_data()
        if session is None or self._psk_keys is None:
            return None
        identity = DeviceIdentity(psk_identity, "", "")  # no certificate: no serial, no expiry
        try:
            key = self._psk_keys(psk_identity)
        except Exception as exc:
            log.exception("dtls.psk_lookup_crashed", device_id=psk_identity, error=repr(exc))
            key = None
        if key is None:
            session.refusal = "unknown PSK identity"
            return None
        refusal = self._ask(identity)
        if refusal is not None:
            session.refusal = refusal
            return None
        session.identity = identity
        return key

    def _ask(self, identity: DeviceIdentity) -> str | None:
        try:
            return self._authorize(identity)
        except Exception as exc:  # an authorizer bug refuses the device, it does not kill the handshake path
            log.exception("dtls.authorize_crashed", device_id=identity.device_id, error=repr(exc))
            return "authorization failed (internal error)"

    def _handshake(self, session: Session) -> None:
        conn = session.conn
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self._flush(session)
            self._arm_timer(session)
            return
        except SSL.Error as exc:
            self._flush(session)  # the alert, if OpenSSL wrote one
            self._fail(session, session.refusal or _reason(exc))
            return
        self._flush(session)
        if session.identity is None:  # verify callback never accepted a leaf: refuse, never serve anonymously
            self._fail(session, "no verified client certificate")
            return
        session.established = True
        session.last_seen = self._loop.time()  # idle from here (records that decrypt keep it, _read_app)
        self._cancel_timer(session)
        session.remote = DTLSRemote(self, session, session.identity)
        self.stats.handshakes_completed += 1
        log.info("dtls.session_established", peer=_peer(session), device_id=session.identity.device_id)
        self._read_app(session)  # application data may have come in the same datagram as Finished

    def _fail(self, session: Session, reason: str) -> None:
        self.stats.handshakes_failed += 1
        log.warning("dtls.handshake_failed", peer=_peer(session), reason=reason,
                    device_id=session.identity.device_id if session.identity else None)
        self._drop(session, reason, notify=False)

    def _arm_timer(self, session: Session) -> None:
        self._cancel_timer(session)
        delay = session.conn.DTLSv1_get_timeout()
        if delay is not None:
            session.timer = self._loop.call_later(max(delay, 0.0), self._on_timer, session)

    def _on_timer(self, session: Session) -> None:
        session.timer = None
        if self._sessions.get(session.peer) is not session or session.established:
            return
        try:
            session.conn.DTLSv1_handle_timeout()  # retransmits our last flight
        except SSL.Error as exc:
            self._fail(session, _reason(exc))
            return
        self._flush(session)
        self._arm_timer(session)
