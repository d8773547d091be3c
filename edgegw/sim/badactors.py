"""Devices that misbehave on purpose, to show that the gateway refuses them and keeps serving everyone else.

Each bad actor is one task that repeats its attempt (``pause`` between attempts) until stopped and tallies what the
gateway did. The tallies are the result; the good devices' counters and the gateway staying up are the check.

==============  ===========================================================  ==========================
kind            attempt                                                      expected outcome
==============  ===========================================================  ==========================
wrong_cert      TLS with a certificate from another CA, CN of a real device   ``refused`` (never CONNACK)
foreign_topic   a real device publishing QoS 1 under another device's topic   ``refused`` (0x87 or close)
flood           a real device sending QoS 0 at ``flood_rate``                  ``sent``; ``disconnects``
malformed       CONNECT, then a packet of a reserved type                     ``refused`` (closed)
slow_connect    TLS, then the CONNECT one byte a second                        ``refused`` (timed out)
==============  ===========================================================  ==========================

An ``accepted`` count for wrong_cert, foreign_topic, malformed or slow_connect is a finding, not a simulator error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from edgegw.mqtt.codec import encode_packet, encode_publish
from edgegw.mqtt.packets import MQTT_5, MQTT_311, Connect, Publish

KINDS = ("wrong_cert", "foreign_topic", "flood", "malformed", "slow_connect")
_REPLY_TIMEOUT = 5.0
_SLOW_STEP = 1.0  # seconds between two bytes of a slow CONNECT
_SLOW_MAX = 120.0  # a gateway that waits longer than this for a CONNECT gets "accepted"


@dataclass(frozen=True, slots=True)
class Actor:
    kind: str
    device_id: str  # the identity it uses (wrong_cert: the real device it pretends to be)
    ssl_context: ssl.SSLContext
    victim: str  # foreign_topic: whose topic it publishes to


class BadActors:
    """Run ``actors`` against ``host:port`` until :meth:`stop`; :attr:`tally` holds ``kind -> outcome -> n``."""

    def __init__(self, actors: list[Actor], host: str, port: int, *, server_hostname: str | None, protocol: int,
                 flood_rate: float, pause: float) -> None:
        self.actors = actors
        self.host, self.port = host, port
        self.server_hostname = server_hostname or host
        self.protocol = protocol
        self.flood_rate = flood_rate
        self.pause = pause
        self.tally: dict[str, collections.Counter[str]] = {a.kind: collections.Counter() for a in actors}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        runners: dict[str, Callable[[Actor], Coroutine[Any, Any, None]]] = {
            "wrong_cert": self._connect_only, "foreign_topic": self._foreign_topic, "flood": self._flood,
            "malformed": self._malformed, "slow_connect": self._slow_connect}
        self._tasks = [asyncio.create_task(self._loop(a, runners[a.kind]), name=f"bad-{a.kind}-{a.device_id}")
                       for a in self.actors]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        self._tasks = []

    def summary(self) -> dict[str, dict[str, int]]:
        return {kind: dict(counter) for kind, counter in self.tally.items()}

    # --- one attempt per kind ---------------------------------------------------------------------------------

    async def _loop(self, actor: Actor, attempt: Callable[[Actor], Coroutine[Any, Any, None]]) -> None:
        while not self._stopping:
            self.tally[actor.kind]["attempts"] += 1
            try:
                await attempt(actor)
            except (OSError, asyncio.IncompleteReadError, ConnectionError):
                self.tally[actor.kind]["refused"] += 1  # handshake refused or the link closed on us
            except TimeoutError:
                self.tally[actor.kind]["timeout"] += 1
            await asyncio.sleep(self.pause)

    async def _open(self, actor: Actor) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=actor.ssl_context, server_hostname=self.server_hostname,
            ssl_handshake_timeout=_REPLY_TIMEOUT), _REPLY_TIMEOUT)

    async def _session(self, actor: Actor) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """TLS + CONNECT; None (counted as refused) without an accepting CONNACK."""
        reader, writer = await self._open(actor)
        writer.write(encode_packet(Connect(self.protocol, actor.device_id, True, 60), self.protocol))
        first = await asyncio.wait_for(reader.readexactly(2), _REPLY_TIMEOUT)
        body = await asyncio.wait_for(reader.readexactly(first[1]), _REPLY_TIMEOUT) if first[1] < 128 else b""
        if first[0] != 0x20 or len(body) < 2 or body[1] != 0:
            self.tally[actor.kind]["refused"] += 1
            writer.transport.abort()
            return None
        return reader, writer

    async def _connect_only(self, actor: Actor) -> None:
        session = await self._session(actor)
        if session is not None:
            self.tally[actor.kind]["accepted"] += 1
            session[1].transport.abort()

    async def _foreign_topic(self, actor: Actor) -> None:
        session = await self._session(actor)
        if session is None:
            return
        reader, writer = session
        try:
            writer.write(encode_publish(Publish(f"devices/{actor.victim}/telemetry", b'{"foreign":1}', qos=1,
                                                packet_id=1), self.protocol))
            reply = await asyncio.wait_for(reader.read(64), _REPLY_TIMEOUT)
            # 3.1.1 has no refusing PUBACK: the gateway closes. MQTT 5: PUBACK (0x40) with a reason >= 0x80.
            if not reply or (reply[0] == 0x40 and len(reply) >= 5 and reply[4] >= 0x80) or reply[0] == 0xE0:
                self.tally[actor.kind]["refused"] += 1
            else:
                self.tally[actor.kind]["accepted"] += 1
        finally:
            writer.transport.abort()

    async def _flood(self, actor: Actor) -> None:
        session = await self._session(actor)
        if session is None:
            return
        reader, writer = session
        frame = encode_publish(Publish(f"devices/{actor.device_id}/telemetry", b'{"flood":1}', qos=0),
                               self.protocol)
        tick = 0.01
        per_tick = max(1, round(self.flood_rate * tick))
        try:
            while not reader.at_eof():
                started = time.monotonic()
                writer.write(frame * per_tick)
                await asyncio.wait_for(writer.drain(), _REPLY_TIMEOUT)  # the gateway's backpressure holds us
                self.tally[actor.kind]["sent"] += per_tick
                await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))
            self.tally[actor.kind]["disconnects"] += 1
        except (OSError, ConnectionError):
            self.tally[actor.kind]["disconnects"] += 1
        finally:
            writer.transport.abort()

    async def _malformed(self, actor: Actor) -> None:
        session = await self._session(actor)
        if session is None:
            return
        reader, writer = session
        try:
            writer.write(b"\x00\x05hello")  # packet type 0 is reserved (MQTT-2.2.2-2)
            reply = await asyncio.wait_for(reader.read(64), _REPLY_TIMEOUT)
            self.tally[actor.kind]["refused" if not reply or reply[0] == 0xE0 else "accepted"] += 1
        finally:
            writer.transport.abort()

    async def _slow_connect(self, actor: Actor) -> None:
        reader, writer = await self._open(actor)
        connect = encode_packet(Connect(self.protocol, actor.device_id, True, 60), self.protocol)
        started = time.monotonic()
        try:
            for i in range(len(connect)):
                if time.monotonic() - started > _SLOW_MAX:
                    break
                writer.write(connect[i:i + 1])
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(reader.read(64), _SLOW_STEP)
                    if not data:
                        self.tally[actor.kind]["refused"] += 1
                        return
                    if data[0] == 0x20:
                        break
            self.tally[actor.kind]["accepted"] += 1
        finally:
            writer.transport.abort()


def protocol_level(name: str) -> int:
    return MQTT_5 if name == "5" else MQTT_311
