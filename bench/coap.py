"""Durable CoAP requests/s over coaps+tcp: edgegw (answer after the outbox commit) vs a bare aiocoap server (answer
at once, nothing stored), same load generator, same run, interleaved; RSS of both servers.

    .venv/bin/python bench/coap.py [--seconds 5] [--rounds 3] [--connections 4] [--window 16] [--payload 100]

- A: ``edgegw run`` (a real process; ``[coap]`` on, outbox ``synchronous = "full"``, no upstream, so every record
  stays in the outbox and nothing else competes for the CPU). 2.01 means committed (fsynced).
- B: aiocoap 0.4.17's own ``tlsserver`` with a Site answering POST /ps/telemetry 2.01 at once (client certificates
  required, the same server certificate and fleet CA; its port is ``bind`` + 1, BRIEF §2).
- The generator is one process of this file (``--generate``): ``--connections`` TLS connections, each with its own
  device certificate, keeping ``--window`` CoAP-over-TCP POSTs in flight (pre-encoded, aiocoap's framing), for
  ``--seconds``. It prints one JSON line: responses by code, requests/s, latency p50/p99.

The whole run stays under 60 s with the defaults. One JSON line per measurement and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HOST = "127.0.0.1"


# --- the load generator (a child process) ----------------------------------------------------------------------


def _post_frame(token: int, payload: bytes) -> bytes:
    from aiocoap import POST, Message
    from aiocoap.transports.tcp import _serialize

    msg = Message(code=POST, uri_path=("ps", "telemetry"), content_format=50, payload=payload)
    msg.token = token.to_bytes(4, "big")
    return _serialize(msg)


def _csm_frame() -> bytes:
    from aiocoap import Message
    from aiocoap.numbers.codes import CSM
    from aiocoap.transports.tcp import _serialize

    return _serialize(Message(code=CSM))


async def _connection(port: int, ctx: ssl.SSLContext, window: int, deadline: float, payload: bytes,
                      codes: dict[str, int], latencies: list[float]) -> None:
    from aiocoap.transports.tcp import _extract_message_size

    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST)
    writer.write(_csm_frame())
    sent: dict[bytes, float] = {}
    token = 0

    def send() -> None:
        nonlocal token
        token += 1
        frame = _post_frame(token, payload)
        sent[token.to_bytes(4, "big")] = time.perf_counter()
        writer.write(frame)

    for _ in range(window):
        send()
    buf = b""
    while sent:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        buf += data
        while True:
            size = _extract_message_size(buf)
            if size is None or sum(size) > len(buf):
                break
            offset, tkl, _ = size
            frame, buf = buf[:sum(size)], buf[sum(size):]
            code = frame[offset - 1]
            if code >= 0xE0:  # signalling (CSM, Ping, Release)
                continue
            started = sent.pop(frame[offset:offset + tkl], None)
            key = f"{code >> 5}.{code & 0x1F:02d}"
            codes[key] = codes.get(key, 0) + 1
            if started is not None:
                latencies.append(time.perf_counter() - started)
            if time.perf_counter() < deadline:
                send()
    writer.close()


def generate(port: int, ca: str, devices: list[Path], seconds: float, window: int, payload_size: int) -> None:
    payload = b'{"v":' + b"1" * max(1, payload_size - 6) + b"}"
    codes: dict[str, int] = {}
    latencies: list[float] = []

    async def main() -> float:
        contexts = []
        for pair in devices:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cafile=ca)
            ctx.load_cert_chain(str(pair.with_suffix(".crt")), str(pair.with_suffix(".key")))
            contexts.append(ctx)
        start = time.perf_counter()
        await asyncio.gather(*(_connection(port, c, window, start + seconds, payload, codes, latencies)
                               for c in contexts))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    ok = sum(n for code, n in codes.items() if code.startswith("2."))
    latencies.sort()
    print(json.dumps({"seconds": round(elapsed, 2), "responses": codes, "requests_per_s": round(ok / elapsed),
                      "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
                      "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None}))


# --- the bare aiocoap server (a child process) -----------------------------------------------------------------


def bare(port: int, cert: str, key: str, ca: str) -> None:
    import aiocoap
    import aiocoap.resource as resource

    class Telemetry(resource.Resource):
        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(code=aiocoap.CREATED)

    async def main() -> None:
        site = resource.Site()
        site.add_resource(["ps", "telemetry"], Telemetry())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
        # aiocoap's TLS listener binds port + 1 of `bind` (COAPS_PORT - COAP_PORT): ask for port - 1.
        await aiocoap.Context.create_server_context(site, bind=(HOST, port - 1), transports=["tlsserver"],
                                                    _ssl_context=ctx)
        await asyncio.get_running_loop().create_future()

    asyncio.run(main())


# --- the scenario ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--generate", nargs=3, metavar=("PORT", "CA", "DEVICES"), help=argparse.SUPPRESS)
    parser.add_argument("--bare", nargs=4, metavar=("PORT", "CERT", "KEY", "CA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        port, ca, devices = args.generate
        generate(int(port), ca, [Path(p) for p in devices.split(",")], args.seconds, args.window, args.payload)
        return 0
    if args.bare:
        port, cert, key, ca = args.bare
        bare(int(port), cert, key, ca)
        return 0

    import harness as h

    procs = h.Procs()
    results: dict[str, list[dict]] = {"edgegw": [], "bare": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-coap-") as tmp:
            root = Path(tmp)
            ids = [f"coap-{i:02d}" for i in range(args.connections)]
            pki = h.make_pki(root / "pki", ids)
            devices = ",".join(str(pki.device(i).cert.with_suffix("")) for i in ids)
            server = pki.gateway_server
            coap_port, bare_port = h.free_port(), h.free_port()
            gw = h.Gateway(procs, root / "gw", pki, None, overrides={
                "coap": {"enabled": True, "bind": HOST, "port": coap_port, "max_inflight": args.window * 2}}).start()
            bare_proc = procs.spawn([sys.executable, __file__, "--bare", str(bare_port), str(server.cert),
                                     str(server.key), str(pki.fleet_ca)], log=root / "bare.log")
            h.wait_listening(bare_port, bare_proc, 10, "bare aiocoap server")
            for _ in range(args.rounds):
                for name, port in (("bare", bare_port), ("edgegw", coap_port)):
                    out = subprocess.run([sys.executable, __file__, "--seconds", str(args.seconds), "--window",
                                          str(args.window), "--payload", str(args.payload), "--generate", str(port),
                                          str(pki.fleet_ca), devices],
                                         capture_output=True, text=True, timeout=args.seconds + 30)
                    if out.returncode != 0:
                        raise h.BenchError(f"generator against {name} failed: {out.stderr[-2000:]}")
                    line = json.loads(out.stdout.strip().splitlines()[-1])
                    line["server"] = name
                    line["server_rss_mb"] = round(h.memory_kb(gw.pid if name == "edgegw" else bare_proc.pid)
                                                  ["VmRSS"] / 1024, 1)
                    results[name].append(line)
                    print(json.dumps(line), flush=True)
            rss = {"edgegw": h.memory_kb(gw.pid), "bare": h.memory_kb(bare_proc.pid)}
            stored = gw.outbox_depth()
            gw.stop()
    finally:
        procs.close()
    best = {name: max(r["requests_per_s"] for r in runs) for name, runs in results.items()}
    # Each round measures both back to back: its ratio is less exposed to the machine's load than best vs best.
    ratios = [round(a["requests_per_s"] / b["requests_per_s"], 2)
              for a, b in zip(results["edgegw"], results["bare"], strict=True) if b["requests_per_s"]]
    summary = {
        "edgegw_requests_per_s": best["edgegw"], "bare_aiocoap_requests_per_s": best["bare"],
        "ratio_per_round": ratios, "ratio_median": round(statistics.median(ratios), 2) if ratios else None,
        "edgegw_p50_ms": min(r["p50_ms"] for r in results["edgegw"]),
        "bare_p50_ms": min(r["p50_ms"] for r in results["bare"]),
        "records_in_outbox": stored,
        "edgegw_rss_mb": round(rss["edgegw"]["VmRSS"] / 1024, 1),
        "edgegw_rss_mb_by_round": [r["server_rss_mb"] for r in results["edgegw"]],
        "bare_rss_mb": round(rss["bare"]["VmRSS"] / 1024, 1),
        "connections": args.connections, "window": args.window, "seconds": args.seconds,
    }
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
