"""systemd integration: the unit file verifies, and the daemon speaks the notify protocol to a real socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Mosquitto

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's interpreter.
    unit = (ROOT / "systemd" / "edgegw.service").read_text()
    unit = unit.replace("/opt/edgegw/bin/edgegw", f"{sys.executable} -m edgegw")
    target = tmp_path / "edgegw.service"
    target.write_text(unit)
    proc = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "edgegw.service" not in proc.stderr, proc.stderr


def test_ready_watchdog_status_and_stopping(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    sock_path = Path(f"/tmp/edgegw-notify-{os.getpid()}.sock")
    sock_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    gw = gateway_factory(mosquitto)
    env_before = dict(os.environ)
    os.environ.update(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")  # 0.4 s: pings every 0.2 s
    try:
        gw.start()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    messages: list[str] = []

    def collect(until: Callable[[], bool], seconds: float) -> None:
        """Receive until ``until()`` holds (or ``seconds`` pass: the asserts below then say what is missing)."""
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    def running_told() -> bool:
        return (any("READY=1" in m for m in messages) and sum("WATCHDOG=1" in m for m in messages) >= 3
                and any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)
                and any("devices connected" in m and "outbox depth" in m for m in messages))

    try:
        collect(running_told, 10.0)
        assert any("READY=1" in m for m in messages), messages
        assert sum("WATCHDOG=1" in m for m in messages) >= 3, messages
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages), messages
        assert any("devices connected" in m and "outbox depth" in m for m in messages), messages
        assert gw.terminate() == 0
        collect(lambda: any("STOPPING=1" in m for m in messages), 5.0)
        assert any("STOPPING=1" in m for m in messages), messages
    finally:
        sock.close()
        sock_path.unlink(missing_ok=True)
