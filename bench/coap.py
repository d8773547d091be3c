"""Durable CoAP requests/s over coaps+tcp and over DTLS: edgegw (answer after the outbox commit) vs a bare aiocoap
server (answer at once, nothing stored), same load generator, same run, interleaved; RSS of the servers. Or, with
``--soak``, the gateway's RSS under sustained paced load on both transports.

    .venv/bin/python bench/coap.py [--seconds 5] [--rounds 3] [--connections 4] [--window 16] [--payload 100]
                                   [--no-dtls] [--src DIR]
    .venv/bin/python bench/coap.py --soak 300 [--rate 200] [--connections 4]

- A: ``edgegw run`` (a real process; ``[coap]`` on with ``dtls = true``, outbox ``synchronous = "full"``, no
  upstream, so every record stays in the outbox and nothing else competes for the CPU). 2.01 means committed
  (fsynced).
- B: aiocoap 0.4.17's own ``tlsserver`` with a Site answering POST /ps/telemetry 2.01 at once (client certificates
  required, the same server certificate and fleet CA; its port is ``bind`` + 1, BRIEF §2).
- B (DTLS rounds): the same Site over aiocoap's plain ``udp6`` transport. aiocoap's DTLS server is tinydtls,
  PSK-only: no bare aiocoap server speaks DTLS with X.509, so this ratio includes the cost of DTLS itself.
- The coaps+tcp generator is one process of this file (``--generate``): ``--connections`` TLS connections, each
  with its own device certificate, keeping ``--window`` CoAP-over-TCP POSTs in flight (pre-encoded, aiocoap's
  framing), for ``--seconds``. The DTLS/UDP generator (``--generate-udp``) is bench/dtls_load.py's ``load()``:
  one DTLS session per device certificate (or a plain UDP socket), ``--window`` CON POSTs in flight. Each prints
  one JSON line: responses by code, requests/s (2.xx only), latency.
- ``--soak S``: edgegw with coaps+tcp AND DTLS and its uplink to a real mosquitto; both generators at ``--rate``
  requests/s each for S seconds; the gateway's RSS every 5 s; the summary has it at 1, 2.5 and 5 min.

The throughput run stays near 60 s with the defaults. One JSON line per measurement and a summary on stdout.
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
                      codes: dict[str, int], latencies: list[float], rate: float | None = None) -> None:
    """One TLS connection keeping ``window`` POSTs in flight; ``rate``: at most that many requests/s on it."""
    from aiocoap.transports.tcp import _extract_message_size

    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST)
    writer.write(_csm_frame())
    sent: dict[bytes, float] = {}
    token = 0
    started = time.perf_counter()

    def send() -> None:
        nonlocal token
        token += 1
        frame = _post_frame(token, payload)
        sent[token.to_bytes(4, "big")] = time.perf_counter()
        writer.write(frame)

    def top_up() -> None:
        now = time.perf_counter()
        while now < deadline and len(sent) < window and (rate is None or token < rate * (now - started)):
            send()

    async def pace() -> None:
        while time.perf_counter() < deadline:
            top_up()
            await asyncio.sleep(0.01)

    pacer = asyncio.create_task(pace()) if rate is not None else None
    if rate is None:
        top_up()
    buf = b""
    while sent or (pacer is not None and not pacer.done()):
        try:
            data = await asyncio.wait_for(reader.read(65536), 1.0)
        except TimeoutError:
            continue
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
            sent_at = sent.pop(frame[offset:offset + tkl], None)
            key = f"{code >> 5}.{code & 0x1F:02d}"
            codes[key] = codes.get(key, 0) + 1
            if sent_at is not None:
                latencies.append(time.perf_counter() - sent_at)
            if rate is None:
                top_up()
    writer.close()


def generate(port: int, ca: str, devices: list[Path], seconds: float, window: int, payload_size: int,
             rate: float | None = None) -> None:
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
        each = rate / len(contexts) if rate else None
        await asyncio.gather(*(_connection(port, c, window, start + seconds, payload, codes, latencies, each)
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


def bare_udp(port: int) -> None:
    """The same bare resource over plain CoAP/UDP: what the DTLS rounds compare against (aiocoap 0.4.17's own
    DTLS server is tinydtls, PSK-only, and DTLSSocket is not installed: no bare X.509 DTLS server exists)."""
    import aiocoap
    import aiocoap.resource as resource

    class Telemetry(resource.Resource):
        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(code=aiocoap.CREATED)

    async def main() -> None:
        site = resource.Site()
        site.add_resource(["ps", "telemetry"], Telemetry())
        await aiocoap.Context.create_server_context(site, bind=(HOST, port), transports=["udp6"])
        await asyncio.get_running_loop().create_future()

    asyncio.run(main())


def generate_udp(port: int, ca: str, devices: list[Path], seconds: float, window: int,
                 rate: float | None) -> None:
    """bench/dtls_load.py's generator: one lane per device, DTLS with its certificate (``ca`` not "-") or plain
    UDP; CON POSTs to /ps/telemetry; one JSON line like :func:`generate`'s."""
    import dtls_load

    lanes = [(Path(ca), p.with_suffix(".crt"), p.with_suffix(".key")) for p in devices] if ca != "-" else None
    r = dtls_load.load("dtls" if lanes else "udp", port, lanes, seconds, len(devices), window, rate=rate)
    print(json.dumps({"seconds": r["seconds"], "responses": r["responses"], "requests_per_s": r["rps"],
                      "p50_ms": r["p50_ms"], "lost": r["lost"]}))


# --- the scenario ----------------------------------------------------------------------------------------------


def _generator(name: str, port: int, ca: Path | str, devices: str, args: argparse.Namespace,
               rate: float | None = None) -> list[str]:
    """The command line of one generator child: ``name`` "tcp" (coaps+tcp) or "udp" (DTLS, or plain with ca "-")."""
    flag = "--generate" if name == "tcp" else "--generate-udp"
    cmd = [sys.executable, __file__, "--seconds", str(args.seconds), "--window", str(args.window), "--payload",
           str(args.payload), flag, str(port), str(ca), devices]
    return cmd + (["--rate", str(rate)] if rate else [])


def _measure(cmd: list[str], name: str, timeout: float) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        import harness as h
        raise h.BenchError(f"generator against {name} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gateway_sections(args: argparse.Namespace, coap_port: int, dtls_port: int | None) -> dict[str, dict]:
    coap = {"enabled": True, "bind": HOST, "port": coap_port, "max_inflight": args.window * 2}
    if dtls_port is not None:
        coap.update(dtls=True, dtls_port=dtls_port)
    return {"coap": coap}


def _ratios(a: list[dict], b: list[dict]) -> list[float]:
    # Each round measures both back to back: its ratio is less exposed to the machine's load than best vs best.
    return [round(x["requests_per_s"] / y["requests_per_s"], 2) for x, y in zip(a, b, strict=True)
            if y["requests_per_s"]]


def _median_cpu(runs: list[dict]) -> float | None:
    values = [r["server_cpu_us_per_request"] for r in runs if r.get("server_cpu_us_per_request")]
    return round(statistics.median(values), 1) if values else None


def throughput(args: argparse.Namespace) -> dict:
    import harness as h

    procs = h.Procs()
    pairs = [("bare", "edgegw")] + ([("bare_udp", "edgegw_dtls")] if args.dtls else [])
    results: dict[str, list[dict]] = {name: [] for pair in pairs for name in pair}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-coap-") as tmp:
            root = Path(tmp)
            ids = [f"coap-{i:02d}" for i in range(args.connections)]
            pki = h.make_pki(root / "pki", ids)
            devices = ",".join(str(pki.device(i).cert.with_suffix("")) for i in ids)
            server = pki.gateway_server
            ports = {name: h.free_port() for name in results}
            gw = h.Gateway(procs, root / "gw", pki, None, overrides=_gateway_sections(
                args, ports["edgegw"], ports["edgegw_dtls"] if args.dtls else None)).start()
            bare_proc = procs.spawn([sys.executable, __file__, "--bare", str(ports["bare"]), str(server.cert),
                                     str(server.key), str(pki.fleet_ca)], log=root / "bare.log")
            h.wait_listening(ports["bare"], bare_proc, 10, "bare aiocoap server")
            pids = {"edgegw": gw.pid, "edgegw_dtls": gw.pid, "bare": bare_proc.pid}
            if args.dtls:
                udp_proc = procs.spawn([sys.executable, __file__, "--bare-udp", str(ports["bare_udp"])],
                                       log=root / "bare-udp.log")
                pids["bare_udp"] = udp_proc.pid
                time.sleep(1.0)  # a UDP port cannot be probed by connecting; aiocoap binds in well under 1 s
            for round_ in range(args.rounds):
                for pair in pairs:
                    # Alternate who goes first: a machine whose load drifts during a round favours neither side.
                    for name in pair if round_ % 2 == 0 else pair[::-1]:
                        tcp = name in ("bare", "edgegw")
                        cmd = _generator("tcp" if tcp else "udp", ports[name], pki.fleet_ca if name != "bare_udp"
                                         else "-", devices, args)
                        cpu = h.cpu_seconds(pids[name])
                        line = _measure(cmd, name, args.seconds + 60)
                        cpu = h.cpu_seconds(pids[name]) - cpu
                        line["server"] = name
                        line["server_rss_mb"] = round(h.memory_kb(pids[name])["VmRSS"] / 1024, 1)
                        answered = sum(n for code, n in line["responses"].items() if code.startswith("2."))
                        # CPU per answered request: what the server itself costs, much less exposed to the
                        # machine's other load than requests/s (the generator shares the same 2 cores).
                        line["server_cpu_us_per_request"] = round(1e6 * cpu / answered, 1) if answered else None
                        results[name].append(line)
                        print(json.dumps(line), flush=True)
            rss = {name: h.memory_kb(pid) for name, pid in pids.items()}
            stored = gw.outbox_depth()
            gw.stop()
    finally:
        procs.close()
    best = {name: max(r["requests_per_s"] for r in runs) for name, runs in results.items()}
    ratios = _ratios(results["edgegw"], results["bare"])
    summary = {
        "edgegw_requests_per_s": best["edgegw"], "bare_aiocoap_requests_per_s": best["bare"],
        "ratio_per_round": ratios, "ratio_median": round(statistics.median(ratios), 2) if ratios else None,
        "edgegw_p50_ms": min(r["p50_ms"] for r in results["edgegw"]),
        "bare_p50_ms": min(r["p50_ms"] for r in results["bare"]),
        "edgegw_cpu_us_per_request": _median_cpu(results["edgegw"]),
        "bare_cpu_us_per_request": _median_cpu(results["bare"]),
        "records_in_outbox": stored,
        "edgegw_rss_mb": round(rss["edgegw"]["VmRSS"] / 1024, 1),
        "edgegw_rss_mb_by_round": [r["server_rss_mb"] for r in results["edgegw"]],
        "bare_rss_mb": round(rss["bare"]["VmRSS"] / 1024, 1),
        "connections": args.connections, "window": args.window, "seconds": args.seconds,
    }
    if args.dtls:
        dtls_ratios = _ratios(results["edgegw_dtls"], results["bare_udp"])
        summary.update({
            "edgegw_dtls_requests_per_s": best["edgegw_dtls"], "bare_aiocoap_udp_requests_per_s": best["bare_udp"],
            "dtls_ratio_per_round": dtls_ratios,
            "dtls_ratio_median": round(statistics.median(dtls_ratios), 2) if dtls_ratios else None,
            "edgegw_dtls_p50_ms": min(r["p50_ms"] or 0 for r in results["edgegw_dtls"]),
            "bare_udp_p50_ms": min(r["p50_ms"] or 0 for r in results["bare_udp"]),
            "bare_udp_rss_mb": round(rss["bare_udp"]["VmRSS"] / 1024, 1),
            "edgegw_dtls_cpu_us_per_request": _median_cpu(results["edgegw_dtls"]),
            "bare_udp_cpu_us_per_request": _median_cpu(results["bare_udp"]),
        })
    return summary


def soak(args: argparse.Namespace) -> dict:
    """``edgegw run`` with coaps+tcp AND DTLS, uplink to a real mosquitto, both generators paced at ``--rate``
    requests/s each for ``--soak`` seconds; the gateway's RSS sampled every 5 s."""
    import harness as h

    procs = h.Procs()
    samples: list[tuple[float, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-coap-soak-") as tmp:
            root = Path(tmp)
            ids = [f"coap-{i:02d}" for i in range(args.connections)]
            pki = h.make_pki(root / "pki", ids)
            devices = ",".join(str(pki.device(i).cert.with_suffix("")) for i in ids)
            upstream = h.Mosquitto(procs, root / "up", cafile=pki.bundle, server=pki.broker_server).start()
            coap_port, dtls_port = h.free_port(), h.free_port()
            gw = h.Gateway(procs, root / "gw", pki, upstream,
                           overrides=_gateway_sections(args, coap_port, dtls_port)).start()
            args.seconds = args.soak
            gens = {name: procs.spawn(_generator(kind, port, pki.fleet_ca, devices, args, args.rate),
                                      log=root / f"{name}.log")
                    for name, kind, port in (("coaps+tcp", "tcp", coap_port), ("dtls", "udp", dtls_port))}
            started = time.monotonic()
            while any(g.poll() is None for g in gens.values()):
                samples.append((round(time.monotonic() - started, 1), round(h.memory_kb(gw.pid)["VmRSS"] / 1024, 1)))
                if len(samples) % 6 == 1:
                    print(json.dumps({"t_s": samples[-1][0], "edgegw_rss_mb": samples[-1][1]}), flush=True)
                if time.monotonic() - started > args.soak + 120:
                    raise h.BenchError("a generator did not end")
                time.sleep(5.0)
            lines = {}
            for name, g in gens.items():
                text = (root / f"{name}.log").read_text().strip().splitlines()
                if g.returncode != 0 or not text:
                    raise h.BenchError(f"{name} generator failed: {text[-5:]}")
                lines[name] = json.loads(text[-1])
                print(json.dumps({"transport": name, **lines[name]}), flush=True)
            h.wait_until(lambda: gw.outbox_depth() == 0, 30, "the outbox to drain upstream")
            gw.stop()
    finally:
        procs.close()

    def at(t: float) -> float:
        return min(samples, key=lambda s: abs(s[0] - t))[1]

    after_1 = [rss for t, rss in samples if t >= 60]
    return {"soak_s": args.soak, "rate_per_transport": args.rate,
            "requests": {name: sum(n for c, n in line["responses"].items() if c.startswith("2."))
                         for name, line in lines.items()},
            "refused_or_lost": {name: sum(n for c, n in line["responses"].items() if not c.startswith("2."))
                                + line.get("lost", 0) for name, line in lines.items()},
            "edgegw_rss_mb_at_1min": at(60), "edgegw_rss_mb_at_2.5min": at(150), "edgegw_rss_mb_at_5min": at(300),
            "edgegw_rss_mb_at_end": samples[-1][1], "edgegw_rss_mb_max_after_1min": max(after_1, default=None),
            "edgegw_rss_mb_min_after_1min": min(after_1, default=None), "connections": args.connections}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4, help="TLS connections and DTLS sessions")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--no-dtls", dest="dtls", action="store_false", help="coaps+tcp rounds only")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="instead: RSS under sustained paced load")
    parser.add_argument("--rate", type=float, default=200.0, help="--soak: requests/s per transport")
    parser.add_argument("--src", type=Path, metavar="DIR",
                        help="run the gateway from this tree (e.g. a git archive: before/after a change)")
    parser.add_argument("--generate", nargs=3, metavar=("PORT", "CA", "DEVICES"), help=argparse.SUPPRESS)
    parser.add_argument("--generate-udp", nargs=3, metavar=("PORT", "CA", "DEVICES"), help=argparse.SUPPRESS)
    parser.add_argument("--bare", nargs=4, metavar=("PORT", "CERT", "KEY", "CA"), help=argparse.SUPPRESS)
    parser.add_argument("--bare-udp", metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rate = args.rate if "--rate" in sys.argv else None  # generators: unpaced unless asked
    if args.generate:
        port, ca, devices = args.generate
        generate(int(port), ca, [Path(p) for p in devices.split(",")], args.seconds, args.window, args.payload,
                 rate)
        return 0
    if args.generate_udp:
        port, ca, devices = args.generate_udp
        generate_udp(int(port), ca, [Path(p) for p in devices.split(",")], args.seconds, args.window, rate)
        return 0
    if args.bare:
        port, cert, key, ca = args.bare
        bare(int(port), cert, key, ca)
        return 0
    if args.bare_udp:
        bare_udp(int(args.bare_udp))
        return 0
    if args.src:
        import harness as h
        h.use_edgegw_source(args.src)
    summary = soak(args) if args.soak else throughput(args)
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
