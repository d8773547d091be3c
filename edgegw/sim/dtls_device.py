"""A simulated CoAP device over DTLS 1.2 (``coaps://``, UDP) with its own client certificate.

The same :class:`~edgegw.sim.device.Device` (window, backlog, reconnects, chaos, counters, seqs) as the MQTT and
coaps+tcp devices; here the wire is one connected UDP socket and a pyOpenSSL DTLS session driven through memory BIOs
(as edgegw/coap/_dtls_client.py and the gateway's own transport do), without a thread or a task per device.

- The session is "up" when the DTLS handshake completes (the gateway checked the certificate, the registry and the
  CRL in it); a refused device gets an alert, counted as a connect failure.
- Each message is a confirmable ``POST /ps/{rest}`` (RFC 7252), message id = token = the device's packet id, so a
  response (piggybacked in the ACK, or a separate CON/NON response after an empty ACK when the commit takes longer)
  is matched to its message by token; 2.xx is the acknowledgement (sent after the outbox commit), 4.xx/5.xx or a
  Reset a refusal. A separate CON response is acknowledged with an empty ACK.
- Loss: a CON unanswered for ``ACK_TIMEOUT`` (2 s, doubling) is sent again with the same message id (the gateway
  answers a duplicate from its exchange cache), at most ``MAX_RETRANSMIT`` (4) times; then the session is given up
  and the device reconnects (a new handshake), where its unanswered messages are sent again, as over TCP.
- Keep-alive: an empty CON (CoAP ping) answered by a Reset, every ``keepalive / 2`` s of silence. The gateway expires
  sessions after ``coap.dtls_idle_timeout``; keep the device's keepalive below it.
- Leaving: close_notify. The gateway's certificate is checked against the trust anchor; its name is not (pyOpenSSL
  has no hostname check; the simulator trusts only the fleet's CA).

Frames: :meth:`_encode` returns each CoAP message with a 2-byte length in front, because the base class joins the
frames of one pump into one ``write``; :class:`_DTLSLink` splits them again into one DTLS record each (several
records share a datagram, up to the MTU).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from edgegw.coap._dtls_client import client_context
from edgegw.coap._dtls_wire import pack_datagrams
from edgegw.sim.coap_device import coap_path, encode_options
from edgegw.sim.device import Device

_CON, _NON, _ACK, _RST = 0, 1, 2, 3
_POST = 0x02
_URI_PATH, _CONTENT_FORMAT = 11, 12
_JSON = 50
ACK_TIMEOUT = 2.0  # RFC 7252 §4.8 (without ACK_RANDOM_FACTOR: one device's timers need no spreading here)
MAX_RETRANSMIT = 4
_TICK = 0.5
_MTU = 1400


def encode_message(mtype: int, code: int, mid: int, token: bytes = b"", options: bytes = b"",
                   payload: bytes = b"") -> bytes:
    """One CoAP-over-UDP message (RFC 7252 §3): Ver 1, type, TKL | code | message id | token | options | payload."""
    return (bytes(((1 << 6) | (mtype << 4) | len(token), code)) + mid.to_bytes(2, "big") + token + options
            + (b"\xff" + payload if payload else b""))


def dtls_context(ca: Path, cert: Path, key: Path) -> SSL.Context:
    """A device's DTLS client context: its certificate and key, the gateway's certificate checked against ``ca``."""
    return client_context(ca, cert, key)


class _DTLSLink(asyncio.DatagramProtocol):
    """One DTLS session of a device over a connected UDP socket: handshake, records in and out, close_notify.
    What the base :class:`Device` calls its transport (``write``, ``close``, ``abort``)."""

    def __init__(self, device: DTLSDevice) -> None:
        self.device = device
        self.conn = SSL.Connection(device._dtls_context, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(_MTU)
        self.udp: asyncio.DatagramTransport | None = None
        self.established = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # --- asyncio ---------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = transport  # type: ignore[assignment]
        self.device._on_link(self)
        self._handshake()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._closed or self.device._conn is not self:
            return
        try:
            self.conn.bio_write(data)
        except SSL.Error:
            return
        if not self.established:
            self._handshake()
            return
        messages = []
        try:
            while True:
                messages.append(self.conn.recv(65536))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self._lost("close_notify from gateway")
        except SSL.Error as exc:
            self._lost(f"DTLS error: {exc}")
        for message in messages:
            self.device._on_message(message)
        self._flush()  # alerts, and anything the records above made OpenSSL answer

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on the connected socket: nobody listens (the gateway stopped). Give the session up
        # now rather than after the retransmissions; a restarted gateway would not know it anyway.
        self._lost(f"{type(exc).__name__}: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    # --- handshake ---------------------------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            self._arm()
            return
        except SSL.Error as exc:
            self._flush()  # the alert, so the gateway logs it too
            self._lost(f"DTLS handshake failed: {_reason(exc)}")
            return
        self._flush()
        self._cancel_timer()
        self.established = True
        self.device._on_established()

    def _arm(self) -> None:
        """OpenSSL's handshake retransmission timer (DTLS flights are resent on loss)."""
        self._cancel_timer()
        wait = self.conn.DTLSv1_get_timeout()
        loop = self.device._loop
        if wait is not None and loop is not None:
            self._timer = loop.call_later(max(wait, 0.001), self._on_handshake_timer)

    def _on_handshake_timer(self) -> None:
        self._timer = None
        if self.established or self._closed:
            return
        try:
            self.conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._lost(f"DTLS handshake failed: {_reason(exc)}")
            return
        self._flush()
        self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- what Device calls -----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """``data``: length-prefixed CoAP messages (see the module docstring); one DTLS record each."""
        if not self.established or self._closed:
            return
        view = memoryview(data)
        try:
            while view:
                n = int.from_bytes(view[:2], "big")
                message = bytes(view[2:2 + n])
                view = view[2 + n:]
                self.device._sending(message)
                self.conn.send(message)
        except SSL.Error as exc:
            self._lost(f"DTLS error: {exc}")
        self._flush()

    def send_raw(self, message: bytes) -> None:
        """One CoAP message as it is (an empty ACK, a ping, a retransmission)."""
        self.write(len(message).to_bytes(2, "big") + message)

    def close(self) -> None:
        if self._closed:
            return
        if self.established:
            try:
                self.conn.shutdown()
            except SSL.Error:
                pass
            self._flush()
        self.abort()

    def abort(self) -> None:
        self._closed = True
        self._cancel_timer()
        if self.udp is not None:
            self.udp.close()

    # --- internals ---------------------------------------------------------------------------------------------

    def _flush(self) -> None:
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(65536))
            except SSL.WantReadError:
                break
        if chunks and self.udp is not None and not self.udp.is_closing():
            for datagram in pack_datagrams(b"".join(chunks), _MTU):
                self.udp.sendto(datagram)

    def _lost(self, reason: str) -> None:
        if self.device._conn is self:
            self.device._set_lost(reason)
        self.abort()


def _reason(exc: SSL.Error) -> str:
    args: Any = exc.args[0] if exc.args else None
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        return str(args[0][-1])
    return str(exc) or type(exc).__name__


class DTLSDevice(Device):
    """A :class:`Device` speaking CoAP over DTLS; see the module docstring. ``ssl_context`` is ignored: the device's
    files are given as ``dtls_files`` (CA, certificate, key). ``protocol`` is ignored."""

    def __init__(self, device_id: str, host: str, port: int, ssl_context: Any, *,
                 dtls_files: tuple[Path, Path, Path], **options: Any) -> None:
        super().__init__(device_id, host, port, ssl_context, **options)
        self._dtls_context = dtls_context(*dtls_files)
        path = coap_path(self.topic, device_id)
        self._options = encode_options([*((_URI_PATH, p.encode()) for p in path),
                                        (_CONTENT_FORMAT, bytes((_JSON,)))])
        self._retry: dict[int, tuple[float, int]] = {}  # message id -> (next retransmission at, retransmissions)
        self._pings: set[int] = set()

    # --- connecting (replaces the TCP connect of the base class) ---------------------------------------------

    async def _connect_once(self, loop: asyncio.AbstractEventLoop) -> str | None:
        self._connack = loop.create_future()
        self._lost = loop.create_future()
        self._retry.clear()
        self._pings.clear()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_datagram_endpoint(lambda: _DTLSLink(self), remote_addr=(self.host, self.port))
                await asyncio.wait((self._connack, self._lost), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            return "DTLS handshake timed out"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        if self._connack.done():
            error = self._connack.result()
            if error is not None:
                return error
            return None if not self._lost.done() else self._lost.result()
        return self._lost.result()

    def _on_link(self, link: _DTLSLink) -> None:
        self._conn = link  # type: ignore[assignment]
        self._transport = link  # type: ignore[assignment]

    def _on_established(self) -> None:
        assert self._loop is not None
        if self._online is not None and not self._online.is_set():  # went offline during the handshake
            self.kick()
            return
        if self._connack is None or self._connack.done():
            return
        self._last_rx = self._last_tx = self._loop.time()
        self._session_up()  # resends the unanswered messages, starts pumping and the timer
        if self._timer is not None:  # the base class armed it for keepalive / 2: retransmissions need a faster one
            self._timer.cancel()
        self._timer = self._loop.call_later(_TICK, self._on_timer)

    # --- the wire hooks of Device ------------------------------------------------------------------------------

    def _encode(self, pid: int, payload: bytes) -> bytes:
        message = encode_message(_CON, _POST, pid, pid.to_bytes(2, "big"), self._options, payload)
        return len(message).to_bytes(2, "big") + message

    def _redelivery(self, frame: bytes) -> bytes:
        return frame  # a new session: the gateway's message-id memory is per session, the same id is new there

    def _hello(self) -> bytes:
        return b""  # the handshake is the hello

    def _ping(self) -> bytes:
        mid = self._take_pid()  # not in flight, so its Reset cannot be mistaken for a refusal
        self._pings.add(mid)
        message = encode_message(_CON, 0, mid)
        return len(message).to_bytes(2, "big") + message

    def _goodbye(self) -> bytes:
        return b""  # close() then sends close_notify

    # --- from the link ---------------------------------------------------------------------------------------

    def _sending(self, message: bytes) -> None:
        """Every CON request written (first time or again on a new session) gets a retransmission deadline."""
        assert self._loop is not None
        if message[0] >> 4 & 3 == _CON and message[1] == _POST:
            mid = int.from_bytes(message[2:4], "big")
            if mid not in self._retry:
                self._retry[mid] = (self._loop.time() + ACK_TIMEOUT, 0)

    def _on_message(self, message: bytes) -> None:
        assert self._loop is not None
        if len(message) < 4 or message[0] >> 6 != 1:
            return  # not CoAP version 1: ignored (RFC 7252 §3)
        self._last_rx = self._loop.time()
        mtype, tkl, code = message[0] >> 4 & 3, message[0] & 0x0F, message[1]
        mid = int.from_bytes(message[2:4], "big")
        if mtype == _CON and self._transport is not None:  # a separate response: acknowledge it (empty ACK)
            self._transport.send_raw(encode_message(_ACK, 0, mid))  # type: ignore[attr-defined]
        if mtype in (_ACK, _RST):
            self._retry.pop(mid, None)  # answered (an empty ACK: the response follows separately)
            if mid in self._pings:
                self._pings.discard(mid)
                return
        acked = False
        if mtype == _RST:
            acked = self._on_ack(mid, False)  # a Reset of a request: the gateway could not take it
        elif code and tkl == 2 and code >> 5 in (2, 4, 5):
            acked = self._on_ack(int.from_bytes(message[4:6], "big"), code >> 5 == 2)
        if acked:
            self.pump()

    def _on_ack(self, pid: int, ok: bool) -> bool:
        self._retry.pop(pid, None)
        return super()._on_ack(pid, ok)

    def _on_timer(self) -> None:
        """Retransmissions (every tick) and keep-alive (as the base class), on one timer per device."""
        self._timer = None
        link, loop = self._transport, self._loop
        if link is None or loop is None or not self.connected:
            return
        now = loop.time()
        if self.keepalive and now - self._last_rx > 1.5 * self.keepalive:
            self._set_lost(f"nothing from the gateway for {now - self._last_rx:.1f} s")
            link.abort()
            return
        for mid, (due, tries) in list(self._retry.items()):
            if due > now:
                continue
            inflight = self._inflight.get(mid)
            if inflight is None:
                del self._retry[mid]
                continue
            if tries >= MAX_RETRANSMIT:
                self._set_lost(f"no answer after {MAX_RETRANSMIT} retransmissions")
                link.abort()
                return
            self._retry[mid] = (now + ACK_TIMEOUT * 2 ** (tries + 1), tries + 1)
            self.resent += 1
            link.write(inflight.frame)
            self._last_tx = now
        if self.keepalive and now - self._last_tx >= self.keepalive / 2:
            link.write(self._ping())
            self._last_tx = now
        self._timer = loop.call_later(_TICK, self._on_timer)
