"""Unit conversion as one linear map per (from, to) pair, computed at config load: ``y = x * factor + offset``."""

from __future__ import annotations

from edgegw.errors import ConfigError

# unit -> (dimension, factor to the SI unit, offset to the SI unit): si = x * factor + offset
_UNITS: dict[str, tuple[str, float, float]] = {
    "degC": ("temperature", 1.0, 273.15), "degF": ("temperature", 5 / 9, 273.15 - 32 * 5 / 9),
    "K": ("temperature", 1.0, 0.0),
    "m": ("length", 1.0, 0.0), "cm": ("length", 0.01, 0.0), "mm": ("length", 0.001, 0.0),
    "km": ("length", 1000.0, 0.0), "in": ("length", 0.0254, 0.0), "ft": ("length", 0.3048, 0.0),
    "mi": ("length", 1609.344, 0.0),
    "Pa": ("pressure", 1.0, 0.0), "hPa": ("pressure", 100.0, 0.0), "kPa": ("pressure", 1000.0, 0.0),
    "bar": ("pressure", 1e5, 0.0), "mbar": ("pressure", 100.0, 0.0), "psi": ("pressure", 6894.757293168, 0.0),
    "m/s": ("speed", 1.0, 0.0), "km/h": ("speed", 1 / 3.6, 0.0), "mph": ("speed", 0.44704, 0.0),
    "kn": ("speed", 1852 / 3600, 0.0),
    "kg": ("mass", 1.0, 0.0), "g": ("mass", 0.001, 0.0), "lb": ("mass", 0.45359237, 0.0),
    "J": ("energy", 1.0, 0.0), "Wh": ("energy", 3600.0, 0.0), "kWh": ("energy", 3.6e6, 0.0),
    "W": ("power", 1.0, 0.0), "kW": ("power", 1000.0, 0.0),
    "V": ("voltage", 1.0, 0.0), "mV": ("voltage", 0.001, 0.0),
    "A": ("current", 1.0, 0.0), "mA": ("current", 0.001, 0.0),
    "s": ("time", 1.0, 0.0), "ms": ("time", 0.001, 0.0), "min": ("time", 60.0, 0.0), "h": ("time", 3600.0, 0.0),
    "%": ("ratio", 0.01, 0.0), "ratio": ("ratio", 1.0, 0.0),
}


def linear(key: str, source: str, target: str) -> tuple[float, float]:
    """(factor, offset) converting ``source`` to ``target``; ConfigError naming ``key`` for an unknown pair."""
    for unit in (source, target):
        if unit not in _UNITS:
            raise ConfigError(key, f"unknown unit {unit!r} (known: {', '.join(_UNITS)})")
    dim_a, fa, oa = _UNITS[source]
    dim_b, fb, ob = _UNITS[target]
    if dim_a != dim_b:
        raise ConfigError(key, f"cannot convert {dim_a} ({source}) to {dim_b} ({target})")
    # si = x*fa + oa; y = (si - ob) / fb
    return fa / fb, (oa - ob) / fb
