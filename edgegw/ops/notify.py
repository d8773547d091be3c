"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message to $NOTIFY_SOCKET.

READY=1 once listeners and the outbox are up, WATCHDOG=1 from the event loop itself (so a blocked loop misses it and
systemd restarts us), STATUS= for `systemctl status`, STOPPING=1 when draining. Outside systemd it does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("edgegw.notify")


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract namespace socket
        elif address.startswith("/"):
            self._address = address
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if watchdog_for_us else None
        """Seconds between WATCHDOG=1 pings: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: never take the gateway down for it
            log.warning("notify.failed", error=str(exc))

    async def watchdog(self, status: Callable[[], str]) -> None:
        """Ping the watchdog and refresh STATUS= until cancelled. Runs on the event loop on purpose."""
        interval = self.watchdog_interval or 5.0
        while True:
            lines = [f"STATUS={status()}"]
            if self.watchdog_interval is not None:
                lines.append("WATCHDOG=1")
            self.notify(*lines)
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
