"""Hierarchical rate limits and quotas: one synchronous decision per message, shared by MQTT and CoAP.

``Limiter.admit(device_id, nbytes)`` checks every bucket that applies to the device (its own, its group's, its
tenant's, the gateway's: messages and bytes) and its day/month quotas, and only if ALL pass takes from all of them:
a refused message consumes nothing. It answers :data:`ADMITTED` or an :class:`Admission` naming the limit that
blocks, its action and how long until it would pass. What to do with that is the protocol's business:

- MQTT (edgegw/mqtt/server.py): ``backpressure`` holds the publish unacknowledged and stops reading the socket
  until ``wait_s`` has passed, then admits it again; ``reject`` answers MQTT 5 QoS 1/2 with 0x97; ``drop`` drops
  QoS 0. Whatever a protocol cannot honour falls back to backpressure: nothing is lost unless ``drop`` is configured
  and the message is QoS 0 (docs/POLICY.md).
- CoAP: :meth:`Limiter.coap_admit` has the ingress seam's shape (seconds to wait, 0 = go): 4.29 with Max-Age.

Costs: a dict lookup (an LRU of device states, at most ``limits.max_devices``), one clock read and a few float
operations per bucket; no I/O, no allocation when admitted. A device's group and tenant come from the registry
(re-read when the file changes) or from a callable passed in (e.g. a tenant resolved from the certificate).
Quota usage is counted in memory and written every ``flush_interval`` seconds (edgegw/policy/_quota.py).

Reload: :meth:`Limiter.replace` swaps in new settings at once; buckets of rules that keep their name keep their
tokens (retuned to the new rate and burst) and usage is never reset.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from edgegw.policy._buckets import _EPS, Bucket
from edgegw.policy._classes import RegistryClasses
from edgegw.policy._plan import Plan, QuotaRule, Rule
from edgegw.policy._quota import Periods, Usage, UsageStore
from edgegw.policy.limits_config import SCOPES, LimitsSettings

__all__ = ["ADMITTED", "Admission", "Classifier", "Limiter", "RegistryClasses", "UsageStore"]

log = structlog.get_logger("edgegw.limits")

_TRIM_STEP = 4
"""Usage entries looked at per new device once past ``max_devices`` (the rest waits for :meth:`Limiter.sweep`)."""

Classifier = Callable[[str], tuple[str, str]]
"""device id -> (group, tenant); "" where the device has none."""


@dataclass(frozen=True, slots=True)
class Admission:
    wait_s: float
    """0.0: admitted (tokens taken). Otherwise seconds until the blocking limit would let it pass."""
    limit: str = ""
    """The blocking rule's or quota's name (``limits.rate[].name`` / ``limits.quota[].name``)."""
    action: str = ""
    """``backpressure``, ``reject`` or ``drop``: what the rule asks for."""
    scope: str = ""
    """``device``, ``group``, ``tenant``, ``gateway`` or ``quota``."""


ADMITTED = Admission(0.0)


class _Device:
    __slots__ = ("checks", "gen", "own", "quotas", "seen", "usage")

    def __init__(self, gen: int, seen: float) -> None:
        self.gen = gen
        self.checks: list[tuple[Bucket, bool, Rule]] = []
        self.own: dict[tuple[str, bool], Bucket] = {}
        self.quotas: list[QuotaRule] = []
        self.usage: Usage | None = None
        self.seen = seen


class Limiter:
    def __init__(self, settings: LimitsSettings, *, classify: Classifier | None = None,
                 store: UsageStore | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._classify: Classifier = classify or (lambda _device_id: ("", ""))
        self._store = store
        self._clock = clock
        self._wall = wall
        self._plan = Plan(settings)
        self.active = settings.active
        """False with no rate limit nor quota configured: :meth:`admit` always admits, so an ingress may skip it
        (the MQTT one does, once per message)."""
        self._gen = 0
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._periods = Periods.at(wall())
        self._usage: OrderedDict[str, Usage] = OrderedDict()
        """Least recently used first; at most about ``max_devices`` (:meth:`_trim_usage`): ids a lab peer makes up
        must not grow it (it was pruned only when the month changed)."""
        self._pruned_day = self._periods.day
        self._dirty: set[str] = set()
        self._exhausted: set[tuple[str, str]] = set()  # (device, quota) logged this period
        self.hits: dict[tuple[str, str, str, str], int] = {}
        """(protocol, scope, limit, action taken) -> publishes/requests delayed, refused or dropped."""
        self.flushes = 0
        self.flush_failures = 0
        self.usage_forgotten = 0
        """Usage counters dropped from memory past ``max_devices`` (idle, already written)."""

    # --- the hot path ----------------------------------------------------------------------------------------

    def admit(self, device_id: str, nbytes: int) -> Admission:
        """May ``device_id`` send a message of ``nbytes`` payload bytes now? Takes from every bucket if so."""
        if not self.active:
            return ADMITTED
        now = self._clock()
        dev = self._devices.get(device_id)
        if dev is None or dev.gen != self._gen:
            dev = self._device(device_id, dev, now)
        else:
            self._devices.move_to_end(device_id)
        dev.seen = now
        wait = 0.0
        blocking: Rule | QuotaRule | None = None
        # Bucket.wait and Bucket.take, inlined: this loop runs for every message (measured 1.5x faster; ternaries
        # rather than min(): no builtin call).
        for bucket, per_byte, rule in dev.checks:
            burst = bucket.burst
            tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate
            if tokens > burst:  # noqa: PLR1730
                tokens = burst
            need = (nbytes if nbytes < burst else burst) if per_byte else 1.0  # noqa: FURB136
            if tokens + _EPS < need:
                w = (need - tokens) / bucket.rate
                if w > wait:
                    wait, blocking = w, rule
        usage = dev.usage
        if usage is not None:
            wall = self._wall()
            periods = self._periods
            if wall >= periods.day_end:
                periods = self._roll(wall)
            if usage.day != periods.day:
                usage.day, usage.day_messages, usage.day_bytes = periods.day, 0, 0
            if usage.month != periods.month:
                usage.month, usage.month_messages, usage.month_bytes = periods.month, 0, 0
            for quota in dev.quotas:
                if quota.monthly:
                    messages, used, end = usage.month_messages, usage.month_bytes, periods.month_end
                else:
                    messages, used, end = usage.day_messages, usage.day_bytes, periods.day_end
                if (quota.messages and messages >= quota.messages) or (quota.bytes and used + nbytes > quota.bytes):
                    if (device_id, quota.name) not in self._exhausted:
                        self._exhausted.add((device_id, quota.name))
                        log.warning("limits.quota_exhausted", device_id=device_id, quota=quota.name,
                                    action=quota.action, until=round(end))
                    w = max(end - wall, 0.001)
                    if w > wait:
                        wait, blocking = w, quota
        if blocking is not None:
            return Admission(wait, blocking.name, blocking.action, blocking.scope)
        for bucket, per_byte, _ in dev.checks:
            tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate
            burst = bucket.burst
            bucket.tokens = (tokens if tokens < burst else burst) - (nbytes if per_byte else 1)  # noqa: FURB136
            bucket.stamp = now
        if usage is not None:
            usage.day_messages += 1
            usage.day_bytes += nbytes
            usage.month_messages += 1
            usage.month_bytes += nbytes
            self._dirty.add(device_id)
        return ADMITTED

    def coap_admit(self, device_id: str, nbytes: int) -> float:
        """The CoAP ingress seam: seconds to wait (answered 4.29 with Max-Age), 0.0 = go. Every action becomes a
        4.29 for CoAP: a request always gets an answer, so there is nothing to drop or to stop reading."""
        admission = self.admit(device_id, nbytes)
        if admission.wait_s:
            self.record(admission, "reject", "coap")
        return admission.wait_s

    def record(self, admission: Admission, action: str, protocol: str) -> None:
        """Count one message delayed/refused/dropped, with the action the protocol actually took."""
        key = (protocol, admission.scope, admission.limit, action)
        self.hits[key] = self.hits.get(key, 0) + 1

    # --- device state ----------------------------------------------------------------------------------------

    def _device(self, device_id: str, old: _Device | None, now: float) -> _Device:
        """Build (or rebuild after a reload / registry change) the device's list of buckets and quotas."""
        plan = self._plan
        group, tenant = self._classify(device_id)
        dev = _Device(self._gen, now)
        for scope in SCOPES:
            rule = plan.first(scope, group, tenant)
            if rule is None:
                continue
            if scope == "group" and not group or scope == "tenant" and not tenant:
                continue  # a device without a group (tenant) shares no group (tenant) bucket
            # The scope is part of the key: a rule that keeps its name but changes scope starts afresh.
            value = f"group:{group}" if scope == "group" else f"tenant:{tenant}" if scope == "tenant" else "gateway:"
            for per_byte, rate, burst in rule.units:
                if scope == "device":
                    bucket = old.own.get((rule.name, per_byte)) if old is not None else None
                    if bucket is None:
                        bucket = Bucket(rate, burst, now)
                    elif bucket.rate != rate or bucket.burst != burst:
                        # As of the reload: the time since then refills at the new rate, not the old one.
                        since = plan.since if plan.since is not None and plan.since >= bucket.stamp else now
                        bucket.retune(rate, burst, since)
                    dev.own[(rule.name, per_byte)] = bucket
                else:
                    key = (rule.name, value, per_byte)
                    bucket = plan.shared.get(key)
                    if bucket is None:
                        bucket = plan.shared[key] = Bucket(rate, burst, now)
                dev.checks.append((bucket, per_byte, rule))
        if plan.has_quotas:
            for monthly in (False, True):
                quota = next((q for q in plan.quotas[monthly] if q.matches(group, tenant)), None)
                if quota is not None:
                    dev.quotas.append(quota)
            usage = self._usage.get(device_id)
            if usage is None:
                usage = self._usage[device_id] = Usage(self._periods.day, self._periods.month)
                if len(self._usage) > self.settings.max_devices:
                    self._trim_usage(_TRIM_STEP)
            else:
                self._usage.move_to_end(device_id)
            dev.usage = usage
        self._devices[device_id] = dev
        self._devices.move_to_end(device_id)
        while len(self._devices) > self.settings.max_devices:
            self._devices.popitem(last=False)  # the least recently seen: it starts again with full buckets
        return dev

    def _trim_usage(self, budget: int) -> None:
        """Forget the least recently used usage counters past ``max_devices``: only those of devices without live
        state and already written (not dirty), looking at no more than ``budget`` entries (the hot path calls this
        with a few; :meth:`sweep`, after a flush, with all). A forgotten device that comes back counts from zero
        in memory again; the file keeps the higher count (edgegw/policy/_quota.py), which a restart reloads."""
        usage, devices, dirty = self._usage, self._devices, self._dirty
        cap = self.settings.max_devices
        for _ in range(min(budget, len(usage))):
            if len(usage) <= cap:
                return
            device_id, u = usage.popitem(last=False)
            if device_id in devices or device_id in dirty:
                usage[device_id] = u  # in use or not written yet: kept, now at the recent end
                continue
            self.usage_forgotten += 1

    def _roll(self, wall: float) -> Periods:
        self._periods = Periods.at(wall)
        self._exhausted.clear()
        return self._periods

    def sweep(self) -> int:
        """Forget devices idle for ``idle_timeout`` whose buckets are full again (nothing is lost). The dict is
        in least-recently-seen order, so this stops at the first device seen recently."""
        now = self._clock()
        cutoff = now - self.settings.idle_timeout
        forget = []
        for device_id, dev in self._devices.items():
            if dev.seen > cutoff:
                break
            if all(b.full(now) for b in dev.own.values()):
                forget.append(device_id)
        for device_id in forget:
            del self._devices[device_id]
        # Usage of past periods, of devices not seen since, is written already: drop it (memory stays bounded by
        # the devices active this month). A device with state keeps its object: it counts into it.
        # Once a day: O(devices).
        periods = self._periods
        if periods.day != self._pruned_day:
            self._pruned_day = periods.day
            stale = [d for d, u in self._usage.items() if u.month != periods.month and u.day != periods.day
                     and d not in self._devices and d not in self._dirty]
            for device_id in stale:
                del self._usage[device_id]
        self._trim_usage(len(self._usage))  # run() calls this right after a flush: dirty entries are written
        return len(forget)

    @property
    def tracked_devices(self) -> int:
        return len(self._devices)

    # --- reload ----------------------------------------------------------------------------------------------

    def replace(self, settings: LimitsSettings) -> None:
        """Apply new limits at once (SIGHUP / ``edgegw reload``). Shared buckets of rules that keep their name
        keep their tokens, retuned to the new rate and burst; device buckets likewise, at their next message;
        quota usage is kept. ``usage_path`` changes take effect at the next start."""
        now = self._clock()
        plan = Plan(settings)
        plan.since = now
        rules = {r.name: r for rules in plan.rules.values() for r in rules}
        for (name, value, per_byte), bucket in self._plan.shared.items():
            rule = rules.get(name)
            unit = next((u for u in rule.units if u[0] == per_byte), None) if rule is not None else None
            if rule is None or rule.scope != value.split(":", 1)[0] or unit is None:
                continue
            bucket.retune(unit[1], unit[2], now)
            plan.shared[(name, value, per_byte)] = bucket
        if settings.usage_path != self.settings.usage_path:
            log.warning("limits.usage_path_unchanged", running=str(self.settings.usage_path),
                        requested=str(settings.usage_path), when="at the next start")
        # One assignment each, no await in between: a message sees the old limits or the new ones, never a mix.
        self.settings = settings
        self._plan = plan
        self.active = settings.active
        self._gen += 1
        log.info("limits.replaced", rate_limits=len(settings.rate), quotas=len(settings.quota))

    def reclassify(self, classify: Classifier | None = None) -> None:
        """Groups or tenants changed (registry re-read, or a new resolver): devices re-resolve at their next
        message, keeping their own buckets."""
        if classify is not None:
            self._classify = classify
        self._gen += 1

    # --- usage persistence -----------------------------------------------------------------------------------

    def load_usage(self) -> None:
        """At start (blocking, once): this day's and month's usage from the usage file."""
        if self._store is not None:
            self._usage.update(self._store.load(self._periods))
            self._trim_usage(len(self._usage))

    def usage_of(self, device_id: str) -> Usage | None:
        return self._usage.get(device_id)

    def _dirty_rows(self) -> list[tuple[str, str, int, int]]:
        dirty, self._dirty = self._dirty, set()
        rows = []
        for device_id in dirty:
            u = self._usage.get(device_id)
            if u is not None:
                rows.append((device_id, f"d:{u.day}", u.day_messages, u.day_bytes))
                rows.append((device_id, f"m:{u.month}", u.month_messages, u.month_bytes))
        return rows

    async def flush(self) -> None:
        """Write the usage counters changed since the last flush (in a worker thread)."""
        if self._store is None or not self._dirty:
            return
        rows = self._dirty_rows()
        try:
            await asyncio.to_thread(self._store.save, rows)
        except (sqlite3.Error, OSError) as exc:
            self.flush_failures += 1
            self._dirty.update(r[0] for r in rows)  # written again next time; values are absolute
            log.error("limits.usage_flush_failed", path=str(self._store.path), error=str(exc))
            return
        self.flushes += 1

    async def run(self, classes: RegistryClasses | None = None) -> None:
        """Every ``flush_interval``: write usage, forget idle devices, re-read the registry's groups/tenants if
        the file changed. Runs until cancelled; :meth:`close` does the last flush."""
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            try:
                await self.flush()
                self.sweep()
                if classes is not None:
                    snapshot = await asyncio.to_thread(classes.read_if_changed)
                    if snapshot is not None:
                        classes.install(snapshot)
                        self.reclassify()
            except Exception as exc:
                log.exception("limits.upkeep_failed", error=repr(exc))

    async def close(self) -> None:
        await self.flush()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)

    # --- what the metrics read -------------------------------------------------------------------------------

    def quota_report(self, top: int = 10) -> tuple[list[tuple[str, str, str, int, int, int]],
                                                    list[tuple[str, str, str, float]]]:
        """Per quota: (name, period, unit, used by its devices this period, per-device limit, devices exhausted);
        and the ``top`` devices by share of their quota used: (device, quota, period, ratio). O(devices)."""
        plan = self._plan
        periods = self._periods
        totals: dict[tuple[str, str, str], list[int]] = {}
        for quotas in plan.quotas.values():
            for q in quotas:
                period = "month" if q.monthly else "day"
                for unit, limit in (("messages", q.messages), ("bytes", q.bytes)):
                    if limit:
                        totals[(q.name, period, unit)] = [0, limit, 0]
        ratios: list[tuple[float, str, str, str]] = []
        for device_id, u in self._usage.items():
            group, tenant = self._classify(device_id)
            for monthly in (False, True):
                found = next((x for x in plan.quotas[monthly] if x.matches(group, tenant)), None)
                if found is None:
                    continue
                q = found
                current = u.month == periods.month if monthly else u.day == periods.day
                m, b = ((u.month_messages, u.month_bytes) if monthly else (u.day_messages, u.day_bytes)) \
                    if current else (0, 0)
                period = "month" if monthly else "day"
                share = 0.0
                for unit, used, limit in (("messages", m, q.messages), ("bytes", b, q.bytes)):
                    if limit:
                        entry = totals[(q.name, period, unit)]
                        entry[0] += used
                        entry[2] += used >= limit
                        share = max(share, used / limit)
                if share > 0:
                    ratios.append((share, device_id, q.name, period))
        ratios.sort(reverse=True)
        return ([(n, p, unit, v[0], v[1], v[2]) for (n, p, unit), v in totals.items()],
                [(d, q, p, r) for r, d, q, p in ratios[:top]])
