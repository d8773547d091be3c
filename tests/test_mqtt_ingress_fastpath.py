"""The publish path's shortcuts (edgegw/mqtt/_ingress.py, connection.py) against a real in-process server over
mTLS with a real outbox: what each one skips must come back when the state it depends on changes. A device is a
RawClient (our codec over a blocking TLS socket, in a thread) so the exact PUBACK reason codes are seen.

- the ACL cache's hit, tested inline: a topic allowed before an ACL reload is checked against the new ACL;
- limits off (no call into the limiter): limits turned on by a reload apply to the very next publish;
- the engine's last valid topic: another topic is checked again (tests/test_mqtt_connection.py, without sockets).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from conftest import Fleet
from mqtt_peers import RawClient
from test_mqtt_server import Harness, running

from edgegw.config import ACLSettings
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Puback,
    Publish,
    Pubrec,
    ReasonCode,
)
from edgegw.policy.acl import ACL
from edgegw.policy.limits import Limiter
from edgegw.policy.limits_config import LimitsSettings, limits_from_mapping


async def connect_v5(h: Harness, device_id: str) -> RawClient:
    def go() -> RawClient:
        client = RawClient(h.fleet.device_context(device_id), h.server.port, MQTT_5)
        client.send(Connect(MQTT_5, device_id, True, 30))
        connack = client.read()
        assert isinstance(connack, Connack) and connack.reason_code is ReasonCode.SUCCESS, connack
        return client
    return await asyncio.to_thread(go)


async def publish(client: RawClient, topic: str, packet_id: int) -> ReasonCode:
    """QoS 1 PUBLISH; the PUBACK's reason (SUCCESS once committed to the outbox)."""
    def go() -> ReasonCode:
        client.send(Publish(topic, b'{"v": 1}', qos=1, packet_id=packet_id))
        ack = client.read()
        assert isinstance(ack, Puback) and ack.packet_id == packet_id, ack
        return ack.reason_code
    return await asyncio.to_thread(go)


async def test_a_topic_allowed_before_an_acl_reload_is_checked_against_the_new_acl(
        fleet: Fleet, tmp_path: Path) -> None:
    async with running(fleet, tmp_path) as h:
        wide = ACL.from_settings(ACLSettings(publish=("devices/{device_id}/#", "extra/{device_id}")))
        h.server._acl = wide  # before the device connects: its connection starts under the wide ACL
        client = await connect_v5(h, "dev-01")
        try:
            assert await publish(client, "extra/dev-01", 1) is ReasonCode.SUCCESS
            assert await publish(client, "extra/dev-01", 2) is ReasonCode.SUCCESS  # the cached verdict
            # What edgegw/pipeline/reload.py does on SIGHUP: the live connection gets the new ACL object.
            narrow = ACL.from_settings(ACLSettings())
            h.server._acl = narrow
            for proto in h.server._connections:
                proto.acl = narrow
            assert await publish(client, "extra/dev-01", 3) is ReasonCode.NOT_AUTHORIZED
            assert await publish(client, "devices/dev-01/t", 4) is ReasonCode.SUCCESS
        finally:
            client.close()
        assert h.server.stats.publish_denied == 1
        records = await h.records(3)
        assert [r.topic for r in records] == ["extra/dev-01", "extra/dev-01", "devices/dev-01/t"]


async def test_limits_turned_on_by_a_reload_apply_to_the_next_publish(fleet: Fleet, tmp_path: Path) -> None:
    async with running(fleet, tmp_path) as h:
        limiter = Limiter(LimitsSettings())
        assert not limiter.active  # no rule: the ingress does not call it at all
        h.server.limiter = limiter
        client = await connect_v5(h, "dev-02")
        try:
            for pid in (1, 2, 3):
                assert await publish(client, "devices/dev-02/t", pid) is ReasonCode.SUCCESS
            limiter.replace(limits_from_mapping(
                {"rate": [{"scope": "device", "messages_rate": 0.01, "messages_burst": 1, "action": "reject"}]},
                tmp_path))
            assert limiter.active
            assert await publish(client, "devices/dev-02/t", 4) is ReasonCode.SUCCESS  # the burst of 1
            assert await publish(client, "devices/dev-02/t", 5) is ReasonCode.QUOTA_EXCEEDED  # MQTT 5: 0x97
            limiter.replace(LimitsSettings())  # and off again
            assert await publish(client, "devices/dev-02/t", 6) is ReasonCode.SUCCESS
        finally:
            client.close()
        assert len(await h.records(5)) == 5


async def test_a_group_of_publishes_is_acknowledged_in_order_after_its_commit(fleet: Fleet, tmp_path: Path) -> None:
    # Two devices' pipelined QoS 1 and QoS 2 publishes land in one group commit; each connection is acknowledged
    # once for all of its records (Outbox acker): every PUBACK / PUBREC, in order, only after the commit.
    async with running(fleet, tmp_path, commit_window_ms=300.0) as h:
        qos = {pid: 2 if pid % 4 == 0 else 1 for pid in range(1, 13)}

        def device(device_id: str) -> list[object]:
            client = RawClient(h.fleet.device_context(device_id), h.server.port, MQTT_311)
            try:
                client.send(Connect(MQTT_311, device_id, True, 30))
                assert isinstance(client.read(), Connack)
                client.send(*(Publish(f"devices/{device_id}/t", b"%d" % pid, qos=q, packet_id=pid)
                              for pid, q in qos.items()))
                acks = [client.read(10) for _ in qos]
                with sqlite3.connect(tmp_path / "outbox.db") as db:
                    on_disk = db.execute("SELECT count(*) FROM records WHERE device_id = ?", (device_id,)).fetchone()[0]
                return [*acks, on_disk]
            finally:
                client.close()

        got = await asyncio.gather(*(asyncio.to_thread(device, d) for d in ("dev-01", "dev-02")))
        expected = [Pubrec(pid) if q == 2 else Puback(pid) for pid, q in qos.items()]
        for acks in got:
            assert acks[:-1] == expected
            assert acks[-1] == 12  # read back after the acks: the records were committed
        stats = h.server.stats
        assert stats.publish_acked == 24
        assert stats.publish_acked_by_qos[1] == 18 and stats.publish_acked_by_qos[2] == 6
        assert sum(r.qos for r in await h.outbox.fetch_after(0, 100)) == 18 + 2 * 6
