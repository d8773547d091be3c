"""How ``edgegw reload`` finds and signals the running daemon, and learns how the reload went.

The daemon writes its pid to ``edgegw.pid`` in its state directory (the folder of ``outbox.path``, which is
writable even under systemd's ProtectSystem=strict) when it starts and removes it when it stops. After every
reload (SIGHUP, ``edgegw reload``, ``POST /api/reload``) it writes ``edgegw.reload.json`` next to it:
``{"pid", "at" (unix time), "trigger", "ok", "error"}``. ``edgegw reload`` checks the new config itself first (a
broken one is refused before anything is signalled), sends SIGHUP, and waits for a result newer than its signal.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgegw.errors import EdgegwError

PID_FILE = "edgegw.pid"
RESULT_FILE = "edgegw.reload.json"


class ControlError(EdgegwError):
    """The daemon cannot be found or signalled; the message says which file or pid."""


def state_dir(outbox_path: Path) -> Path:
    return outbox_path.parent


def write_pid(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PID_FILE
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{os.getpid()}\n", encoding="ascii")
    os.replace(tmp, path)
    return path


def remove_pid(folder: Path) -> None:
    path = folder / PID_FILE
    try:
        if path.read_text(encoding="ascii").strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def write_result(folder: Path, *, trigger: str, ok: bool, error: str | None) -> None:
    path = folder / RESULT_FILE
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "at": time.time(), "trigger": trigger, "ok": ok,
                                   "error": error}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # the reload itself happened; only `edgegw reload` waits for this file (and then times out)


def running_pid(folder: Path) -> int:
    """The pid of the gateway using this state dir; ControlError if none is running."""
    path = folder / PID_FILE
    try:
        pid = int(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        raise ControlError(f"no {path}: the gateway is not running (or uses another state dir)") from None
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot read {path}: {exc}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ControlError(f"{path} names pid {pid}, which is not running (stale pid file)") from None
    except PermissionError:
        raise ControlError(f"pid {pid} from {path} belongs to another user: run as the gateway's user") from None
    try:  # a pid reused by another program must not get our SIGHUP (Linux: /proc; elsewhere trust the file)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"edgegw" not in cmdline:
            raise ControlError(f"pid {pid} from {path} is not an edgegw process (stale pid file)")
    except FileNotFoundError:
        pass
    return pid


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    error: str | None
    pid: int
    at: float


def signal_reload(folder: Path, timeout: float = 10.0) -> ReloadResult:
    """SIGHUP the running gateway and wait for its reload result. ControlError if it cannot be signalled or does
    not answer within ``timeout``."""
    pid = running_pid(folder)
    sent = time.time()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    path = folder / RESULT_FILE
    while time.monotonic() < deadline:
        result = _read_result(path)
        if result is not None and result.get("pid") == pid and float(result.get("at", 0)) >= sent:
            return ReloadResult(bool(result.get("ok")), result.get("error"), pid, float(result["at"]))
        time.sleep(0.05)
    raise ControlError(f"pid {pid} was signalled but reported no reload within {timeout:g} s (see its log)")


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
