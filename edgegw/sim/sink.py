"""The cloud sink: what arrived upstream, per device, checked against what the gateway acknowledged.

A paho client in its own thread (``loop_start``) subscribes to ``{topic_prefix}/#`` at QoS 1 over mutual TLS and
reads the simulator's JSON payloads (``{"device": id, "seq": n, ...}``, see :mod:`edgegw.sim.device`). Per device it
counts unique seqs (``delivered``), ``duplicates`` (a seq seen before) and ``out_of_order`` (a new seq below the
highest seen). ``lost`` is computed against the fleet: seqs the gateway acknowledged that never arrived here;
without the fleet's record, :meth:`CloudSink.gaps` counts the seqs missing below each device's highest. A payload's
``"t"`` (unix time at the device) gives the delivery latency (same clock: sink and devices on one machine).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgegw.sim.device import LatencySamples, SeqSet


@dataclass(slots=True)
class _DeviceTally:
    seqs: SeqSet = field(default_factory=SeqSet)
    highest: int = 0
    duplicates: int = 0
    out_of_order: int = 0


class CloudSink:
    """Start with :meth:`start` (from a running loop), stop with :meth:`stop`. Counters are safe to read any time."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext, *, topic_prefix: str = "edgegw",
                 client_id: str = "edgegw-sim-sink", protocol: str = "3.1.1", keepalive: int = 30) -> None:
        self.host, self.port = host, port
        self.topic_filter = f"{topic_prefix}/#"
        self._prefix = topic_prefix + "/"
        self._keepalive = keepalive
        self._lock = threading.Lock()
        self._tally: dict[str, _DeviceTally] = {}
        self._subscribed = threading.Event()
        self.received = 0
        """PUBLISH packets received (duplicates included)."""
        self.delivered = 0
        """Unique (device, seq) pairs received."""
        self.duplicates = 0
        self.out_of_order = 0
        self.malformed = 0
        """Payloads that are not the simulator's JSON; counted, not tallied."""
        self.misrouted = 0
        """Messages whose topic does not name the device in their payload (``{prefix}/{device}/...``)."""
        self.connects = 0
        self.last_error: str | None = None
        self.latencies = LatencySamples()
        """Device send time (payload ``t``) to arrival here, first delivery of each seq only."""
        v5 = protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
        client.tls_set_context(ssl_context)
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._client = client
        self._started = False

    async def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; RuntimeError if not subscribed within ``timeout``. The connect happens in
        paho's thread, so a broker on this same loop can answer it."""
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._started = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._subscribed.is_set():
            if loop.time() > deadline:
                self.stop()
                raise RuntimeError(f"sink did not subscribe to {self.topic_filter!r} on {self.host}:{self.port} "
                                   f"within {timeout} s ({self.last_error or 'no error reported'})")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Disconnect and join paho's thread (it exits promptly once disconnected)."""
        if not self._started:
            return
        self._started = False
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    # --- results --------------------------------------------------------------------------------------------

    def lost(self, acked: Mapping[str, SeqSet]) -> int:
        """Seqs acknowledged by the gateway (``device -> seqs``) that never arrived here."""
        empty = SeqSet()
        with self._lock:
            return sum(seqs.count_missing_from(self._tally[d].seqs if d in self._tally else empty)
                       for d, seqs in acked.items())

    def has_all(self, acked: Mapping[str, SeqSet]) -> bool:
        return self.lost(acked) == 0

    def gaps(self) -> int:
        """Seqs missing below each device's highest delivered seq (lost, or not arrived yet)."""
        with self._lock:
            return sum(t.highest - len(t.seqs) for t in self._tally.values() if t.highest > len(t.seqs))

    def per_device(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {d: {"delivered": len(t.seqs), "highest": t.highest, "duplicates": t.duplicates,
                        "out_of_order": t.out_of_order, "gaps": max(0, t.highest - len(t.seqs))}
                    for d, t in sorted(self._tally.items())}

    def report(self, acked: Mapping[str, SeqSet] | None = None) -> dict[str, object]:
        """Totals as a JSON-ready dict; ``lost`` only when the fleet's acknowledged seqs are given."""
        with self._lock:
            p50, p99 = self.latencies.percentiles(50, 99)
            out: dict[str, object] = {
                "received": self.received, "delivered": self.delivered, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "malformed": self.malformed, "misrouted": self.misrouted,
                "devices": len(self._tally),
                "latency_ms": {"p50": _ms(p50), "p99": _ms(p99), "max": _ms(self.latencies.max)},
            }
        out["gaps"] = self.gaps()
        if acked is not None:
            out["lost"] = self.lost(acked)
        return out

    def seqs(self, device_id: str) -> SeqSet:
        with self._lock:
            tally = self._tally.get(device_id)
            return tally.seqs if tally else SeqSet()

    # --- paho callbacks (paho's thread) ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.last_error = f"CONNACK refused: {reason}"
            return
        self.connects += 1
        client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self._subscribed.set()
        else:
            self.last_error = f"SUBSCRIBE refused: {reasons}"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.last_error = f"disconnected: {reason}"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
            device, seq = body["device"], body["seq"]
            if not isinstance(device, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError("bad device or seq")
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.received += 1
                self.malformed += 1
            return
        with self._lock:
            self.received += 1
            if not message.topic.startswith(f"{self._prefix}{device}/"):
                self.misrouted += 1
            tally = self._tally.get(device)
            if tally is None:
                tally = self._tally[device] = _DeviceTally()
            if not tally.seqs.add(seq):
                tally.duplicates += 1
                self.duplicates += 1
                return
            self.delivered += 1
            sent_at = body.get("t")
            if isinstance(sent_at, int | float) and not isinstance(sent_at, bool):
                self.latencies.add(max(0.0, time.time() - sent_at))
            if seq < tally.highest:
                tally.out_of_order += 1
                self.out_of_order += 1
            else:
                tally.highest = seq


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
