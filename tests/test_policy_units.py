"""Policy pieces without sockets: every decode/encode format through a route, the tenant-aware command mapping and
its subscription filters, and the otel destination of a routed record (issue #6 items 2, 5)."""

from __future__ import annotations

import json

import cbor2
import msgpack
import pytest
from test_pipeline import pipeline

from edgegw.pipeline.commands import TenantCommands, covers
from edgegw.pipeline.steps import StepError
from edgegw.uplink._wire import upstream_topic

ROUTE = """
[transforms.t]
steps = [{op = "rename", fields = {t = "temp"}}]

[[routes]]
match = "devices/{device_id}/x"
decode = "%s"
encode = "%s"
transforms = ["t"]
"""


@pytest.mark.parametrize(("fmt", "dump"), [("json", lambda d: json.dumps(d).encode()), ("cbor", cbor2.dumps),
                                           ("msgpack", msgpack.packb)])
@pytest.mark.parametrize(("out", "load"), [("json", json.loads), ("msgpack", msgpack.unpackb)])
def test_every_decode_and_encode_format(fmt: str, dump: object, out: str, load: object) -> None:
    p = pipeline(ROUTE % (fmt, out))
    (record,) = p.process("d1", "", "devices/d1/x", dump({"t": 21.5, "id": 7}), 1, None, 0.0)  # type: ignore[operator]
    assert load(record.payload) == {"temp": 21.5, "id": 7}  # type: ignore[operator]
    content_type = msgpack.unpackb(record.properties)["ct"]
    assert content_type == {"json": "application/json", "msgpack": "application/msgpack"}[out]
    with pytest.raises(StepError, match=f"decode {fmt}"):
        p.process("d1", "", "devices/d1/x", b"\xc1\xff{", 1, None, 0.0)


def test_a_raw_route_keeps_the_payload_and_a_routed_topic_maps_through_the_one_upstream_function() -> None:
    p = pipeline('[[routes]]\nmatch = "devices/{device_id}/#"\ntopic = "plant/{device_id}/{rest}"\n')
    (record,) = p.process("d1", "", "devices/d1/a/b", b"\x00\x01 not json", 0, None, 0.0)
    assert record.payload == b"\x00\x01 not json"
    assert upstream_topic("cloud", "d1", record.topic) == "plant/d1/a/b"  # what the uplink and the spans show


def _commands(prefixes: str, tenants: dict[str, str], topic: str = "{prefix}/+/cmd/#") -> TenantCommands:
    p = pipeline(f'[tenants]\nsource = "registry"\nprefixes = {{ {prefixes} }}\n')
    return TenantCommands(topic, "cloud", lambda: p, lambda device_id: tenants.get(device_id, ""))


def test_commands_map_only_into_the_devices_own_tenant_space() -> None:
    c = _commands('globex = "gx/edge"', {"d-acme": "acme", "d-gx": "globex"})
    assert c.target("cloud/acme/d-acme/cmd/reboot") == ("d-acme", "devices/d-acme/cmd/reboot")
    assert c.target("gx/edge/d-gx/cmd/blink") == ("d-gx", "devices/d-gx/cmd/blink")
    for crossing in ("cloud/acme/d-gx/cmd/x", "gx/edge/d-acme/cmd/x", "cloud/globex/d-gx/cmd/x",
                     "cloud/d-acme/cmd/x", "cloud/acme/nobody/cmd/x", "elsewhere/d-acme/cmd/x"):
        assert isinstance(c.target(crossing), str), crossing
    assert set(c.filters()) == {"gx/edge/+/cmd/#", "cloud/+/+/cmd/#"}
    # Response topics: into the device's namespace only from its own space; records' under their tenant's prefix.
    assert c.device_response_topic("cloud/acme/d-acme/reply") == "devices/d-acme/reply"
    assert c.device_response_topic("gx/edge/d-acme/reply") == "gx/edge/d-acme/reply"  # not its space: as it is
    assert (c.prefix_of("globex"), c.prefix_of("acme"), c.prefix_of(None)) == ("gx/edge", "cloud/acme", "cloud")
    # Filters covered by another are left out (a broker may deliver once per matching subscription).
    assert set(_commands('a = "cloud/a"', {}, "{prefix}/#").filters()) == {"cloud/+/#"}
    assert covers("cloud/+/#", "cloud/a/#") and not covers("cloud/a/#", "cloud/+/#")
    assert covers("a/+/c", "a/b/c") and not covers("a/+/c", "a/b/c/d") and not covers("a/b", "a/+")


def test_without_tenants_commands_map_as_before() -> None:
    p = pipeline('[[routes]]\nmatch = "devices/{device_id}/#"\n')
    c = TenantCommands("{prefix}/+/cmd/#", "cloud", lambda: p, lambda device_id: None)
    assert c.filters() == ("cloud/+/cmd/#",)
    assert c.target("cloud/d1/cmd/x") == ("d1", "devices/d1/cmd/x")
    assert TenantCommands("{prefix}/#", "cloud", lambda: None, lambda d: None).target("other/d1/x") == \
        "topic outside the prefix"


def test_the_pipeline_benchmark_runs_and_checks_its_chain() -> None:
    """bench/pipeline.py (issue #6 item 8, figures in docs/BENCHMARKS.md): a short run still measures every case
    (the figure itself is not asserted: no timing assertions on a shared machine)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "pipeline.py"
    proc = subprocess.run([sys.executable, str(script), "--seconds", "0.2", "--rounds", "1"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["summary"]) == {"typical_chain", "route_only_raw", "bare_json_msgpack"}
    assert all(v > 0 for v in summary["summary"].values()) and summary["typical_chain_us_per_record"] > 0


def test_a_records_response_topic_goes_up_under_its_tenants_prefix() -> None:
    """The uplink maps a device's Response Topic like the record's topic: under the prefix of the record's tenant."""
    from types import SimpleNamespace

    from edgegw.uplink.paho_bridge import Uplink

    c = _commands('globex = "gx/edge"', {})
    fake = SimpleNamespace(commands=c, _settings=SimpleNamespace(topic_prefix="cloud"), _log=None)
    record = SimpleNamespace(id=1, device_id="d1")
    rt = {"rt": "devices/d1/reply"}
    assert Uplink._response_topic(fake, record, {**rt, "tn": "globex"}) == "gx/edge/d1/reply"  # type: ignore[arg-type]
    assert Uplink._response_topic(fake, record, {**rt, "tn": "acme"}) == "cloud/acme/d1/reply"  # type: ignore[arg-type]
    assert Uplink._response_topic(fake, record, rt) == "cloud/d1/reply"  # type: ignore[arg-type]


def test_a_routes_qos_and_priority_class_override_the_devices() -> None:
    p = pipeline('[[routes]]\nmatch = "devices/{device_id}/alarm"\nqos = 0\npriority = "alarm"\n'
                 '[[routes]]\nmatch = "devices/{device_id}/#"\npriority = 0\n')
    (alarm,) = p.process("d1", "", "devices/d1/alarm", b"x", 1, None, 0.0)
    (other,) = p.process("d1", "", "devices/d1/t", b"x", 1, None, 0.0)
    assert (alarm.qos, alarm.priority) == (0, 2)  # the route's QoS and class (docs/OUTBOX.md priorities)
    assert (other.qos, other.priority) == (1, 0)  # no qos in the route: the device's
