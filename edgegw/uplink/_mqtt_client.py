"""``uplink.client = "native"``: edgegw's own MQTT 5 / 3.1.1 client for the uplink, an asyncio Protocol over
edgegw's own TLS transport (:class:`edgegw.mqtt._tls.TLSTransport`, client side: mutual TLS through the uplink's
SSLContext; opened by :mod:`edgegw.uplink._tls_client`).

Why not ``loop.create_connection(ssl=...)``: asyncio's ``sslproto`` is pure Python on every read and every write
(``_SSLProtocolTransport.write`` -> ``_do_write`` -> ``SSLObject.write`` + ``_process_outgoing``; on read
``buffer_updated`` -> ``SSLObject.read``), 20-27 % of the event loop in the benchmark's scenario B. The TLS
transport lets OpenSSL write and read the non-blocking socket itself: one ``send`` per loop turn, and with
OpenSSL's read-ahead one ``read`` syscall per wake-up (then one ``recv_into`` per TLS record already read).

Why not paho: per message paho builds an ``MQTTMessageInfo``, takes mutexes, writes one TLS record per PUBLISH and
builds a ``Properties`` and a ``ReasonCode`` object per PUBACK: about half of the gateway's CPU in the benchmark
(docs/BENCHMARKS.md). Here a PUBLISH is a few bytes appended to a buffer that is written once per loop turn, and a
PUBACK is read straight from the bytes (``40 02 id id``, or with a success reason code) into the outbox's ack list;
anything else (CONNACK, SUBACK, a command PUBLISH, DISCONNECT, a refusing PUBACK) goes through edgegw's codec.

Keepalive (MQTT 5 §3.1.2.10): a PINGREQ when nothing was sent or received for ``keepalive`` seconds; no packet back
within ``keepalive`` seconds after it means a dead link ("Keep alive timeout", the words paho uses), which also
catches a path that silently stops forwarding without closing (the blackhole chaos case).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from typing import TYPE_CHECKING

from edgegw.mqtt._tls import TLSTransport
from edgegw.mqtt.codec import (
    MQTTProtocolError,
    decode_packet,
    encode_packet,
    encode_varint,
)
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Disconnect,
    Pingresp,
    Properties,
    PropertyId,
    Puback,
    Publish,
    ReasonCode,
    Suback,
    Subscribe,
    SubscriptionOptions,
)
from edgegw.uplink._linkbase import LinkBase, PackedProperties, reason_name
from edgegw.uplink._tls_client import open_tls

if TYPE_CHECKING:
    from edgegw.uplink.paho_bridge import Uplink

MAX_INCOMING = 4 * 1024 * 1024
"""Largest packet we accept from the upstream (announced as our Maximum Packet Size over MQTT 5): commands only."""
RECEIVE_MAXIMUM = 64
"""QoS 1 commands the upstream may have unacknowledged towards us (we acknowledge each at once)."""
_SHUTDOWN_GRACE = 1.0  # seconds buffered output may take to leave when the connection is closed
_READ_BUFFER = 64 * 1024  # decrypted bytes per recv_into: 16,000 PUBACKs of MQTT 3.1.1, 13,000 of MQTT 5
_WRITE_HIGH = 1 << 20  # bytes buffered in the transport before the pump is paused
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_PACK_ID = struct.Struct("!H").pack


class NativeLink(LinkBase, asyncio.Protocol):
    """One connection attempt of our own client."""

    encoded = True

    def __init__(self, uplink: Uplink, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        super().__init__(uplink, loop, host, port)
        self.version = MQTT_5 if self.mqtt5 else MQTT_311
        self.transport: TLSTransport | None = None
        self._in = bytearray()  # an incomplete packet carried over from the previous read
        self._out = bytearray()  # PUBLISHes of this loop turn, written by _flush
        self._flush_handle: asyncio.Handle | None = None
        self._next_mid = 0
        keepalive = float(uplink._settings.keepalive)
        self._keepalive = keepalive
        self._last_in = self._last_out = time.monotonic()
        self._ping_sent = 0.0  # when the unanswered PINGREQ went out, 0: none
        self._timer: asyncio.TimerHandle | None = None
        self._connected = False
        self.writes = 0
        """Writes of PUBLISHes to the transport (each carries every PUBLISH of one loop turn)."""

    # --- connecting --------------------------------------------------------------------------------------------

    async def establish(self) -> str | None:
        s = self.uplink._settings
        loop = self.loop
        deadline = loop.time() + s.connect_timeout
        scratch = self.uplink._read_buffer
        if scratch is None:  # one per uplink, kept across reconnects: the loop is single-threaded
            scratch = self.uplink._read_buffer = memoryview(bytearray(_READ_BUFFER))
        try:
            async with asyncio.timeout(s.connect_timeout):
                await open_tls(loop, self.host, self.port, self.uplink._ssl_context, s.tls_server_name or s.host,
                               self, scratch, deadline=deadline, close_timeout=_SHUTDOWN_GRACE)
        except TimeoutError:
            return f"TCP/TLS connect timed out after {s.connect_timeout} s"
        except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
            return f"{type(exc).__name__}: {exc}"
        properties = Properties()
        if self.mqtt5:
            properties = Properties(values={PropertyId.RECEIVE_MAXIMUM: RECEIVE_MAXIMUM,
                                            PropertyId.MAXIMUM_PACKET_SIZE: MAX_INCOMING})
        # A clean session every time: what was not acknowledged is resent from the outbox, never by the session.
        self._write(encode_packet(Connect(self.version, self.uplink.client_id, True, s.keepalive,
                                          properties=properties), self.version))
        await asyncio.wait((self.connack, self.lost), timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
        if self.connack.done():
            return self.connack.result()
        if self.lost.done():
            return f"connection closed before CONNACK: {self.lost.result()}"
        return f"no CONNACK within {s.connect_timeout} s"

    # --- sending -----------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, properties: PackedProperties | None) -> int:
        t = topic.encode()
        if self.mqtt5:
            props = properties.pack() if properties is not None else b"\x00"
        else:
            props = b""
        return self.publish_packet(_PACK_ID(len(t)) + t, payload, props, 4 + len(t) + len(props) + len(payload))

    def publish_packet(self, topic: bytes, payload: bytes, props: bytes, remaining: int) -> int:
        out = self._out
        if self.transport is None or self.lost.done():
            self.set_lost("publish on a closed connection")
            return 0
        inflight = self.inflight
        mid = self._next_mid
        while True:  # the next packet id not in use (MQTT-2.2.1-3); the window is far below 65535
            mid = mid + 1 if mid < 0xFFFF else 1
            if mid not in inflight and mid != self.command_mid:
                break
        self._next_mid = mid
        out.append(0x32)  # PUBLISH, QoS 1
        if remaining < 0x4000:  # a two-byte Remaining Length covers ~16 KiB: most records
            out += bytes((remaining,)) if remaining < 0x80 else bytes((remaining & 0x7F | 0x80, remaining >> 7))
        else:
            out += encode_varint(remaining)
        out += topic
        out += _PACK_ID(mid)
        out += props
        out += payload
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        return mid

    def _flush(self) -> None:
        """Everything published in this loop turn, in one write (one TLS record per 16 KiB, not per message)."""
        self._flush_handle = None
        if self._out and self.transport is not None:
            data = bytes(self._out)
            self._out.clear()
            self.writes += 1
            self.uplink.writes += 1
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._last_out = time.monotonic()

    # --- receiving (asyncio.Protocol) ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport
        # A window of frames may be a few MB; past this the pump waits for the socket (pause_writing)
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        self._last_in = self._last_out = time.monotonic()
        self._arm_timer()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._connected = False
        if exc is not None:
            self._error = f"{type(exc).__name__}: {exc}"
        elif not self.lost.done():  # not closed by us, nor after a DISCONNECT or a keepalive timeout
            self.closed_by_server = True
        self._stop_timer()
        self._flush_acks()
        self.set_lost(self._error if exc is not None and self._error else "connection closed by the server")

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def data_received(self, data: bytes) -> None:
        self._last_in = time.monotonic()
        self._ping_sent = 0.0  # any packet from the server shows the link is alive
        if self._in:
            self._in += data
            buf: bytes | bytearray = self._in
        else:
            buf = data
        n = len(buf)
        pos = 0
        inflight = self.inflight
        acked = 0
        try:
            while n - pos >= 2:
                first = buf[pos]
                length = buf[pos + 1]
                if first == 0x40 and length < 4 and n - pos >= 2 + length:
                    # PUBACK, the hot path: packet id and, over MQTT 5, a reason code (MQTT 5 §3.4.2.1).
                    if length < 2:
                        raise MQTTProtocolError("PUBACK shorter than its packet id")
                    mid = buf[pos + 2] << 8 | buf[pos + 3]
                    code = buf[pos + 4] if length == 3 else 0
                    pos += 2 + length
                    if code < 0x80:
                        record = inflight.get(mid)
                        if record is not None and not isinstance(record, list) and mid != self.probe_mid \
                                and record.id > self.boundary and self.uplink.otel is None:
                            del inflight[mid]
                            self.acks.append(record.id)
                            acked += 1
                            continue
                    elif acked:  # a refusal: the successes before it count first (a throttle's backoff reads them)
                        self.uplink.acked += acked
                        acked = 0
                    self._settle(mid, code)
                    continue
                # any other packet: frame it and let the codec decode it
                end = self._frame_end(buf, pos, n)
                if end < 0:
                    break
                header = pos
                pos = end
                self._on_packet(first, bytes(buf[header:end]))
        except MQTTProtocolError as exc:
            self._error = f"protocol error from the server: {exc}"
            self.set_lost(self._error)
            self._abort()
            return
        finally:
            if acked:
                self.uplink.acked += acked
            self._flush_acks()
        if pos < n:
            self._in = bytearray(buf[pos:])
        elif self._in:
            self._in = bytearray()
        refill = self.refill
        if refill is None or refill():
            self._wake()
        if self._flush_handle is not None:  # what the refill published goes now, not a loop turn later
            self._flush_handle.cancel()
            self._flush()

    def _frame_end(self, buf: bytes | bytearray, pos: int, n: int) -> int:
        """End offset of the packet starting at ``pos``, or -1 if it is not complete yet."""
        length = 0
        i = pos + 1
        for shift in (0, 7, 14, 21):
            if i >= n:
                return -1
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise MQTTProtocolError("remaining length longer than 4 bytes")
        end = i + length
        if end - pos > MAX_INCOMING:  # announced in CONNECT: the server must not send it (MQTT-3.1.2-24)
            raise MQTTProtocolError(f"packet of {end - pos} bytes exceeds our maximum of {MAX_INCOMING}")
        return end if end <= n else -1

    def _on_packet(self, first: int, frame: bytes) -> None:
        body_at = 2
        while frame[body_at - 1] & 0x80:
            body_at += 1
        packet = decode_packet(first, memoryview(frame)[body_at:], self.version)
        if isinstance(packet, Puback):
            reason_string = packet.properties.get(PropertyId.REASON_STRING)
            self._settle(packet.packet_id, packet.reason_code, reason_string if isinstance(reason_string, str)
                         else None)
        elif isinstance(packet, Publish):
            self._on_command(packet)
        elif isinstance(packet, Connack):
            self._on_connack(packet)
        elif isinstance(packet, Suback):
            self._on_suback(packet)
        elif isinstance(packet, Disconnect):
            text = f"DISCONNECT from server: {reason_name(packet.reason_code)} (0x{packet.reason_code:02x})"
            reason_string = packet.properties.get(PropertyId.REASON_STRING)
            if isinstance(reason_string, str) and reason_string:
                text += f": {reason_string}"
            self.taken_over = packet.reason_code == ReasonCode.SESSION_TAKEN_OVER
            self.set_lost(text)
            self._abort()
        elif not isinstance(packet, Pingresp):
            raise MQTTProtocolError(f"unexpected {type(packet).__name__.upper()} from the server")

    def _on_connack(self, packet: Connack) -> None:
        if self.connack.done():
            raise MQTTProtocolError("a second CONNACK")  # MQTT-3.2.0-2
        code = packet.reason_code
        if code >= 0x80 or (not self.mqtt5 and code):
            self.connack.set_result(f"CONNACK refused: {reason_name(code)} (0x{code:02x})")
            return
        props = packet.properties
        for pid in (PropertyId.RECEIVE_MAXIMUM, PropertyId.MAXIMUM_PACKET_SIZE):
            if props.get(pid) == 0:  # MQTT 5 §3.2.2.3.3, §3.2.2.3.6: a Protocol Error, not a limit of nothing
                # Taken as a limit, a Maximum Packet Size of 0 would quarantine every record of the outbox.
                raise MQTTProtocolError(f"CONNACK with {pid.name.replace('_', ' ').title()} 0")
        receive_max = props.get(PropertyId.RECEIVE_MAXIMUM)
        if isinstance(receive_max, int) and 0 < receive_max < self.window:
            self.window = receive_max  # never more in flight than the server accepts (BRIEF §3.8)
        max_packet = props.get(PropertyId.MAXIMUM_PACKET_SIZE)
        self.max_packet = max_packet if isinstance(max_packet, int) else None
        server_keepalive = props.get(PropertyId.SERVER_KEEP_ALIVE)
        if isinstance(server_keepalive, int) and server_keepalive > 0:
            self._keepalive = float(server_keepalive)  # MQTT-3.2.2-21: the server's value wins
            # The timer armed at connect ticks at a quarter of ours: a shorter server value must rule from now,
            # not from its first tick (keepalive 120 s, server 10 s: first check after 30 s, dropped after 15 s).
            self._stop_timer()
            self._arm_timer()
        self._connected = True
        self.connack.set_result(None)
        self._subscribe_commands()

    # --- downlink ------------------------------------------------------------------------------------------

    def _subscribe_commands(self) -> None:
        """Every connection starts a clean session upstream: subscribe to the command filter again (QoS 1).
        Over MQTT 5 with No Local (our own publishes never come back, even under a broad filter) and Retain
        Handling 2 (no retained messages at subscribe: a retained command would run again at every reconnect)."""
        filters = self.uplink.command_filters  # one per tenant space with [tenants] (edgegw/pipeline/commands.py)
        if not filters:
            return
        options = (SubscriptionOptions(qos=1, no_local=True, retain_handling=2) if self.mqtt5
                   else SubscriptionOptions(qos=1))
        mid = self._next_mid
        while True:  # a free packet id: after a release (Uplink.release_commands) publishes may be in flight
            mid = mid % 0xFFFF + 1
            if mid not in self.inflight:
                break
        self.command_mid = self._next_mid = mid
        self._write(encode_packet(Subscribe(mid, tuple((f, options) for f in filters)), self.version))

    def _on_suback(self, packet: Suback) -> None:
        if packet.packet_id != self.command_mid:
            return
        topic_filter = ",".join(self.uplink.command_filters)
        code = max(packet.reason_codes) if packet.reason_codes else 0x80
        if code >= 0x80:
            self.uplink._log.warning("uplink.command_subscribe_refused", topic_filter=topic_filter,
                                     reason=reason_name(code), code=f"0x{code:02x}")
        else:
            self.uplink._log.info("uplink.command_subscribed", topic_filter=topic_filter)
            self.commands_subscribed = True

    def _on_command(self, packet: Publish) -> None:
        if packet.qos > 1:  # we subscribed at QoS 1: the server must not send more (MQTT-3.8.4-8)
            raise MQTTProtocolError("QoS 2 PUBLISH on a QoS 1 subscription")
        self.uplink._on_command(packet.topic, packet.payload, packet.qos, packet.retain, packet.properties)
        if packet.qos == 1 and packet.packet_id is not None:
            self._write(b"\x40\x02" + _PACK_ID(packet.packet_id))  # PUBACK once handed to the device's session

    # --- keepalive -------------------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        self._timer = self.loop.call_later(max(0.1, self._keepalive / 4), self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = time.monotonic()
        keepalive = self._keepalive
        if self._ping_sent:
            if now - self._ping_sent >= keepalive:  # no packet at all since the PINGREQ: the link is dead
                self._error = "Keep alive timeout"
                self.set_lost("Keep alive timeout")
                self._abort()
                return
        elif now - self._last_out >= keepalive or now - self._last_in >= keepalive:
            self._write(_PINGREQ)
            self._ping_sent = now
        self._arm_timer()

    # --- closing ---------------------------------------------------------------------------------------------

    def close(self, graceful: bool) -> None:
        self._stop_timer()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()  # unsent publishes stay in the outbox: the next connection sends them
        self._flush_acks()
        self.set_lost("closed")
        transport = self.transport
        if transport is None:
            return
        if graceful and self._connected and not transport.is_closing():
            # Best effort, as paho: the write goes to the socket at once (unless its buffer is full) and the
            # socket is closed right after, without waiting for the TLS close_notify exchange.
            transport.write(_DISCONNECT)  # MQTT 5: reason 0x00 with no properties may be left out (§3.14.2.1)
        transport.abort()
        self.transport = None
        self._connected = False

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

