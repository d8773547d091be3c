"""Server CPU per TLS record: asyncio's TLS (``start_tls``/``SSLProtocol``) vs edgegw's transport (edgegw/mqtt/_tls.py).

    .venv/bin/python bench/tls_transport.py [--records 100000] [--rounds 2] [--trickle]

One mTLS client in a child process (blocking ``ssl``, TCP_NODELAY) sends N records of 100 bytes, at most 40 not yet
acknowledged; the server answers 4 bytes per 20 records (MQTT-like: a PUBACK group). The server process measures
its own CPU (getrusage) from the first byte to the last. The two servers alternate, ``--rounds`` times each.
``--trickle``: one record in flight, each acknowledged (one record per wake-up: the latency-bound case).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from asyncio import sslproto
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edgegw.mqtt._tls import TLSListener, TLSTransport

RECORD = 100


def contexts(pki: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(pki / "server" / "gateway.crt", pki / "server" / "gateway.key")
    server.load_verify_locations(pki / "ca.crt")
    server.options |= ssl.OP_NO_TICKET
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki / "ca.crt")
    client.load_cert_chain(pki / "devices" / "bench-0.crt", pki / "devices" / "bench-0.key")
    return server, client


def run_client(pki: Path, port: int, records: int, window: int, ack_every: int) -> None:
    _, ctx = contexts(pki)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        payload = b"x" * RECORD
        acked = 0
        for i in range(records):
            sock.sendall(payload)
            while i + 1 - acked * ack_every >= window:
                acked += len(sock.recv(4096)) // 4


class Counter(asyncio.Protocol):
    def __init__(self, total: int, done: asyncio.Future[None], ack_every: int) -> None:
        self.total, self.done, self.received, self.group = total, done, 0, RECORD * ack_every
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        before = self.received // self.group
        self.received += len(data)
        acks = self.received // self.group - before
        if acks and self.transport is not None:
            self.transport.write(b"ack!" * acks)
        if self.received >= self.total and not self.done.done():
            self.done.set_result(None)


async def serve(kind: str, pki: Path, records: int, window: int, ack_every: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    proto = Counter(records * RECORD, done, ack_every)
    ctx, _ = contexts(pki)
    if kind == "asyncio":
        sslproto.SSLProtocol.max_size = 16 * 1024  # type: ignore[attr-defined]  # edgegw's earlier setting
        server = await loop.create_server(lambda: proto, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
    else:
        scratch = memoryview(bytearray(16 * 1024))

        def accept(sock: socket.socket, peer: str) -> None:
            TLSTransport(sock, ctx, proto, scratch, handshake_timeout=10, on_handshake=lambda t, e: None)

        listener = await TLSListener.create("127.0.0.1", 0, accept)
        port = listener.sockets[0].getsockname()[1]
    client = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", str(pki), str(port),
                                                  str(records), str(window), str(ack_every))
    try:
        while proto.received == 0:
            await asyncio.sleep(0.001)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await asyncio.wait_for(done, 300)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    finally:
        await asyncio.wait_for(client.wait(), 30)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return cpu / records * 1e6, t1 - t0


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        run_client(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trickle", action="store_true", help="one record in flight, each acknowledged")
    args = parser.parse_args()
    window, ack_every = (1, 1) if args.trickle else (40, 20)
    with tempfile.TemporaryDirectory(prefix="edgegw-tlsbench-") as tmp:
        pki = Path(tmp) / "pki"
        for cmd in (["init", str(pki)], ["issue", str(pki), "server", "gateway", "--san", "127.0.0.1"],
                    ["issue", str(pki), "device", "bench-0"]):
            subprocess.run([sys.executable, "-m", "edgegw", "pki", *cmd], check=True, capture_output=True,
                           timeout=60)
        for _ in range(args.rounds):
            for kind in ("asyncio", "edgegw"):
                us, seconds = asyncio.run(serve(kind, pki, args.records, window, ack_every))
                print(f"{kind:8} {args.records:,} records of {RECORD} B in {seconds:.2f} s: "
                      f"server CPU {us:.2f} us/record", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
