"""The pipeline's part of the config: ``[[routes]]``, ``[routing]``, ``[transforms.NAME]``, ``[versions.NAME]`` and
``[tenants]`` (docs/POLICY.md). Parsed strictly into frozen values; every error names its dotted key.

:func:`parse_pipeline` also compiles every step, expression, schema, unit pair and plug-in once, so a config that
loads is a config whose chains build: ``edgegw check-config`` and a reload refuse a broken one before it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgegw.errors import ConfigError
from edgegw.policy.certattrs import attribute_oid

NO_TENANT = "_untenanted"
"""With tenants on, the upstream level a device without a tenant publishes under (``{uplink.topic_prefix}/
_untenanted/{device_id}/...``): never a tenant name (edgegw/pipeline/tenants.py ``safe_tenant`` refuses it), so a
device without a tenant whose id equals a tenant's name cannot publish into that tenant's space."""

# The outbox's priority classes (edgegw/outbox/_record.py), repeated: edgegw/config.py imports this module, and the
# outbox package imports edgegw/config.py. tests/test_pipeline.py checks that both agree.
PRIORITY_BULK, PRIORITY_TELEMETRY, PRIORITY_ALARM = 0, 1, 2
MAX_PRIORITY = 7

SECTIONS = ("routes", "routing", "transforms", "versions", "tenants", "quarantine")
"""Top-level config sections owned by the pipeline (``edgegw/config.py`` hands them here)."""

FORMATS = ("json", "cbor", "msgpack", "raw")
PRIORITIES = {"bulk": PRIORITY_BULK, "telemetry": PRIORITY_TELEMETRY, "alarm": PRIORITY_ALARM}
TenantSource = str
"""``none``, ``registry``, ``cert-o``, ``cert-ou`` or ``cert:NAME`` (any subject attribute: edgegw/policy/certattrs.py)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
TEMPLATE_VARS = ("device_id", "tenant", "prefix", "rest")


@dataclass(frozen=True, slots=True, kw_only=True)
class TransformSettings:
    name: str
    steps: tuple[dict[str, Any], ...]
    """Each step table as written (validated and compiled once by :func:`parse_pipeline`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSettings:
    name: str
    match: str
    topic: str
    """Upstream topic template: ``{device_id}``, ``{tenant}``, ``{prefix}``, ``{rest}`` and the match's captures."""
    qos: int | None = None
    priority: int = PRIORITY_TELEMETRY
    decode: str = "raw"
    encode: str = "raw"
    transforms: tuple[str, ...] = ()
    continue_: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionSettings:
    name: str
    adapter: str | None = None
    """A ``[transforms.*]`` chain mapping this version's payload to the current shape (after decode)."""
    deprecated: bool = False
    sunset: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantSettings:
    source: TenantSource = "none"
    default: str = ""
    prefixes: tuple[tuple[str, str], ...] = ()
    """tenant -> upstream prefix; a tenant not listed gets ``{uplink.topic_prefix}/{tenant}``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuarantineSettings:
    """``[quarantine]``: how much of the pipeline's quarantine.db (poison messages) is kept (edgegw/pipeline/poison.py)."""

    max_rows: int = 100_000
    max_bytes: int = 128 * 1024 * 1024
    """Payload + properties bytes. Past either cap rows are deleted from the device holding the most first."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineSettings:
    routes: tuple[RouteSettings, ...] = ()
    unmatched: Literal["pass", "drop"] = "pass"
    transforms: tuple[TransformSettings, ...] = ()
    versions: tuple[VersionSettings, ...] = ()
    tenants: TenantSettings = field(default_factory=TenantSettings)
    quarantine: QuarantineSettings = field(default_factory=QuarantineSettings)
    base_dir: Path = Path(".")

    @property
    def enabled(self) -> bool:
        """False: no pipeline at all, records are stored exactly as before (the default)."""
        return bool(self.routes or self.versions or self.tenants.source != "none" or self.unmatched != "pass")


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def _known(key: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(known)})")


def _string(key: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise ConfigError(key, f"expected a{'' if empty else ' non-empty'} string, got {value!r}")
    return value


def _name(key: str, value: Any) -> str:
    text = _string(key, value)
    if not _NAME.match(text):
        raise ConfigError(key, f"{text!r} is not a valid name (letters, digits, . _ -; at most 64)")
    return text


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"expected a whole number >= 1, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def _priority(key: str, value: Any) -> int:
    if isinstance(value, str):
        if value not in PRIORITIES:
            raise ConfigError(key, f"expected one of {', '.join(PRIORITIES)} or 0..{MAX_PRIORITY}, got {value!r}")
        return PRIORITIES[value]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise ConfigError(key, f"expected one of {', '.join(PRIORITIES)} or 0..{MAX_PRIORITY}, got {value!r}")
    return value


def check_pattern(key: str, pattern: str) -> tuple[str, ...]:
    """A device topic pattern's levels; ``#`` only last, ``{name}`` only as a whole level."""
    levels = tuple(pattern.split("/"))
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            raise ConfigError(key, f"'#' must be the last level in {pattern!r}")
        if ("{" in level or "}" in level) and not (_VAR.fullmatch(level)):
            raise ConfigError(key, f"a {{variable}} must be a whole level, got {level!r} in {pattern!r}")
        if ("+" in level or "#" in level) and len(level) > 1:
            raise ConfigError(key, f"a wildcard must be a whole level, got {level!r} in {pattern!r}")
    return levels


def check_template(key: str, template: str, captures: set[str]) -> None:
    for name in _VAR.findall(template):
        if name not in TEMPLATE_VARS and name not in captures:
            raise ConfigError(key, f"unknown variable {{{name}}} (known: {', '.join(sorted({*TEMPLATE_VARS, *captures}))})")
    rest = _VAR.sub("", template)
    if "{" in rest or "}" in rest or "+" in rest or "#" in rest:
        raise ConfigError(key, f"{template!r}: a topic name has no wildcards and braces only around a variable")
    if not template or template.startswith("$"):
        raise ConfigError(key, f"{template!r}: upstream topics are not empty and do not start with '$'")


def parse_pipeline(raw: dict[str, Any], base_dir: Path) -> PipelineSettings:
    """The pipeline sections of a parsed TOML document (the other sections are ignored here)."""
    from edgegw.pipeline.steps import (
        compile_step,  # compiled here to refuse a broken chain at load
    )

    transforms: list[TransformSettings] = []
    for name, value in _table("transforms", raw.get("transforms", {})).items():
        key = f"transforms.{name}"
        _name(key, name)
        table = _table(key, value)
        _known(key, table, ("steps",))
        steps = table.get("steps")
        if not isinstance(steps, list) or not steps:
            raise ConfigError(f"{key}.steps", "expected a list of step tables (at least one)")
        for i, step in enumerate(steps):
            compile_step(f"{key}.steps[{i}]", step, base_dir)
        transforms.append(TransformSettings(name=name, steps=tuple(dict(s) for s in steps)))
    chains = {t.name for t in transforms}

    versions: list[VersionSettings] = []
    for name, value in _table("versions", raw.get("versions", {})).items():
        key = f"versions.{name}"
        _name(key, name)
        table = _table(key, value)
        _known(key, table, ("adapter", "deprecated", "sunset"))
        adapter = table.get("adapter")
        if adapter is not None and _string(f"{key}.adapter", adapter) not in chains:
            raise ConfigError(f"{key}.adapter", f"no [transforms.{adapter}] (known: {', '.join(sorted(chains))})")
        deprecated = table.get("deprecated", False)
        if not isinstance(deprecated, bool):
            raise ConfigError(f"{key}.deprecated", f"expected true or false, got {deprecated!r}")
        versions.append(VersionSettings(name=name, adapter=adapter, deprecated=deprecated,
                                        sunset=_string(f"{key}.sunset", table.get("sunset", ""), empty=True)))

    tenants_raw = _table("tenants", raw.get("tenants", {}))
    _known("tenants", tenants_raw, ("source", "default", "prefixes"))
    prefixes = _table("tenants.prefixes", tenants_raw.get("prefixes", {}))
    for tenant, prefix in prefixes.items():
        check_template(f"tenants.prefixes.{tenant}", _string(f"tenants.prefixes.{tenant}", prefix), set())
        if "{" in prefix:
            raise ConfigError(f"tenants.prefixes.{tenant}", "a prefix is literal (no variables)")
    default = _string("tenants.default", tenants_raw.get("default", ""), empty=True)
    if default:
        _name("tenants.default", default)
        if default == NO_TENANT:
            raise ConfigError("tenants.default", f"{NO_TENANT!r} is reserved for devices without a tenant")
    source = tenants_raw.get("source", "none")
    if not (isinstance(source, str) and source.startswith("cert:")):
        source = _choice("tenants.source", source, ("none", "cert-o", "cert-ou", "registry", "cert:NAME"))
    attribute_oid("tenants.source", source)  # a cert:NAME must name a known attribute or be an OID
    tenants = TenantSettings(
        source=source,
        default=default, prefixes=tuple((str(k), str(v)) for k, v in prefixes.items()))

    quarantine_raw = _table("quarantine", raw.get("quarantine", {}))
    _known("quarantine", quarantine_raw, ("max_rows", "max_bytes"))
    defaults = QuarantineSettings()
    quarantine = QuarantineSettings(
        max_rows=_positive_int("quarantine.max_rows", quarantine_raw.get("max_rows", defaults.max_rows)),
        max_bytes=_positive_int("quarantine.max_bytes", quarantine_raw.get("max_bytes", defaults.max_bytes)))

    routing = _table("routing", raw.get("routing", {}))
    _known("routing", routing, ("unmatched",))
    unmatched = _choice("routing.unmatched", routing.get("unmatched", "pass"), ("pass", "drop"))

    routes_raw = raw.get("routes", [])
    if not isinstance(routes_raw, list):
        raise ConfigError("routes", "expected [[routes]] tables")
    routes: list[RouteSettings] = []
    names: set[str] = set()
    fields = ("name", "match", "topic", "qos", "priority", "decode", "encode", "transforms", "continue")
    for i, value in enumerate(routes_raw):
        key = f"routes[{i}]"
        table = _table(key, value)
        _known(key, table, fields)
        name = _name(f"{key}.name", table.get("name", f"route{i}"))
        if name in names:
            raise ConfigError(f"{key}.name", f"route {name!r} is defined twice")
        names.add(name)
        match = _string(f"{key}.match", table.get("match"))
        levels = check_pattern(f"{key}.match", match)
        captures = {m for lv in levels for m in _VAR.findall(lv)}
        topic = _string(f"{key}.topic", table.get("topic", "{prefix}/{device_id}/{rest}"))
        check_template(f"{key}.topic", topic, captures)
        qos = table.get("qos")
        if qos is not None and (isinstance(qos, bool) or qos not in (0, 1, 2)):
            raise ConfigError(f"{key}.qos", f"expected 0, 1 or 2, got {qos!r}")
        decode = _choice(f"{key}.decode", table.get("decode", "raw"), FORMATS)
        encode = _choice(f"{key}.encode", table.get("encode", "json" if decode != "raw" else "raw"),
                         ("json", "msgpack", "raw"))
        chain = table.get("transforms", [])
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise ConfigError(f"{key}.transforms", "expected a list of [transforms.*] names")
        for c in chain:
            if c not in chains:
                raise ConfigError(f"{key}.transforms", f"no [transforms.{c}] (known: {', '.join(sorted(chains))})")
        if chain and decode == "raw":
            raise ConfigError(f"{key}.decode", "transforms work on decoded payloads: set decode (json, cbor, msgpack)")
        cont = table.get("continue", False)
        if not isinstance(cont, bool):
            raise ConfigError(f"{key}.continue", f"expected true or false, got {cont!r}")
        routes.append(RouteSettings(name=name, match=match, topic=topic, qos=qos,
                                    priority=_priority(f"{key}.priority", table.get("priority", "telemetry")),
                                    decode=decode, encode=encode, transforms=tuple(chain), continue_=cont))
    return PipelineSettings(routes=tuple(routes), unmatched=unmatched,  # type: ignore[arg-type]
                            transforms=tuple(transforms), versions=tuple(versions), tenants=tenants,
                            quarantine=quarantine, base_dir=base_dir)
