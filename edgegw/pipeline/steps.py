"""Transform steps: each ``[[transforms.NAME.steps]]`` table compiled once into a plain callable.

A step is ``step(data, ctx) -> data | DROP | Many``: it may change the record (usually a dict), drop it on purpose
(filter, deadband, downsample: acknowledged, counted, nothing stored) or split it into several records. It raises
:class:`StepError` for a record it cannot handle (the message is quarantined with that reason). Everything a step
needs from the config is bound in its closure: per message there is no config lookup and no logging.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import fastjsonschema
import msgpack

from edgegw.errors import ConfigError, EdgegwError
from edgegw.pipeline.expr import ExprError, compile_expr
from edgegw.pipeline.units import linear

MAX_STATE_DEVICES = 100_000
"""Deadband / downsample remember this many (device, topic) pairs per step; past it the least recently stored
one is forgotten (memory stays bounded; a forgotten pair's next message simply goes through)."""


class StepError(EdgegwError):
    """This record cannot go through the chain (bad payload, failed schema, expression error): quarantine it."""


class _Drop:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()
"""Returned by a step that drops the record on purpose."""


class Many(tuple):  # type: ignore[type-arg]
    """Returned by a step that turns one record into several (``split``, a plug-in returning a list)."""

    __slots__ = ()


@dataclass(slots=True)
class Context:
    """Who and where, for one message: what expressions, enrich and plug-ins see besides the payload."""

    device_id: str
    tenant: str
    topic: str
    received_at: float
    device: Mapping[str, Any]
    """The device's registry entry (``group``, ``tenant``, metadata keys such as ``site``, ``model``); {} if none."""
    staged: list[Staged] | None = None
    """Deadband/downsample memory changes of this message, applied by the engine only once its records are
    committed (a message whose commit fails must not count as "sent": the device resends it). None: at once."""

    def recall(self, state: dict[tuple[str, str], float], key: tuple[str, str]) -> float | None:
        """What ``state`` holds for ``key``, this message's own staged changes included (a split record's items)."""
        staged = self.staged
        if staged:
            for st, k, value in reversed(staged):
                if st is state and k == key:
                    return value
        return state.get(key)

    def remember(self, state: dict[tuple[str, str], float], key: tuple[str, str], value: float) -> None:
        if self.staged is None:
            keep(state, key, value)
        else:
            self.staged.append((state, key, value))


Staged = tuple[dict[tuple[str, str], float], tuple[str, str], float]


def keep(state: dict[tuple[str, str], float], key: tuple[str, str], value: float) -> None:
    """Store ``value`` for ``key``, forgetting the least recently stored key past :data:`MAX_STATE_DEVICES`."""
    state.pop(key, None)  # re-inserted last: dict order is then least recently stored first
    state[key] = value
    if len(state) > MAX_STATE_DEVICES:
        del state[next(iter(state))]


def apply_staged(staged: list[Staged]) -> None:
    for state, key, value in staged:
        keep(state, key, value)


Step = Callable[[Any, Context], Any]


class _Env(Mapping[str, Any]):
    """The names an expression sees: the record's fields, then ``device_id``, ``tenant``, ``topic``."""

    __slots__ = ("ctx", "data")

    def __init__(self, data: Any, ctx: Context) -> None:
        self.data = data if isinstance(data, Mapping) else {}
        self.ctx = ctx

    def __getitem__(self, key: str) -> Any:
        if key in self.data:
            return self.data[key]
        if key in ("device_id", "tenant", "topic", "received_at"):
            return getattr(self.ctx, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


# --- decode / encode ----------------------------------------------------------------------------------------------

def decoder(fmt: str) -> Callable[[bytes], Any]:
    if fmt == "raw":
        return lambda payload: payload
    loaders: dict[str, Callable[[bytes], Any]] = {
        "json": json.loads,
        "cbor": cbor2.loads,
        "msgpack": lambda b: msgpack.unpackb(b, raw=False),
    }
    loads = loaders[fmt]

    def decode(payload: bytes) -> Any:
        try:
            return loads(payload)
        except RecursionError:
            raise StepError(f"decode {fmt}: nested too deeply") from None
        except Exception as exc:  # noqa: BLE001 - each library raises its own kinds for a bad payload
            raise StepError(f"decode {fmt}: {exc}") from None
    return decode


def encoder(fmt: str) -> Callable[[Any], bytes]:
    if fmt == "raw":
        def raw(data: Any) -> bytes:
            if isinstance(data, bytes):
                return data
            if isinstance(data, str):
                return data.encode()
            raise StepError(f"encode raw: a {type(data).__name__} is not bytes (set encode = \"json\")")
        return raw
    if fmt == "json":
        dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

        def to_json(data: Any) -> bytes:
            try:
                return dumps(data).encode()
            except (TypeError, ValueError) as exc:
                raise StepError(f"encode json: {exc}") from None
        return to_json
    packer = msgpack.Packer(use_bin_type=True)

    def to_msgpack(data: Any) -> bytes:
        try:
            return packer.pack(data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise StepError(f"encode msgpack: {exc}") from None
    return to_msgpack


# --- the steps ----------------------------------------------------------------------------------------------------

def _fields_map(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(key, "expected a table of field = value")
    return value


def _fields_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, "expected a list of field names")
    return tuple(value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def _number(key: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")
    return float(value)


def _need_map(data: Any, op: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise StepError(f"{op}: the payload is a {type(data).__name__}, not a map (decode it first)")
    return data


def _number_of(data: dict[str, Any], name: str, op: str) -> float | int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StepError(f"{op}: field {name!r} is a {type(value).__name__}, not a number")
    return value


_OPS: dict[str, tuple[str, ...]] = {
    "rename": ("fields",), "drop": ("fields",), "set": ("fields",), "scale": ("field", "factor", "offset"),
    "convert": ("field", "from", "to"), "derive": ("field", "expr"), "filter": ("expr",),
    "deadband": ("field", "delta"), "downsample": ("interval",), "enrich": ("fields", "into"),
    "validate": ("schema", "schema_file"), "call": ("callable",), "split": ("field",),
}


def compile_step(key: str, spec: Mapping[str, Any], base_dir: Path) -> tuple[Step, bool]:
    """``spec`` is one step table; ``key`` its dotted name for errors. Returns (step, may_fan_out)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(key, "expected a table with an op")
    op = spec.get("op")
    if op not in _OPS:
        raise ConfigError(f"{key}.op", f"expected one of {', '.join(_OPS)}, got {op!r}")
    allowed = {"op", *_OPS[op]}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key for op {op!r} (known: {', '.join(sorted(allowed))})")

    def need(name: str) -> Any:
        if name not in spec:
            raise ConfigError(f"{key}.{name}", f"is required for op {op!r}")
        return spec[name]

    if op == "rename":
        renames = tuple((old, _str(f"{key}.fields.{old}", new))
                        for old, new in _fields_map(f"{key}.fields", need("fields")).items())

        def rename(data: Any, ctx: Context) -> Any:
            d = _need_map(data, "rename")
            for old, new in renames:
                if old in d:
                    d[new] = d.pop(old)
            return d
        return rename, False
    if op == "drop":
        names = _fields_list(f"{key}.fields", need("fields"))

        def drop(data: Any, ctx: Context) -> Any:
            d = _need_map(data, "drop")
            for name in names:
                d.pop(name, None)
            return d
        return drop, False
    if op == "set":
        constants = tuple(_fields_map(f"{key}.fields", need("fields")).items())

        def set_(data: Any, ctx: Context) -> Any:
            d = _need_map(data, "set")
            for name, value in constants:
                d[name] = value
            return d
        return set_, False
    if op in ("scale", "convert"):
        name = _str(f"{key}.field", need("field"))
        if op == "scale":
            factor = _number(f"{key}.factor", spec.get("factor", 1.0))
            offset = _number(f"{key}.offset", spec.get("offset", 0.0))
        else:
            factor, offset = linear(f"{key}.to", _str(f"{key}.from", need("from")), _str(f"{key}.to", need("to")))

        def linear_map(data: Any, ctx: Context) -> Any:
            d = _need_map(data, op)
            value = _number_of(d, name, op)
            if value is not None:
                d[name] = value * factor + offset
            return d
        return linear_map, False
    if op in ("derive", "filter"):
        try:
            expr = compile_expr(_str(f"{key}.expr", need("expr")))
        except ExprError as exc:
            raise ConfigError(f"{key}.expr", str(exc)) from None
        if op == "filter":
            def filter_(data: Any, ctx: Context) -> Any:
                try:
                    keep = expr(_Env(data, ctx))
                except RecursionError:
                    raise StepError("filter: expression too deep") from None
                return data if keep else DROP
            return _guard(filter_, "filter"), False
        target = _str(f"{key}.field", need("field"))

        def derive(data: Any, ctx: Context) -> Any:
            d = _need_map(data, "derive")
            d[target] = expr(_Env(d, ctx))
            return d
        return _guard(derive, "derive"), False
    if op == "deadband":
        name = _str(f"{key}.field", need("field"))
        delta = _number(f"{key}.delta", need("delta"))
        if delta < 0:
            raise ConfigError(f"{key}.delta", f"must be >= 0, got {delta}")
        last: dict[tuple[str, str], float] = {}  # (device, topic): one device's topics are separate signals

        def deadband(data: Any, ctx: Context) -> Any:
            value = _number_of(_need_map(data, "deadband"), name, "deadband")
            if value is None:
                return data  # nothing to compare: let it through
            key = (ctx.device_id, ctx.topic)
            previous = ctx.recall(last, key)
            if previous is not None and abs(value - previous) <= delta:
                return DROP
            ctx.remember(last, key, value)
            return data
        return deadband, False
    if op == "downsample":
        interval = _number(f"{key}.interval", need("interval"), positive=True)
        sent: dict[tuple[str, str], float] = {}

        def downsample(data: Any, ctx: Context) -> Any:
            key = (ctx.device_id, ctx.topic)
            previous = ctx.recall(sent, key)
            if previous is not None and 0 <= ctx.received_at - previous < interval:
                return DROP
            ctx.remember(sent, key, ctx.received_at)
            return data
        return downsample, False
    if op == "enrich":
        wanted = _fields_list(f"{key}.fields", spec.get("fields", ["site", "model", "tenant"]))
        into = spec.get("into", "")
        if not isinstance(into, str):
            raise ConfigError(f"{key}.into", f"expected a field name or \"\", got {into!r}")

        def enrich(data: Any, ctx: Context) -> Any:
            d = _need_map(data, "enrich")
            device = ctx.device
            target = d if not into else d.setdefault(into, {})
            if not isinstance(target, dict):
                raise StepError(f"enrich: field {into!r} is not a map")
            for name in wanted:
                value = ctx.tenant if name == "tenant" else ctx.device_id if name == "device_id" else device.get(name)
                if value is not None and value != "":
                    target[name] = value
            return d
        return enrich, False
    if op == "validate":
        return _validator(key, spec, base_dir), False
    if op == "call":
        return _plugin(f"{key}.callable", _str(f"{key}.callable", need("callable"))), True
    # split
    name = _str(f"{key}.field", need("field"))

    def split(data: Any, ctx: Context) -> Any:
        d = _need_map(data, "split")
        items = d.get(name)
        if not isinstance(items, list):
            raise StepError(f"split: field {name!r} is not a list")
        rest = {k: v for k, v in d.items() if k != name}
        return Many({**rest, **item} if isinstance(item, dict) else {**rest, name: item} for item in items)
    return split, True


def _guard(step: Step, op: str) -> Step:
    def guarded(data: Any, ctx: Context) -> Any:
        try:
            return step(data, ctx)
        except ExprError as exc:
            raise StepError(f"{op}: {exc}") from None
    return guarded


def _validator(key: str, spec: Mapping[str, Any], base_dir: Path) -> Step:
    if ("schema" in spec) == ("schema_file" in spec):
        raise ConfigError(f"{key}.schema", "give exactly one of schema (a table) or schema_file (a path)")
    if "schema" in spec:
        schema = spec["schema"]
        where = f"{key}.schema"
    else:
        where = f"{key}.schema_file"
        path = Path(_str(where, spec["schema_file"])).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(where, f"{path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ConfigError(where, "a JSON Schema is an object")
    try:
        check = fastjsonschema.compile(schema)  # once, at load: generated Python for this schema only
    except Exception as exc:  # noqa: BLE001 - fastjsonschema raises several kinds for a bad schema
        raise ConfigError(where, f"invalid JSON Schema: {exc}") from None

    def validate(data: Any, ctx: Context) -> Any:
        try:
            check(data)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise StepError(f"schema: {exc.message}") from None
        return data
    return validate


def _plugin(key: str, target: str) -> Step:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, f"expected \"module:function\", got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the import raised, the key is what to fix
        raise ConfigError(key, f"cannot import {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(key, f"{module_name!r} has no callable {attr!r}")

    def call(data: Any, ctx: Context) -> Any:
        try:
            result = fn(data, ctx)
        except StepError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plug-in's bug quarantines the message, never stops the gateway
            raise StepError(f"callable {target}: {type(exc).__name__}: {exc}") from None
        if result is None:
            return DROP
        if isinstance(result, list):
            return Many(result)
        return result
    return call
