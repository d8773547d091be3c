"""Helpers for the operations tests: an HTTP client on real sockets, Prometheus text parsing, paho devices."""

from __future__ import annotations

from http.client import HTTPConnection
import json
import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client.parser import text_string_to_metric_families

from conftest import Fleet, GatewayProcess, free_port


def admin_gateway(gateway_factory: Any, broker: Any, **overrides: dict[str, Any]) -> tuple[GatewayProcess, int]:
    port = free_port()
    sections: dict[str, dict[str, Any]] = {"admin": {"port": port}}
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    gw = gateway_factory(broker, overrides=sections).start()
    return gw, port


def http(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(port: int, path: str) -> tuple[int, Any]:
    status, _, body = http(port, "GET", path)
    return status, json.loads(body)


def post_json(port: int, path: str, value: Any = None) -> tuple[int, Any]:
    body = json.dumps(value).encode() if value is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    status, _, data = http(port, "POST", path, body, headers)
    return status, json.loads(data)


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    status, headers, body = http(port, "GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain"), headers
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} not in {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


class PahoDevice:
    """A paho device with its certificate; QoS 1 publishes and a flag when the gateway disconnects it."""

    def __init__(self, fleet: Fleet, port: int, device_id: str, *, v5: bool = False,
                 reconnect_on_failure: bool = True) -> None:
        """``reconnect_on_failure=False`` for a device the test never expects to come back by itself: paho's
        network thread then ends when the gateway disconnects it, instead of sleeping out its reconnect delay (1 s)
        which ``close()`` would otherwise wait for."""
        self.device_id = device_id
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: Any = None
        protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=protocol,
                             reconnect_on_failure=reconnect_on_failure)
        client.tls_set_context(fleet.device_context(device_id))
        client.on_connect = lambda c, u, f, reason, p: (not reason.is_failure) and self.connected.set()
        client.on_disconnect = self._on_disconnect
        self.client = client
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        if not self.connected.wait(10):
            client.loop_stop()
            raise AssertionError(f"{device_id} did not connect")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def publish(self, count: int, timeout: float = 10.0) -> None:
        infos = [self.client.publish(f"devices/{self.device_id}/t", json.dumps({"seq": i}), qos=1)
                 for i in range(count)]
        for info in infos:
            info.wait_for_publish(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bad_handshakes(port: int, count: int) -> None:
    """``count`` connections that speak plain text to the TLS listener: each is a tls.handshake_failed."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                sock.recv(1024)
            except OSError:
                pass
