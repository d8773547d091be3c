"""Downlink commands with tenants: a command comes from its tenant's upstream space and reaches only that tenant's
devices ("nothing crosses tenants", docs/POLICY.md "Tenants").

Without ``[tenants]`` the uplink maps ``{uplink.topic_prefix}/{device_id}/rest`` to ``devices/{device_id}/rest``
as before. With tenants, ``uplink.command_topic``'s ``{prefix}`` stands for every tenant's upstream prefix (the
same :meth:`Pipeline.prefix` records go up under): the uplink subscribes to one filter per listed prefix
(``tenants.prefixes``) and one for the default ``{uplink.topic_prefix}/{tenant}`` layout. A command on
``P/{device_id}/rest`` is delivered only if ``P`` is the prefix of that device's own tenant (certificate or
registry, resolved as for its uplink records); a device without a tenant gets none (its prefix, the gateway's,
encloses every default tenant space). Commands are rare: this runs per command, not per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgegw.policy.certattrs import Subjects

if TYPE_CHECKING:
    from edgegw.pipeline.engine import Pipeline

TenantOf = Callable[[str], "str | None"]
"""device id -> its tenant ("" none), or None when it cannot be known now (a certificate tenant, never seen)."""


def covers(general: str, specific: str) -> bool:
    """True if every topic matching filter ``specific`` also matches filter ``general``."""
    g, s = general.split("/"), specific.split("/")
    for i, level in enumerate(g):
        if level == "#":
            return True
        if i >= len(s) or s[i] == "#" or (level != "+" and (level != s[i] or s[i] == "+")):
            return False
    return len(g) == len(s)


class TenantCommands:
    def __init__(self, command_topic: str, topic_prefix: str, pipeline: Callable[[], Pipeline | None],
                 tenant_of: TenantOf) -> None:
        self._command_topic = command_topic
        self._topic_prefix = topic_prefix
        self._pipeline = pipeline
        self._tenant_of = tenant_of

    def filters(self) -> tuple[str, ...]:
        """What the uplink subscribes to (after every connect), without filters another one covers (a broker may
        deliver a message once per matching subscription)."""
        topic = self._command_topic
        if not topic:
            return ()
        pipeline = self._pipeline()
        if pipeline is None or not pipeline.has_tenants or "{prefix}" not in topic:
            return (topic.replace("{prefix}", self._topic_prefix),)
        wanted = [topic.replace("{prefix}", p) for p in pipeline.tenant_prefixes()]
        wanted.append(topic.replace("{prefix}", f"{self._topic_prefix}/+"))
        kept: list[str] = []
        for i, f in enumerate(wanted):
            if f in kept or any(covers(g, f) and (not covers(f, g) or j < i) for j, g in enumerate(wanted) if j != i):
                continue
            kept.append(f)
        return tuple(kept)

    def prefix_of(self, tenant: object) -> str:
        """The upstream prefix of ``tenant`` (a record's ``tn``): the uplink's without one or without tenants."""
        pipeline = self._pipeline()
        if pipeline is None or not isinstance(tenant, str) or not tenant:
            return self._topic_prefix
        return pipeline.prefix(tenant)

    def device_response_topic(self, rt: str) -> str:
        """A command's Response Topic, mapped into ``devices/{id}/...`` when it lies in a device's own space (so
        the device may answer there); left as it is otherwise."""
        pipeline = self._pipeline()
        if pipeline is None or not pipeline.has_tenants:
            prefix = self._topic_prefix + "/"
            return "devices/" + rt[len(prefix):] if rt.startswith(prefix) else rt
        found = self.target(rt)
        return found[1] if isinstance(found, tuple) else rt

    def target(self, topic: str) -> tuple[str, str] | str:
        """``(device_id, device topic)`` for a command on ``topic``, or why it goes nowhere."""
        pipeline = self._pipeline()
        if pipeline is None or not pipeline.has_tenants:
            prefix = self._topic_prefix + "/"
            if not topic.startswith(prefix):
                return "topic outside the prefix"
            device_id, sep, rest = topic[len(prefix):].partition("/")
            if not device_id or not sep or not rest:
                return "no device id level and rest"
            return device_id, f"devices/{device_id}/{rest}"
        levels = topic.split("/")
        # The longest prefix first: the most specific space is the one the sender published into.
        for i in range(len(levels) - 2, 0, -1):
            device_id = levels[i]
            if not device_id or device_id.startswith("$") or "\x00" in device_id:
                continue
            tenant = self._tenant_of(device_id)
            if not tenant:
                continue
            if pipeline.prefix(tenant) == "/".join(levels[:i]):
                return device_id, f"devices/{device_id}/" + "/".join(levels[i + 1:])
        return "no device of the tenant whose space this is"


def tenant_lookup(server: Any, coap: Any, subjects: Subjects) -> TenantOf:
    """The tenant of a device for a command, resolved as for its uplink records: from the registry, or from the
    certificate it presented (a live MQTT connection, a CoAP observation, or noted at ingress since the start)."""

    def tenant_of(device_id: str) -> str | None:
        pipeline = server.pipeline
        if pipeline is None:
            return ""
        tenants = pipeline.tenants
        if tenants.source in ("none", "registry"):
            return str(tenants.tenant(device_id, "", None))
        proto = server.devices.get(device_id)
        if proto is not None and proto.identity is not None:
            subjects.note(device_id, proto.identity.serial, proto._peercert)
        elif coap is not None:
            for obs in coap.site.observers.get(device_id, ()):
                subjects.note_remote(device_id, obs.pipe.request.remote)
                break
        if device_id not in subjects:
            return None
        return str(tenants.tenant(device_id, subjects.serial(device_id), lambda: subjects.peercert(device_id)))

    return tenant_of
