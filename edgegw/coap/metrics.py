"""Prometheus families for the CoAP ingress (``[coap]``), yielded by the admin collector (edgegw/ops/metrics.py).

The counters live on the ingress objects themselves (:class:`~edgegw.coap.site.CoAPStats`,
:class:`~edgegw.coap.tls_listener.TLSListenerStats`, :class:`~edgegw.coap.dtls.DTLSStats`); this module only reads
them at scrape time, so the request path pays nothing for metrics. Every counter field becomes one labelled series,
so a field added to a stats class is exported without touching this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_GAUGES = frozenset({"sessions"})
"""Fields that hold a current count, not a running total."""


def coap_metrics(coap: Any) -> Iterator[Metric]:
    """Nothing when the CoAP ingress is off (``coap`` is None)."""
    if coap is None:
        return
    yield GaugeMetricFamily("edgegw_coap_connections", "Open coaps+tcp device connections",
                            value=getattr(coap, "connection_count", 0))
    yield _events("edgegw_coap", "CoAP ingress events: requests, published (committed, or accepted best-effort "
                  "for NON), refused (answered 4.xx), rate_limited, outbox_full, observations, notifications",
                  "event", coap.stats)
    tcp = getattr(coap, "connection_stats", None)
    if tcp is not None:
        yield _events("edgegw_coap_tcp_connections", "coaps+tcp connection events", "event", tcp)
    dtls = getattr(coap, "dtls", None)
    if dtls is not None:
        yield GaugeMetricFamily("edgegw_coap_dtls_sessions", "DTLS sessions, handshakes in progress included",
                                value=dtls.sessions)
        yield _events("edgegw_coap_dtls", "DTLS datagram, handshake and session events", "event", dtls.stats)


def _events(name: str, help_text: str, label: str, stats: Any) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for field in dataclasses.fields(stats):
        if field.name not in _GAUGES:
            family.add_metric([field.name], getattr(stats, field.name))
    return family
