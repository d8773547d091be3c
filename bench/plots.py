"""PNG plots of a bench/suite.py results object (matplotlib, Agg backend: no display needed).

Each plot is drawn only when its scenario produced figures; a missing scenario is a missing plot, not an error.
matplotlib is the optional ``bench`` extra (``.venv/bin/pip install -e '.[bench]'``): without it
:func:`write_plots` returns no files and says why.
"""

from __future__ import annotations

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
    ax.bar_label(bars, labels=[f"{p[1]:,.1f}" if p[1] < 100 else f"{p[1]:,.0f}" for p in pairs], padding=3,
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


def idle_memory(plt: Any, results: dict[str, Any]) -> bool:
    r = _scenario(results, "idle")
    if not r:
        return False
    rows = r["rows"]
    return _bars(plt, list(rows), [v.get("per connection KB") for v in rows.values()],
                 f"KB of server RSS per idle mTLS connection ({r.get('connections', '?')} connections)",
                 "Memory per idle connection", ["#4c72b0", "#55a868"])


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
                          "idle_memory": idle_memory, "simulator": simulator, "latency": latency, "coap": coap}
