"""A simulated device: a light asyncio MQTT 3.1.1 client on our own codec (the fleet is in :mod:`.fleet`).

Why not paho or amqtt: a simulator must hold 1,000+ mTLS devices in one process. Here a device is one
:class:`asyncio.Protocol` (no reader task, no future per message): the fleet's one scheduler task hands out
"publish n more" credits, and a device writes while its in-flight window (default 16) has room. PUBACKs free the
window, so a slow gateway slows the devices instead of growing buffers.

Each message carries ``{"device": id, "seq": n, "t": unix time, "temp": ...}``. ``seq`` starts at 1 and never
repeats for a device; a message that was not acknowledged when the connection dropped is sent again after the
reconnect with the same seq (and packet id, DUP set), so the cloud side can tell duplicates from loss.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

from edgegw.mqtt.codec import FrameReader, MQTTProtocolError, decode_packet, encode_packet, encode_publish
from edgegw.mqtt.packets import MQTT_311, Connack, Connect, Disconnect, Pingreq, Puback, Publish

_PINGREQ = encode_packet(Pingreq(), MQTT_311)
_DISCONNECT = encode_packet(Disconnect(), MQTT_311)
_MAX_PACKET = 64 * 1024  # what a device accepts from the gateway (CONNACK, PUBACK, PINGRESP: a few bytes)


class SeqSet:
    """Sequence numbers (>= 1) seen: "every seq below ``low``" plus the stragglers above it.

    Acknowledgements and deliveries arrive almost in order, so this stays a counter and a small set.
    """

    __slots__ = ("_low", "_above")

    def __init__(self) -> None:
        self._low = 1
        self._above: set[int] = set()

    def add(self, seq: int) -> bool:
        """Add ``seq``; False if it was already there (or is not a valid seq)."""
        if seq < self._low:
            return False
        if seq == self._low:
            low = seq + 1
            above = self._above
            while low in above:
                above.remove(low)
                low += 1
            self._low = low
            return True
        if seq in self._above:
            return False
        self._above.add(seq)
        return True

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and (1 <= seq < self._low or seq in self._above)

    def __len__(self) -> int:
        return self._low - 1 + len(self._above)

    def __iter__(self) -> Iterator[int]:
        yield from range(1, self._low)
        yield from sorted(self._above)

    def count_missing_from(self, other: SeqSet) -> int:
        """How many of our seqs ``other`` lacks."""
        missing = sum(1 for s in self._above if s not in other)
        # The contiguous prefix: only ``other``'s gaps below our ``low`` can be missing.
        covered = min(self._low, other._low) - 1
        missing += sum(1 for s in range(covered + 1, self._low) if s not in other._above)
        return missing


class LatencySamples:
    """Ack latencies in seconds: all of them up to ``cap``, then a uniform reservoir sample (Algorithm R)."""

    __slots__ = ("_cap", "_seen", "samples", "max")

    def __init__(self, cap: int = 200_000) -> None:
        self._cap = cap
        self._seen = 0
        self.samples: list[float] = []
        self.max = 0.0

    def add(self, value: float) -> None:
        self._seen += 1
        if value > self.max:
            self.max = value
        if len(self.samples) < self._cap:
            self.samples.append(value)
        else:
            i = random.randrange(self._seen)
            if i < self._cap:
                self.samples[i] = value

    def __len__(self) -> int:
        return self._seen

    def percentiles(self, *ps: float) -> list[float | None]:
        """Nearest-rank percentiles (``ps`` in 0..100), None without samples."""
        if not self.samples:
            return [None for _ in ps]
        ordered = sorted(self.samples)
        n = len(ordered)
        return [ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] for p in ps]


@dataclass(slots=True)
class _Inflight:
    seq: int
    frame: bytes  # the encoded PUBLISH, DUP clear
    first_sent: float  # loop time of the first transmission (latency counts from here, across reconnects)


class _Conn(asyncio.Protocol):
    """The asyncio protocol of one connection of a device; events of a connection the device has given up on
    (a late ``connection_lost`` after a reconnect began) are ignored."""

    __slots__ = ("device", "transport")

    def __init__(self, device: Device) -> None:
        self.device = device
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.device._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.device._conn is self:
            self.device._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.device._conn is self:
            self.device._set_lost(f"connection lost ({type(exc).__name__}: {exc})" if exc
                                  else "connection closed by gateway")


class Device:
    """One simulated device. :meth:`run` keeps it connected (reconnecting with backoff) until :meth:`close`."""

    def __init__(self, device_id: str, host: str, port: int, ssl_context: ssl.SSLContext, *,
                 server_hostname: str | None = None, topic: str | None = None, window: int = 16,
                 keepalive: int = 30, reconnect_min: float = 0.2, reconnect_max: float = 5.0,
                 connect_timeout: float = 10.0, latencies: LatencySamples | None = None) -> None:
        if not 1 <= window <= 65535:
            raise ValueError(f"window must be 1-65535, got {window}")
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
        self.connected = False
        self._next_seq = 1
        self._next_pid = 1
        self._inflight: dict[int, _Inflight] = {}  # packet id -> message, in send order
        self.backlog = 0
        """Messages due (per the fleet's rate) but not sent yet because the window was full or we were offline."""
        self.published = 0
        """Messages sent at least once (resends are not counted again)."""
        self.acknowledged = 0
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
        attempt = 0
        try:
            while not self._closing:
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
            transport.write(_DISCONNECT)
            transport.close()  # flushes first; _drop() must not abort it
            self._transport = None
        self._set_lost("closed")

    # --- publishing -----------------------------------------------------------------------------------------

    def request(self, n: int) -> None:
        """``n`` more messages are due: send them as the window allows."""
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
        for _ in range(min(room, self.backlog)):
            seq = self._next_seq
            self._next_seq = seq + 1
            pid = self._take_pid()
            payload = json.dumps({"device": self.device_id, "seq": seq, "t": round(wall, 6),
                                  "temp": round(21.0 + 4.0 * math.sin(seq / 50.0) + random.random(), 2)},
                                 separators=(",", ":")).encode()
            frame = encode_publish(Publish(self.topic, payload, qos=1, packet_id=pid), MQTT_311)
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

    def _take_pid(self) -> int:
        pid = self._next_pid
        while pid in self._inflight:
            pid = pid % 65535 + 1
        self._next_pid = pid % 65535 + 1
        return pid

    # --- connection events (from :class:`_Conn`) -------------------------------------------------------------

    def _on_made(self, conn: _Conn) -> None:
        assert self._loop is not None and conn.transport is not None
        self._conn = conn
        self._transport = conn.transport
        self._last_rx = self._last_tx = self._loop.time()
        # A fresh session every time: the gateway keeps none, and un-acked messages are resent by us (DUP).
        conn.transport.write(encode_packet(Connect(MQTT_311, self.device_id, True, self.keepalive), MQTT_311))

    def _on_data(self, data: bytes) -> None:
        assert self._loop is not None
        self._last_rx = self._loop.time()
        frames = self._frames
        frames.feed(data)
        acked = False
        try:
            while (frame := frames.next_frame()) is not None:
                packet = decode_packet(frame[0], frame[1], MQTT_311)
                if isinstance(packet, Puback):
                    acked |= self._on_puback(packet.packet_id)
                elif isinstance(packet, Connack):
                    self._on_connack(packet)
                # PINGRESP only refreshes _last_rx; the gateway sends nothing else to a publisher.
        except MQTTProtocolError as exc:
            self._set_lost(f"protocol error from gateway: {exc}")
            if self._transport is not None:
                self._transport.abort()
            return
        if acked:
            self.pump()

    def _set_lost(self, reason: str) -> None:
        self.connected = False
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)

    def _on_connack(self, packet: Connack) -> None:
        if self._connack is None or self._connack.done():
            return
        if packet.reason_code.is_error:
            self._connack.set_result(f"CONNACK refused: {packet.reason_code.name}")
            return
        self.connected = True
        self.connects += 1
        self._connack.set_result(None)
        assert self._transport is not None and self._loop is not None
        if self._inflight:  # not acknowledged on the previous connection: same packet id and seq, DUP set
            self.resent += len(self._inflight)
            self._transport.write(b"".join(bytes((m.frame[0] | 0x08,)) + m.frame[1:]
                                           for m in self._inflight.values()))
            self._last_tx = self._loop.time()
        if self.keepalive:
            self._timer = self._loop.call_later(self.keepalive / 2, self._on_timer)
        self.pump()

    def _on_puback(self, pid: int) -> bool:
        message = self._inflight.pop(pid, None)
        if message is None:
            return False  # a late PUBACK for a resend we already counted
        assert self._loop is not None
        self.acknowledged += 1
        self.acked.add(message.seq)
        self.latencies.add(self._loop.time() - message.first_sent)
        return True

    def _on_timer(self) -> None:
        self._timer = None
        transport, loop = self._transport, self._loop
        if transport is None or loop is None or not self.connected:
            return
        now = loop.time()
        if now - self._last_rx > 1.5 * self.keepalive:
            self._set_lost(f"nothing from the gateway for {now - self._last_rx:.1f} s")
            transport.abort()
            return
        if now - self._last_tx >= self.keepalive / 2:
            transport.write(_PINGREQ)
            self._last_tx = now
        self._timer = loop.call_later(self.keepalive / 2, self._on_timer)
