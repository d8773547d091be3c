"""Prometheus metrics of the pipeline (called from edgegw/ops/metrics.py at each scrape; nothing when it is off).

Per-route series are bounded by the config (routes are few); per-device deprecation counts are summed, with the
10 devices sending the most on a deprecated version as their own series (one series per device would not scale).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


def pipeline_metrics(gateway: Any) -> Iterator[Metric]:
    server = getattr(gateway, "server", None)
    pipeline = getattr(server, "pipeline", None)
    poison = getattr(gateway, "poison", None)
    if pipeline is None:
        return
    stats = pipeline.stats
    matched = CounterMetricFamily("edgegw_pipeline_route_messages", "Messages matched by each route",
                                  labels=["route"])
    dropped = CounterMetricFamily("edgegw_pipeline_dropped_messages", "Messages dropped on purpose (filter, "
                                  "deadband, downsample, a plug-in returning None), by route", labels=["route"])
    for name, n in sorted(stats.routed.items()):
        matched.add_metric([name], n)
    for name, n in sorted(stats.dropped.items()):
        dropped.add_metric([name], n)
    yield matched
    yield dropped
    yield CounterMetricFamily("edgegw_pipeline_unmatched_messages", "Messages no route matched, dropped "
                              "(routing.unmatched = \"drop\")", value=stats.unmatched)
    yield CounterMetricFamily("edgegw_pipeline_quarantined_messages", "Poison messages (decode, schema or "
                              "transform failure) kept in quarantine.db", value=stats.quarantined)
    if poison is not None:
        yield CounterMetricFamily("edgegw_pipeline_quarantine_evicted", "Oldest poison messages deleted past the "
                                  "quarantine's row cap", value=poison.evicted)
    deprecated = stats.deprecated
    yield CounterMetricFamily("edgegw_pipeline_deprecated_messages", "Messages on a deprecated API version, all "
                              "devices", value=sum(deprecated.values()))
    yield GaugeMetricFamily("edgegw_pipeline_deprecated_devices", "Devices that sent on a deprecated API version",
                            value=len(deprecated))
    top = GaugeMetricFamily("edgegw_pipeline_deprecated_device_messages", "Messages on a deprecated API version "
                            "(the 10 devices sending the most)", labels=["device"])
    for device, n in sorted(deprecated.items(), key=lambda kv: -kv[1])[:10]:
        top.add_metric([device], n)
    yield top
