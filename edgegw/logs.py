"""structlog set-up: one JSON object per line on stdout (journald and log shippers read it as is)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None, *,
                      rate_limit: int = 100, rate_interval: float = 10.0) -> None:
    """``rate_limit`` events of one name per ``rate_interval`` seconds at most (edgegw/ops/logsink.py)."""
    from edgegw.ops.logsink import RATE_LIMITER, RECENT_REFUSALS

    RATE_LIMITER.configure(rate_limit, rate_interval)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            RECENT_REFUSALS,  # remembers refusals for the status page, even those the limiter drops
            RATE_LIMITER,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries (paho, amqtt, asyncio) log through stdlib logging: keep their warnings, drop their chatter.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
