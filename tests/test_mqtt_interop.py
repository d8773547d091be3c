"""The Eclipse Paho MQTT interoperability suites (vendored in tests/interop/paho, EPL-1.0 / EDL-1.0, see NOTICE)
against `edgegw run` processes with a lab listener (plain TCP, client id = identity, ACL open).

The suites are run unmodified (`client_test5.py` is a unittest module run as its authors run it; `client_test.py` is
a script that prints "... succeeded" / "... failed" per test, whose test functions tests/interop/run_client_test.py
calls in the script's order, so that it too can be split). Their tests sleep a lot (a 15 s keep-alive test, a
10 s session expiry test, a 1.1 s pause in every DISCONNECT), so they are split into shards, each against its own
gateway (the suites use fixed client ids and clean up retained messages with a `#` subscription, so shards must not
share a broker), and the shards run in parallel.

Tests that cannot pass by design are listed in EXPECTED_FAILURES with the reason; they must fail (an unexpected
pass is reported too, so the list stays true).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import GatewayProcess, Mosquitto, free_port

PAHO = Path(__file__).parent / "interop" / "paho"

EXPECTED_FAILURES_V5: dict[str, str] = {
    # Identity comes from the client id on the lab listener (the certificate CN elsewhere): an empty id has no
    # identity, so it is refused (CONNACK 0x85), and no client identifier is ever assigned (issue #3).
    "test_assigned_clientid": "a server-assigned client identifier is never offered: the id is the identity",
    # The lab listener's ACL is open (every topic may be subscribed to), so there is no topic whose subscription
    # is refused; on a TLS listener the ACL refuses with 0x87 (tests/test_mqtt_broker_e2e.py).
    "test_subscribe_failure": "the lab listener allows every subscription (ACL open by design)",
    # The gateway sends no topic aliases to devices (docs/MQTT.md "Not done yet").
    "test_server_topic_alias": "the gateway never sends topic aliases to devices",
}
# client_test5's test_zero_length_clientid returns False instead of failing, so unittest counts it as passed
# whatever the server does; it is still run, and the refusal is checked in tests/test_mqtt_broker_e2e.py.

EXPECTED_FAILURES_V311: dict[str, str] = {
    "Zero length clientid test": "an empty client id is refused (0x02), even with clean session: the id is the "
                                 "identity",
    "Subscribe failure test": "the lab listener allows every subscription (ACL open by design)",
    # The suite itself says to omit it where $-topics may not be published: ours refuses them (a 3.1.1 publish
    # refused means the connection is closed), so the client's DISCONNECT finds its QoS 1 publish unacknowledged.
    "$ topics test": "devices may not publish to $-topics (docs/MQTT.md); 3.1.1 has no negative PUBACK",
}

V5_SHARDS: list[list[str]] = [
    # Balanced by measured shard times (~20-26 s each, with ~4 s of the suite's clean-up), so no shard runs much
    # longer than its longest test (session expiry, subscribe options). Order within a shard matters: test_basic
    # after test_keepalive can hang (the keep-alive test leaves its client behind).
    ["test_session_expiry", "test_assigned_clientid"],
    ["test_basic", "test_keepalive", "test_server_keep_alive"],
    ["test_subscribe_options"],
    ["test_redelivery_on_reconnect", "test_publication_expiry", "test_offline_message_queueing"],
    ["test_will_delay", "test_will_message", "test_flow_control1", "test_flow_control2"],
    ["test_server_topic_alias", "test_subscribe_identifiers", "test_request_response", "test_user_properties",
     "test_payload_format", "test_dollar_topics", "test_zero_length_clientid"],
    ["test_client_topic_alias", "test_maximum_packet_size", "test_shared_subscriptions"],
    ["test_overlapping_subscriptions", "test_subscribe_failure", "test_unsubscribe", "test_retained_message"],
]
ALL_V5 = sorted(t for shard in V5_SHARDS for t in shard)

LAB = {"mqtt": {"lab": True, "max_keepalive": 60, "receive_maximum": 16}}
"""max_keepalive 60: the suite expects Server Keep Alive 60 for a keep-alive of 120. receive_maximum 16: the
flow-control test publishes Receive Maximum + 1 QoS 2 messages and expects DISCONNECT 0x93."""


def lab_gateway(gateway_factory: Any, broker: Mosquitto) -> tuple[GatewayProcess, int]:
    """A gateway with a lab listener on a port of its own, not started yet."""
    port = free_port()
    overrides = {"mqtt": {**LAB["mqtt"], "lab_port": port}}
    return gateway_factory(broker, overrides=overrides), port


V311_SHARDS: list[list[str]] = [
    # Names of client_test.py's functions (tests/interop/run_client_test.py runs them in the suite's order).
    ["keepalive_test"],  # sleeps 15 s by itself
    ["basic_test", "retained_message_test", "offline_message_queueing_test", "will_message_test",
     "overlapping_subscriptions_test", "redelivery_on_reconnect_test", "zero_length_clientid_test",
     "subscribe_failure_test", "dollar_topics_test"],
]
SHARD_TIMEOUT = 120.0
FIRST_RUN_TIMEOUT = 60.0
"""A first run's bound (the longest shard takes ~30 s): client_test5's test_basic sometimes hangs for good, its own
client's threads racing for one socket (``getPacket`` then spins on ``recv(1) == b""`` after the server's
DISCONNECT for a second CONNECT); that shard is then run again (gateway code of 2026-11-30 01:45 hangs too)."""


def run_suite(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    """One shard, its output into ``out`` (a file, not a pipe: shards are waited for together, none blocks on a
    full pipe)."""
    env = {**os.environ, "PYTHONPATH": str(PAHO)}
    with open(out, "wb") as sink:
        return subprocess.Popen([sys.executable, *args], cwd=PAHO, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_shards(shards: list[tuple[str, list[str]]], mosquitto: Mosquitto, gateway_factory: Any,
               out_dir: Path, timeout: float = SHARD_TIMEOUT) -> tuple[dict[str, str], dict[str, float]]:
    """Each shard against a fresh gateway of its own, all side by side: its output (``(killed: time out)`` appended
    if it outlived ``timeout``) and the seconds it took."""
    started = time.monotonic()
    gateways = {name: lab_gateway(gateway_factory, mosquitto) for name, _ in shards}

    def launch(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        gw, port = gateways[name]
        gw.start()
        return run_suite([a.replace("{port}", str(port)) for a in args], out_dir / f"{name}.out")

    # The gateways start side by side (started one after the other, the last shard began ~10 s after the first);
    # each shard begins as soon as its own gateway is ready. gateway_factory kills the gateways at teardown.
    with ThreadPoolExecutor(len(shards)) as pool:
        futures = {name: pool.submit(launch, name, args) for name, args in shards}
        try:
            procs = {name: future.result(timeout=60) for name, future in futures.items()}
        except BaseException:
            for future in futures.values():
                if future.done() and future.exception() is None:
                    future.result().kill()
                    future.result().wait(10)
            raise

    seconds: dict[str, float] = {}
    deadline = started + timeout
    while len(seconds) < len(procs) and time.monotonic() < deadline:
        for name, proc in procs.items():
            if name not in seconds and proc.poll() is not None:
                seconds[name] = round(time.monotonic() - started, 1)
        time.sleep(0.1)
    outputs: dict[str, str] = {}
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        outputs[name] = (out_dir / f"{name}.out").read_text(errors="replace")
        if name not in seconds:
            outputs[name] += "\n(killed: time out)"
    return outputs, seconds


def shard_results(name: str, out: str) -> tuple[dict[str, str], list[str]]:
    """A shard's results per test, and what is wrong with them (unexpected results, an incomplete run)."""
    kind, i = name.split("-")
    if kind == "v5":
        # unittest's own summary: "Ran N tests", then one "FAIL: test_x" / "ERROR: test_x" block per failure (the
        # per-test "... ok" lines are interleaved with warnings and docstrings, so they are not parsed).
        shard = V5_SHARDS[int(i)]
        if not re.search(rf"^Ran {len(shard)} tests? in", out, re.MULTILINE):
            return {}, [f"{name}: did not run its {len(shard)} tests"]
        failed = {t: v for v, t in re.findall(r"^(FAIL|ERROR): (test_\w+)", out, re.MULTILINE)}
        results = {t: failed.get(t, "ok") for t in shard}
        return results, [f"{t}: {v}" for t, v in results.items() if (v != "ok") != (t in EXPECTED_FAILURES_V5)]
    shard = V311_SHARDS[int(i)]
    found = re.findall(r"^(.+ test) (succeeded|failed)$", out, re.MULTILINE)
    if len(found) != len(shard) or not re.search(r"^test suite (succeeded|failed)$", out, re.MULTILINE):
        return {}, [f"{name}: {len(found)} of its {len(shard)} tests reported"]
    results = dict(found)
    return results, [f"{t}: {v}" for t, v in results.items() if (v != "succeeded") != (t in EXPECTED_FAILURES_V311)]


@pytest.mark.slow  # ~30 s: the suites' own sleeps (test_subscribe_options alone takes ~25 s), shards in parallel
def test_paho_interop_suites(mosquitto: Mosquitto, gateway_factory: Any, tmp_path: Path) -> None:
    """A shard with a wrong result runs once more, against a fresh gateway, and the test passes only if that run is
    right (with a warning naming what failed first): the suites' own fixed waits (2-3 s for a message that takes
    milliseconds) have failed alone on a loaded machine. A real defect fails both runs."""
    started = time.monotonic()
    shards: list[tuple[str, list[str]]] = [
        (f"v311-{i}", [str(PAHO.parent / "run_client_test.py"), "{port}", *shard])
        for i, shard in enumerate(V311_SHARDS)]
    shards += [(f"v5-{i}", ["client_test5.py", "-p", "{port}", "-v", *[f"Test.{t}" for t in shard]])
               for i, shard in enumerate(V5_SHARDS)]
    outputs, seconds = run_shards(shards, mosquitto, gateway_factory, tmp_path, FIRST_RUN_TIMEOUT)
    results = {name: shard_results(name, out) for name, out in outputs.items()}
    again = [(name, args) for name, args in shards if results[name][1]]
    if again:
        retry_dir = tmp_path / "again"
        retry_dir.mkdir()
        first = {name: results[name][1] for name, _ in again}
        retried, _ = run_shards(again, mosquitto, gateway_factory, retry_dir)
        for name, out in retried.items():
            outputs[name] = f"(first run: {first[name]})\n{out}"
            results[name] = shard_results(name, out)
        warnings.warn(f"interop shards that failed once and were run again: {first}", stacklevel=1)
    elapsed = time.monotonic() - started

    report = "\n\n".join(f"===== {n}\n{o[-6000:]}" for n, o in outputs.items())
    v5_results = {t: v for name, (r, _) in results.items() if name.startswith("v5") for t, v in r.items()}
    v311_results = {t: v for name, (r, _) in results.items() if name.startswith("v311") for t, v in r.items()}
    print(f"interop suites ran in {elapsed:.1f} s (shards done after {seconds})\nv5: {v5_results}\n"
          f"v3.1.1: {v311_results}")
    wrong = {name: problems for name, (_, problems) in results.items() if problems}
    assert not wrong, f"unexpected results (twice) {wrong}\n{report}"
    assert sorted(v5_results) == ALL_V5, report
    assert len(v311_results) == 10, report  # each of the suite's 10 tests, once
