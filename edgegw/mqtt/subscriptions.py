"""Topic filters and the subscription index: which device sessions want a topic. Pure, no I/O.

The index is a trie over topic levels, so matching one topic costs its number of levels times the wildcards on the
way, not the number of subscriptions. Shared subscriptions (``$share/{group}/{filter}``, MQTT 5 §4.8.2) sit in the
same trie; each group gets one copy of a message, given to its members in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgegw.mqtt.packets import SubscriptionOptions


class InvalidFilter(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Subscription:
    device_id: str
    topic_filter: str
    """As the device sent it, ``$share/...`` prefix included (the key for UNSUBSCRIBE)."""
    options: SubscriptionOptions
    subscription_id: int | None = None
    share_group: str | None = None


def parse_filter(topic_filter: str) -> tuple[str | None, str]:
    """``(share group or None, filter)``; raises :class:`InvalidFilter` (MQTT-4.7.1-1/2/3, MQTT 5 §4.8.2)."""
    group = None
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1] or not parts[2]:
            raise InvalidFilter(f"invalid shared subscription {topic_filter!r}")
        group, topic_filter = parts[1], parts[2]
    if not topic_filter:
        raise InvalidFilter("empty topic filter")  # MQTT-4.7.3-1
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise InvalidFilter(f"'#' must be a whole last level: {topic_filter!r}")  # MQTT-4.7.1-2
        if "+" in level and level != "+":
            raise InvalidFilter(f"'+' must be a whole level: {topic_filter!r}")  # MQTT-4.7.1-3
    return group, topic_filter


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    subs: dict[str, Subscription] = field(default_factory=dict)
    """device id -> its (non-shared) subscription with exactly this filter."""
    shared: dict[str, dict[str, Subscription]] = field(default_factory=dict)
    """share group -> device id -> subscription."""


class SubscriptionIndex:
    def __init__(self) -> None:
        self._root = _Node()
        self._turn: dict[tuple[str, str], int] = {}  # (group, filter) -> round-robin counter
        self.count = 0

    def add(self, sub: Subscription) -> bool:
        """Add or replace (MQTT-3.8.4-3). True if it is new."""
        group, flt = parse_filter(sub.topic_filter)
        node = self._root
        for level in flt.split("/"):
            node = node.children.setdefault(level, _Node())
        bucket = node.subs if group is None else node.shared.setdefault(group, {})
        new = sub.device_id not in bucket
        bucket[sub.device_id] = sub
        self.count += new
        return new

    def remove(self, device_id: str, topic_filter: str) -> bool:
        try:
            group, flt = parse_filter(topic_filter)
        except InvalidFilter:
            return False
        path = [self._root]
        for level in flt.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        bucket = node.subs if group is None else node.shared.get(group, {})
        if bucket.pop(device_id, None) is None:
            return False
        if group is not None and not bucket:
            del node.shared[group]
            self._turn.pop((group, topic_filter), None)
        self.count -= 1
        levels = flt.split("/")
        for i in range(len(levels), 0, -1):  # prune empty branches
            n = path[i]
            if n.children or n.subs or n.shared:
                break
            del path[i - 1].children[levels[i - 1]]
        return True

    def match(self, topic: str) -> list[Subscription]:
        """Every subscription matching ``topic``; one member per share group (round robin)."""
        out: list[Subscription] = []
        shared: list[tuple[str, str, dict[str, Subscription]]] = []
        levels = topic.split("/")
        # MQTT-4.7.2-1: filters starting with a wildcard do not match topics starting with '$'.
        dollar = topic.startswith("$")
        self._walk(self._root, levels, 0, dollar, out, shared)
        for group, flt, members in shared:
            key = (group, flt)
            turn = self._turn.get(key, 0)
            self._turn[key] = turn + 1
            subs = list(members.values())
            out.append(subs[turn % len(subs)])
        return out

    def _walk(self, node: _Node, levels: list[str], i: int, dollar: bool, out: list[Subscription],
              shared: list[tuple[str, str, dict[str, Subscription]]]) -> None:
        first = i == 0 and dollar
        if not first:
            hash_node = node.children.get("#")
            if hash_node is not None:
                self._collect(hash_node, levels, out, shared)
        if i == len(levels):
            self._collect(node, levels, out, shared)
            return
        child = node.children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, dollar, out, shared)
        if not first:
            plus = node.children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, dollar, out, shared)

    @staticmethod
    def _collect(node: _Node, levels: list[str], out: list[Subscription],
                 shared: list[tuple[str, str, dict[str, Subscription]]]) -> None:
        if node.subs:
            out.extend(node.subs.values())
        for group, members in node.shared.items():
            if members:
                flt = next(iter(members.values())).topic_filter
                shared.append((group, flt, members))


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Does a (non-shared) filter match a topic name (for retained messages)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)
