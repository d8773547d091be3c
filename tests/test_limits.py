"""Rate limits and quotas without sockets: token buckets and the limiter driven by an injected clock (no sleeping,
no timing assertions), usage persisted in a real SQLite file, and config errors that name the key."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edgegw.config import load_config
from edgegw.errors import ConfigError
from edgegw.policy._buckets import Bucket
from edgegw.policy._quota import UsageStore
from edgegw.policy.limits import ADMITTED, Limiter
from edgegw.policy.limits_config import LimitsSettings, limits_from_mapping

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def settings(**raw: Any) -> LimitsSettings:
    return limits_from_mapping(raw, Path("/tmp"))


def limiter(raw: dict[str, Any], *, classes: dict[str, tuple[str, str]] | None = None, clock: Clock | None = None,
            wall: Clock | None = None, store: UsageStore | None = None) -> Limiter:
    table = classes or {}
    return Limiter(settings(**raw), classify=lambda d: table.get(d, ("", "")), clock=clock or Clock(),
                   wall=wall or Clock(datetime(2026, 11, 29, 12, tzinfo=UTC).timestamp()), store=store)


# --- buckets ------------------------------------------------------------------------------------------------


def test_bucket_burst_then_rate() -> None:
    b = Bucket(rate=10.0, burst=3.0, now=0.0)
    for _ in range(3):
        assert b.wait(1, 0.0) == 0.0
        b.take(1, 0.0)
    assert b.wait(1, 0.0) == pytest.approx(0.1)  # one token every 1/10 s
    assert b.wait(1, 0.05) == pytest.approx(0.05)
    assert b.wait(1, 0.1) == 0.0
    assert b.level(100.0) == 3.0  # refill stops at the burst


def test_bucket_larger_than_burst_needs_a_full_bucket_and_leaves_debt() -> None:
    b = Bucket(rate=100.0, burst=100.0, now=0.0)
    b.take(50, 0.0)
    assert b.wait(250, 0.0) == pytest.approx(0.5)  # refused until full, not for ever
    assert b.wait(250, 0.5) == 0.0
    b.take(250, 0.5)
    assert b.level(0.5) == pytest.approx(-150.0)
    assert b.wait(1, 0.5) == pytest.approx(1.51)  # the debt is paid at the rate: the long-run rate holds


def test_bucket_retune_keeps_what_was_earned_capped_at_the_new_burst() -> None:
    b = Bucket(rate=1.0, burst=10.0, now=0.0)
    b.take(10, 0.0)
    b.retune(rate=100.0, burst=5.0, now=2.0)  # 2 tokens earned at the old rate
    assert b.level(2.0) == pytest.approx(2.0)
    assert b.level(3.0) == 5.0


# --- the limiter ----------------------------------------------------------------------------------------------


def test_no_rules_admits_everything() -> None:
    lim = limiter({})
    assert all(lim.admit("d", 10**9) is ADMITTED for _ in range(1000))


def test_a_message_must_pass_every_bucket_and_a_refused_one_takes_nothing() -> None:
    clock = Clock()
    lim = limiter({"rate": [{"scope": "device", "messages_rate": 10, "messages_burst": 5},
                            {"scope": "gateway", "bytes_rate": 100, "bytes_burst": 100, "action": "reject"}]},
                  clock=clock)
    assert lim.admit("a", 60) is ADMITTED
    refused = lim.admit("a", 60)  # the device bucket has 4 left, the gateway's 40 bytes: blocked by bytes
    assert refused.limit == "gateway" and refused.scope == "gateway" and refused.action == "reject"
    assert refused.wait_s == pytest.approx(0.2)
    # Nothing was taken from the device bucket by the refusal: 4 more small messages pass, the 5th does not.
    for _ in range(4):
        assert lim.admit("a", 1) is ADMITTED
    blocked = lim.admit("a", 1)
    assert blocked.limit == "device" and blocked.action == "backpressure" and blocked.wait_s == pytest.approx(0.1)


def test_devices_have_their_own_buckets_and_share_group_tenant_and_gateway_ones() -> None:
    clock = Clock()
    classes = {"g1": ("gold", "acme"), "g2": ("gold", "acme"), "s1": ("silver", "acme"), "x": ("silver", "other")}
    lim = limiter({"rate": [
        {"name": "gold-device", "scope": "device", "group": "gold", "messages_rate": 1, "messages_burst": 10},
        {"name": "any-device", "scope": "device", "messages_rate": 1, "messages_burst": 2},
        {"scope": "group", "group": "gold", "messages_rate": 1, "messages_burst": 15},
        {"scope": "tenant", "tenant": "acme", "messages_rate": 1, "messages_burst": 100},
    ]}, classes=classes, clock=clock)
    # First match per scope: gold devices get 10, others 2.
    assert sum(lim.admit("s1", 1) is ADMITTED for _ in range(20)) == 2
    assert sum(lim.admit("g1", 1) is ADMITTED for _ in range(20)) == 10
    # g2 has its own device bucket (10) but shares the gold group's, which g1 left at 5.
    results = [lim.admit("g2", 1) for _ in range(20)]
    assert sum(r is ADMITTED for r in results) == 5
    assert results[5].limit == "group[group=gold]" and results[5].scope == "group"
    # Another tenant is not touched by acme's usage.
    assert lim.admit("x", 1) is ADMITTED


def test_the_lru_of_device_states_is_bounded_and_idle_full_devices_are_forgotten() -> None:
    clock = Clock()
    lim = limiter({"max_devices": 3, "idle_timeout": 60, "rate": [{"scope": "device", "messages_rate": 1}]},
                  clock=clock)
    for d in ("a", "b", "c", "d"):
        lim.admit(d, 1)
    assert lim.tracked_devices == 3
    clock.t += 30
    lim.admit("d", 1)
    clock.t += 40  # b, c idle 70 s (refilled: forgotten); d idle 40 s: kept
    assert lim.sweep() == 2
    assert lim.tracked_devices == 1


def test_replace_applies_new_limits_at_once_and_keeps_tokens_and_usage() -> None:
    clock = Clock()
    lim = limiter({"rate": [{"name": "gw", "scope": "gateway", "messages_rate": 1, "messages_burst": 3}],
                   "quota": [{"period": "day", "messages": 100}]}, clock=clock)
    assert sum(lim.admit("a", 1) is ADMITTED for _ in range(5)) == 3
    lim.replace(settings(rate=[{"name": "gw", "scope": "gateway", "messages_rate": 1, "messages_burst": 50}],
                         quota=[{"period": "day", "messages": 100}]))
    assert lim.admit("a", 1).limit == "gw"  # the emptied bucket stays empty under the new burst ...
    clock.t += 10
    assert sum(lim.admit("a", 1) is ADMITTED for _ in range(20)) == 10  # ... and refills at the new settings
    usage = lim.usage_of("a")
    assert usage is not None and usage.day_messages == 13
    lim.replace(settings())
    assert lim.admit("a", 1) is ADMITTED


def test_a_device_bucket_retuned_lazily_refills_at_the_new_rate_from_the_reload_on() -> None:
    clock = Clock(0.0)
    lim = limiter({"rate": [{"name": "d", "scope": "device", "messages_rate": 1, "messages_burst": 10}]}, clock=clock)
    assert sum(lim.admit("a", 1) is ADMITTED for _ in range(10)) == 10
    lim.replace(settings(rate=[{"name": "d", "scope": "device", "messages_rate": 100, "messages_burst": 10}]))
    clock.t = 0.05  # the device's next message: 5 tokens earned at the new rate since the reload, not 0.05
    assert sum(lim.admit("a", 1) is ADMITTED for _ in range(10)) == 5


def test_quota_per_tier_per_day_and_month_resets_when_the_period_ends() -> None:
    wall = Clock(datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC).timestamp())
    lim = limiter({"quota": [{"period": "day", "group": "gold", "messages": 3},
                             {"period": "day", "messages": 2, "action": "drop"},
                             {"period": "month", "bytes": 1000}]},
                  classes={"g": ("gold", "")}, wall=wall)
    assert sum(lim.admit("g", 10) is ADMITTED for _ in range(5)) == 3
    over = lim.admit("g", 10)
    assert over.scope == "quota" and over.limit == "quota:day[group=gold]" and over.action == "reject"
    assert over.wait_s == pytest.approx(60.0)  # until UTC midnight
    assert sum(lim.admit("s", 10) is ADMITTED for _ in range(5)) == 2
    assert lim.admit("s", 10).action == "drop"
    wall.t += 61  # a new day and a new month
    assert lim.admit("g", 990) is ADMITTED
    assert lim.admit("g", 20).limit == "quota:month"  # 990 + 20 > 1000 bytes this month


def test_usage_of_past_periods_is_dropped_from_memory_once_the_device_is_forgotten() -> None:
    clock, wall = Clock(), Clock(datetime(2026, 11, 30, 23, 0, tzinfo=UTC).timestamp())
    lim = limiter({"idle_timeout": 60, "quota": [{"period": "day", "messages": 5}]}, clock=clock, wall=wall)
    lim.admit("old", 1)
    lim.admit("busy", 1)
    lim._dirty.clear()  # as after a flush
    clock.t += 3600
    wall.t += 3600  # December
    lim.admit("busy", 1)  # rolls the period; "busy" keeps its state and its (reset) usage
    lim.sweep()
    assert lim.usage_of("old") is None and lim.usage_of("busy") is not None
    assert lim.usage_of("busy").day_messages == 1  # type: ignore[union-attr]


def test_usage_is_flushed_to_sqlite_and_survives_a_new_limiter(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    raw = {"quota": [{"period": "day", "messages": 5}, {"period": "month", "messages": 100}]}
    first = limiter(raw, store=UsageStore(path))
    assert sum(first.admit("a", 7) is ADMITTED for _ in range(3)) == 3
    asyncio.run(first.close())
    assert first.flushes == 1
    second = limiter(raw, store=UsageStore(path))
    second.load_usage()
    usage = second.usage_of("a")
    assert usage is not None and (usage.day_messages, usage.day_bytes, usage.month_messages) == (3, 21, 3)
    assert sum(second.admit("a", 7) is ADMITTED for _ in range(5)) == 2
    asyncio.run(second.close())


def test_an_unreadable_usage_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    path.write_bytes(b"not a database" * 100)
    lim = limiter({"quota": [{"period": "day", "messages": 5}]}, store=UsageStore(path))
    lim.load_usage()
    assert lim.usage_of("a") is None
    assert list(tmp_path.glob("usage.db.corrupt-*"))


def test_quota_report_and_coap_seam() -> None:
    lim = limiter({"quota": [{"name": "daily", "period": "day", "messages": 2}],
                   "rate": [{"scope": "device", "messages_rate": 1, "messages_burst": 5}]})
    for _ in range(3):
        lim.coap_admit("a", 1)
    assert lim.coap_admit("b", 1) == 0.0
    wait = lim.coap_admit("a", 1)
    assert wait > 3600  # quota exhausted: until the end of the UTC day (12:00 now)
    assert lim.hits == {("coap", "quota", "daily", "reject"): 2}
    totals, top = lim.quota_report()
    assert totals == [("daily", "day", "messages", 3, 2, 1)]
    assert top[0] == ("a", "daily", "day", 1.0)


# --- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "key"), [
    ({"rate": [{"scope": "planet", "messages_rate": 1}]}, "limits.rate[0].scope"),
    ({"rate": [{"scope": "device"}]}, "limits.rate[0].messages_rate"),
    ({"rate": [{"scope": "device", "messages_rate": -1}]}, "limits.rate[0].messages_rate"),
    ({"rate": [{"scope": "device", "messages_rate": 1, "action": "explode"}]}, "limits.rate[0].action"),
    ({"rate": [{"scope": "device", "messages_rate": 1, "colour": "red"}]}, "limits.rate[0].colour"),
    ({"rate": [{"scope": "device", "messages_rate": 1}, {"scope": "device", "bytes_rate": 1}]},
     "limits.rate[1].name"),
    ({"rate": [{"scope": "device", "messages_rate": 1, "bytes_burst": 10}]}, "limits.rate[0].bytes_burst"),
    ({"quota": [{"period": "week", "messages": 1}]}, "limits.quota[0].period"),
    ({"quota": [{"period": "day"}]}, "limits.quota[0].messages"),
    ({"quota": [{"period": "day", "messages": 1.5}]}, "limits.quota[0].messages"),
    ({"rate": {"scope": "device"}}, "limits.rate"),
    ({"flush_interval": 0}, "limits.flush_interval"),
    ({"burst": 1}, "limits.burst"),
])
def test_bad_limits_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        limits_from_mapping(raw, Path("/tmp"))
    assert info.value.key == key


def test_limits_section_in_a_config_file(tmp_path: Path) -> None:
    text = (ROOT / "configs" / "edgegw.example.toml").read_text()
    assert 'usage_path = ""' in text  # the example documents [limits] with its defaults
    target = tmp_path / "gw.toml"
    target.write_text(text.replace('usage_path = ""', 'usage_path = "state/u.db"')
                      + '\n[[limits.rate]]\nscope = "device"\nmessages_rate = 5\n\n'
                        '[[limits.quota]]\nperiod = "month"\nbytes = 1000000\n')
    config = load_config(target)
    assert config.limits.usage_path == tmp_path / "state" / "u.db"
    assert config.limits.rate[0].message_burst == 5.0
    assert config.limits.quota[0].name == "quota:month"
    assert not load_config(ROOT / "configs" / "edgegw.example.toml").limits.active
    target.write_text(text + '\n[[limits.rate]]\nscope = "device"\n')
    with pytest.raises(ConfigError) as info:
        load_config(target)
    assert info.value.key == "limits.rate[0].messages_rate"


def test_quota_usage_in_memory_is_bounded_when_a_peer_makes_up_ids(tmp_path: Path) -> None:
    """Ids a lab peer chooses each got a usage entry kept until the month changed. Now, past ``max_devices``,
    the least recently used entries of devices without live state and already written are forgotten; the file
    keeps the higher count, so a forgotten device that comes back is not reset there."""
    path = tmp_path / "usage.db"
    raw = {"max_devices": 10, "quota": [{"period": "day", "messages": 1000}]}
    lim = limiter(raw, store=UsageStore(path))
    for _ in range(3):
        lim.admit("real", 1)
    for i in range(500):
        lim.admit(f"made-up-{i}", 1)
        if i % 50 == 49:  # the upkeep task: flush, then sweep
            asyncio.run(lim.flush())
            lim.sweep()
    assert len(lim._usage) <= 10 + 50 and lim.tracked_devices <= 10  # no longer one entry per id ever seen
    assert lim.usage_of("real") is None and lim.usage_forgotten >= 440
    lim.admit("real", 1)  # back: counts from zero in memory ...
    asyncio.run(lim.close())
    again = limiter(raw, store=UsageStore(path))
    again.load_usage()
    usage = again.usage_of("real")
    assert usage is not None and usage.day_messages == 3  # ... but the file kept the higher count
    assert len(again._usage) <= 10  # and a restart loads no more than the bound either
    asyncio.run(again.close())
