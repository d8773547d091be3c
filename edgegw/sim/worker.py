"""A worker process of ``edgegw-sim run --processes K``: one :class:`~edgegw.sim.runner.FleetRun`, JSON lines out.

The parent (:mod:`.simulate`) writes one job object to our stdin and closes it::

    {"scenario": {...Scenario.to_mapping()...}, "devices": [[id, cert, key, ca], ...],
     "bad": [[id, cert, key, ca], ...], "wrong_cert_dir": path | null, "victims": [id, ...]}

We answer on stdout with one JSON object per line: ``{"status": {...}}`` about once a second, then
``{"summary": {...}, "acked": {device: [[first, last], ...]}, "latencies": [seconds, ...]}``. Anything else (errors)
goes to stderr; the parent shows it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from edgegw import runtime
from edgegw.sim.certs import DeviceIdentity
from edgegw.sim.runner import FleetRun
from edgegw.sim.scenario import scenario_from_mapping

EVENT_LOOP_ENV = "EDGEGW_SIM_EVENT_LOOP"
"""The parent's ``--event-loop`` reaches a worker through the environment (simulate.py starts the workers and
passes them ours)."""


def identities(rows: list[list[str]]) -> list[DeviceIdentity]:
    return [DeviceIdentity(i, Path(cert), Path(key), Path(ca)) for i, cert, key, ca in rows]


def identity_rows(items: list[DeviceIdentity]) -> list[list[str]]:
    return [[i.device_id, str(i.cert), str(i.key), str(i.ca)] for i in items]


async def run_job(job: dict[str, Any]) -> int:
    scenario = scenario_from_mapping(job["scenario"])
    run = FleetRun(scenario, identities(job["devices"]), bad_identities=identities(job.get("bad", [])),
                   wrong_cert_dir=Path(job["wrong_cert_dir"]) if job.get("wrong_cert_dir") else None,
                   victims=job.get("victims", ()))
    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        out.flush()

    summary = await run.run(on_status=lambda status: emit({"status": status}))
    emit({"summary": summary, "acked": {d: s.to_ranges() for d, s in run.acked_seqs().items()},
          "latencies": run.latency_sample()})
    return 0


def main() -> int:
    job = json.loads(sys.stdin.read())
    return runtime.run(run_job(job), runtime.choose(os.environ.get(EVENT_LOOP_ENV, "asyncio"), key=EVENT_LOOP_ENV))
