"""Session fixtures: tiny checkpoints built once per (arch, format, overrides)."""
import json

import pytest

from moed.model.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(arch, fmt, **overrides) -> Path of a built checkpoint.

    Each distinct (arch, fmt, overrides) is built once per session; treat the
    directory as read-only (copy it to break it)."""
    built = {}

    def get(arch, fmt="bf16", **overrides):
        key = (arch, fmt, json.dumps(overrides, sort_keys=True))
        if key not in built:
            out = tmp_path_factory.mktemp(f"{arch}-{fmt}")
            built[key] = build_tiny_model(out, arch, fmt, overrides=overrides or None)
        return built[key]
    return get
