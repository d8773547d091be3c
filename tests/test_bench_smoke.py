"""Smoke test of the benchmark: `bench/run.py --quick` runs every scenario end to end with real processes.

The benchmark itself exits non-zero when a scenario fails or loses a message (and then leaves ``--out`` alone),
so exit 0 plus the table rows is the check. Figures are not asserted: they depend on the machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "| A. generator -> mosquitto (direct) |",
    "| B. generator -> edgegw (outbox FULL) -> mosquitto |",
    "| C. generator -> mosquitto bridge -> mosquitto |",
    "| E. generator -> edgegw, uplink in frames of <= 100 -> mosquitto |",
    "| edgegw |",
    "| mosquitto (edge broker, no bridge) |",
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_quick_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# hand-written title\n\nkept text\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\ntail text\n")
    # On timeout subprocess.run SIGKILLs the benchmark; its children die with it (PR_SET_PDEATHSIG).
    # 100 messages per device and 50 idle connections: every scenario still runs end to end (the suite's smoke,
    # tests/test_bench_suite.py, runs A, B and C at the --quick size of 300 per device).
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--messages", "100", "--idle",
                           "50", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    for row in ROWS:
        assert row in proc.stdout, f"missing row {row!r} in:\n{proc.stdout}"
    n = 10 * 100
    b_row = next(line for line in proc.stdout.splitlines() if line.startswith(ROWS[1]))
    assert f"| {n:,}/{n:,} |" in b_row, b_row  # B delivered every message upstream
    assert b_row.rstrip().endswith("| ok |"), b_row
    # E: the same through batch frames, unpacked by bench/frame_sub.py: every record arrived, none twice.
    e_row = next(line for line in proc.stdout.splitlines() if line.startswith(ROWS[3]))
    assert f"| {n:,}/{n:,} | 0 |" in e_row, e_row

    text = out.read_text()
    assert text.startswith("# hand-written title\n\nkept text\n\n<!-- bench:begin -->\n")
    assert text.rstrip().endswith("<!-- bench:end -->\n\ntail text".rstrip())
    assert "\nold\n" not in text
    for row in ROWS:
        assert row in text
