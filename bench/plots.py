"""PNG plots of a bench/suite.py results object (matplotlib, Agg backend: no display needed).

Each plot is drawn only when its scenario produced figures; a missing scenario is a missing plot, not an error.
matplotlib is the optional ``bench`` extra (``.venv/bin/pip install -e '.[bench]'``): without it
:func:`write_plots` returns no files and says why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Plot = Callable[[Any, dict[str, Any]], bool]  # (pyplot, results) -> drew something


def write_plots(results: dict[str, Any], out_dir: Path) -> tuple[list[Path], str | None]:
    """Write every plot that has data into ``out_dir``; returns (files, why none were written or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # before pyplot: no display on a build machine
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (.venv/bin/pip install -e '.[bench]')"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        fig = plt.figure(figsize=(7, 3.6), dpi=100)
        try:
            if plot(plt, results):
                fig.tight_layout()
                path = out_dir / f"{name}.png"
                fig.savefig(path, metadata={"Software": None})  # no version string: fewer diffs between runs
                written.append(path)
        finally:
            plt.close(fig)
    return written, None


def _scenario(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = results.get("scenarios", {}).get(name) or {}
    return entry.get("results") if entry.get("status") == "ok" else None


def _bars(plt: Any, labels: list[str], values: list[float | None], unit: str, title: str,
          colors: list[str] | None = None) -> bool:
    pairs = [(label, v) for label, v in zip(labels, values, strict=True) if v is not None]
    if not pairs:
        return False
    ax = plt.gca()
    bars = ax.barh([p[0] for p in pairs], [p[1] for p in pairs],
                   color=colors[:len(pairs)] if colors else "#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.bar_label(bars, labels=[f"{p[1]:,.2f}" if p[1] < 1 else f"{p[1]:,.1f}" if p[1] < 100 else f"{p[1]:,.0f}"
                               for p in pairs], padding=3,
                 fontsize=8)
    ax.margins(x=0.15)
    return True


def throughput(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "mqtt")
    if not r:
        return False
    rows = r["rows"]
    labels, device, e2e = [], [], []
    for key, label in (("A", "generator -> mosquitto\n(generator ceiling)"), ("B", "edgegw (outbox FULL)"),
                       ("C", "mosquitto bridge")):
        if key in rows:
            labels.append(label)
            device.append(rows[key].get("device-side msg/s"))
            e2e.append(rows[key].get("end-to-end msg/s"))
    if not labels:
        return False
    ax = plt.gca()
    y = range(len(labels))
    ax.barh([i - 0.2 for i in y], [v or 0 for v in device], height=0.4, label="device-side (acknowledged)",
            color="#4c72b0")
    ax.barh([i + 0.2 for i in y], [v or 0 for v in e2e], height=0.4, label="end to end", color="#dd8452")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("messages/s (QoS 1, mTLS)")
    ax.set_title("MQTT throughput, same generator and upstream", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    return True


def cpu_per_message(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "mqtt")
    if not r:
        return False
    rows = r["rows"]
    return _bars(plt, ["edgegw", "mosquitto bridge"],
                 [rows.get("B", {}).get("edge CPU us/msg"), rows.get("C", {}).get("edge CPU us/msg")],
                 "CPU microseconds per message (edge process)", "Edge CPU per message", ["#4c72b0", "#55a868"])


def _number(cell: Any) -> float | None:
    try:
        return float(str(cell).strip("* ").replace(",", ""))
    except ValueError:
        return None


def idle_memory(plt: Any, results: dict[str, Any]) -> bool:
    """bench/idle_memory.py's table (2,000 connections); the idle_cpu scenario's rows when it did not run."""
    r = _scenario(results, "idle_memory")
    rows = [row for table in (r or {}).get("tables", []) for row in table if "per connection KB" in row]
    if rows:
        labels, values = [row.get("server", "?") for row in rows], [_number(row["per connection KB"]) for row in rows]
        count = str(rows[0].get("connected", "?")).split("/")[0]
    else:
        r = _scenario(results, "idle_cpu")
        if not r:
            return False
        labels, values = list(r["rows"]), [v.get("per connection KB") for v in r["rows"].values()]
        count = f"{r.get('connections', '?'):,}"
    return _bars(plt, labels, values, f"KB of server RSS per idle mTLS connection ({count} connections)",
                 "Memory per idle connection", ["#4c72b0", "#55a868"])


def idle_cpu(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "idle_cpu")
    if not r:
        return False
    rows = r["rows"]
    values = [next((x for k, x in v.items() if k.startswith("idle CPU")), None) for v in rows.values()]
    return _bars(plt, list(rows), values,
                 f"server CPU % (of one CPU) over {r.get('window_s', '?'):g} s (1 tick = {1000 // os.sysconf('SC_CLK_TCK')} ms)",
                 f"Idle CPU with {r.get('connections', 0):,} connected mTLS devices", ["#4c72b0", "#55a868"])


def drain(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "drain")
    edges = {line.get("edge"): line for line in (r or {}).get("lines", []) if "error" not in line}
    if not edges:
        return False
    names = {"edgegw": "edgegw (live first)", "bridge": "mosquitto bridge"}
    labels = [names.get(str(e), str(e)) for e in edges]
    colors = ["#4c72b0" if e == "edgegw" else "#55a868" for e in edges]
    backlog = next(iter(edges.values())).get("backlog", 0)
    plt.subplot(1, 2, 1)
    _bars(plt, labels, [v.get("drain_msg_s") for v in edges.values()], "messages/s",
          f"Backlog drain ({backlog:,} messages)", colors)
    plt.subplot(1, 2, 2)
    _bars(plt, labels, [v.get("live_p99_ms") for v in edges.values()], "milliseconds",
          "Live messages: p99 latency", colors)
    return True


def simulator(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "sim")
    if not r:
        return False
    proc = r.get("sim", {}).get("process") or {}
    ax1 = plt.gca()
    labels = ["sim RSS MB", "sim CPU %", "gateway RSS MB", "gateway CPU %"]
    values = [proc.get("rss_mb"), proc.get("cpu_pct"), r.get("gateway_rss_mb"), r.get("gateway_cpu_pct")]
    title = (f"{r.get('devices', '?')} simulated mTLS devices, {r.get('seconds', 0):g} s, 1 msg / "
             f"{r.get('interval_s', 0):g} s each ({proc.get('per_device_kb', '?')} KB per device in the sim)")
    drew = _bars(plt, labels, values, "", title,
                 ["#4c72b0", "#4c72b0", "#55a868", "#55a868"])
    ax1.set_xlabel("MB / % of one CPU")
    return drew


def latency(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "sim")
    if not r:
        return False
    sim = r.get("sim", {})
    ack = sim.get("ack_latency_ms") or {}
    e2e = (sim.get("sink") or {}).get("latency_ms") or {}
    return _bars(plt, ["PUBACK p50", "PUBACK p99", "cloud arrival p50", "cloud arrival p99"],
                 [ack.get("p50"), ack.get("p99"), e2e.get("p50"), e2e.get("p99")], "milliseconds",
                 "Latency seen by the simulated devices and the cloud sink",
                 ["#4c72b0", "#4c72b0", "#dd8452", "#dd8452"])


def coap(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "coap")
    summary = (r or {}).get("summary") or {}
    return _bars(plt, ["edgegw (2.01 after commit)", "bare aiocoap (no storage)"],
                 [summary.get("edgegw_requests_per_s"), summary.get("bare_aiocoap_requests_per_s")],
                 "CoAP POST requests/s over TLS (coaps+tcp)", "CoAP: durable ingress vs a bare server",
                 ["#4c72b0", "#55a868"])


PLOTS: dict[str, Plot] = {"throughput": throughput, "cpu_per_message": cpu_per_message,
                          "idle_memory": idle_memory, "idle_cpu": idle_cpu, "drain": drain, "simulator": simulator,
                          "latency": latency, "coap": coap}
