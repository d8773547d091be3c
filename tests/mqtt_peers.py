"""A paho device client for the MQTT engine tests (3.1.1 and 5), recording what it receives. Every wait bounded."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from edgegw.mqtt.codec import FrameReader, decode_packet, encode_packet
from edgegw.mqtt.packets import Packet

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311


@dataclass(frozen=True)
class Got:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any


def props(packet: int = PacketTypes.PUBLISH, **values: Any) -> PahoProperties:
    p = PahoProperties(packet)
    for k, v in values.items():
        setattr(p, k, v)
    return p


class PahoDevice:
    def __init__(self, ctx: ssl.SSLContext | None, port: int, client_id: str, *,
                 protocol: MQTTProtocolVersion = V5, clean: bool = True, session_expiry: int | None = None,
                 will: tuple[str, bytes, int, bool] | None = None, will_props: PahoProperties | None = None,
                 keepalive: int = 30, connect_props: PahoProperties | None = None,
                 reconnect_on_failure: bool = True) -> None:
        """``reconnect_on_failure=False`` for a device the test never expects to come back by itself: paho's
        network thread then ends as soon as the link is refused or lost, instead of sleeping out its reconnect delay
        (1 s) which ``loop_stop()`` and ``close()`` would otherwise wait for."""
        self.port = port
        self.protocol = protocol
        self.messages: list[Got] = []
        self.cond = threading.Condition()
        self.connack: Any = None
        self.connack_props: Any = None
        self.session_present: bool | None = None
        self.connected = threading.Event()
        self.done = threading.Event()  # CONNACK (either way) or disconnect
        self.disconnect_reason: Any = None
        self.subacks: dict[int, list[Any]] = {}
        kwargs: dict[str, Any] = {}
        if protocol != V5:
            kwargs["clean_session"] = clean
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                        reconnect_on_failure=reconnect_on_failure, **kwargs)
        if ctx is not None:
            c.tls_set_context(ctx)
        if will is not None:
            c.will_set(will[0], will[1], will[2], will[3], properties=will_props)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        self.client = c
        self._clean = clean
        self._keepalive = keepalive
        self._connect_props = connect_props
        if session_expiry is not None:
            self._connect_props = connect_props or props(PacketTypes.CONNECT)
            self._connect_props.SessionExpiryInterval = session_expiry

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack = reason
        self.connack_props = properties
        self.session_present = bool(flags.session_present)
        if not reason.is_failure:
            self.connected.set()
        self.done.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnect_reason = reason
        self.connected.clear()
        self.done.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self.cond:
            self.subacks[mid] = list(reasons)
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(Got(m.topic, bytes(m.payload), m.qos, bool(m.retain), getattr(m, "properties", None)))
            self.cond.notify_all()

    def start(self, timeout: float = 5.0) -> PahoDevice:
        """Connect and wait for the CONNACK (or the refusal). Blocking: from a test thread, or via to_thread."""
        kwargs: dict[str, Any] = {"keepalive": self._keepalive}
        if self.protocol == V5:
            kwargs["clean_start"] = self._clean
            kwargs["properties"] = self._connect_props
        self.client.connect("127.0.0.1", self.port, **kwargs)
        self.client.loop_start()
        self.done.wait(timeout)
        return self

    def subscribe(self, topic: str | list[tuple[str, Any]], qos: int = 1, timeout: float = 5.0,
                  properties: PahoProperties | None = None, options: Any = None) -> list[Any]:
        if options is not None:
            result, mid = self.client.subscribe(topic, options=options, properties=properties)
        else:
            result, mid = self.client.subscribe(topic, qos, properties=properties)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, timeout), "no SUBACK"
            return self.subacks[mid]

    def wait_messages(self, n: int, timeout: float = 5.0) -> list[Got]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def drop(self) -> None:
        """Close the socket without DISCONNECT (as a lost link would)."""
        drop_link(self.client)


def drop_link(client: mqtt.Client) -> None:
    """End a paho client's link without DISCONNECT (as a lost link would: the gateway publishes its will)."""
    # No reconnect after this: otherwise paho's network thread, seeing the link lost, sleeps out its reconnect
    # delay (1 s) and loop_stop() waits for it, so the gateway saw the loss up to 1 s before drop() returns
    # (a will delay measured from here then looked 1 s short). paho 2.2 has no public setter for this flag.
    client._reconnect_on_failure = False
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket included
        # Shut the TCP socket down under paho first (a FIN, no DISCONNECT, no TLS close_notify): its network
        # thread wakes from select() at once, sees the link lost and ends, where a plain loop_stop() would wait
        # out select()'s 1 s timeout. socket.socket's method: the fd only, not the SSL object paho reads with.
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the peer
    client.loop_stop()
    if sock is not None:
        sock.close()


async def until(predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


class RawClient:
    """Packets from our codec over a blocking TLS (or plain) socket: exact control over what the device sends."""

    def __init__(self, ctx: ssl.SSLContext | None, port: int, version: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock: socket.socket = ctx.wrap_socket(sock, server_hostname="localhost") if ctx else sock
        self.version = version
        self.frames = FrameReader(1 << 20)

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode_packet(p, self.version) for p in packets))

    def read(self, timeout: float = 5.0) -> Packet | None:
        self.sock.settimeout(timeout)
        while True:
            frame = self.frames.next_frame()
            if frame is not None:
                return decode_packet(frame[0], frame[1], self.version)
            try:
                data = self.sock.recv(4096)
            except (ConnectionError, ssl.SSLError):
                return None
            if not data:
                return None
            self.frames.feed(data)

    def close(self) -> None:
        self.sock.close()
