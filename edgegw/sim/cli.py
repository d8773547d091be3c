"""``edgegw-sim``: the device fleet simulator and the cloud sink on the command line.

    edgegw-sim run [SCENARIO.toml] --certs BUNDLES --host H --port P [--devices N] [--processes K] [--json] ...
    edgegw-sim sink --port P --ca CA --cert CRT --key KEY [--prefix edgegw] [--seconds S] [--acked FILE] [--json]

A scenario comes from a TOML file (simulators/*.toml), flags, or both (flags win). The live status line goes to
stderr; the summary to stdout (a JSON object with ``--json``, nothing else on stdout then). Exit status of ``run``:
0 when every device connected, everything sent was acknowledged and (with a sink) nothing acknowledged was lost;
1 otherwise; 2 for a bad scenario or bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from asyncio import sslproto
from pathlib import Path
from typing import Any

from edgegw import runtime
from edgegw.errors import EdgegwError
from edgegw.sim.device import SeqSet

TLS_READ_BUFFER = 4 * 1024
"""asyncio's TLS read buffer per device connection. Measured with 1,000 devices: 16 KiB -> 92.8 KB of simulator RSS
per device, 4 KiB -> 80-83 KB; acknowledgements are a few bytes, so nothing gets slower."""

# (flag, section, key, type, help) -> the scenario's keys (simulators/README.md has the whole list)
_FLAGS: tuple[tuple[str, str, str, Any, str], ...] = (
    ("--host", "target", "host", str, "gateway host (default 127.0.0.1)"),
    ("--port", "target", "port", int, "gateway MQTT port (default 8883)"),
    ("--server-name", "target", "server_name", str, "name to check in the gateway's certificate (default: host)"),
    ("--certs", "devices", "certs", Path, "folder of `edgegw pki batch` bundles (or a PKI folder)"),
    ("--ca", "devices", "ca", Path, "the gateway's CA (default: each bundle's ca.crt)"),
    ("--devices", "devices", "count", int, "how many devices (default: every identity found)"),
    ("--transport", "devices", "transport", str, "mqtt (default), coap (coaps+tcp: POST /ps/...), dtls (coaps: DTLS, UDP)"),
    ("--protocol", "devices", "protocol", str, "MQTT protocol: 3.1.1 or 5"),
    ("--window", "devices", "window", int, "unacknowledged QoS 1 messages per device (default 16)"),
    ("--keepalive", "devices", "keepalive", int, "MQTT keep-alive seconds (default 60)"),
    ("--connect-rate", "devices", "connect_rate", float, "new connections per second per process (default 200)"),
    ("--profile", "telemetry", "profile", str, "periodic, jittered or bursty"),
    ("--interval", "telemetry", "interval", float, "seconds between a device's messages / bursts (default 1)"),
    ("--jitter", "telemetry", "jitter", float, "jittered: +- this share of the interval (default 0.2)"),
    ("--burst", "telemetry", "burst", int, "bursty: messages per burst (default 10)"),
    ("--topic", "telemetry", "topic", str, "topic template (default devices/{device_id}/telemetry)"),
    ("--payload", "telemetry", "payload", str, "payload template: {device_id} {seq} {ts} {rand:A:B} ..."),
    ("--seconds", "run", "seconds", float, "publishing time (default 30)"),
    ("--processes", "run", "processes", int, "spread the devices over K processes (default 1)"),
    ("--drain-timeout", "run", "drain_timeout", float, "wait this long for the last PUBACKs (default 30)"),
    ("--storm-every", "chaos", "storm_every", float, "drop the links of --storm-fraction devices every S seconds"),
    ("--storm-fraction", "chaos", "storm_fraction", float, "share of devices in a reconnect storm (default 1)"),
    ("--offline-every", "chaos", "offline_every", float, "send --offline-fraction devices offline every S s"),
    ("--offline-for", "chaos", "offline_for", float, "how long they stay offline (default 5)"),
    ("--offline-fraction", "chaos", "offline_fraction", float, "share of devices going offline (default 0.1)"),
    ("--wrong-cert", "bad_actors", "wrong_cert", int, "bad actors with a certificate from another CA"),
    ("--foreign-topic", "bad_actors", "foreign_topic", int, "bad actors publishing under another device's topic"),
    ("--flood", "bad_actors", "flood", int, "bad actors flooding QoS 0 at --flood-rate"),
    ("--flood-rate", "bad_actors", "flood_rate", float, "messages/s of each flooding actor (default 2000)"),
    ("--malformed", "bad_actors", "malformed", int, "bad actors sending bytes that are not MQTT"),
    ("--slow-connect", "bad_actors", "slow_connect", int, "bad actors sending CONNECT one byte a second"),
    ("--sink-host", "sink", "host", str, "upstream broker to check delivery on (default 127.0.0.1)"),
    ("--sink-port", "sink", "port", int, "its port: enables the delivery check"),
    ("--sink-ca", "sink", "ca", Path, "CA of the upstream broker"),
    ("--sink-cert", "sink", "cert", Path, "the sink's client certificate"),
    ("--sink-key", "sink", "key", Path, "the sink's key"),
    ("--sink-prefix", "sink", "topic_prefix", str, "the gateway's uplink topic_prefix (default edgegw)"),
    ("--sink-protocol", "sink", "protocol", str, "3.1.1 or 5"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgegw-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="simulate a device fleet against a gateway")
    run.add_argument("scenario", nargs="?", type=Path, help="scenario TOML file (simulators/*.toml)")
    for flag, section, key, kind, text in _FLAGS:
        run.add_argument(flag, dest=f"{section}.{key}", type=kind, default=None, help=text,
                         metavar=key.split("_")[-1].upper())
    run.add_argument("--rate", type=float, default=None,
                     help="total messages/s of the fleet: sets --interval to devices / rate")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    run.add_argument("--acked-out", type=Path, help="write every device's acknowledged seqs (JSON) for "
                                                    "`edgegw-sim sink --acked`")
    run.add_argument("--quiet", action="store_true", help="no status line")
    run.add_argument("--event-loop", choices=runtime.CHOICES, default="asyncio",
                     help="asyncio (default), uvloop, or auto (uvloop when installed); also for the workers")

    sink = commands.add_parser("sink", help="subscribe upstream and check delivery per device")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--ca", type=Path, required=True)
    sink.add_argument("--cert", type=Path, required=True)
    sink.add_argument("--key", type=Path, required=True)
    sink.add_argument("--prefix", default="edgegw", help="the gateway's uplink topic_prefix (default edgegw)")
    sink.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    sink.add_argument("--client-id", default="edgegw-sim-sink")
    sink.add_argument("--seconds", type=float, default=0.0, help="stop after S seconds (default: at SIGINT/SIGTERM)")
    sink.add_argument("--acked", type=Path, help="`edgegw-sim run --acked-out` file, read when the sink stops: "
                                                 "report exact losses")
    sink.add_argument("--per-device", action="store_true", help="include per-device counts in the summary")
    sink.add_argument("--json", action="store_true")
    sink.add_argument("--quiet", action="store_true", help="no status line")
    sink.add_argument("--event-loop", choices=runtime.CHOICES, default="asyncio",
                      help="asyncio (default), uvloop, or auto (uvloop when installed)")

    commands.add_parser("worker", help=argparse.SUPPRESS)  # internal: one process of --processes K
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own process: a device reads CONNACK/PUBACK/PINGRESP only, so asyncio's 256 KiB TLS read buffer per
    # connection is waste (BRIEF §2). The attribute is process-wide; see TLS_READ_BUFFER. (uvloop's TLS has its
    # own buffer, allocated but only touched as far as reads go.)
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER  # type: ignore[attr-defined]
    try:
        from edgegw.sim.worker import EVENT_LOOP_ENV
        from edgegw.sim.worker import main as worker_main

        if args.command == "worker":
            return worker_main()
        loop = runtime.choose(args.event_loop, key="--event-loop")
        os.environ[EVENT_LOOP_ENV] = args.event_loop  # inherited by the workers of --processes K
        if args.command == "sink":
            return runtime.run(_sink(args), loop)
        return runtime.run(_run(args), loop)
    except EdgegwError as exc:
        print(f"edgegw-sim: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:  # a peer that is not there (sink broker, workers): say so, exit 1
        print(f"edgegw-sim: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace) -> int:
    from edgegw.sim.scenario import load_scenario
    from edgegw.sim.simulate import StatusLine, simulate

    overrides: dict[str, dict[str, Any]] = {}
    for _, section, key, _, _ in _FLAGS:
        overrides.setdefault(section, {})[key] = getattr(args, f"{section}.{key}")
    scenario = load_scenario(args.scenario, overrides)
    if args.rate is not None:
        if args.rate <= 0:
            raise _bad("--rate", f"must be > 0, got {args.rate}")
        from edgegw.sim.certs import find_identities
        n = scenario.devices.count
        if not n and scenario.devices.certs is not None:
            n = len(find_identities(scenario.devices.certs)) - scenario.bad_actors.with_identity
        n = max(n, 1)
        scenario = load_scenario(args.scenario, {**overrides, "telemetry": {**overrides["telemetry"],
                                                                            "interval": n / args.rate}})
    acked_store: dict[str, SeqSet] = {}
    summary = await simulate(scenario, status=StatusLine(None if args.quiet else sys.stderr),
                             on_acked=acked_store.update)
    if args.acked_out:
        args.acked_out.write_text(json.dumps({d: s.to_ranges() for d, s in acked_store.items()}))
    ok = summary["ever_connected"] == summary["devices"] and summary.get("all_acknowledged") and \
        summary["sent"] > 0 and \
        summary["acknowledged"] + summary["refused"] == summary["sent"] and \
        ("sink" not in summary or summary["sink"].get("lost") == 0)
    summary["ok"] = bool(ok)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_run(summary)
    return 0 if ok else 1


async def _sink(args: argparse.Namespace) -> int:
    from edgegw.sim.simulate import StatusLine
    from edgegw.sim.sink import CloudSink
    from edgegw.tlsutil import client_ssl_context

    sink = CloudSink(args.host, args.port, client_ssl_context(args.ca, args.cert, args.key), topic_prefix=args.prefix,
                     client_id=args.client_id, protocol=args.protocol)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sink.start(timeout=10.0)
    status = StatusLine(None if args.quiet else sys.stderr)
    try:
        started = loop.time()
        last = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if args.seconds and loop.time() - started >= args.seconds:
                break
            n = sink.received
            p50, p99 = sink.latencies.percentiles(50, 99)
            status.text(f"sink  received {n} ({n - last}/s)  delivered {sink.delivered}  duplicates "
                        f"{sink.duplicates}  gaps {sink.gaps()}  latency p50 {_ms(p50)} ms  p99 {_ms(p99)} ms")
            last = n
    finally:
        status.end()
        sink.stop()
    acked = None
    if args.acked:  # read at the end: `edgegw-sim run --acked-out` writes it when its run is over
        try:
            acked = {d: SeqSet.from_ranges(r) for d, r in json.loads(args.acked.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise _bad("--acked", f"cannot read {args.acked}: {exc}") from None
    report = sink.report(acked)
    if args.per_device:
        report["per_device"] = sink.per_device()
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"  {k:<13} {v}" for k, v in report.items()))
    return 0 if report.get("lost", report["gaps"]) == 0 else 1


def _print_run(s: dict[str, Any]) -> None:
    lat = s.get("ack_latency_ms") or {}
    lines = [
        f"edgegw-sim: {s['devices']} devices (MQTT {s['protocol']}, {s['processes']} process(es)), "
        f"{s['publish_seconds']:g} s publishing, {s['elapsed_s']:g} s in all",
        f"  sent          {s['sent']:>9}   first transmissions (QoS 1)",
        f"  acknowledged  {s['acknowledged']:>9}   PUBACK success"
        + (f"; refused {s['refused']}" if s["refused"] else ""),
        f"  unacked       {s['unacknowledged']:>9}   not sent: {s['not_sent']}, dropped (device buffer full): "
        f"{s['dropped']}",
        f"  connections   {s['ever_connected']} of {s['devices']} connected, {s['reconnects']} reconnects, "
        f"{s['connect_failures']} failed attempts, {s['storms']} storms, {s['offline_cycles']} offline cycles",
        f"  rate          {s['ack_rate_per_s']} msg/s acknowledged while publishing",
        f"  ack latency   p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, max {lat.get('max')} ms",
    ]
    for kind, tally in (s.get("bad_actors") or {}).items():
        lines.append(f"  bad actor     {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    if "sink" in s:
        k = s["sink"]
        lines.append(f"  sink          delivered {k['delivered']}, lost {k['lost']}, duplicates {k['duplicates']}, "
                     f"out of order {k['out_of_order']}, latency p50 {k['latency_ms']['p50']} ms "
                     f"p99 {k['latency_ms']['p99']} ms")
    for err in s.get("worker_errors", []):
        lines.append(f"  worker error  {err}")
    lines.append(f"  result        {'OK' if s['ok'] else 'FAILED'}")
    print("\n".join(lines))


def _bad(flag: str, message: str) -> EdgegwError:
    from edgegw.errors import ConfigError
    return ConfigError(flag, message)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


if __name__ == "__main__":
    sys.exit(main())
