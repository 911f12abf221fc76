"""Logits of every architecture, format and CPU path are bit for bit those saved in
tests/data/logits_snapshot.json (tests/logits_snapshot.py says how they are made).
A change of shape must not move one bit; a change that means to move them rewrites
the file and says why in its commit."""
import json

import pytest

import logits_snapshot as snap

SAVED = json.loads(snap.SNAPSHOT.read_text())


@pytest.fixture(scope="module")
def same_machine():
    here, there = snap.fingerprint(), SAVED["fingerprint"]
    if here != there:
        pytest.skip(f"the snapshot comes from another machine or torch build ({there}; "
                    f"this one: {here}): torch's own ops may round differently there")


@pytest.mark.parametrize("arch,fmt,load", snap.cases())
def test_logits_as_saved(arch, fmt, load, same_machine, tiny_model_dir):
    saved = SAVED["cases"][f"{arch}/{fmt}/{load}"]
    model = tiny_model_dir(arch, fmt) if arch == "deepseek_v3" else \
        tiny_model_dir(arch, fmt, max_position_embeddings=512)
    now = snap.case_hashes(model, load)
    missing = set(now) - set(saved)
    assert not missing, f"paths without saved logits: {sorted(missing)}"
    changed = {p: next(i for i, (a, b) in enumerate(zip(h, saved[p])) if a != b)
               for p, h in now.items() if h != saved[p]}
    assert not changed, f"{arch} {fmt} {load}: logits moved (path: first step) {changed}"
