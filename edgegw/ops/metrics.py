"""What the operator sees: a Prometheus collector that reads the live objects at scrape time, and a sampler task.

Nothing on the data path counts twice for metrics: the collector reads ``MQTTStats``, the outbox's and the uplink's
own counters and properties when Prometheus scrapes. Those modules change under us, so every read goes through
``getattr`` with a default: a renamed counter becomes a missing series, never a failed scrape.

:class:`Sampler` is one task on the event loop that wakes every second: it measures event-loop lag (how late it
woke), keeps a bounded history (outbox depth, message rates) for the status page, and reports suppressed log counts.
Values that need the database (oldest record's age, quarantine size) are read by :class:`OutboxReader` through its
own read-only SQLite connection in a worker thread, so a scrape never blocks the loop on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgegw.coap.metrics import coap_metrics
from edgegw.ops.logsink import RATE_LIMITER, RECENT_REFUSALS, report_suppressed
from edgegw.pipeline.metrics import pipeline_metrics

if TYPE_CHECKING:
    from edgegw.daemon import Gateway

UPLINK_STATES = ("connecting", "connected", "down")

# MQTTStats field -> refusal reason label (edgegw_mqtt_refusals_total{reason}).
_REFUSALS = {
    "refused_capacity": "capacity",
    "handshake_failed": "tls_handshake",
    "connect_refused": "connect_refused",
    "publish_denied": "acl",
    "publish_rejected": "outbox_full",
    "protocol_errors": "protocol_error",
}


def _num(obj: Any, name: str, default: float | None = 0) -> float | None:
    value = getattr(obj, name, default) if obj is not None else default
    if callable(value):
        try:
            value = value()
        except Exception:  # noqa: BLE001 - a metric never breaks a scrape
            return default
    if isinstance(value, dict):
        return float(sum(v for v in value.values() if isinstance(v, int | float)))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def protocol_version(proto: Any) -> str:
    level = getattr(getattr(proto, "engine", None), "protocol_level", None)
    return {3: "3.1", 4: "3.1.1", 5: "5"}.get(level, "unknown") if isinstance(level, int) else "unknown"


@dataclass
class DbFacts:
    oldest_received_at: float | None = None
    quarantine_count: int | None = None
    read_at: float = 0.0
    error: str | None = None


class OutboxReader:
    """Read-only queries on the outbox database (WAL: sees committed data only), each in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.facts = DbFacts()

    def _connect(self) -> sqlite3.Connection:
        uri = Path(self.path).absolute().as_uri() + "?mode=ro"  # percent-encoded: any file name works
        conn = sqlite3.connect(uri, uri=True, timeout=2.0, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _read_facts(self) -> DbFacts:
        with contextlib.closing(self._connect()) as conn:
            row = conn.execute("SELECT received_at FROM records ORDER BY id LIMIT 1").fetchone()
            oldest = float(row[0]) if row else None
            try:
                quarantined = int(conn.execute("SELECT count(*) FROM quarantine").fetchone()[0])
            except sqlite3.OperationalError:
                quarantined = None
        return DbFacts(oldest, quarantined, time.time())

    async def refresh(self, max_age: float = 1.0) -> DbFacts:
        """Re-read unless the last read is younger than ``max_age`` seconds; errors are kept, never raised."""
        if time.time() - self.facts.read_at < max_age:
            return self.facts
        try:
            self.facts = await asyncio.wait_for(asyncio.to_thread(self._read_facts), 5.0)
        except (sqlite3.Error, OSError, TimeoutError) as exc:
            self.facts = DbFacts(self.facts.oldest_received_at, self.facts.quarantine_count, time.time(), str(exc))
        return self.facts

    def _quarantine(self, limit: int) -> list[dict[str, Any]]:
        with contextlib.closing(self._connect()) as conn:
            cur = conn.execute("SELECT * FROM quarantine ORDER BY id DESC LIMIT ?", (limit,))
            names = [d[0] for d in cur.description]
            out = []
            for row in cur.fetchall():
                item: dict[str, Any] = {}
                for name, value in zip(names, row, strict=True):
                    if isinstance(value, bytes):  # payload and properties: sizes only, never the bytes
                        item[f"{name}_bytes"] = len(value)
                    else:
                        item[name] = value
                out.append(item)
            return out

    async def quarantine(self, limit: int = 100) -> list[dict[str, Any]]:
        return await asyncio.wait_for(asyncio.to_thread(self._quarantine, limit), 5.0)


@dataclass
class Sample:
    t: float
    depth: int
    received: float
    acked: float
    uplink_acked: float


class Sampler:
    """Once per ``interval`` on the loop: event-loop lag, a history of samples, suppressed-log reports."""

    def __init__(self, gateway: Gateway, interval: float = 1.0, keep: int = 600) -> None:
        self.gateway = gateway
        self.interval = interval
        self.history: deque[Sample] = deque(maxlen=keep)
        self.lag = 0.0
        """How late the last wake-up was, in seconds."""
        self.lag_max = 0.0
        """The largest lag since the last scrape (reset by :meth:`take_lag_max`)."""

    def take_lag_max(self) -> float:
        value, self.lag_max = max(self.lag_max, self.lag), 0.0
        return value

    def sample(self) -> Sample:
        gw = self.gateway
        stats = getattr(gw.server, "stats", None)
        s = Sample(time.time(), int(_num(gw.outbox, "depth") or 0), _num(stats, "publish_received") or 0.0,
                   _num(stats, "publish_acked") or 0.0, _num(gw.uplink, "acked") or 0.0)
        self.history.append(s)
        return s

    def rates(self, window: float = 10.0) -> dict[str, float]:
        """Per-second rates over the last ``window`` seconds of history."""
        if len(self.history) < 2:
            return {"received": 0.0, "acked": 0.0, "uplink_acked": 0.0}
        last = self.history[-1]
        first = next((s for s in self.history if last.t - s.t <= window), self.history[0])
        span = max(last.t - first.t, 1e-9)
        if first is last:
            first = self.history[-2]
            span = max(last.t - first.t, 1e-9)
        return {"received": max(0.0, (last.received - first.received) / span),
                "acked": max(0.0, (last.acked - first.acked) / span),
                "uplink_acked": max(0.0, (last.uplink_acked - first.uplink_acked) / span)}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.lag = max(0.0, loop.time() - due)
            self.lag_max = max(self.lag_max, self.lag)
            try:
                self.sample()
                report_suppressed()
            except Exception:  # noqa: BLE001 - the sampler must outlive a bad read of a changing module
                pass


class GatewayCollector(Collector):
    """Reads the gateway's live objects at each scrape. Names follow Prometheus conventions (edgegw_ prefix,
    _total for counters, base units: seconds and bytes)."""

    def __init__(self, gateway: Gateway, sampler: Sampler, reader: OutboxReader | None,
                 cert_expiry: dict[str, float] | None = None) -> None:
        self.gateway = gateway
        self.sampler = sampler
        self.reader = reader
        self.cert_expiry = cert_expiry or {}

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: describing would mean a scrape at registration time

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        server, outbox, uplink = gw.server, gw.outbox, gw.uplink
        stats = getattr(server, "stats", None)

        # --- devices and connections
        conns = GaugeMetricFamily("edgegw_connections", "Open device connections (sessions with a completed "
                                  "CONNECT), by protocol and version", labels=["protocol", "version"])
        counts: dict[str, int] = {}
        for proto in list((getattr(server, "devices", None) or {}).values()):
            version = protocol_version(proto)
            counts[version] = counts.get(version, 0) + 1
        for version in ("3.1.1", "5"):
            counts.setdefault(version, 0)
        for version, n in sorted(counts.items()):
            conns.add_metric(["mqtt", version], n)
        yield conns
        yield GaugeMetricFamily("edgegw_sockets", "Accepted device sockets, including those still in TLS or "
                                "CONNECT", value=_num(server, "connection_count") or 0)
        accepted = CounterMetricFamily("edgegw_connections_accepted", "Device TCP connections accepted",
                                       labels=["protocol"])
        accepted.add_metric(["mqtt"], _num(stats, "accepted") or 0)
        yield accepted
        connected = CounterMetricFamily("edgegw_sessions_established", "CONNECTs accepted", labels=["protocol"])
        connected.add_metric(["mqtt"], _num(stats, "connected") or 0)
        yield connected
        takeovers = CounterMetricFamily("edgegw_session_takeovers", "Sessions taken over by a new connection of "
                                        "the same device", labels=["protocol"])
        takeovers.add_metric(["mqtt"], _num(stats, "takeovers") or 0)
        yield takeovers
        yield CounterMetricFamily("edgegw_session_queue_dropped", "Messages dropped from full MQTT session queues "
                                  "(max_queued_messages / max_queued_bytes), oldest first",
                                  value=_num(getattr(getattr(server, "broker", None), "stats", None),
                                             "queue_dropped") or 0)

        # --- messages
        msgs_in = CounterMetricFamily("edgegw_messages_received", "PUBLISH packets received from devices",
                                      labels=["protocol", "qos"])
        msgs_acked = CounterMetricFamily("edgegw_messages_acknowledged", "Device publishes acknowledged after "
                                         "their outbox commit", labels=["protocol", "qos"])
        # MQTTStats counts by QoS in small lists indexed by QoS; acknowledged exists for QoS 1 and 2 only.
        for fam, by_qos_name, total_name, levels in (
                (msgs_in, "publish_received_by_qos", "publish_received", (0, 1, 2)),
                (msgs_acked, "publish_acked_by_qos", "publish_acked", (1, 2))):
            by_qos = getattr(stats, by_qos_name, None)
            if isinstance(by_qos, list | tuple) and len(by_qos) == 3:
                for qos in levels:
                    fam.add_metric(["mqtt", str(qos)], by_qos[qos])
            else:  # an MQTTStats without the split: one series labelled qos="all"
                fam.add_metric(["mqtt", "all"], _num(stats, total_name) or 0)
        yield msgs_in
        yield msgs_acked
        yield CounterMetricFamily("edgegw_messages_held", "MQTT 3.1.1 QoS 1/2 publishes held unacknowledged (reading "
                                  "paused) because the outbox was full", value=_num(stats, "publish_held") or 0)
        yield from limit_metrics(getattr(gw, "limiter", None))
        yield from coap_metrics(getattr(gw, "coap", None))
        yield from pipeline_metrics(gw)  # routes, drops, quarantine, deprecated versions (edgegw/pipeline/)
        for name, help_text in (("downlink_delivered", "Messages delivered to devices (local subscriptions, "
                                 "downlink)"),
                                ("downlink_undeliverable", "Downlink messages for devices that are not connected")):
            fam = CounterMetricFamily(f"edgegw_{name}", help_text, labels=["protocol"])
            fam.add_metric(["mqtt"], _num(stats, name) or 0)
            yield fam

        # --- refusals
        refusals = CounterMetricFamily("edgegw_refusals", "Things refused at the device edge, by reason",
                                       labels=["protocol", "reason"])
        for field_name, reason in _REFUSALS.items():
            refusals.add_metric(["mqtt", reason], _num(stats, field_name) or 0)
        yield refusals
        events = CounterMetricFamily("edgegw_refusal_log_events", "Refusal log events, by event name (counted "
                                     "before the log rate limit)", labels=["event"])
        for name, n in sorted(RECENT_REFUSALS.counts.items()):
            events.add_metric([name], n)
        yield events
        yield CounterMetricFamily("edgegw_log_events_suppressed", "Log lines dropped by the log rate limit",
                                  value=RATE_LIMITER.suppressed_total)

        # --- outbox
        if outbox is not None:
            yield GaugeMetricFamily("edgegw_outbox_records", "Records held: committed and not acknowledged "
                                    "upstream, plus those awaiting commit", value=_num(outbox, "depth") or 0)
            yield GaugeMetricFamily("edgegw_outbox_bytes", "Bytes held (as counted against outbox.max_bytes)",
                                    value=_num(outbox, "bytes_held") or 0)
            yield GaugeMetricFamily("edgegw_outbox_limit_bytes", "outbox.max_bytes, or less under the disk guard",
                                    value=_num(outbox, "byte_limit") or 0)
            yield GaugeMetricFamily("edgegw_outbox_pending_records", "Records submitted, not committed yet",
                                    value=_num(outbox, "pending_count") or 0)
            yield CounterMetricFamily("edgegw_outbox_commits", "Group commits", value=_num(outbox, "commits") or 0)
            yield CounterMetricFamily("edgegw_outbox_committed_records", "Records committed",
                                      value=_num(outbox, "committed_records") or 0)
            lost = CounterMetricFamily("edgegw_outbox_records_removed", "Records removed unsent, by why "
                                       "(dropped: evicted when full; expired: older than ttl)", labels=["reason"])
            lost.add_metric(["dropped"], _num(outbox, "dropped") or 0)
            lost.add_metric(["expired"], _num(outbox, "expired") or 0)
            yield lost
            yield CounterMetricFamily("edgegw_outbox_rejected_records", "Records refused at submit (outbox full)",
                                      value=_num(outbox, "rejected") or 0)
            yield CounterMetricFamily("edgegw_outbox_quarantined_records", "Records moved to quarantine by this "
                                      "process", value=_num(outbox, "quarantined") or 0)
            yield CounterMetricFamily("edgegw_outbox_quarantine_dropped_records", "Quarantined records deleted, "
                                      "the oldest of the device holding the most first, to keep the quarantine "
                                      "within outbox.quarantine_max_records / quarantine_max_bytes",
                                      value=_num(outbox, "quarantine_dropped") or 0)
            facts = self.reader.facts if self.reader is not None else DbFacts()
            if facts.oldest_received_at is not None:
                age = max(0.0, time.time() - facts.oldest_received_at)
            else:
                age = 0.0
            yield GaugeMetricFamily("edgegw_outbox_oldest_age_seconds", "Age of the oldest committed record "
                                    "(0: empty)", value=age)
            if facts.quarantine_count is not None:
                yield GaugeMetricFamily("edgegw_quarantine_records", "Records in the quarantine table",
                                        value=facts.quarantine_count)

        # --- uplink
        if uplink is not None:
            state = getattr(uplink, "state", "down")
            fam = GaugeMetricFamily("edgegw_uplink_state", "1 for the uplink's current state", labels=["state"])
            for name in UPLINK_STATES:
                fam.add_metric([name], 1.0 if state == name else 0.0)
            yield fam
            yield GaugeMetricFamily("edgegw_uplink_up", "1 if connected to an upstream broker",
                                    value=1.0 if state == "connected" else 0.0)
            rtt = _num(uplink, "last_rtt", None)
            if rtt is not None:
                yield GaugeMetricFamily("edgegw_uplink_rtt_seconds", "PUBLISH to PUBACK time of the latest sampled "
                                        "upstream message", value=rtt)
            yield GaugeMetricFamily("edgegw_uplink_inflight_messages", "Upstream publishes awaiting PUBACK",
                                    value=_num(uplink, "inflight") or 0)
            yield GaugeMetricFamily("edgegw_uplink_backlog_records", "Backlog records not yet acknowledged since "
                                    "the current connection came up", value=_num(uplink, "backlog") or 0)
            eta = _num(uplink, "backfill_eta", None)
            if eta is not None:
                yield GaugeMetricFamily("edgegw_outbox_drain_eta_seconds", "Estimated seconds until the backlog "
                                        "is drained upstream", value=eta)
            for name, help_text in (("sent", "Publishes handed to the upstream broker"),
                                    ("acked", "Publishes the upstream acknowledged"),
                                    ("refused", "Publishes the upstream refused (quarantined)"),
                                    ("throttled", "Publishes answered 0x97 Quota exceeded (kept, sent again later)"),
                                    ("reconnects", "Upstream reconnections after the first connection"),
                                    ("connect_failures", "Failed upstream connection attempts"),
                                    ("session_takeovers", "Upstream connections ended because another client "
                                     "connected with the uplink's client id (is gateway.id unique?)")):
                yield CounterMetricFamily(f"edgegw_uplink_{name}", help_text, value=_num(uplink, name) or 0)
            yield CounterMetricFamily("edgegw_uplink_sent_bytes", "MQTT PUBLISH bytes handed to the upstream",
                                      value=_num(uplink, "bytes_sent") or 0)
            yield CounterMetricFamily("edgegw_uplink_expired_records", "Records whose device-set Message Expiry "
                                      "Interval passed before they could go up (deleted unsent)",
                                      value=_num(uplink, "expired") or 0)
            commands = CounterMetricFamily("edgegw_uplink_commands", "Commands from upstream (uplink.command_topic), "
                                           "by outcome", labels=["outcome"])
            commands.add_metric(["delivered"], _num(uplink, "commands_delivered") or 0)
            commands.add_metric(["undeliverable"], _num(uplink, "commands_undeliverable") or 0)
            yield commands

        # --- process
        yield GaugeMetricFamily("edgegw_event_loop_lag_seconds", "How late the 1 s sampler woke up, last time",
                                value=self.sampler.lag)
        yield GaugeMetricFamily("edgegw_event_loop_lag_max_seconds", "Largest event-loop lag since the last "
                                "scrape", value=self.sampler.take_lag_max())
        # The device fleet's soonest expiry and the CRL's nextUpdate come from the credentials loaded at the last
        # (re)load, so a scrape never opens the registry (issuing a device changes registry.db: a reload follows).
        creds = getattr(gw, "credentials", None)
        expiry = dict(self.cert_expiry)
        soonest = getattr(creds, "soonest_device_not_after", None)
        if soonest is not None:
            expiry["soonest_device"] = soonest.timestamp()
        if expiry:
            expiry_fam = GaugeMetricFamily("edgegw_certificate_expiry_timestamp_seconds", "notAfter of the gateway's "
                                           "certificates and of the soonest-expiring active device (unix time)",
                                           labels=["certificate"])
            for name, ts in sorted(expiry.items()):
                expiry_fam.add_metric([name], ts)
            yield expiry_fam
        crl_next = getattr(creds, "crl_next_update", None)
        if crl_next is not None:
            yield GaugeMetricFamily("edgegw_crl_next_update_timestamp_seconds", "nextUpdate of the loaded CRL (unix "
                                    "time): past it every device is refused", value=crl_next.timestamp())


def limit_metrics(limiter: Any) -> Iterator[Metric]:
    """Rate limits and quotas (edgegw/policy/limits.py): hits by limit and action, quota usage per quota, and the
    devices closest to their quota (top 10: a per-device series for every device would not scale)."""
    hits: dict[tuple[str, str, str, str], int] = dict(getattr(limiter, "hits", None) or {})
    per_protocol: dict[str, int] = {"mqtt": 0}
    detail = CounterMetricFamily("edgegw_rate_limit_actions", "Messages delayed (backpressure), refused (reject: "
                                 "MQTT 5 0x97, CoAP 4.29) or dropped (QoS 0) by a rate limit or quota, by protocol, "
                                 "limit scope, limit name and the action taken", labels=["protocol", "scope", "limit",
                                                                                         "action"])
    for (protocol, scope, name, action), n in sorted(hits.items()):
        detail.add_metric([protocol, scope, name, action], n)
        per_protocol[protocol] = per_protocol.get(protocol, 0) + n
    totals = CounterMetricFamily("edgegw_rate_limit_hits", "Messages delayed, refused or dropped by a rate limit or "
                                 "quota, all limits and actions (edgegw_rate_limit_actions_total has the detail)",
                                 labels=["protocol"])
    for protocol, n in sorted(per_protocol.items()):
        totals.add_metric([protocol], n)
    yield totals
    yield detail
    if limiter is None:
        return
    yield GaugeMetricFamily("edgegw_limits_tracked_devices", "Devices whose rate-limit buckets are in memory "
                            "(at most limits.max_devices)", value=_num(limiter, "tracked_devices") or 0)
    yield CounterMetricFamily("edgegw_limits_usage_flush_failures", "Failed writes of the quota usage file",
                              value=_num(limiter, "flush_failures") or 0)
    report = getattr(limiter, "quota_report", None)
    if report is None:
        return
    try:
        quotas, top = report()
    except Exception:  # noqa: BLE001 - a metric never breaks a scrape
        return
    used = GaugeMetricFamily("edgegw_quota_usage", "Usage this UTC day/month by the devices under each quota, "
                             "summed", labels=["quota", "period", "unit"])
    limit = GaugeMetricFamily("edgegw_quota_limit", "Each device's quota", labels=["quota", "period", "unit"])
    exhausted = GaugeMetricFamily("edgegw_quota_exhausted_devices", "Devices that used up their quota this period",
                                  labels=["quota", "period", "unit"])
    for name, period, unit, total, per_device, out in quotas:
        used.add_metric([name, period, unit], total)
        limit.add_metric([name, period, unit], per_device)
        exhausted.add_metric([name, period, unit], out)
    ratio = GaugeMetricFamily("edgegw_quota_device_usage_ratio", "Share of its quota a device used this period (the "
                              "10 devices closest to theirs)", labels=["device", "quota", "period"])
    for device, name, period, share in top:
        ratio.add_metric([device, name, period], share)
    yield used
    yield limit
    yield exhausted
    yield ratio


def certificate_expiry(paths: dict[str, Path]) -> dict[str, float]:
    """notAfter (unix seconds) of each PEM certificate that can be read; unreadable ones are left out."""
    from cryptography import x509

    out: dict[str, float] = {}
    for name, path in paths.items():
        try:
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError):
            continue
        out[name] = cert.not_valid_after_utc.timestamp()
    return out
