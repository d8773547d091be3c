"""In-process micro-benchmark of the outbox writer: CPU per record of the event loop and of the SQLite writer thread.

    .venv/bin/python bench/outbox_writer.py [--records 20000] [--devices 10] [--inflight 20] [--repeat 3]
                                            [--src DIR] [--synchronous full]

Shaped like scenario B of bench/run.py: ``--devices`` fake devices each keep ``--inflight`` records unacknowledged
(a device sends its next message when the commit callback of an earlier one ran, as mosquitto_pub -M does), and a
fake uplink takes every committed group from :meth:`Outbox.add_handoff` and acknowledges it (``Outbox.ack``) a
loop turn later, in chunks of ``--inflight`` ids as upstream PUBACKs arrive. A real SQLite file in a temporary
folder, ``synchronous`` as configured (FULL by default: one fdatasync per commit).

Printed per run: records/s, CPU us per record of the loop thread and of the writer's SQLite thread, commits and
the records per commit; then the median run. ``--src DIR`` benchmarks the ``edgegw`` package found in DIR (a copy of
another tree) instead of this checkout's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _thread_cpu(ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


async def _run(records: int, devices: int, inflight: int, synchronous: str, folder: Path) -> dict[str, Any]:
    from edgegw.config import OutboxSettings
    from edgegw.outbox.store import Outbox, Record

    outbox = await Outbox.open(OutboxSettings(path=folder / "outbox.db", synchronous=synchronous))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    writer_task = asyncio.create_task(outbox.run())
    done = asyncio.Event()
    sent = [0] * devices
    acked = 0
    payload = b"x" * 100

    def send(device: int) -> None:
        n = sent[device]
        if n >= records // devices:
            return
        sent[device] = n + 1
        outbox.submit(names[device], topics[device], payload, 1, callbacks[device])

    def committed(device: int, ok: bool) -> None:
        assert ok
        loop.call_soon(send, device)  # the PUBACK travels to the device, which then sends its next message

    names = [f"bench-{d:03d}" for d in range(devices)]
    topics = [f"devices/{name}/telemetry" for name in names]
    callbacks = [lambda ok, d=d: committed(d, ok) for d in range(devices)]

    def upstream_acks(ids: list[int]) -> None:
        nonlocal acked
        outbox.ack(ids)
        acked += len(ids)
        if acked >= records:
            done.set()

    def handoff(before: int, group: list[Record]) -> None:
        ids = [r.id for r in group]
        for start in range(0, len(ids), inflight):
            loop.call_soon(upstream_acks, ids[start:start + inflight])

    outbox.add_handoff(handoff)
    writer_ident = outbox._writer._thread.ident
    assert writer_ident is not None
    commits0 = outbox.commits
    loop0, writer0, wall0 = time.thread_time(), _thread_cpu(writer_ident), time.perf_counter()
    for device in range(devices):
        for _ in range(inflight):
            send(device)
    await asyncio.wait_for(done.wait(), 300)
    while outbox.depth:  # the last deletes committed too, so the cost is the whole cost
        await asyncio.sleep(0.001)
    wall = time.perf_counter() - wall0
    loop_cpu, writer_cpu = time.thread_time() - loop0, _thread_cpu(writer_ident) - writer0
    commits = outbox.commits - commits0
    outbox.stop()
    await writer_task
    await outbox.close()
    return {"rate": records / wall, "loop_us": loop_cpu / records * 1e6, "writer_us": writer_cpu / records * 1e6,
            "commits": commits, "per_commit": records / max(1, commits)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--synchronous", default="full", choices=("full", "normal"))
    parser.add_argument("--src", type=Path, help="a folder holding the edgegw package to benchmark")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.src if args.src is not None else HERE.parent))
    import edgegw

    print(f"edgegw from {Path(edgegw.__file__).parent}")
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="outbox-bench-") as folder:
            r = asyncio.run(_run(args.records, args.devices, args.inflight, args.synchronous, Path(folder)))
        runs.append(r)
        print(f"run {i + 1}: {r['rate']:8.0f} records/s  loop {r['loop_us']:5.1f} us/record  writer thread "
              f"{r['writer_us']:5.1f} us/record  {r['commits']} commits ({r['per_commit']:.0f} records/commit)")
    best = sorted(runs, key=lambda r: r["loop_us"] + r["writer_us"])[len(runs) // 2]
    print(f"median: {best['rate']:.0f} records/s  loop {best['loop_us']:.1f} us/record  writer thread "
          f"{best['writer_us']:.1f} us/record  total {best['loop_us'] + best['writer_us']:.1f}")
    print("medians per column: loop " + f"{statistics.median(r['loop_us'] for r in runs):.1f}"
          + f"  writer {statistics.median(r['writer_us'] for r in runs):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
