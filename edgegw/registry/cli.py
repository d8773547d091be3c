"""``edgegw devices list|show|suspend|resume REGISTRY``: the device registry from the command line.

REGISTRY is a PKI directory (its ``registry.db``) or the registry file itself. A running gateway with
``registry.path`` set picks changes up within ``tls.reload_interval`` seconds (or at once on SIGHUP) and closes the
live session of a device that was suspended.

Exit codes: 0 done (also when the device already was in the requested state); 2 bad input or unusable registry;
3 no such device; 4 the device is revoked (``resume`` cannot undo a revocation: issue a new certificate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .store import REGISTRY_FILE, DeviceState, Registry, RegistryError

EXIT_UNKNOWN, EXIT_REVOKED = 3, 4


def add_devices_parser(subparsers: Any) -> None:
    devices = subparsers.add_parser("devices", help="list, show, suspend and resume registered devices",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = devices.add_subparsers(dest="devices_command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("registry", metavar="REGISTRY", type=Path, help="PKI directory or registry.db")
    common.add_argument("--json", dest="devices_json", action="store_true", help="JSON output")

    p = commands.add_parser("list", parents=[common], help="all devices, or those matching the filters")
    p.add_argument("--state", choices=[s.value for s in DeviceState])
    p.add_argument("--group")
    p.add_argument("--tenant")
    p.set_defaults(func=_cmd_list)

    p = commands.add_parser("show", parents=[common], help="one device, with its certificates")
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(func=_cmd_show)

    p = commands.add_parser("suspend", parents=[common], help="refuse the device at CONNECT (until resumed)")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--reason", default=None, help='shown in the refusal log line (default: "suspended by operator")')
    p.set_defaults(func=_cmd_suspend)

    p = commands.add_parser("resume", parents=[common], help="let a suspended device connect again")
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(func=_cmd_resume)


def _path(registry: Path) -> Path:
    return registry / REGISTRY_FILE if registry.is_dir() else registry


def _fail(message: str, code: int) -> int:
    print(f"edgegw: error: {message}", file=sys.stderr)
    return code


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        with Registry.open(_path(args.registry), create=False) as reg:
            devices = reg.devices(state=args.state, group=args.group, tenant=args.tenant)
    except RegistryError as exc:
        return _fail(str(exc), 2)
    if args.devices_json:
        print(json.dumps([d.as_dict() for d in devices], indent=2))
    else:
        lines = [f"{'ID':<32} {'STATE':<10} {'GROUP':<16} {'TENANT':<16}"]
        lines += [f"{d.id:<32} {d.state:<10} {d.group:<16} {d.tenant:<16}" for d in devices]
        print("\n".join(lines))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        with Registry.open(_path(args.registry), create=False) as reg:
            device = reg.find(args.device_id)
            certs = reg.certificates(kind="device", name=args.device_id)
    except RegistryError as exc:
        return _fail(str(exc), 2)
    if device is None:
        return _fail(f"no device {args.device_id!r} in {_path(args.registry)}", EXIT_UNKNOWN)
    out = device.as_dict()
    out["certificates"] = [{"serial": c.serial, "not_before": c.not_before.isoformat(),
                            "not_after": c.not_after.isoformat(), "issued_at": c.issued_at,
                            "revoked_at": c.revoked_at.isoformat() if c.revoked_at else None, "reason": c.reason}
                           for c in certs]
    if args.devices_json:
        print(json.dumps(out, indent=2))
    else:
        for key in ("id", "state", "reason", "group", "tenant", "created_at", "updated_at"):
            print(f"{key + ':':<12} {out[key]}")
        print(f"{'metadata:':<12} {json.dumps(out['metadata'], sort_keys=True)}")
        for c in out["certificates"]:
            status = f"revoked {c['revoked_at']} ({c['reason']})" if c["revoked_at"] else "valid"
            print(f"{'cert:':<12} {c['serial']} until {c['not_after']} {status}")
    return 0


def _set(args: argparse.Namespace, state: DeviceState, reason: str | None, default_reason: str) -> int:
    """``reason`` None: keep the reason of a device already in ``state`` (nothing is written then)."""
    try:
        with Registry.open(_path(args.registry), create=False) as reg:
            device = reg.find(args.device_id)
            if device is None:
                return _fail(f"no device {args.device_id!r} in {_path(args.registry)}", EXIT_UNKNOWN)
            if device.state is DeviceState.REVOKED:
                return _fail(f"device {args.device_id!r} is revoked; issue a new certificate to bring it back",
                             EXIT_REVOKED)
            before = device.state
            if device.state is not state or (reason is not None and reason != device.reason):
                device, before = reg.set_state(args.device_id, state, default_reason if reason is None else reason)
    except RegistryError as exc:
        return _fail(str(exc), 2)
    if args.devices_json:
        print(json.dumps({**device.as_dict(), "previous_state": str(before)}, indent=2))
    else:
        print(f"{device.id}: {before} -> {device.state}")
    return 0


def _cmd_suspend(args: argparse.Namespace) -> int:
    return _set(args, DeviceState.SUSPENDED, args.reason, "suspended by operator")


def _cmd_resume(args: argparse.Namespace) -> int:
    return _set(args, DeviceState.ACTIVE, None, "")
