"""Which event loop a process of ours runs on: uvloop or the standard library's asyncio loop.

Why uvloop: the gateway is bound by its one event-loop thread (docs/BENCHMARKS.md). uvloop runs the loop's own
machinery (epoll, handles, timers, transports) and asyncio-style TLS in C on libuv, which takes CPU per message off
the gateway (docs/OPERATIONS.md "Event loop" has the figures). It is an optional speed-up, not a requirement: it
has no wheel for 32-bit ARM (a Raspberry Pi on armv7l) nor Windows, and every part of edgegw also runs, and stays
tested, on the standard loop.

``gateway.event_loop`` (and ``--event-loop`` of ``edgegw demo`` and ``edgegw-sim``) chooses: ``asyncio`` (the
default while CoAP over TLS, the lab listener and the simulator's devices do not work under uvloop), ``uvloop`` (an
error naming the key where it is not installed) or ``auto`` (uvloop when it can be imported). The choice is made
before the loop exists, so it is read at start only; a reload cannot switch loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from edgegw.errors import ConfigError

CHOICES = ("auto", "uvloop", "asyncio")
"""The values of ``gateway.event_loop`` (config.py spells them as a Literal: keep both alike)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EventLoop:
    """A resolved choice: what will run, and how to make it."""

    name: Literal["uvloop", "asyncio"]
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    """None: asyncio's own (``asyncio.Runner``'s default, which also sets it as the thread's current loop)."""


STANDARD = EventLoop("asyncio", None)


def choose(choice: str, *, key: str = "gateway.event_loop") -> EventLoop:
    """Resolve ``choice``; ``key`` names the setting in the error (a config key or a command-line flag)."""
    if choice not in CHOICES:
        raise ConfigError(key, f"expected one of {', '.join(map(repr, CHOICES))}, got {choice!r}")
    if choice == "asyncio":
        return STANDARD
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise ConfigError(key, f"'uvloop' is not installed here ({exc}); it has wheels for 64-bit Linux "
                                   "(x86_64, aarch64) and macOS: `pip install uvloop==0.23.0`, or choose 'auto' "
                                   "or 'asyncio'") from None
        return STANDARD  # auto: the standard loop; the start event says which one runs
    return EventLoop("uvloop", uvloop.new_event_loop)


def run(main: Coroutine[Any, Any, T], loop: EventLoop) -> T:
    """``asyncio.run(main)`` on the chosen loop (Python 3.11's ``asyncio.run`` takes no loop factory; its Runner
    does, and is what ``uvloop.run`` uses too: same shutdown of async generators and of the default executor)."""
    with asyncio.Runner(loop_factory=loop.factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """"uvloop" or "asyncio": what actually runs this coroutine (for the start event and the status page)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
