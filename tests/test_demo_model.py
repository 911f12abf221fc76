"""The built-in demo model speaks: sampled at temperature 0.8, at least 80% of the
words it writes occur in its training text (tools/train_demo.py writes their list)."""
from pathlib import Path

import pytest

from moed import LLM, SamplingParams
from moed.demo import DEMO_PROMPT, demo_model_dir, words

TRAINING_WORDS = Path(__file__).parent / "data" / "demo_words.txt"
PROMPTS = [DEMO_PROMPT, "Speak of love.", "What news from the court?"]


@pytest.fixture(scope="module")
def llm():
    return LLM(demo_model_dir(), device="cpu")


def test_the_demo_model_is_fp8_as_published(llm):
    assert llm.model_info["architecture"] == "Qwen3MoeForCausalLM"
    assert llm.model_info["weight_format"] == "fp8"
    assert sum(f.stat().st_size for f in demo_model_dir().iterdir()) < 8 << 20


def test_it_writes_words_of_its_training_text(llm):
    known = set(TRAINING_WORDS.read_text(encoding="utf-8").split())
    found = total = 0
    samples = []
    for seed, prompt in enumerate(PROMPTS * 3):          # its replies are a speech each
        out = llm.chat([{"role": "user", "content": prompt}],
                       SamplingParams(temperature=0.8, top_p=0.95, seed=seed, max_new_tokens=64))
        samples.append(out.text)
        ws = words(out.text)
        found += sum(w in known for w in ws)
        total += len(ws)
    assert total >= 50, samples
    assert found / total >= 0.8, (found, total, samples)
