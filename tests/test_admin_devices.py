"""Admin API against a real `edgegw run` process: suspend/resume through the device registry (a copy of the fleet's
`edgegw pki` registry), and the per-QoS and uplink metrics of issue 8."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from conftest import Fleet, Mosquitto, wait_until
from mqtt_peers import V311, PahoDevice
from ops_peers import admin_gateway, metrics, post_json, sample


def test_suspend_and_resume_through_the_registry(mosquitto: Mosquitto, gateway_factory: Any, fleet: Fleet,
                                                 tmp_path: Path) -> None:
    registry = tmp_path / "registry.db"
    shutil.copyfile(fleet.folder / "registry.db", registry)  # the session fleet's registry stays untouched
    gw, port = admin_gateway(gateway_factory, mosquitto, registry={"path": str(registry)})
    devices: list[PahoDevice] = []
    try:
        # Suspended below, then refused: neither should try again by itself.
        live = PahoDevice(fleet.device_context("dev-05"), gw.port, "dev-05", reconnect_on_failure=False).start()
        devices.append(live)
        assert live.connected.is_set()

        status, body = post_json(port, "/api/devices/dev-05/suspend", {"reason": "maintenance"})
        assert status == 200, body
        assert body == {"device_id": "dev-05", "state": "suspended", "previous_state": "active",
                        "reason": "maintenance", "reloaded": True, "disconnected": True}
        wait_until(lambda: live.disconnect_reason is not None, 5, what="dev-05 disconnected")
        assert live.disconnect_reason.value == 0x87  # Not authorized
        live.client.loop_stop()
        gw.wait_for_event("admin.device_suspended", device_id="dev-05")

        again = PahoDevice(fleet.device_context("dev-05"), gw.port, "dev-05", reconnect_on_failure=False).start()
        devices.append(again)
        assert again.connack is not None and again.connack.value == 0x87
        refused = gw.wait_for_event("mqtt.connect_refused", client_id="dev-05")
        assert "suspended" in refused["reason"] and "maintenance" in refused["reason"]

        # Idempotent; nobody to disconnect the second time.
        status, body = post_json(port, "/api/devices/dev-05/suspend")
        assert status == 200 and body["previous_state"] == "suspended" and body["disconnected"] is False

        status, body = post_json(port, "/api/devices/dev-05/resume")
        assert status == 200 and body["state"] == "active" and body["previous_state"] == "suspended", body
        back = PahoDevice(fleet.device_context("dev-05"), gw.port, "dev-05").start()
        devices.append(back)
        assert back.connected.is_set(), gw.log()[-3000:]

        for action in ("suspend", "resume"):
            status, body = post_json(port, f"/api/devices/no-such-device/{action}")
            assert status == 404 and "not in the registry" in body["error"]
        status, body = post_json(port, "/api/devices/dev-05/suspend", {"reason": 5})
        assert status == 400
    finally:
        for device in devices:
            device.close()
    assert gw.terminate() == 0


def test_suspend_without_a_registry_is_a_conflict(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto)
    for action in ("suspend", "resume"):
        status, body = post_json(port, f"/api/devices/dev-05/{action}")
        assert status == 409 and "no device registry" in body["error"], body
    assert gw.terminate() == 0


def test_metrics_by_qos_and_uplink_counters(mosquitto: Mosquitto, gateway_factory: Any, fleet: Fleet) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto)
    v5 = PahoDevice(fleet.device_context("dev-06"), gw.port, "dev-06").start()
    v311 = PahoDevice(fleet.device_context("dev-07"), gw.port, "dev-07", protocol=V311).start()
    try:
        infos = [v5.client.publish("devices/dev-06/t", b"q0", qos=0) for _ in range(3)]
        infos += [v5.client.publish("devices/dev-06/t", b"q1", qos=1) for _ in range(4)]
        infos += [v311.client.publish("devices/dev-07/t", b"q2", qos=2) for _ in range(5)]
        for info in infos:
            info.wait_for_publish(5)

        def counted() -> bool:
            m = metrics(port)
            return sample(m, "edgegw_messages_received_total", protocol="mqtt", qos="0") == 3
        wait_until(counted, 5, what="QoS 0 publishes counted")
        m = metrics(port)
        assert sample(m, "edgegw_messages_received_total", protocol="mqtt", qos="1") == 4
        assert sample(m, "edgegw_messages_received_total", protocol="mqtt", qos="2") == 5
        assert sample(m, "edgegw_messages_acknowledged_total", protocol="mqtt", qos="1") == 4
        assert sample(m, "edgegw_messages_acknowledged_total", protocol="mqtt", qos="2") == 5
        assert ("edgegw_messages_acknowledged_total", (("protocol", "mqtt"), ("qos", "0"))) not in m
        assert sample(m, "edgegw_messages_held_total") == 0
        assert sample(m, "edgegw_rate_limit_hits_total", protocol="mqtt") == 0
        assert sample(m, "edgegw_uplink_expired_records_total") == 0
        assert sample(m, "edgegw_uplink_commands_total", outcome="delivered") == 0
        assert sample(m, "edgegw_uplink_commands_total", outcome="undeliverable") == 0
    finally:
        v5.close()
        v311.close()
    assert gw.terminate() == 0
