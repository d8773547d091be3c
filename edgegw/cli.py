"""The ``edgegw`` command line. Its commands and exit codes are a contract for fleet scripts:

0 success; 1 runtime failure (e.g. demo lost messages); 2 bad input (config, arguments, certificate material).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from edgegw import runtime
from edgegw.config import load_config
from edgegw.errors import ConfigError, EdgegwError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"edgegw: error: {message}", file=sys.stderr)
    return code


# --- run / check-config ------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from edgegw.daemon import run_until_signalled
    from edgegw.logs import configure_logging

    try:
        config = load_config(args.config)
        loop = runtime.choose(config.gateway.event_loop)  # the start event (gateway.ready) says which one runs
    except ConfigError as exc:
        return _error(f"{args.config}: {exc}")
    configure_logging(args.log_level or config.log.level, config.log.format,
                      rate_limit=config.log.rate_limit, rate_interval=config.log.rate_interval)
    try:
        runtime.run(run_until_signalled(config), loop)
    except EdgegwError as exc:
        return _error(str(exc))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        runtime.choose(config.gateway.event_loop)  # 'uvloop' where it is not installed: exit 2 naming the key
    except ConfigError as exc:
        return _error(f"{args.file}: {exc}")
    missing = [(key, path) for key, path in (
        ("tls.cert", config.tls.cert), ("tls.key", config.tls.key), ("tls.ca", config.tls.ca),
        ("uplink.ca", config.uplink.ca), ("uplink.cert", config.uplink.cert), ("uplink.key", config.uplink.key),
        ("tls.crl", config.tls.crl), ("registry.path", config.registry.path),
    ) if path is not None and not path.is_file()]
    if missing:
        key, path = missing[0]
        return _error(f"{args.file}: {key}: file {path} does not exist")
    print(f"{args.file}: ok")
    return EXIT_OK


# --- init --------------------------------------------------------------------------------------------------------


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def cmd_init(args: argparse.Namespace) -> int:
    from edgegw.pki import init_ca, issue_client, issue_server

    folder: Path = args.dir
    config_path = folder / "edgegw.toml"
    if config_path.exists() and not args.force:
        return _error(f"{config_path} exists (use --force to overwrite)")
    host, port = args.upstream
    hostname = socket.gethostname()
    gateway_id = re.sub(r"[^A-Za-z0-9._-]", "-", hostname)[:128] or "edgegw"
    pki = folder / "pki"
    try:
        init_ca(pki, force=args.force)
        server = issue_server(pki, "gateway", sorted({"localhost", "127.0.0.1", hostname}), force=args.force)
        client = issue_client(pki, "uplink", force=args.force)
    except EdgegwError as exc:
        return _error(str(exc))
    upstream_ca = str(args.upstream_ca.resolve()) if args.upstream_ca else "pki/ca.crt"
    rel = lambda p: p.relative_to(folder).as_posix()  # noqa: E731 - paths in the config are relative to it
    state_dir: Path = args.state_dir.resolve() if args.state_dir else folder / "state"
    outbox_path = (state_dir / "outbox.db").as_posix() if args.state_dir else "state/outbox.db"
    # Under systemd the config folder is read-only (ProtectSystem=strict): everything written goes to the state dir.
    session_store = ((state_dir / "mqtt-sessions.msgpack").as_posix() if args.state_dir
                     else "state/mqtt-sessions.msgpack")
    config_path.write_text(f'''# Written by `edgegw init`. Every key, with its default: configs/edgegw.example.toml
# Relative paths are relative to this file's folder.

[gateway]
id = "{gateway_id}"

[tls]
# The device-facing listener: our certificate, and the fleet CA that signs device certificates.
cert = "{rel(server.cert)}"
key = "{rel(server.key)}"
ca = "pki/ca.crt"

[mqtt]
bind = "0.0.0.0"
port = {args.mqtt_port}
session_store = "{session_store}"

[outbox]
path = "{outbox_path}"

[registry]
# Suspended/revoked devices (`edgegw devices suspend ...`, `edgegw pki revoke ...`) are refused; reloaded on change.
path = "pki/registry.db"

[uplink]
host = "{host}"
port = {port}
ca = "{upstream_ca}"
cert = "{rel(client.cert)}"
key = "{rel(client.key)}"
''', encoding="utf-8")
    state_dir.mkdir(parents=True, exist_ok=True)
    print(f"wrote {config_path}")
    print(f"wrote {pki}/ (CA, server certificate 'gateway', uplink client certificate 'uplink')")
    print(f"next: edgegw pki issue {pki} device DEVICE_ID; edgegw run --config {config_path}")
    return EXIT_OK


# --- docs --------------------------------------------------------------------------------------------------------


def cmd_docs(args: argparse.Namespace) -> int:
    from edgegw.ops.asyncapi import asyncapi_document, render_html

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _error(f"{args.config}: {exc}")
    doc = asyncapi_document(config, host=args.host)
    text = render_html(doc) if args.html else json.dumps(doc, indent=2) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


# --- demo --------------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from edgegw.demo import run_demo

    try:
        loop = runtime.choose(args.event_loop, key="--event-loop")
    except ConfigError as exc:
        return _error(str(exc))
    summary = runtime.run(run_demo(devices=args.devices, seconds=args.seconds, json_output=args.json,
                                   outage=args.outage), loop)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return EXIT_OK if summary["lost"] == 0 and summary["acknowledged"] > 0 else EXIT_FAILED


# --- parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from edgegw.pki.cli import add_pki_parser

    parser = argparse.ArgumentParser(prog="edgegw", description="Edge IoT protocol gateway.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the gateway in the foreground (JSON logs on stdout)")
    p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="overrides log.level")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file: exit 0, or 2 naming the bad key")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("init", help="write DIR/edgegw.toml and a PKI in DIR/pki, ready to run")
    p.add_argument("dir", type=Path)
    p.add_argument("--upstream", type=_host_port, required=True, metavar="HOST:PORT",
                   help="the upstream (cloud) MQTT broker")
    p.add_argument("--upstream-ca", type=Path, help="CA that signs the upstream's certificate (default: DIR/pki/ca.crt)")
    p.add_argument("--mqtt-port", type=int, default=8883, help="device-facing MQTT over TLS port (default 8883)")
    p.add_argument("--state-dir", type=Path, help="folder for the outbox (default DIR/state; systemd: /var/lib/edgegw)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config and PKI")
    p.set_defaults(func=cmd_init)

    add_pki_parser(sub)
    from edgegw.registry.cli import add_devices_parser

    add_devices_parser(sub)
    from edgegw.pipeline.cli import add_pipeline_parsers

    add_pipeline_parsers(sub)  # quarantine list|show|replay|purge, reload

    p = sub.add_parser("docs", help="write the AsyncAPI 3 document of the device-facing API (from a config)")
    p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    p.add_argument("--host", help="host name devices use (default: mqtt.bind, or gateway.local for 0.0.0.0)")
    p.add_argument("--html", action="store_true", help="a self-contained HTML page instead of JSON")
    p.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("demo", help="run a self-contained demo: PKI, gateway, upstream broker, simulated fleet")
    p.add_argument("--devices", type=int, default=50, help="simulated devices (default 50)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long the fleet publishes (default 20)")
    p.add_argument("--outage", type=float, default=None,
                   help="seconds the upstream is away mid-run (default: a quarter of --seconds, at most 5)")
    p.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")
    p.add_argument("--event-loop", choices=runtime.CHOICES, default="asyncio",
                   help="asyncio (default), uvloop, or auto (uvloop when installed), as gateway.event_loop")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
