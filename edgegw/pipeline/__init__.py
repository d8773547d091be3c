"""The telemetry pipeline between the ACL and the outbox: tenants, version adapters, routes and transform chains,
poison-message quarantine (docs/POLICY.md). Off unless the config has ``[[routes]]``, ``[versions]``, ``[tenants]``
or ``[routing]``: then records are stored exactly as the device sent them.

Modules: ``settings`` (config), ``expr`` (the safe expression language), ``steps`` and ``units`` (transforms),
``routes`` (patterns, templates), ``tenants``, ``engine`` (:class:`~edgegw.pipeline.engine.Pipeline`, the hot
path), ``quarantine`` (the ``edgegw quarantine`` commands), ``control`` (pid file and ``edgegw reload``).
"""
