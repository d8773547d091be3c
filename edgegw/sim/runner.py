"""One process's share of a simulator run: its devices, their telemetry schedule, chaos and bad actors.

Timeline: start the devices (``devices.connect_rate`` new connections a second) -> wait until all are connected
(at most ``run.connect_wait``) -> publish for ``run.seconds`` while chaos and bad actors run -> stop the bad actors,
bring every device back online and let the buffered and unacknowledged messages out (at most
``run.drain_timeout``) -> DISCONNECT. :meth:`FleetRun.status` and :meth:`FleetRun.summary` are plain dicts, so a
worker process can send them to its parent as JSON lines (:mod:`.worker`).

Everything per message happens in :class:`~edgegw.sim.device.Device` callbacks; here there is one scheduler task
for all the devices, one chaos task and one task per bad actor.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgegw.sim.badactors import Actor, BadActors, protocol_level
from edgegw.sim.certs import DeviceIdentity, device_context
from edgegw.sim.coap_device import CoapDevice
from edgegw.sim.device import Device, LatencySamples, SeqSet
from edgegw.sim.dtls_device import DTLSDevice
from edgegw.sim.payload import compile_payload
from edgegw.sim.scenario import Scenario, Telemetry

STATUS_INTERVAL = 1.0


class WindowedLatency(LatencySamples):
    """All ack latencies (as :class:`LatencySamples`) plus the ones since the last :meth:`take_recent`."""

    __slots__ = ("recent",)

    def __init__(self, cap: int = 200_000) -> None:
        super().__init__(cap)
        self.recent: list[float] = []

    def add(self, value: float) -> None:
        super().add(value)
        if len(self.recent) < 50_000:
            self.recent.append(value)

    def take_recent(self) -> list[float]:
        recent, self.recent = self.recent, []
        return recent


class FleetRun:
    def __init__(self, scenario: Scenario, identities: Sequence[DeviceIdentity], *,
                 bad_identities: Sequence[DeviceIdentity] = (), wrong_cert_dir: Path | None = None,
                 victims: Sequence[str] = ()) -> None:
        """``identities``: the well-behaved devices of this process; ``bad_identities``: real identities for
        the bad actors that need one; ``wrong_cert_dir``: a PKI folder of another CA with
        ``devices/<id>.crt`` for the wrong_cert actors (made by :func:`make_wrong_certs`)."""
        self.scenario = scenario
        s = scenario
        self._rss_base_kb = _rss_kb()  # before any SSLContext: the devices' own memory is what comes after
        self._resources: dict[str, Any] = {}
        self.latencies = WindowedLatency()
        self._protocol = protocol_level(s.devices.protocol)
        payload = compile_payload(s.telemetry.payload)
        self.devices = [self._make_device(identity, payload) for identity in identities]
        anchor = next((i.ca for i in (*identities, *bad_identities)), None)
        self._bad = self._make_actors(bad_identities, wrong_cert_dir, victims or [d.device_id for d in identities],
                                      anchor)
        self._tasks: list[asyncio.Task[None]] = []
        self.phase = "starting"
        self.storms = 0
        self.offline_cycles = 0
        self.not_sent = 0
        self.publish_seconds = 0.0
        self.all_acknowledged = False
        self.connected_at_end = 0
        self._last_status = (0.0, 0, 0)  # time, sent, acked at the previous status

    def _make_device(self, identity: DeviceIdentity, payload: Any) -> Device:
        d, target = self.scenario.devices, self.scenario.target
        # Transports differ only on the wire: a Device subclass overrides the framing hooks (see coap_device.py).
        options: dict[str, Any] = {
            "server_hostname": target.server_name,
            "topic": self.scenario.telemetry.topic.format(device_id=identity.device_id), "window": d.window,
            "keepalive": d.keepalive, "reconnect_min": d.reconnect_min, "reconnect_max": d.reconnect_max,
            "connect_timeout": d.connect_timeout, "latencies": self.latencies, "protocol": self._protocol,
            "payload": payload, "max_backlog": d.max_backlog}
        if d.transport == "dtls":  # a pyOpenSSL context made from the files, no ssl.SSLContext (dtls_device.py)
            return DTLSDevice(identity.device_id, target.host, target.port, None,
                              dtls_files=(identity.ca, identity.cert, identity.key), **options)
        kind = CoapDevice if d.transport == "coap" else Device
        return kind(identity.device_id, target.host, target.port, device_context(identity), **options)

    def _make_actors(self, identities: Sequence[DeviceIdentity], wrong_cert_dir: Path | None,
                     victims: Sequence[str], anchor: Path | None) -> BadActors | None:
        b = self.scenario.bad_actors
        kinds = (["foreign_topic"] * b.foreign_topic + ["flood"] * b.flood + ["malformed"] * b.malformed
                 + ["slow_connect"] * b.slow_connect)
        actors = []
        for kind, identity in zip(kinds, identities, strict=False):
            victim = next((v for v in victims if v != identity.device_id), "someone-else")
            actors.append(Actor(kind, identity.device_id, device_context(identity), victim))
        if b.wrong_cert and wrong_cert_dir is not None and anchor is not None:
            # The rogue certificate's CA is not the gateway's, but the actor trusts the real one: only the
            # gateway's check of the client certificate is under test.
            for crt in sorted((wrong_cert_dir / "devices").glob("*.crt"))[:b.wrong_cert]:
                rogue = DeviceIdentity(crt.stem, crt, crt.with_suffix(".key"), anchor)
                actors.append(Actor("wrong_cert", crt.stem, device_context(rogue), crt.stem))
        if not actors:
            return None
        t = self.scenario.target
        return BadActors(actors, t.host, t.port, server_hostname=t.server_name, protocol=self._protocol,
                         flood_rate=b.flood_rate, pause=b.pause)

    # --- counters -------------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        devices = self.devices
        return {
            "devices": len(devices),
            "connected": sum(1 for d in devices if d.connected),
            "ever_connected": sum(1 for d in devices if d.connects),
            "sent": sum(d.published for d in devices),
            "acknowledged": sum(d.acknowledged for d in devices),
            "refused": sum(d.refused for d in devices),
            "inflight": sum(d.inflight for d in devices),
            "backlog": sum(d.backlog for d in devices),
            "dropped": sum(d.dropped for d in devices),
            "resent": sum(d.resent for d in devices),
            "reconnects": sum(max(0, d.connects - 1) for d in devices),
            "connect_failures": sum(d.connect_failures for d in devices),
        }

    def status(self) -> dict[str, Any]:
        """Counters now, rates since the previous call, p50/p99 of the acks since then (ms)."""
        c = self.counters()
        now = time.monotonic()
        then, sent, acked = self._last_status
        dt = now - then if then else 0.0
        self._last_status = (now, c["sent"], c["acknowledged"])
        recent = sorted(self.latencies.take_recent())
        c.update(phase=self.phase, sent_rate=round((c["sent"] - sent) / dt, 1) if dt else 0.0,
                 ack_rate=round((c["acknowledged"] - acked) / dt, 1) if dt else 0.0,
                 p50_ms=_ms(_rank(recent, 50)), p99_ms=_ms(_rank(recent, 99)))
        return c

    def summary(self) -> dict[str, Any]:
        c = self.counters()
        p50, p99 = self.latencies.percentiles(50, 99)
        c.update(
            connected=self.connected_at_end,
            not_sent=self.not_sent,
            unacknowledged=c["sent"] - c["acknowledged"] - c["refused"],
            all_acknowledged=self.all_acknowledged,
            publish_seconds=round(self.publish_seconds, 3),
            ack_rate_per_s=round(c["acknowledged"] / self.publish_seconds, 1) if self.publish_seconds else None,
            ack_latency_ms={"p50": _ms(p50), "p99": _ms(p99), "max": _ms(self.latencies.max)},
            storms=self.storms, offline_cycles=self.offline_cycles,
            bad_actors=self._bad.summary() if self._bad else {},
            process=self._resources,
            last_errors=sorted({d.last_error for d in self.devices if d.last_error and d.last_error != "closed"})[:5],
        )
        return c

    def _measure(self, cpu_s: float) -> None:
        """This process at the end of publishing: RSS (all devices connected, buffers warm) and CPU."""
        rss = _rss_kb()
        n = max(1, len(self.devices))
        self._resources = {
            "rss_mb": round(rss / 1024, 1), "rss_before_devices_mb": round(self._rss_base_kb / 1024, 1),
            "per_device_kb": round((rss - self._rss_base_kb) / n, 1), "cpu_s": round(cpu_s, 2),
            "cpu_pct": round(100 * cpu_s / self.publish_seconds, 1) if self.publish_seconds else None}

    def latency_sample(self, n: int = 5000) -> list[float]:
        samples = self.latencies.samples
        return list(samples) if len(samples) <= n else random.sample(samples, n)

    def acked_seqs(self) -> dict[str, SeqSet]:
        return {d.device_id: d.acked for d in self.devices}

    # --- running --------------------------------------------------------------------------------------------

    async def run(self, on_status: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The whole timeline; returns :meth:`summary`. ``on_status`` gets :meth:`status` every second."""
        loop = asyncio.get_running_loop()
        s = self.scenario
        reporter = asyncio.create_task(self._report(on_status), name="sim-status") if on_status else None
        try:
            await self._start_devices(s.devices.connect_rate)
            self.phase = "connecting"
            deadline = loop.time() + s.run.connect_wait
            while loop.time() < deadline and any(not d.connected for d in self.devices):
                await asyncio.sleep(0.05)
            self.phase = "publishing"
            if self._bad is not None:
                self._bad.start()
            started = loop.time()
            cpu0 = time.process_time()
            chaos = asyncio.create_task(self._chaos(started + s.run.seconds), name="sim-chaos")
            try:
                await _telemetry(self.devices, s.telemetry, started + s.run.seconds)
            finally:
                chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
                self.publish_seconds = loop.time() - started
                self._measure(time.process_time() - cpu0)
                if self._bad is not None:
                    await self._bad.stop()
            self.phase = "draining"
            for d in self.devices:
                d.go_online()
            deadline = loop.time() + s.run.drain_timeout
            while loop.time() < deadline and any(d.inflight or d.backlog for d in self.devices):
                await asyncio.sleep(0.05)
            self.connected_at_end = sum(1 for d in self.devices if d.connected)
            self.all_acknowledged = not any(d.inflight for d in self.devices)
            self.not_sent = sum(d.discard_backlog() for d in self.devices)
        finally:
            self.phase = "closing"
            await self.close()
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
        return self.summary()

    async def _start_devices(self, rate: float) -> None:
        """Paced, so a thousand handshakes do not hit the gateway (and its connect timeout) in the same instant."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i, device in enumerate(self.devices):
            delay = started + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._tasks.append(asyncio.create_task(device.run(), name=f"device-{device.device_id}"))

    async def _chaos(self, until: float) -> None:
        c = self.scenario.chaos
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_storm = now + c.storm_every if c.storm_every else float("inf")
        next_offline = now + c.offline_every if c.offline_every else float("inf")
        offline: list[tuple[float, list[Device]]] = []
        try:
            while True:
                now = loop.time()
                if now >= next_storm:
                    self.storms += 1
                    for d in _pick(self.devices, c.storm_fraction):
                        d.kick()
                    next_storm += c.storm_every
                if now >= next_offline:
                    self.offline_cycles += 1
                    group = _pick(self.devices, c.offline_fraction)
                    for d in group:
                        d.go_offline()
                    offline.append((now + c.offline_for, group))
                    next_offline += c.offline_every
                while offline and offline[0][0] <= now:
                    for d in offline.pop(0)[1]:
                        d.go_online()
                wake = min(next_storm, next_offline, offline[0][0] if offline else float("inf"), until)
                if wake >= until and not offline and next_storm == next_offline == float("inf"):
                    return
                await asyncio.sleep(max(0.01, min(wake - now, 1.0)))
        finally:
            for _, group in offline:
                for d in group:
                    d.go_online()

    async def _report(self, on_status: Callable[[dict[str, Any]], None]) -> None:
        self.status()  # sets the baseline for the first rates
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            on_status(self.status())

    async def close(self, timeout: float = 5.0) -> None:
        for device in self.devices:
            device.close()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)


async def _telemetry(devices: Sequence[Device], t: Telemetry, until: float) -> None:
    """One task for every device: a heap of (next due time, device index). Due messages become ``request``s."""
    loop = asyncio.get_running_loop()
    if t.interval <= 0 or not devices:
        await asyncio.sleep(max(0.0, until - loop.time()))
        return
    now = loop.time()
    heap = [(now + random.uniform(0, t.interval), i) for i in range(len(devices))]  # phases spread out
    heapq.heapify(heap)
    per_due = t.burst if t.profile == "bursty" else 1
    low, high = (1 - t.jitter, 1 + t.jitter) if t.profile == "jittered" else (1.0, 1.0)
    while True:
        now = loop.time()
        if now >= until:
            return
        while heap[0][0] <= now:
            due, i = heapq.heappop(heap)
            devices[i].request(per_due)
            step = t.interval * (random.uniform(low, high) if high > low else 1.0)
            heapq.heappush(heap, (max(due + step, now - t.interval), i))  # a stalled loop skips, not bursts
        await asyncio.sleep(min(max(heap[0][0] - now, 0.002), until - now, 0.1))


def make_wrong_certs(folder: Path, device_ids: Sequence[str]) -> Path:
    """Another CA and certificates for ``device_ids`` under it, for the wrong_cert bad actors."""
    from edgegw.pki import init_ca, issue_devices

    init_ca(folder, common_name="edgegw-sim rogue CA")
    issue_devices(folder, list(device_ids))
    return folder


def _rss_kb() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:  # not Linux: no figure rather than a failed run
        pass
    return 0


def _pick(devices: Sequence[Device], fraction: float) -> list[Device]:
    return random.sample(list(devices), max(1, round(len(devices) * fraction))) if devices else []


def _rank(ordered: list[float], p: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]  # nearest rank


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
