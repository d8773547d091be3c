"""``edgegw demo``: the whole data path in one process, with an upstream outage in the middle.

    devices (Fleet, mTLS, QoS 1) -> gateway (MQTT server -> SQLite outbox -> uplink) -> NetCut proxy
        -> upstream broker (amqtt behind our CERT_REQUIRED listener) -> cloud sink (paho, subscribed to prefix/#)

Everything is throwaway (a temp dir with a fresh PKI and outbox) and every wait is bounded. The verdict is the
gateway's contract: every message a device got a PUBACK for reaches the cloud (``lost == 0``); duplicates are
allowed (at-least-once), loss is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from edgegw.config import config_from_mapping
from edgegw.daemon import Gateway
from edgegw.logs import configure_logging
from edgegw.pki import init_ca, issue_client, issue_devices, issue_server
from edgegw.sim.broker import UpstreamBroker, quiet_amqtt
from edgegw.sim.fleet import Fleet
from edgegw.sim.netcut import NetCut
from edgegw.sim.sink import CloudSink
from edgegw.tlsutil import client_ssl_context

DEFAULT_RATE = 500.0  # messages/s for the whole fleet: comfortable on a 2-core box with everything in one process
TOPIC_PREFIX = "edgegw"
READY_TIMEOUT = 20.0
CONNECT_TIMEOUT = 30.0
ACK_TIMEOUT = 30.0
DRAIN_STALL = 15.0  # give up draining after this long without a single delivery...
DRAIN_MAX = 120.0  # ...or after this long in all
STOP_TIMEOUT = 20.0


class _Status:
    """One line about once a second: rewritten in place (``\\r``) on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._tty = bool(stream is not None and stream.isatty())
        self._width = 0

    def line(self, text: str) -> None:
        if self._stream is None:
            return
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (an event, e.g. the outage starting)."""
        if self._stream is None:
            return
        if self._tty and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self._stream.write(text + "\n")
        self._stream.flush()

    def end(self) -> None:
        if self._stream is not None and self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0


async def run_demo(*, devices: int = 50, seconds: float = 20.0, json_output: bool = False,
                   outage: float | None = None, rate: float | None = None) -> dict[str, Any]:
    """Run the demo and return its summary (see the module docstring). ``rate``: total messages/s (default 500)."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    outage = min(5.0, seconds / 4) if outage is None else outage
    if outage < 0:
        raise ValueError(f"outage must be >= 0, got {outage}")
    rate = DEFAULT_RATE if rate is None else rate
    # stdout carries nothing but the JSON object in JSON mode; logs go to stderr either way.
    configure_logging("warning" if json_output else "error", "console", stream=sys.stderr)
    quiet_amqtt()
    status = _Status(None if json_output else sys.stdout)
    started = time.monotonic()
    summary: dict[str, Any] = {
        "devices": devices, "seconds": seconds, "outage_seconds": outage, "rate_per_s": rate,
        "published": 0, "acknowledged": 0, "delivered": 0, "lost": 0, "duplicates": 0,
    }
    tmp = Path(tempfile.mkdtemp(prefix="edgegw-demo-"))
    try:
        await _run(tmp, devices, seconds, outage, rate, summary, status)
    except Exception as exc:  # noqa: BLE001 - the summary says what failed; cli exits 1 (acknowledged == 0)
        status.end()
        summary["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["elapsed_s"] = round(time.monotonic() - started, 2)
    if not json_output:
        _print_summary(summary)
    return summary


async def _run(tmp: Path, n_devices: int, seconds: float, outage: float, rate: float, summary: dict[str, Any],
               status: _Status) -> None:
    loop = asyncio.get_running_loop()
    pki = tmp / "pki"
    device_ids = [f"dev-{i:04d}" for i in range(1, n_devices + 1)]
    status.note(f"edgegw demo: {n_devices} devices, {rate:g} msg/s for {seconds:g} s, "
                f"upstream outage of {outage:g} s")
    # PKI generation is CPU work (one EC key per device): keep the loop free.
    server, uplink_pair, sink_pair = await asyncio.to_thread(_make_pki, pki, device_ids)
    ca = pki / "ca.crt"

    async with contextlib.AsyncExitStack() as stack:
        broker = await UpstreamBroker(ca=ca, cert=server.cert, key=server.key).start()
        stack.push_async_callback(broker.close)
        proxy = await NetCut("127.0.0.1", broker.port).start()
        stack.push_async_callback(proxy.close)
        sink = CloudSink("127.0.0.1", broker.port, client_ssl_context(ca, sink_pair.cert, sink_pair.key),
                         topic_prefix=TOPIC_PREFIX)
        stack.callback(sink.stop)
        await sink.start(timeout=10.0)

        config = config_from_mapping({
            "gateway": {"id": "demo"},
            "tls": {"cert": str(server.cert), "key": str(server.key), "ca": str(ca)},
            "mqtt": {"bind": "127.0.0.1", "port": 0},
            "outbox": {"path": str(tmp / "state" / "outbox.db")},
            "uplink": {"host": "127.0.0.1", "port": proxy.port, "ca": str(ca), "cert": str(uplink_pair.cert),
                       "key": str(uplink_pair.key), "protocol": "3.1.1", "topic_prefix": TOPIC_PREFIX,
                       "reconnect_min": 0.2, "reconnect_max": 1.0, "connect_timeout": 5.0, "keepalive": 10},
        }, base_dir=tmp)
        (tmp / "state").mkdir()
        gateway = Gateway(config)
        stop = asyncio.Event()
        ready = asyncio.Event()
        gw_task = asyncio.create_task(gateway.run(stop, on_ready=lambda _gw: ready.set()), name="gateway")
        stack.push_async_callback(_stop_gateway, stop, gw_task, summary)
        await _wait_ready(ready, gw_task)
        assert gateway.server is not None and gateway.outbox is not None and gateway.uplink is not None
        outbox, uplink = gateway.outbox, gateway.uplink

        fleet = Fleet.from_pki(pki, device_ids, "127.0.0.1", gateway.server.port, server_hostname="localhost")
        stack.push_async_callback(fleet.close)
        connected = await fleet.connect(timeout=CONNECT_TIMEOUT)
        if connected < n_devices:
            raise RuntimeError(f"only {connected} of {n_devices} devices connected within {CONNECT_TIMEOUT:g} s "
                               f"(last error: {next((d.last_error for d in fleet.devices if d.last_error), None)})")

        max_depth = 0
        phase = "publishing"
        t0 = loop.time()

        def sample() -> None:
            nonlocal max_depth
            max_depth = max(max_depth, outbox.depth)

        async def monitor() -> None:
            ticks = 0
            while True:
                await asyncio.sleep(0.1)
                sample()
                ticks += 1
                if ticks % 10 == 0:
                    status.line(f"[{loop.time() - t0:5.1f}s] {phase:<10} published {fleet.published:>7}  "
                                f"acked {fleet.acknowledged:>7}  delivered {sink.delivered:>7}  "
                                f"outbox {outbox.depth:>6}  uplink {uplink.state}"
                                f"{' (link cut)' if proxy.is_cut else ''}")

        async def cut_upstream() -> None:
            if outage <= 0:
                return
            await asyncio.sleep(seconds / 3)
            proxy.cut()
            status.note(f"-- {loop.time() - t0:5.1f}s: upstream link cut for {outage:g} s")
            try:
                await asyncio.sleep(outage)
            finally:
                proxy.restore()
            status.note(f"-- {loop.time() - t0:5.1f}s: upstream link restored, outbox holds {outbox.depth}")

        monitor_task = asyncio.create_task(monitor(), name="demo-monitor")
        cut_task = asyncio.create_task(cut_upstream(), name="demo-outage")
        try:
            await fleet.publish(rate, seconds)
            phase = "acking"
            acked_all = await fleet.wait_acked(ACK_TIMEOUT)
            await cut_task  # restores the link if the outage outlasts publishing (bounded by ``outage``)
            phase = "draining"
            acked = fleet.acked_seqs()
            drained = await _until(lambda: outbox.depth == 0 and sink.has_all(acked), DRAIN_MAX,
                                   progress=lambda: sink.received, stall=DRAIN_STALL)
            # Give the last duplicates and stragglers a moment (deliveries beyond what was acknowledged count).
            await asyncio.sleep(0.3)
        finally:
            cut_task.cancel()
            proxy.restore()
            monitor_task.cancel()
            await asyncio.gather(monitor_task, cut_task, return_exceptions=True)
            sample()
            status.end()

        latency = fleet.latencies.percentiles(50, 99)
        publish_time = (fleet.publish_stopped or loop.time()) - (fleet.publish_started or t0)
        summary.update(
            published=fleet.published,
            acknowledged=fleet.acknowledged,
            delivered=sink.delivered,
            lost=sink.lost(acked),
            duplicates=sink.duplicates,
            out_of_order=sink.out_of_order,
            unacknowledged=fleet.published - fleet.acknowledged,
            not_sent=fleet.not_sent,
            device_resends=fleet.resent,
            device_reconnects=fleet.reconnects,
            malformed=sink.malformed,
            misrouted=sink.misrouted,
            all_acknowledged=acked_all,
            drained=drained,
            outbox_depth_end=outbox.depth,
            max_outbox_depth=max_depth,
            achieved_rate_per_s=round(fleet.acknowledged / publish_time, 1) if publish_time > 0 else None,
            ack_latency_ms={"p50": _ms(latency[0]), "p99": _ms(latency[1]), "max": _ms(fleet.latencies.max)},
            uplink={"sent": uplink.sent, "acked": uplink.acked, "refused": uplink.refused,
                    "reconnects": uplink.reconnects, "connect_failures": uplink.connect_failures},
            upstream_link_cuts=proxy.cuts,
        )


def _make_pki(pki: Path, device_ids: list[str]) -> tuple[Any, Any, Any]:
    init_ca(pki, common_name="edgegw demo CA")
    server = issue_server(pki, "localhost", ["localhost", "127.0.0.1"])
    uplink = issue_client(pki, "uplink")
    sink = issue_client(pki, "sink")
    issue_devices(pki, device_ids)
    return server, uplink, sink


async def _wait_ready(ready: asyncio.Event, gw_task: asyncio.Task[None]) -> None:
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait((waiter, gw_task), timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if gw_task.done():
        gw_task.result()  # raises what stopped it
        raise RuntimeError("the gateway stopped before it was ready")
    if not ready.is_set():
        raise RuntimeError(f"the gateway was not ready within {READY_TIMEOUT:g} s")


async def _stop_gateway(stop: asyncio.Event, gw_task: asyncio.Task[None], summary: dict[str, Any]) -> None:
    """Stop the gateway (bounded); a failure to stop cleanly goes into ``summary["gateway_error"]``."""
    stop.set()
    done, _ = await asyncio.wait((gw_task,), timeout=STOP_TIMEOUT)
    error = None
    if not done:
        gw_task.cancel()
        await asyncio.wait((gw_task,), timeout=5.0)
        error = f"the gateway did not stop within {STOP_TIMEOUT:g} s"
    elif not gw_task.cancelled() and gw_task.exception() is not None:
        exc = gw_task.exception()
        error = f"{type(exc).__name__}: {exc}"
    if error is not None:
        summary["gateway_error"] = error


async def _until(predicate: Callable[[], bool], timeout: float, *, progress: Callable[[], object] | None = None,
                 stall: float | None = None, interval: float = 0.1) -> bool:
    """Wait for ``predicate``: at most ``timeout`` seconds, and at most ``stall`` seconds without ``progress()``
    changing. True if it came true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = progress() if progress is not None else None
    moved = loop.time()
    while not predicate():
        now = loop.time()
        if progress is not None:
            current = progress()
            if current != last:
                last, moved = current, now
        if now >= deadline or (stall is not None and now - moved >= stall):
            return False
        await asyncio.sleep(interval)
    return True


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _print_summary(s: dict[str, Any]) -> None:
    out = sys.stdout
    if "error" in s:
        print(f"\ndemo failed: {s['error']}", file=out)
    lat = s.get("ack_latency_ms") or {}
    up = s.get("uplink") or {}
    ok = s["lost"] == 0 and s["acknowledged"] > 0 and "error" not in s
    lines = [
        "",
        f"edgegw demo summary ({s['devices']} devices, {s['seconds']:g} s at {s['rate_per_s']:g} msg/s target, "
        f"{s['outage_seconds']:g} s upstream outage; {s.get('elapsed_s', 0):g} s in all)",
        f"  published     {s['published']:>8}   messages the devices sent (QoS 1)",
        f"  acknowledged  {s['acknowledged']:>8}   PUBACKed by the gateway after commit to the outbox",
        f"  delivered     {s['delivered']:>8}   unique messages the cloud sink received",
        f"  lost          {s['lost']:>8}   acknowledged but never delivered"
        + (f" ({s['outbox_depth_end']} still in the outbox when the drain wait ended)"
           if s.get("outbox_depth_end") else ""),
        f"  duplicates    {s['duplicates']:>8}   delivered more than once (at-least-once)",
    ]
    if "max_outbox_depth" in s:
        lines += [
            f"  out of order  {s['out_of_order']:>8}",
            f"  outbox        max depth {s['max_outbox_depth']}, {s['outbox_depth_end']} left at the end",
            f"  rate          {s['achieved_rate_per_s']} msg/s acknowledged while publishing",
            f"  ack latency   p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, max {lat.get('max')} ms",
            f"  uplink        sent {up.get('sent')}, acked {up.get('acked')}, reconnects {up.get('reconnects')}, "
            f"failed connects {up.get('connect_failures')}",
        ]
        if s.get("not_sent"):
            lines.append(f"  not sent      {s['not_sent']:>8}   due but unsent (backpressure) when publishing ended")
        if s.get("gateway_error"):
            lines.append(f"  gateway error {s['gateway_error']}")
    lines.append(f"  result        {'OK: nothing acknowledged was lost' if ok else 'FAILED'}")
    print("\n".join(lines), file=out)
