"""Session fixtures: tiny checkpoints built once per (arch, format, overrides)."""
import json
import os

import pytest

from moed.testing.tiny import build_tiny_model


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Packed expert stores and demo models go to a per-session directory, never ~/.cache:
    a test run neither depends on nor leaves behind state from another run."""
    saved = os.environ.get("MOED_CACHE_DIR")
    os.environ["MOED_CACHE_DIR"] = str(tmp_path_factory.mktemp("moed-cache"))
    yield
    if saved is None:
        os.environ.pop("MOED_CACHE_DIR", None)
    else:
        os.environ["MOED_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(arch, fmt, int4=None, **overrides) -> Path of a built
    checkpoint (int4: the INT4 formats' options, moed.testing.tiny.Int4Options).

    Each distinct (arch, fmt, overrides) is built once per session; treat the
    directory as read-only (copy it to break it)."""
    built = {}

    def get(arch, fmt="bf16", int4=None, **overrides):
        key = (arch, fmt, json.dumps(int4, sort_keys=True), json.dumps(overrides, sort_keys=True))
        if key not in built:
            out = tmp_path_factory.mktemp(f"{arch}-{fmt}")
            built[key] = build_tiny_model(out, arch, fmt, overrides=overrides or None, int4=int4)
        return built[key]
    return get
