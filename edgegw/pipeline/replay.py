"""Replay of poison messages by the running gateway (``edgegw quarantine replay`` while it runs).

The command writes ``edgegw.replay-request.json`` (``{"ids": [rowids] | null, "at"}``) to the state dir and sends
SIGUSR1; the daemon puts each row through its current pipeline (typically just reloaded with a fixed config) and
into the outbox through ``Outbox.submit`` like a device message, so ids and counters stay the outbox's own. A row is
deleted from ``quarantine.db`` only after the outbox committed every record made from it (a crash in between
replays it again later: a duplicate at worst, never a loss); a row that fails again stays, with the new reason.
The outcome goes to ``edgegw.replay.json`` for the command to read. Rows of the outbox's own quarantine table
(upstream refusals) are not replayed live: that would make this process a second writer of the outbox file.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog

from edgegw.errors import OutboxError
from edgegw.pipeline.poison import PIPELINE_REASON
from edgegw.pipeline.steps import StepError

log = structlog.get_logger("edgegw.pipeline")

REQUEST_FILE = "edgegw.replay-request.json"
RESULT_FILE = "edgegw.replay.json"


async def replay_live(gateway: Any, folder: Path) -> None:
    """Serve one replay request (never raises: the outcome, errors included, goes to the result file)."""
    started = time.time()
    result: dict[str, Any] = {"pid": os.getpid(), "at": started, "replayed": [], "failed": []}
    try:
        request = json.loads((folder / REQUEST_FILE).read_text(encoding="utf-8"))
        ids = request.get("ids")
        result["request_at"] = request.get("at")
        await _replay(gateway, None if ids is None else [int(i) for i in ids], result)
    except Exception as exc:  # noqa: BLE001 - reported to the command, the gateway goes on
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["at"] = time.time()
    tmp = folder / (RESULT_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(result), encoding="utf-8")
        os.replace(tmp, folder / RESULT_FILE)
    except OSError as exc:
        log.error("pipeline.replay_result_unwritable", error=str(exc))
    log.info("pipeline.replayed", replayed=len(result["replayed"]), failed=len(result["failed"]),
             error=result.get("error"))


async def _replay(gateway: Any, ids: list[int] | None, result: dict[str, Any]) -> None:
    poison = gateway.poison
    server = gateway.server
    outbox = gateway.outbox
    pipeline = server.pipeline if server is not None else None
    if poison is None or outbox is None:
        raise RuntimeError("the gateway is not running")
    rows = await poison.read(ids)
    found = {row[0] for row in rows}
    for rid in ids or ():
        if rid not in found:
            result["failed"].append({"id": -rid, "error": "no such quarantined record"})
    for rid, device_id, topic, payload, qos, received_at, properties, _ in rows:
        tenant = _tenant(properties)
        try:
            if pipeline is None:
                raise StepError("no pipeline configured: nothing to replay through")
            outputs = pipeline.process(device_id, tenant, topic, payload, qos, properties, received_at)
        except (StepError, RecursionError) as exc:
            await poison.edit("UPDATE quarantine SET reason = ?, quarantined_at = ? WHERE id = ?",
                              (f"{PIPELINE_REASON}{exc}"[:520], time.time(), rid))
            result["failed"].append({"id": -rid, "error": str(exc)})
            continue
        loop = asyncio.get_running_loop()
        commits = [loop.create_future() for _ in outputs]
        try:
            for o, fut in zip(outputs, commits, strict=True):
                outbox.submit(device_id, o.topic, o.payload, o.qos,
                              lambda ok, f=fut: f.done() or f.set_result(ok), o.properties, o.priority)
        except OutboxError as exc:
            for fut in commits:
                if not fut.done():
                    fut.set_result(False)
            result["failed"].append({"id": -rid, "error": f"outbox: {exc}"})
            break  # full or closing: the rest waits for another replay
        if all(await asyncio.gather(*commits)) and await poison.edit("DELETE FROM quarantine WHERE id = ?", (rid,)):
            result["replayed"].append({"id": -rid, "records": len(outputs)})
        else:
            result["failed"].append({"id": -rid, "error": "not committed (see the log)"})


def _tenant(properties: bytes | None) -> str:
    from edgegw.mqtt.forward import decode_record_properties

    try:
        tn = decode_record_properties(properties).get("tn")
    except Exception:  # noqa: BLE001
        return ""
    return tn if isinstance(tn, str) else ""


def request_replay(folder: Path, ids: list[int] | None, timeout: float = 30.0) -> dict[str, Any]:
    """Ask the running gateway to replay poison rows (``ids``: row ids, i.e. the listing's negative ids negated;
    None: all); returns its result. ControlError when it cannot be signalled or does not answer."""
    import signal

    from edgegw.pipeline.control import ControlError, running_pid

    pid = running_pid(folder)
    sent = time.time()
    tmp = folder / (REQUEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"ids": ids, "at": sent}), encoding="utf-8")
    os.replace(tmp, folder / REQUEST_FILE)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = None
        if isinstance(result, dict) and result.get("pid") == pid and result.get("request_at") == sent:
            return result
        time.sleep(0.05)
    raise ControlError(f"pid {pid} was asked to replay but did not answer within {timeout:g} s (see its log)")
