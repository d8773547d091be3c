"""``gateway.event_loop``: uvloop or the standard asyncio loop, chosen at start (edgegw/runtime.py).

The gateway processes of the other tests run on the default (``asyncio`` for now) and the in-process tests on
pytest-asyncio's standard loop. Here one real gateway per loop carries MQTT over TLS (3.1.1 and 5), CoAP over DTLS
(and over TLS on the standard loop), a SIGHUP reload and a SIGTERM drain, so both loops stay covered end to end; a
machine without uvloop is played by a PYTHONPATH folder whose ``uvloop`` package fails to import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, LabPKI, Mosquitto, free_port, wait_until
from paho.mqtt.enums import MQTTProtocolVersion
from test_coap_tcp import coap, start_gateway
from test_gateway_e2e import Device

from edgegw import runtime
from edgegw.config import config_from_mapping
from edgegw.errors import ConfigError

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
COAP_CLIENT = shutil.which("coap-client-openssl")


def minimal(fleet: Fleet, pki: LabPKI, **gateway: Any) -> dict[str, Any]:
    return {"gateway": gateway,
            "tls": {"cert": str(fleet.folder / "server" / "gateway.crt"),
                    "key": str(fleet.folder / "server" / "gateway.key"), "ca": str(fleet.ca)},
            "uplink": {"host": "127.0.0.1", "ca": str(pki.ca), "cert": str(pki.client("uplink").cert),
                       "key": str(pki.client("uplink").key)}}


def write_config(path: Path, event_loop: str, fleet: Fleet, pki: LabPKI) -> Path:
    sections = minimal(fleet, pki, event_loop=event_loop)
    sections["outbox"] = {"path": str(path.parent / "outbox.db")}
    path.write_text("".join(f"[{name}]\n" + "".join(f'{k} = "{v}"\n' for k, v in values.items()) + "\n"
                            for name, values in sections.items()))
    return path


@pytest.fixture
def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """The environment of a process on a machine where ``import uvloop`` fails (as on a 32-bit Raspberry Pi)."""
    folder = tmp_path / "no-uvloop" / "uvloop"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text('raise ImportError("no uvloop here (test)")\n')
    return dict(os.environ, PYTHONPATH=str(folder.parent))


def edgegw(*args: str, env: dict[str, str] | None = None, module: str = "edgegw") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], check=False, capture_output=True, text=True,
                          timeout=60, env=env)


# --- the key ---------------------------------------------------------------------------------------------------


def test_default_is_asyncio_and_a_bad_value_names_the_key(fleet: Fleet, pki: LabPKI) -> None:
    # asyncio until CoAP over TLS and the lab listener work under uvloop (docs/OPERATIONS.md "Event loop").
    assert config_from_mapping(minimal(fleet, pki), base_dir=Path("/")).gateway.event_loop == "asyncio"
    for value in runtime.CHOICES:
        assert config_from_mapping(minimal(fleet, pki, event_loop=value), base_dir=Path("/")).gateway.event_loop \
            == value
    for bad in ("libuv", "", 1, True):
        with pytest.raises(ConfigError) as info:
            config_from_mapping(minimal(fleet, pki, event_loop=bad), base_dir=Path("/"))
        assert info.value.key == "gateway.event_loop"
        assert "'auto', 'uvloop', 'asyncio'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        runtime.choose("libuv", key="--event-loop")
    assert info.value.key == "--event-loop"


def test_check_config_validates_the_key(tmp_path: Path, fleet: Fleet, pki: LabPKI) -> None:
    for value in ("auto", "asyncio", *(("uvloop",) if HAVE_UVLOOP else ())):
        proc = edgegw("check-config", str(write_config(tmp_path / f"{value}.toml", value, fleet, pki)))
        assert proc.returncode == 0 and proc.stdout.strip().endswith(": ok"), proc.stderr
    proc = edgegw("check-config", str(write_config(tmp_path / "bad.toml", "uv", fleet, pki)))
    assert proc.returncode == 2 and "gateway.event_loop" in proc.stderr, proc.stderr


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")
def test_auto_picks_uvloop_when_it_can_be_imported() -> None:
    assert runtime.choose("auto").name == "uvloop"
    assert runtime.choose("uvloop").name == "uvloop"
    assert runtime.choose("asyncio") == runtime.STANDARD

    async def which() -> str:
        return runtime.running_loop_name()

    assert runtime.run(which(), runtime.choose("uvloop")) == "uvloop"
    assert runtime.run(which(), runtime.STANDARD) == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error_naming_the_key(
        tmp_path: Path, fleet: Fleet, pki: LabPKI, without_uvloop: dict[str, str]) -> None:
    probe = subprocess.run([sys.executable, "-c", "from edgegw import runtime; print(runtime.choose('auto').name)"],
                           check=False, capture_output=True, text=True, timeout=30, env=without_uvloop)
    assert probe.stdout.strip() == "asyncio", probe.stderr
    auto = write_config(tmp_path / "auto.toml", "auto", fleet, pki)
    assert edgegw("check-config", str(auto), env=without_uvloop).returncode == 0
    wanted = write_config(tmp_path / "uvloop.toml", "uvloop", fleet, pki)
    for proc in (edgegw("check-config", str(wanted), env=without_uvloop),
                 edgegw("run", "--config", str(wanted), env=without_uvloop)):
        assert proc.returncode == 2, proc.stderr
        assert "gateway.event_loop: 'uvloop' is not installed" in proc.stderr, proc.stderr
    # The demo and the simulator say the same about their flag, before they start anything.
    for proc in (edgegw("demo", "--event-loop", "uvloop", "--seconds", "1", env=without_uvloop),
                 edgegw("run", "--event-loop", "uvloop", "--certs", str(tmp_path), env=without_uvloop,
                        module="edgegw.sim.cli")):
        assert proc.returncode == 2, proc.stderr
        assert "--event-loop: 'uvloop' is not installed" in proc.stderr, proc.stderr


# --- a real gateway on each loop ------------------------------------------------------------------------------


NEEDS_UVLOOP = pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin (coap-client-openssl) not installed")
@pytest.mark.parametrize("event_loop", ["asyncio", pytest.param("uvloop", marks=NEEDS_UVLOOP)])
def test_gateway_end_to_end_on_each_loop(event_loop: str, fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any,
                                         sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    dtls_port = free_port()
    # coaps+tcp only on the standard loop: see test_coaps_tcp_on_uvloop below.
    gw = start_gateway(gateway_factory, mosquitto, gateway={"event_loop": event_loop},
                       coap={"dtls": True, "dtls_port": dtls_port})
    assert gw.wait_for_event("gateway.ready")["event_loop"] == event_loop
    gw.wait_for_event("uplink.connected")
    devices = [Device(fleet, gw, "dev-01").connect(),
               Device(fleet, gw, "dev-02", protocol=MQTTProtocolVersion.MQTTv5).connect()]
    try:
        assert all(d.connected.is_set() for d in devices)
        for seq in range(100):
            for d in devices:
                d.publish(seq)
        wait_until(lambda: all(len(d.acked) == 100 for d in devices), 30, what="all PUBACKs")
        # CoAP over TLS (aiocoap on the loop's start_tls) and over DTLS (our pyOpenSSL transport on a datagram
        # endpoint): an empty output is a 2.04 with no payload.
        coap_payloads = {b'{"over":"dtls"}'}
        if event_loop == "asyncio":
            assert coap(fleet.device("dev-03"), fleet.ca, "post",
                        f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps/telemetry", '{"over":"tcp"}', "json").strip() == ""
            coap_payloads.add(b'{"over":"tcp"}')
        assert coap(fleet.device("dev-04"), fleet.ca, "post", f"coaps://127.0.0.1:{dtls_port}/ps/telemetry",
                    '{"over":"dtls"}', "json").strip() == ""
        messages = sink.wait_for(lambda m: len(m) >= 200 + len(coap_payloads), 30)
        # SIGHUP: the loop's signal handler re-reads the config, sessions stay up.
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_event("config.reloaded", trigger="SIGHUP")
        devices[0].publish(100)
        wait_until(lambda: len(devices[0].acked) == 101, 10, what="a PUBACK after the reload")
        assert not devices[0].disconnected.is_set()
    finally:
        for d in devices:
            d.close()
    by_device: dict[str, list[int]] = {}
    for m in messages:
        if m.topic.endswith("/telemetry") and m.topic.startswith(("cloud/dev-01/", "cloud/dev-02/")):
            by_device.setdefault(m.topic.split("/")[1], []).append(json.loads(m.payload)["seq"])
    assert by_device == {"dev-01": list(range(100)), "dev-02": list(range(100))}
    assert {m.payload for m in messages if m.topic.startswith(("cloud/dev-03/", "cloud/dev-04/"))} == coap_payloads
    sink.wait_for(lambda m: len(m) >= 201 + len(coap_payloads), 10)
    # SIGTERM: drained and stopped in order, exit 0.
    assert gw.terminate() == 0
    assert gw.events("gateway.stopped"), gw.log()[-3000:]


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin (coap-client-openssl) not installed")
@NEEDS_UVLOOP
def test_coaps_tcp_on_uvloop(fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any) -> None:
    """coaps+tcp under uvloop: TLS from the first byte of a plain accepted socket (coap/tls_listener.py), so no
    ClientHello can reach a plain-text protocol (uvloop reads right after connection_made, paused or not)."""
    gw = start_gateway(gateway_factory, mosquitto, gateway={"event_loop": "uvloop"})
    for i in range(5):
        out = coap(fleet.device("dev-05"), fleet.ca, "post", f"coaps+tcp://127.0.0.1:{gw.coap_port}/ps/telemetry",
                   f'{{"n":{i}}}', "json", wait=3)
        assert out.strip() == "", out
    assert gw.terminate() == 0
