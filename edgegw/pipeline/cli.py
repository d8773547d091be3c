"""``edgegw quarantine list|show|replay|purge`` and ``edgegw reload``.

Exit codes as for every command (edgegw/cli.py): 0 success; 1 runtime failure (gateway not running / running when
it must not, reload refused by the daemon, a record failing its replay again); 2 bad input (config, unknown id).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _error(message: str, code: int) -> int:
    print(f"edgegw: error: {message}", file=sys.stderr)
    return code


def _config(path: Path) -> Any:
    from edgegw.config import load_config

    return load_config(path)  # ConfigError: handled by the caller


def _ids(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"record ids are integers, got {values!r}") from None


def _running(config: Any) -> int | None:
    from edgegw.pipeline import control

    try:
        return control.running_pid(control.state_dir(config.outbox.path))
    except control.ControlError:
        return None


def cmd_quarantine(args: argparse.Namespace) -> int:
    from edgegw.errors import ConfigError
    from edgegw.pipeline import quarantine

    try:
        config = _config(args.config)
    except ConfigError as exc:
        return _error(f"{args.config}: {exc}", EXIT_USAGE)
    action = args.quarantine_command
    try:
        ids = _ids(args.ids) if getattr(args, "ids", None) else None
    except argparse.ArgumentTypeError as exc:
        return _error(str(exc), EXIT_USAGE)
    if action in ("replay", "purge") and ids is None and not args.all and getattr(args, "older_than", None) is None:
        return _error(f"quarantine {action}: give record ids, or --all", EXIT_USAGE)
    try:
        with quarantine.open_outbox(config.outbox.path) as conn:
            if action == "list":
                rows = quarantine.list_rows(conn, device=args.device, limit=args.limit)
                total = quarantine.count(conn)
                if args.json:
                    print(json.dumps({"total": total, "records": [r.summary() for r in rows]}))
                else:
                    for r in rows:
                        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.quarantined_at))
                        print(f"{r.id}\t{when}\t{r.device_id}\t{quarantine.display_topic(r.topic)}\t{r.reason}")
                    print(f"{len(rows)} of {total} quarantined records", file=sys.stderr)
                return EXIT_OK
            if action == "show":
                rows = quarantine.get_rows(conn, ids)
                if args.json:
                    print(json.dumps([r.detail() for r in rows]))
                else:
                    for r in rows:
                        for key, value in r.detail().items():
                            print(f"{key}: {value}")
                        print()
                return EXIT_OK
            if action == "purge":
                if _running(config) is not None and (ids is None or any(i > 0 for i in ids)):
                    # The outbox's own table is written by its writer alone while it runs (a second writer could
                    # fail one of its group commits); the pipeline's rows (negative ids) are ours to delete.
                    return _error("the gateway is running: only pipeline rows (negative ids) can be purged now; "
                                  "stop it to purge upstream refusals or --all", EXIT_FAILED)
                n = quarantine.purge(conn, ids if not args.all else None, args.older_than)
                print(json.dumps({"purged": n}) if args.json else f"purged {n} quarantined records")
                return EXIT_OK
            pid = _running(config)
            if pid is not None:
                # The running gateway owns the outbox (ids, counters, its file): it replays poison messages itself
                # (edgegw/pipeline/replay.py); upstream refusals wait for a stop.
                if ids is not None and any(i > 0 for i in ids):
                    return _error(f"the gateway is running (pid {pid}): upstream refusals (positive ids) are "
                                  "replayed with it stopped; poison messages (negative ids) now", EXIT_FAILED)
                return _replay_live(config, None if ids is None or args.all else [-i for i in ids], args.json)
            from edgegw.pipeline.reload import build_pipeline

            rows = quarantine.get_rows(conn, None if args.all else ids)
            results = quarantine.replay(conn, rows, build_pipeline(config))
    except quarantine.QuarantineError as exc:
        return _error(str(exc), EXIT_USAGE if "no quarantined record" in str(exc) else EXIT_FAILED)
    failed = [done for done in results if done.error is not None]
    if args.json:
        print(json.dumps({"replayed": [{"id": d.id, "records": d.records} for d in results if d.error is None],
                          "failed": [{"id": d.id, "error": d.error} for d in failed]}))
    else:
        for d in results:
            print(f"{d.id}\t" + (f"failed again: {d.error}" if d.error else f"{d.records} records into the outbox"))
    return EXIT_FAILED if failed else EXIT_OK


def _replay_live(config: Any, rowids: list[int] | None, as_json: bool) -> int:
    from edgegw.pipeline import control
    from edgegw.pipeline.replay import request_replay

    try:
        result = request_replay(control.state_dir(config.outbox.path), rowids)
    except control.ControlError as exc:
        return _error(str(exc), EXIT_FAILED)
    if as_json:
        print(json.dumps({k: result.get(k) for k in ("replayed", "failed", "error") if k in result}))
    else:
        for d in result["replayed"]:
            print(f"{d['id']}\t{d['records']} records into the outbox")
        for d in result["failed"]:
            print(f"{d['id']}\tfailed again: {d['error']}")
    if result.get("error"):
        return _error(f"replay failed in the gateway: {result['error']}", EXIT_FAILED)
    return EXIT_FAILED if result["failed"] else EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from edgegw.errors import ConfigError
    from edgegw.pipeline import control

    try:
        config = _config(args.config)  # a broken config is refused here, before the daemon is bothered
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "key": exc.key}))
        return _error(f"{args.config}: {exc}", EXIT_USAGE)
    try:
        result = control.signal_reload(control.state_dir(config.outbox.path), timeout=args.timeout)
    except control.ControlError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        return _error(str(exc), EXIT_FAILED)
    if args.json:
        print(json.dumps({"ok": result.ok, "error": result.error, "pid": result.pid}))
    elif result.ok:
        print(f"reloaded (pid {result.pid})")
    if not result.ok:
        return _error(f"reload refused by pid {result.pid}: {result.error}", EXIT_FAILED)
    return EXIT_OK


def add_pipeline_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, required=True, help="the gateway's TOML config")
    common.add_argument("--json", action="store_true", help="JSON output")

    q = sub.add_parser("quarantine", help="records set aside: poison messages, upstream refusals")
    qs = q.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    p = qs.add_parser("list", parents=[common], help="quarantined records, oldest first")
    p.add_argument("--device", help="only this device's")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_quarantine)
    p = qs.add_parser("show", parents=[common], help="records in full (payload, properties, reason)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_quarantine)
    p = qs.add_parser("replay", parents=[common],
                      help="back into the outbox: poison messages through the pipeline (by the running "
                           "gateway, or offline), upstream refusals as they were (gateway stopped)")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_quarantine)
    p = qs.add_parser("purge", parents=[common], help="delete quarantined records")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true")
    p.add_argument("--older-than", type=float, metavar="SECONDS", help="those quarantined longer ago than this")
    p.set_defaults(func=cmd_quarantine)

    p = sub.add_parser("reload", parents=[common],
                       help="check the config, then make the running gateway re-read it (SIGHUP) and report")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the gateway's answer")
    p.set_defaults(func=cmd_reload)
