"""A device's connection events: the asyncio protocol of one connection (:class:`_Conn`) and what the device does
when it hears from the gateway (:class:`ConnectionEvents`, a mixin of :class:`~edgegw.sim.device.Device`): CONNACK,
PUBACK, DISCONNECT, the keepalive timer. The CoAP and DTLS devices override parts of it for their wire."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from edgegw.mqtt.codec import FrameReader, MQTTProtocolError, decode_packet
from edgegw.mqtt.packets import Connack, Disconnect, Puback

if TYPE_CHECKING:
    from edgegw.sim._latency import LatencySamples
    from edgegw.sim._seqset import SeqSet
    from edgegw.sim.device import Device, _Inflight


class _Conn(asyncio.Protocol):
    """The asyncio protocol of one connection of a device; events of a connection the device has given up on
    (a late ``connection_lost`` after a reconnect began) are ignored."""

    __slots__ = ("device", "transport")

    def __init__(self, device: Device) -> None:
        self.device = device
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are no subclasses of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.device._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.device._conn is self:
            self.device._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.device._conn is self:
            self.device._set_lost(f"connection lost ({type(exc).__name__}: {exc})" if exc
                                  else "connection closed by gateway")


class ConnectionEvents:
    """Mixed into :class:`~edgegw.sim.device.Device`; runs in the callbacks of its :class:`_Conn`."""

    # Set by Device.__init__ (this class holds no state of its own).
    protocol: int
    keepalive: int
    latencies: LatencySamples
    _loop: asyncio.AbstractEventLoop | None
    _conn: _Conn | None
    _transport: asyncio.Transport | None
    _frames: FrameReader
    _connack: asyncio.Future[str | None] | None
    _lost: asyncio.Future[str] | None
    _timer: asyncio.TimerHandle | None
    _last_tx: float
    _last_rx: float
    _online: asyncio.Event | None
    connected: bool
    _inflight: dict[int, _Inflight]
    acknowledged: int
    refused: int
    resent: int
    connects: int
    acked: SeqSet

    if TYPE_CHECKING:  # defined by Device (the wire and publishing)
        def kick(self) -> None: ...
        def pump(self) -> None: ...
        def _hello(self) -> bytes: ...
        def _ping(self) -> bytes: ...
        def _redelivery(self, frame: bytes) -> bytes: ...

    # --- connection events (from :class:`_Conn`) -------------------------------------------------------------

    def _on_made(self, conn: _Conn) -> None:
        assert self._loop is not None and conn.transport is not None
        self._conn = conn
        self._transport = conn.transport
        if self._online is not None and not self._online.is_set():  # went offline during the handshake
            self.kick()
            return
        self._last_rx = self._last_tx = self._loop.time()
        conn.transport.write(self._hello())

    def _on_data(self, data: bytes) -> None:
        assert self._loop is not None
        self._last_rx = self._loop.time()
        frames = self._frames
        frames.feed(data)
        acked = False
        try:
            while (frame := frames.next_frame()) is not None:
                packet = decode_packet(frame[0], frame[1], self.protocol)
                if isinstance(packet, Puback):
                    acked |= self._on_puback(packet)
                elif isinstance(packet, Connack):
                    self._on_connack(packet)
                elif isinstance(packet, Disconnect):  # MQTT 5: the gateway says why before it closes
                    self._set_lost(f"DISCONNECT from gateway: {packet.reason_code.name}")
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
        self._session_up()

    def _session_up(self) -> None:
        """The gateway accepted us: count it, resend what the last connection left unacknowledged, start pumping."""
        assert self._connack is not None
        self.connected = True
        self.connects += 1
        self._connack.set_result(None)
        assert self._transport is not None and self._loop is not None
        if self._inflight:  # not acknowledged on the previous connection
            self.resent += len(self._inflight)
            self._transport.write(b"".join(self._redelivery(m.frame) for m in self._inflight.values()))
            self._last_tx = self._loop.time()
        if self.keepalive:
            self._timer = self._loop.call_later(self.keepalive / 2, self._on_timer)
        self.pump()

    def _on_puback(self, packet: Puback) -> bool:
        return self._on_ack(packet.packet_id, not packet.reason_code.is_error)

    def _on_ack(self, pid: int, ok: bool) -> bool:
        message = self._inflight.pop(pid, None)
        if message is None:
            return False  # a late acknowledgement for a resend we already counted
        assert self._loop is not None
        if not ok:  # MQTT 5 PUBACK >= 0x80, CoAP 4.xx/5.xx: refused, not stored; the window is free again
            self.refused += 1
            return True
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
            transport.write(self._ping())
            self._last_tx = now
        self._timer = loop.call_later(self.keepalive / 2, self._on_timer)
