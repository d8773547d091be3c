"""The uplink's per-record cost on the event loop, without sockets or SQLite: ``Uplink._publish`` (topic,
properties, PUBLISH bytes) for a window of records, the write of that loop turn, and the PUBACKs read back.

    .venv/bin/python bench/uplink_record.py                 # ~5 s
    PYTHONPATH=/some/other/tree .venv/bin/python bench/uplink_record.py   # the same on another tree

Records as scenario B stores them: 10 devices, 100-byte payloads, ``devices/{id}/telemetry``, the ingress's
traceparent as the only record property (``{"tp": ...}``), received within the last second; a second kind with no
properties at all. The link is the native client's ``NativeLink`` over a stand-in transport that only counts bytes,
and the outbox a stand-in that only counts acknowledgements: what is measured is the uplink's own Python.
Reported: CPU us per record (``time.thread_time``, best of 5 rounds) and Python function calls per record
(cProfile, one round).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from edgegw.config import UplinkSettings
from edgegw.mqtt.forward import record_properties
from edgegw.mqtt.packets import NO_PROPERTIES
from edgegw.outbox.store import Record
from edgegw.tracing import new_traceparent
from edgegw.uplink import Uplink
from edgegw.uplink._mqtt_client import NativeLink

WINDOW = 100


class _Transport:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def is_closing(self) -> bool:
        return False


class _Outbox:
    def __init__(self) -> None:
        self.acked = 0

    def ack(self, ids: Any) -> None:
        self.acked += len(ids)


def _records(n: int, traced: bool) -> list[Record]:
    now = time.time()
    return [Record(i + 1, f"dev-{i % 10:02d}", f"devices/dev-{i % 10:02d}/telemetry", b"x" * 100, 1,
                   now - 1 + i / n, record_properties(NO_PROPERTIES, new_traceparent()) if traced else None)
            for i in range(n)]


def _round(uplink: Uplink, records: list[Record], protocol: str) -> None:
    """Every record through a window: publish WINDOW, flush, read their PUBACKs (as mosquitto sends them)."""
    loop = asyncio.get_event_loop()
    link = NativeLink(uplink, loop, "127.0.0.1", 1)
    link.transport = _Transport()  # type: ignore[assignment]
    live = deque(records)
    mqtt5 = protocol == "5"
    while live:
        uplink._publish(link, live, WINDOW)
        link._flush_handle.cancel()  # type: ignore[union-attr]
        link._flush()
        acks = b"".join((b"\x40\x03" + mid.to_bytes(2, "big") + b"\x00") if mqtt5 else
                        (b"\x40\x02" + mid.to_bytes(2, "big")) for mid in list(link.inflight))
        link.data_received(acks)
    link.transport = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    import edgegw
    print(f"edgegw from {Path(edgegw.__file__).parent}")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    print("| protocol | record properties | CPU us/record | Python calls/record |")
    print("|---|---|---:|---:|")
    for protocol in ("5", "3.1.1"):
        settings = UplinkSettings(host="127.0.0.1", ca=Path("ca"), cert=Path("c"), key=Path("k"),
                                  protocol=protocol, topic_prefix="cloud")  # type: ignore[arg-type]
        for traced in (True, False):
            outbox = _Outbox()
            uplink = Uplink(settings, outbox, client_id="bench", ssl_context=None)  # type: ignore[arg-type]
            best = float("inf")
            for _ in range(5):
                records = _records(args.records, traced)
                t0 = time.thread_time()
                _round(uplink, records, protocol)
                best = min(best, time.thread_time() - t0)
            assert outbox.acked == 5 * args.records, outbox.acked
            records = _records(args.records, traced)
            profile = cProfile.Profile()
            profile.enable()
            _round(uplink, records, protocol)
            profile.disable()
            calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
            print(f"| {protocol} | {'traceparent' if traced else 'none'} | {best / args.records * 1e6:.2f} "
                  f"| {calls / args.records:.1f} |", flush=True)
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
