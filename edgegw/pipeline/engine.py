"""The pipeline's hot path: one device message in, zero or more outbox records out, or one quarantined record.

Built once from :class:`PipelineSettings` (at start and on every reload: a new :class:`Pipeline` replaces the old
one as a whole). Per message: split the topic, resolve the version, try the routes in order; per matched route
decode, adapt, run the compiled chain, encode, render the upstream topic. No config lookups, no awaits, no tasks,
no info logging (warnings go through the per-event rate limit of edgegw/logs.py).

Acknowledgement (the ack-after-commit contract, docs/POLICY.md "Poison messages"):
- several records: the device's callback runs once, after the commit holding the last of them;
- nothing to store (filtered, deadband, downsample, unmatched with ``routing.unmatched = "drop"``): at once;
- a poison message (decode / schema / transform / encode failure): kept as it came, with the reason, in the
  pipeline's quarantine file (edgegw/pipeline/poison.py); the device gets its normal acknowledgement once that is
  committed. Other devices' messages never wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import structlog

from edgegw.errors import OutboxError
from edgegw.mqtt.forward import decode_record_properties
from edgegw.outbox._record import OutboxFull, record_size
from edgegw.outbox.store import Outbox, Record
from edgegw.pipeline.poison import PIPELINE_REASON, PoisonStore
from edgegw.pipeline.routes import compile_pattern, compile_template, routed
from edgegw.pipeline.settings import PipelineSettings, RouteSettings, check_pattern
from edgegw.pipeline.steps import (
    DROP,
    Context,
    Many,
    Staged,
    Step,
    StepError,
    apply_staged,
    compile_step,
    decoder,
    encoder,
)
from edgegw.pipeline.tenants import NO_TENANT, RegistryView, TenantResolver

log = structlog.get_logger("edgegw.pipeline")

DEPRECATION_LOG_EVERY = 600.0
"""A device using a deprecated version is logged at its first message, then at most once per this many seconds."""
_CONTENT_TYPES = {"json": "application/json", "msgpack": "application/msgpack"}
_DEVICES_TRACKED = 100_000


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    """As stored in the outbox: the device topic (unrouted) or :data:`ROUTED` + the full upstream topic."""
    payload: bytes
    qos: int
    priority: int
    properties: bytes | None


@dataclass(slots=True)
class PipelineStats:
    routed: dict[str, int] = field(default_factory=dict)
    """Messages matched per route name."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Messages dropped on purpose per route (filter, deadband, downsample, a plug-in returning None)."""
    unmatched: int = 0
    """Messages no route matched, dropped (``routing.unmatched = "drop"``)."""
    quarantined: int = 0
    deprecated: dict[str, int] = field(default_factory=dict)
    """Messages per device on a deprecated version."""


class _Route:
    __slots__ = (
        "cont",
        "content_type",
        "decode",
        "encode",
        "fans_out",
        "keeps_payload",
        "match",
        "name",
        "priority",
        "qos",
        "render",
        "steps",
    )

    def __init__(self, s: RouteSettings, index: int, chains: dict[str, tuple[list[Step], bool]]) -> None:
        self.name = s.name
        self.match = compile_pattern(check_pattern(f"routes[{index}].match", s.match))
        self.render = compile_template(s.topic)
        self.qos = s.qos
        self.priority = s.priority
        self.decode = decoder(s.decode) if s.decode != "raw" else None
        self.encode = encoder(s.encode) if s.decode != "raw" else None
        steps: list[Step] = []
        fans = False
        for name in s.transforms:
            chain, chain_fans = chains[name]
            steps.extend(chain)
            fans = fans or chain_fans
        self.steps = tuple(steps)
        self.fans_out = fans
        self.cont = s.continue_
        self.content_type = _CONTENT_TYPES.get(s.encode) if s.decode != "raw" else None
        self.keeps_payload = s.decode == "raw"


def run_chain(steps: tuple[Step, ...], data: Any, ctx: Context, fans_out: bool) -> list[Any]:
    """The records ``data`` becomes ([] when dropped). Raises StepError."""
    if not fans_out:
        for step in steps:
            data = step(data, ctx)
            if data is DROP:
                return []
        return [data]
    items = [data]
    for step in steps:
        out: list[Any] = []
        for item in items:
            result = step(item, ctx)
            if result is DROP:
                continue
            if isinstance(result, Many):
                out.extend(result)
            else:
                out.append(result)
        items = out
        if not items:
            break
    return items


class Pipeline:
    def __init__(self, settings: PipelineSettings, *, topic_prefix: str, registry_path: Path | None) -> None:
        chains: dict[str, tuple[list[Step], bool]] = {}
        for t in settings.transforms:
            compiled = [compile_step(f"transforms.{t.name}.steps[{i}]", spec, settings.base_dir)
                        for i, spec in enumerate(t.steps)]
            chains[t.name] = ([s for s, _ in compiled], any(f for _, f in compiled))
        self._routes = tuple(_Route(r, i, chains) for i, r in enumerate(settings.routes))
        self._versions: dict[str, tuple[tuple[Step, ...], bool, bool, str]] = {}
        for v in settings.versions:
            steps, fans = chains[v.adapter] if v.adapter else ([], False)
            self._versions[v.name] = (tuple(steps), fans, v.deprecated, v.sunset)
        self._drop_unmatched = settings.unmatched == "drop"
        self._topic_prefix = topic_prefix
        self._no_tenant_prefix = f"{topic_prefix}/{NO_TENANT}"
        self._prefixes = dict(settings.tenants.prefixes)
        self.registry = RegistryView(registry_path)
        self.tenants = TenantResolver(settings.tenants, self.registry)
        self.stats = PipelineStats()
        self._deprecation_logged: dict[str, float] = {}
        self.poison: PoisonStore | None = None
        """Where poison messages are kept; set by the daemon (None: they are refused, as by a full outbox)."""

    def adopt_state(self, old: Pipeline) -> None:
        """After a reload: keep the counters (metrics are monotonic). Deadband/downsample state starts over."""
        self.stats = old.stats
        self._deprecation_logged = old._deprecation_logged

    @property
    def has_tenants(self) -> bool:
        return self.tenants.source != "none" or bool(self.tenants.default)

    def tenant_prefixes(self) -> tuple[str, ...]:
        """The upstream prefixes listed in ``tenants.prefixes`` (others are ``{uplink.topic_prefix}/{tenant}``)."""
        return tuple(self._prefixes.values())

    def prefix(self, tenant: str) -> str:
        if not tenant:
            # With tenants on, a device without one goes under a level no tenant can have (docs/POLICY.md
            # "Tenants"): {topic_prefix}/{device_id} could be inside a tenant's space.
            return self._no_tenant_prefix if self.has_tenants else self._topic_prefix
        return self._prefixes.get(tenant) or f"{self._topic_prefix}/{tenant}"

    # --- per message ------------------------------------------------------------------------------------------

    def process(self, device_id: str, tenant: str, topic: str, payload: bytes, qos: int,
                properties: bytes | None, received_at: float, staged: list[Staged] | None = None) -> list[Output]:
        """The records for one message ([] when dropped on purpose). Raises StepError for a poison message.
        ``staged``: collects the deadband/downsample memory changes for the caller to apply once the records are
        committed (None: applied at once)."""
        parts = topic.split("/")
        adapter: tuple[Step, ...] = ()
        adapter_fans = False
        if len(parts) > 3 and parts[0] == "devices" and parts[1] == device_id:
            version = self._versions.get(parts[2])
            if version is not None:
                adapter, adapter_fans, deprecated, sunset = version
                if deprecated:
                    self._deprecated(device_id, parts[2], sunset)
        outputs: list[Output] = []
        base: dict[str, Any] | None = None
        ctx: Context | None = None
        matched = False
        for route in self._routes:
            values = route.match(parts, device_id, tenant)
            if values is None:
                continue
            matched = True
            self.stats.routed[route.name] = self.stats.routed.get(route.name, 0) + 1
            values["device_id"] = device_id
            values["tenant"] = tenant
            values["prefix"] = self.prefix(tenant)
            if "rest" not in values:  # no '#' in the match: what the default mapping would keep
                head = f"devices/{device_id}/"
                values["rest"] = topic.removeprefix(head)
            rendered = route.render(values)
            if not rendered or rendered[0] == "$":
                raise StepError(f"route {route.name}: upstream topic {rendered!r} is empty or starts with '$'")
            upstream = routed(rendered)
            out_qos = qos if route.qos is None else route.qos
            if route.keeps_payload:
                if base is None:
                    base = self._base_properties(properties, tenant)
                outputs.append(Output(upstream, payload, out_qos, route.priority,
                                      self._properties(base, properties, tenant, None)))
            else:
                if ctx is None:
                    ctx = Context(device_id, tenant, topic, received_at, self.registry.get(device_id), staged)
                assert route.decode is not None and route.encode is not None
                data = route.decode(payload)
                if adapter:
                    items = run_chain(adapter, data, ctx, adapter_fans)
                else:
                    items = [data]
                records: list[Any] = []
                for item in items:
                    records.extend(run_chain(route.steps, item, ctx, route.fans_out))
                if not records:
                    self.stats.dropped[route.name] = self.stats.dropped.get(route.name, 0) + 1
                if base is None:
                    base = self._base_properties(properties, tenant)
                props = self._properties(base, properties, tenant, route.content_type)
                for record in records:
                    outputs.append(Output(upstream, route.encode(record), out_qos, route.priority, props))
            if not route.cont:
                break
        if not matched:
            if self._drop_unmatched:
                self.stats.unmatched += 1
                return []
            if not tenant and not self.has_tenants:
                return [Output(topic, payload, qos, 1, properties)]  # exactly as without a pipeline
            head = f"devices/{device_id}/"
            rest = topic.removeprefix(head)
            base = self._base_properties(properties, tenant)
            return [Output(routed(f"{self.prefix(tenant)}/{device_id}/{rest}"), payload, qos, 1,
                           self._properties(base, properties, tenant, None))]
        return outputs

    @staticmethod
    def _base_properties(properties: bytes | None, tenant: str) -> dict[str, Any]:
        try:
            return decode_record_properties(properties)
        except Exception:  # noqa: BLE001 - made by us at ingress; damaged only by a bug: start from nothing
            return {}

    @staticmethod
    def _properties(base: dict[str, Any], original: bytes | None, tenant: str, content_type: str | None) -> bytes | None:
        """The record properties (edgegw/mqtt/forward.py) plus ``tn`` (the tenant); an encoded payload gets its
        content type, and the device's payload format indicator no longer applies to it."""
        if not tenant and content_type is None:
            return original
        props = dict(base)
        if tenant:
            props["tn"] = tenant
        if content_type is not None:
            props["ct"] = content_type
            props.pop("pfi", None)
        return msgpack.packb(props, use_bin_type=True)

    def _deprecated(self, device_id: str, version: str, sunset: str) -> None:
        counts = self.stats.deprecated
        n = counts.get(device_id, 0) + 1
        if n > 1 or len(counts) < _DEVICES_TRACKED:  # counted per device up to a bound; still logged past it
            counts[device_id] = n
        now = time.monotonic()
        last = self._deprecation_logged.get(device_id)
        if last is None or now - last >= DEPRECATION_LOG_EVERY:
            if len(self._deprecation_logged) >= _DEVICES_TRACKED:
                self._deprecation_logged.clear()
            self._deprecation_logged[device_id] = now
            log.warning("pipeline.version_deprecated", device_id=device_id, version=version, sunset=sunset or None,
                        messages=n)

    # --- into the outbox --------------------------------------------------------------------------------------

    def submit(self, outbox: Outbox, device_id: str, tenant: str, topic: str, payload: bytes, qos: int,
               on_commit: Callable[[bool], None] | None, properties: bytes | None) -> Record | None:
        """Process one message and queue its records; ``on_commit`` runs once all are committed (at once when
        there is nothing to store). Returns the first record queued (None: dropped or quarantined; for a span).
        Raises OutboxError (OutboxFull) as
        :meth:`Outbox.submit` does; records of this message queued before the refusal stay queued (the device
        resends: at-least-once, never a loss) and ``on_commit`` is not called."""
        if not outbox.has_room(device_id, record_size(device_id, topic, payload, properties)):
            # Refused before the chain runs, so deadband/downsample state only ever counts stored messages (a
            # held 3.1.1 publish comes back through here and must not be dropped as "unchanged").
            raise OutboxFull(device_id, "records", "no room for this device's record")
        staged: list[Staged] = []
        try:
            outputs = self.process(device_id, tenant, topic, payload, qos, properties, time.time(), staged)
        except StepError as exc:
            self._quarantine(outbox, device_id, tenant, topic, payload, qos, on_commit, properties, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - an input no step foresaw (e.g. an int too large for a float):
            # still this message's problem, never the connection's or the gateway's
            self._quarantine(outbox, device_id, tenant, topic, payload, qos, on_commit, properties,
                             f"{type(exc).__name__} in the pipeline: {exc}")
            return None
        if staged:
            # Deadband/downsample remember this message only once the device is acknowledged: if the commit fails
            # the device resends it, and that copy must not be dropped as "unchanged" (never stored at all).
            on_commit = _Remember(staged, on_commit)
        if not outputs:
            if on_commit is not None:
                on_commit(True)  # nothing to store: acknowledged at once (counted in stats)
            return None
        if len(outputs) == 1:
            o = outputs[0]
            return outbox.submit(device_id, o.topic, o.payload, o.qos, on_commit, o.properties, o.priority)
        join = _Join(len(outputs), on_commit) if on_commit is not None else None
        try:
            records = [outbox.submit(device_id, o.topic, o.payload, o.qos, join, o.properties, o.priority)
                       for o in outputs]
        except BaseException:
            if join is not None:
                join.cancel()
            raise
        return records[0]

    def _quarantine(self, outbox: Outbox, device_id: str, tenant: str, topic: str, payload: bytes, qos: int,
                    on_commit: Callable[[bool], None] | None, properties: bytes | None, reason: str) -> None:
        """Keep the message as it came (tenant added) in the pipeline's quarantine file (edgegw/pipeline/poison.py);
        ``on_commit`` runs after that commit. Never in the outbox: the uplink must not see it."""
        poison = self.poison
        if poison is None:
            raise OutboxError("no quarantine store: poison message refused")
        reason = reason[:500]
        base = self._base_properties(properties, tenant)
        poison.put(device_id, topic, payload, qos, self._properties(base, properties, tenant, None),
                   f"{PIPELINE_REASON}{reason}", time.time(), on_commit)
        self.stats.quarantined += 1
        log.warning("pipeline.quarantined", device_id=device_id, topic=topic[:200], reason=reason)


class _Remember:
    """The device's commit callback, applying the message's staged deadband/downsample memory first if it is
    committed (on a failure it is dropped: the resent message is judged as the first one was)."""

    __slots__ = ("done", "staged")

    def __init__(self, staged: list[Staged], done: Callable[[bool], None] | None) -> None:
        self.staged = staged
        self.done = done

    def __call__(self, ok: bool) -> None:
        if ok:
            apply_staged(self.staged)
        if self.done is not None:
            self.done(ok)


class _Join:
    """One commit callback for several records: calls ``done`` once, after the last commit (or the first failure:
    then the device is not acknowledged and resends)."""

    __slots__ = ("done", "left")

    def __init__(self, n: int, done: Callable[[bool], None] | None) -> None:
        self.left = n
        self.done = done

    def __call__(self, ok: bool) -> None:
        done = self.done
        if done is None:
            return
        self.left -= 1
        if not ok or self.left == 0:
            self.done = None
            done(ok)

    def cancel(self) -> None:
        self.done = None
