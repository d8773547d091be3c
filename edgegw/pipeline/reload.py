"""Hot reload of the config (SIGHUP, ``edgegw reload``, ``POST /api/reload``): ACLs, routes, transforms, versions,
tenants and limits, all or nothing.

Everything new is built first (config parsed and checked, every chain compiled, the registry read); any error
refuses the whole reload with ``config.reload_refused`` naming the key, and the running config stays. Only then is
it swapped in, with no await in between, so no message ever sees half of it: the ACL of the server and of every
live connection (sessions are kept), the pipeline, and the limiter's settings (``Limiter.replace``). Sections that
only a restart can apply (ports, outbox, uplink, TLS file paths) are compared and named in
``config.restart_required``; their running values stay.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from edgegw.config import Config, load_config
from edgegw.errors import ConfigError, EdgegwError
from edgegw.pipeline.engine import Pipeline
from edgegw.pipeline.poison import PoisonStore
from edgegw.policy.acl import ACL

log = structlog.get_logger("edgegw.pipeline")

_APPLIED = ("acl", "pipeline", "limits")
_RESTART = ("gateway", "tls", "mqtt", "outbox", "uplink", "registry", "log", "admin", "tracing", "coap")


def build_pipeline(config: Config, poison: PoisonStore | None = None) -> Pipeline | None:
    """The pipeline for ``config``, or None when it configures none (records stored as sent). ``poison``: where
    it keeps poison messages (None: refused; the CLI's replay raises instead)."""
    settings = config.pipeline
    if poison is not None:  # [quarantine] caps apply with or without a pipeline (replayed rows stay in the file)
        poison.max_rows = settings.quarantine.max_rows
        poison.max_bytes = settings.quarantine.max_bytes
    if not settings.enabled:
        return None
    pipeline = Pipeline(settings, topic_prefix=config.uplink.topic_prefix, registry_path=config.registry.path)
    pipeline.poison = poison
    return pipeline


def reload_config(gateway: Any, trigger: str) -> str | None:
    """Re-read ``gateway.config.source`` and apply what can be applied live. Returns None, or the error that
    refused it (logged)."""
    running: Config = gateway.config
    source: Path | None = running.source
    if source is None:
        return None  # built in code (tests, demo): nothing to re-read
    try:
        new = load_config(source)
        server = gateway.server
        old = server.pipeline if server is not None else None
        if old is not None and _same_pipeline(running, new):
            # Unchanged (e.g. the admin API's suspend reloads the registry through here): keep it, and with it
            # the deadband / downsample state.
            pipeline: Pipeline | None = old
        else:
            pipeline = build_pipeline(new, getattr(gateway, "poison", None))
        acl = ACL.from_settings(new.acl)
        limiter = getattr(gateway, "limiter", None)
        limits = getattr(new, "limits", None)
    except (ConfigError, EdgegwError) as exc:
        log.error("config.reload_refused", trigger=trigger, path=str(source), error=str(exc),
                  key=getattr(exc, "key", None))
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. a plug-in module that fails on import: refuse, keep running
        log.error("config.reload_refused", trigger=trigger, path=str(source), error=f"{type(exc).__name__}: {exc}")
        return f"{type(exc).__name__}: {exc}"
    # --- swap: synchronous from here on ------------------------------------------------------------------------
    if server is not None:
        server._acl = acl
        for proto in list(server._connections):
            if not proto.lab:
                proto.acl = acl  # a live session keeps going under the new rules (denied topics: denied from now)
        # Routing trusts what SUBSCRIBE accepted: subscriptions the new rules refuse end now, in live and in
        # persistent sessions alike (the lab listener's sessions are under no ACL).
        from edgegw.mqtt.server import LAB_PREFIX

        ended = server.broker.unsubscribe_disallowed(acl, keep=lambda key: key.startswith(LAB_PREFIX))
        if ended:
            log.info("config.subscriptions_ended", count=ended, reason="no longer allowed by acl.subscribe")
        if pipeline is not None and old is not None and pipeline is not old:
            pipeline.adopt_state(old)
        server.pipeline = pipeline
    coap = getattr(gateway, "coap", None)
    site = getattr(coap, "site", None)
    if site is not None and hasattr(site, "acl"):
        site.acl = acl
    poison = getattr(gateway, "poison", None)
    if poison is not None:
        poison.max_rows = new.pipeline.quarantine.max_rows
        poison.max_bytes = new.pipeline.quarantine.max_bytes
    if limiter is not None and limits is not None and hasattr(limiter, "replace"):
        limiter.replace(limits)
    restart = [name for name in _RESTART if getattr(new, name, None) != getattr(running, name, None)]
    # The running config object reflects what runs: applied sections from the new file, the others kept.
    gateway.config = _merge(running, new)
    log.info("config.reloaded", trigger=trigger, path=str(source), routes=len(new.pipeline.routes),
             transforms=len(new.pipeline.transforms), pipeline=pipeline is not None)
    if restart:
        log.warning("config.restart_required", sections=restart,
                    detail="changed sections that apply at the next start; the running values stay")
    return None


def _same_pipeline(running: Config, new: Config) -> bool:
    # [quarantine] caps alone do not rebuild the pipeline (that would forget deadband/downsample state).
    return (replace(new.pipeline, quarantine=running.pipeline.quarantine) == running.pipeline
            and new.registry.path == running.registry.path
            and new.uplink.topic_prefix == running.uplink.topic_prefix)


def _merge(running: Config, new: Config) -> Config:
    import dataclasses

    changes = {name: getattr(new, name) for name in _APPLIED if hasattr(new, name)}
    return dataclasses.replace(running, **changes)
