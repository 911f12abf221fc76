"""Logits of every architecture, format and CPU path, fingerprinted: what a change of
shape must leave bit for bit as it was.

    python tests/logits_snapshot.py --write    # save this tree's fingerprints (one
                                               # entry per machine; others are kept)
    (tests/test_logits_snapshot.py compares a tree against the saved ones)

A change that means to move some path's logits writes this machine's snapshot anew
and, for the machines it cannot run on, names the path under "moved" in their
snapshot ({path: why}); the test then leaves that path out there until someone on
such a machine writes its snapshot again (--write drops "moved").

Each case runs the offline engine on three prompts (a batched prefill, then batched
decodes, and a chunked run beside decodes) and hashes the logits of every step. The
non-kernel parts are torch's ops, whose results may differ on another CPU or torch
build: the saved file records the machine it came from, and the test compares only
on a matching one.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

SNAPSHOT = Path(__file__).with_name("data") / "logits_snapshot.json"
ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe")
FORMATS = ("bf16", "fp8")
PROMPTS = ([5, 9, 17, 33, 60, 2, 11], list(range(3, 43)), [7] * 3 + list(range(100, 121)))
LOADS = {"batched": {}, "chunked": {"max_num_batched_tokens": 16, "max_num_seqs": 4}}


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fingerprint():
    """What the torch half of the logits depends on besides the code."""
    return {"cpu": cpu_model(), "torch": torch.__version__,
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def paths():
    """(name, engine kwargs, MOED_ISA) of every CPU path this machine runs."""
    try:
        from moed.backends.cpu.isa import supported_isas
    except ImportError:          # the tree before the backends moved
        from moed.cpu import supported_isas
    # the recorded fingerprints are of a float32 cache (the default before bfloat16)
    f32 = {"kv_cache_dtype": "float32"}
    out = [("torch", {"experts": "torch", **f32}, "")]
    for isa in supported_isas():
        out.append((f"{isa}", dict(f32), isa))
        if isa != "generic":
            out.append((f"{isa}-nondet", {"deterministic": False, **f32}, isa))
    out.append(("avx2-bf16kv", {"kv_cache_dtype": "bfloat16"}, "avx2")
               if "avx2" in supported_isas() else ("generic-bf16kv", {"kv_cache_dtype": "bfloat16"}, "generic"))
    return out


def step_hashes(model_dir, kwargs, isa, load):
    """sha256 of each step's logits (in step order) for the three prompts, greedy."""
    from moed import LLM, SamplingParams
    saved = os.environ.get("MOED_ISA")
    os.environ["MOED_ISA"] = isa       # for the whole run: a kernel may be looked up per call
    try:
        llm = LLM(model_dir, device="cpu", **kwargs, **LOADS[load])
        hashes, run = [], llm.engine.runner.run

        def recording(chunks, last_of=None):
            logits = run(chunks, last_of)
            if logits is not None:
                hashes.append(hashlib.sha256(logits.contiguous().numpy().tobytes())
                              .hexdigest()[:16])
            return logits
        llm.engine.runner.run = recording
        params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
        llm.generate([list(p) for p in PROMPTS], params)
    finally:
        if saved is None:
            os.environ.pop("MOED_ISA", None)
        else:
            os.environ["MOED_ISA"] = saved
    return hashes


def cases():
    return [(a, f, load) for a in ARCHS for f in FORMATS for load in LOADS]


def case_hashes(model_dir, load):
    """{path: [step hashes]} for one built model and load."""
    return {name: step_hashes(model_dir, kwargs, isa, load) for name, kwargs, isa in paths()}


def build(arch, fmt, out):
    try:
        from moed.testing.tiny import build_tiny_model
    except ImportError:          # the tree before the fixtures moved
        from moed.model.tiny import build_tiny_model
    return build_tiny_model(Path(out), arch, fmt,
                            overrides=None if arch == "deepseek_v3" else
                            {"max_position_embeddings": 512})


def saved():
    """The saved snapshots, one per machine fingerprint ([] when there is no file)."""
    if not SNAPSHOT.exists():
        return []
    doc = json.loads(SNAPSHOT.read_text())
    return doc["snapshots"] if "snapshots" in doc else [doc]


def for_this_machine():
    """(this machine's saved snapshot or None, the fingerprints saved)."""
    here, snaps = fingerprint(), saved()
    return next((s for s in snaps if s["fingerprint"] == here), None), \
        [s["fingerprint"] for s in snaps]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {SNAPSHOT}")
    args = ap.parse_args(argv)
    result = {"fingerprint": fingerprint(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MOED_CACHE_DIR"] = str(Path(tmp) / "cache")
        for arch, fmt, load in cases():
            model = Path(tmp) / f"{arch}-{fmt}"
            if not model.exists():
                build(arch, fmt, model)
            result["cases"][f"{arch}/{fmt}/{load}"] = case_hashes(model, load)
            print(arch, fmt, load, "done", file=sys.stderr)
    if args.write:
        others = [snap for snap in saved() if snap["fingerprint"] != result["fingerprint"]]
        doc = {"snapshots": others + [result]}
        SNAPSHOT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT} ({len(doc['snapshots'])} machines)")
    else:
        print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
