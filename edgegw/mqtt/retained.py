"""Retained messages (MQTT 5 §3.3.1.3), bounded by count and bytes. In memory; pure, no I/O.

A new retained message past either bound is refused (not stored; it is still delivered and enters the outbox):
dropping an older device's retained message to make room would let one device erase another's state.

Every filter of every SUBSCRIBE looks retained messages up (retain handling 0: every time, and a filter may repeat
within one packet), so a lookup with wildcards walks a tree of the stored topics' levels, visiting only the levels
the filter can reach (a device's ``devices/{id}/#``: its own subtree), not every retained message of the fleet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgegw.mqtt.session import Message


@dataclass(slots=True)
class _Level:
    """One level of the stored topics: the levels below it by name, and the topic of a message stored here."""

    children: dict[str, _Level] = field(default_factory=dict)
    topic: str | None = None
    stored: int = 0
    """When its message was stored (a counter): lookups answer in that order, oldest first."""


class RetainedStore:
    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._messages: dict[str, Message] = {}
        self._root = _Level()
        self._stored = 0
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
            if old is not None:
                self._unlink(old.topic)
            return True
        if len(self._messages) >= self.max_count or self.bytes + message.size > self.max_bytes:
            if old is not None:  # keep the previous value rather than lose both
                self._messages[old.topic] = old
                self.bytes += old.size
            self.refused += 1
            return False
        self._messages[message.topic] = message
        self.bytes += message.size
        self._link(message.topic)
        return True

    def matching(self, topic_filter: str, now: float,
                 on_expired: Callable[[str], None] | None = None) -> list[Message]:
        """Retained messages whose topic matches ``topic_filter`` and that have not expired. Expired ones found on
        the way are forgotten, and their topics told to ``on_expired`` (the journal: they leave the file too)."""
        if "+" not in topic_filter and "#" not in topic_filter:
            m = self._messages.get(topic_filter)
            found = [m] if m is not None else []
        else:
            found = [self._messages[topic] for topic in self._topics(topic_filter)]
        expired = [m for m in found if m.expires_at is not None and m.expires_at <= now]
        for m in expired:
            self._messages.pop(m.topic, None)
            self._unlink(m.topic)
            self.bytes -= m.size
            if on_expired is not None:
                on_expired(m.topic)
        return [m for m in found if m.expires_at is None or m.expires_at > now]

    def _topics(self, topic_filter: str) -> list[str]:
        """The stored topics a filter with wildcards matches (MQTT 3.1.1 §4.7), found by walking only the levels it
        can reach. MQTT-4.7.2-1: a filter starting with a wildcard matches no topic starting with '$'."""
        parts = topic_filter.split("/")
        out: list[_Level] = []
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == len(parts):
                if node.topic is not None:
                    out.append(node)
                continue
            part = parts[i]
            if part == "#":
                if node.topic is not None:
                    out.append(node)  # "a/#" matches "a" too (MQTT-4.7.1-2)
                below = [child for name, child in node.children.items() if i or not name.startswith("$")]
                while below:
                    n = below.pop()
                    if n.topic is not None:
                        out.append(n)
                    below.extend(n.children.values())
            elif part == "+":
                stack.extend((child, i + 1) for name, child in node.children.items() if i or not name.startswith("$"))
            else:
                child = node.children.get(part)
                if child is not None:
                    stack.append((child, i + 1))
        out.sort(key=_stored_at)
        return [n.topic for n in out]  # type: ignore[misc]  # only levels holding a topic were collected

    def _link(self, topic: str) -> None:
        node = self._root
        for level in topic.split("/"):
            node = node.children.setdefault(level, _Level())
        node.topic = topic
        self._stored += 1
        node.stored = self._stored

    def _unlink(self, topic: str) -> None:
        levels = topic.split("/")
        path = [self._root]
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].topic = None
        for i in range(len(levels), 0, -1):  # prune the branch up to the first level still in use
            if path[i].topic is not None or path[i].children:
                break
            del path[i - 1].children[levels[i - 1]]


def _stored_at(level: _Level) -> int:
    return level.stored
