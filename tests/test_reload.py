"""Hot reload of routes and ACLs on a running `edgegw run` process: `edgegw reload` and SIGHUP apply a good config
to live sessions, and refuse a broken one (the running config stays)."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from conftest import Fleet, Mosquitto, wait_until
from test_routes_e2e import Device, edgegw, start

ROUTE = """
[[routes]]
name = "r"
match = "devices/{device_id}/t"
topic = "%s/{device_id}"
decode = "json"
transforms = ["t"]

[transforms.t]
steps = [{op = "derive", field = "double", expr = "v * 2"}]
"""


def test_reload_applies_routes_and_acl_to_live_sessions_and_refuses_a_broken_config(
        fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Any, sink_factory: Any) -> None:
    sink = sink_factory(mosquitto, topic="#")
    gw = start(gateway_factory, mosquitto, ROUTE % "first")
    base = gw.config_path.read_text()
    device = Device(fleet, gw, "dev-06")
    connects = []
    device.client.on_connect_fail = lambda *a: connects.append("fail")
    try:
        def publish(topic: str, value: int) -> int:
            mid = device.publish(topic, {"v": value})
            wait_until(lambda: mid in device.acks, 10, what=f"PUBACK of {topic}")
            return device.acks[mid]

        assert publish("devices/dev-06/t", 1) == 0
        assert publish("extra/dev-06", 2) == 0x87  # not in the ACL yet
        sink.wait_for(lambda m: any(x.topic == "first/dev-06" for x in m), 10)

        # A good config: new route target, a wider ACL. `edgegw reload` signals the daemon and reports.
        gw.config_path.write_text(base.replace("first/{device_id}", "second/{device_id}").replace(
            "[mqtt]", '[acl]\npublish = ["devices/{device_id}/#", "extra/{device_id}"]\n\n[mqtt]'))
        result = edgegw("reload", "--config", str(gw.config_path), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["ok"] is True
        assert publish("devices/dev-06/t", 3) == 0
        assert publish("extra/dev-06", 4) == 0  # the live session got the new ACL
        messages = sink.wait_for(lambda m: any(x.topic == "second/dev-06" for x in m)
                                 and any(x.topic == "cloud/dev-06/extra/dev-06" or x.topic.endswith("extra/dev-06")
                                         for x in m), 10)
        assert [json.loads(m.payload) for m in messages if m.topic == "second/dev-06"] == [{"v": 3, "double": 6}]

        # A broken config: `edgegw reload` refuses it before signalling, naming the key...
        broken = gw.config_path.read_text().replace("v * 2", "v *")
        gw.config_path.write_text(broken)
        result = edgegw("reload", "--config", str(gw.config_path))
        assert result.returncode == 2
        assert "transforms.t.steps[0].expr" in result.stderr
        # ...and a plain SIGHUP (systemctl reload) is refused by the daemon, which keeps running the old config.
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGHUP)
        refused = gw.wait_for_event("config.reload_refused")
        assert refused["key"] == "transforms.t.steps[0].expr"
        assert publish("devices/dev-06/t", 5) == 0
        sink.wait_for(lambda m: [json.loads(x.payload) for x in m if x.topic == "second/dev-06"][-1:]
                      == [{"v": 5, "double": 10}], 10)
        assert device.connected and not connects  # the same session all along
        assert len(gw.events("mqtt.connected")) == 1
    finally:
        device.close()
    assert gw.terminate() == 0
    # The daemon is gone (pid file removed): `edgegw reload` says so (exit 1) after the config check passes.
    gw.config_path.write_text(base)
    result = edgegw("reload", "--config", str(gw.config_path))
    assert result.returncode == 1 and "not running" in result.stderr
