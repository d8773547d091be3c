"""Smoke of the one-command benchmark suite (`bench/suite.py --smoke`): real processes, about 30 s; the drain
scenario (`bench/drain.py`, edgegw and a mosquitto bridge behind a cut link) at a tiny size; the generated
Markdown from a results object.

The figures depend on the machine and are not asserted; that every scenario ran (or is reported as not
available), the delivery checks held, the JSON has the fields docs/BENCHMARKS.md uses and the plots are PNGs is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_suite_smoke_runs_every_scenario_and_draws_plots(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--smoke", "--out-dir",
                           str(tmp_path / "plots"), "--results", str(results_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    results = json.loads(results_path.read_text())
    assert results == json.loads(proc.stdout)
    assert results["smoke"] is True and results["machine"]["cpus"] >= 1
    machine = results["machine"]
    assert machine["openssl"].startswith("OpenSSL") and machine["mosquitto"][:1].isdigit(), machine
    assert machine["python"] and machine["sqlite"] and machine["os"], machine
    assert "machine: " in proc.stderr and machine["openssl"] in proc.stderr
    scenarios = results["scenarios"]
    assert set(scenarios) == {"mqtt", "sim", "coap", "backfill"}
    for entry in scenarios.values():
        assert 0 <= entry["cpus_busy_pct"] <= 100 and entry["other_load_pct"] >= 0, entry
    for name in ("coap", "backfill"):  # other engineers' scripts: either they run or the suite says why not
        entry = scenarios[name]
        assert entry["status"] in ("ok", "not available"), entry
        if entry["status"] == "not available":
            assert entry["reason"]
        else:
            assert entry["results"]["lines"] or entry["results"]["tables"], entry

    mqtt = scenarios["mqtt"]
    assert mqtt["status"] == "ok", mqtt
    rows = mqtt["results"]["rows"]
    assert set(rows) == {"A", "B", "C"}
    for row in rows.values():
        assert row["status"] == "ok" and row["delivered"] == "1,000/1,000", row  # --smoke: 10 x 100 messages
        assert row["device-side msg/s"] > 0
    assert mqtt["results"]["generator_ceiling_msg_s"] == rows["A"]["device-side msg/s"]
    assert 0 < mqtt["results"]["ratios"]["edgegw_vs_bridge_device_side_throughput"]

    sim = scenarios["sim"]
    assert sim["status"] == "ok", sim
    r = sim["results"]
    assert r["devices"] == 30 and r["lost"] == 0
    assert r["sim"]["ever_connected"] == 30 and r["sim"]["acknowledged"] == r["sim"]["sent"] > 0
    assert r["sim"]["process"]["rss_mb"] > 0 and r["gateway_rss_mb"] > 0

    plots = sorted(Path(p).name for p in results["plots"])
    expected = ["cpu_per_message.png", "latency.png", "simulator.png", "throughput.png"]
    if scenarios["coap"]["status"] == "ok":
        expected.insert(0, "coap.png")
    assert plots == expected, results["plots"]
    for name in plots:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_drain_edgegw_and_bridge_deliver_the_backlog_and_the_live_messages() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "drain.py"), "--devices", "1", "--messages", "300",
                           "--live-rate", "50", "--min-live", "5", "--timeout", "30"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=80, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    edges = {line["edge"]: line for line in lines if "edge" in line}
    assert set(edges) == {"edgegw", "bridge"}
    for r in edges.values():
        # Nothing crossed the cut link (checked inside), then everything arrived exactly once.
        assert r["backlog"] == r["delivered"] == 300 and r["lost"] == 0 and r["duplicates"] == 0, r
        assert r["live_sent"] >= 5 and r["live_delivered"] == r["live_sent"] and r["live_lost"] == 0, r
        assert r["drain_msg_s"] > 0 and r["reconnect_s"] >= 0 and r["live_p99_ms"] is not None, r
    summary = lines[-1]["summary"]
    assert summary["backlog"] == 300 and summary["edgegw_lost"] == summary["bridge_lost"] == 0
    assert summary["ratio_drain"] > 0


def test_markdown_names_the_machine_the_ratios_and_the_plots(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import suite

    machine = suite.machine()
    results = {
        "generated": "2026-11-29 22:00 UTC", "command": "bench/suite.py --md docs/BENCHMARKS.md", "machine": machine,
        "plots": ["docs/bench/drain.png"],
        "scenarios": {
            "mqtt": {"status": "ok", "seconds": 100.0, "cpus_busy_pct": 90, "other_load_pct": 3, "results": {
                "rows": {"A": {"device-side msg/s": 20000.0}, "B": {"device-side msg/s": 9000.0,
                                                                    "edge CPU us/msg": 60.0},
                         "C": {"device-side msg/s": 18000.0, "edge CPU us/msg": 25.0}},
                "ratios": {"edgegw_vs_bridge_device_side_throughput": 0.5, "edgegw_vs_bridge_edge_cpu_per_message": 2.4,
                           "edgegw_vs_generator_ceiling": 0.45}, "command": "bench/run.py --only ABC"}},
            "drain": {"status": "failed", "seconds": 3.0, "error": "RuntimeError: bench/drain.py exited 1"},
        }}
    text = suite.render_markdown(results, ROOT / "docs")
    assert "OpenSSL" in text and f"mosquitto {machine['mosquitto']}" in text and machine["os"] in text
    mqtt_row = next(line for line in text.splitlines() if line.startswith("| mqtt |"))
    assert "**0.50x**" in mqtt_row and "**2.40x**" in mqtt_row and "generator ceiling **0.45x**" in mqtt_row
    assert mqtt_row.endswith("| 90 (3) |")
    assert "| drain | " in text and "failed" in text and "exited 1" in text
    assert "| idle_cpu | | not run yet |" in text
    assert "![drain](bench/drain.png)" in text
    doc = "# t\n\nbefore\n" + suite.MD_BEGIN + "\nOLD-BODY\n" + suite.MD_END + "\nafter\n"
    replaced = suite.replace_section(doc, text)
    assert "OLD-BODY" not in replaced and replaced.startswith("# t\n\nbefore\n") and replaced.endswith("\nafter\n")
