"""A simulated device: a light asyncio MQTT 3.1.1 / 5 client on our own codec (the fleet is in :mod:`.fleet`).

Why not paho or amqtt: a simulator must hold 1,000+ mTLS devices in one process. Here a device is one
:class:`asyncio.Protocol` (no reader task, no future per message): the fleet's one scheduler task hands out
"publish n more" credits, and a device writes while its in-flight window (default 16) has room. PUBACKs free the
window, so a slow gateway slows the devices instead of growing buffers.

Each message carries ``{"device": id, "seq": n, "t": unix time, "temp": ...}`` (or what a ``payload`` function
makes of device id, seq and time, see :mod:`.payload`). ``seq`` starts at 1 and never repeats for a device; a
message that was not acknowledged when the connection dropped is sent again after the reconnect with the same seq
(and packet id, DUP set), so the cloud side can tell duplicates from loss.

This module is the device's one import path; the code lives in modules of one job each: here :class:`Device`
(lifecycle, reconnects, publishing, the MQTT wire) and the default payload; _connection.py (the asyncio protocol of a
connection and the device's events: CONNACK, PUBACK, keepalive timer, a mixin of Device), _seqset.py (:class:`SeqSet`)
and _latency.py (:class:`LatencySamples`). The names below are the same objects wherever they are imported from.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgegw.mqtt.codec import FrameReader, encode_packet, encode_publish
from edgegw.mqtt.packets import MQTT_5, MQTT_311, Connect, Disconnect, Pingreq, Publish
from edgegw.sim._connection import ConnectionEvents, _Conn
from edgegw.sim._latency import LatencySamples
from edgegw.sim._seqset import SeqSet

__all__ = ["Device", "LatencySamples", "Payload", "SeqSet", "default_payload"]

_PINGREQ = encode_packet(Pingreq(), MQTT_311)  # the same two bytes in 3.1.1 and 5
_DISCONNECT = {MQTT_311: encode_packet(Disconnect(), MQTT_311), MQTT_5: encode_packet(Disconnect(), MQTT_5)}
_MAX_PACKET = 64 * 1024  # what a device accepts from the gateway (CONNACK, PUBACK, PINGRESP: a few bytes)

Payload = Callable[[str, int, float], bytes]
"""Makes a message body from (device id, seq, unix time)."""


def default_payload(device_id: str, seq: int, wall: float) -> bytes:
    return json.dumps({"device": device_id, "seq": seq, "t": round(wall, 6),
                       "temp": round(21.0 + 4.0 * math.sin(seq / 50.0) + random.random(), 2)},
                      separators=(",", ":")).encode()


@dataclass(slots=True)
class _Inflight:
    seq: int
    frame: bytes  # the encoded PUBLISH, DUP clear
    first_sent: float  # loop time of the first transmission (latency counts from here, across reconnects)


class Device(ConnectionEvents):
    """One simulated device. :meth:`run` keeps it connected (reconnecting with backoff) until :meth:`close`."""

    def __init__(self, device_id: str, host: str, port: int, ssl_context: ssl.SSLContext, *,
                 server_hostname: str | None = None, topic: str | None = None, window: int = 16,
                 keepalive: int = 30, reconnect_min: float = 0.2, reconnect_max: float = 5.0,
                 connect_timeout: float = 10.0, latencies: LatencySamples | None = None,
                 protocol: int = MQTT_311, payload: Payload = default_payload, max_backlog: int = 100_000) -> None:
        if not 1 <= window <= 65535:
            raise ValueError(f"window must be 1-65535, got {window}")
        if protocol not in (MQTT_311, MQTT_5):
            raise ValueError(f"protocol must be {MQTT_311} (3.1.1) or {MQTT_5} (5), got {protocol}")
        self.protocol = protocol
        self._payload = payload
        self.max_backlog = max_backlog
        self.device_id = device_id
        self.topic = topic or f"devices/{device_id}/telemetry"
        self.host, self.port = host, port
        self.server_hostname = server_hostname
        self.window = window
        self.keepalive = keepalive
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.connect_timeout = connect_timeout
        self.latencies = latencies if latencies is not None else LatencySamples()
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: _Conn | None = None
        self._transport: asyncio.Transport | None = None
        self._frames = FrameReader(_MAX_PACKET)
        self._connack: asyncio.Future[str | None] | None = None
        self._lost: asyncio.Future[str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_tx = 0.0
        self._last_rx = 0.0
        self._closing = False
        self._online: asyncio.Event | None = None  # set: may connect; cleared by go_offline()
        self.connected = False
        self._next_seq = 1
        self._next_pid = 1
        self._inflight: dict[int, _Inflight] = {}  # packet id -> message, in send order
        self.backlog = 0
        """Messages due (per the fleet's rate) but not sent yet because the window was full or we were offline."""
        self.published = 0
        """Messages sent at least once (resends are not counted again)."""
        self.acknowledged = 0
        self.refused = 0
        """PUBACKs with an error reason code (MQTT 5: e.g. 0x87 not authorized, 0x97 quota exceeded)."""
        self.dropped = 0
        """Messages that came due while ``backlog`` was at ``max_backlog`` (a device's buffer is finite too)."""
        self.resent = 0
        self.connects = 0
        self.connect_failures = 0
        self.last_error: str | None = None
        self.acked = SeqSet()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect and stay connected until :meth:`close`; cancel to stop at once."""
        loop = self._loop = asyncio.get_running_loop()
        if self._online is None:
            self._online = asyncio.Event()
            self._online.set()
        attempt = 0
        try:
            while not self._closing:
                if not self._online.is_set():
                    await self._online.wait()  # offline (powered down): nothing until go_online()
                    attempt = 0
                    continue
                error = await self._connect_once(loop)
                if error is None:
                    attempt = 0
                    assert self._lost is not None
                    reason = await self._lost
                    self.last_error = reason
                else:
                    self.connect_failures += 1
                    self.last_error = error
                self._drop()
                if self._closing:
                    break
                if not self._online.is_set():
                    continue
                cap = min(self.reconnect_max, self.reconnect_min * 2 ** min(attempt, 20))
                attempt += 1
                await asyncio.sleep(max(self.reconnect_min / 2, random.uniform(0, cap)))
        finally:
            self._drop()

    async def _connect_once(self, loop: asyncio.AbstractEventLoop) -> str | None:
        self._connack = loop.create_future()
        self._lost = loop.create_future()
        self._frames = FrameReader(_MAX_PACKET)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self._ssl,
                                             server_hostname=self.server_hostname or self.host,
                                             ssl_handshake_timeout=self.connect_timeout)
                await asyncio.wait((self._connack, self._lost), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            return "connect timed out"
        except (OSError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            return f"{type(exc).__name__}: {exc}"
        if self._connack.done():
            error = self._connack.result()
            if error is not None:
                return error
            return None if not self._lost.done() else self._lost.result()
        return self._lost.result()

    def _drop(self) -> None:
        self.connected = False
        self._conn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    def close(self) -> None:
        """Stop reconnecting; say DISCONNECT if connected. :meth:`run` then ends."""
        self._closing = True
        transport = self._transport
        if transport is not None and self.connected:
            transport.write(self._goodbye())
            transport.close()  # flushes first; _drop() must not abort it
            self._transport = None
        self._set_lost("closed")
        if self._online is not None:
            self._online.set()  # wake an offline run() so it can end

    def kick(self) -> None:
        """Drop the connection as a network failure would (no DISCONNECT); :meth:`run` reconnects with backoff."""
        if self._transport is not None:
            self._set_lost("kicked (simulated network failure)")
            self._transport.abort()

    def go_offline(self) -> None:
        """Power down: drop the link and stay away until :meth:`go_online`. Due messages keep piling up in
        ``backlog`` (bounded by ``max_backlog``), as on a device that buffers while offline."""
        if self._online is None:
            self._online = asyncio.Event()
        self._online.clear()
        self.kick()

    def go_online(self) -> None:
        if self._online is not None:
            self._online.set()

    # --- publishing -----------------------------------------------------------------------------------------

    def request(self, n: int) -> None:
        """``n`` more messages are due: send them as the window allows."""
        room = self.max_backlog - self.backlog
        if n > room:
            self.dropped += n - max(room, 0)
            n = max(room, 0)
        self.backlog += n
        self.pump()

    def pump(self) -> None:
        transport = self._transport
        room = self.window - len(self._inflight)
        if not self.connected or transport is None or room <= 0 or self.backlog <= 0:
            return
        assert self._loop is not None
        now = self._loop.time()
        wall = time.time()
        frames = []
        make_payload, device_id, encode = self._payload, self.device_id, self._encode
        for _ in range(min(room, self.backlog)):
            seq = self._next_seq
            self._next_seq = seq + 1
            pid = self._take_pid()
            frame = encode(pid, make_payload(device_id, seq, wall))
            self._inflight[pid] = _Inflight(seq, frame, now)
            frames.append(frame)
        self.backlog -= len(frames)
        self.published += len(frames)
        self._last_tx = now
        transport.write(b"".join(frames))

    def discard_backlog(self) -> int:
        """Forget messages that are due but unsent (the fleet stopped publishing); returns how many."""
        n, self.backlog = self.backlog, 0
        return n

    # --- the wire (MQTT here; edgegw/sim/coap_device.py overrides these for CoAP) ----------------------------------

    def _encode(self, pid: int, payload: bytes) -> bytes:
        return encode_publish(Publish(self.topic, payload, qos=1, packet_id=pid), self.protocol)

    def _redelivery(self, frame: bytes) -> bytes:
        """An unacknowledged message sent again on a new connection: same packet id and seq, DUP set."""
        return bytes((frame[0] | 0x08,)) + frame[1:]

    def _hello(self) -> bytes:
        # A fresh session every time: the gateway keeps none, and un-acked messages are resent by us (DUP).
        return encode_packet(Connect(self.protocol, self.device_id, True, self.keepalive), self.protocol)

    def _ping(self) -> bytes:
        return _PINGREQ

    def _goodbye(self) -> bytes:
        return _DISCONNECT[self.protocol]

    def _take_pid(self) -> int:
        pid = self._next_pid
        while pid in self._inflight:
            pid = pid % 65535 + 1
        self._next_pid = pid % 65535 + 1
        return pid
