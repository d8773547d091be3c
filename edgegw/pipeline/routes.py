"""Device topic patterns and upstream topic templates, compiled once.

A pattern is MQTT-like, level by level: a literal, ``+`` (any one level), ``#`` (the rest, last only),
``{device_id}`` / ``{tenant}`` (must equal the publishing device's id / tenant: a device cannot match a rule with
another device's or tenant's name) or ``{name}`` (any one level, captured for the template). A template is
literal text with ``{variables}``: the captures, ``{device_id}``, ``{tenant}``, ``{prefix}`` (the tenant's upstream
prefix) and ``{rest}`` (the levels ``#`` matched, joined by ``/``; without ``#``: the topic after
``devices/{device_id}/``, as the default mapping keeps it).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Matcher = Callable[[list[str], str, str], "dict[str, str] | None"]


def compile_pattern(levels: tuple[str, ...]) -> Matcher:
    """``match(parts, device_id, tenant)`` -> the captured variables (``rest`` included), or None."""
    hash_tail = bool(levels) and levels[-1] == "#"
    fixed = levels[:-1] if hash_tail else levels
    n = len(fixed)
    checks: list[tuple[int, str, str]] = []  # (index, kind, value): kind lit / dev / ten / cap
    for i, level in enumerate(fixed):
        m = _VAR.fullmatch(level)
        if level == "+":
            continue
        if m is None:
            checks.append((i, "lit", level))
        elif m.group(1) == "device_id":
            checks.append((i, "dev", ""))
        elif m.group(1) == "tenant":
            checks.append((i, "ten", ""))
        else:
            checks.append((i, "cap", m.group(1)))
    plan = tuple(checks)

    def match(parts: list[str], device_id: str, tenant: str) -> dict[str, str] | None:
        if len(parts) < n if hash_tail else len(parts) != n:
            return None
        found: dict[str, str] = {}
        for i, kind, value in plan:
            part = parts[i]
            if kind == "lit":
                if part != value:
                    return None
            elif kind == "dev":
                if part != device_id:
                    return None
            elif kind == "ten":
                if not tenant or part != tenant:
                    return None
            else:
                found[value] = part
        if hash_tail:
            found["rest"] = "/".join(parts[n:])
        return found
    return match


def compile_template(template: str) -> Callable[[dict[str, str]], str]:
    """``render(values)`` -> the topic; empty levels from an empty ``{rest}`` or prefix are squeezed out."""
    pieces: list[tuple[bool, str]] = []
    pos = 0
    for m in _VAR.finditer(template):
        if m.start() > pos:
            pieces.append((False, template[pos:m.start()]))
        pieces.append((True, m.group(1)))
        pos = m.end()
    if pos < len(template):
        pieces.append((False, template[pos:]))
    plan = tuple(pieces)
    if len(plan) == 1 and not plan[0][0]:
        literal = plan[0][1]
        return lambda values: literal

    def render(values: dict[str, str]) -> str:
        topic = "".join(values[v] if is_var else v for is_var, v in plan)
        if "//" in topic or topic.endswith("/") or topic.startswith("/"):
            topic = "/".join(level for level in topic.split("/") if level)
        return topic
    return render


ROUTED = "\x00"
"""First character of a record's stored topic when the pipeline already chose its full upstream topic.

MQTT forbids U+0000 in topic names (MQTT-1.5.3-2; the codec refuses it), so no device topic starts with it.
:func:`edgegw.uplink._wire.upstream_topic` sends such a record to ``topic[1:]`` as is, without the uplink prefix."""


def routed(upstream: str) -> str:
    return ROUTED + upstream
