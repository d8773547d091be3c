"""Backlog drain after an upstream outage, end to end: edgegw vs a mosquitto bridge, with live traffic.

    .venv/bin/python bench/drain.py [--devices 10] [--messages 5000] [--live-rate 100] [--only edgegw,bridge]

For each edge in turn, the same steps with the same processes:

1. A fresh upstream mosquitto (mTLS) and ``mosquitto_sub -q 1 -t '#' -F '%U %p'`` on it (the sink). The edge
   reaches the upstream through a TCP proxy whose link is cut (``edgegw.sim.netcut``), so the upstream and the sink
   stay up while the edge is offline.
2. The backlog: K devices (``mosquitto_pub -l -q 1``, own certificates) publish N messages each to the edge, which
   acknowledges them (edgegw: committed to its outbox with ``synchronous = "full"``; mosquitto: in its bridge queue).
3. The link is restored. A live device publishes ``--live-rate`` messages/s (QoS 1, its send time in the payload)
   through the edge until the backlog has arrived at the sink.

Reported per edge: drain rate (backlog / time from its first to its last arrival at the sink), the time from the
restore to the first arrival (reconnect), edge CPU per drained message, live latency (sink arrival - send time,
p50/p99/max), lost and duplicated messages. The last stdout line is ``{"summary": {...}}`` with the ratios
edgegw / bridge. Exit status 1 when a message is missing or an edge failed.

The bridge is configured as a store-and-forward operator would (``cleansession false``, ``local_cleansession
false``, ``max_queued_messages`` 1,000,000); it has one queue, so live messages wait behind the backlog, which is
what edgegw's live-first uplink (docs/OUTBOX.md) is for. edgegw runs with its default uplink (no pacing,
``batch_max_records = 1``). The proxy (one asyncio thread in this process) carries both edges' traffic alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import harness
from harness import HOST, MOSQUITTO_PUB, PAYLOAD_SIZE

from edgegw.sim.netcut import NetCut

EDGES = ("edgegw", "bridge")


@dataclass(frozen=True)
class Via:
    """Where the edge finds its upstream: the proxy's port (all that Gateway and bridge_lines read)."""

    port: int


class Link:
    """:class:`NetCut` on its own event loop thread, so this synchronous benchmark can cut and restore it."""

    def __init__(self, target_port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netcut", daemon=True)
        self._thread.start()
        self._netcut = NetCut(HOST, target_port)
        asyncio.run_coroutine_threadsafe(self._netcut.start(), self._loop).result(10)
        self.port = self._netcut.port

    def cut(self) -> None:
        self._call(self._netcut.cut)

    def restore(self) -> None:
        self._call(self._netcut.restore)

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the proxy's loop and wait for it: once this returns, the link is in the new state."""
        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._netcut.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@dataclass
class Arrivals:
    """What the sink's output file holds: backlog arrival times, live latencies, duplicates."""

    path: Path
    offset: int = 0
    partial: bytes = b""
    seen: set[bytes] = field(default_factory=set)
    backlog_times: list[float] = field(default_factory=list)
    live_ms: list[float] = field(default_factory=list)
    duplicates: int = 0

    def poll(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            ts, _, payload = line.partition(b" ")
            if payload.startswith(b'{"probe"'):
                continue
            if payload in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(payload)
            if payload.startswith(b'{"live"'):
                self.live_ms.append((float(ts) - json.loads(payload)["sent"]) * 1000)
            else:
                self.backlog_times.append(float(ts))


def live_line(seq: int) -> bytes:
    doc = f'{{"live":{seq},"sent":{time.time():.6f},"pad":"'
    return (doc + "x" * (PAYLOAD_SIZE - len(doc) - 2) + '"}\n').encode()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def run_edge(kind: str, args: argparse.Namespace, workdir: Path, pki: harness.PKI,
             device_ids: list[str]) -> dict[str, Any]:
    procs = harness.Procs()
    folder = workdir / kind
    link: Link | None = None
    try:
        upstream = harness.Mosquitto(procs, folder / "upstream", cafile=pki.bundle, server=pki.broker_server).start()
        link = Link(upstream.port)
        link.cut()
        via = cast(harness.Mosquitto, Via(link.port))  # the edge's upstream is the proxy
        edge: harness.Gateway | harness.Mosquitto
        if kind == "edgegw":
            edge = harness.Gateway(procs, folder / "edge", pki, via).start()
        else:
            lines = [line.replace("cleansession true", "cleansession false") for line in harness.bridge_lines(via, pki)]
            edge = harness.Mosquitto(procs, folder / "edge", cafile=pki.bundle, server=pki.gateway_server,
                                     persistence=True, extra=[*lines, "local_cleansession false"]).start()
        sub = harness.Subscriber(procs, folder, pki, upstream, kind)
        sub.wait_ready(lambda: harness.publish_probe(upstream.port, pki.cloud_ca, pki.client("uplink"),
                                                     f"probe-{kind}", "cloud/probe", kind), timeout=15)
        probe = pki.device("probe")
        backlog = len(device_ids) * args.messages
        gen = harness.Generator(procs, folder / "gen", pki, device_ids, args.messages)
        loaded = gen.run(edge.port, pki.fleet_ca, timeout=args.timeout, tag=f"{kind}-backlog")
        if isinstance(edge, harness.Gateway):
            depth = edge.outbox_depth()
            if depth < backlog:
                raise harness.BenchError(f"edgegw: {depth} records in the outbox after the backlog, expected {backlog}")
        arrivals = Arrivals(sub.path)
        arrivals.poll()  # nothing of the backlog can be there: the link is cut
        if arrivals.backlog_times:
            raise harness.BenchError(f"{kind}: {len(arrivals.backlog_times)} backlog messages crossed a cut link")

        live = procs.spawn([MOSQUITTO_PUB, "-h", HOST, "-p", str(edge.port), "--cafile", str(pki.fleet_ca),
                            "--cert", str(probe.cert), "--key", str(probe.key), "-i", "probe",
                            "-t", "devices/probe/live", "-q", "1", "-l"], stdin=subprocess.PIPE,
                           log=folder / "live.log")
        assert live.stdin is not None
        time.sleep(0.5)  # its TLS handshake and CONNECT, before the clock starts
        cpu0 = harness.cpu_seconds(edge.pid)
        restored_wall, restored = time.time(), time.monotonic()
        link.restore()
        sent, next_send = 0, restored
        deadline = restored + args.timeout
        drain_done, cpu = 0.0, 0.0
        while (not drain_done or sent < args.min_live) and time.monotonic() < deadline:
            now = time.monotonic()
            if not arrivals.backlog_times:  # live traffic starts once the edge is back: latency behind the backlog,
                next_send = now             # not the reconnect delay (reported on its own)
            while args.live_rate > 0 and arrivals.backlog_times and now >= next_send:
                live.stdin.write(live_line(sent))
                live.stdin.flush()
                sent += 1
                next_send += 1 / args.live_rate
            time.sleep(0.005)
            arrivals.poll()
            if not drain_done and len(arrivals.backlog_times) >= backlog:
                drain_done, cpu = time.monotonic(), harness.cpu_seconds(edge.pid) - cpu0
        if not drain_done:
            drain_done, cpu = time.monotonic(), harness.cpu_seconds(edge.pid) - cpu0
        live.stdin.close()
        live.wait(30)
        live_deadline = time.monotonic() + 30
        while len(arrivals.live_ms) < sent and time.monotonic() < live_deadline:
            time.sleep(0.02)
            arrivals.poll()
        time.sleep(0.3)  # duplicates arrive after the originals
        arrivals.poll()
        sub.close()
        times = arrivals.backlog_times
        span = (max(times) - min(times)) if len(times) > 1 else 0.0
        return {
            "edge": kind, "backlog": backlog, "delivered": len(times), "lost": backlog - len(times),
            "duplicates": arrivals.duplicates, "load_msg_s": round(backlog / loaded.duration),
            "reconnect_s": round(min(times) - restored_wall, 3) if times else None,
            "drain_msg_s": round(len(times) / span) if span > 0 else None,
            "drain_s_from_restore": round(drain_done - restored, 2),
            "edge_cpu_us_per_msg": round(cpu / max(len(times), 1) * 1e6, 1),
            "live_sent": sent, "live_delivered": len(arrivals.live_ms), "live_lost": sent - len(arrivals.live_ms),
            "live_p50_ms": _pct(arrivals.live_ms, 0.5), "live_p99_ms": _pct(arrivals.live_ms, 0.99),
            "live_max_ms": round(max(arrivals.live_ms), 1) if arrivals.live_ms else None,
        }
    finally:
        procs.close()
        if link is not None:
            link.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10, help="devices making the backlog (default 10)")
    parser.add_argument("--messages", type=int, default=5000, help="backlog messages per device (default 5,000)")
    parser.add_argument("--live-rate", type=float, default=100.0, help="live messages/s during the drain (100)")
    parser.add_argument("--min-live", type=int, default=0, metavar="N",
                        help="keep the live device going until it sent N messages (tests: samples for sure)")
    parser.add_argument("--only", default=",".join(EDGES), help="edgegw, bridge or both (default)")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of each phase, s")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    if not kinds or any(k not in EDGES for k in kinds):
        parser.error(f"--only takes {', '.join(EDGES)}")
    workdir = Path(tempfile.mkdtemp(prefix="edgegw-drain-"))
    device_ids = [f"drain-{i:03d}" for i in range(args.devices)]
    pki = harness.make_pki(workdir / "pki", [*device_ids, "probe"])
    results: dict[str, dict[str, Any]] = {}
    ok = True
    try:
        for kind in kinds:
            try:
                results[kind] = run_edge(kind, args, workdir, pki, device_ids)
            except (harness.BenchError, OSError, subprocess.SubprocessError) as exc:
                results[kind] = {"edge": kind, "error": f"{type(exc).__name__}: {exc}"[:1500]}
            r = results[kind]
            if "error" in r:
                print(f"{kind}: {r['error']}", file=sys.stderr, flush=True)
            ok = ok and "error" not in r and r["lost"] == 0 and r["live_lost"] == 0
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {"backlog": args.devices * args.messages, "live_rate": args.live_rate}
    for kind, r in results.items():
        for key in ("drain_msg_s", "live_p50_ms", "live_p99_ms", "edge_cpu_us_per_msg", "lost", "duplicates"):
            summary[f"{kind}_{key}"] = r.get(key)
    e, b = results.get("edgegw", {}), results.get("bridge", {})
    if e.get("drain_msg_s") and b.get("drain_msg_s"):
        summary["ratio_drain"] = round(e["drain_msg_s"] / b["drain_msg_s"], 2)
    if e.get("live_p99_ms") and b.get("live_p99_ms"):
        summary["ratio_live_p99"] = round(e["live_p99_ms"] / b["live_p99_ms"], 3)
    print(json.dumps({"summary": summary}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
