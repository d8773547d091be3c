"""Optional OpenTelemetry span export (``[tracing] exporter = "otlp-http"``): off by default, no hard dependency.

With ``exporter = "none"`` :func:`build` returns None and nothing here imports ``opentelemetry``: the server and the
uplink hold None and check it once per record. Otherwise two spans per record, children of the record's own
``traceparent`` (edgegw/tracing.py, a remote parent):

- ``edgegw.ingress``: from the record's arrival to its outbox commit (QoS 0 included);
- ``edgegw.uplink``: from the upstream PUBLISH to the upstream PUBACK (success reason codes only).

Both carry ``edgegw.device_id``, ``edgegw.record_id`` and ``messaging.destination.name`` (the record's upstream
topic, from the one mapping the uplink uses: ``edgegw.uplink._wire.upstream_topic``, so a routed record shows the
topic it is published to, not its stored U+0000 form).
Sampling: ``sample_ratio`` of the trace ids, decided as OpenTelemetry's TraceIdRatioBased sampler does (the low 64
bits of the trace id), so every span of one trace is exported or none is. Spans go out in batches
(BatchSpanProcessor, OTLP over HTTP/protobuf); :meth:`Spans.shutdown` flushes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgegw.errors import ConfigError

if TYPE_CHECKING:
    from edgegw.config import TracingSettings
    from edgegw.outbox._record import Record

PIP = "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
_UPLINK_PENDING_MAX = 100_000
"""Upstream publishes awaiting a PUBACK we remember the start of (a bound: lost links leave entries behind)."""


def build(settings: TracingSettings, gateway_id: str = "edgegw", topic_prefix: str = "edgegw") -> Spans | None:
    """None for ``exporter = "none"`` (without importing anything); raises ConfigError if the packages are missing."""
    if settings.exporter == "none":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError("tracing.exporter", f"{settings.exporter!r} needs the OpenTelemetry packages ({exc}): "
                                              f"{PIP}") from None
    resource = Resource.create({"service.name": settings.service_name, "service.instance.id": gateway_id})
    provider = TracerProvider(resource=resource)  # sampled here, before any span is made (Spans._sampled)
    exporter = OTLPSpanExporter(endpoint=settings.endpoint) if settings.endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Spans(provider, settings.sample_ratio, topic_prefix)


class Spans:
    """The two hooks. Built only when export is on; every method is for the event loop thread."""

    def __init__(self, provider: Any, sample_ratio: float, topic_prefix: str = "edgegw") -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        from edgegw.uplink._wire import upstream_topic

        self._topic_prefix = topic_prefix
        self._upstream_topic = upstream_topic

        self._provider = provider
        self._tracer = provider.get_tracer("edgegw")
        self._bound = round(sample_ratio * (1 << 64))
        self._set_span = trace.set_span_in_context
        self._remote = lambda tp: NonRecordingSpan(SpanContext(
            int(tp[3:35], 16), int(tp[36:52], 16), is_remote=True, trace_flags=TraceFlags(int(tp[53:55], 16))))
        self._server_kind = SpanKind.SERVER
        self._producer_kind = SpanKind.PRODUCER
        self._uplink: dict[int, tuple[int, str]] = {}  # record id -> (start ns, traceparent)
        self.exported = 0

    def _sampled(self, tp: str | None) -> bool:
        return tp is not None and len(tp) == 55 and (int(tp[19:35], 16) < self._bound)

    def _span(self, name: str, kind: Any, tp: str, start_ns: int, end_ns: int, record: Record) -> None:
        span = self._tracer.start_span(name, context=self._set_span(self._remote(tp)), kind=kind, start_time=start_ns,
                                       attributes={"edgegw.device_id": record.device_id, "edgegw.record_id": record.id,
                                                   "messaging.destination.name": self._upstream_topic(
                                                       self._topic_prefix, record.device_id, record.topic)})
        span.end(end_time=end_ns)
        self.exported += 1

    # --- edgegw.ingress: arrival -> outbox commit ---------------------------------------------------------------

    def ingress(self, tp: str, on_commit: Callable[[bool], None] | None) -> tuple[Callable[[bool], None] | None,
                                                                                   list[Any]]:
        """Wrap a record's commit callback. Returns (callback to submit, holder): put the submitted Record into the
        holder (``holder.append(record)``); the span ends when the commit does (not exported if it failed)."""
        if not self._sampled(tp):
            return on_commit, []
        holder: list[Any] = []

        def committed(ok: bool) -> None:
            if on_commit is not None:
                on_commit(ok)
            if ok and holder:
                record = holder[0]
                self._span("edgegw.ingress", self._server_kind, tp, int(record.received_at * 1e9), time.time_ns(),
                           record)

        return committed, holder

    # --- edgegw.uplink: upstream PUBLISH -> PUBACK ---------------------------------------------------------------

    def uplink_sent(self, record: Record, tp: str | None) -> None:
        if not self._sampled(tp):
            return
        pending = self._uplink
        if len(pending) >= _UPLINK_PENDING_MAX:
            pending.clear()
        pending[record.id] = (time.time_ns(), tp)  # type: ignore[assignment]

    def uplink_acked(self, records: tuple[Record, ...] | list[Record]) -> None:
        pending = self._uplink
        if not pending:
            return
        end = time.time_ns()
        for record in records:
            started = pending.pop(record.id, None)
            if started is not None:
                self._span("edgegw.uplink", self._producer_kind, started[1], started[0], end, record)

    def shutdown(self) -> None:
        """Export what is buffered and stop (blocking: call it off the event loop)."""
        self._provider.shutdown()
