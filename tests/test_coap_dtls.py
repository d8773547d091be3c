"""CoAP over DTLS 1.2 with client certificates (edgegw/coap/dtls.py) against libcoap's coap-client-openssl and a
pyOpenSSL client, served by a small aiocoap site that echoes the identity it saw.

coap-client exits 0 even when the handshake fails ("cannot send CoAP pdu"), so every check reads its output. The
PKI is made by the same library the `edgegw pki` CLI runs (edgegw.pki), in a folder of this module: it revokes a
device, which the session-wide ``fleet`` must not see.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import aiocoap.resource as resource
import pytest
from OpenSSL import SSL

from edgegw.coap._dtls_client import DTLSClient, DTLSClientError, client_context
from edgegw.coap.dtls import DTLSLimits, DTLSMaterial, DTLSServer, identity_of, start_dtls_server
from edgegw.errors import ConfigError
from edgegw.identity import DeviceIdentity
from edgegw.pki import init_ca, issue_device, issue_server, revoke_device

COAP_CLIENT = shutil.which("coap-client-openssl") or "/usr/bin/coap-client-openssl"
pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not os.path.exists(COAP_CLIENT), reason="libcoap3-bin not installed")]


@dataclass(frozen=True)
class DTLSPKI:
    pki: Path
    rogue: Path

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    def material(self, *, crl: bool = True) -> DTLSMaterial:
        return DTLSMaterial(cert=self.pki / "server" / "gateway.crt", key=self.pki / "server" / "gateway.key",
                            ca=self.ca, crl=self.pki / "crl.pem" if crl else None)

    def device(self, name: str, *, rogue: bool = False) -> tuple[Path, Path]:
        base = (self.rogue if rogue else self.pki) / "devices"
        return base / f"{name}.crt", base / f"{name}.key"

    def client(self, port: int, name: str | None, *, rogue: bool = False) -> DTLSClient:
        cert, key = self.device(name, rogue=rogue) if name else (None, None)
        return DTLSClient("127.0.0.1", port, client_context(self.ca, cert, key))


@pytest.fixture(scope="module")
def dpki(tmp_path_factory: pytest.TempPathFactory) -> DTLSPKI:
    root = tmp_path_factory.mktemp("dtls-pki")
    pki, rogue = root / "pki", root / "rogue"
    init_ca(pki)
    issue_server(pki, "gateway", ["localhost", "127.0.0.1"])
    for name in ("dev-a", "dev-b", "dev-c", "dev-r"):
        issue_device(pki, name)
    revoke_device(pki, "dev-r")  # writes pki/crl.pem
    init_ca(rogue)
    issue_device(rogue, "dev-a")  # same CN, another CA
    return DTLSPKI(pki, rogue)


class Who(resource.Resource):
    """Echoes the identity the transport attached to the request's remote."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        identity = identity_of(request.remote)
        text = f"device={identity.device_id}" if identity else "anonymous"
        return aiocoap.Message(content_format=0, payload=text.encode())

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=b"got " + request.payload)


class Ticker(resource.ObservableResource):
    """Observable: a new value every 0.1 s while observed (notifications are sent by the server, not requested)."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        self._task: asyncio.Task[None] | None = None

    def update_observation_count(self, count: int) -> None:
        if count and self._task is None:
            self._task = asyncio.create_task(self._tick())
        elif not count and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.value += 1
            self.updated_state()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(content_format=0, payload=f"tick {self.value}".encode())


@dataclass
class Served:
    server: DTLSServer
    context: aiocoap.Context
    port: int


StartServer = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start(dpki: DTLSPKI) -> AsyncIterator[StartServer]:
    contexts: list[aiocoap.Context] = []

    async def make(*, limits: DTLSLimits | None = None, crl: bool = True,
                   authorize: Callable[[DeviceIdentity], str | None] = lambda identity: None,
                   psk_keys: Callable[[str], bytes | None] | None = None) -> Served:
        site = resource.Site()
        site.add_resource(["who"], Who())
        site.add_resource(["tick"], Ticker())
        context = aiocoap.Context(serversite=site)
        contexts.append(context)
        server = await start_dtls_server(context, host="127.0.0.1", port=0, material=dpki.material(crl=crl),
                                         limits=limits or DTLSLimits(), authorize=authorize, psk_keys=psk_keys)
        return Served(server, context, int(server.address[1]))

    yield make
    for context in contexts:
        await context.shutdown()


async def coap_client(dpki: DTLSPKI, port: int, device: str | None, *, rogue: bool = False,
                      method: str = "get", payload: str | None = None, path: str = "who",
                      extra: tuple[str, ...] = (), psk: tuple[str, str] | None = None) -> str:
    args = [COAP_CLIENT, "-B", "3", "-m", method, *extra]
    if psk is None:  # with -C libcoap offers certificate suites, which the server prefers over PSK
        args += ["-C", str(dpki.ca)]
    if device is not None:
        cert, key = dpki.device(device, rogue=rogue)
        args += ["-c", str(cert), "-j", str(key)]
    if payload is not None:
        args += ["-e", payload]
    if psk is not None:
        args += ["-u", psk[0], "-k", psk[1]]
    args.append(f"coaps://127.0.0.1:{port}/{path}")
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


def coap_get(client: DTLSClient, path: str = "who", mid: int = 1) -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.GET, uri_path=(path,))
    request.mtype, request.mid, request.token = aiocoap.CON, mid, mid.to_bytes(2, "big")
    client.send(request.encode())
    return aiocoap.Message.decode(client.recv(5.0))


# --- identity and refusals with libcoap ---------------------------------------------------------------------


async def test_device_certificate_accepted_and_identity_reaches_the_resource(dpki: DTLSPKI,
                                                                             start: StartServer) -> None:
    served = await start()
    out = await coap_client(dpki, served.port, "dev-a")
    assert "device=dev-a" in out, out
    out = await coap_client(dpki, served.port, "dev-b", method="post", payload="hello")
    assert "got hello" in out, out
    assert served.server.stats.handshakes_completed == 2
    assert served.server.stats.hello_verify_sent >= 2  # every session started with a cookie exchange
    if os.geteuid() == 0:  # SO_RCVBUFFORCE needs CAP_NET_ADMIN; otherwise net.core.rmem_max caps it (logged)
        assert served.server.rcvbuf >= 4 * 1024 * 1024


async def test_observe_notifications_flow_from_server_to_device(dpki: DTLSPKI, start: StartServer) -> None:
    served = await start()
    out = await coap_client(dpki, served.port, "dev-a", path="tick", extra=("-s", "2"))
    ticks = set(re.findall(r"tick (\d+)", out))  # coap-client prints payloads without a separator
    assert len(ticks) >= 3, out  # the first response and at least two notifications the server pushed


@pytest.mark.parametrize(("device", "rogue", "reason"), [
    (None, False, "no client certificate presented"),
    ("dev-a", True, "unknown issuer"),
    ("dev-r", False, "certificate revoked (CRL)"),
])
async def test_refused_without_a_valid_certificate(dpki: DTLSPKI, start: StartServer, device: str | None,
                                                   rogue: bool, reason: str) -> None:
    from structlog.testing import capture_logs

    served = await start()
    with capture_logs() as logs:
        out = await coap_client(dpki, served.port, device, rogue=rogue)
    assert "device=" not in out and "cannot send CoAP pdu" in out, out
    failures = [e for e in logs if e["event"] == "dtls.handshake_failed"]
    assert failures and reason in failures[0]["reason"], logs
    assert served.server.stats.handshakes_completed == 0 and served.server.sessions == 0


async def test_without_a_crl_the_revoked_certificate_is_only_refused_by_authorize(dpki: DTLSPKI,
                                                                                 start: StartServer) -> None:
    served = await start(crl=False)
    assert "device=dev-r" in await coap_client(dpki, served.port, "dev-r")
    refusing = await start(crl=False, authorize=lambda i: "device is suspended" if i.device_id == "dev-r" else None)
    out = await coap_client(dpki, refusing.port, "dev-r")
    assert "device=" not in out and "cannot send CoAP pdu" in out, out
    assert "device=dev-a" in await coap_client(dpki, refusing.port, "dev-a")


async def test_psk_identity_is_the_device_id_and_certificates_still_work(dpki: DTLSPKI, start: StartServer) -> None:
    keys = {"dev-p": b"0123456789abcdef", "dev-s": b"fedcba9876543210"}
    served = await start(psk_keys=keys.get,
                         authorize=lambda i: "device is suspended" if i.device_id == "dev-s" else None)
    assert "device=dev-p" in await coap_client(dpki, served.port, None, psk=("dev-p", "0123456789abcdef"))
    for identity, key in (("dev-x", "0123456789abcdef"),   # not in the registry
                          ("dev-s", "fedcba9876543210"),   # known key, but authorize refuses
                          ("dev-p", "not-the-key")):       # wrong key: Finished fails, nothing is served
        out = await coap_client(dpki, served.port, None, psk=(identity, key))
        assert "device=" not in out and "cannot send CoAP pdu" in out, (identity, out)
    assert "device=dev-a" in await coap_client(dpki, served.port, "dev-a")  # X.509 next to PSK
    assert "device=" not in await coap_client(dpki, served.port, None)  # and still no anonymous access
    assert served.server.stats.handshakes_completed == 2


async def test_psk_is_off_by_default(dpki: DTLSPKI, start: StartServer) -> None:
    served = await start()
    out = await coap_client(dpki, served.port, None, psk=("dev-p", "0123456789abcdef"))
    assert "device=" not in out and "cannot send CoAP pdu" in out, out


# --- junk, caps, timeouts ------------------------------------------------------------------------------------


async def test_garbage_datagrams_then_a_good_client_still_works(dpki: DTLSPKI, start: StartServer) -> None:
    served = await start()
    fake_hello = bytes([22, 0xFE, 0xFD, 0, 0]) + bytes(8) + bytes([1]) + os.urandom(40)  # passes the pre-filter
    junk = [b"", b"\x00", os.urandom(13), os.urandom(1400), bytes([22, 0xFE, 0xFD]) + os.urandom(60000),
            fake_hello, fake_hello[:30], b"\x17\xfe\xfd" + os.urandom(100)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(20):
            for datagram in junk:
                sock.sendto(datagram, ("127.0.0.1", served.port))
    # An established session survives junk sent into it (RFC 6347 §4.1.2.7: invalid records are discarded).
    client = await asyncio.to_thread(_connected, dpki, served.port, "dev-c")
    try:
        client.sock.send(os.urandom(200))
        client.sock.send(b"\x17\xfe\xfd\x00\x01" + os.urandom(100))
        response = await asyncio.to_thread(coap_get, client)
        assert response.payload == b"device=dev-c"
    finally:
        client.close()
    assert "device=dev-a" in await coap_client(dpki, served.port, "dev-a")
    stats = served.server.stats
    assert stats.dropped_junk >= 20 * 6, stats
    assert stats.handshakes_completed == 2


async def test_a_coap_message_that_does_not_decode_is_counted_malformed_not_a_crash(dpki: DTLSPKI,
                                                                                  start: StartServer) -> None:
    """aiocoap's Message.decode raises UnicodeDecodeError (not UnparsableMessage) for a string option that is not
    UTF-8: such a message is malformed input of that device (counted, dropped), not a crash of the transport."""
    from structlog.testing import capture_logs

    served = await start()
    client = await asyncio.to_thread(_connected, dpki, served.port, "dev-c")
    try:
        bad = bytearray(aiocoap.Message(code=aiocoap.GET, uri_path=("who",), mtype=aiocoap.CON, mid=7,
                                        token=b"\x07").encode())
        bad[bad.index(b"who")] = 0xFF
        with capture_logs() as logs:
            client.send(bytes(bad))
            assert (await asyncio.to_thread(coap_get, client)).payload == b"device=dev-c"  # the session goes on
        assert served.server.stats.malformed_coap == 1, served.server.stats
        assert not [e for e in logs if e["event"] == "dtls.datagram_crashed"], logs
    finally:
        client.close()


def _connected(dpki: DTLSPKI, port: int, name: str, timeout: float = 5.0) -> DTLSClient:
    client = dpki.client(port, name)
    try:
        client.handshake(timeout)
    except BaseException:
        client.close(notify=False)
        raise
    return client


async def test_session_cap_refuses_new_handshakes_until_one_closes(dpki: DTLSPKI, start: StartServer) -> None:
    served = await start(limits=DTLSLimits(max_sessions=2))
    first = await asyncio.to_thread(_connected, dpki, served.port, "dev-a")
    second = await asyncio.to_thread(_connected, dpki, served.port, "dev-b")
    try:
        with pytest.raises(DTLSClientError):
            await asyncio.to_thread(_connected, dpki, served.port, "dev-c", 2.0)
        assert served.server.sessions == 2 and served.server.stats.refused_capacity >= 1
        assert (await asyncio.to_thread(coap_get, first)).payload == b"device=dev-a"  # the held ones still work
        await asyncio.to_thread(first.close)  # close_notify frees a slot
        for _ in range(100):
            if served.server.sessions < 2:
                break
            await asyncio.sleep(0.02)
        assert "device=dev-c" in await coap_client(dpki, served.port, "dev-c")
    finally:
        second.close()


async def test_handshake_rate_limit(dpki: DTLSPKI, start: StartServer) -> None:
    served = await start(limits=DTLSLimits(handshakes_per_second=0.01, handshake_burst=1))
    client = await asyncio.to_thread(_connected, dpki, served.port, "dev-a")
    client.close()
    with pytest.raises(DTLSClientError):
        await asyncio.to_thread(_connected, dpki, served.port, "dev-b", 2.0)
    assert served.server.stats.refused_rate >= 1 and served.server.stats.handshakes_started == 1


async def test_half_done_handshake_times_out_and_idle_sessions_expire(dpki: DTLSPKI, start: StartServer) -> None:
    served = await start(limits=DTLSLimits(handshake_timeout=0.5, idle_timeout=0.5))
    half = dpki.client(served.port, "dev-a")
    # Flight 1: ClientHello -> HelloVerifyRequest; flight 2: ClientHello with cookie -> session; then silence.
    await asyncio.to_thread(half.handshake, 5.0, stop_after_flights=2)
    idle = await asyncio.to_thread(_connected, dpki, served.port, "dev-b")
    try:
        for _ in range(250):
            stats = served.server.stats
            if served.server.sessions == 0 and stats.handshake_timeouts and stats.sessions_expired:
                break
            await asyncio.sleep(0.02)
        assert served.server.stats.handshake_timeouts == 1, served.server.stats
        assert served.server.stats.sessions_expired == 1 and served.server.sessions == 0
        with pytest.raises(SSL.ZeroReturnError):  # the expiry said close_notify
            await asyncio.to_thread(idle.recv, 2.0)
    finally:
        half.close(notify=False)
        idle.close(notify=False)


async def test_spoofed_junk_from_a_session_address_does_not_keep_it_alive(dpki: DTLSPKI, start: StartServer) -> None:
    """Idle expiry counts what the device said, not what anyone sent from its address: records that do not decrypt
    (anyone on the path can send them, spoofing the address) must not hold a gone device's session, and its slot of
    dtls_max_sessions, forever."""
    served = await start(limits=DTLSLimits(idle_timeout=0.5))
    client = await asyncio.to_thread(_connected, dpki, served.port, "dev-a")
    try:
        for _ in range(30):  # 3 s: six idle timeouts
            client.sock.send(b"\x17\xfe\xfd\x00\x01" + os.urandom(40))  # epoch 1 application data, bad MAC
            if served.server.stats.sessions_expired:
                break
            await asyncio.sleep(0.1)
        assert served.server.stats.sessions_expired == 1 and served.server.sessions == 0, served.server.stats
    finally:
        client.close(notify=False)


async def test_new_handshake_from_the_same_address_replaces_the_session(dpki: DTLSPKI, start: StartServer) -> None:
    served = await start()
    old = await asyncio.to_thread(_connected, dpki, served.port, "dev-a")
    # A rebooted device: same address and port, new ClientHello (epoch 0) without closing the old session.
    reborn = DTLSClient.__new__(DTLSClient)
    reborn.sock, reborn.mtu = old.sock, old.mtu
    reborn.conn = SSL.Connection(client_context(dpki.ca, *dpki.device("dev-b")), None)
    reborn.conn.set_connect_state()
    reborn.conn.set_ciphertext_mtu(old.mtu)
    try:
        await asyncio.to_thread(reborn.handshake, 5.0)
        assert (await asyncio.to_thread(coap_get, reborn)).payload == b"device=dev-b"
        assert served.server.stats.sessions_replaced == 1 and served.server.sessions == 1
    finally:
        reborn.close()


# --- reload ---------------------------------------------------------------------------------------------------


async def test_replace_material_and_revalidate(dpki: DTLSPKI, start: StartServer, tmp_path: Path) -> None:
    revoked: set[str] = set()
    served = await start(authorize=lambda i: "device is revoked in the registry" if i.device_id in revoked else None)
    client = await asyncio.to_thread(_connected, dpki, served.port, "dev-b")
    try:
        bad = DTLSMaterial(cert=tmp_path / "missing.crt", key=dpki.material().key, ca=dpki.ca)
        with pytest.raises(ConfigError) as err:
            served.server.replace_material(bad)
        assert err.value.key == "tls.cert"
        assert "device=dev-a" in await coap_client(dpki, served.port, "dev-a")  # the old material still serves
        served.server.replace_material(dpki.material(crl=False))
        assert "device=dev-r" in await coap_client(dpki, served.port, "dev-r")  # new handshakes: no CRL now
        revoked.add("dev-b")
        assert served.server.revalidate() == ["dev-b"]
        with pytest.raises(SSL.ZeroReturnError):
            await asyncio.to_thread(client.recv, 2.0)
    finally:
        client.close(notify=False)


def test_limits_name_the_bad_key() -> None:
    with pytest.raises(ConfigError) as err:
        DTLSLimits(max_sessions=0)
    assert err.value.key == "coap.dtls_max_sessions"
    with pytest.raises(ConfigError) as err:
        DTLSLimits(mtu=70000)
    assert err.value.key == "coap.dtls_mtu"


def test_bench_load_generator_runs() -> None:
    """bench/dtls_load.py (the figures in the report) still works: one short DTLS run."""
    script = Path(__file__).resolve().parent.parent / "bench" / "dtls_load.py"
    proc = subprocess.run([sys.executable, str(script), "--seconds", "1", "--sessions", "2", "--window", "2",
                           "--modes", "dtls"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "dtls" and result["requests"] > 0 and result["lost"] == 0, result


async def test_exchange_lifetime_empties_the_message_id_memory(dpki: DTLSPKI, start: StartServer) -> None:
    """aiocoap keeps every message id for EXCHANGE_LIFETIME (RFC 7252: 247 s, ~2.3 KB each): memory would climb
    under sustained load. The DTLS transport gives its requests ``exchange_lifetime``; after it, nothing is kept."""
    served = await start(limits=DTLSLimits(exchange_lifetime=0.5))
    client = dpki.client(served.port, "dev-b")
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, client.handshake)
        for mid in range(1, 201):
            response = await loop.run_in_executor(None, coap_get, client, "who", mid)
            assert response.payload == b"device=dev-b"
        mman = served.server._mman
        assert mman is not None and len(mman._recent_messages) > 0  # kept while the exchange may still repeat
        # A duplicate within the lifetime is answered again (from that memory).
        again = await loop.run_in_executor(None, coap_get, client, "who", 200)
        assert again.mid == 200 and again.payload == b"device=dev-b"
        for _ in range(200):
            if not mman._recent_messages:
                break
            await asyncio.sleep(0.02)
        assert not mman._recent_messages, len(mman._recent_messages)
    finally:
        client.close(notify=False)


class _DropFirstAppRecord(asyncio.DatagramProtocol):
    """A UDP relay between one client and the server that loses the client's first datagram of application data
    (DTLS content type 23), as a lossy radio link would."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.dropped = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.server:
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        if data[:1] == b"\x17" and not self.dropped:
            self.dropped += 1
            return
        self.transport.sendto(data, self.server)


async def test_simulated_dtls_device_retransmits_and_takes_separate_responses(dpki: DTLSPKI) -> None:
    """edgegw-sim's DTLS device (edgegw/sim/dtls_device.py) against the DTLS transport: a lost request is sent again
    with the same message id after ACK_TIMEOUT; a slow answer comes as an empty ACK then a separate CON response,
    which the device acknowledges; every message is counted acknowledged exactly once."""
    from edgegw.sim.dtls_device import DTLSDevice

    class Slow(resource.Resource):
        calls = 0

        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            Slow.calls += 1
            await asyncio.sleep(0.4)  # past aiocoap's EMPTY_ACK_DELAY (0.1 s): an empty ACK goes out first
            return aiocoap.Message(code=aiocoap.CREATED)

    site = resource.Site()
    site.add_resource(["ps", "slow"], Slow())
    context = aiocoap.Context(serversite=site)
    server = await start_dtls_server(context, host="127.0.0.1", port=0, material=dpki.material(),
                                     limits=DTLSLimits(), authorize=lambda identity: None)
    loop = asyncio.get_running_loop()
    relay = _DropFirstAppRecord(("127.0.0.1", int(server.address[1])))
    relay_transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    cert, key = dpki.device("dev-a")
    device = DTLSDevice("dev-a", "127.0.0.1", relay_transport.get_extra_info("sockname")[1], None,
                        dtls_files=(dpki.ca, cert, key), topic="devices/dev-a/slow", window=4, keepalive=30)
    task = asyncio.create_task(device.run())
    try:
        async with asyncio.timeout(20):
            while not device.connected:
                await asyncio.sleep(0.02)
            device.request(6)
            while device.acknowledged < 6:
                await asyncio.sleep(0.05)
        assert relay.dropped == 1 and device.resent >= 1, (relay.dropped, device.resent)
        assert device.refused == 0 and device.inflight == 0 and list(device.acked) == [1, 2, 3, 4, 5, 6]
        assert Slow.calls == 6  # the retransmission was the lost request, not a second copy of a received one
        assert device.connects == 1  # no reconnect was needed
    finally:
        device.close()
        await asyncio.wait_for(task, 10)
        relay_transport.close()
        await context.shutdown()


async def test_sweeper_goes_on_after_a_teardown_that_raises(dpki: DTLSPKI) -> None:
    """One session's teardown raising (here aiocoap's dispatch_error, through the message_manager seam) must not end
    the sweep: later sessions still expire and half-done handshakes still time out (else dtls_max_sessions fills)."""
    from aiocoap.messagemanager import MessageManager
    from structlog.testing import capture_logs

    class FailsOnce(MessageManager):
        failed = 0

        def dispatch_error(self, error: Exception, remote: object) -> None:
            if not FailsOnce.failed:
                FailsOnce.failed += 1
                raise RuntimeError("injected: teardown failed")
            super().dispatch_error(error, remote)

    context = aiocoap.Context(serversite=resource.Site())
    server = await start_dtls_server(context, host="127.0.0.1", port=0, material=dpki.material(),
                                     limits=DTLSLimits(handshake_timeout=0.5, idle_timeout=0.5),
                                     message_manager=FailsOnce)
    port = int(server.address[1])
    clients: list[DTLSClient] = []
    try:
        with capture_logs() as logs:
            clients.append(await asyncio.to_thread(_connected, dpki, port, "dev-a"))
            for _ in range(250):
                if FailsOnce.failed:
                    break
                await asyncio.sleep(0.02)
            assert FailsOnce.failed == 1 and server.sessions == 0
            # Later: an idle session and a half-done handshake, both left to the sweeper.
            idle = await asyncio.to_thread(_connected, dpki, port, "dev-b")
            clients.append(idle)
            half = dpki.client(port, "dev-c")
            clients.append(half)
            await asyncio.to_thread(half.handshake, 5.0, stop_after_flights=2)
            for _ in range(250):
                stats = server.stats
                if server.sessions == 0 and stats.handshake_timeouts and stats.sessions_expired == 2:
                    break
                await asyncio.sleep(0.02)
        assert server.stats.sessions_expired == 2 and server.stats.handshake_timeouts == 1, server.stats
        assert server.sessions == 0
        assert [e["event"] for e in logs].count("dtls.sweep_failed") == 1, logs
        with pytest.raises(SSL.ZeroReturnError):  # its expiry said close_notify
            await asyncio.to_thread(idle.recv, 2.0)
    finally:
        for client in clients:
            client.close(notify=False)
        await context.shutdown()
