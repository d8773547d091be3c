"""Requests/s through the DTLS transport (edgegw/coap/dtls.py) against a bare aiocoap resource, and the same
resource over plain CoAP/UDP with the same load generator in the same run (what DTLS costs).

    .venv/bin/python bench/dtls_load.py [--seconds 10] [--sessions 8] [--window 8] [--modes dtls,plain]

The server (an aiocoap Context whose POST /ps/telemetry answers 2.04 at once, no outbox) runs as a child process;
the generator is one thread here: ``--sessions`` DTLS sessions (pyOpenSSL, client certificates from a throwaway
fleet PKI), each keeping ``--window`` confirmable POSTs in flight. A request unanswered for 2 s is counted lost and
replaced. Separate responses (an empty ACK first) are matched by token and acknowledged; only 2.xx count.
``load`` is also the DTLS and UDP generator of bench/coap.py. Prints one JSON line per mode; the server's RSS is
read from /proc at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOST_AFTER = 2.0


def serve(mode: str, pki: Path, exchange_lifetime: float) -> None:
    import aiocoap
    import aiocoap.resource as resource

    from edgegw.coap.dtls import DTLSLimits, DTLSMaterial, start_dtls_server
    from edgegw.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)  # stdout carries the port to the parent

    class Telemetry(resource.Resource):
        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(code=aiocoap.CHANGED)

    async def main() -> None:
        site = resource.Site()
        site.add_resource(["ps", "telemetry"], Telemetry())
        if mode == "plain":
            context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0), transports=["udp6"])
            interface = context.request_interfaces[0].token_interface.message_interface
            port = interface.transport.get_extra_info("socket").getsockname()[1]
        else:
            context = aiocoap.Context(serversite=site)
            material = DTLSMaterial(cert=pki / "server" / "gateway.crt", key=pki / "server" / "gateway.key",
                                    ca=pki / "ca.crt")
            server = await start_dtls_server(context, host="127.0.0.1", port=0, material=material,
                                             limits=DTLSLimits(handshakes_per_second=1000, handshake_burst=1000,
                                                               exchange_lifetime=exchange_lifetime))
            port = server.address[1]
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        await context.shutdown()

    asyncio.run(main())


class Lane:
    """One device: a UDP socket, optionally a DTLS session, and its window of in-flight requests."""

    def __init__(self, port: int, device: tuple[Path, Path, Path] | None, index: int) -> None:
        """``device``: (fleet CA, certificate, key) for a DTLS session; None: plain CoAP over UDP."""
        from edgegw.coap._dtls_client import DTLSClient, client_context

        self.client = None
        if device is not None:
            ca, cert, key = device
            self.client = DTLSClient("127.0.0.1", port, client_context(ca, cert, key))
            self.client.handshake(10.0)
            self.sock = self.client.sock
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.next_mid = index * 4096
        self.inflight: dict[int, float] = {}

    def send(self, template: bytearray) -> None:
        mid = self.next_mid = (self.next_mid + 1) & 0xFFFF
        template[2:4] = template[4:6] = mid.to_bytes(2, "big")
        self.inflight[mid] = time.monotonic()
        if self.client is not None:
            self.client.send(bytes(template))
        else:
            self.sock.send(template)

    def ack(self, mid: bytes) -> None:
        empty_ack = b"\x60\x00" + mid  # version 1, type ACK, no token, code 0.00
        if self.client is not None:
            self.client.send(empty_ack)
        else:
            self.sock.send(empty_ack)

    def receive(self) -> list[bytes]:
        out = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            if self.client is None:
                out.append(data)
                continue
            self.client.conn.bio_write(data)
            while True:
                try:
                    out.append(self.client.conn.recv(65536))
                except Exception:  # WantReadError: the record is consumed
                    break
        return out


def pki_devices(pki: Path, sessions: int) -> list[tuple[Path, Path, Path]]:
    """(CA, certificate, key) of ``bench-{i}`` in a PKI folder made by :func:`main`."""
    return [(pki / "ca.crt", pki / "devices" / f"bench-{i}.crt", pki / "devices" / f"bench-{i}.key")
            for i in range(sessions)]


def load(mode: str, port: int, devices: list[tuple[Path, Path, Path]] | None, seconds: float, sessions: int,
         window: int, *, rate: float | None = None, path: tuple[str, ...] = ("ps", "telemetry"),
         on_tick: Callable[[float], None] | None = None) -> dict[str, object]:
    """``sessions`` lanes keeping ``window`` CON POSTs in flight each for ``seconds``; ``devices`` (one per lane):
    DTLS, None: plain UDP. ``rate``: at most that many requests/s in all (a soak at a modest load), else as fast as
    the answers come. ``on_tick(elapsed)`` is called about once a second (the soak samples RSS there)."""
    import aiocoap

    request = aiocoap.Message(code=aiocoap.POST, uri_path=path, payload=b'{"t":21.5,"h":40}', content_format=50)
    request.mtype, request.mid, request.token = aiocoap.CON, 0, b"\0\0"
    template = bytearray(request.encode())
    lanes = [Lane(port, devices[i] if devices is not None else None, i) for i in range(sessions)]
    selector = selectors.DefaultSelector()
    for lane in lanes:
        selector.register(lane.sock, selectors.EVENT_READ, lane)
    done = lost = sent = 0
    codes: dict[str, int] = {}
    latencies: list[float] = []
    start = time.monotonic()
    last_check = last_tick = start

    def top_up(now: float) -> None:
        # Unpaced: every free window slot is filled at once; paced: only up to rate x elapsed requests in all.
        nonlocal sent
        allowed = rate * (now - start) if rate is not None else float("inf")
        for lane in lanes:
            while len(lane.inflight) < window and sent < allowed:
                lane.send(template)
                sent += 1

    top_up(start + (1.0 if rate is None else 0.0))
    while (now := time.monotonic()) - start < seconds:
        for key, _ in selector.select(0.2 if rate is None else 0.01):
            lane = key.data
            for response in lane.receive():
                if len(response) < 4:
                    continue
                if (response[0] >> 4) & 3 == 0:  # a separate response comes as a CON: acknowledge it
                    lane.ack(response[2:4])
                code = response[1]
                if code == 0:  # an empty ACK (the answer waits for the commit): the response follows
                    continue
                token = response[4:4 + (response[0] & 0x0F)]  # our token is the request's message id
                sent_at = lane.inflight.pop(int.from_bytes(token, "big"), None)
                if sent_at is None:
                    continue
                name = f"{code >> 5}.{code & 0x1F:02d}"
                codes[name] = codes.get(name, 0) + 1
                if code >> 5 != 2:
                    continue
                done += 1
                if done % 50 == 0:
                    latencies.append(time.monotonic() - sent_at)
        now = time.monotonic()
        top_up(now)
        if now - last_check > 0.5:
            last_check = now
            for lane in lanes:
                for mid, sent_at in list(lane.inflight.items()):
                    if now - sent_at > LOST_AFTER:
                        del lane.inflight[mid]
                        lost += 1
            top_up(now)
        if on_tick is not None and now - last_tick >= 1.0:
            last_tick = now
            on_tick(now - start)
    elapsed = time.monotonic() - start
    for lane in lanes:
        if lane.client is not None:
            lane.client.close()
        else:
            lane.sock.close()
    latencies.sort()
    return {"mode": mode, "requests": done, "responses": codes, "lost": lost, "seconds": round(elapsed, 2),
            "rps": round(done / elapsed), "sessions": sessions, "window": window,
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run(mode: str, pki: Path, args: argparse.Namespace) -> dict[str, object]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(pki), str(args.exchange_lifetime)],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        cpu_before = cpu_seconds(proc.pid)
        result = load(mode, port, pki_devices(pki, args.sessions) if mode == "dtls" else None, args.seconds,
                      args.sessions, args.window)
        cpu = cpu_seconds(proc.pid) - cpu_before
        result["server_rss_mb"] = round(rss_kb(proc.pid) / 1024, 1)
        result["exchange_lifetime_s"] = args.exchange_lifetime if mode == "dtls" else 247
        result["server_cpu_s"] = round(cpu, 2)
        done = int(str(result["requests"]))
        result["requests_per_server_cpu_s"] = round(done / cpu) if cpu else None
        return result
    finally:
        proc.kill()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=3, metavar=("MODE", "PKI", "LIFETIME"), help=argparse.SUPPRESS)
    parser.add_argument("--exchange-lifetime", type=float, default=30.0, help="DTLS: coap.dtls.exchange_lifetime")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--modes", default="dtls,plain")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], Path(args.serve[1]), float(args.serve[2]))
        return
    from edgegw.pki import init_ca, issue_device, issue_server

    with tempfile.TemporaryDirectory(prefix="dtls-bench-") as tmp:
        pki = Path(tmp) / "pki"
        init_ca(pki)
        issue_server(pki, "gateway", ["127.0.0.1"])
        for i in range(args.sessions):
            issue_device(pki, f"bench-{i}")
        for mode in args.modes.split(","):
            print(json.dumps(run(mode, pki, args)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
