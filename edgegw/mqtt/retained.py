"""Retained messages (MQTT 5 §3.3.1.3), bounded by count and bytes. In memory; pure, no I/O.

A new retained message past either bound is refused (not stored; it is still delivered and enters the outbox):
dropping an older device's retained message to make room would let one device erase another's state. Refusing
only at the bound would let one device fill the store with its own topics and every other device be refused, so
the outbox's reject-new fairness applies (docs/OUTBOX.md): from FAIR_SHARE_FROM of either bound, a device holding
more than its fair share (bound / devices holding retained messages, counting the one asking) has a new retained
message refused; replacing or deleting one of its own topics is always allowed (the bounds themselves still hold).

Every filter of every SUBSCRIBE looks retained messages up (retain handling 0: every time, and a filter may repeat
within one packet), so a lookup with wildcards walks a tree of the stored topics' levels, visiting only the levels
the filter can reach (a device's ``devices/{id}/#``: its own subtree), not every retained message of the fleet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgegw.mqtt.session import Message

FAIR_SHARE_FROM = 0.9
"""Past this fill (count or bytes) of the store, a device over its fair share has a new retained message refused
(the outbox's rule, edgegw/outbox/_admission.py)."""


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
        self._held: dict[str | None, list[int]] = {}
        """Per publishing device (``Message.sender``): [retained messages, bytes] it holds here, for the fair share."""

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, message: Message, fair: bool = True) -> bool:
        """Store (or, with an empty payload, delete: MQTT-3.3.1-10) the retained message for its topic. ``fair``
        False at a restore: what was stored before is stored again whatever the order of the rows, within the
        bounds (a device may have grown past its share since, by replacing its own topics, or others leaving)."""
        old = self._messages.pop(message.topic, None)
        if old is not None:
            self._forget(old)
        if not message.payload:
            if old is not None:
                self._unlink(old.topic)
            return True
        if len(self._messages) >= self.max_count or self.bytes + message.size > self.max_bytes \
                or (fair and not (old is not None and old.sender == message.sender) and self._over_share(message)):
            if old is not None:  # keep the previous value rather than lose both
                self._messages[old.topic] = old
                self._hold(old)
            self.refused += 1
            return False
        self._messages[message.topic] = message
        self._hold(message)
        self._link(message.topic)
        return True

    def held(self, sender: str | None) -> tuple[int, int]:
        """(retained messages, bytes) ``sender`` holds in the store."""
        usage = self._held.get(sender)
        return (usage[0], usage[1]) if usage is not None else (0, 0)

    def _over_share(self, message: Message) -> bool:
        """Near a bound, is the sender of this new retained message over its fair share (bound / devices holding
        retained messages, counting this one)? The outbox's reject-new rule, so the last 10 % stays for others."""
        size = message.size
        near_count = len(self._messages) + 1 > FAIR_SHARE_FROM * self.max_count
        near_bytes = self.bytes + size > FAIR_SHARE_FROM * self.max_bytes
        if not (near_count or near_bytes):
            return False
        usage = self._held.get(message.sender)
        devices = len(self._held) + (usage is None)
        count, held_bytes = usage if usage is not None else (0, 0)
        return (near_count and count + 1 > self.max_count / devices) \
            or (near_bytes and held_bytes + size > self.max_bytes / devices)

    def _hold(self, message: Message) -> None:
        self.bytes += message.size
        usage = self._held.get(message.sender)
        if usage is None:
            self._held[message.sender] = [1, message.size]
        else:
            usage[0] += 1
            usage[1] += message.size

    def _forget(self, message: Message) -> None:
        """``message`` left the store (replaced, deleted, expired): off the bytes and its sender's share."""
        self.bytes -= message.size
        usage = self._held[message.sender]
        usage[0] -= 1
        usage[1] -= message.size
        if not usage[0]:
            del self._held[message.sender]

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
            if self._messages.pop(m.topic, None) is not None:
                self._forget(m)
            self._unlink(m.topic)
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
            child = node.children.get(level)
            if child is None:  # not setdefault: that builds a level (and its dict) on every store, found or not
                child = node.children[level] = _Level()
            node = child
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
