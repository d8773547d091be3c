"""Optional OpenTelemetry span export ([tracing], edgegw/ops/otel.py): off by default and then never imported; on,
a real `edgegw run` process sends edgegw.ingress and edgegw.uplink spans, children of the device's traceparent, to
a local OTLP/HTTP receiver (decoded with the OTLP protobuf), with mosquitto upstream and a paho MQTT 5 device."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import Fleet, LabPKI, wait_until
from edgegw.config import config_from_mapping
from edgegw.errors import ConfigError
from mqtt_peers import PahoDevice, props

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP_QOS0 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MINIMAL = {"tls": {"cert": "c", "key": "k", "ca": "a"}, "uplink": {"host": "h", "ca": "a", "cert": "c", "key": "k"}}


def test_exporter_none_is_the_default_and_imports_nothing(tmp_path: Path) -> None:
    # In a fresh interpreter: the whole gateway (config, otel hooks, server, uplink, daemon) without opentelemetry.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edgegw.config import config_from_mapping\n"
        "from edgegw.ops import otel\n"
        "import edgegw.daemon, edgegw.mqtt.server, edgegw.uplink.paho_bridge\n"
        f"cfg = config_from_mapping({MINIMAL!r}, base_dir=Path('.'))\n"
        "assert cfg.tracing.exporter == 'none' and cfg.tracing.sample_ratio == 1.0\n"
        "assert otel.build(cfg.tracing) is None\n"
        "cfg = config_from_mapping({**" + repr(MINIMAL) + ", 'tracing': {'exporter': 'none', "
        "'endpoint': 'http://127.0.0.1:1/v1/traces'}}, base_dir=Path('.'))\n"
        "assert otel.build(cfg.tracing) is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'google.protobuf')))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_tracing_settings_are_validated(tmp_path: Path) -> None:
    for bad, key in (({"sample_ratio": 1.5}, "tracing.sample_ratio"), ({"exporter": "jaeger"}, "tracing.exporter"),
                     ({"endpoint": "127.0.0.1:4318"}, "tracing.endpoint"),
                     ({"service_name": ""}, "tracing.service_name"),
                     ({"color": "red"}, "tracing.color")):
        with pytest.raises(ConfigError) as info:
            config_from_mapping({**MINIMAL, "tracing": bad}, base_dir=tmp_path)
        assert info.value.key == key


def test_missing_packages_fail_at_start_naming_the_key_and_the_pip_command(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    from edgegw.ops import otel

    cfg = config_from_mapping({**MINIMAL, "tracing": {"exporter": "otlp-http"}}, base_dir=tmp_path)
    for name in [m for m in sys.modules if m.startswith("opentelemetry")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # "not installed": import raises ImportError
    with pytest.raises(ConfigError) as info:
        otel.build(cfg.tracing)
    assert info.value.key == "tracing.exporter"
    assert "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http" in str(info.value)


class _Receiver(ThreadingHTTPServer):
    """A tiny OTLP/HTTP traces endpoint: keeps the bodies POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/traces":
            self.server.bodies.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


def _spans(bodies: list[bytes]) -> list[tuple[Any, Any]]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    found = []
    for body in list(bodies):
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append((resource_spans.resource, span))
    return found


def test_otlp_http_export_from_a_real_gateway(fleet: Fleet, pki: LabPKI, mosquitto: Any, gateway_factory: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.sdk")
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # the gateway process batches spans for 0.2 s, not 5 s
    gw = gateway_factory(mosquitto, overrides={"tracing": {
        "exporter": "otlp-http", "endpoint": endpoint, "service_name": "edgegw-test", "sample_ratio": 1.0}}).start()
    device = PahoDevice(fleet.device_context("dev-05"), gw.port, "dev-05").start()
    try:
        assert device.connected.is_set()
        p = props()
        p.UserProperty = [("traceparent", TP)]
        device.client.publish("devices/dev-05/otel", b"traced", qos=1, properties=p).wait_for_publish(5)
        device.client.publish("devices/dev-05/otel", ('{"traceparent": "%s"}' % TP_QOS0).encode(), qos=0)
        wanted = {(name, bytes.fromhex(tp[3:35]))
                  for name in ("edgegw.ingress", "edgegw.uplink") for tp in (TP, TP_QOS0)}
        wait_until(lambda: {(s.name, s.trace_id) for _, s in _spans(receiver.bodies)} >= wanted, 15,
                   what="both spans of both records exported")
    finally:
        device.close()
        receiver.shutdown()
        receiver.server_close()
    assert gw.terminate() == 0
    trace_id = bytes.fromhex(TP[3:35])
    ours = {span.name: (resource, span) for resource, span in _spans(receiver.bodies) if span.trace_id == trace_id}
    assert set(ours) == {"edgegw.ingress", "edgegw.uplink"}, ours
    for resource, span in ours.values():
        assert span.parent_span_id == bytes.fromhex(TP[36:52])  # a child of the device's span
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["edgegw.device_id"].string_value == "dev-05"
        assert attributes["messaging.destination.name"].string_value == "cloud/dev-05/otel"  # the upstream topic
        assert attributes["edgegw.record_id"].int_value >= 1
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
        names = {a.key: a.value.string_value for a in resource.attributes}
        assert names["service.name"] == "edgegw-test"
    assert ours["edgegw.ingress"][1].end_time_unix_nano <= ours["edgegw.uplink"][1].end_time_unix_nano

