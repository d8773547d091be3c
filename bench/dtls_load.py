"""Requests/s through the DTLS transport (edgegw/coap/dtls.py) against a bare aiocoap resource, and the same
resource over plain CoAP/UDP with the same load generator in the same run (what DTLS costs).

    .venv/bin/python bench/dtls_load.py [--seconds 10] [--sessions 8] [--window 8] [--modes dtls,plain]

The server (an aiocoap Context whose POST /ps/telemetry answers 2.04 at once, no outbox) runs as a child process;
the generator is one thread here: ``--sessions`` DTLS sessions (pyOpenSSL, client certificates from a throwaway
fleet PKI), each keeping ``--window`` confirmable POSTs in flight. A request unanswered for 2 s is counted lost and
replaced. Prints one JSON line per mode; the server's RSS is read from /proc at the end.
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

    def __init__(self, port: int, pki: Path | None, index: int) -> None:
        from edgegw.coap._dtls_client import DTLSClient, client_context

        self.client = None
        if pki is not None:
            device = pki / "devices" / f"bench-{index}"
            self.client = DTLSClient("127.0.0.1", port, client_context(pki / "ca.crt", device.with_suffix(".crt"),
                                                                       device.with_suffix(".key")))
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


def load(mode: str, port: int, pki: Path | None, seconds: float, sessions: int, window: int) -> dict[str, object]:
    import aiocoap

    request = aiocoap.Message(code=aiocoap.POST, uri_path=("ps", "telemetry"), payload=b'{"t":21.5,"h":40}')
    request.mtype, request.mid, request.token = aiocoap.CON, 0, b"\0\0"
    template = bytearray(request.encode())
    lanes = [Lane(port, pki, i) for i in range(sessions)]
    selector = selectors.DefaultSelector()
    for lane in lanes:
        selector.register(lane.sock, selectors.EVENT_READ, lane)
        for _ in range(window):
            lane.send(template)
    done = lost = 0
    latencies: list[float] = []
    start = time.monotonic()
    last_check = start
    while (now := time.monotonic()) - start < seconds:
        for key, _ in selector.select(0.2):
            lane = key.data
            for response in lane.receive():
                mid = int.from_bytes(response[2:4], "big")
                sent = lane.inflight.pop(mid, None)
                if sent is None:
                    continue
                done += 1
                if done % 50 == 0:
                    latencies.append(time.monotonic() - sent)
                lane.send(template)
        if now - last_check > 0.5:
            last_check = now
            for lane in lanes:
                for mid, sent in list(lane.inflight.items()):
                    if now - sent > LOST_AFTER:
                        del lane.inflight[mid]
                        lost += 1
                        lane.send(template)
    elapsed = time.monotonic() - start
    for lane in lanes:
        if lane.client is not None:
            lane.client.close()
        else:
            lane.sock.close()
    latencies.sort()
    return {"mode": mode, "requests": done, "lost": lost, "seconds": round(elapsed, 2),
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
        result = load(mode, port, pki if mode == "dtls" else None, args.seconds, args.sessions, args.window)
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
