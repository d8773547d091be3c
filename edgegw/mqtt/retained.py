"""Retained messages (MQTT 5 §3.3.1.3), bounded by count and bytes. In memory; pure, no I/O.

A new retained message past either bound is refused (not stored; it is still delivered and enters the outbox):
dropping an older device's retained message to make room would let one device erase another's state.
"""

from __future__ import annotations

from collections.abc import Callable

from edgegw.mqtt.session import Message
from edgegw.mqtt.subscriptions import filter_matches


class RetainedStore:
    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._messages: dict[str, Message] = {}
        self.bytes = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, message: Message) -> bool:
        """Store (or, with an empty payload, delete: MQTT-3.3.1-10) the retained message for its topic."""
        old = self._messages.pop(message.topic, None)
        if old is not None:
            self.bytes -= old.size
        if not message.payload:
            return True
        if len(self._messages) >= self.max_count or self.bytes + message.size > self.max_bytes:
            if old is not None:  # keep the previous value rather than lose both
                self._messages[old.topic] = old
                self.bytes += old.size
            self.refused += 1
            return False
        self._messages[message.topic] = message
        self.bytes += message.size
        return True

    def matching(self, topic_filter: str, now: float,
                 on_expired: Callable[[str], None] | None = None) -> list[Message]:
        """Retained messages whose topic matches ``topic_filter`` and that have not expired. Expired ones found on
        the way are forgotten, and their topics told to ``on_expired`` (the journal: they leave the file too)."""
        if "+" not in topic_filter and "#" not in topic_filter:
            m = self._messages.get(topic_filter)
            found = [m] if m is not None else []
        else:
            found = [m for topic, m in self._messages.items() if filter_matches(topic_filter, topic)]
        expired = [m for m in found if m.expires_at is not None and m.expires_at <= now]
        for m in expired:
            self._messages.pop(m.topic, None)
            self.bytes -= m.size
            if on_expired is not None:
                on_expired(m.topic)
        return [m for m in found if m.expires_at is None or m.expires_at > now]
