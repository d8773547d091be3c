"""``edgegw-sim run``: find the identities, split them over processes, run, check delivery, summarise.

With ``run.processes = 1`` the fleet runs in this process; with K > 1 each worker (:mod:`.worker`) gets every K-th
identity (the bad actors go to the first worker) and streams JSON lines back. The cloud sink, when configured,
runs here in the parent, so one subscription sees the whole fleet; ``lost`` is computed against the union of the
workers' acknowledged seqs. Merged ack-latency percentiles come from up to 5,000 samples per worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from edgegw.errors import ConfigError
from edgegw.sim.certs import DeviceIdentity, find_identities
from edgegw.sim.device import SeqSet
from edgegw.sim.runner import FleetRun, make_wrong_certs
from edgegw.sim.scenario import Scenario
from edgegw.sim.sink import CloudSink
from edgegw.sim.worker import identity_rows
from edgegw.tlsutil import client_ssl_context

_SUM = ("devices", "connected", "ever_connected", "sent", "acknowledged", "refused", "inflight", "backlog", "dropped",
        "resent", "reconnects", "connect_failures", "not_sent", "unacknowledged", "storms", "offline_cycles")


class StatusLine:
    """One line a second on ``stream``: rewritten in place on a terminal, appended otherwise; None: silent."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._tty = bool(stream is not None and stream.isatty())
        self._width = 0
        self._t0 = time.monotonic()

    def show(self, s: dict[str, Any], extra: str = "") -> None:
        """A fleet status (:meth:`FleetRun.status`)."""
        self.text(f"{s.get('phase', ''):<10} connected {s['connected']}/{s['devices']}  sent {s['sent']} "
                  f"({s['sent_rate']:g}/s)  acked {s['acknowledged']} ({s['ack_rate']:g}/s)  inflight "
                  f"{s['inflight']}  p50 {_fmt(s.get('p50_ms'))} ms  p99 {_fmt(s.get('p99_ms'))} ms{extra}")

    def text(self, body: str) -> None:
        if self._stream is None:
            return
        text = f"[{time.monotonic() - self._t0:6.1f}s] {body}"
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def end(self) -> None:
        if self._stream is not None and self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()


def split_identities(scenario: Scenario, found: list[DeviceIdentity]) -> tuple[list[DeviceIdentity],
                                                                               list[DeviceIdentity]]:
    """(well-behaved devices, identities for the bad actors): the bad ones are taken from the end."""
    wanted = scenario.devices.count or len(found)
    bad_n = scenario.bad_actors.with_identity
    if wanted + bad_n > len(found):
        raise ConfigError("devices.count", f"{wanted} devices + {bad_n} bad actors with a real identity need "
                                           f"{wanted + bad_n} identities, {scenario.devices.certs} has {len(found)}")
    if scenario.devices.count == 0:
        wanted = len(found) - bad_n
    if wanted < 1:
        raise ConfigError("devices.count", "no well-behaved device left after the bad actors took theirs")
    return found[:wanted], found[len(found) - bad_n:] if bad_n else []


async def simulate(scenario: Scenario, *, status: StatusLine,
                   on_acked: Callable[[dict[str, SeqSet]], None] | None = None) -> dict[str, Any]:
    """Run ``scenario``; returns the JSON summary. ``on_acked`` gets every device's acknowledged seqs."""
    s = scenario
    if s.devices.certs is None:
        raise ConfigError("devices.certs", "required: a folder of `edgegw pki batch` bundles or a PKI folder")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgegw-sim-"))
    try:
        return await _simulate(s, work, status, on_acked, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _simulate(s: Scenario, work: Path, status: StatusLine,
                    on_acked: Callable[[dict[str, SeqSet]], None] | None, started: float) -> dict[str, Any]:
    found = await asyncio.to_thread(find_identities, s.devices.certs, ca=s.devices.ca, unpack_dir=work / "bundles")
    good, bad = split_identities(s, found)
    wrong_dir = None
    if s.bad_actors.wrong_cert:
        wrong_dir = await asyncio.to_thread(make_wrong_certs, work / "rogue",
                                            [d.device_id for d in good[:s.bad_actors.wrong_cert]])
    sink = None
    if s.sink.port:
        assert s.sink.ca and s.sink.cert and s.sink.key
        sink = CloudSink(s.sink.host, s.sink.port, client_ssl_context(s.sink.ca, s.sink.cert, s.sink.key),
                         topic_prefix=s.sink.topic_prefix, client_id=s.sink.client_id, protocol=s.sink.protocol)
        await sink.start(timeout=10.0)
    try:
        extra = (lambda: f"  sink {sink.delivered}") if sink is not None else (lambda: "")
        if s.run.processes == 1:
            summary, acked = await _in_process(s, good, bad, wrong_dir, status, extra)
        else:
            summary, acked = await _in_workers(s, good, bad, wrong_dir, status, extra)
        if sink is not None:
            summary["sink"] = await _settle(sink, acked, s.sink.settle)
    finally:
        status.end()
        if sink is not None:
            sink.stop()
    if on_acked is not None:
        on_acked(acked)
    summary["processes"] = s.run.processes
    summary["protocol"] = s.devices.protocol
    summary["elapsed_s"] = round(time.monotonic() - started, 2)
    return summary


async def _in_process(s: Scenario, good: list[DeviceIdentity], bad: list[DeviceIdentity], wrong_dir: Path | None,
                      status: StatusLine, extra: Callable[[], str]) -> tuple[dict[str, Any], dict[str, SeqSet]]:
    run = FleetRun(s, good, bad_identities=bad, wrong_cert_dir=wrong_dir)
    summary = await run.run(on_status=lambda st: status.show(st, extra()))
    return summary, run.acked_seqs()


async def _in_workers(s: Scenario, good: list[DeviceIdentity], bad: list[DeviceIdentity], wrong_dir: Path | None,
                      status: StatusLine, extra: Callable[[], str]) -> tuple[dict[str, Any], dict[str, SeqSet]]:
    k = min(s.run.processes, len(good))
    victims = [d.device_id for d in good]
    jobs = [{"scenario": s.to_mapping(), "devices": identity_rows(good[i::k]),
             "bad": identity_rows(bad) if i == 0 else [], "wrong_cert_dir": str(wrong_dir) if wrong_dir and i == 0
             else None, "victims": victims} for i in range(k)]
    statuses: list[dict[str, Any] | None] = [None] * k
    results: list[dict[str, Any] | None] = [None] * k
    errors: list[str] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    async def one(i: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgegw.sim.cli", "worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, limit=64 * 1024 * 1024,
            preexec_fn=_die_with_parent)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(json.dumps(jobs[i]).encode())
        proc.stdin.close()
        err_task = asyncio.create_task(proc.stderr.read())
        try:
            while line := await proc.stdout.readline():
                msg = json.loads(line)
                if "status" in msg:
                    statuses[i] = msg["status"]
                else:
                    results[i] = msg
            code = await proc.wait()
            stderr = (await err_task).decode(errors="replace").strip()
            if code != 0 or results[i] is None:
                errors.append(f"worker {i} exited {code}: {stderr[-2000:]}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            err_task.cancel()

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            current = [st for st in statuses if st is not None]
            if current:
                status.show(_merge_status(current), extra())

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(one(i) for i in range(k)))
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    done = [r for r in results if r is not None]
    if not done:
        raise RuntimeError("; ".join(errors) or "no worker produced a summary")
    summary = _merge_summaries([r["summary"] for r in done], [x for r in done for x in r["latencies"]])
    if errors:
        summary["worker_errors"] = errors
    acked = {d: SeqSet.from_ranges(ranges) for r in done for d, ranges in r["acked"].items()}
    return summary, acked


def _die_with_parent() -> None:
    """In a worker before exec: the kernel SIGKILLs it when we die, even by SIGKILL (Linux PR_SET_PDEATHSIG), so an
    interrupted run leaves no devices behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the workers end with their run (bounded by run.seconds)
        pass


def _merge_status(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(i.get(k, 0) for i in items) for k in (*_SUM[:12], "sent_rate", "ack_rate")}
    out["sent_rate"], out["ack_rate"] = round(out["sent_rate"], 1), round(out["ack_rate"], 1)
    out["phase"] = items[0].get("phase", "")
    p50s = [i["p50_ms"] for i in items if i.get("p50_ms") is not None]
    p99s = [i["p99_ms"] for i in items if i.get("p99_ms") is not None]
    out["p50_ms"] = round(sum(p50s) / len(p50s), 1) if p50s else None  # mean of the workers' medians
    out["p99_ms"] = max(p99s) if p99s else None  # the worst worker's
    return out


def _merge_summaries(items: list[dict[str, Any]], latencies: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(i.get(k, 0) for i in items) for k in _SUM}
    out["all_acknowledged"] = all(i.get("all_acknowledged") for i in items)
    out["publish_seconds"] = max(i.get("publish_seconds", 0) for i in items)
    out["ack_rate_per_s"] = round(out["acknowledged"] / out["publish_seconds"], 1) if out["publish_seconds"] else None
    ordered = sorted(latencies)
    out["ack_latency_ms"] = {"p50": _pct_ms(ordered, 50), "p99": _pct_ms(ordered, 99),
                             "max": max((i["ack_latency_ms"]["max"] or 0 for i in items), default=None)}
    bad: dict[str, dict[str, int]] = {}
    for i in items:
        for kind, tally in i.get("bad_actors", {}).items():
            merged = bad.setdefault(kind, {})
            for outcome, n in tally.items():
                merged[outcome] = merged.get(outcome, 0) + n
    out["bad_actors"] = bad
    procs = [i["process"] for i in items if i.get("process")]
    if procs:
        out["process"] = {"rss_mb": round(sum(p["rss_mb"] for p in procs), 1),
                          "per_device_kb": round(sum(p["per_device_kb"] for p in procs) / len(procs), 1),
                          "cpu_s": round(sum(p["cpu_s"] for p in procs), 2),
                          "cpu_pct": round(sum(p["cpu_pct"] or 0 for p in procs), 1), "workers": procs}
    out["last_errors"] = sorted({e for i in items for e in i.get("last_errors", [])})[:5]
    return out


async def _settle(sink: CloudSink, acked: dict[str, SeqSet], stall: float) -> dict[str, object]:
    """Wait until the sink holds every acknowledged seq, or ``stall`` seconds pass without a new delivery."""
    loop = asyncio.get_running_loop()
    last, moved = sink.received, loop.time()
    while not sink.has_all(acked) and loop.time() - moved < stall:
        await asyncio.sleep(0.1)
        if sink.received != last:
            last, moved = sink.received, loop.time()
    await asyncio.sleep(0.3)  # stragglers: duplicates still in flight upstream count too
    return sink.report(acked)


def _pct_ms(ordered: list[float], p: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))] * 1000, 1)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"

