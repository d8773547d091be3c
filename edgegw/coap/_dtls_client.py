"""A small blocking DTLS 1.2 client with a client certificate, for tests and bench/dtls_load.py (not for devices).

aiocoap's own DTLS client is PSK-only and libcoap's coap-client opens one session per process, so tests that must
hold sessions open (session cap, idle expiry, revalidation) or stop half-way through a handshake use this.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from OpenSSL import SSL

from ._dtls_context import DTLS1_2_VERSION
from ._dtls_wire import pack_datagrams


class DTLSClientError(Exception):
    """The handshake failed (an alert from the server, or no answer in time); the message says which."""


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_QUERY_MTU)
    ctx.load_verify_locations(str(ca))
    ctx.set_verify(SSL.VERIFY_PEER)
    if cert is not None and key is not None:
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(key))
    return ctx


class DTLSClient:
    def __init__(self, host: str, port: int, context: SSL.Context, *, mtu: int = 1400) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((host, port))
        self.conn = SSL.Connection(context, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(mtu)
        self.mtu = mtu

    @property
    def local_address(self) -> tuple[str, int]:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def handshake(self, timeout: float = 5.0, *, stop_after_flights: int | None = None) -> None:
        """Complete the handshake; ``stop_after_flights`` sends only that many flights (to leave it half-done)."""
        deadline = time.monotonic() + timeout
        flights = 0
        while True:
            try:
                self.conn.do_handshake()
                self.flush()
                return
            except SSL.WantReadError:
                if self.flush():
                    flights += 1
                    if stop_after_flights is not None and flights >= stop_after_flights:
                        return
            except SSL.Error as exc:
                raise DTLSClientError(str(exc)) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DTLSClientError(f"no handshake within {timeout} s")
            wait = self.conn.DTLSv1_get_timeout()
            self.sock.settimeout(min(remaining, wait if wait is not None else remaining) or 0.001)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                try:
                    self.conn.DTLSv1_handle_timeout()
                except SSL.Error as exc:
                    raise DTLSClientError(str(exc)) from None
                continue
            self.conn.bio_write(data)

    def flush(self) -> bool:
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(65536))
            except SSL.WantReadError:
                break
        for datagram in pack_datagrams(b"".join(chunks), self.mtu):
            self.sock.send(datagram)
        return bool(chunks)

    def send(self, plaintext: bytes) -> None:
        self.conn.send(plaintext)
        self.flush()

    def recv(self, timeout: float = 5.0) -> bytes:
        """The next application datagram; TimeoutError if none in time; SSL.ZeroReturnError if the server closed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.conn.recv(65536)
            except SSL.WantReadError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no DTLS application data")
            self.sock.settimeout(remaining)
            self.conn.bio_write(self.sock.recv(65536))

    def close(self, *, notify: bool = True) -> None:
        if notify:
            try:
                self.conn.shutdown()
                self.flush()
            except SSL.Error:
                pass
        self.sock.close()
