"""The uplink: outbox records to the cloud broker as QoS 1 publishes over MQTT with mutual TLS.

paho-mqtt is driven from the asyncio loop without its thread, as aiomqtt 2.5.1 does (STYLE §2): ``connect()`` (TCP,
TLS handshake, CONNECT written) runs in an executor; after it the socket is watched with ``add_reader`` /
``add_writer`` (through paho's register/unregister-write callbacks) and ``loop_misc()`` runs once a second from a
timer. Every connection attempt gets a fresh paho client, so paho never resends anything on its own: what was not
acknowledged is sent again from the outbox.

A record leaves the outbox only when the upstream acknowledged it (PUBACK < 0x80: :meth:`Outbox.ack`) or refused it
(PUBACK >= 0x80: :meth:`Outbox.quarantine`, never retried forever and never silently dropped).
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections import deque
from typing import Any, Literal

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from edgegw.config import UplinkSettings
from edgegw.outbox.store import Outbox, Record

UplinkState = Literal["connecting", "connected", "down"]

_MISC_INTERVAL = 1.0  # paho's loop_misc: keepalive pings and PINGRESP timeout
_POLL_MIN, _POLL_MAX = 0.01, 1.0  # fallback polling when the outbox cannot tell us when to look again
_FETCH_MIN, _FETCH_MAX = 256, 4096  # records per outbox read (4 windows within these bounds): one await each
_OK = MQTTErrorCode.MQTT_ERR_SUCCESS


class Uplink:
    """Run :meth:`run` as a task; cancel it to stop (it sends DISCONNECT if it can and releases everything)."""

    def __init__(self, settings: UplinkSettings, outbox: Outbox, *, client_id: str,
                 ssl_context: ssl.SSLContext) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        self._settings = settings
        self._outbox = outbox
        self.client_id = client_id
        server_name = settings.tls_server_name or settings.host
        # paho checks the certificate against the address it connects to; name the server we expect instead.
        self._tls: Any = ssl_context if server_name == settings.host else _ServerName(ssl_context, server_name)
        self._log = structlog.get_logger("edgegw.uplink")
        self._state: UplinkState = "down"
        self._running = False
        self._resume_after = 0  # the next connection starts fetching after this record id
        self._link: _Link | None = None
        self.sent = 0
        """Publishes handed to the broker (a record sent again after a reconnect counts again)."""
        self.acked = 0
        """PUBACKs with a success reason code (0x10 "no matching subscribers" included)."""
        self.refused = 0
        """PUBACKs with a reason code >= 0x80; those records were quarantined."""
        self.reconnects = 0
        """Successful connections after the first one."""
        self.connect_failures = 0
        self.last_rtt: float | None = None
        """Seconds from PUBLISH to PUBACK of the most recent sampled message (one sample in flight at a time)."""

    @property
    def state(self) -> UplinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    @property
    def inflight(self) -> int:
        return len(self._link.inflight) if self._link is not None else 0

    # --- connection lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        if self._running:
            raise RuntimeError("Uplink.run() is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        s = self._settings
        attempt = 0
        connections = 0
        try:
            while True:
                self._state = "connecting"
                link = self._link = _Link(self, loop)
                graceful = False
                try:
                    error = await self._establish(link)
                    if error is None:
                        attempt = 0
                        if connections:
                            self.reconnects += 1
                        connections += 1
                        self._state = "connected"
                        self._log.info("uplink.connected", host=s.host, port=s.port, protocol=s.protocol,
                                       client_id=self.client_id, window=link.window, resume_after=self._resume_after)
                        graceful = True
                        reason = await self._pump(link)
                        graceful = False
                        self._log.warning("uplink.disconnected", reason=reason, error=link.paho_log.last,
                                          unacked=len(link.inflight), sent=self.sent, acked=self.acked)
                finally:
                    link.close(graceful=graceful)
                    self._state = "down"
                # Full jitter over an exponential cap, spreading a fleet that lost the same broker; the floor of
                # reconnect_min/2 keeps a broker that accepts and drops at once from being hammered.
                cap = min(s.reconnect_max, s.reconnect_min * 2 ** min(attempt, 30))
                delay = max(s.reconnect_min / 2, random.uniform(0, cap))
                if error is not None:
                    self.connect_failures += 1
                    self._log.warning("uplink.connect_failed", host=s.host, port=s.port, error=error,
                                      attempt=attempt + 1, retry_in=round(delay, 3))
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            self._state = "down"
            self._link = None
            self._running = False
            self._log.info("uplink.stopped", sent=self.sent, acked=self.acked, refused=self.refused,
                           reconnects=self.reconnects)

    async def _establish(self, link: _Link) -> str | None:
        """Connect and wait for CONNACK, within connect_timeout. Returns None when connected, else why not."""
        s = self._settings
        loop = link.loop
        deadline = loop.time() + s.connect_timeout
        connecting = loop.run_in_executor(None, link.blocking_connect, s.host, s.port, s.keepalive)
        # asyncio.wait, not wait_for: the thread cannot be cancelled; on timeout or cancellation link.close()
        # leaves the socket to the thread, which closes it when connect() returns.
        await asyncio.wait((connecting,), timeout=s.connect_timeout)
        if not connecting.done():
            return f"TCP/TLS connect timed out after {s.connect_timeout} s"
        error = connecting.result()
        if error is not None:
            return error
        link.attach()
        await asyncio.wait((link.connack, link.lost), timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
        if link.connack.done():
            return link.connack.result()
        if link.lost.done():
            return link.paho_log.last or f"connection closed before CONNACK: {link.lost.result()}"
        return f"no CONNACK within {s.connect_timeout} s"

    # --- the pump -------------------------------------------------------------------------------------------

    async def _pump(self, link: _Link) -> str:
        """Keep up to ``link.window`` publishes in flight until the connection is lost; returns the reason."""
        outbox = self._outbox
        cursor = self._resume_after
        buffered: deque[Record] = deque()
        fetch_size = min(max(4 * link.window, _FETCH_MIN), _FETCH_MAX)
        poll = 0.0
        try:
            while not link.lost.done():
                if not buffered:
                    high, depth = outbox.committed_id, outbox.depth
                    try:
                        records = await outbox.fetch_after(cursor, fetch_size)
                    except sqlite3.Error as exc:
                        self._log.error("uplink.fetch_failed", error=str(exc))
                        await asyncio.wait((link.lost,), timeout=_POLL_MAX)
                        continue
                    if records:
                        buffered.extend(records)
                        cursor = records[-1].id
                        poll = 0.0
                        continue
                    if depth == 0 and high > cursor:
                        cursor = high  # the table was empty: every id up to ``high`` is settled
                    now_high = outbox.committed_id
                    if now_high > cursor and now_high != high:
                        continue  # a group committed while we read: look again at once
                    if now_high <= cursor and await self._wait_for_records(link, cursor):
                        continue
                    # Rows above the cursor that fetch_after filters (acknowledged, delete not yet committed),
                    # or an outbox that is stopping: nothing will notify us, so look again after a pause.
                    poll = min(max(2 * poll, _POLL_MIN), _POLL_MAX)
                    await asyncio.wait((link.lost,), timeout=poll)
                    continue
                room = link.window - len(link.inflight)
                if room > 0:
                    self._publish(link, buffered, room)
                else:
                    await link.wait_for_slot()
            return link.lost.result()
        finally:
            # The next connection resumes just below the oldest record not settled here. Everything at or below
            # it was acknowledged (its delete may still be queued: fetch_after filters those) or quarantined, so
            # this equals restarting from 0 without reading settled rows again.
            unsettled = list(link.inflight.values())
            if buffered:
                unsettled.append(buffered[0].id)
            self._resume_after = min(unsettled) - 1 if unsettled else cursor

    async def _wait_for_records(self, link: _Link, cursor: int) -> bool:
        """Wait until a record above ``cursor`` is committed (True) or the connection is lost; False if the
        outbox woke us without one (it is stopping)."""
        waiter = link.loop.create_task(self._outbox.wait_for_records_after(cursor))
        try:
            await asyncio.wait((waiter, link.lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if waiter.done() and not waiter.cancelled():
            waiter.result()
        return link.lost.done() or self._outbox.committed_id > cursor

    def _publish(self, link: _Link, buffered: deque[Record], room: int) -> None:
        client = link.client
        inflight = link.inflight
        prefix = self._settings.topic_prefix
        mqtt5 = link.mqtt5
        max_packet = link.max_packet
        first_mid = 0
        n = 0
        while buffered and n < room:
            record = buffered.popleft()
            device = record.device_id
            head = f"devices/{device}/"
            topic = record.topic
            topic = f"{prefix}/{device}/{topic[len(head):] if topic.startswith(head) else topic}"
            try:
                properties = _user_properties(record) if mqtt5 else None
                problem = _unsendable(topic, record.payload, properties, max_packet)
                if problem is None:
                    info = client.publish(topic, record.payload, 1, False, properties)
            except (ValueError, TypeError, OverflowError) as exc:
                problem = str(exc)
            if problem is not None:  # sending it again would fail again: set it aside, keep the queue moving
                self._quarantine(record.id, f"cannot publish upstream to {topic[:200]!r}: {problem}")
                continue
            if info.rc != _OK:
                buffered.appendleft(record)
                link.set_lost(f"publish failed: {mqtt.error_string(info.rc)}")
                break
            inflight[info.mid] = record.id
            if not first_mid:
                first_mid = info.mid
            n += 1
        self.sent += n
        if first_mid and link.probe_mid == 0:
            link.probe_mid, link.probe_t = first_mid, time.monotonic()

    def _quarantine(self, record_id: int, reason: str) -> None:
        self.refused += 1
        self._outbox.quarantine(record_id, reason)
        self._log.warning("uplink.publish_refused", record_id=record_id, reason=reason)


class _Link:
    """One connection attempt: a fresh paho client, its socket registrations, timer and in-flight publishes."""

    def __init__(self, uplink: Uplink, loop: asyncio.AbstractEventLoop) -> None:
        s = uplink._settings
        self.uplink = uplink
        self.loop = loop
        self.mqtt5 = s.protocol == "5"
        self.window = s.inflight_window
        protocol = MQTTProtocolVersion.MQTTv5 if self.mqtt5 else MQTTProtocolVersion.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uplink.client_id, protocol=protocol,
                             reconnect_on_failure=False)  # no silent reconnects (or v3.1 downgrades) inside paho
        client.connect_timeout = s.connect_timeout
        # Our window bounds what is in flight; paho's must match so it never queues (each PUBACK scans its list:
        # keep it small, BRIEF §2).
        client.max_inflight_messages_set(self.window)
        client.tls_set_context(uplink._tls)
        self.paho_log = _LastError()
        client.enable_logger(self.paho_log)
        self.client = client  # no callbacks yet: connect() runs in another thread, callbacks touch loop objects
        self.inflight: dict[int, int] = {}  # paho mid -> record id
        self.acks: list[int] = []  # acknowledged record ids, handed to the outbox once per socket read
        self.connack: asyncio.Future[str | None] = loop.create_future()  # None: accepted; else why refused
        self.lost: asyncio.Future[str] = loop.create_future()
        self.slot: asyncio.Future[None] | None = None
        self.max_packet: int | None = None  # the server's Maximum Packet Size (MQTT 5 CONNACK)
        self.probe_mid = 0
        self.probe_t = 0.0
        self.fd = -1
        self.sock: Any = None
        self.misc: asyncio.TimerHandle | None = None
        self._lock = threading.Lock()
        self._thread_done = False
        self._abandoned = False

    def blocking_connect(self, host: str, port: int, keepalive: int) -> str | None:
        """In an executor thread: TCP connect, TLS handshake, CONNECT written. Returns None or the error."""
        error: str | None = None
        try:
            rc = self.client.connect(host, port, keepalive)
            if rc != _OK:  # e.g. writing CONNECT failed: the server rejected our certificate after the handshake
                error = mqtt.error_string(rc)
                if self.paho_log.last:
                    error = f"{error} ({self.paho_log.last})"
        except Exception as exc:  # OSError, ssl.SSLError, CertificateError; keep the text, not the traceback
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._thread_done = True
            abandoned = self._abandoned
        if error is not None or abandoned:
            _close_socket(self.client)
        return error

    def attach(self) -> None:
        """After connect() returned in the executor: watch the socket from the loop."""
        client = self.client
        self.sock = client.socket()
        self.fd = self.sock.fileno()
        self.loop.add_reader(self.fd, self._on_readable)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        if client.want_write():  # CONNECT did not fit in the socket buffer
            self.loop.add_writer(self.fd, self._on_writable)
        self.misc = self.loop.call_later(_MISC_INTERVAL, self._on_misc)

    def set_lost(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        self._wake()

    async def wait_for_slot(self) -> None:
        self.slot = self.loop.create_future()
        try:
            await self.slot
        finally:
            self.slot = None

    def _wake(self) -> None:
        if self.slot is not None and not self.slot.done():
            self.slot.set_result(None)

    def close(self, graceful: bool) -> None:
        """Release everything; with ``graceful``, try to send DISCONNECT first. Idempotent."""
        with self._lock:
            self._abandoned = True
            thread_done = self._thread_done
        if self.misc is not None:
            self.misc.cancel()
            self.misc = None
        self._unwatch()
        client = self.client
        client.on_socket_close = client.on_socket_register_write = client.on_socket_unregister_write = None
        client.on_connect = client.on_disconnect = client.on_publish = None
        self._flush_acks()
        self.set_lost("closed")
        if not thread_done:
            return  # connect() is still running in its thread, which closes the socket when it returns
        if graceful and client.is_connected():
            try:  # with no write callback, paho writes DISCONNECT at once (best effort: the socket is non-blocking)
                client.disconnect()
            except Exception:  # noqa: BLE001 - we are closing anyway
                pass
        _close_socket(client)

    def _unwatch(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            self.fd = -1

    def _flush_acks(self) -> None:
        if self.acks:
            self.uplink._outbox.ack(self.acks)
            self.acks = []

    # --- loop callbacks -------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        client = self.client
        try:
            client.loop_read()
            # TLS can hold decrypted bytes the kernel no longer signals as readable: drain them now.
            while self.fd >= 0 and self.sock.pending():
                client.loop_read()
        except Exception as exc:  # a bug on our side or in paho: drop this connection rather than stall
            self.set_lost(f"internal error while reading: {exc!r}")
            self.uplink._log.exception("uplink.read_failed")
        finally:
            self._flush_acks()

    def _on_writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception as exc:
            self.set_lost(f"internal error while writing: {exc!r}")
            self.uplink._log.exception("uplink.write_failed")
        if self.fd >= 0 and not self.client.want_write():
            self.loop.remove_writer(self.fd)

    def _on_misc(self) -> None:
        self.misc = None
        if self.fd < 0:
            return
        try:
            self.client.loop_misc()
        except Exception as exc:
            self.set_lost(f"internal error in loop_misc: {exc!r}")
        if self.fd >= 0:
            self.misc = self.loop.call_later(_MISC_INTERVAL, self._on_misc)

    # --- paho callbacks (always on the loop thread: they run inside loop_read/loop_write/loop_misc) -----------

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.fd >= 0:
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.fd >= 0:
            self.loop.remove_writer(self.fd)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._unwatch()  # before paho closes the fd
        # paho usually calls on_disconnect right after this, with a better reason; let that one win.
        self.loop.call_soon(self.set_lost, "socket closed")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.connack.done():
            return
        if reason.is_failure:
            self.connack.set_result(f"CONNACK refused: {reason} (0x{reason.value:02x})")
            return
        receive_max = getattr(properties, "ReceiveMaximum", None) if self.mqtt5 else None
        if receive_max and receive_max < self.window:  # never more in flight than the server accepts (BRIEF §3.8)
            self.window = receive_max  # paho's own limit cannot change once connected; it stays >= ours
        self.max_packet = getattr(properties, "MaximumPacketSize", None) if self.mqtt5 else None
        self.connack.set_result(None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        text = str(reason)
        if flags.is_disconnect_packet_from_server:
            text = f"DISCONNECT from server: {text} (0x{reason.value:02x})"
            reason_string = getattr(properties, "ReasonString", None)
            if reason_string:
                text += f": {reason_string}"
        self.set_lost(text)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        record_id = self.inflight.pop(mid, None)
        if record_id is None:
            return
        if reason.value >= 0x80:
            text = f"PUBACK {reason} (0x{reason.value:02x})"
            reason_string = getattr(properties, "ReasonString", None)
            self.uplink._quarantine(record_id, f"{text}: {reason_string}" if reason_string else text)
        else:
            self.acks.append(record_id)
            self.uplink.acked += 1
        if mid == self.probe_mid:
            self.uplink.last_rtt = time.monotonic() - self.probe_t
            self.probe_mid = 0
        self._wake()


class _LastError(logging.Logger):
    """paho's logger: keeps the last warning/error (e.g. the TLS alert that ended a handshake), ignores the rest.

    paho only calls ``log()``; overriding it keeps paho's per-packet debug lines down to one comparison.
    """

    def __init__(self) -> None:
        super().__init__("edgegw.uplink.paho", logging.WARNING)
        self.last: str | None = None

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if level >= logging.WARNING:
            try:
                self.last = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.last = f"{msg} {args}"


class _ServerName:
    """Stands in for the SSLContext handed to paho so the certificate is checked against ``server_name`` rather
    than the address paho connects to (paho calls ``wrap_socket(sock, server_hostname=host, ...)``)."""

    def __init__(self, context: ssl.SSLContext, server_name: str) -> None:
        self._context = context
        self._server_name = server_name

    @property
    def check_hostname(self) -> bool:
        return self._context.check_hostname

    def wrap_socket(self, sock: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self._server_name
        return self._context.wrap_socket(sock, **kwargs)


class _PackedProperties:
    """MQTT 5 PUBLISH properties encoded once by us. paho only calls ``pack()`` on them; its own ``Properties``
    costs ~44 us per message to build and pack, about the whole budget of a publish."""

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:  # paho may log it
        return f"<{len(self._packed)} bytes of properties>"


def _utf8_pair(key: str, value: str) -> bytes:
    """One User Property (0x26) with its UTF-8 string pair (MQTT 5 §1.5.7, §3.3.2.3.7)."""
    k, v = key.encode(), value.encode()
    return b"\x26" + len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _user_properties(record: Record) -> _PackedProperties:
    body = (_utf8_pair("edgegw-record-id", str(record.id)) + _utf8_pair("edgegw-device-id", record.device_id)
            + _utf8_pair("edgegw-received-at", iso_utc_ms(record.received_at)))
    return _PackedProperties(_varint(len(body)) + body)


def _unsendable(topic: str, payload: bytes, properties: _PackedProperties | None, max_packet: int | None) -> str | None:
    """Why this PUBLISH can never be accepted upstream, or None. Checked here rather than by being disconnected
    for it over and over (a wildcard in a topic name is a protocol error, MQTT-3.3.2-2)."""
    if "+" in topic or "#" in topic:
        return "wildcard in topic name"
    encoded = len(topic.encode())
    if encoded > 65535:
        return f"topic is {encoded} bytes (MQTT allows 65535)"
    if max_packet is not None:
        remaining = 2 + encoded + 2 + (len(properties.pack()) if properties is not None else 0) + len(payload)
        size = 1 + len(_varint(remaining)) + remaining
        if size > max_packet:
            return f"PUBLISH of {size} bytes exceeds the server's Maximum Packet Size {max_packet}"
    return None


def iso_utc_ms(ts: float) -> str:
    """``2024-05-01T12:00:00.123Z`` for a unix time."""
    secs = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((ts - secs) * 1000):03d}Z"


def _close_socket(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
