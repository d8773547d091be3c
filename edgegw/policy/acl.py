"""Topic ACL: which topics a device may publish to and subscribe within. Compiled once, at load; checks are pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgegw.config import ACLSettings


def topic_matches(topic_filter: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """MQTT 3.1.1 §4.7 matching of a split topic against a split filter (``+`` one level, ``#`` the rest)."""
    for i, part in enumerate(topic_filter):
        if part == "#":
            return True  # "#" also matches the parent level: "a/#" matches "a" (MQTT-4.7.1-2)
        if i >= len(topic):
            return False
        if part != "+" and part != topic[i]:
            return False
    return len(topic_filter) == len(topic)


def filter_within(topic_filter: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Is every topic ``topic_filter`` can match also matched by ``pattern``? (Both pre-split.)"""
    for i, part in enumerate(pattern):
        if part == "#":
            return True
        if i >= len(topic_filter):
            return False
        level = topic_filter[i]
        if level == "#":
            return False  # the filter reaches deeper than this pattern allows
        if part != "+" and (level == "+" or level != part):
            return False
    return len(topic_filter) == len(pattern)


def _safe_id(device_id: str) -> bool:
    # The device id is substituted as one whole level; an id that is itself a wildcard or spans levels would
    # widen the filter (a CN of "+" could publish as every device), so such an id matches nothing.
    return bool(device_id) and "/" not in device_id and "+" not in device_id and "#" not in device_id


@dataclass(frozen=True, slots=True)
class ACL:
    publish_patterns: tuple[tuple[str, ...], ...]
    """Each pattern pre-split into levels; ``{device_id}`` stays a placeholder level."""
    subscribe_patterns: tuple[tuple[str, ...], ...] = (("devices", "{device_id}", "#"),)
    open: bool = False
    """Allow everything but $-topics (the lab listener only)."""

    @classmethod
    def from_settings(cls, settings: ACLSettings) -> ACL:
        return cls(tuple(tuple(p.split("/")) for p in settings.publish),
                   tuple(tuple(p.split("/")) for p in settings.subscribe))

    @classmethod
    def allow_all(cls) -> ACL:
        return cls((), (), open=True)

    def may_publish(self, device_id: str, topic: str) -> bool:
        return self._allowed(device_id, topic, self.publish_patterns, _topic_in_pattern)

    def may_subscribe(self, device_id: str, topic_filter: str) -> bool:
        """``topic_filter`` without any ``$share/{group}/`` prefix. Every topic it can match must be allowed,
        so deliveries need no further check."""
        return self._allowed(device_id, topic_filter, self.subscribe_patterns, filter_within)

    def _allowed(self, device_id: str, subject: str, patterns: tuple[tuple[str, ...], ...],
                 within: Callable[[tuple[str, ...], tuple[str, ...]], bool]) -> bool:
        # $-topics are the broker's (MQTT-4.7.2-1): a device neither publishes into them nor subscribes to them.
        if subject.startswith("$"):
            return False
        if self.open:
            return True
        if not _safe_id(device_id):
            return False
        parts = tuple(subject.split("/"))
        for pattern in patterns:
            allowed = tuple(device_id if p == "{device_id}" else p for p in pattern)
            if within(parts, allowed):
                return True
        return False


def _topic_in_pattern(topic: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    return topic_matches(pattern, topic)
