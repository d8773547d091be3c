"""A fleet of simulated devices publishing at a shared total rate, round-robin (see :mod:`edgegw.sim.device`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path

from edgegw.sim.device import Device, LatencySamples, SeqSet
from edgegw.tlsutil import client_ssl_context


class Fleet:
    """Many :class:`Device` s publishing at a shared total rate, round-robin."""

    def __init__(self, devices: Sequence[Device]) -> None:
        if not devices:
            raise ValueError("a fleet needs at least one device")
        self.devices = list(devices)
        self._tasks: list[asyncio.Task[None]] = []
        self.not_sent = 0
        """Messages that were due when publishing stopped but never sent (backpressure or offline)."""
        self.publish_started: float | None = None
        self.publish_stopped: float | None = None

    @classmethod
    def from_pki(cls, pki_dir: Path, device_ids: Iterable[str], host: str, port: int, *,
                 ca: Path | None = None, server_hostname: str | None = None, **options: object) -> Fleet:
        """Devices whose certificates are ``pki_dir/devices/{id}.crt/.key`` (as ``edgegw pki issue`` writes them),
        trusting ``ca`` (default ``pki_dir/ca.crt``). One SSLContext per device: each presents its own cert."""
        ca = ca or pki_dir / "ca.crt"
        latencies = LatencySamples()
        devices = []
        for device_id in device_ids:
            ctx = client_ssl_context(ca, pki_dir / "devices" / f"{device_id}.crt",
                                     pki_dir / "devices" / f"{device_id}.key")
            devices.append(Device(device_id, host, port, ctx, server_hostname=server_hostname,
                                  latencies=latencies, **options))  # type: ignore[arg-type]
        return cls(devices)

    # --- counters -------------------------------------------------------------------------------------------

    @property
    def published(self) -> int:
        return sum(d.published for d in self.devices)

    @property
    def acknowledged(self) -> int:
        return sum(d.acknowledged for d in self.devices)

    @property
    def inflight(self) -> int:
        return sum(d.inflight for d in self.devices)

    @property
    def backlog(self) -> int:
        return sum(d.backlog for d in self.devices)

    @property
    def connected(self) -> int:
        return sum(1 for d in self.devices if d.connected)

    @property
    def resent(self) -> int:
        return sum(d.resent for d in self.devices)

    @property
    def reconnects(self) -> int:
        return sum(max(0, d.connects - 1) for d in self.devices)

    @property
    def latencies(self) -> LatencySamples:
        return self.devices[0].latencies  # shared by devices made with from_pki

    def acked_seqs(self) -> dict[str, SeqSet]:
        return {d.device_id: d.acked for d in self.devices}

    # --- running --------------------------------------------------------------------------------------------

    async def connect(self, timeout: float) -> int:
        """Start every device; wait until all are connected or ``timeout``. Returns how many are connected."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(d.run(), name=f"device-{d.device_id}") for d in self.devices]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connected < len(self.devices) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.connected

    async def publish(self, rate: float, seconds: float, *, tick: float = 0.01) -> None:
        """Make ``rate`` messages/s due, spread round-robin over the devices, for ``seconds``. Whatever is still
        due and unsent at the end is dropped (counted in :attr:`not_sent`)."""
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        loop = asyncio.get_running_loop()
        devices = self.devices
        n = len(devices)
        start = self.publish_started = loop.time()
        end = start + seconds
        issued = 0
        rr = 0
        try:
            while True:
                now = min(loop.time(), end)
                due = int(rate * (now - start)) - issued
                if due > 0:
                    issued += due
                    base, extra = divmod(due, n)
                    for i in range(n if base else extra):
                        device = devices[(rr + i) % n]
                        device.request(base + (1 if i < extra else 0))
                    rr = (rr + extra) % n
                if now >= end:
                    break
                await asyncio.sleep(tick)
        finally:
            self.publish_stopped = loop.time()
            self.not_sent += sum(d.discard_backlog() for d in devices)

    async def wait_acked(self, timeout: float) -> bool:
        """Wait until nothing sent is unacknowledged (True) or ``timeout`` (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.inflight

    async def close(self, timeout: float = 5.0) -> None:
        """DISCONNECT every device and wait (bounded) for their tasks; cancel what is left."""
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
