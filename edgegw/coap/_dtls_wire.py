"""DTLS record-layer facts the server needs before OpenSSL sees a datagram, and the stateless cookie.

Nothing here keeps per-peer state: a ClientHello is recognised from its first bytes (RFC 6347 §4.1 record header,
§4.2.2 handshake header), the cookie is an HMAC of the peer's address under a secret that rotates, and the bytes
OpenSSL writes to its memory BIO are cut back into records and packed into datagrams no larger than the MTU (a memory
BIO is a byte stream: it forgets where OpenSSL's datagrams ended).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterator

RECORD_HEADER = 13
"""type(1) version(2) epoch(2) sequence_number(6) length(2) -- RFC 6347 §4.1."""
HANDSHAKE_HEADER = 12
"""msg_type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3) -- RFC 6347 §4.2.2."""
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
DTLS_VERSIONS = (b"\xfe\xff", b"\xfe\xfd")  # 1.0 (a 1.2 client may send it in its first record), 1.2
MAX_CLIENT_HELLO = 4096
"""A ClientHello datagram longer than this is not worth a look: real ones are a few hundred bytes, and OpenSSL's
listener must read a datagram whole (a memory BIO would keep the rest for the next peer)."""
COOKIE_LENGTH = 16


def is_client_hello(data: bytes) -> bool:
    """True if ``data`` starts with an epoch-0 handshake record holding a ClientHello (a new association)."""
    return (RECORD_HEADER + HANDSHAKE_HEADER <= len(data) <= MAX_CLIENT_HELLO
            and data[0] == CONTENT_HANDSHAKE
            and data[1:3] in DTLS_VERSIONS
            and data[3:5] == b"\x00\x00"  # epoch 0: not inside an existing association
            and data[RECORD_HEADER] == HANDSHAKE_CLIENT_HELLO)


def client_random(data: bytes) -> bytes:
    """The 32-byte random of a ClientHello datagram (after client_version): the same in every copy of one hello,
    cookie or not (RFC 6347 §4.2.1), so a late duplicate can be told from a new handshake."""
    start = RECORD_HEADER + HANDSHAKE_HEADER + 2
    return data[start:start + 32]


def split_records(stream: bytes) -> Iterator[bytes]:
    """The DTLS records in ``stream`` (what OpenSSL wrote into its memory BIO), each whole."""
    pos, end = 0, len(stream)
    while pos < end:
        nxt = pos + RECORD_HEADER + int.from_bytes(stream[pos + 11:pos + 13], "big")
        if pos + RECORD_HEADER > end or nxt > end:  # OpenSSL writes whole records: a tail is our bug
            raise RuntimeError(f"partial DTLS record in the write BIO ({end - pos} bytes)")
        yield stream[pos:nxt]
        pos = nxt


def pack_datagrams(stream: bytes, mtu: int) -> Iterator[bytes]:
    """Records from ``stream`` packed into datagrams of at most ``mtu`` bytes (a record larger than that alone)."""
    if len(stream) <= mtu:  # the common case: one response record
        if stream:
            yield stream
        return
    batch = bytearray()
    for record in split_records(stream):
        if batch and len(batch) + len(record) > mtu:
            yield bytes(batch)
            batch.clear()
        batch += record
    if batch:
        yield bytes(batch)


class CookieJar:
    """HelloVerifyRequest cookies (RFC 6347 §4.2.1): HMAC-SHA256(secret, peer address), no state per peer.

    The secret rotates every ``rotate_after`` seconds and the previous one is still accepted, so a cookie lives
    between one and two periods. The caller passes the peer's address: OpenSSL's cookie callbacks do not get it
    from a memory BIO.
    """

    def __init__(self, rotate_after: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._rotate_after = rotate_after
        self._clock = clock
        self._secrets = (os.urandom(32), os.urandom(32))
        self._rotated_at = clock()
        self.verified = 0
        self.rejected = 0

    def _current(self) -> tuple[bytes, bytes]:
        now = self._clock()
        if now - self._rotated_at >= self._rotate_after:
            self._secrets = (os.urandom(32), self._secrets[0])
            self._rotated_at = now
        return self._secrets

    @staticmethod
    def _mac(secret: bytes, peer: tuple[object, ...]) -> bytes:
        return hmac.new(secret, f"{peer[0]}|{peer[1]}".encode(), hashlib.sha256).digest()[:COOKIE_LENGTH]

    def generate(self, peer: tuple[object, ...]) -> bytes:
        return self._mac(self._current()[0], peer)

    def verify(self, peer: tuple[object, ...], cookie: bytes) -> bool:
        ok = any(hmac.compare_digest(cookie, self._mac(s, peer)) for s in self._current())
        if ok:
            self.verified += 1
        else:
            self.rejected += 1
        return ok
