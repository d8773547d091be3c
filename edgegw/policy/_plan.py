"""The limiter's settings compiled once (at start and at each reload): rules by scope, quotas by period, and the
buckets shared by the devices of a group, a tenant or the whole gateway."""

from __future__ import annotations

from edgegw.policy._buckets import Bucket
from edgegw.policy.limits_config import SCOPES, LimitsSettings, Quota, RateLimit


class Rule:
    """A compiled ``[[limits.rate]]``."""

    __slots__ = ("action", "group", "name", "scope", "tenant", "units")

    def __init__(self, rule: RateLimit) -> None:
        self.name = rule.name
        self.scope = rule.scope
        self.action = rule.action
        self.group = rule.group
        self.tenant = rule.tenant
        # (per_byte, rate, burst) for each bucket the rule has
        self.units = tuple(u for u in ((False, rule.messages_rate, rule.message_burst),
                                       (True, rule.bytes_rate, rule.byte_burst)) if u[1] > 0)

    def matches(self, group: str, tenant: str) -> bool:
        return (not self.group or self.group == group) and (not self.tenant or self.tenant == tenant)


class QuotaRule:
    __slots__ = ("action", "bytes", "group", "messages", "monthly", "name", "scope", "tenant")

    def __init__(self, quota: Quota) -> None:
        self.name = quota.name
        self.scope = "quota"
        self.action = quota.action
        self.group = quota.group
        self.tenant = quota.tenant
        self.monthly = quota.period == "month"
        self.messages = quota.messages
        self.bytes = quota.bytes

    def matches(self, group: str, tenant: str) -> bool:
        return (not self.group or self.group == group) and (not self.tenant or self.tenant == tenant)


class Plan:
    """Everything compiled from one LimitsSettings; replaced as a whole."""

    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        self.rules = {scope: [Rule(r) for r in settings.rate if r.scope == scope] for scope in SCOPES}
        self.quotas = {monthly: [QuotaRule(q) for q in settings.quota if (q.period == "month") == monthly]
                       for monthly in (False, True)}
        self.has_quotas = bool(settings.quota)
        self.since: float | None = None
        """When these settings replaced others (monotonic): device buckets are retuned lazily, as of this time."""
        self.shared: dict[tuple[str, str, bool], Bucket] = {}
        """(rule name, "group:NAME" / "tenant:NAME" / "gateway:", per_byte) -> the bucket the devices of that group /
        tenant / gateway share."""

    def first(self, scope: str, group: str, tenant: str) -> Rule | None:
        for rule in self.rules[scope]:
            if rule.matches(group, tenant):
                return rule
        return None
