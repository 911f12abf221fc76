"""Generation behaviour on a tiny model: seeds, stops, logprobs, chat, streaming."""
import pytest

from moed import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("qwen3_moe", "bf16"), device="cpu", experts="torch")


def test_same_seed_same_output_other_seed_differs(llm):
    p = lambda seed: SamplingParams(temperature=1.5, max_new_tokens=24, seed=seed, ignore_eos=True)  # noqa: E731
    a = llm.generate(["hello world"], p(3))[0].token_ids
    b = llm.generate(["hello world"], p(3))[0].token_ids
    c = llm.generate(["hello world"], p(4))[0].token_ids
    assert a == b and a != c


def test_seeded_output_does_not_depend_on_batch_neighbours(llm):
    p = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11, ignore_eos=True)
    alone = llm.generate(["the cat"], p)[0].token_ids
    together = llm.generate(["the cat", "a dog barks", "x"], p)[0].token_ids
    assert alone == together


def test_stop_string_ends_output_where_it_appears(llm):
    base = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    full = llm.generate(["once upon a time"], base)[0].text
    assert len(full) > 10
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    out = llm.generate(["once upon a time"],
                       SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True,
                                      stop=[stop]))[0]
    assert out.finish_reason == "stop_sequence"
    assert out.text == cut


def test_stop_token_ids_and_max_new_tokens(llm):
    base = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    full = llm.generate(["abc"], base)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    out = llm.generate(["abc"], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                                               stop_token_ids=[target]))[0]
    assert out.finish_reason == "stop_token"
    assert out.token_ids == full.token_ids[:first + 1]


def test_logprobs_are_log_probabilities(llm):
    out = llm.generate(["hi"], SamplingParams(temperature=0, max_new_tokens=4, logprobs=3,
                                              ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for tok, (tid, lp, top) in zip(out.token_ids, out.logprobs):
        assert tid == tok and lp <= 0
        assert len(top) == 3 and top[0][0] == tok          # greedy: the chosen is the top one
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_streamed_deltas_concatenate_to_the_text(llm):
    params = SamplingParams(temperature=0.7, seed=5, max_new_tokens=30, ignore_eos=True)
    streamed = "".join(llm.stream("tell me", params))
    assert streamed == llm.generate(["tell me"], params)[0].text
    assert "\ufffd" not in streamed


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "Hello!"}],
                   SamplingParams(temperature=0, max_new_tokens=8))
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}])
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert "Hello!" in text and 1 <= len(out.token_ids) <= 8


def test_eos_ends_generation_unless_ignored(llm):
    full = llm.generate(["abc"], SamplingParams(temperature=0, max_new_tokens=12,
                                                ignore_eos=True))[0]
    target = full.token_ids[4]
    first = full.token_ids.index(target)
    saved = llm.tokenizer.eos_token_ids
    llm.tokenizer.eos_token_ids = {target}     # pretend the model's EOS is that token
    try:
        out = llm.generate(["abc"], SamplingParams(temperature=0, max_new_tokens=12))[0]
        ignored = llm.generate(["abc"], SamplingParams(temperature=0, max_new_tokens=12,
                                                       ignore_eos=True))[0]
    finally:
        llm.tokenizer.eos_token_ids = saved
    assert out.finish_reason == "eos" and out.token_ids == full.token_ids[:first + 1]
    assert ignored.token_ids == full.token_ids


def test_small_steps_run_torch_on_one_thread_and_restore_it(llm):
    import torch

    from moed.engine import model_runner
    runner = llm.engine.runner
    seen = []
    run = runner.run

    def spy(chunks, *args, **kwargs):
        seen.append((sum(n for _, n in chunks), torch.get_num_threads()))
        return run(chunks, *args, **kwargs)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    runner.run = spy
    try:
        long_prompt = list(range(3, 3 + model_runner.SERIAL_TOKENS + 10))
        llm.generate([long_prompt], SamplingParams(temperature=0, max_new_tokens=3))
    finally:
        del runner.run
        after = torch.get_num_threads()
        torch.set_num_threads(before)
    assert after == 2                                   # restored after every step
    assert seen[0] == (len(long_prompt), 2)             # the prefill keeps its threads
    assert seen[1:] and all(s == (1, 1) for s in seen[1:])   # decode steps: one thread


def test_kimi_k2_generates_through_its_tiktoken_tokenizer(tiny_model_dir):
    """Kimi-K2 (FP8, as published) end to end: chat prompt, generation, streamed text."""
    llm = LLM(tiny_model_dir("kimi_k2", "fp8"), device="cpu", experts="torch")
    tok = llm.tokenizer
    prompt = "今天天气很好 🤖, tell me"
    assert tok.decode(tok.encode(prompt)) == prompt
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=24, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert len(out.token_ids) == 24 and out.text == tok.decode(out.token_ids)
    assert "".join(llm.stream(prompt, params)) == out.text
    chat = llm.chat([{"role": "user", "content": "你好"}],
                    SamplingParams(temperature=0, max_new_tokens=8))
    im_user, im_middle = tok.token_to_id("<|im_user|>"), tok.token_to_id("<|im_middle|>")
    assert im_user in chat.prompt_token_ids and chat.prompt_token_ids[-1] == im_middle
    assert 1 <= len(chat.token_ids) <= 8 and chat.text == tok.decode(chat.token_ids)
