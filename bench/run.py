"""edgegw benchmark: one command, bounded in time, every peer a real process.

    .venv/bin/python bench/run.py [--quick] [--out docs/BENCHMARKS.md] [--profile | --no-profile]

Scenarios, all with the same load generator (K devices, each a ``mosquitto_pub -l -q 1`` process with its own
certificate, client id = device id, N 100-byte JSON lines) and the same upstream (mosquitto, mTLS, one
``mosquitto_sub -q 1 '#'`` subscriber):

  A  generator -> upstream mosquitto directly                      (the generator's own ceiling)
  B  generator -> edgegw run (outbox synchronous=full) -> upstream  (the durable path)
  C  generator -> mosquitto edge broker + bridge -> upstream        (the comparison peer; not durable per message)
  D  1,000 idle mTLS MQTT connections to edgegw, then to mosquitto (100 with --quick)
  E  B with ``uplink.batch_max_records = 100``: the uplink packs records into msgpack frames, and the subscriber
     is ``bench/frame_sub.py`` (paho), which unpacks them into the same lines as ``mosquitto_sub``

A full run repeats A, B, C and E three times (interleaved; the median run is reported), then runs B and C again with
the devices' in-flight window at 1 and 64 (``--sweep``), then, when py-spy is installed (``.venv/bin/pip install
py-spy``), scenario B once more with py-spy attached: the top self-time functions go under "Profile".
``--only B`` (or BC, ...) and ``--set outbox.commit_window_ms=1`` are for experiments; a partial run never writes
``--out``. Results are printed and written between the ``<!-- bench:begin -->`` /
``<!-- bench:end -->`` markers of ``--out`` (the profile between ``<!-- bench:profile:begin/end -->``); text
outside the markers is kept. Exit status 1 if any scenario failed or lost a message (then ``--out`` is not
touched).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    CLK_TCK,
    HOST,
    MOSQUITTO,
    PAYLOAD_SIZE,
    BenchError,
    Gateway,
    Generator,
    GeneratorResult,
    Mosquitto,
    Procs,
    Subscriber,
    bridge_lines,
    check_generator_semantics,
    cpu_seconds,
    fsync_latency_ms,
    machine_cpu,
    runqueue_wait_seconds,
    thread_cpu_seconds,
    make_pki,
    memory_kb,
    publish_probe,
    terminate,
    use_edgegw_source,
    wait_for_idle_machine,
    wait_until,
)

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PY_SPY_ARGS = ["record", "--rate", "250", "--threads", "--format", "raw"]
PBEGIN, PEND = "<!-- bench:profile:begin -->", "<!-- bench:profile:end -->"
E_BATCH_RECORDS = 100  # scenario E: records per uplink frame at most (a frame takes what is ready: no linger)
SCENARIOS = "ABCDE"


@dataclass
class Params:
    devices: int
    messages: int
    idle: int
    idle_window: float
    inflight: int
    quick: bool
    profile: bool
    repeat: int = 1
    gateway_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    wait_idle: float = 0.0
    upstream_inflight: int = 0  # 0: mosquitto's default (20), which it announces as its Receive Maximum


@dataclass
class FlowResult:
    key: str
    title: str
    expected: int
    inflight: int = 20
    delivered: int = 0
    duplicates: int = 0
    gen: GeneratorResult | None = None
    e2e_s: float = float("nan")
    steady_rate: float = float("nan")  # subscriber: messages between first and last arrival / that time
    edge_cpu_us: float | None = None
    upstream_cpu_us: float = float("nan")
    edge_rss_before_kb: int | None = None
    edge_rss_after_kb: int | None = None
    edge_hwm_kb: int | None = None
    main_thread_cpu_us: float | None = None  # B: the event loop thread alone
    main_thread_busy_pct: float | None = None  # B: its CPU time / end-to-end time
    thread_cpu_s: dict[int, float] = field(default_factory=dict)  # B: tid -> CPU seconds over the run
    main_thread_runq_pct: float | None = None  # B: runnable but waiting for a CPU, % of the end-to-end time
    machine_busy_pct: float = float("nan")  # all CPUs, from the devices' start to the last delivery
    runs: list[tuple[float, float, float | None]] = field(default_factory=list)  # (device, e2e, cpu) of each run
    other_load_pct: float = float("nan")  # CPU used by processes that are not part of this run, % of all CPUs
    other_loads: list[float] = field(default_factory=list)  # other_load_pct of each run
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.delivered == self.expected

    @property
    def device_s(self) -> float:
        return self.gen.duration if self.gen else float("nan")

    @property
    def device_rate(self) -> float:
        return self.expected / self.device_s if self.gen else float("nan")

    @property
    def e2e_rate(self) -> float:
        return self.expected / self.e2e_s

    @property
    def gen_cpu_us(self) -> float:
        return self.gen.cpu / self.expected * 1e6 if self.gen else float("nan")


@dataclass
class IdleResult:
    title: str
    count: int
    connected: int = 0
    connect_s: float = float("nan")
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    hwm_kb: int = 0
    idle_cpu_pct: float = float("nan")
    window: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.connected == self.count

    @property
    def per_conn_kb(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / self.count if self.count else float("nan")


# --- scenarios A, B, C -----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, procs: Procs, workdir: Path, params: Params) -> None:
        self.procs = procs
        self.workdir = workdir
        self.p = params
        self.device_ids = [f"dev-{i:02d}" for i in range(params.devices)]
        self.idle_ids = [f"idle-{i:04d}" for i in range(params.idle)]
        self.pki = make_pki(workdir / "pki", [*self.device_ids, "probe", *self.idle_ids])
        self.generator = Generator(procs, workdir / "gen", self.pki, self.device_ids, params.messages,
                                   inflight=params.inflight)
        total = params.devices * params.messages
        self.flow_timeout = 30.0 + total / 500  # bound only; at >= 500 msg/s this never fires
        self._seq = 0

    def upstream(self, tag: str) -> Mosquitto:
        extra = [f"max_inflight_messages {self.p.upstream_inflight}"] if self.p.upstream_inflight else []
        return Mosquitto(self.procs, self.workdir / f"{tag}-upstream", cafile=self.pki.bundle,
                         server=self.pki.broker_server, extra=extra).start()

    def overrides(self, key: str) -> dict[str, dict[str, Any]]:
        """The gateway's configuration overrides for scenario ``key``: ``--set``, and for E the batch frames."""
        if key != "E":
            return self.p.gateway_overrides
        merged = {section: dict(kv) for section, kv in self.p.gateway_overrides.items()}
        merged.setdefault("uplink", {}).setdefault("batch_max_records", E_BATCH_RECORDS)
        return merged

    def flow(self, key: str, title: str, *, profile_out: Path | None = None, inflight: int | None = None,
             generator: Generator | None = None) -> FlowResult:
        generator = generator or self.generator
        inflight = inflight or self.p.inflight
        if self.p.wait_idle:
            wait_for_idle_machine(self.p.wait_idle)
        self._seq += 1  # every run gets fresh folders: outbox, logs and broker state never carry over
        tag = f"{self._seq:02d}-{key}" + ("-profile" if profile_out is not None else "")
        if inflight != self.p.inflight:
            tag += f"-M{inflight}"
        result = FlowResult(key, title, self.p.devices * generator.messages, inflight=inflight)
        pki = self.pki
        upstream = gateway = edge = sub = spy = None
        try:
            upstream = self.upstream(tag)
            edge_pid: int | None = None
            if key == "A":
                port = upstream.port
            elif key in ("B", "E"):
                gateway = Gateway(self.procs, self.workdir / f"{tag}-gateway", pki, upstream,
                                  overrides=self.overrides(key)).start()
                port, edge_pid = gateway.port, gateway.pid
            else:
                edge = Mosquitto(self.procs, self.workdir / f"{tag}-edge", cafile=pki.bundle,
                                 server=pki.gateway_server, persistence=True,
                                 extra=bridge_lines(upstream, pki)).start()
                port, edge_pid = edge.port, edge.pid
            batched = gateway is not None and int(self.overrides(key).get("uplink", {}).get("batch_max_records", 1)) > 1
            sub = Subscriber(self.procs, self.workdir, pki, upstream, tag, frames=batched)
            sub.wait_ready(lambda: publish_probe(port, pki.bundle, pki.device("probe"), "probe",
                                                 "devices/probe/ready", tag), timeout=20.0)
            if profile_out is not None and edge_pid is not None:
                spy = self.procs.spawn([py_spy(), *PY_SPY_ARGS, "--pid", str(edge_pid), "--output", str(profile_out)],
                                       log=self.workdir / "py-spy.log")
                time.sleep(1.0)  # attached
            if edge_pid is not None:
                mem = memory_kb(edge_pid)
                result.edge_rss_before_kb = mem["VmRSS"]
                edge_cpu0 = cpu_seconds(edge_pid)
                threads0 = thread_cpu_seconds(edge_pid)
                runq0 = runqueue_wait_seconds(edge_pid)
            up_cpu0 = cpu_seconds(upstream.pid)
            ours0 = self_cpu() + cpu_seconds(sub.proc.pid) + up_cpu0 + (cpu_seconds(edge_pid) if edge_pid else 0.0) \
                + (cpu_seconds(spy.pid) if spy is not None else 0.0)
            machine0 = machine_cpu()

            result.gen = generator.run(port, pki.bundle, self.flow_timeout, tag, inflight=inflight)
            delivered = sub.wait_for(result.expected, timeout=self.flow_timeout)
            result.delivered = len(sub.seen)
            result.duplicates = sub.duplicates
            if not delivered:
                result.error = (f"upstream received {result.delivered} of {result.expected} distinct messages "
                                f"within {self.flow_timeout:.0f} s of the devices finishing")
                return result
            machine1 = machine_cpu()
            ours1 = self_cpu() + cpu_seconds(sub.proc.pid) + cpu_seconds(upstream.pid) + result.gen.cpu \
                + (cpu_seconds(edge_pid) if edge_pid else 0.0) + (cpu_seconds(spy.pid) if spy is not None else 0.0)
            span = max(machine1[1] - machine0[1], 1)
            result.machine_busy_pct = (machine1[0] - machine0[0]) / span * 100
            result.other_load_pct = max(0.0, ((machine1[0] - machine0[0]) / CLK_TCK - (ours1 - ours0))
                                        / (span / CLK_TCK) * 100)
            result.e2e_s = sub.last_ts - result.gen.started
            if sub.last_ts > sub.first_ts:
                result.steady_rate = (result.expected - 1) / (sub.last_ts - sub.first_ts)
            if gateway is not None:
                # Everything delivered; let the gateway commit the deletes too, so CPU/msg is the whole cost.
                try:
                    wait_until(lambda: gateway.outbox_depth() == 0, 15.0, "the outbox to drain")
                except (BenchError, sqlite3.Error) as exc:
                    result.notes.append(f"outbox not empty after delivery: {exc}")
            if edge_pid is not None:
                result.edge_cpu_us = (cpu_seconds(edge_pid) - edge_cpu0) / result.expected * 1e6
                if gateway is not None:
                    threads1 = thread_cpu_seconds(edge_pid)
                    result.thread_cpu_s = {tid: cpu - threads0.get(tid, 0.0) for tid, cpu in threads1.items()}
                    main_cpu = result.thread_cpu_s.get(edge_pid, 0.0)
                    result.main_thread_cpu_us = main_cpu / result.expected * 1e6
                    result.main_thread_busy_pct = main_cpu / result.e2e_s * 100
                    result.main_thread_runq_pct = (runqueue_wait_seconds(edge_pid) - runq0) / result.e2e_s * 100
                mem = memory_kb(edge_pid)
                result.edge_rss_after_kb, result.edge_hwm_kb = mem["VmRSS"], mem["VmHWM"]
            result.upstream_cpu_us = (cpu_seconds(upstream.pid) - up_cpu0) / result.expected * 1e6
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    result.notes.append("py-spy did not stop within 60 s")
            if gateway is not None:
                problems = [line for line in gateway.log().splitlines()
                            if '"level": "warning"' in line or '"level": "error"' in line]
                if problems:
                    result.notes.append(f"gateway logged {len(problems)} warnings/errors, first: {problems[0][:300]}")
        except BenchError as exc:
            result.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported, and the run fails
            result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        finally:
            if spy is not None:
                terminate(spy, timeout=30.0)
            if sub is not None:
                sub.close()
            if gateway is not None:
                code = gateway.stop()
                if code not in (0, None):
                    result.notes.append(f"gateway exited with {code} on SIGTERM")
            if edge is not None:
                edge.stop()
            if upstream is not None:
                upstream.stop()
        return result

    # --- scenario D --------------------------------------------------------------------------------------------

    def idle(self, kind: str) -> IdleResult:
        count = self.p.idle
        result = IdleResult("edgegw" if kind == "edgegw" else "mosquitto (edge broker, no bridge)", count,
                            window=self.p.idle_window)
        if self.p.wait_idle:
            wait_for_idle_machine(self.p.wait_idle)
        upstream = gateway = broker = client = None
        tag = f"D-{kind}"
        try:
            if kind == "edgegw":
                upstream = self.upstream(tag)
                gateway = Gateway(self.procs, self.workdir / f"{tag}-gateway", self.pki, upstream,
                                  overrides=self.p.gateway_overrides).start()
                port, pid = gateway.port, gateway.pid
            else:
                broker = Mosquitto(self.procs, self.workdir / f"{tag}-broker", cafile=self.pki.bundle,
                                   server=self.pki.gateway_server).start()
                port, pid = broker.port, broker.pid
            # Let start-up allocations settle before RSS is read; --quick asserts no figure, so a short pause does.
            settle = 0.2 if self.p.quick else 1.0
            time.sleep(settle)
            result.rss_before_kb = memory_kb(pid)["VmRSS"]
            ids_file = self.workdir / "idle-ids.txt"
            ids_file.write_text("\n".join(self.idle_ids) + "\n")
            client = self.procs.spawn(
                [sys.executable, str(HERE / "idle_clients.py"), HOST, str(port), str(self.pki.fleet_ca),
                 str(self.pki.fleet / "devices"), "--ids-file", str(ids_file)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            line = read_line(client, timeout=60.0 + count / 20)
            status = json.loads(line)
            result.connected = int(status["connected"])
            result.connect_s = float(status["seconds"])
            if status["failed"]:
                result.error = f"{status['failed']} connections failed, e.g. {status['errors'][:2]}"
            time.sleep(settle)
            mem = memory_kb(pid)
            result.rss_after_kb, result.hwm_kb = mem["VmRSS"], mem["VmHWM"]
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(self.p.idle_window)
            result.idle_cpu_pct = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
            if client.poll() is not None:
                result.error = f"idle client exited early with {client.returncode}"
        except BenchError as exc:
            result.error = str(exc)
        except Exception as exc:  # noqa: BLE001
            result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        finally:
            if client is not None:
                if client.stdin is not None:
                    try:
                        client.stdin.close()
                    except OSError:
                        pass
                terminate(client, timeout=10.0)
                if client.stdout is not None:
                    client.stdout.close()
            if gateway is not None:
                gateway.stop()
            if broker is not None:
                broker.stop()
            if upstream is not None:
                upstream.stop()
        return result


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pick_median(results: list[FlowResult]) -> FlowResult:
    """The run with the median device-side rate (a failed run wins: it must be reported), carrying every run's
    rates so the report can show the spread."""
    failed = [r for r in results if not r.ok]
    chosen = failed[0] if failed else sorted(results, key=lambda r: r.device_rate)[len(results) // 2]
    chosen.runs = [(r.device_rate, r.e2e_rate, r.edge_cpu_us) for r in results]
    chosen.other_loads = [r.other_load_pct for r in results]
    return chosen


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line from ``proc.stdout``, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no status line from the idle client within {timeout:.0f} s")
            if sel.select(min(left, 0.5)):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError(f"idle client closed its output (exit {proc.poll()})")
                buf += chunk
    finally:
        sel.close()
    return buf.split(b"\n", 1)[0].decode()


# --- profile ---------------------------------------------------------------------------------------------------


def py_spy() -> str:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else (shutil.which("py-spy") or "")


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# A leaf frame on one of these source lines is a thread blocked in C (a queue get, epoll): py-spy's idle detection
# does not always see that on a loaded machine, so such samples are counted as waiting, not as work.
_WAIT_LINE = re.compile(r"\b(get|wait|poll|select|sleep|join|acquire)\(")


def _source_line(file: str, line: int) -> str:
    """The text of ``file:line`` for a path as py-spy prints it (relative to some sys.path entry), or ''."""
    if not file or file.startswith("<"):
        return ""
    candidates = [Path(file)] + [Path(p) / file for p in sys.path if p] + [ROOT / file]
    candidates += sorted((ROOT / "edgegw").rglob(Path(file).name)) if "/" not in file else []
    for path in candidates:
        if path.is_file():
            try:
                return path.read_text(errors="replace").splitlines()[line - 1].strip()
            except (OSError, IndexError):
                return ""
    return ""


def _thread_label(label: str) -> str:
    name = label.split(":", 1)[-1].strip()
    if "MainThread" in name:
        return "main thread (event loop)"
    if "_connection_worker_thread" in name:
        return f"aiosqlite {name.split(' ', 1)[0]}"
    if name.startswith("asyncio_"):
        return "default executor"
    return name or "?"


def _thread_id(label: str) -> int | None:
    m = re.match(r"thread \((\d+)\)", label)
    return int(m.group(1)) if m else None


def summarize_profile(raw: Path, top: int = 10) -> dict[str, Any]:
    """From py-spy's collapsed stacks (with line numbers): self time per function (leaf frame, with its hottest
    line), time per edgegw function anywhere on the stack, and per thread; blocked-in-C samples set aside."""
    self_t: collections.Counter[str] = collections.Counter()
    self_lines: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    waiting: collections.Counter[str] = collections.Counter()
    sources: dict[tuple[str, int], str] = {}
    total = 0
    for row in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = row.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = ""
        while frames and frames[0].startswith(("thread", "process")):
            thread = frames.pop(0)
        if not frames:
            continue
        leaf = _FRAME.match(frames[-1].strip())
        if leaf and leaf.group("line"):
            key = (leaf.group("file"), int(leaf.group("line")))
            if key not in sources:
                sources[key] = _source_line(*key)
            text = sources[key]
        else:
            text = ""
        name = _short(frames[-1])
        if text and _WAIT_LINE.search(text):
            waiting[f"{name}: {text}"] += count
            continue
        total += count
        threads[thread] += count
        self_t[name] += count
        self_lines[name][text or "?"] += count
        for fname in {_short(f) for f in frames}:
            if "(edgegw/" in fname and "(edgegw/cli.py)" not in fname and "__main__" not in fname:
                incl[fname] += count
    return {"total": total, "waiting": sum(waiting.values()), "waiting_top": waiting.most_common(3),
            "self": [(n, c, self_lines[n].most_common(1)[0][0]) for n, c in self_t.most_common(top)],
            "inclusive": incl.most_common(12),
            "threads": [(_thread_label(t), _thread_id(t), n) for t, n in threads.most_common()]}


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    func = m.group("func")
    if func == "__create_fn__.<locals>.__init__":
        func = "<dataclass __init__>"
    return f"{func} ({m.group('file')})"


# --- report ----------------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def _mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:,.1f}"


def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        mosq = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mosq = "?"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    return {"cpus": str(os.cpu_count()), "cpu": model or platform.processor() or "?", "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "sqlite": sqlite3.sqlite_version, "mosquitto": mosq.replace("mosquitto version ", ""),
            "commit": commit or "?"}


def filesystem(path: Path) -> str:
    """Type and device of the filesystem holding ``path`` (longest mount point prefix)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0]})"


def render(params: Params, command: str, mach: dict[str, str], workdir: Path, fsync_ms: tuple[float, float],
           gen_check: dict[str, Any], flows: list[FlowResult], idles: list[IdleResult], sweeps: list[FlowResult],
           seconds: float) -> str:
    total = params.devices * params.messages
    by = {f.key: f for f in flows}
    out: list[str] = []
    w = out.append
    w(f"_Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {seconds:.0f} s"
      f"{' (--quick: small sizes, smoke test only)' if params.quick else ''}._")
    w("")
    w(f"Machine: {mach['cpus']} CPUs ({mach['cpu']}), {mach['memory']} RAM, Linux {mach['kernel']}, "
      f"Python {mach['python']}, {mach['openssl']}, SQLite {mach['sqlite']}, mosquitto {mach['mosquitto']}; "
      f"edgegw at {mach['commit']}. Outbox and broker files on {filesystem(workdir)}; fsync of a 4 KiB write there: "
      f"p50 {fsync_ms[0]:.2f} ms, p90 {fsync_ms[1]:.2f} ms. Every process (generator, brokers, gateway, subscriber) "
      "shares these CPUs.")
    w("")
    w(f"Load: {params.devices} devices x {params.messages:,} messages = {total:,} QoS 1 PUBLISHes of {PAYLOAD_SIZE} "
      f"bytes (JSON telemetry, each payload unique), each device one `mosquitto_pub -l -q 1 -M {params.inflight}` "
      "process with its own certificate (client id = device id) over TLS; one `mosquitto_sub -q 1 -t '#'` on the "
      "upstream counts distinct payloads and stamps arrivals (`-F '%U %p'`).")
    w("")
    if params.gateway_overrides:
        w("Gateway configuration overrides (`--set`): " + ", ".join(
            f"`{sec}.{k} = {v!r}`" for sec, kv in params.gateway_overrides.items() for k, v in kv.items()) + ".")
        w("")
    measured = flows + sweeps
    loads = [x for f in measured for x in (f.other_loads or [f.other_load_pct]) if x == x]
    if loads:
        worst = max(loads)
        w(f"Other load: processes outside the benchmark used {_f(min(loads))}-{_f(worst)}% of the CPUs during the "
          f"measured runs (busy time in /proc/stat minus the CPU time of this run's own processes)." + (" **The machine was shared: expect lower and noisier figures; the "
                                              "ratios hold better.**" if worst > 10 else ""))
        w("")
    w("### Throughput and cost per message")
    w("")
    w("| scenario | delivered | dup | device-side s | device-side msg/s | end-to-end s | end-to-end msg/s | "
      "upstream arrival msg/s | edge CPU us/msg | upstream CPU us/msg | generator CPU us/msg | "
      "machine CPU busy % | edge RSS before / after / peak MB | status |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for f in flows:
        rss = "n/a" if f.edge_rss_before_kb is None else \
            f"{_mb(f.edge_rss_before_kb)} / {_mb(f.edge_rss_after_kb)} / {_mb(f.edge_hwm_kb)}"
        status = "ok" if f.ok else "FAILED"
        w(f"| {f.key}. {f.title} | {f.delivered:,}/{f.expected:,} | {f.duplicates} | {_f(f.device_s, 2)} | "
          f"{_f(f.device_rate)} | {_f(f.e2e_s, 2)} | {_f(f.e2e_rate)} | {_f(f.steady_rate)} | "
          f"{_f(f.edge_cpu_us, 1)} | {_f(f.upstream_cpu_us, 1)} | {_f(f.gen_cpu_us, 1)} | {_f(f.machine_busy_pct)} | "
          f"{rss} | {status} |")
    w("")
    if any(len(f.runs) > 1 for f in flows):
        keys = [f.key for f in flows]
        w(f"Each of {', '.join(keys[:-1])} and {keys[-1]} ran {params.repeat} times, interleaved "
          f"({' '.join(keys)} {' '.join(keys)} ...); the table shows the run with "
          "the median device-side rate. Every run, device-side / end-to-end msg/s (edge CPU us/msg; other load %): "
          + "; ".join(f"**{f.key}** " + ", ".join(
              f"{_f(d)} / {_f(e)} (" + (f"{_f(c, 0)} us; " if c else "") + f"{_f(o)}%)"
              for (d, e, c), o in zip(f.runs, f.other_loads, strict=False)) for f in flows) + ".")
        w("")
    b, c, a = by.get("B"), by.get("C"), by.get("A")
    if b and c and b.ok and c.ok:
        w("Ratios (edgegw B / mosquitto bridge C):")
        w("")
        w(f"- device-side throughput: **{b.device_rate / c.device_rate:.2f}x** "
          f"({_f(b.device_rate)} vs {_f(c.device_rate)} msg/s)")
        w(f"- end-to-end throughput: **{b.e2e_rate / c.e2e_rate:.2f}x** ({_f(b.e2e_rate)} vs {_f(c.e2e_rate)} msg/s)")
        if b.edge_cpu_us and c.edge_cpu_us:
            w(f"- edge CPU per message: **{b.edge_cpu_us / c.edge_cpu_us:.1f}x** "
              f"({_f(b.edge_cpu_us, 1)} vs {_f(c.edge_cpu_us, 1)} us)")
        if a and a.ok:
            w(f"- edgegw device-side throughput vs the generator's ceiling (A): {b.device_rate / a.device_rate:.2f}x")
        w("")
    e = by.get("E")
    if e and c and e.ok and c.ok:
        w(f"With the uplink in batch frames (E: `uplink.batch_max_records = {E_BATCH_RECORDS}`, an option the cloud "
          "side must decode; B is the default, one upstream message per record) / mosquitto bridge C:")
        w("")
        w(f"- device-side throughput: **{e.device_rate / c.device_rate:.2f}x** "
          f"({_f(e.device_rate)} vs {_f(c.device_rate)} msg/s)")
        w(f"- end-to-end throughput: **{e.e2e_rate / c.e2e_rate:.2f}x** ({_f(e.e2e_rate)} vs {_f(c.e2e_rate)} msg/s)")
        if e.edge_cpu_us and c.edge_cpu_us:
            w(f"- edge CPU per message: **{e.edge_cpu_us / c.edge_cpu_us:.1f}x** "
              f"({_f(e.edge_cpu_us, 1)} vs {_f(c.edge_cpu_us, 1)} us); upstream CPU per message "
              f"{_f(e.upstream_cpu_us, 1)} vs {_f(c.upstream_cpu_us, 1)} us")
        w("")
    if b and b.ok and b.main_thread_cpu_us is not None:
        w(f"edgegw's event-loop thread alone: {_f(b.main_thread_cpu_us, 1)} us/msg of the {_f(b.edge_cpu_us, 1)}; "
          f"of the end-to-end time it was running {_f(b.main_thread_busy_pct)}% and runnable but waiting for a CPU "
          f"{_f(b.main_thread_runq_pct)}% (/proc/PID/task/PID/stat and schedstat); the rest of the CPU is the SQLite "
          "worker threads.")
        w("")
    w("Columns: *device-side* = from spawning the devices until the last `mosquitto_pub` exited; it exits only after "
      "the PUBACK of its last message (checked below), so this is acknowledged throughput (with ~0.1 s of process "
      "start and connection set-up included). *end-to-end* = from spawning the devices until the upstream subscriber "
      "received the last distinct message. *upstream arrival* = rate between the first and last arrival at the "
      "subscriber (no start-up). *edge CPU* = utime+stime of the gateway (B, E) or edge mosquitto (C) from /proc/PID/stat "
      "over the run, divided by the messages (B, E: until the outbox is empty again, deletes included). *generator CPU* "
      "= all mosquitto_pub processes (wait4 rusage). *machine CPU busy* = all CPUs, /proc/stat, from the devices' "
      "start to the last delivery (100% = every CPU busy). RSS from /proc/PID/status (VmRSS, peak = VmHWM).")
    w("")
    w("**Not like for like.** edgegw acknowledges a device's PUBLISH only after the record is committed to SQLite with "
      "`synchronous=FULL` (one fsync per group commit) and deletes it only after the upstream's PUBACK. mosquitto's "
      "bridge (C, `persistence true`) acknowledges on receipt and keeps the queue in memory; persistence is a periodic "
      "snapshot (`autosave_interval`, 1800 s by default), so a power cut loses what was acknowledged since. The ratios "
      "compare a durable path with a non-durable one.")
    w("")
    gen_ok = "yes" if gen_check.get("ok") else "NO"
    w(f"Generator check (`mosquitto_pub -l -q 1` against a scripted MQTT server that withholds the last PUBACK): "
      f"still running while it is withheld: {gen_check.get('still_running_while_puback_withheld')}; exit code "
      f"{gen_check.get('exit_code')} {gen_check.get('exit_after_last_puback_s')} s after it is sent; DISCONNECT only "
      f"after it: {gen_check.get('disconnect_after_last_puback')} -> exit means every message was PUBACKed "
      f"(PUBACKs are in order, MQTT-4.6.0-2): **{gen_ok}**.")
    w("")
    w(f"### Idle connections ({params.idle:,} mTLS MQTT 3.1.1 connections, keep-alive 300 s, one certificate each)")
    w("")
    w("| server | connected | connect time s | RSS before MB | RSS after MB | per connection KB | peak RSS MB | "
      f"idle CPU % over {params.idle_window:.0f} s | status |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in idles:
        w(f"| {r.title} | {r.connected:,}/{r.count:,} | {_f(r.connect_s, 2)} | {_mb(r.rss_before_kb)} | "
          f"{_mb(r.rss_after_kb)} | {_f(r.per_conn_kb, 1)} | {_mb(r.hwm_kb)} | {_f(r.idle_cpu_pct, 2)} | "
          f"{'ok' if r.ok else 'FAILED'} |")
    w("")
    if len(idles) == 2 and all(r.ok for r in idles) and idles[1].per_conn_kb > 0:
        w(f"Memory per idle connection, edgegw / mosquitto: **{idles[0].per_conn_kb / idles[1].per_conn_kb:.1f}x**. "
          "The idle client (`bench/idle_clients.py`, one asyncio process, 50 handshakes at a time) is not counted.")
        w("")
    if sweeps:
        w("### Sensitivity to the devices' in-flight window (`mosquitto_pub -M`)")
        w("")
        w("| scenario | -M | messages | device-side msg/s | end-to-end msg/s | edge CPU us/msg | "
          "mean PUBACK round trip ms | status |")
        w("|---|---:|---:|---:|---:|---:|---:|---|")
        rows = sorted([f for f in flows if f.key in "BC"] + sweeps, key=lambda f: (f.key, f.inflight))
        for f in rows:
            rtt = params.devices * f.inflight / f.device_rate * 1e3 if f.inflight == 1 and f.gen else None
            w(f"| {f.key}. {'edgegw' if f.key == 'B' else 'mosquitto bridge'} | {f.inflight} | "
              f"{f.expected:,} | {_f(f.device_rate)} | {_f(f.e2e_rate)} | {_f(f.edge_cpu_us, 1)} | "
              f"{_f(rtt, 2) if rtt else ''} | {'ok' if f.ok else 'FAILED'} |")
        w("")
        w("At `-M 1` every device waits for each PUBACK, so devices / rate is the mean time from PUBLISH to PUBACK "
          "(including the client's own turn-around). For edgegw that is the group-commit cycle.")
        w("")
    problems = [f for f in flows + sweeps if not f.ok] + [r for r in idles if not r.ok]
    notes = [(f.key, n) for f in flows + sweeps for n in f.notes]
    if problems or notes:
        w("### Problems")
        w("")
        for f in flows + sweeps:
            if not f.ok:
                w(f"- {f.key} (-M {f.inflight}): {(f.error or 'lost messages').splitlines()[0]}")
        for r in idles:
            if not r.ok:
                w(f"- D {r.title}: {(r.error or 'not all connected').splitlines()[0]}")
        for key, n in notes:
            w(f"- {key}: {n}")
        w("")
    return "\n".join(out)


def render_profile(summary: dict[str, Any], command: str, params: Params, run: FlowResult) -> str:
    total = summary["total"] or 1
    out = [f"_Scenario B once more ({params.devices} x {params.messages:,} messages, `-M {params.inflight}`) with "
           f"py-spy sampling the gateway process (`{command}`, started by the same `bench/run.py`). "
           f"{summary['total']:,} samples of running threads (all "
           f"threads; {summary['waiting']:,} more samples of threads blocked in a queue get or epoll, which py-spy "
           "counted as active on this loaded machine, are left out). The time in C (OpenSSL, SQLite, fsync) is "
           "charged to the Python function that called it; the *hottest line* column says which call._", "",
           "Top 10 by self time:", "",
           "| # | function (file) | self % | hottest line |", "|---:|---|---:|---|"]
    for i, (name, n, line) in enumerate(summary["self"], 1):
        line = line if len(line) <= 70 else line[:67] + "..."
        out.append(f"| {i} | `{name}` | {n / total * 100:.1f} | `{line}` |")
    out += ["", "edgegw functions anywhere on the stack (inclusive):", "",
            "| function (file) | % |", "|---|---:|"]
    for name, n in summary["inclusive"]:
        out.append(f"| `{name}` | {n / total * 100:.1f} |")
    out += ["", "Per thread: share of the samples above, and CPU time from /proc/PID/task/TID/stat over the same run "
            f"({_f(run.e2e_s, 1)} s end to end, {run.expected:,} messages, {_f(run.edge_cpu_us, 1)} us/msg under "
            "py-spy):", "", "| thread | samples % | CPU s | CPU us/msg |", "|---|---:|---:|---:|"]
    for label, tid, n in summary["threads"]:
        cpu = run.thread_cpu_s.get(tid) if tid is not None else None
        out.append(f"| {label} | {n / total * 100:.0f} | {_f(cpu, 2)} | "
                   f"{_f(cpu / run.expected * 1e6 if cpu is not None else None, 1)} |")
    out += ["", "The aiosqlite thread started first is the outbox writer, the second the uplink's reader. Where a "
            "thread's samples exceed its CPU time, the difference is time it spent blocked but counted as running "
            "(waiting for the GIL after a SQLite call, or in fsync).", ""]
    return "\n".join(out)


def replace_section(text: str, begin: str, end: str, body: str) -> str:
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        return head + block + tail
    return text.rstrip() + "\n\n" + block + "\n"


# --- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (<= ~40 s)")
    parser.add_argument("--out", type=Path, help="Markdown file whose generated section to replace")
    parser.add_argument("--devices", type=int, help="devices (default 10)")
    parser.add_argument("--messages", type=int, help="messages per device (default 5000; --quick 300)")
    parser.add_argument("--idle", type=int, help="idle connections for D (default 1000; --quick 100)")
    parser.add_argument("--idle-window", type=float, help="seconds to measure idle CPU (default 10; --quick 1)")
    parser.add_argument("--inflight", type=int, default=20, help="mosquitto_pub -M (default 20, its own default)")
    parser.add_argument("--repeat", type=int, help="runs of A, B and C each, median reported (default 3; "
                        "--quick 1)")
    parser.add_argument("--upstream-inflight", type=int, default=0,
                        help="upstream mosquitto max_inflight_messages (its MQTT 5 Receive Maximum; default: "
                             "mosquitto's own, 20)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a gateway config key (TOML value), e.g. outbox.commit_window_ms=1; repeatable. "
                             "Shown in the report")
    parser.add_argument("--profile", dest="profile", action="store_true", default=None,
                        help="run B once more under py-spy (default: on in a full run if py-spy is installed)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--sweep", dest="sweep", action="store_true", default=None,
                        help="B and C again at mosquitto_pub -M 1 and -M 64 (default: on in a full run)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--src", type=Path, metavar="DIR",
                        help="run the edgegw package found in DIR (e.g. `git archive HEAD edgegw | tar -x -C DIR`) "
                             "instead of the installed one; the report names it")
    parser.add_argument("--src-label", default="", help="what DIR holds, for the report (e.g. a commit)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="on a shared machine: before each run wait up to S seconds for the CPUs to be < 15%% "
                             "busy (default 0: do not wait)")
    parser.add_argument("--workdir", type=Path, help="where PKI, outbox and logs go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--only", default=SCENARIOS, help=f"scenarios to run, e.g. B or BC (default {SCENARIOS}); a partial "
                        "run never writes --out")
    args = parser.parse_args(argv)

    quick = args.quick
    only = args.only.upper()
    partial = set(only) != set(SCENARIOS)
    profile = args.profile if args.profile is not None else (not quick and not partial and bool(py_spy()))
    sweep = args.sweep if args.sweep is not None else (not quick and not partial)
    if profile and not py_spy():
        parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            parser.error(f"--set wants SECTION.KEY=VALUE, got {item!r}")
        try:
            parsed: Any = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        overrides.setdefault(section, {})[name] = parsed
    params = Params(devices=args.devices or 10, messages=args.messages or (300 if quick else 5000),
                    idle=args.idle if args.idle is not None else (100 if quick else 1000),
                    idle_window=args.idle_window or (1.0 if quick else 10.0), inflight=args.inflight,
                    quick=quick, profile=profile, upstream_inflight=args.upstream_inflight,
                    repeat=max(1, args.repeat or (1 if quick else 3)), gateway_overrides=overrides,
                    wait_idle=args.wait_idle)
    exe = os.path.relpath(sys.executable, Path.cwd()) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = shlex.join([exe, os.path.relpath(__file__, Path.cwd()), *(argv if argv is not None else sys.argv[1:])])

    if args.src is not None:
        if not (args.src / "edgegw" / "__main__.py").is_file():
            parser.error(f"--src {args.src}: no edgegw package there")
        use_edgegw_source(args.src)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgegw-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    flows: list[FlowResult] = []
    idles: list[IdleResult] = []
    sweeps: list[FlowResult] = []
    gen_check: dict[str, Any] = {}
    prof_summary: dict[str, Any] | None = None
    prof_error = ""
    fsync_ms = (float("nan"), float("nan"))
    prof_run: FlowResult | None = None
    started = time.monotonic()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"edgegw bench: {params}, work dir {workdir}", file=sys.stderr, flush=True)
        gen_check = check_generator_semantics()
        fsync_ms = fsync_latency_ms(workdir)
        bench = Bench(procs, workdir, params)
        runs: dict[str, list[FlowResult]] = {}
        for i in range(params.repeat):  # interleaved, so drift on the machine spreads over all scenarios
            for key, title in (("A", "generator -> mosquitto (direct)"),
                               ("B", "generator -> edgegw (outbox FULL) -> mosquitto"),
                               ("C", "generator -> mosquitto bridge -> mosquitto"),
                               ("E", f"generator -> edgegw, uplink in frames of <= {E_BATCH_RECORDS} -> mosquitto")):
                if key not in only:
                    continue
                t = time.monotonic()
                f = bench.flow(key, title)
                runs.setdefault(key, []).append(f)
                print(f"  {key} run {i + 1}/{params.repeat}: {'ok' if f.ok else 'FAILED'} {f.delivered}/{f.expected} "
                      f"device-side {_f(f.device_rate)} msg/s, e2e {_f(f.e2e_rate)} msg/s "
                      f"({time.monotonic() - t:.1f} s)" + (f" error: {f.error.splitlines()[0]}" if f.error else ""),
                      file=sys.stderr, flush=True)
        for key, results in runs.items():
            flows.append(pick_median(results))
        for kind in ("edgegw", "mosquitto") if "D" in only else ():
            t = time.monotonic()
            idles.append(bench.idle(kind))
            r = idles[-1]
            print(f"  D {kind}: {'ok' if r.ok else 'FAILED'} {r.connected}/{r.count}, {_f(r.per_conn_kb, 1)} KB/conn "
                  f"({time.monotonic() - t:.1f} s)" + (f" error: {r.error.splitlines()[0]}" if r.error else ""),
                  file=sys.stderr, flush=True)
        if sweep:
            # The devices' in-flight window: at -M 1 each device waits for every PUBACK, so devices / rate is the
            # mean PUBACK round trip; at -M 64 (edgegw's receive_maximum) the ingress is less latency-bound.
            small = Generator(procs, workdir / "gen-small", bench.pki, bench.device_ids,
                              max(params.messages // 5, 100), inflight=1)
            for inflight, gen in ((1, small), (64, bench.generator)):
                for key, title in (("B", "edgegw"), ("C", "mosquitto bridge")):
                    t = time.monotonic()
                    sweeps.append(bench.flow(key, title, inflight=inflight, generator=gen))
                    f = sweeps[-1]
                    print(f"  {key} -M {inflight}: {'ok' if f.ok else 'FAILED'} device-side {_f(f.device_rate)} msg/s, "
                          f"e2e {_f(f.e2e_rate)} msg/s ({time.monotonic() - t:.1f} s)"
                          + (f" error: {f.error.splitlines()[0]}" if f.error else ""), file=sys.stderr, flush=True)
        if profile:
            raw = workdir / "profile-B.txt"
            t = time.monotonic()
            pf = bench.flow("B", "edgegw under py-spy", profile_out=raw)
            prof_run = pf
            if pf.ok and raw.exists():
                prof_summary = summarize_profile(raw)
            else:
                prof_error = pf.error or "no py-spy output"
            print(f"  profile: {'ok' if prof_summary else 'FAILED ' + prof_error} ({time.monotonic() - t:.1f} s)",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"edgegw bench: setup failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    seconds = time.monotonic() - started
    mach = machine()
    if args.src is not None:
        mach["commit"] = f"{args.src_label or 'a tree'} (`--src {args.src}`)"
    section = render(params, command, mach, workdir, fsync_ms, gen_check, flows, idles, sweeps, seconds)
    print(section)
    prof_section = None
    if prof_summary is not None and prof_run is not None:
        spy_cmd = f"py-spy {' '.join(PY_SPY_ARGS)} --pid GATEWAY_PID"
        prof_section = render_profile(prof_summary, spy_cmd, params, prof_run)
        print("\n### Profile\n")
        print(prof_section)
    elif profile:
        print(f"\nprofile failed: {prof_error}", file=sys.stderr)

    ok = bool(gen_check.get("ok")) and all(f.ok for f in flows + sweeps) and all(r.ok for r in idles) and \
        len(flows) + len(idles) == sum(k in only for k in "ABCE") + 2 * ("D" in only) and \
        (not profile or prof_summary is not None)
    if not ok:
        print("edgegw bench: FAILED (see Problems above); --out not written", file=sys.stderr)
        return 1
    if args.out and partial:
        print("edgegw bench: partial run (--only), --out not written", file=sys.stderr)
    elif args.out:
        text = args.out.read_text() if args.out.exists() else "# edgegw benchmarks\n"
        text = replace_section(text, BEGIN, END, section)
        if prof_section is not None:
            text = replace_section(text, PBEGIN, PEND, prof_section)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"edgegw bench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
