"""`edgegw demo` end to end, as a user runs it: a child process, its stdout, its exit code.

The demo is the whole data path in one process (fleet -> gateway -> outbox -> uplink -> cut-able link -> amqtt ->
sink) with an upstream outage in the middle, so these tests are the cheapest full-system check we have.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgegw.sim import SeqSet

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 90


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_demo_json_loses_nothing_across_an_outage() -> None:
    proc = run_cli("demo", "--devices", "5", "--seconds", "4", "--json")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout)  # stdout must be exactly one JSON object: logs go to stderr
    assert isinstance(summary, dict)
    for key in ("published", "acknowledged", "delivered", "lost", "duplicates"):
        assert isinstance(summary[key], int), key
    assert "error" not in summary, summary
    assert summary["devices"] == 5
    assert summary["outage_seconds"] == 1.0  # default: a quarter of --seconds, at most 5
    assert summary["upstream_link_cuts"] == 1
    assert summary["published"] > 0
    # Every device gets a PUBACK for every message: the outage is upstream, the outbox absorbs it.
    assert summary["acknowledged"] == summary["published"], summary
    assert summary["delivered"] >= summary["acknowledged"], summary
    assert summary["lost"] == 0, summary
    assert summary["max_outbox_depth"] > 0  # the outage really held messages back
    assert summary["outbox_depth_end"] == 0
    assert summary["ack_latency_ms"]["p50"] is not None


def test_demo_human_output_prints_a_summary() -> None:
    proc = run_cli("demo", "--devices", "3", "--seconds", "3", "--outage", "1")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "edgegw demo summary" in out
    assert "upstream link cut for 1 s" in out
    for label in ("published", "acknowledged", "delivered", "lost", "duplicates"):
        assert f"  {label} " in out, label
    assert "OK: nothing acknowledged was lost" in out


def test_seqset_counts_what_another_lacks() -> None:
    acked, delivered = SeqSet(), SeqSet()
    for seq in (1, 2, 3, 5, 6, 9):
        assert acked.add(seq)
    assert not acked.add(2) and not acked.add(0)
    for seq in (6, 1, 2, 9, 3):  # out of order on purpose
        delivered.add(seq)
    assert len(acked) == 6 and list(acked) == [1, 2, 3, 5, 6, 9]
    assert 5 in acked and 4 not in acked
    assert acked.count_missing_from(delivered) == 1  # seq 5
    assert delivered.count_missing_from(acked) == 0
