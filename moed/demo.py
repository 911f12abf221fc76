"""The built-in demo model: a tiny random Qwen3-MoE FP8 checkpoint built once,
deterministically, into the cache directory. `python -m moed.demo` streams a
generation from it with the offline API."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEMO_ARCH, DEMO_FORMAT, DEMO_SEED, DEMO_VERSION = "qwen3_moe", "fp8", 0, 2


def cache_dir():
    return Path(os.environ.get("MOED_CACHE_DIR") or Path.home() / ".cache" / "moed")


def demo_model_dir():
    """Path of the demo checkpoint, building it on first use (atomic: a crash mid-way
    leaves no half-written model behind)."""
    from moed.testing.tiny import build_tiny_model
    target = cache_dir() / f"demo-{DEMO_ARCH}-{DEMO_FORMAT}-v{DEMO_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        build_tiny_model(tmp, arch=DEMO_ARCH, fmt=DEMO_FORMAT, seed=DEMO_SEED)
        try:
            tmp.rename(target)
        except OSError:          # another process built it first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main():
    from moed import LLM, SamplingParams
    model_dir = demo_model_dir()
    llm = LLM(model_dir, device="auto")
    info = llm.model_info
    print(f"moed demo: {info['architecture']} ({info['weight_format']}) from {model_dir}, "
          f"device {info['device']}, experts {info['experts']}, isa {info['isa']}", file=sys.stderr)
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story about a small robot."}])
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_new_tokens=64)
    for delta in llm.stream(ids, params):
        print(delta, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
