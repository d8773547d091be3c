"""Benchmark plumbing: certificates, mosquitto brokers, the gateway process, the load generator, a subscriber.

Same approach as tests/conftest.py (real processes on free 127.0.0.1 ports, every wait bounded), trimmed to what
the benchmark needs. Every process goes through :class:`Procs`, which kills all of them (their whole process
group, by id) in ``close()``; ``bench/run.py`` calls it in ``finally``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD_SIZE = 100


_EDGEGW_SRC: Path | None = None


def use_edgegw_source(folder: Path | None) -> None:
    """Run ``python -m edgegw`` (gateway and PKI) from ``folder`` (a tree holding the ``edgegw`` package, e.g. a
    ``git archive`` of a commit) instead of the installed one."""
    global _EDGEGW_SRC
    _EDGEGW_SRC = folder.resolve() if folder else None


def edgegw_cwd() -> Path | None:
    """``python -m`` puts the working directory first on sys.path: with --src, run from there."""
    return _EDGEGW_SRC


def edgegw_env() -> dict[str, str] | None:
    if _EDGEGW_SRC is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_EDGEGW_SRC), env.get("PYTHONPATH", "")) if p)
    return env


class BenchError(RuntimeError):
    """A scenario could not run or did not deliver: the benchmark exits non-zero."""


# --- processes -------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it if the benchmark dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Procs:
    """Every child process of the benchmark. ``close()`` SIGKILLs whatever still runs (each in its own session,
    so its process group is exactly that child and what it started); should the benchmark itself be killed, each
    child gets SIGKILL from the kernel (``PR_SET_PDEATHSIG``)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: Sequence[str], *, log: Path | None = None, stdin: Any = subprocess.DEVNULL,
              stdout: Any = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        out: Any = stdout
        log_file: IO[bytes] | None = None
        if out is None:
            if log is not None:
                log_file = open(log, "ab")  # noqa: SIM115 - the child keeps its own descriptor
                out = log_file
            else:
                out = subprocess.DEVNULL
        try:
            proc = subprocess.Popen(list(cmd), stdin=stdin, stdout=out, stderr=subprocess.STDOUT if log_file
                                    else (subprocess.DEVNULL if stdout is None else None),
                                    start_new_session=True, env=env, cwd=cwd, preexec_fn=_die_with_parent)
        finally:
            if log_file is not None:
                log_file.close()
        self._procs.append(proc)
        return proc

    def track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.returncode is None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``. Returns the exit code (None if it was never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str,
                   log: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{log()[-3000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not listen on {port} within {timeout} s:\n{log()[-3000:]}") from None
            time.sleep(0.02)


# --- /proc -----------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat; busy excludes idle and iowait."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def wait_for_idle_machine(max_wait: float, threshold_pct: float = 15.0) -> float:
    """Wait (at most ``max_wait`` s) until all CPUs are busy less than ``threshold_pct`` over one second; returns the
    last busy % seen. For shared machines: the benchmark's own processes are not running at this point."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_cpu()
        time.sleep(1.0)
        b1, t1 = machine_cpu()
        busy = (b1 - b0) / max(t1 - t0, 1) * 100
        if busy < threshold_pct or time.monotonic() >= deadline:
            return busy
        time.sleep(0.5)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime per thread (tid -> seconds); the main thread's tid is ``pid``."""
    out: dict[int, float] = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def runqueue_wait_seconds(pid: int, tid: int | None = None) -> float:
    """Time thread ``tid`` (default: the main thread) was runnable but waiting for a CPU (/proc/.../schedstat)."""
    try:
        with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


# --- certificates (the real `edgegw pki` CLI) ------------------------------------------------------------------


def edgegw_cli(*args: str, timeout: float = 120.0) -> str:
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=edgegw_env(), cwd=edgegw_cwd())
    if proc.returncode != 0:
        raise BenchError(f"edgegw {' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    """``fleet``: the device-facing CA (devices, the gateway's/edge broker's server certificate);
    ``cloud``: the upstream's CA (its server certificate, clients uplink/sink/bridge). ``bundle`` holds both CAs:
    every broker trusts it, so devices can also publish straight to the upstream (scenario A)."""

    fleet: Path
    cloud: Path
    bundle: Path

    @property
    def fleet_ca(self) -> Path:
        return self.fleet / "ca.crt"

    @property
    def cloud_ca(self) -> Path:
        return self.cloud / "ca.crt"

    @property
    def gateway_server(self) -> Pair:
        return Pair(self.fleet / "server" / "gateway.crt", self.fleet / "server" / "gateway.key")

    @property
    def broker_server(self) -> Pair:
        return Pair(self.cloud / "server" / "broker.crt", self.cloud / "server" / "broker.key")

    def device(self, device_id: str) -> Pair:
        return Pair(self.fleet / "devices" / f"{device_id}.crt", self.fleet / "devices" / f"{device_id}.key")

    def client(self, name: str) -> Pair:
        return Pair(self.cloud / "clients" / f"{name}.crt", self.cloud / "clients" / f"{name}.key")


def make_pki(root: Path, device_ids: Sequence[str]) -> PKI:
    fleet, cloud = root / "fleet", root / "cloud"
    edgegw_cli("pki", "init", str(fleet))
    edgegw_cli("pki", "issue", str(fleet), "server", "gateway", "--san", HOST, "--san", "localhost")
    edgegw_cli("pki", "issue", str(fleet), "device", *device_ids)  # one call, however many
    edgegw_cli("pki", "init", str(cloud))
    edgegw_cli("pki", "issue", str(cloud), "server", "broker", "--san", HOST, "--san", "localhost")
    for name in ("uplink", "sink", "bridge"):
        edgegw_cli("pki", "issue", str(cloud), "client", name)
    bundle = root / "bundle-ca.crt"
    bundle.write_bytes((fleet / "ca.crt").read_bytes() + (cloud / "ca.crt").read_bytes())
    return PKI(fleet, cloud, bundle)


# --- mosquitto -------------------------------------------------------------------------------------------------


class Mosquitto:
    """mosquitto 2 with one mTLS listener on 127.0.0.1 (``require_certificate``, ``use_identity_as_username``),
    optionally bridging to another broker (``extra`` lines)."""

    def __init__(self, procs: Procs, folder: Path, *, cafile: Path, server: Pair, persistence: bool = False,
                 extra: Sequence[str] = ()) -> None:
        self.procs = procs
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = folder / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "per_listener_settings false",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {folder}/",
            # Default 1000 per client: a subscriber that falls behind would silently lose messages past it.
            "max_queued_messages 1000000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages false",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to "mosquitto" and cannot read the 0600 keys
        lines += [
            f"listener {self.port} {HOST}",
            f"cafile {cafile}",
            f"certfile {server.cert}",
            f"keyfile {server.key}",
            "require_certificate true",
            "use_identity_as_username true",
            *extra,
        ]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = self.procs.spawn([MOSQUITTO, "-c", str(self.conf)], log=self.log_path)
        wait_listening(self.port, self.proc, timeout, "mosquitto", self.log)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        terminate(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def bridge_lines(upstream: Mosquitto, pki: PKI) -> list[str]:
    """A mosquitto bridge to ``upstream`` over mTLS: local ``devices/X`` goes up as ``cloud/X`` at QoS 1, the
    same topic edgegw produces with ``topic_prefix = "cloud"``."""
    bridge = pki.client("bridge")
    return [
        "connection cloud",
        f"address {HOST}:{upstream.port}",
        "bridge_protocol_version mqttv311",
        f"bridge_cafile {pki.cloud_ca}",
        f"bridge_certfile {bridge.cert}",
        f"bridge_keyfile {bridge.key}",
        "remote_clientid edge-bridge",
        "cleansession true",
        "notifications false",
        "restart_timeout 1",
        "topic # out 1 devices/ cloud/",
    ]


# --- the gateway -----------------------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_toml(sections: dict[str, dict[str, Any]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
                   for name, values in sections.items())


_SECTION_SUPPORT: dict[str, bool] = {}


def supports_section(folder: Path, name: str, values: dict[str, Any]) -> bool:
    """Does the edgegw being benchmarked know config section ``name``? (``edgegw check-config`` on a minimal file
    holding only it; the answer is cached: one tree per benchmark run.)"""
    if name not in _SECTION_SUPPORT:
        probe = folder / f"probe-{name}.toml"
        probe.write_text(_render_toml({"tls": {"cert": "x", "key": "x", "ca": "x"},
                                       "uplink": {"host": HOST, "ca": "x", "cert": "x", "key": "x"},
                                       name: values}))
        proc = subprocess.run([sys.executable, "-m", "edgegw", "check-config", str(probe)], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, env=edgegw_env(), cwd=edgegw_cwd())
        probe.unlink()
        # Missing files are reported after the schema is accepted; an unknown section is named as such.
        _SECTION_SUPPORT[name] = "unknown section" not in proc.stderr + proc.stdout
    return _SECTION_SUPPORT[name]


class Gateway:
    """``python -m edgegw run --config FILE`` as a child process (the same configuration as the tests'
    ``GatewayProcess``: outbox ``synchronous = "full"``, uplink over mTLS with ``topic_prefix = "cloud"``)."""

    def __init__(self, procs: Procs, folder: Path, pki: PKI, upstream: Mosquitto | None,
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.procs = procs
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = folder / "gateway.log"
        self.outbox_path = folder / "outbox.db"
        self.proc: subprocess.Popen[bytes] | None = None
        server = pki.gateway_server
        uplink = pki.client("uplink")
        sections: dict[str, dict[str, Any]] = {
            "gateway": {"id": "gw-bench"},
            "tls": {"cert": str(server.cert), "key": str(server.key), "ca": str(pki.fleet_ca)},
            "mqtt": {"bind": HOST, "port": self.port},
            "outbox": {"path": str(self.outbox_path), "synchronous": "full"},
            "uplink": {"host": HOST, "port": upstream.port if upstream else free_port(), "ca": str(pki.cloud_ca),
                       "cert": str(uplink.cert), "key": str(uplink.key), "topic_prefix": "cloud",
                       "reconnect_min": 0.1, "reconnect_max": 0.5},
            "log": {"level": "info"},
        }
        if supports_section(folder, "admin", {"port": 0}):
            # Newer trees serve /metrics etc. on a fixed default port (9180): a free one, so parallel runs and
            # other test suites on the machine do not collide.
            sections["admin"] = {"port": free_port()}
        for name, values in (overrides or {}).items():
            sections.setdefault(name, {}).update(values)
        self.config_path = folder / "edgegw.toml"
        self.config_path.write_text(_render_toml(sections))

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "edgegw", "run", "--config", str(self.config_path)]

    def start(self, timeout: float = 20.0) -> Gateway:
        self.proc = self.procs.spawn(self.command, log=self.log_path, env=edgegw_env(), cwd=edgegw_cwd())
        wait_until(lambda: self.proc is not None and (self.proc.poll() is not None
                                                        or '"gateway.ready"' in self.log()),
                   timeout, "the gateway to log gateway.ready")
        if self.proc.poll() is not None:
            lines = [line for line in self.log().splitlines() if line.strip()]
            raise BenchError(f"gateway exited with {self.proc.returncode}: {lines[-1][:300] if lines else ''}\n"
                             f"{self.log()[-3000:]}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        return terminate(self.proc, timeout=20.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def outbox_depth(self) -> int:
        """Rows still in the outbox (read-only connection; WAL lets it read beside the gateway)."""
        con = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True, timeout=2.0)
        try:
            return int(con.execute("SELECT count(*) FROM records").fetchone()[0])
        finally:
            con.close()


# --- load generator: mosquitto_pub -l -q 1, one process per device ---------------------------------------------


def payload_lines(device_id: str, count: int, size: int = PAYLOAD_SIZE) -> bytes:
    """``count`` distinct JSON telemetry documents of exactly ``size`` bytes, one per line."""
    out = []
    for seq in range(count):
        doc = (f'{{"d":"{device_id}","seq":{seq},"ts":{1_700_000_000 + seq * 0.25:.3f},'
               f'"t":{20 + (seq % 97) / 10:.2f},"h":{40 + (seq % 13) / 3:.2f},"v":3.301,"st":"ok","pad":"')
        pad = size - len(doc) - 2
        if pad < 0:
            raise ValueError("payload template longer than the payload size")
        out.append(doc + "x" * pad + '"}')
    return ("\n".join(out) + "\n").encode()


@dataclass
class GeneratorResult:
    devices: int
    messages: int  # per device
    started: float  # time.time() when the first mosquitto_pub was spawned
    started_mono: float
    exits: list[float] = field(default_factory=list)  # monotonic exit time of each process
    codes: list[int] = field(default_factory=list)
    cpu: float = 0.0  # user + system seconds of all mosquitto_pub processes (wait4 rusage)

    @property
    def total(self) -> int:
        return self.devices * self.messages

    @property
    def duration(self) -> float:
        return max(self.exits) - self.started_mono if self.exits else float("nan")

    @property
    def ok(self) -> bool:
        return len(self.codes) == self.devices and all(c == 0 for c in self.codes)


class Generator:
    """K devices, each a ``mosquitto_pub -l -q 1`` process with its own certificate (client id = device id) fed N
    lines from a file. ``mosquitto_pub -l`` exits (0) only after the PUBACK of its last message (see
    ``check_generator_semantics``); QoS 1 PUBACKs come in order, so by then every message was acknowledged."""

    def __init__(self, procs: Procs, folder: Path, pki: PKI, device_ids: Sequence[str], messages: int,
                 inflight: int = 20) -> None:
        self.procs = procs
        self.folder = folder
        self.pki = pki
        self.device_ids = list(device_ids)
        self.messages = messages
        self.inflight = inflight
        folder.mkdir(parents=True, exist_ok=True)
        self.files = {}
        for device_id in self.device_ids:
            path = folder / f"{device_id}.jsonl"
            path.write_bytes(payload_lines(device_id, messages))
            self.files[device_id] = path

    def command(self, port: int, ca: Path, device_id: str, inflight: int | None = None) -> list[str]:
        pair = self.pki.device(device_id)
        return [MOSQUITTO_PUB, "-h", HOST, "-p", str(port), "--cafile", str(ca), "--cert", str(pair.cert),
                "--key", str(pair.key), "-i", device_id, "-t", f"devices/{device_id}/telemetry", "-q", "1",
                "-M", str(inflight or self.inflight), "-l"]

    def run(self, port: int, ca: Path, timeout: float, tag: str, inflight: int | None = None) -> GeneratorResult:
        procs: dict[int, subprocess.Popen[bytes]] = {}
        result = GeneratorResult(len(self.device_ids), self.messages, time.time(), time.monotonic())
        for device_id in self.device_ids:
            with open(self.files[device_id], "rb") as stdin:
                proc = self.procs.spawn(self.command(port, ca, device_id, inflight), stdin=stdin,
                                        log=self.folder / f"{tag}-{device_id}.log")
            procs[proc.pid] = proc
        deadline = time.monotonic() + timeout
        cpu = 0.0
        while procs:
            for pid in list(procs):
                # wait4 (not Popen.wait) to get each child's own rusage: the generator's CPU per message.
                got, status, usage = os.wait4(pid, os.WNOHANG)
                if got == 0:
                    continue
                now = time.monotonic()
                proc = procs.pop(pid)
                proc.returncode = os.waitstatus_to_exitcode(status)
                result.exits.append(now)
                result.codes.append(proc.returncode)
                cpu += usage.ru_utime + usage.ru_stime
            if not procs:
                break
            if time.monotonic() > deadline:
                for proc in procs.values():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
                raise BenchError(f"{tag}: {len(procs)} of {len(self.device_ids)} mosquitto_pub still running "
                                 f"after {timeout:.0f} s")
            time.sleep(0.002)
        result.cpu = cpu
        if not result.ok:
            bad = [(d, c) for d, c in zip(self.device_ids, result.codes, strict=False) if c != 0]
            logs = sorted(self.folder.glob(f"{tag}-*.log"))
            tail = "".join(p.read_text(errors="replace")[-300:] for p in logs[:3])
            raise BenchError(f"{tag}: mosquitto_pub failed: {bad[:5]}\n{tail}")
        return result


# --- subscriber on the upstream --------------------------------------------------------------------------------


class Subscriber:
    """``mosquitto_sub -t '#' -q 1 -F '%U %p'`` on the upstream with the "sink" certificate. mosquitto_sub flushes
    each line, and ``%U`` is its own receive time (unix, ns), so the end-to-end time does not depend on how
    often we poll. Counts distinct payloads (every generated payload is unique) and duplicates."""

    def __init__(self, procs: Procs, folder: Path, pki: PKI, broker: Mosquitto, tag: str, *,
                 frames: bool = False) -> None:
        self.path = folder / f"sub-{tag}.txt"
        self.path.write_bytes(b"")
        sink = pki.client("sink")
        self._out = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        if frames:  # the gateway sends batch frames: bench/frame_sub.py unpacks them into the same lines
            self.proc = procs.spawn([sys.executable, str(Path(__file__).with_name("frame_sub.py")),
                                     "--port", str(broker.port), "--cafile", str(pki.cloud_ca),
                                     "--cert", str(sink.cert), "--key", str(sink.key), "--client-id", f"sink-{tag}",
                                     "--out", str(self.path)], log=folder / f"sub-{tag}.log")
        else:
            self.proc = procs.spawn([MOSQUITTO_SUB, "-h", HOST, "-p", str(broker.port), "--cafile",
                                     str(pki.cloud_ca), "--cert", str(sink.cert), "--key", str(sink.key),
                                     "-i", f"sink-{tag}", "-t", "#", "-q", "1", "-F", "%U %p"], stdout=self._out)
        self._offset = 0
        self._partial = b""
        self.seen: set[bytes] = set()
        self.duplicates = 0
        self.probes = 0
        self.first_ts = 0.0
        self.last_ts = 0.0

    def poll(self) -> int:
        """Read what arrived since the last call; returns the number of distinct messages so far."""
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            ts, _, payload = line.partition(b" ")
            if payload.startswith(b'{"probe"'):
                self.probes += 1
                continue
            if payload in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(payload)
            t = float(ts)
            if not self.first_ts:
                self.first_ts = t
            self.last_ts = max(self.last_ts, t)
        return len(self.seen)

    def wait_ready(self, publish_probe: Callable[[], None], timeout: float) -> None:
        """Publish probes (through the whole path) until one arrives: subscription and path are up."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"mosquitto_sub exited with {self.proc.returncode}")
            publish_probe()
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                self.poll()
                if self.probes:
                    return
                time.sleep(0.02)
            if time.monotonic() > deadline:
                raise BenchError(f"no probe message reached the upstream subscriber within {timeout:.0f} s")

    def wait_for(self, expected: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.poll() < expected:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        terminate(self.proc, timeout=3.0)
        self._out.close()


def publish_probe(port: int, ca: Path, pair: Pair, client_id: str, topic: str, tag: str) -> None:
    subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(port), "--cafile", str(ca), "--cert", str(pair.cert),
                    "--key", str(pair.key), "-i", client_id, "-t", topic, "-q", "1",
                    "-m", json.dumps({"probe": tag})], timeout=10, capture_output=True, stdin=subprocess.DEVNULL)


def fsync_latency_ms(folder: Path, count: int = 50) -> tuple[float, float]:
    """p50 and p90 of fsync after a 4 KiB write in ``folder``: what one group commit's durability costs there."""
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.9)] * 1e3


# --- generator semantics check ---------------------------------------------------------------------------------


def check_generator_semantics(timeout: float = 10.0) -> dict[str, Any]:
    """Does ``mosquitto_pub -l -q 1`` exit only after its last PUBACK? Checked against a minimal MQTT 3.1.1 server
    (plain TCP, in a thread) that acknowledges every PUBLISH but the last one until told to: the process must still
    run while that PUBACK is withheld, exit 0 soon after it is sent, and send DISCONNECT only after it."""
    lines = 5
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(1)
    listener.settimeout(timeout)
    port = listener.getsockname()[1]
    release = threading.Event()
    events: list[str] = []
    errors: list[str] = []

    def read_packet(conn: socket.socket) -> tuple[int, bytes]:
        def exact(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = conn.recv(n - len(buf))
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            return buf
        first = exact(1)[0]
        length, shift = 0, 0
        while True:
            b = exact(1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return first, exact(length)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            with conn:
                published = 0
                held: bytes | None = None
                while True:
                    try:
                        first, body = read_packet(conn)
                    except (ConnectionError, OSError):
                        events.append("closed")
                        return
                    kind = first >> 4
                    if kind == 1:  # CONNECT
                        conn.sendall(b"\x20\x02\x00\x00")
                    elif kind == 3:  # PUBLISH, QoS 1: topic, packet id, payload
                        published += 1
                        topic_len = int.from_bytes(body[:2], "big")
                        packet_id = body[2 + topic_len: 4 + topic_len]
                        puback = b"\x40\x02" + packet_id
                        events.append(f"publish {published}")
                        if published == lines:
                            held = puback
                            release.wait(timeout)
                            events.append("puback last")
                            conn.sendall(held)
                        else:
                            conn.sendall(puback)
                    elif kind == 14:  # DISCONNECT
                        events.append("disconnect")
                    elif kind == 12:  # PINGREQ
                        conn.sendall(b"\xd0\x00")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proc = subprocess.Popen([MOSQUITTO_PUB, "-h", HOST, "-p", str(port), "-i", "gen-check", "-t", "t", "-q", "1",
                             "-l"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"".join(b"line %d\n" % i for i in range(lines)))
        proc.stdin.close()
        wait_until(lambda: f"publish {lines}" in events or bool(errors), timeout, "the last PUBLISH")
        time.sleep(1.0)
        still_running = proc.poll() is None
        release.set()
        t0 = time.monotonic()
        code = proc.wait(timeout)
        exit_after = time.monotonic() - t0
        thread.join(timeout)
    finally:
        release.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    order_ok = "puback last" in events and "disconnect" in events and \
        events.index("disconnect") > events.index("puback last")
    ok = still_running and code == 0 and order_ok and not errors
    return {"ok": ok, "still_running_while_puback_withheld": still_running, "exit_code": code,
            "exit_after_last_puback_s": round(exit_after, 3), "disconnect_after_last_puback": order_ok,
            "errors": errors}
