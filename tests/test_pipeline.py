"""The pipeline without sockets: the expression language, steps, routes, tenants, config errors, and the engine
against a real outbox (SQLite file): ack after the last commit, dropped messages acked at once, poison messages
in the quarantine table."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegw.config import OutboxSettings, config_from_mapping
from edgegw.errors import ConfigError
from edgegw.outbox import _record
from edgegw.outbox.store import Outbox
from edgegw.pipeline import settings as pipeline_settings
from edgegw.pipeline.engine import Pipeline
from edgegw.pipeline.expr import ExprError, compile_expr
from edgegw.pipeline.settings import parse_pipeline
from edgegw.pipeline.steps import StepError
from edgegw.pipeline.tenants import RegistryView, TenantResolver, tenant_from_peercert
from edgegw.uplink._wire import upstream_topic


def pipeline(text: str, *, prefix: str = "cloud", registry: Path | None = None, base: Path = Path(".")) -> Pipeline:
    return Pipeline(parse_pipeline(tomllib.loads(text), base), topic_prefix=prefix, registry_path=registry)


def run(p: Pipeline, topic: str, payload: Any, *, device: str = "d1", tenant: str = "", at: float = 0.0) -> list[Any]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return p.process(device, tenant, topic, body, 1, None, at)


# --- expressions --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "env", "expected"), [
    ("a * 9 / 5 + 32", {"a": 100}, 212.0),
    ("temp > 5 and not (mode == \"off\")", {"temp": 6, "mode": "on"}, True),
    ("round(x, 1) if x > 1 else -x ** 2", {"x": 1.26}, 1.3),
    ("-x ** 2", {"x": 3}, -9),
    ("2 ** 3 ** 2", {}, 512),
    ("max(a, b, 3) - min(a, b)", {"a": 1, "b": 7}, 6),
    ("s.inner.v + 1", {"s": {"inner": {"v": 41}}}, 42),
    ("\"err\" in lower(status)", {"status": "ERROR-3"}, True),
    ("7 // 2 + 7 % 2", {}, 4),
    ("device_id + \"/\" + tenant", {}, "d1/acme"),
])
def test_expressions_evaluate(text: str, env: dict[str, Any], expected: Any) -> None:
    from edgegw.pipeline.steps import Context, _Env
    ctx = Context("d1", "acme", "devices/d1/x", 0.0, {})
    assert compile_expr(text)(_Env(env, ctx)) == expected


@pytest.mark.parametrize("text", [
    "a +", "__import__('os')", "a[0]", "a; b", "open('x')", "lambda: 1", "(1",
    "x" + " + x" * 300, "(" * 50 + "1" + ")" * 50, "",
])
def test_unsafe_or_malformed_expressions_are_refused_at_load(text: str) -> None:
    with pytest.raises(ExprError):
        compile_expr(text)


@pytest.mark.parametrize(("text", "env"), [
    ("9 ** 99999", {}), ("missing + 1", {}), ("a / 0", {"a": 1}), ("\"x\" * 3", {}), ("len(5)", {}),
    ("a.__class__", {"a": 1}), ("a.__class__.__mro__", {"a": {}}), ("a < \"s\"", {"a": 1}),
])
def test_evaluation_errors_are_expr_errors(text: str, env: dict[str, Any]) -> None:
    with pytest.raises(ExprError):
        compile_expr(text)(env)


# --- config -------------------------------------------------------------------------------------------------------

BASE = {"tls": {"cert": "c", "key": "k", "ca": "a"}, "uplink": {"host": "h", "ca": "a", "cert": "c", "key": "k"}}


@pytest.mark.parametrize(("extra", "key"), [
    ({"routes": [{"match": "devices/+/#", "topic": "x/{nope}"}]}, "routes[0].topic"),
    ({"routes": [{"match": "devices/#/x"}]}, "routes[0].match"),
    ({"routes": [{"match": "a", "qos": 3}]}, "routes[0].qos"),
    ({"routes": [{"match": "a", "transforms": ["ghost"], "decode": "json"}]}, "routes[0].transforms"),
    ({"routes": [{"match": "a", "colour": "red"}]}, "routes[0].colour"),
    ({"routes": [{"match": "a", "priority": "urgent"}]}, "routes[0].priority"),
    ({"transforms": {"t": {"steps": [{"op": "explode"}]}}}, "transforms.t.steps[0].op"),
    ({"transforms": {"t": {"steps": [{"op": "derive", "field": "x", "expr": "import os"}]}}},
     "transforms.t.steps[0].expr"),
    ({"transforms": {"t": {"steps": [{"op": "convert", "field": "x", "from": "degC", "to": "m"}]}}},
     "transforms.t.steps[0].to"),
    ({"transforms": {"t": {"steps": [{"op": "validate", "schema": {"type": "bogus"}}]}}},
     "transforms.t.steps[0].schema"),
    ({"transforms": {"t": {"steps": [{"op": "call", "callable": "no_such_module_xyz:f"}]}}},
     "transforms.t.steps[0].callable"),
    ({"transforms": {"t": {"steps": [{"op": "scale", "field": "x", "factor": "2"}]}}},
     "transforms.t.steps[0].factor"),
    ({"versions": {"v1": {"adapter": "missing"}}}, "versions.v1.adapter"),
    ({"tenants": {"source": "cert-cn"}}, "tenants.source"),
    ({"routing": {"unmatched": "bounce"}}, "routing.unmatched"),
    ({"pipelines": {}}, "pipelines"),
])
def test_bad_pipeline_config_names_the_key(extra: dict[str, Any], key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**BASE, **extra}, base_dir=tmp_path)
    assert info.value.key == key, str(info.value)


def test_no_pipeline_config_means_no_pipeline(tmp_path: Path) -> None:
    config = config_from_mapping(dict(BASE), base_dir=tmp_path)
    assert not config.pipeline.enabled
    from edgegw.pipeline.reload import build_pipeline
    assert build_pipeline(config) is None


def test_priority_classes_agree_with_the_outbox() -> None:
    assert (pipeline_settings.PRIORITY_BULK, pipeline_settings.PRIORITY_TELEMETRY, pipeline_settings.PRIORITY_ALARM,
            pipeline_settings.MAX_PRIORITY) == (_record.PRIORITY_BULK, _record.PRIORITY_TELEMETRY,
                                                _record.PRIORITY_ALARM, _record.MAX_PRIORITY)


# --- transforms ---------------------------------------------------------------------------------------------------

CHAIN = """
[transforms.t]
steps = [
  {op = "rename", fields = {t = "temp", h = "humidity", p = "pressure"}},
  {op = "drop", fields = ["debug"]},
  {op = "set", fields = {schema = 2}},
  {op = "convert", field = "temp", from = "degF", to = "degC"},
  {op = "scale", field = "pressure", factor = 0.01, offset = 0},
  {op = "derive", field = "hot", expr = "temp > 30"},
  {op = "validate", schema = {type = "object", required = ["temp", "humidity"], properties = {temp = {type = "number"}}}},
]
[[routes]]
name = "tele"
match = "devices/{device_id}/telemetry"
topic = "{prefix}/{device_id}/t"
decode = "json"
encode = "msgpack"
transforms = ["t"]
"""


def test_a_typical_chain_renames_converts_derives_validates_and_encodes() -> None:
    p = pipeline(CHAIN)
    [out] = run(p, "devices/d1/telemetry", {"t": 212, "h": 40, "p": 101325, "debug": "x"})
    body = msgpack.unpackb(out.payload)
    assert body == {"temp": pytest.approx(100.0), "humidity": 40, "pressure": pytest.approx(1013.25),
                    "schema": 2, "hot": True}
    assert upstream_topic("ignored", "d1", out.topic) == "cloud/d1/t"
    assert msgpack.unpackb(out.properties)["ct"] == "application/msgpack"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "decode json"),
    (json.dumps({"t": "hot"}).encode(), "convert: field 'temp' is a str"),
    (json.dumps({"t": 1}).encode(), "schema: data must contain"),
    (json.dumps({"h": 1}).encode(), "derive: field 'temp' is missing"),
    (json.dumps([1, 2]).encode(), "rename: the payload is a list"),
])
def test_poison_payloads_raise_step_errors_with_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(StepError) as info:
        run(pipeline(CHAIN), "devices/d1/telemetry", payload)
    assert reason in str(info.value)


def test_filter_deadband_and_downsample_are_per_device() -> None:
    p = pipeline("""
[transforms.f]
steps = [{op = "filter", expr = "temp > -40"}, {op = "downsample", interval = 10},
         {op = "deadband", field = "temp", delta = 0.5}]
[[routes]]
match = "devices/{device_id}/t"
decode = "json"
transforms = ["f"]
""")
    assert run(p, "devices/d1/t", {"temp": -50}, at=0) == []  # filtered
    assert len(run(p, "devices/d1/t", {"temp": 20}, at=1)) == 1
    assert run(p, "devices/d1/t", {"temp": 25}, at=5) == []  # moved, but within 10 s of the last one sent
    assert run(p, "devices/d1/t", {"temp": 20.4}, at=30) == []  # within the deadband
    assert len(run(p, "devices/d2/t", {"temp": 20.4}, device="d2", at=31)) == 1  # another device: own state
    assert len(run(p, "devices/d1/t", {"temp": 25}, at=42)) == 1
    assert p.stats.dropped == {"route0": 3}


def test_split_and_plugin_callable_make_several_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myplugin.py").write_text(
        "def double(data, ctx):\n    return [dict(data, n=1), dict(data, n=2, dev=ctx.device_id)]\n"
        "def boom(data, ctx):\n    raise KeyError('oops')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = pipeline("""
[transforms.s]
steps = [{op = "split", field = "readings"}, {op = "call", callable = "myplugin:double"}]
[transforms.b]
steps = [{op = "call", callable = "myplugin:boom"}]
[[routes]]
match = "devices/{device_id}/batch"
decode = "json"
transforms = ["s"]
[[routes]]
match = "devices/{device_id}/boom"
decode = "json"
transforms = ["b"]
""")
    outs = run(p, "devices/d1/batch", {"site": "x", "readings": [{"v": 1}, {"v": 2}]})
    bodies = [json.loads(o.payload) for o in outs]
    assert bodies == [{"site": "x", "v": 1, "n": 1}, {"site": "x", "v": 1, "n": 2, "dev": "d1"},
                      {"site": "x", "v": 2, "n": 1}, {"site": "x", "v": 2, "n": 2, "dev": "d1"}]
    with pytest.raises(StepError, match="callable myplugin:boom: KeyError"):
        run(p, "devices/d1/boom", {})
    sys.modules.pop("myplugin", None)


def test_enrich_from_the_registry(tmp_path: Path) -> None:
    from edgegw.registry.store import Registry
    path = tmp_path / "registry.db"
    with Registry.open(path) as reg:
        reg.register("d1", tenant="acme", group="gold", metadata={"site": "berlin-3", "model": "TH-2"})
    p = pipeline("""
[tenants]
source = "registry"
[transforms.e]
steps = [{op = "enrich", fields = ["site", "model", "tenant", "group"], into = "meta"}]
[[routes]]
match = "devices/{device_id}/t"
topic = "{prefix}/{device_id}/t"
decode = "json"
transforms = ["e"]
""", registry=path)
    tenant = p.tenants.tenant("d1", "", None)
    assert tenant == "acme"
    [out] = run(p, "devices/d1/t", {"v": 1}, tenant=tenant)
    assert json.loads(out.payload) == {"v": 1, "meta": {"site": "berlin-3", "model": "TH-2", "tenant": "acme",
                                                       "group": "gold"}}
    assert out.topic == "\x00cloud/acme/d1/t"
    assert msgpack.unpackb(out.properties)["tn"] == "acme"


# --- routing ------------------------------------------------------------------------------------------------------

ROUTES = """
[[routes]]
name = "alarms"
match = "devices/{device_id}/alarm/{kind}"
topic = "alarms/{kind}/{device_id}"
priority = "alarm"
qos = 1
continue = true
[[routes]]
name = "all"
match = "devices/{device_id}/#"
topic = "{prefix}/{device_id}/{rest}"
priority = "bulk"
"""


def test_routes_first_match_wins_unless_continue() -> None:
    p = pipeline(ROUTES)
    outs = run(p, "devices/d1/alarm/fire", b"!")
    assert [(upstream_topic("x", "d1", o.topic), o.priority) for o in outs] == [("alarms/fire/d1", 2),
                                                                                ("cloud/d1/alarm/fire", 0)]
    [out] = run(p, "devices/d1/env/t", b"1")
    assert (upstream_topic("x", "d1", out.topic), out.payload) == ("cloud/d1/env/t", b"1")


def test_device_id_and_tenant_placeholders_must_be_the_devices_own() -> None:
    p = pipeline("""
[routing]
unmatched = "drop"
[[routes]]
match = "tenants/{tenant}/devices/{device_id}/#"
topic = "{prefix}/{device_id}/{rest}"
""")
    assert len(run(p, "tenants/acme/devices/d1/x", b"1", tenant="acme")) == 1
    assert run(p, "tenants/globex/devices/d1/x", b"1", tenant="acme") == []  # another tenant's space
    assert run(p, "tenants/acme/devices/d2/x", b"1", tenant="acme") == []  # another device's
    assert run(p, "tenants/acme/devices/d1/x", b"1", tenant="") == []  # no tenant matches no {tenant}
    assert p.stats.unmatched == 3


def test_unmatched_passes_unchanged_without_tenants_and_under_the_tenant_prefix_with() -> None:
    p = pipeline(ROUTES.replace("devices/{device_id}/#", "devices/{device_id}/env/#"))
    [out] = run(p, "devices/d1/other", b"raw")
    assert (out.topic, out.payload, out.properties) == ("devices/d1/other", b"raw", None)  # as without a pipeline
    p = pipeline('[tenants]\nsource = "cert-o"\nprefixes = {globex = "gx/edge"}\n')
    [out] = run(p, "devices/d1/other", b"raw", tenant="acme")
    assert upstream_topic("cloud", "d1", out.topic) == "cloud/acme/d1/other"
    [out] = run(p, "devices/d1/other", b"raw", tenant="globex")
    assert upstream_topic("cloud", "d1", out.topic) == "gx/edge/d1/other"


def test_tenant_from_certificate_organization_or_unit() -> None:
    cert = {"subject": ((("organizationName", "acme"),), (("organizationalUnitName", "plant-7"),),
                        (("commonName", "d1"),))}
    assert tenant_from_peercert(cert, "organizationName") == "acme"
    assert tenant_from_peercert(cert, "organizationalUnitName") == "plant-7"
    two = {"subject": ((("organizationName", "a"),), (("organizationName", "b"),))}
    assert tenant_from_peercert(two, "organizationName") is None  # ambiguous: none
    settings = parse_pipeline({"tenants": {"source": "cert-o", "default": "public"}}, Path(".")).tenants
    resolver = TenantResolver(settings, RegistryView(None))
    calls = []
    assert resolver.tenant("d1", "0A", lambda: calls.append(1) or cert) == "acme"
    assert resolver.tenant("d1", "0A", lambda: calls.append(1) or cert) == "acme"
    assert calls == [1]  # read once per certificate
    evil = {"subject": ((("organizationName", "acme/../globex"),),)}
    assert resolver.tenant("d2", "0B", lambda: evil) == "public"  # not one topic level: the default
    assert resolver.tenant("d3", "", lambda: None) == "public"


def test_version_adapter_and_deprecation_counted_per_device() -> None:
    p = pipeline("""
[transforms.v1_to_v2]
steps = [{op = "rename", fields = {tmp = "temp"}}, {op = "scale", field = "temp", factor = 0.1}]
[versions.v1]
adapter = "v1_to_v2"
deprecated = true
sunset = "2027-01-01"
[versions.v2]
[[routes]]
match = "devices/{device_id}/{version}/telemetry"
topic = "{prefix}/{device_id}/telemetry"
decode = "json"
""")
    [v1] = run(p, "devices/d1/v1/telemetry", {"tmp": 215})
    [v2] = run(p, "devices/d1/v2/telemetry", {"temp": 21.5})
    assert json.loads(v1.payload) == pytest.approx(json.loads(v2.payload)) == {"temp": 21.5}
    assert v1.topic == v2.topic
    run(p, "devices/d1/v1/telemetry", {"tmp": 1})
    run(p, "devices/d2/v1/telemetry", {"tmp": 1}, device="d2")
    assert p.stats.deprecated == {"d1": 2, "d2": 1}


# --- against a real outbox ----------------------------------------------------------------------------------------

async def _outbox(tmp_path: Path) -> tuple[Outbox, asyncio.Task[None]]:
    outbox = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db", commit_window_ms=5))
    return outbox, asyncio.create_task(outbox.run())


async def test_several_records_ack_once_after_all_commit_dropped_at_once_poison_quarantined(tmp_path: Path) -> None:
    from edgegw.pipeline.poison import PoisonStore
    p = pipeline(CHAIN.replace('name = "tele"', 'name = "tele"\ncontinue = true') + """
[[routes]]
name = "copy"
match = "devices/{device_id}/telemetry"
topic = "raw/{device_id}"
[[routes]]
name = "quiet"
match = "devices/{device_id}/quiet"
decode = "json"
transforms = ["f"]
[transforms.f]
steps = [{op = "filter", expr = "false"}]
""")
    outbox, writer = await _outbox(tmp_path)
    poison = p.poison = await PoisonStore(tmp_path / "quarantine.db").open()
    poison_task = asyncio.create_task(poison.run())
    acks: list[tuple[str, bool]] = []
    try:
        def ack(name: str) -> Any:
            return lambda ok: acks.append((name, ok))
        first = p.submit(outbox, "d1", "", "devices/d1/telemetry", json.dumps({"t": 50, "h": 1}).encode(), 1,
                         ack("two"), None)
        assert first is not None and outbox.pending_count == 2 and acks == []
        assert p.submit(outbox, "d1", "", "devices/d1/quiet", b"{}", 1, ack("dropped"), None) is None
        assert acks == [("dropped", True)]  # at once, nothing stored
        p.submit(outbox, "d1", "", "devices/d1/telemetry", b"{broken", 1, ack("poison"), None)
        for _ in range(300):
            if len(acks) == 3:
                break
            await asyncio.sleep(0.01)
        assert sorted(acks) == [("dropped", True), ("poison", True), ("two", True)]
        records = await outbox.fetch_after(0, 10)
        assert sorted(upstream_topic("cloud", r.device_id, r.topic) for r in records) == ["cloud/d1/t", "raw/d1"]
        assert outbox.pending_count == 0 and outbox.depth == 2  # the poison message never entered the outbox
    finally:
        poison.stop()
        await poison_task
        await poison.close()
        outbox.stop()
        await writer
        await outbox.close()
    import sqlite3
    row = sqlite3.connect(tmp_path / "quarantine.db").execute("SELECT payload, reason FROM quarantine").fetchone()
    assert row[0] == b"{broken" and row[1].startswith("pipeline: decode json")
    assert p.stats.quarantined == 1


def test_units_are_exact_enough() -> None:
    from edgegw.pipeline.units import linear
    f, o = linear("k", "degC", "degF")
    assert f * 100 + o == pytest.approx(212)
    f, o = linear("k", "km/h", "m/s")
    assert math.isclose(f * 36 + o, 10)


def test_policy_doc_examples_load(tmp_path: Path) -> None:
    """The TOML examples of docs/POLICY.md (pipeline sections) parse, and those without external files compile."""
    import re
    doc = (Path(__file__).resolve().parent.parent / "docs" / "POLICY.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", doc, re.DOTALL) if "[limits" not in b]
    assert len(blocks) >= 7
    for block in blocks:
        tomllib.loads(block)  # every snippet is valid TOML
    examples = doc[doc.index("## Examples"):doc.index("## Cost")]
    complete = [b for b in re.findall(r"```toml\n(.*?)```", examples, re.DOTALL)
                if "schema_file" not in b and "callable" not in b]
    assert len(complete) == 2  # IoT telemetry, SaaS multi-tenant (e-commerce names files and a plug-in)
    for block in complete:
        assert parse_pipeline(tomllib.loads(block), tmp_path).enabled


def test_a_route_rendering_an_empty_or_dollar_topic_is_a_poison_message() -> None:
    p = pipeline('[[routes]]\nmatch = "devices/{device_id}/#"\ntopic = "{rest}"\n')
    with pytest.raises(StepError, match="empty"):
        run(p, "devices/d1", b"x")
    assert upstream_topic("c", "d1", run(p, "devices/d1/a/b", b"x")[0].topic) == "a/b"


_ATOMS = st.sampled_from(["a", "b.c", "1", "2.5", "-", "+", "*", "/", "//", "%", "**", "(", ")", ",", "and", "or",
                          "not", "if", "else", "in", "==", "<", ">=", "\"s\"", "round", "max", "len", "true", "null",
                          "[", ";", "__class__", "."])


@settings(max_examples=400, deadline=None)
@given(st.lists(_ATOMS, max_size=30), st.text(max_size=20))
def test_expression_fuzz_parses_or_raises_expr_error_only(tokens: list[str], noise: str) -> None:
    """One rule, as for the MQTT codec: any text either compiles and evaluates to a value, or raises ExprError."""
    for text in (" ".join(tokens), " ".join(tokens) + noise, noise):
        try:
            fn = compile_expr(text)
        except ExprError:
            continue
        try:
            fn({"a": 3, "b": {"c": -1.5}})
        except ExprError:
            pass


async def test_an_unforeseen_error_in_a_step_quarantines_the_message(tmp_path: Path) -> None:
    from edgegw.pipeline.poison import PoisonStore
    p = pipeline('[transforms.s]\nsteps = [{op = "scale", field = "v", factor = 0.5}]\n'
                 '[[routes]]\nmatch = "devices/{device_id}/t"\ndecode = "json"\ntransforms = ["s"]\n')
    outbox, writer = await _outbox(tmp_path)
    poison = p.poison = await PoisonStore(tmp_path / "quarantine.db").open()
    task = asyncio.create_task(poison.run())
    acked: list[bool] = []
    try:
        p.submit(outbox, "d1", "", "devices/d1/t", b'{"v": 1' + b"0" * 400 + b"}", 1, acked.append, None)
        for _ in range(300):
            if acked:
                break
            await asyncio.sleep(0.01)
        assert acked == [True]
        [row] = await poison.read(None)
        assert row[7].startswith("pipeline: OverflowError in the pipeline")
    finally:
        poison.stop()
        await task
        await poison.close()
        outbox.stop()
        await writer
        await outbox.close()


async def test_poison_store_keeps_its_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgegw.pipeline import poison as poison_module
    monkeypatch.setattr(poison_module, "MAX_ROWS", 3)
    monkeypatch.setattr(poison_module, "MAX_BYTES", 1000)
    store = await poison_module.PoisonStore(tmp_path / "q.db").open()
    task = asyncio.create_task(store.run())
    done: list[bool] = []
    try:
        for i in range(5):
            store.put("d1", "devices/d1/t", f"m{i}".encode(), 1, None, "pipeline: x", 0.0, done.append)
        while len(done) < 5:
            await asyncio.sleep(0.01)
        assert [r[3] for r in await store.read(None)] == [b"m2", b"m3", b"m4"]
        store.put("d1", "devices/d1/t", b"A" * 900, 1, b"p" * 50, "pipeline: x", 0.0, done.append)
        while len(done) < 6:
            await asyncio.sleep(0.01)
        assert [r[3][:1] for r in await store.read(None)] == [b"m", b"m", b"A"]  # rows cap: m2 went
        store.put("d1", "devices/d1/t", b"B" * 900, 1, None, "pipeline: x", 0.0, done.append)
        while len(done) < 7:
            await asyncio.sleep(0.01)
        assert [r[3][:1] for r in await store.read(None)] == [b"B"]  # bytes cap: under 1000 again
        assert store.evicted == 6 and done == [True] * 7
    finally:
        store.stop()
        await task
        await store.close()


# --- review findings: tenant-less devices, staged step state, fair quarantine caps --------------------------------

def test_a_device_without_a_tenant_goes_under_a_level_no_tenant_can_have() -> None:
    from edgegw.pipeline.tenants import safe_tenant
    p = pipeline('[tenants]\nsource = "cert-o"\n[[routes]]\nmatch = "devices/{device_id}/r/#"\n'
                 'topic = "{prefix}/{device_id}/{rest}"\n')
    [out] = run(p, "devices/acme/sensor-7/telemetry", b"x", device="acme", tenant="")
    assert upstream_topic("gw", "acme", out.topic) == "cloud/_untenanted/acme/sensor-7/telemetry"
    [out] = run(p, "devices/acme/r/sensor-7/telemetry", b"x", device="acme", tenant="")
    assert upstream_topic("gw", "acme", out.topic) == "cloud/_untenanted/acme/sensor-7/telemetry"
    [out] = run(p, "devices/sensor-7/telemetry", b"x", device="sensor-7", tenant="acme")
    assert upstream_topic("gw", "sensor-7", out.topic) == "cloud/acme/sensor-7/telemetry"
    assert safe_tenant("_untenanted") == "" and safe_tenant("acme") == "acme"  # a certificate cannot claim it
    with pytest.raises(ConfigError) as info:
        parse_pipeline({"tenants": {"source": "cert-o", "default": "_untenanted"}}, Path("."))
    assert info.value.key == "tenants.default"
    [out] = run(pipeline(ROUTES.replace("devices/{device_id}/#", "devices/{device_id}/env/#")), "devices/d1/o", b"r")
    assert out.topic == "devices/d1/o"  # without tenants: exactly as before


STATEFUL = """
[transforms.band]
steps = [{op = "split", field = "v"}, {op = "deadband", field = "temp", delta = 0.5}]
[transforms.slow]
steps = [{op = "downsample", interval = 3600}]
[[routes]]
name = "band"
match = "devices/{device_id}/band/#"
decode = "json"
transforms = ["band"]
[[routes]]
name = "slow"
match = "devices/{device_id}/slow/#"
decode = "json"
transforms = ["slow"]
"""


async def test_deadband_and_downsample_remember_a_message_only_once_it_is_committed(tmp_path: Path) -> None:
    """A commit that fails (another writer holds the outbox file's lock: SQLITE_BUSY) leaves the device
    unacknowledged; its resend must be stored, not dropped as "unchanged". State is per (device, topic)."""
    import sqlite3
    p = pipeline(STATEFUL)
    outbox, writer = await _outbox(tmp_path)
    acks: list[tuple[str, bool]] = []

    def ack(name: str) -> Any:
        return lambda ok: acks.append((name, ok))

    async def settled(n: int) -> None:
        for _ in range(1500):
            if len(acks) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {acks}")

    def send(topic: str, body: Any, name: str) -> None:
        p.submit(outbox, "d1", "", topic, json.dumps(body).encode(), 1, ack(name), None)

    blocker = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None, timeout=0)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the outbox writer now waits for its busy timeout, then fails
        send("devices/d1/band/a", {"v": [{"temp": 20}]}, "band-lost")
        send("devices/d1/slow/a", {"x": 1}, "slow-lost")
        await settled(2)
        assert sorted(acks) == [("band-lost", False), ("slow-lost", False)]
        blocker.execute("ROLLBACK")
        send("devices/d1/band/a", {"v": [{"temp": 20}]}, "band-resent")
        send("devices/d1/slow/a", {"x": 1}, "slow-resent")
        assert outbox.pending_count == 2  # both stored, neither "unchanged"
        await settled(4)
        assert acks[2:] == [("band-resent", True), ("slow-resent", True)]
        # Committed: now the same values are dropped (acked at once, nothing stored) ...
        send("devices/d1/band/a", {"v": [{"temp": 20.2}]}, "band-same")
        send("devices/d1/slow/a", {"x": 2}, "slow-soon")
        assert acks[4:] == [("band-same", True), ("slow-soon", True)] and outbox.pending_count == 0
        # ... but another topic of the same device is another signal; within one message the items of a split
        # are compared with each other (20 and 20.1 are one value, 25 another).
        send("devices/d1/band/b", {"v": [{"temp": 20}, {"temp": 20.1}, {"temp": 25}]}, "band-other")
        send("devices/d1/slow/b", {"x": 3}, "slow-other")
        assert outbox.pending_count == 3
        await settled(8)
        assert acks[6:] == [("band-other", True), ("slow-other", True)]
    finally:
        blocker.close()
        outbox.stop()
        await writer
        await outbox.close()


def test_step_state_is_bounded_least_recently_stored_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgegw.pipeline import steps
    monkeypatch.setattr(steps, "MAX_STATE_DEVICES", 2)
    p = pipeline('[transforms.b]\nsteps = [{op = "deadband", field = "t", delta = 1}]\n'
                 '[[routes]]\nmatch = "devices/{device_id}/#"\ndecode = "json"\ntransforms = ["b"]\n')
    for device in ("d1", "d2", "d3"):  # d1 is forgotten when d3 comes
        assert len(run(p, f"devices/{device}/t", {"t": 5}, device=device)) == 1
    assert run(p, "devices/d3/t", {"t": 5}, device="d3") == []  # remembered
    assert len(run(p, "devices/d1/t", {"t": 5}, device="d1")) == 1  # forgotten: goes through again


def test_fair_shares_take_from_the_fullest_devices_first() -> None:
    from edgegw.pipeline.poison import fair_shares
    assert fair_shares([("noisy", 10), ("a", 2), ("b", 1)], 5) == [("noisy", 5)]
    assert dict(fair_shares([("a", 3), ("b", 3), ("c", 3)], 4)) == {"a": 2, "b": 1, "c": 1}
    assert dict(fair_shares([("a", 10), ("b", 9)], 3)) == {"a": 2, "b": 1}
    assert fair_shares([("a", 2)], 5) == [("a", 2)] and fair_shares([("a", 2)], 0) == []


async def test_one_devices_poison_stream_does_not_push_out_the_others_quarantined_rows(tmp_path: Path) -> None:
    from edgegw.pipeline.poison import PoisonStore
    config = config_from_mapping({**BASE, "quarantine": {"max_rows": 5, "max_bytes": 10_000}}, base_dir=tmp_path)
    assert (config.pipeline.quarantine.max_rows, config.pipeline.quarantine.max_bytes) == (5, 10_000)
    from edgegw.pipeline.reload import build_pipeline
    store = await PoisonStore(tmp_path / "q.db").open()
    build_pipeline(config, store)  # the daemon's path: [quarantine] applies to the store
    assert (store.max_rows, store.max_bytes) == (5, 10_000)
    task = asyncio.create_task(store.run())
    done: list[bool] = []

    async def put(device: str, payload: bytes) -> None:
        store.put(device, f"devices/{device}/t", payload, 1, None, "pipeline: x", 0.0, done.append)
        n = len(done) + 1
        while len(done) < n:
            await asyncio.sleep(0.005)
    try:
        await put("quiet-1", b"q1")
        await put("quiet-2", b"q2")
        for i in range(20):
            await put("noisy", f"n{i}".encode())
        rows = [(r[1], r[3]) for r in await store.read(None)]
        assert rows == [("quiet-1", b"q1"), ("quiet-2", b"q2"), ("noisy", b"n17"), ("noisy", b"n18"),
                        ("noisy", b"n19")]
        await put("quiet-1", b"B" * 9_990)  # over the byte cap: the fullest by rows (noisy) gives way first
        rows = [(r[1], r[3][:2]) for r in await store.read(None)]
        assert ("quiet-2", b"q2") in rows and ("quiet-1", b"BB") in rows and store.evicted >= 17
        assert done == [True] * 23
    finally:
        store.stop()
        await task
        await store.close()


@pytest.mark.parametrize(("raw", "key"), [({"max_rows": 0}, "quarantine.max_rows"),
                                          ({"max_bytes": "1M"}, "quarantine.max_bytes"),
                                          ({"max_size": 1}, "quarantine.max_size")])
def test_bad_quarantine_caps_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pipeline({"quarantine": raw}, Path("."))
    assert info.value.key == key


def test_changing_only_the_quarantine_caps_keeps_the_running_pipeline(tmp_path: Path) -> None:
    from edgegw.pipeline.reload import _same_pipeline
    tenants = {"tenants": {"source": "registry"}}
    running = config_from_mapping({**BASE, **tenants}, base_dir=tmp_path)
    caps = config_from_mapping({**BASE, **tenants, "quarantine": {"max_rows": 10}}, base_dir=tmp_path)
    other = config_from_mapping({**BASE, "tenants": {"source": "cert-o"}}, base_dir=tmp_path)
    assert _same_pipeline(running, caps)  # deadband/downsample state survives a cap change
    assert not _same_pipeline(running, other)
