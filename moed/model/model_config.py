"""Typed reads of config.json fields as published on the hub.

Every missing or mistyped field raises ConfigError naming the field, never a
bare KeyError.
"""
import math

from moed.errors import ConfigError

_MISSING = object()


class HFConfig:
    """config.json of one checkpoint with checked getters."""

    def __init__(self, raw, path="config.json"):
        self.raw = raw
        self.path = path

    def _bad(self, field, why):
        return ConfigError(f"{self.path}: field {field!r} {why}", field=field)

    def get(self, field, kind=None, default=_MISSING):
        value = self.raw.get(field, default)
        if value is _MISSING:
            raise self._bad(field, "is missing")
        if value is None or kind is None or value is default:
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, bool):
            raise self._bad(field, f"must be an integer, got {value!r}")
        if not isinstance(value, kind):
            raise self._bad(field, f"must be {kind.__name__}, got {value!r}")
        return value

    def positive(self, field, default=_MISSING):
        value = self.get(field, int, default)
        if value is not None and value <= 0:
            raise self._bad(field, f"must be > 0, got {value}")
        return value

    def rope(self, head_dim):
        """Rotary settings from `rope_theta` + `rope_scaling`, or `rope_parameters`."""
        params = self.raw.get("rope_parameters")
        if isinstance(params, dict):
            scaling = dict(params)
            theta = scaling.get("rope_theta", self.raw.get("rope_theta", 10000.0))
        else:
            scaling = dict(self.get("rope_scaling", dict, None) or {})
            theta = self.get("rope_theta", float, 10000.0)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "yarn", "linear"):
            raise self._bad("rope_scaling", f"rope type {kind!r} is not supported "
                                            "(default, linear, yarn)")
        if kind != "default" and not isinstance(scaling.get("factor"), (int, float)):
            raise self._bad("rope_scaling", f"rope type {kind!r} needs a numeric 'factor'")
        return RopeConfig(kind, float(theta), head_dim, scaling,
                          self.get("max_position_embeddings", int))


class RopeConfig:
    def __init__(self, kind, theta, dim, scaling, max_positions):
        self.kind = kind                # "default" | "linear" | "yarn"
        self.theta = theta
        self.dim = dim                  # rotary dimensions per head
        self.scaling = scaling          # the published dict (factor, beta_fast, ...)
        self.max_positions = max_positions

    @property
    def factor(self):
        return float(self.scaling.get("factor", 1.0))


def yarn_mscale(scale, mscale=1.0):
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
