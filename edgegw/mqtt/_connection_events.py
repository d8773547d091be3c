"""The engine's vocabulary: the states of a device connection and the events
:class:`~edgegw.mqtt.connection.MQTTConnection` returns (what the peer did). Small values, no behaviour.

Part of the MQTT protocol engine (edgegw/mqtt/connection.py re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from edgegw.mqtt.packets import Connect, Publish, ReasonCode, Subscribe, Unsubscribe


class ConnectionState(Enum):
    AWAIT_CONNECT = auto()
    AUTHORIZING = auto()
    CONNECTED = auto()
    CLOSED = auto()


# --- Events (what the peer did) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    connect: Connect


@dataclass(slots=True)
class PublishReceived:
    """A PUBLISH that is new to this connection. At QoS 1/2 the shell must answer with :meth:`ack_publish`.

    Treated as immutable, but not frozen: one per device message (see :class:`~edgegw.mqtt.packets.Publish`)."""

    publish: Publish
    topic: str  # after topic-alias resolution (MQTT 5 §3.3.2.3.4)


@dataclass(frozen=True, slots=True)
class SubscribeRequested:
    subscribe: Subscribe


@dataclass(frozen=True, slots=True)
class UnsubscribeRequested:
    unsubscribe: Unsubscribe


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over. ``reason_code`` is SUCCESS for a clean client DISCONNECT."""

    reason_code: ReasonCode
    detail: str
    by_peer: bool


Event = ConnectRequested | PublishReceived | SubscribeRequested | UnsubscribeRequested | ConnectionClosed
