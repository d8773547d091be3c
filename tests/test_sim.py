"""`edgegw-sim` against a real gateway process, a real mosquitto upstream and certificates from `edgegw pki batch`.

The simulator is the thing under test here, and the gateway its peer: the checks are the simulator's own
accounting (sent == acknowledged, the sink's lost == 0) made against what really crossed the wire, plus the
gateway surviving the bad actors while serving everyone else.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import Fleet, GatewayProcess, LabPKI, Mosquitto, free_port
from edgegw.errors import ConfigError
from edgegw.sim.certs import find_identities
from edgegw.sim.payload import compile_payload
from edgegw.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
N_IDS = 60


def _edgegw(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fleet, Path]:
    """A fleet PKI with the gateway's server certificate and N_IDS devices issued as bundles by `pki batch`."""
    root = tmp_path_factory.mktemp("simpki")
    pki_dir = root / "pki"
    _edgegw("pki", "init", str(pki_dir))
    _edgegw("pki", "issue", str(pki_dir), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1")
    csv = root / "devices.csv"
    csv.write_text("id,group\n" + "".join(f"sim-{i:03d},load\n" for i in range(N_IDS)))
    _edgegw("pki", "batch", str(pki_dir), str(csv), "--out", str(root / "bundles"), "--host", "localhost")
    return Fleet(pki_dir), root / "bundles"


def sim(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """A bound for a hang, not a timing check: a 6 s run took over 60 s on a loaded 2-core machine."""
    return subprocess.run([sys.executable, "-m", "edgegw.sim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def target(gw: GatewayProcess, bundles: Path) -> list[str]:
    return ["--certs", str(bundles), "--host", "127.0.0.1", "--port", str(gw.port), "--server-name", "localhost"]


def sink_flags(broker: Mosquitto, pki: LabPKI) -> list[str]:
    sink = pki.client("sink")
    return ["--sink-port", str(broker.port), "--sink-ca", str(pki.ca), "--sink-cert", str(sink.cert),
            "--sink-key", str(sink.key), "--sink-prefix", "cloud"]


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), f"no summary; exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_fifty_devices_from_a_batch_folder_lose_nothing(
        batch: tuple[Fleet, Path], mosquitto: Mosquitto, pki: LabPKI,
        gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    _, bundles = batch
    gw = gateway()
    acked = tmp_path / "acked.json"
    # A second, independent sink: `edgegw-sim sink` as its own process, told the acknowledged seqs at the end.
    sink = pki.client("sink2")
    sink_proc = subprocess.Popen(
        [sys.executable, "-m", "edgegw.sim", "sink", "--port", str(mosquitto.port), "--ca", str(pki.ca),
         "--cert", str(sink.cert), "--key", str(sink.key), "--prefix", "cloud", "--client-id", "sink2",
         "--acked", str(acked), "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sink_proc.stderr is not None
        first = sink_proc.stderr.readline()  # the first status line: subscribed
        assert " sink  received " in first, first
        proc = sim("run", *target(gw, bundles), "--devices", "50", "--seconds", "3", "--interval", "0.25",
                   "--profile", "jittered", *sink_flags(mosquitto, pki), "--acked-out", str(acked), "--json")
        s = summary_of(proc)
        assert proc.returncode == 0, (s, proc.stderr[-3000:])
        assert s["devices"] == 50 and s["ever_connected"] == 50
        assert s["sent"] >= 50 * 3 * 0.6, s  # 3 s at one message per ~0.25 s each, minus ramp-up
        assert s["acknowledged"] == s["sent"] and s["refused"] == 0 and s["all_acknowledged"], s
        assert s["sink"]["lost"] == 0 and s["sink"]["delivered"] >= s["acknowledged"], s["sink"]
        assert s["sink"]["devices"] == 50 and s["sink"]["malformed"] == 0 and s["sink"]["misrouted"] == 0
        assert s["ack_latency_ms"]["p50"] is not None and s["sink"]["latency_ms"]["p99"] is not None
        status = [line for line in proc.stderr.splitlines() if " publishing " in line]  # the live status line
        assert status and "connected 50/50" in status[-1] and " p99 " in status[-1], proc.stderr[-2000:]
        sink_proc.send_signal(signal.SIGTERM)
        out, err = sink_proc.communicate(timeout=20)
    finally:
        if sink_proc.poll() is None:
            sink_proc.kill()
            sink_proc.wait(5)
    assert sink_proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["lost"] == 0 and report["delivered"] >= s["acknowledged"] and report["devices"] == 50, report


def test_mqtt5_over_two_processes_with_a_reconnect_storm_and_offline_devices(
        batch: tuple[Fleet, Path], mosquitto: Mosquitto, pki: LabPKI,
        gateway: Callable[..., GatewayProcess]) -> None:
    _, bundles = batch
    gw = gateway()
    # Storms and offline cycles every 1.2 s: two of each per worker within 3 s of publishing.
    proc = sim("run", *target(gw, bundles), "--devices", "20", "--protocol", "5", "--processes", "2",
               "--seconds", "3", "--interval", "0.1", "--profile", "bursty", "--burst", "3",
               "--storm-every", "1.2", "--storm-fraction", "0.5", "--offline-every", "1.2", "--offline-for", "1",
               "--offline-fraction", "0.2", *sink_flags(mosquitto, pki), "--json", "--quiet")
    s = summary_of(proc)
    assert proc.returncode == 0, (s, proc.stderr[-3000:])
    assert s["processes"] == 2 and s["devices"] == 20 and s["protocol"] == "5"
    assert s["storms"] >= 2 and s["offline_cycles"] >= 2, s  # summed over both workers
    assert s["reconnects"] >= 10, s  # half of each worker's devices, twice
    assert s["acknowledged"] == s["sent"] > 0 and s["sink"]["lost"] == 0, s


def test_bad_actors_leave_good_devices_working_and_the_gateway_up(
        batch: tuple[Fleet, Path], mosquitto: Mosquitto, pki: LabPKI,
        gateway: Callable[..., GatewayProcess]) -> None:
    _, bundles = batch
    gw = gateway(mqtt={"connect_timeout": 2.0})
    # 4 s of publishing: twice the gateway's connect timeout, which is what refuses the slow connect.
    proc = sim("run", *target(gw, bundles), "--devices", "20", "--seconds", "4", "--interval", "0.2",
               "--wrong-cert", "1", "--foreign-topic", "1", "--flood", "1", "--flood-rate", "500", "--malformed", "1",
               "--slow-connect", "1", *sink_flags(mosquitto, pki), "--json", "--quiet")
    s = summary_of(proc)
    assert proc.returncode == 0, (s, proc.stderr[-3000:])
    assert s["ever_connected"] == 20 and s["acknowledged"] == s["sent"] > 0 and s["sink"]["lost"] == 0, s
    bad = s["bad_actors"]
    assert set(bad) == {"wrong_cert", "foreign_topic", "flood", "malformed", "slow_connect"}, bad
    for kind in ("wrong_cert", "foreign_topic", "malformed", "slow_connect"):
        assert bad[kind].get("refused", 0) >= 1 and bad[kind].get("accepted", 0) == 0, (kind, bad)
    assert bad["flood"].get("sent", 0) > 0, bad
    assert gw.proc is not None and gw.proc.poll() is None, gw.log()[-3000:]  # still running
    # ...and still serving: a fresh, short run connects and is acknowledged.
    again = summary_of(sim("run", *target(gw, bundles), "--devices", "5", "--seconds", "1", "--interval", "0.2",
                           "--json", "--quiet"))
    assert again["ever_connected"] == 5 and again["acknowledged"] == again["sent"] > 0, again
    assert gw.events("tls.handshake_failed") or gw.events("mqtt.connect_refused"), "the wrong cert left no trace"


def test_coap_devices_over_tls(batch: tuple[Fleet, Path], mosquitto: Mosquitto, pki: LabPKI,
                                gateway: Callable[..., GatewayProcess]) -> None:
    _, bundles = batch
    coap_port = free_port()
    gw = gateway(coap={"enabled": True, "bind": "127.0.0.1", "port": coap_port})
    proc = sim("run", "--certs", str(bundles), "--host", "127.0.0.1", "--port", str(coap_port), "--server-name",
               "localhost", "--transport", "coap", "--devices", "10", "--seconds", "3", "--interval", "0.1",
               "--storm-every", "1.5", *sink_flags(mosquitto, pki), "--json", "--quiet")
    s = summary_of(proc)
    assert proc.returncode == 0, (s, proc.stderr[-3000:], gw.log()[-3000:])
    assert s["ever_connected"] == 10 and s["reconnects"] >= 10, s  # every device again after the storm
    assert s["acknowledged"] == s["sent"] >= 10 * 3 * 10 * 0.6 and s["refused"] == 0, s
    assert s["sink"]["lost"] == 0 and s["sink"]["devices"] == 10 and s["sink"]["misrouted"] == 0, s["sink"]
    proc = sim("run", "--certs", str(bundles), "--port", str(coap_port), "--transport", "coap", "--topic",
               "other/{device_id}")
    assert proc.returncode == 2 and "telemetry.topic: CoAP devices publish under" in proc.stderr, proc.stderr


def test_dtls_devices(batch: tuple[Fleet, Path], mosquitto: Mosquitto, pki: LabPKI,
                      gateway: Callable[..., GatewayProcess], fleet: Fleet, tmp_path: Path) -> None:
    # CoAP over DTLS (edgegw/sim/dtls_device.py): each device's certificate in its handshake, CON POSTs answered
    # after the commit; a storm kicks every session, so each reconnects with a new handshake and resends.
    _, bundles = batch
    dtls_port = free_port()
    gw = gateway(coap={"enabled": True, "bind": "127.0.0.1", "port": free_port(), "dtls": True,
                       "dtls_port": dtls_port, "dtls_handshakes_per_second": 200.0})
    proc = sim("run", "--certs", str(bundles), "--host", "127.0.0.1", "--port", str(dtls_port), "--transport",
               "dtls", "--devices", "10", "--seconds", "3", "--interval", "0.1", "--storm-every", "1.5",
               *sink_flags(mosquitto, pki), "--json", "--quiet")
    s = summary_of(proc)
    assert proc.returncode == 0, (s, proc.stderr[-3000:], gw.log()[-3000:])
    assert s["ever_connected"] == 10 and s["reconnects"] >= 10, s
    assert s["acknowledged"] == s["sent"] >= 10 * 3 * 10 * 0.6 and s["refused"] == 0, s
    assert s["sink"]["lost"] == 0 and s["sink"]["devices"] == 10 and s["sink"]["misrouted"] == 0, s["sink"]
    # The gateway saw certificate identities over DTLS, not over its TLS port.
    assert {e["device_id"] for e in gw.events("dtls.session_established")} >= {f"sim-{i:03d}" for i in range(10)}
    # A device whose certificate the gateway's CA did not sign never gets a session: only connect failures.
    # The session's other fleet (conftest `fleet`: `edgegw pki init` + a device issued there), not one made here.
    rogue = fleet.folder.parent / "rogue"
    scenario = tmp_path / "rogue.toml"
    # Short bounds: a refused handshake fails within them many times over on loopback (the default waits are 60 s).
    scenario.write_text("[devices]\nconnect_timeout = 1.5\n[run]\nconnect_wait = 1.0\ndrain_timeout = 1.0\n")
    proc = sim("run", str(scenario), "--certs", str(rogue), "--ca", str(batch[0].ca), "--host", "127.0.0.1",
               "--port", str(dtls_port), "--transport", "dtls", "--seconds", "1", "--interval", "0.2", "--json",
               "--quiet")
    s = summary_of(proc)
    assert s["ever_connected"] == 0 and s["acknowledged"] == 0 and s["connect_failures"] >= 1, s
    assert any("handshake" in e for e in s["last_errors"]), s
    proc = sim("run", "--certs", str(bundles), "--port", str(dtls_port), "--transport", "dtls", "--flood", "1")
    assert proc.returncode == 2 and "bad_actors: the bad actors speak MQTT only" in proc.stderr, proc.stderr


def test_scenario_files_and_bad_input(tmp_path: Path, batch: tuple[Fleet, Path]) -> None:
    for example in sorted((ROOT / "simulators").glob("*.toml")):
        load_scenario(example)  # every shipped example is valid
    bad = tmp_path / "bad.toml"
    bad.write_text('[telemetry]\nintervall = 2\n')
    proc = sim("run", str(bad))
    assert proc.returncode == 2 and "telemetry.intervall: unknown key" in proc.stderr, proc.stderr
    bad.write_text('[devices]\nwindow = "many"\n')
    proc = sim("run", str(bad))
    assert proc.returncode == 2 and "devices.window: must be int" in proc.stderr, proc.stderr
    proc = sim("run", "--certs", str(tmp_path), "--port", "1")
    assert proc.returncode == 2 and "devices.certs: no device certificates" in proc.stderr, proc.stderr
    _, bundles = batch
    proc = sim("run", "--certs", str(bundles), "--devices", "59", "--flood", "2", "--port", "1")
    assert proc.returncode == 2 and "devices.count" in proc.stderr, proc.stderr
    with pytest.raises(ConfigError, match=r"telemetry.payload: unknown placeholder \{temp\}"):
        compile_payload('{"t": {temp}}')
    body = compile_payload('{"device":"{device_id}","seq":{seq},"v":{randint:3:3},"c":"{choice:x}"}')("d", 7, 0.0)
    assert json.loads(body) == {"device": "d", "seq": 7, "v": 3, "c": "x"}


def test_identity_layouts(batch: tuple[Fleet, Path], tmp_path: Path) -> None:
    fleet, bundles = batch
    from_bundles = find_identities(bundles)
    assert [i.device_id for i in from_bundles] == [f"sim-{i:03d}" for i in range(N_IDS)]
    assert from_bundles[0].cert.name == "chain.pem" and from_bundles[0].ca.name == "ca.crt"
    one = find_identities(bundles / "sim-007")
    assert [i.device_id for i in one] == ["sim-007"]
    from_pki = find_identities(fleet.folder)  # `edgegw pki issue` layout: devices/<id>.crt
    assert {f"sim-{i:03d}" for i in range(N_IDS)} <= {i.device_id for i in from_pki}
    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "sim-001.tar.gz", "w:gz") as t:
        t.add(bundles / "sim-001", arcname="sim-001")
    unpacked = find_identities(tars, unpack_dir=tmp_path / "unpacked")
    assert [i.device_id for i in unpacked] == ["sim-001"] and unpacked[0].key.is_file()
    # A PKI with an intermediate: the anchor is the self-signed root (the issuing ca.crt alone verifies nothing).
    inter = tmp_path / "inter"
    _edgegw("pki", "init", str(inter), "--intermediate")
    _edgegw("pki", "issue", str(inter), "device", "int-1")
    found = find_identities(inter)
    assert [i.device_id for i in found] == ["int-1"] and found[0].ca.name == "root-ca.crt"


@pytest.fixture
def gateway(tmp_path: Path, batch: tuple[Fleet, Path], pki: LabPKI,
            mosquitto: Mosquitto) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a real `edgegw run` trusting this module's fleet CA (it signed the batch), uplink to ``mosquitto``."""
    made: list[GatewayProcess] = []

    def start(**overrides: dict[str, Any]) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / f"gw{len(made)}", batch[0], pki, mosquitto, overrides=overrides)
        made.append(gw)
        return gw.start()

    yield start
    for gw in made:
        gw.kill()
