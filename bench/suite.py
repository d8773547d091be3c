"""The benchmark suite: every scenario of issue #9 from one command, results as JSON, plots as PNG.

    .venv/bin/python bench/suite.py [--smoke] [--only mqtt,idle,sim] [--out-dir docs/bench] [--results FILE]

Scenarios (each bounded in time; a failed one does not stop the others):

  mqtt         bench/run.py --only ABC: the generator against mosquitto alone (its ceiling), edgegw's durable
               path and a mosquitto bridge, same generator and upstream; throughput, edge CPU per message
  idle_cpu     bench/run.py --only D --idle 1000 --idle-window 30: 1,000 connected idle mTLS devices, the server's
               CPU % over 30 s (and RSS), edgegw vs mosquitto with the same clients
  sim          edgegw-sim, 1,000 mTLS devices at 1 msg/s each against a real gateway for 30 s: RSS and CPU of
               the simulator and the gateway, acknowledged rate, PUBACK and cloud-arrival latency, lost (must be 0)
  coap         CoAP over TLS: edgegw (answer after commit) vs a bare aiocoap server    -> bench/coap.py
  dtls         CoAP over DTLS vs plain CoAP/UDP, same resource                         -> bench/dtls_load.py
  drain        backlog drain after an upstream outage, end to end, with live latency,
               edgegw vs a mosquitto bridge (same generator, sink, proxy)              -> bench/drain.py
  backfill     the uplink alone: backlog drain rate, native vs paho client, with live  -> bench/uplink.py
  idle_memory  RSS per idle mTLS connection at 2,000 devices, edgegw vs mosquitto      -> bench/idle_memory.py

coap, dtls, backfill and idle_memory belong to other parts of the project; the suite runs them as they are and keeps the JSON-object lines
they print (a ``{"summary": ...}`` line becomes ``summary``) and their Markdown tables. A script that does not exist
(yet) is listed as "not available", not failed.

``--smoke`` shrinks everything to fit in about 30 s (CI: tests/test_bench_suite.py). The results go to
``--results`` (default OUT_DIR/results.json; smoke: only when asked) and the plots to ``--out-dir``
(docs/bench by default); docs/BENCHMARKS.md embeds them. Exit status 1 when a scenario that ran failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from plots import write_plots  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    smoke: bool
    sim_devices: int
    sim_seconds: float
    idle: int
    idle_window: float

    @classmethod
    def pick(cls, smoke: bool) -> Sizes:
        return cls(smoke, 30, 2.0, 100, 3.0) if smoke else cls(smoke, 1000, 30.0, 1000, 30.0)


class Unavailable(Exception):
    """The scenario's script or prerequisite does not exist (yet)."""


Scenario = Callable[[Sizes, Path], dict[str, Any]]


# --- bench/run.py: tables -> dicts ------------------------------------------------------------------------------


def parse_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text`` as a list of {header: cell} rows."""
    tables: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables.append([])
        elif all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        else:
            tables[-1].append(dict(zip(header, cells, strict=False)))
    return tables


def number(cell: str | None) -> float | None:
    """``"5,283"`` -> 5283.0; ``"n/a"``, ``""`` -> None; ``"48.7 / 49.8 / 49.8"`` -> 48.7 (the first)."""
    if not cell:
        return None
    match = re.match(r"-?[\d,]+(?:\.\d+)?", cell.strip())
    return float(match.group().replace(",", "")) if match else None


def run_bench(args: list[str], timeout: float) -> str:
    proc = subprocess.run([sys.executable, str(HERE / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/run.py {' '.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return proc.stdout


def scenario_mqtt(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    # Smoke: 10 devices x 100 messages, enough to check every row is delivered and parsed (figures are not used).
    args = ["--only", "ABC", *(["--quick", "--messages", "100"] if sizes.smoke else ["--no-profile", "--no-sweep"])]
    out = run_bench(args, timeout=120 if sizes.smoke else 900)
    rows: dict[str, dict[str, Any]] = {}
    for table in parse_tables(out):
        for row in table:
            key = row.get("scenario", "")[:1]
            if key in "ABC" and row.get("scenario", "")[1:2] == ".":
                rows[key] = {k: number(v) if k not in ("scenario", "status", "delivered") else v
                             for k, v in row.items()}
    if not {"A", "B"} <= set(rows):
        raise RuntimeError(f"bench/run.py printed no A/B rows:\n{out[-1500:]}")
    ratios = {}
    b, c, a = rows.get("B", {}), rows.get("C", {}), rows.get("A", {})
    for name, col in (("device_side_throughput", "device-side msg/s"), ("end_to_end_throughput", "end-to-end msg/s"),
                      ("edge_cpu_per_message", "edge CPU us/msg")):
        if b.get(col) and c.get(col):
            ratios[f"edgegw_vs_bridge_{name}"] = round(b[col] / c[col], 3)
    if b.get("device-side msg/s") and a.get("device-side msg/s"):
        ratios["edgegw_vs_generator_ceiling"] = round(b["device-side msg/s"] / a["device-side msg/s"], 3)
    return {"rows": rows, "ratios": ratios, "generator_ceiling_msg_s": a.get("device-side msg/s"),
            "command": shlex.join(["bench/run.py", *args])}


def scenario_idle_cpu(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """The same clients hold ``sizes.idle`` connections to edgegw, then to mosquitto; /proc CPU of the server over
    ``sizes.idle_window`` s (at 100 ticks/s, 30 s resolve 0.03 %)."""
    args = ["--only", "D", "--idle", str(sizes.idle), "--idle-window", f"{sizes.idle_window:g}",
            *(["--quick"] if sizes.smoke else [])]
    out = run_bench(args, timeout=120 if sizes.smoke else 600)
    rows: dict[str, dict[str, Any]] = {}
    for table in parse_tables(out):
        for row in table:
            if "server" in row and "per connection KB" in row:
                rows[row["server"]] = {k: number(v) for k, v in row.items() if k not in ("server", "status")}
    if not rows:
        raise RuntimeError(f"bench/run.py printed no idle-connection table:\n{out[-1500:]}")
    ratios: dict[str, float | None] = {}
    for key, prefix in (("edgegw_vs_mosquitto_kb_per_connection", "per connection KB"),
                        ("edgegw_vs_mosquitto_idle_cpu", "idle CPU")):
        values = [next((x for k, x in v.items() if k.startswith(prefix)), None) for v in rows.values()]
        ratios[key] = round(values[0] / values[1], 2) if len(values) == 2 and values[0] is not None and \
            values[1] else None
    return {"rows": rows, "connections": sizes.idle, "window_s": sizes.idle_window, "ratios": ratios,
            "command": shlex.join(["bench/run.py", *args])}


def scenario_sim(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """edgegw-sim (its own process) -> edgegw run -> mosquitto; the simulator measures itself (summary
    ``process``), we sample the gateway's /proc over the same run."""
    import harness

    procs = harness.Procs()
    try:
        ids = [f"sim-{i:04d}" for i in range(sizes.sim_devices)]
        pki = harness.make_pki(workdir / "pki", ids)
        upstream = harness.Mosquitto(procs, workdir / "upstream", cafile=pki.bundle,
                                     server=pki.broker_server).start()
        gateway = harness.Gateway(procs, workdir / "gateway", pki, upstream).start()
        sink = pki.client("sink")
        interval = 1.0
        cmd = [sys.executable, "-m", "edgegw.sim", "run", "--certs", str(pki.fleet), "--host", harness.HOST,
               "--port", str(gateway.port), "--devices", str(sizes.sim_devices), "--seconds",
               str(sizes.sim_seconds), "--interval", str(interval), "--sink-port", str(upstream.port),
               "--sink-ca", str(pki.cloud_ca), "--sink-cert", str(sink.cert), "--sink-key", str(sink.key),
               "--sink-prefix", "cloud", "--json", "--quiet"]
        cpu0, t0 = harness.cpu_seconds(gateway.pid), time.monotonic()
        rss0 = harness.memory_kb(gateway.pid).get("VmRSS", 0)
        proc = procs.spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)  # stderr: ours
        rss_peak = 0
        deadline = time.monotonic() + sizes.sim_seconds + 180
        while proc.poll() is None and time.monotonic() < deadline:
            rss_peak = max(rss_peak, harness.memory_kb(gateway.pid).get("VmRSS", 0))
            time.sleep(0.5)
        if proc.poll() is None:
            raise RuntimeError("edgegw-sim did not finish in time")
        gw_cpu = harness.cpu_seconds(gateway.pid) - cpu0
        elapsed = time.monotonic() - t0
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        if not out.strip():
            raise RuntimeError(f"edgegw-sim exited {proc.returncode} without a summary: "
                               "see its stderr above")
        summary = json.loads(out)
        if proc.returncode != 0:
            raise RuntimeError(f"edgegw-sim exited {proc.returncode}: {json.dumps(summary)[:1500]}")
        return {"devices": sizes.sim_devices, "seconds": sizes.sim_seconds, "interval_s": interval,
                "command": shlex.join(["edgegw-sim", *cmd[3:]]).replace(str(workdir), "$WORK"), "sim": summary,
                "gateway_rss_before_mb": round(rss0 / 1024, 1), "gateway_rss_mb": round(rss_peak / 1024, 1),
                "gateway_per_device_kb": round((rss_peak - rss0) / sizes.sim_devices, 1),
                "gateway_cpu_pct": round(100 * gw_cpu / elapsed, 1), "lost": summary.get("sink", {}).get("lost")}
    finally:
        procs.close()


@dataclass(frozen=True)
class External:
    """A scenario script another engineer owns, run as it is: its JSON-object stdout lines and its Markdown
    tables become the results (``summary``: the ``{"summary": ...}`` line, if any). ``smoke_args`` None: the
    script is too long for the smoke run and is skipped there."""

    script: str
    args: tuple[str, ...]
    smoke_args: tuple[str, ...] | None
    timeout: float = 600.0

    def __call__(self, sizes: Sizes, workdir: Path) -> dict[str, Any]:
        path = HERE / self.script
        if not path.is_file():
            raise Unavailable(f"bench/{self.script} does not exist yet")
        args = self.smoke_args if sizes.smoke else self.args
        if args is None:
            raise Unavailable(f"bench/{self.script} is not part of the smoke run")
        proc = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120 if sizes.smoke else self.timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/{self.script} exited {proc.returncode}: {proc.stderr[-1500:]}")
        objects = []
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    objects.append(value)
        tables = parse_tables(proc.stdout)
        if not objects and not tables:
            raise RuntimeError(f"bench/{self.script} printed neither JSON lines nor a table: {proc.stdout[-800:]}")
        summary = next((o["summary"] for o in reversed(objects) if isinstance(o.get("summary"), dict)), None)
        return {"command": shlex.join([f"bench/{self.script}", *args]), "summary": summary,
                "lines": [o for o in objects if "summary" not in o], "tables": tables}


SCENARIOS: dict[str, Scenario] = {
    "mqtt": scenario_mqtt,
    "idle_cpu": scenario_idle_cpu,
    "sim": scenario_sim,
    # The CoAP, uplink and TLS-memory engineers' scripts, with their own flags.
    # Smoke: coaps+tcp only (the DTLS rounds would take the smoke past 30 s; the full run has them).
    "coap": External("coap.py", (), ("--seconds", "1", "--rounds", "1", "--connections", "2", "--no-dtls")),
    "dtls": External("dtls_load.py", (), None),
    "drain": External("drain.py", (), None),
    "backfill": External("uplink.py", (), ("--records", "2000", "--clients", "native", "--batch", "100")),
    "idle_memory": External("idle_memory.py", ("--connections", "2000"), None),
}
SMOKE = ("mqtt", "sim", "coap", "backfill")  # ~25 s on 2 idle CPUs; dtls and the idle scenarios: full run only


@dataclass(frozen=True)
class Load:
    """How busy the CPUs were during a scenario, and how much of that was not the suite: /proc/stat busy time
    minus the CPU of this process and its waited-for descendants (every scenario's processes are reaped)."""

    busy: float
    total: float
    own: float
    wall: float

    @classmethod
    def start(cls) -> Load:
        busy, total = _proc_stat()
        times = os.times()
        return cls(busy, total, times.user + times.system + times.children_user + times.children_system,
                   time.monotonic())

    def stop(self) -> tuple[int | None, int | None]:
        """(all CPUs busy %, other work %) since start()."""
        busy, total = _proc_stat()
        if total <= self.total:
            return None, None
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system - self.own
        tick = os.sysconf("SC_CLK_TCK")
        cpus = os.cpu_count() or 1
        busy_pct = 100 * (busy - self.busy) / (total - self.total)
        other = (busy - self.busy) / tick - own
        return round(busy_pct), max(0, round(100 * other / (cpus * (time.monotonic() - self.wall))))


def _proc_stat() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs; busy excludes idle and iowait."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def machine() -> dict[str, Any]:
    mem_kb = 0
    try:
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal:")))
    except (OSError, StopIteration):
        pass
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    os_name = ""
    try:
        os_name = next((line.split("=", 1)[1].strip().strip('"') for line in
                        Path("/etc/os-release").read_text().splitlines() if line.startswith("PRETTY_NAME=")), "")
    except OSError:
        pass
    mosquitto = ""
    try:  # "mosquitto version 2.0.11" is the first line of its help (it exits 3)
        help_text = subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"], check=False,
                                   capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL).stdout
        mosquitto = help_text.splitlines()[0].removeprefix("mosquitto version ").strip() if help_text else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem_kb / 1024 / 1024, 1),
            "os": os_name, "kernel": platform.release(), "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION, "sqlite": sqlite3.sqlite_version, "mosquitto": mosquitto or "not found",
            "machine": platform.machine()}


def describe(m: dict[str, Any]) -> str:
    """One line: what the figures were measured on (printed first, and at the top of the Markdown)."""
    return (f"{m['cpus']} CPUs ({m['cpu_model'] or m.get('machine', '?')}), {m['ram_gib']} GiB RAM, "
            f"{m.get('os') or 'Linux'} (Linux {m['kernel']}), Python {m['python']}, {m.get('openssl', '?')}, "
            f"SQLite {m.get('sqlite', '?')}, mosquitto {m.get('mosquitto', '?')}")


# --- docs/BENCHMARKS.md ----------------------------------------------------------------------------------------

MD_BEGIN, MD_END = "<!-- bench:suite:begin -->", "<!-- bench:suite:end -->"


def render_markdown(results: dict[str, Any], doc_dir: Path) -> str:
    """The generated section of docs/BENCHMARKS.md: machine, one table of headline figures, the plots."""
    m = results["machine"]
    lines = [(f"_Generated by `.venv/bin/python bench/suite.py` (each row says when it ran; the last run: "
              f"`{results['command']}`)._"), "",
             (f"Machine: {describe(m)}. Every process of a scenario shares these CPUs (and, on a shared machine, "
              "other work does too: trust the ratios)."), "",
             ("| scenario | when | status | edgegw vs its comparison | headline figures | s | CPUs busy before % | "
              "CPUs busy during % (other work) |"),
             "|---|---|---|---|---|---:|---:|---:|"]
    for name, entry in results["scenarios"].items():
        detail, ratio = entry.get("reason") or entry.get("error", "")[:200], ""
        if entry["status"] == "ok":
            detail, ratio = _headline(name, entry["results"]), _ratio(name, entry["results"])
        lines.append(f"| {name} | {entry.get('generated', results['generated'])} | {entry['status']} | "
                     f"{ratio.replace('|', '/')} | {detail.replace('|', '/')} | {entry['seconds']:g} | "
                     f"{entry.get('cpus_busy_before_pct', '')} | {_during(entry)} |")
    for name in SCENARIOS:
        if name not in results["scenarios"]:
            lines.append(f"| {name} | | not run yet | | `bench/suite.py --only {name}` | | | |")
    commands = [entry["results"]["command"] for entry in results["scenarios"].values()
                if entry["status"] == "ok" and "command" in entry.get("results", {})]
    if commands:
        lines += ["", "Commands the suite ran (`$WORK`: its temporary folder; ports are free ones): "
                  + "; ".join(f"`{c}`" for c in commands) + "."]
    for plot in results.get("plots", []):
        path = ROOT / plot
        lines += ["", f"![{path.stem}]({os.path.relpath(path, doc_dir)})"]
    return "\n".join(lines)


def _headline(name: str, r: dict[str, Any]) -> str:
    def f(v: Any, unit: str = "") -> str:
        return "n/a" if v is None else (f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:g}{unit}")

    if name == "mqtt":
        rows, ratios = r["rows"], r["ratios"]
        return (f"device-side msg/s: generator alone {f(rows.get('A', {}).get('device-side msg/s'))}, edgegw "
                f"{f(rows.get('B', {}).get('device-side msg/s'))}, mosquitto bridge "
                f"{f(rows.get('C', {}).get('device-side msg/s'))}; edge CPU us/msg edgegw "
                f"{f(rows.get('B', {}).get('edge CPU us/msg'))} vs bridge {f(rows.get('C', {}).get('edge CPU us/msg'))}"
                f"; edgegw/bridge throughput {ratios.get('edgegw_vs_bridge_device_side_throughput')}x")
    if name == "idle_cpu":
        window = r.get("window_s", 10)
        parts = []
        for server, v in r["rows"].items():
            pct = next((x for k, x in v.items() if k.startswith("idle CPU")), None)
            cpu_ms = "" if pct is None else f" ({pct / 100 * window * 1000:,.0f} ms of CPU)"
            parts.append(f"{server}: idle CPU {f(pct)} %{cpu_ms}, {f(v.get('per connection KB'))} KB per connection")
        return "; ".join(parts) + (f" ({r['connections']:,} connected devices, CPU over {window:g} s; /proc ticks "
                                   f"of {1000 // os.sysconf('SC_CLK_TCK')} ms)")
    if name == "drain":
        lines = {line.get("edge"): line for line in r.get("lines", [])}
        return "; ".join(
            f"{'edgegw' if edge == 'edgegw' else 'mosquitto bridge'}: {f(v.get('drain_msg_s'))} msg/s drained "
            f"({v.get('backlog', 0):,} backlog, back {v.get('reconnect_s')} s after the restore), live p50/p99 "
            f"{v.get('live_p50_ms')}/{v.get('live_p99_ms')} ms, {v.get('edge_cpu_us_per_msg')} us CPU/msg, lost "
            f"{v.get('lost')} (live {v.get('live_lost')})" if "error" not in v else f"{edge}: {v['error'][:150]}"
            for edge, v in lines.items())
    if name == "sim":
        s, p = r["sim"], r["sim"].get("process", {})
        return (f"{r['devices']:,} devices: simulator {f(p.get('rss_mb'))} MB RSS ({f(p.get('per_device_kb'))} KB "
                f"per device), {f(p.get('cpu_pct'))} % CPU; gateway {f(r['gateway_rss_mb'])} MB "
                f"({f(r['gateway_per_device_kb'])} KB per device), {f(r['gateway_cpu_pct'])} % CPU; "
                f"{f(s.get('ack_rate_per_s'))} msg/s acknowledged, PUBACK p50/p99 {s['ack_latency_ms']['p50']}/"
                f"{s['ack_latency_ms']['p99']} ms; lost {r['lost']}")
    summary = r.get("summary")
    if summary:
        return ", ".join(f"{k} {v}" for k, v in summary.items() if not isinstance(v, dict | list))
    if r.get("lines"):
        return "; ".join(", ".join(f"{k} {v}" for k, v in line.items() if not isinstance(v, dict | list))
                         for line in r["lines"][:4])
    rows = [row for table in r.get("tables", []) for row in table][:4]
    return "; ".join(", ".join(f"{k} {v}" for k, v in row.items() if v) for row in rows)


def _during(entry: dict[str, Any]) -> str:
    if entry.get("cpus_busy_pct") is None:
        return ""
    return f"{entry['cpus_busy_pct']} ({entry.get('other_load_pct')})"


def _x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"**{value:.2f}x**" if value >= 0.1 else f"**{value:.2g}x**"  # 0.017x, not 0.02x


def _ratio(name: str, r: dict[str, Any]) -> str:
    """The scenario's edgegw / comparison ratios, in words (the headline column has the figures)."""
    ratios = r.get("ratios") or {}
    summary = r.get("summary") or {}
    if name == "mqtt":
        return (f"throughput / mosquitto bridge {_x(ratios.get('edgegw_vs_bridge_device_side_throughput'))} "
                f"device-side, {_x(ratios.get('edgegw_vs_bridge_end_to_end_throughput'))} end to end; CPU per "
                f"message {_x(ratios.get('edgegw_vs_bridge_edge_cpu_per_message'))}; edgegw / generator ceiling "
                f"{_x(ratios.get('edgegw_vs_generator_ceiling'))}")
    if name == "idle_cpu":
        return (f"idle CPU / mosquitto {_x(ratios.get('edgegw_vs_mosquitto_idle_cpu'))}, RSS per connection "
                f"{_x(ratios.get('edgegw_vs_mosquitto_kb_per_connection'))}")
    if name == "idle_memory":
        kb = [number(str(row.get("per connection KB", "")).strip("*")) for t in r.get("tables", []) for row in t]
        return f"RSS per connection / mosquitto {_x(kb[0] / kb[1] if len(kb) == 2 and kb[0] and kb[1] else None)}"
    if name == "coap":
        text = f"coaps+tcp requests/s / bare aiocoap {_x(summary.get('ratio_median'))} (median of rounds)"
        if summary.get("dtls_ratio_median") is not None:
            text += f"; DTLS / bare aiocoap over UDP {_x(summary['dtls_ratio_median'])}"
        return text
    if name == "drain":
        return (f"drain rate / mosquitto bridge {_x(summary.get('ratio_drain'))}; live p99 "
                f"{_x(summary.get('ratio_live_p99'))}")
    if name == "dtls":
        modes = {line.get("mode"): line for line in r.get("lines", [])}
        d, u = modes.get("dtls", {}).get("rps"), modes.get("plain", {}).get("rps")
        return f"DTLS / plain CoAP requests/s {_x(d / u if d and u else None)}"
    if name == "backfill":
        n, q = summary.get("native batch 1: records/s"), summary.get("paho batch 1: records/s")
        return f"drain, native client / paho (batch 1) {_x(n / q if n and q else None)}"
    if name == "sim":
        return "capacity check (no comparison): 1,000 mTLS devices in one simulator process"
    return ""


def replace_section(text: str, body: str) -> str:
    """Replace what is between the suite's markers (appended at the end when they are missing)."""
    if MD_BEGIN in text and MD_END in text:
        head, rest = text.split(MD_BEGIN, 1)
        return f"{head}{MD_BEGIN}\n{body}\n{MD_END}{rest.split(MD_END, 1)[1]}"
    return f"{text.rstrip()}\n\n{MD_BEGIN}\n{body}\n{MD_END}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small sizes, about 30 s (CI)")
    parser.add_argument("--only", help=f"comma-separated scenarios (of {', '.join(SCENARIOS)})")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "bench", help="PNG plots go here")
    parser.add_argument("--results", type=Path, help="results JSON (default OUT_DIR/results.json; --smoke: none)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--md", type=Path, help="write the headline table and plots between the suite's markers of "
                                                "this file (e.g. docs/BENCHMARKS.md); never with --smoke")
    parser.add_argument("--replot", action="store_true", help="run nothing: redraw the plots (and --md) from the "
                                                              "results file")
    parser.add_argument("--fresh", action="store_true", help="do not keep the scenarios of an earlier results "
                                                             "file that this run did not repeat")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (PKI, logs)")
    parser.add_argument("--sim-devices", type=int, metavar="N", help="devices of the sim scenario (default 1,000)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="on a shared machine: before each scenario wait up to S s for the CPUs to be < 15%% busy")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SMOKE if args.smoke else SCENARIOS)
    if args.replot:
        names = []
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    sizes = Sizes.pick(args.smoke)
    if args.sim_devices:
        sizes = dataclasses.replace(sizes, sim_devices=args.sim_devices)
    workdir = Path(tempfile.mkdtemp(prefix="edgegw-suite-"))
    started = time.monotonic()
    results: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.smoke,
        "command": shlex.join(["bench/suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "scenarios": {}}
    print(f"  machine: {describe(results['machine'])}", file=sys.stderr, flush=True)
    failed = False
    try:
        for name in names:
            entry: dict[str, Any]
            busy = None
            if args.wait_idle > 0:
                import harness

                busy = harness.wait_for_idle_machine(args.wait_idle)
                print(f"  {name:<9} starting with the CPUs {busy:.0f}% busy", file=sys.stderr, flush=True)
            t = time.monotonic()
            load = Load.start()
            try:
                (workdir / name).mkdir()
                entry = {"status": "ok", "results": SCENARIOS[name](sizes, workdir / name)}
            except Unavailable as exc:
                entry = {"status": "not available", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one failed scenario must not hide the others' figures
                entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                failed = True
            entry["seconds"] = round(time.monotonic() - t, 1)
            entry["cpus_busy_pct"], entry["other_load_pct"] = load.stop()
            entry["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            if busy is not None:
                entry["cpus_busy_before_pct"] = round(busy)
            results["scenarios"][name] = entry
            print(f"  {name:<11} {entry['status']:<14} {entry['seconds']:6.1f} s  CPUs {entry['cpus_busy_pct']}% busy "
                  f"(other work {entry['other_load_pct']}%)  "
                  f"{entry.get('reason') or entry.get('error', '')[:300]}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    target = args.results or (None if args.smoke else args.out_dir / "results.json")
    if target is not None and target.exists() and not args.fresh and not args.smoke:
        # One scenario at a time is how a shared machine gets quiet-ish windows: keep what this run did not redo.
        try:
            before = json.loads(target.read_text())
        except (OSError, ValueError):
            before = {}
        earlier = before.get("scenarios", {})
        results["scenarios"] = {**{k: v for k, v in earlier.items() if k in SCENARIOS},
                                **results["scenarios"]}
        if args.replot:  # nothing ran: the header describes the run that made the figures
            results.update({k: before[k] for k in ("command", "generated", "machine", "seconds") if k in before})
    if not args.no_plots:
        files, why = write_plots(results, args.out_dir)
        results["plots"] = [os.path.relpath(f, ROOT) if f.is_relative_to(ROOT) else str(f) for f in files]
        if why:
            results["plots_note"] = why
            print(f"  plots: {why}", file=sys.stderr)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n")
    if args.md is not None and not args.smoke:
        text = args.md.read_text() if args.md.exists() else "# edgegw benchmarks\n"
        args.md.write_text(replace_section(text, render_markdown(results, args.md.resolve().parent)))
        print(f"  wrote {args.md}", file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
