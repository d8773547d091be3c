"""Topic ACL: which topics a device may publish to. Patterns are compiled once, at load; checks are pure."""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class ACL:
    publish_patterns: tuple[tuple[str, ...], ...]
    """Each pattern pre-split into levels; ``{device_id}`` stays a placeholder level."""

    @classmethod
    def from_settings(cls, settings: ACLSettings) -> ACL:
        return cls(tuple(tuple(p.split("/")) for p in settings.publish))

    def may_publish(self, device_id: str, topic: str) -> bool:
        parts = tuple(topic.split("/"))
        # $-topics are the broker's (MQTT-4.7.2-1); a device never publishes into them.
        if topic.startswith("$"):
            return False
        # The device id is substituted as one whole level; an id that is itself a wildcard or spans levels would
        # widen the filter (a CN of "+" could publish as every device), so such an id matches nothing.
        if not device_id or "/" in device_id or "+" in device_id or "#" in device_id:
            return False
        for pattern in self.publish_patterns:
            allowed = tuple(device_id if p == "{device_id}" else p for p in pattern)
            if topic_matches(allowed, parts):
                return True
        return False
