"""Smoke of the one-command benchmark suite (`bench/suite.py --smoke`): real processes, about 30 s.

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
    scenarios = results["scenarios"]
    assert set(scenarios) == {"mqtt", "sim", "coap", "backfill"}
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
        assert row["status"] == "ok" and row["delivered"] == "3,000/3,000", row
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
