"""Logits of every architecture, format and CPU path are bit for bit those saved in
tests/data/logits_snapshot.json on the machine they were saved on (one snapshot per
machine and torch build; tests/logits_snapshot.py says how they are made).
A change of shape must not move one bit; a change that means to move them rewrites
the file and says why in its commit."""
import pytest

import logits_snapshot as snap

@pytest.fixture(scope="module")
def same_machine():
    mine, there = snap.for_this_machine()
    if mine is None:
        pytest.skip(f"no snapshot from this machine and torch build ({snap.fingerprint()}; "
                    f"saved: {there}): torch's own ops may round differently elsewhere")
    return mine


@pytest.mark.parametrize("arch,fmt,load", snap.cases())
def test_logits_as_saved(arch, fmt, load, same_machine, tiny_model_dir):
    saved = same_machine["cases"][f"{arch}/{fmt}/{load}"]
    model = tiny_model_dir(arch, fmt) if arch == "deepseek_v3" else \
        tiny_model_dir(arch, fmt, max_position_embeddings=512)
    # paths a later change meant to move, whose logits this machine has not saved again
    # (snap.moved: {path: why}); every other path must hold
    moved = same_machine.get("moved", {})
    now = snap.case_hashes(model, load)
    missing = set(now) - set(saved) - set(moved)
    assert not missing, f"paths without saved logits: {sorted(missing)}"
    changed = {p: next(i for i, (a, b) in enumerate(zip(h, saved[p])) if a != b)
               for p, h in now.items() if p not in moved and h != saved[p]}
    assert not changed, f"{arch} {fmt} {load}: logits moved (path: first step) {changed}"
    assert len(set(now) - set(moved)) >= 2, f"only {sorted(now)} ran, {sorted(moved)} moved"
