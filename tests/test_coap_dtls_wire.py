"""The DTLS server's datagram path without a socket: cookie exchange before any per-peer state, and fuzzed datagrams
that must never raise nor leave state behind. The peer is a real pyOpenSSL DTLS client on memory BIOs; the only
stand-in is the UDP transport, which records what the server sends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from structlog.testing import capture_logs

from edgegw.coap._dtls_client import client_context
from edgegw.coap._dtls_wire import CookieJar, is_client_hello, pack_datagrams, split_records
from edgegw.coap.dtls import DTLSLimits, DTLSMaterial, DTLSServer
from edgegw.pki import init_ca, issue_device, issue_server

ADDR = ("127.0.0.1", 40001)
OTHER = ("127.0.0.1", 40002)


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dtls-wire") / "pki"
    init_ca(d)
    issue_server(d, "gateway", ["127.0.0.1"])
    issue_device(d, "dev-a")
    return d


@pytest.fixture
def server(pki: Path) -> Iterator[tuple[DTLSServer, RecordingTransport]]:
    loop = asyncio.new_event_loop()
    material = DTLSMaterial(cert=pki / "server" / "gateway.crt", key=pki / "server" / "gateway.key",
                            ca=pki / "ca.crt")
    srv = DTLSServer(material, DTLSLimits(), lambda identity: None, loop)
    transport = RecordingTransport()
    srv.connection_made(transport)  # type: ignore[arg-type]
    yield srv, transport
    loop.close()


def client(pki: Path) -> SSL.Connection:
    conn = SSL.Connection(client_context(pki / "ca.crt", pki / "devices" / "dev-a.crt",
                                         pki / "devices" / "dev-a.key"), None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1400)
    return conn


def step(conn: SSL.Connection, incoming: bytes = b"") -> bytes:
    if incoming:
        conn.bio_write(incoming)
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    out = b""
    while True:
        try:
            out += conn.bio_read(65536)
        except SSL.WantReadError:
            return out


def test_cookie_exchange_comes_before_any_session(pki: Path, server: tuple[DTLSServer, RecordingTransport]) -> None:
    srv, transport = server
    conn = client(pki)
    hello = step(conn)
    assert is_client_hello(hello)
    srv.datagram_received(hello, ADDR)
    assert srv.sessions == 0 and srv.stats.hello_verify_sent == 1
    (verify_request, to), = transport.sent
    assert to == ADDR and verify_request[13] == 3  # handshake type 3: HelloVerifyRequest
    hello_with_cookie = step(conn, verify_request)
    # The cookie is bound to the address: from another one it buys nothing but a new HelloVerifyRequest.
    srv.datagram_received(hello_with_cookie, OTHER)
    assert srv.sessions == 0 and srv.stats.hello_verify_sent == 2
    srv.datagram_received(hello_with_cookie, ADDR)
    assert srv.sessions == 1 and srv.stats.handshakes_started == 1
    assert sum(len(d) for d, a in transport.sent[2:] if a == ADDR) > 500  # ServerHello .. CertificateRequest flight


def test_expired_cookie_secret_is_refused() -> None:
    now = [0.0]
    jar = CookieJar(rotate_after=10, clock=lambda: now[0])
    cookie = jar.generate(ADDR)
    now[0] = 15  # one rotation: the previous secret still counts
    assert jar.verify(ADDR, cookie) and not jar.verify(OTHER, cookie)
    now[0] = 30  # two rotations: gone
    assert not jar.verify(ADDR, cookie)


def test_records_are_packed_into_datagrams_up_to_the_mtu() -> None:
    records = [bytes([22, 0xFE, 0xFD]) + bytes(8) + n.to_bytes(2, "big") + bytes(n) for n in (500, 600, 700, 10)]
    stream = b"".join(records)
    assert list(split_records(stream)) == records
    datagrams = list(pack_datagrams(stream, 1400))
    assert [len(d) for d in datagrams] == [513 + 613, 713 + 23]
    assert b"".join(datagrams) == stream
    with pytest.raises(RuntimeError):
        list(split_records(stream[:-3]))


hello_like = st.binary(min_size=0, max_size=600).map(lambda tail: bytes([22, 0xFE, 0xFD, 0, 0]) + bytes(8) + tail)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(datagrams=st.lists(st.one_of(st.binary(max_size=2000), hello_like,
                                    hello_like.map(lambda d: d[:13] + b"\x01" + d[14:] if len(d) > 14 else d)),
                          max_size=8),
       port=st.integers(1, 65535))
def test_fuzzed_datagrams_never_raise_nor_leave_state(server: tuple[DTLSServer, RecordingTransport],
                                                      datagrams: list[bytes], port: int) -> None:
    srv, _ = server
    with capture_logs() as logs:
        for datagram in datagrams:
            srv.datagram_received(datagram, ("127.0.0.1", port))
    assert not [e for e in logs if e["event"] == "dtls.datagram_crashed"], logs
    assert srv.sessions == 0  # nothing without a valid cookie


def handshake_in_memory(srv: DTLSServer, transport: RecordingTransport, conn: SSL.Connection) -> list[bytes]:
    """Drive client and server to an established session; returns every datagram the client sent."""
    sent: list[bytes] = []
    outgoing = step(conn)
    for _ in range(20):
        if outgoing:
            sent.append(outgoing)
            srv.datagram_received(outgoing, ADDR)
        replies = b"".join(d for d, a in transport.sent if a == ADDR)
        transport.sent.clear()
        outgoing = step(conn, replies) if replies else step(conn)
        if srv.stats.handshakes_completed and not outgoing:  # the client took the server's Finished
            return sent
    raise AssertionError(f"no handshake: {srv.stats}")


def test_a_late_copy_of_the_hello_does_not_replace_the_session(
        pki: Path, server: tuple[DTLSServer, RecordingTransport]) -> None:
    srv, transport = server
    conn = client(pki)
    sent = handshake_in_memory(srv, transport, conn)
    hello_with_cookie = sent[1]
    assert is_client_hello(hello_with_cookie)
    srv.datagram_received(hello_with_cookie, ADDR)  # delayed in the network, arrives after the handshake
    srv.datagram_received(sent[0], ADDR)  # and the first one too
    assert srv.stats.sessions_replaced == 0 and srv.stats.handshakes_started == 1 and srv.sessions == 1
    # A NEW hello from the same address (a rebooted device) does go through the cookie exchange again.
    srv.datagram_received(step(client(pki)), ADDR)
    assert srv.stats.hello_verify_sent == 2 and srv.sessions == 1
