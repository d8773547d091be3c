"""``edgegw pki revoke|crl|status|sign-csr|batch|uplink-csr``: argparse wiring for the lifecycle commands.

Exit codes: 0 done; 1 ``status --within`` found something expiring (for cron/monitoring); 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgegw.errors import EdgegwError

from ._store import write_file
from .cli import _add_leaf_days, _days
from .lifecycle import CRL_DAYS, pki_status, revoke_device, sign_csr, write_crl


def add_lifecycle_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    from .bundle import add_bundle_parsers

    revoke = commands.add_parser("revoke", parents=[common],
                                 help="revoke a device's certificates and write a new CRL (DIR/crl.pem)")
    revoke.add_argument("pki_dir", metavar="DIR", type=Path)
    revoke.add_argument("pki_name", metavar="ID")
    revoke.add_argument("--reason", dest="pki_reason", default="unspecified",
                        help="keyCompromise, superseded, cessationOfOperation, ... (default: %(default)s)")
    revoke.add_argument("--crl-days", dest="pki_crl_days", type=_days, default=CRL_DAYS, metavar="N",
                        help="validity of the new CRL (default: %(default)s)")
    revoke.set_defaults(func=_cmd_revoke)

    crl = commands.add_parser("crl", parents=[common], help="write a freshly signed CRL: DIR/crl.pem")
    crl.add_argument("pki_dir", metavar="DIR", type=Path)
    crl.add_argument("--days", dest="pki_days", type=_days, default=CRL_DAYS, metavar="N",
                     help="until nextUpdate; past it every certificate is refused (default: %(default)s)")
    crl.set_defaults(func=_cmd_crl)

    status = commands.add_parser("status", parents=[common],
                                 help="what expires (CAs, CRL, devices, server, clients), soonest first")
    status.add_argument("pki_dir", metavar="DIR", type=Path)
    status.add_argument("--within", dest="pki_within", type=float, default=None, metavar="DAYS",
                        help="only what expires within DAYS; exit 1 if anything does")
    status.set_defaults(func=_cmd_status)

    sign = commands.add_parser("sign-csr", parents=[common],
                               help="sign a device's CSR (CN = device id); the key stays on the device")
    sign.add_argument("pki_dir", metavar="DIR", type=Path)
    sign.add_argument("pki_csr", metavar="CSR", type=Path)
    sign.add_argument("--out", dest="pki_out", type=Path, required=True, metavar="CRT",
                      help="where to write the certificate (plus the intermediate, if any)")
    sign.add_argument("--id", dest="pki_id", default=None, help="refuse the CSR unless its CN is this id")
    sign.add_argument("--san", dest="pki_sans", action="append", default=[], metavar="NAME")
    _add_leaf_days(sign)
    sign.set_defaults(func=_cmd_sign)

    add_bundle_parsers(commands, common)


def run(args: argparse.Namespace, action: Callable[[], Any], text: Callable[[Any], str]) -> int:
    try:
        result = action()
    except (EdgegwError, OSError) as exc:
        print(f"edgegw: error: {exc}", file=sys.stderr)
        return 2
    if args.pki_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(text(result))
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    def action() -> dict[str, Any]:
        r = revoke_device(args.pki_dir, args.pki_name, args.pki_reason, crl_days=args.pki_crl_days)
        return {"id": r.device_id, "revoked_serials": r.serials, "reason": r.reason, "crl": str(r.crl)}

    return run(args, action, lambda r: (
        f"revoked {r['id']}: {len(r['revoked_serials'])} certificate(s) ({r['reason']})\nwrote {r['crl']}\n"))


def _cmd_crl(args: argparse.Namespace) -> int:
    return run(args, lambda: {"crl": str(write_crl(args.pki_dir, days=args.pki_days))},
               lambda r: f"wrote {r['crl']}\n")


def _cmd_status(args: argparse.Namespace) -> int:
    code = run(args, lambda: pki_status(args.pki_dir, within_days=args.pki_within), _status_text)
    if code == 0 and args.pki_within is not None:
        return 1 if pki_status(args.pki_dir, within_days=args.pki_within)["items"] else 0
    return code


def _status_text(result: dict[str, Any]) -> str:
    items = result["items"]
    if not items:
        if result["within_days"] is None:
            return "no certificates\n"
        return f"nothing expires within {result['within_days']:g} days\n"
    lines = [f"{'KIND':<8} {'NAME':<40} {'NOT AFTER':<26} DAYS LEFT"]
    for i in items:
        left = "EXPIRED" if i["expired"] else f"{i['days_left']:.1f}"
        lines.append(f"{i['kind']:<8} {i['name']:<40} {i['not_after']:<26} {left}")
    return "\n".join(lines) + "\n"


def _cmd_sign(args: argparse.Namespace) -> int:
    def action() -> dict[str, str]:
        device_id, pem = sign_csr(args.pki_dir, args.pki_csr.read_bytes(), device_id=args.pki_id,
                                  days=args.pki_days, sans=args.pki_sans)
        write_file(args.pki_out, pem)
        return {"id": device_id, "cert": str(args.pki_out)}

    return run(args, action, lambda r: f"signed {r['id']}\nwrote {r['cert']}\n")
