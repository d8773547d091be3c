"""Message bodies from a template, compiled once: the hot path only joins strings.

Placeholders (anything else in braces, e.g. JSON's own ``{"a": 1}``, is literal text):

    {device_id}        the device id
    {seq}              1, 2, 3 ... per device, never reused (the sink's loss and duplicate check needs it)
    {ts}               unix time in seconds, 6 decimals        {ts_ms}  unix time in whole milliseconds
    {rand:LOW:HIGH}    a uniform float, 2 decimals             {randint:LOW:HIGH}  an integer, both ends included
    {choice:A|B|C}     one of the listed words

The cloud sink (:mod:`.sink`) understands JSON bodies with ``"device"``, ``"seq"`` and optionally ``"t"`` (unix
seconds, for the latency): keep those in a custom template when the delivery check matters.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from edgegw.errors import ConfigError
from edgegw.sim.device import Payload, default_payload

_PLACEHOLDER = re.compile(r"\{([a-z_]+)(?::([^{}]*))?\}")

_Part = Callable[[str, int, float], str]


def compile_payload(template: str | None, *, key: str = "telemetry.payload") -> Payload:
    """A :data:`~edgegw.sim.device.Payload` for ``template``; ConfigError naming ``key`` on a bad placeholder.
    None: the simulator's own ``{"device", "seq", "t", "temp"}`` JSON."""
    if template is None:
        return default_payload
    parts: list[str | _Part] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(template):
        if match.start() > pos:
            parts.append(template[pos:match.start()])
        parts.append(_field(match.group(1), match.group(2), key))
        pos = match.end()
    if pos < len(template):
        parts.append(template[pos:])
    if not any(callable(p) for p in parts):
        body = template.encode()
        return lambda device_id, seq, wall: body
    frozen = tuple(parts)

    def render(device_id: str, seq: int, wall: float) -> bytes:
        return "".join(p if isinstance(p, str) else p(device_id, seq, wall) for p in frozen).encode()

    return render


def _field(name: str, arg: str | None, key: str) -> _Part:
    if name == "device_id" and arg is None:
        return lambda d, s, w: d
    if name == "seq" and arg is None:
        return lambda d, s, w: str(s)
    if name == "ts" and arg is None:
        return lambda d, s, w: f"{w:.6f}"
    if name == "ts_ms" and arg is None:
        return lambda d, s, w: str(int(w * 1000))
    if name in ("rand", "randint"):
        low, high = _range(name, arg, key)
        if name == "rand":
            return lambda d, s, w: f"{random.uniform(low, high):.2f}"
        ilow, ihigh = int(low), int(high)
        if (ilow, ihigh) != (low, high):
            raise ConfigError(key, f"{{randint:{arg}}}: bounds must be integers")
        return lambda d, s, w: str(random.randint(ilow, ihigh))
    if name == "choice" and arg:
        words = tuple(arg.split("|"))
        return lambda d, s, w: random.choice(words)
    raise ConfigError(key, f"unknown placeholder {{{name}{':' + arg if arg is not None else ''}}} (known: "
                           "device_id, seq, ts, ts_ms, rand:LOW:HIGH, randint:LOW:HIGH, choice:A|B)")


def _range(name: str, arg: str | None, key: str) -> tuple[float, float]:
    try:
        low_s, high_s = (arg or "").split(":")
        low, high = float(low_s), float(high_s)
    except ValueError:
        raise ConfigError(key, f"{{{name}:{arg}}}: want {{{name}:LOW:HIGH}}") from None
    if low > high:
        raise ConfigError(key, f"{{{name}:{arg}}}: LOW is above HIGH")
    return low, high
