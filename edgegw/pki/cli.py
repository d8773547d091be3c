"""``edgegw pki ...``: argparse wiring for the provisioning commands.

The main CLI calls :func:`add_pki_parser` with its subparsers object and then runs
``args.func(args)``, which returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgegw.errors import EdgegwError

from ._store import CertPaths
from .ca import KEY_TYPES, init_ca, issue_client, issue_devices, issue_server

def add_pki_parser(subparsers: Any) -> None:
    """Register ``pki init`` and ``pki issue {device,server,client}`` on ``subparsers``."""
    # Option dests carry a pki_ prefix so they cannot clash with options of the main parser.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--force", dest="pki_force", action="store_true", help="replace existing files"
    )
    common.add_argument(
        "--json", dest="pki_json", action="store_true", help="print written paths as JSON"
    )

    pki = subparsers.add_parser(
        "pki",
        help="create the fleet CA and issue certificates",
        description="Create the fleet CA and issue device, server and client certificates.",
    )
    commands = pki.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init", parents=[common], help="create the CA (DIR/ca.crt, DIR/ca.key)"
    )
    init.add_argument("pki_dir", metavar="DIR", type=Path)
    init.add_argument("--days", dest="pki_days", type=_days, default=3650, metavar="N",
                      help="validity in days (default: %(default)s)")
    init.add_argument("--intermediate", dest="pki_intermediate", action="store_true",
                      help="a root CA (DIR/root-ca.crt, key to keep offline) signing the issuing CA DIR/ca.crt")
    init.add_argument("--root-days", dest="pki_root_days", type=_days, default=None, metavar="N",
                      help="root validity with --intermediate (default: twice --days)")
    _add_key_type(init)
    init.set_defaults(func=_cmd_init)

    issue = commands.add_parser("issue", help="issue certificates signed by the CA in DIR")
    issue.add_argument("pki_dir", metavar="DIR", type=Path)
    kinds = issue.add_subparsers(dest="pki_kind", metavar="KIND", required=True)

    device = kinds.add_parser(
        "device", parents=[common], help="device certificates: DIR/devices/ID.crt (CN = ID)"
    )
    device.add_argument("pki_names", metavar="ID", nargs="+")
    device.add_argument("--san", dest="pki_sans", action="append", default=[], metavar="NAME",
                        help="DNS name or IP address for every device certificate of this call")
    _add_leaf_days(device)
    _add_key_type(device)
    device.set_defaults(func=_cmd_device)

    server = kinds.add_parser(
        "server", parents=[common], help="TLS listener certificate: DIR/server/NAME.crt"
    )
    server.add_argument("pki_name", metavar="NAME")
    server.add_argument("--san", dest="pki_sans", action="append", required=True,
                        metavar="HOST", help="DNS name or IP address (repeat for more)")
    _add_leaf_days(server)
    _add_key_type(server)
    server.set_defaults(func=_cmd_server)

    client = kinds.add_parser(
        "client", parents=[common], help="uplink client certificate: DIR/clients/NAME.crt"
    )
    client.add_argument("pki_name", metavar="NAME")
    _add_leaf_days(client)
    _add_key_type(client)
    client.set_defaults(func=_cmd_client)

    from .cli_lifecycle import add_lifecycle_parsers

    add_lifecycle_parsers(commands, common)


def _add_key_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-type", dest="pki_key_type", choices=KEY_TYPES, default="ec",
                        help="ec (P-256, default), rsa (2048) or ed25519")


def _add_leaf_days(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", dest="pki_days", type=_days, default=825, metavar="N",
                        help="validity in days (default: %(default)s)")


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _cmd_init(args: argparse.Namespace) -> int:
    def run() -> list[dict[str, str]]:
        paths = init_ca(args.pki_dir, days=args.pki_days, force=args.pki_force,
                        intermediate=args.pki_intermediate, root_days=args.pki_root_days,
                        key_type=args.pki_key_type)
        if not args.pki_intermediate:
            return [_record(paths)]
        d = args.pki_dir
        return [{**_record(paths), "root_cert": str(d / "root-ca.crt"), "root_key": str(d / "root-ca.key"),
                 "chain": str(d / "ca-chain.pem")}]

    return _run(args, run)


def _cmd_device(args: argparse.Namespace) -> int:
    def run() -> list[dict[str, str]]:
        written = issue_devices(
            args.pki_dir, args.pki_names, days=args.pki_days, force=args.pki_force,
            key_type=args.pki_key_type, sans=args.pki_sans,
        )
        return [_record(p, id=i) for i, p in zip(args.pki_names, written, strict=True)]

    # Devices are always a JSON list, even for one id, so scripts see one shape.
    return _run(args, run, as_list=True)


def _cmd_server(args: argparse.Namespace) -> int:
    def run() -> list[dict[str, str]]:
        paths = issue_server(
            args.pki_dir, args.pki_name, args.pki_sans, days=args.pki_days, force=args.pki_force,
            key_type=args.pki_key_type,
        )
        return [_record(paths, name=args.pki_name)]

    return _run(args, run)


def _cmd_client(args: argparse.Namespace) -> int:
    def run() -> list[dict[str, str]]:
        paths = issue_client(args.pki_dir, args.pki_name, days=args.pki_days,
                             force=args.pki_force, key_type=args.pki_key_type)
        return [_record(paths, name=args.pki_name)]

    return _run(args, run)


def _record(paths: CertPaths, **ident: str) -> dict[str, str]:
    return {**ident, "cert": str(paths.cert), "key": str(paths.key)}


_FIELDS = ("cert", "key", "root_cert", "root_key", "chain")


def _run(
    args: argparse.Namespace,
    action: Callable[[], list[dict[str, str]]],
    *,
    as_list: bool = False,
) -> int:
    try:
        records = action()
    except (EdgegwError, OSError) as exc:
        print(f"edgegw: error: {exc}", file=sys.stderr)
        return 2
    if args.pki_json:
        out: object = records if as_list else records[0]
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        # One write for the whole batch: thousands of print() calls are noticeably slower.
        sys.stdout.write(
            "".join(f"wrote {r[field]}\n" for r in records for field in _FIELDS if field in r)
        )
    return 0
