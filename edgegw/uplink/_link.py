"""``uplink.client = "paho"``: one connection attempt driven by a fresh paho client from the asyncio loop
(add_reader / add_writer, ``loop_misc`` once a second), as aiomqtt 2.5.1 does (STYLE §2): ``connect()`` (TCP, TLS
handshake, CONNECT written) runs in an executor; after it the socket is watched by the loop. Every attempt gets a
fresh client, so paho never resends anything on its own: what was not acknowledged is sent again from the outbox."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgegw.mqtt.packets import NO_PROPERTIES, Properties, PropertyId
from edgegw.uplink._linkbase import LinkBase, PackedProperties
from edgegw.uplink._wire import _close_socket

if TYPE_CHECKING:
    from edgegw.uplink.paho_bridge import Uplink

_MISC_INTERVAL = 1.0  # paho's loop_misc: keepalive pings and PINGRESP timeout
_OK = MQTTErrorCode.MQTT_ERR_SUCCESS


class _Link(LinkBase):
    """One connection attempt: a fresh paho client, its socket registrations, timer and in-flight publishes."""

    def __init__(self, uplink: Uplink, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        super().__init__(uplink, loop, host, port)
        s = uplink._settings
        protocol = MQTTProtocolVersion.MQTTv5 if self.mqtt5 else MQTTProtocolVersion.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uplink.client_id, protocol=protocol,
                             reconnect_on_failure=False)  # no silent reconnects (or v3.1 downgrades) inside paho
        client.connect_timeout = s.connect_timeout
        # Our window bounds what is in flight; paho's must match so it never queues (each PUBACK scans its list:
        # keep it small, BRIEF §2).
        client.max_inflight_messages_set(self.window)
        server_name = s.tls_server_name or s.host
        # paho checks the certificate against the address it connects to; name the server we expect instead.
        tls: Any = uplink._ssl_context
        if server_name != s.host:
            tls = _ServerName(tls, server_name)
        client.tls_set_context(tls)
        self.paho_log = _LastError()
        client.enable_logger(self.paho_log)
        self.client = client  # no callbacks yet: connect() runs in another thread, callbacks touch loop objects
        self.fd = -1
        self.sock: Any = None
        self.misc: asyncio.TimerHandle | None = None
        self._lock = threading.Lock()
        self._thread_done = False
        self._abandoned = False

    @property
    def error(self) -> str | None:
        return self.paho_log.last

    async def establish(self) -> str | None:
        s = self.uplink._settings
        loop = self.loop
        deadline = loop.time() + s.connect_timeout
        connecting = loop.run_in_executor(None, self.blocking_connect, self.host, self.port, s.keepalive)
        # asyncio.wait, not wait_for: the thread cannot be cancelled; on timeout or cancellation close()
        # leaves the socket to the thread, which closes it when connect() returns.
        await asyncio.wait((connecting,), timeout=s.connect_timeout)
        if not connecting.done():
            return f"TCP/TLS connect timed out after {s.connect_timeout} s"
        error = connecting.result()
        if error is not None:
            return error
        self.attach()
        await asyncio.wait((self.connack, self.lost), timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
        if self.connack.done():
            return self.connack.result()
        if self.lost.done():
            return self.paho_log.last or f"connection closed before CONNACK: {self.lost.result()}"
        return f"no CONNACK within {s.connect_timeout} s"

    def publish(self, topic: str, payload: bytes, properties: PackedProperties | None) -> int:
        info = self.client.publish(topic, payload, 1, False, properties)  # type: ignore[arg-type]
        if info.rc != _OK:
            self.set_lost(f"publish failed: {mqtt.error_string(info.rc)}")
            return 0
        return int(info.mid)

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
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        if client.want_write():  # CONNECT did not fit in the socket buffer
            self.loop.add_writer(self.fd, self._on_writable)
        self.misc = self.loop.call_later(_MISC_INTERVAL, self._on_misc)

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
        client.on_message = client.on_subscribe = None
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
        self._subscribe_commands()

    # --- downlink -------------------------------------------------------------------------------------------

    def _subscribe_commands(self) -> None:
        """Every connection starts a clean session upstream: subscribe to the command filter again (QoS 1).
        Over MQTT 5 with No Local (our own publishes never come back, even under a broad filter) and Retain
        Handling 2 (no retained messages at subscribe: a retained command would run again at every reconnect)."""
        filters = self.uplink.command_filters  # one per tenant space with [tenants] (edgegw/pipeline/commands.py)
        if not filters:
            return
        topic_filter = ",".join(filters)
        if self.mqtt5:
            options = SubscribeOptions(qos=1, noLocal=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            rc, mid = self.client.subscribe([(f, options) for f in filters])
        else:
            rc, mid = self.client.subscribe([(f, 1) for f in filters])
        self.command_mid = mid if mid is not None else -1
        if rc != _OK:
            self.set_lost(f"subscribe to {topic_filter!r} failed: {mqtt.error_string(rc)}")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if mid != self.command_mid:
            return
        topic_filter = ",".join(self.uplink.command_filters)
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            self.uplink._log.warning("uplink.command_subscribe_refused", topic_filter=topic_filter,
                                     reason=str(refused[0]), code=f"0x{refused[0].value:02x}")
        else:
            self.uplink._log.info("uplink.command_subscribed", topic_filter=topic_filter)
            self.commands_subscribed = True

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # paho acknowledges it (PUBACK) when this returns
        self.uplink._on_command(message.topic, bytes(message.payload), message.qos, bool(message.retain),
                                _command_properties(getattr(message, "properties", None)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        text = str(reason)
        if flags.is_disconnect_packet_from_server:
            text = f"DISCONNECT from server: {text} (0x{reason.value:02x})"
            self.taken_over = reason.value == 0x8E  # Session taken over
            reason_string = getattr(properties, "ReasonString", None)
            if reason_string:
                text += f": {reason_string}"
        self.set_lost(text)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._settle(mid, reason.value, getattr(properties, "ReasonString", None))
        self._wake()


def _command_properties(props: Any) -> Properties:
    """paho's properties of a command as edgegw's (only those a command carries down to a device)."""
    if props is None:
        return NO_PROPERTIES
    values: dict[PropertyId, int | str | bytes] = {}
    for pid, name in ((PropertyId.PAYLOAD_FORMAT_INDICATOR, "PayloadFormatIndicator"),
                      (PropertyId.MESSAGE_EXPIRY_INTERVAL, "MessageExpiryInterval"),
                      (PropertyId.CONTENT_TYPE, "ContentType"), (PropertyId.RESPONSE_TOPIC, "ResponseTopic"),
                      (PropertyId.CORRELATION_DATA, "CorrelationData")):
        value = getattr(props, name, None)
        if value is not None:
            values[pid] = bytes(value) if pid == PropertyId.CORRELATION_DATA else value
    user = tuple((str(k), str(v)) for k, v in (getattr(props, "UserProperty", None) or ()))
    return Properties(values=values, user=user) if values or user else NO_PROPERTIES


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
