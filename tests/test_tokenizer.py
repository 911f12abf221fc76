"""The checkpoint tokenizer: round trips, special tokens, chat templates,
streaming detokenization, and errors that name the file at fault."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from moed.errors import CheckpointError, InvalidRequestError
from moed.model.tokenizer import IncrementalDetokenizer, NoTokenizer, Tokenizer

ARCHS = ["deepseek_v3", "qwen3_moe", "mixtral", "qwen2_moe"]
TEXTS = {
    "ascii": "The quick brown fox, 42 times: def f(x): return x * 2",
    "accents": "Le café déjà ouvert; Straße, Übung, jalapeño, São Paulo, Kraków.",
    "cjk": "今天天气很好，我们去公园散步吧。こんにちは、元気ですか。안녕하세요",
    "emoji": "robot 🤖 waves at 🐱 🎉👍❤️ and 🚀🌍",
    "unseen": "Ωμέγα ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 🦀\u200d\t\n  spaces  ",
}
CONVERSATION = [{"role": "user", "content": "Héllo 世界 🤖!"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Again"}]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    return {arch: Tokenizer.from_dir(tiny_model_dir(arch, "bf16")) for arch in ARCHS}


def copy_of(tiny_model_dir, tmp_path, arch):
    """A checkpoint of one's own to break."""
    return Path(shutil.copytree(tiny_model_dir(arch, "bf16"), tmp_path / arch))


@pytest.fixture
def tok_copy(tiny_model_dir, tmp_path):
    return copy_of(tiny_model_dir, tmp_path, "qwen3_moe")


def edit_json(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", sorted(TEXTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(tokenizers, arch, kind):
    tok, text = tokenizers[arch], TEXTS[kind]
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text          # BOS is skipped on decode


def test_bpe_merges_multibyte_characters(tokenizers):
    """The corpus has accents and CJK, so merges exist that span a character's bytes."""
    tok = tokenizers["qwen3_moe"]
    assert len(tok.encode("déjà", add_special_tokens=False)) < len("déjà".encode())
    assert len(tok.encode("天气", add_special_tokens=False)) < len("天气".encode())


@pytest.mark.parametrize("arch,bos,eos", [
    ("deepseek_v3", "<｜begin▁of▁sentence｜>", {"<｜end▁of▁sentence｜>"}),
    ("mixtral", "<s>", {"</s>"}),
    ("qwen3_moe", None, {"<|im_end|>", "<|endoftext|>"}),
    ("qwen2_moe", None, {"<|im_end|>", "<|endoftext|>"}),
])
def test_special_tokens_as_published(tokenizers, arch, bos, eos):
    tok = tokenizers[arch]
    assert tok.bos_token_id == tok.token_to_id(bos)
    assert tok.eos_token_ids == {tok.token_to_id(t) for t in eos}
    ids = tok.encode("hello")
    if bos is None:                                       # Qwen adds no BOS
        assert ids == tok.encode("hello", add_special_tokens=False)
    else:
        assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode("hello", False)
    if arch in ("deepseek_v3", "mixtral"):                # specials first, as published
        assert tok.bos_token_id < 3 and min(tok.eos_token_ids) < 3
    else:                                                 # Qwen appends them to the BPE vocab
        assert min(tok.eos_token_ids) >= tok.vocab_size - 5


def test_special_tokens_in_text_are_single_ids(tokenizers):
    tok = tokenizers["qwen3_moe"]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


@pytest.mark.parametrize("arch", ARCHS)
def test_agrees_with_transformers(tiny_model_dir, tokenizers, arch):
    """transformers reads the same files the same way (ids and chat text)."""
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(tiny_model_dir(arch, "bf16")))
    tok = tokenizers[arch]
    for text in TEXTS.values():
        assert tok.encode(text) == ref(text).input_ids
    ours = tok.apply_chat_template(CONVERSATION)
    assert ours == ref.apply_chat_template(CONVERSATION, tokenize=False,
                                           add_generation_prompt=True)


def test_bos_token_as_added_token_dict(tok_copy):
    """Published configs often spell special tokens as AddedToken objects."""
    def spell_as_dicts(cfg):
        cfg["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>",
                            "lstrip": False, "rstrip": False, "normalized": True}
        cfg["eos_token"] = {"content": "<|im_end|>", "special": True}
        cfg["add_bos_token"] = True
    edit_json(tok_copy / "tokenizer_config.json", spell_as_dicts)
    tok = Tokenizer.from_dir(tok_copy)
    assert tok.bos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids
    assert tok.encode("hi")[0] == tok.bos_token_id


def test_eos_from_generation_config_int_or_list(tok_copy):
    im_end = Tokenizer.from_dir(tok_copy).token_to_id("<|im_end|>")
    edit_json(tok_copy / "generation_config.json", lambda g: g.update(eos_token_id=7))
    assert Tokenizer.from_dir(tok_copy).eos_token_ids == {7, im_end}
    edit_json(tok_copy / "generation_config.json", lambda g: g.update(eos_token_id=[8, 9]))
    assert Tokenizer.from_dir(tok_copy).eos_token_ids == {8, 9, im_end}


# ---------------------------------------------------------------- streaming

def stream(tok, ids, prompt_ids=None):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_streaming_deltas_concatenate_to_decode(tokenizers, kind):
    tok = tokenizers["deepseek_v3"]
    ids = tok.encode(TEXTS[kind], add_special_tokens=False)
    deltas, tail = stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == TEXTS[kind]
    assert tail == "" and not any("\ufffd" in d for d in deltas)


def test_streaming_holds_back_a_split_character(tokenizers):
    tok = tokenizers["qwen3_moe"]
    ids = tok.encode("🤖 ok", add_special_tokens=False)
    # the 4-byte emoji is not one token: its first piece alone decodes to U+FFFD
    assert "\ufffd" in tok.decode(ids[:1])
    detok = IncrementalDetokenizer(tok)
    first = detok.push(ids[0])
    assert first == ""                                    # held back, not broken
    rest = [detok.push(i) for i in ids[1:]]
    assert "🤖" in "".join(rest) and first + "".join(rest) + detok.flush() == "🤖 ok"


def test_streaming_byte_tokens_one_at_a_time(tokenizers):
    """Every byte its own token: each multi-byte character arrives in 2..4 pieces."""
    tok = tokenizers["mixtral"]
    text = "é世🤖a"
    byte_ids = [tok.token_to_id(ch) for ch in bytes_as_tokens(text)]
    assert None not in byte_ids and tok.decode(byte_ids) == text
    deltas, tail = stream(tok, byte_ids)
    assert [d for d in deltas if d] == ["é", "世", "🤖", "a"] and tail == ""


def bytes_as_tokens(text):
    """The byte-level alphabet spelling of each UTF-8 byte (GPT-2's byte map)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in text.encode()]


def test_streaming_random_ids_match_decode(tokenizers):
    """Any id sequence (invalid UTF-8 included): deltas still add up to decode()."""
    tok = tokenizers["qwen2_moe"]
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ids = torch.randint(0, tok.vocab_size, (40,), generator=g).tolist()
        deltas, tail = stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids), trial
        # U+FFFD reaches a delta only where decode() of everything has it
        assert sum(d.count("\ufffd") for d in deltas) <= tok.decode(ids).count("\ufffd")


def test_streaming_with_prompt_context(tokenizers):
    tok = tokenizers["deepseek_v3"]
    prompt = tok.encode("Tell me about the café")
    out = tok.encode(" déjà vu 🙂 in 東京", add_special_tokens=False)
    deltas, tail = stream(tok, out, prompt)
    assert "".join(deltas) + tail == tok.decode(out)


def test_streaming_skips_special_tokens(tokenizers):
    tok = tokenizers["qwen3_moe"]
    ids = tok.encode("hi<|im_end|> there", add_special_tokens=False)
    deltas, tail = stream(tok, ids)
    assert "".join(deltas) + tail == "hi there"


# ---------------------------------------------------------------- chat templates

def test_chat_templates_render(tokenizers):
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizers["deepseek_v3"].apply_chat_template(sys_user) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>")
    assert tokenizers["qwen3_moe"].apply_chat_template(sys_user) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tokenizers["qwen3_moe"].apply_chat_template(sys_user[1:], enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tokenizers["qwen2_moe"].apply_chat_template(sys_user[1:]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert tokenizers["mixtral"].apply_chat_template(CONVERSATION) == (
        "<s>[INST] Héllo 世界 🤖! [/INST]Hi.</s>[INST] Again [/INST]")
    assert tokenizers["qwen3_moe"].apply_chat_template(sys_user[1:], False) == (
        "<|im_start|>user\nHi<|im_end|>\n")


def test_chat_prompt_encodes_to_single_special_ids(tokenizers):
    tok = tokenizers["deepseek_v3"]
    ids = tok.encode(tok.apply_chat_template(CONVERSATION), add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.token_to_id("<｜Assistant｜>")


def test_template_raise_exception_is_a_bad_request(tokenizers):
    with pytest.raises(InvalidRequestError, match="alternate") as e:
        tokenizers["mixtral"].apply_chat_template([{"role": "assistant", "content": "x"}])
    assert e.value.field == "messages"


@pytest.mark.parametrize("bad", ["hello", [{"content": "no role"}], [["user", "hi"]]])
def test_malformed_messages_name_the_field(tokenizers, bad):
    with pytest.raises(InvalidRequestError) as e:
        tokenizers["qwen3_moe"].apply_chat_template(bad)
    assert e.value.field.startswith("messages")


def test_named_template_list_and_jinja_file(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c.update(chat_template=[
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ messages[0]['content'] }}"}]))
    tok = Tokenizer.from_dir(tok_copy)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "Dx"
    assert tok.apply_chat_template(msgs, template_name="tool_use") == "Tx"
    with pytest.raises(InvalidRequestError, match="nope"):
        tok.apply_chat_template(msgs, template_name="nope")
    (tok_copy / "chat_template.jinja").write_text("J{{ bos_token }}{{ eos_token }}")
    assert Tokenizer.from_dir(tok_copy).apply_chat_template(msgs) == "JNone<|im_end|>"


def test_templates_get_the_usual_globals(tok_copy):
    template = ("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
                "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                "{{ m.content }}{% endfor %}")
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    msgs = [{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]
    assert Tokenizer.from_dir(tok_copy).apply_chat_template(msgs) == (
        '[{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]|4b')


def test_template_cannot_escape_the_sandbox(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json",
              lambda c: c.update(chat_template="{% set _ = messages.append(1) %}x"))
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tok_copy).apply_chat_template([{"role": "user", "content": "x"}])


def test_broken_or_missing_template_names_the_file(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c.update(chat_template="{% if %}"))
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tok_copy).apply_chat_template([{"role": "user", "content": "x"}])
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    with pytest.raises(CheckpointError, match="chat template") as e:
        Tokenizer.from_dir(tok_copy).apply_chat_template([{"role": "user", "content": "x"}])
    assert e.value.path.endswith("tokenizer_config.json")


# ---------------------------------------------------------------- errors

def test_without_tokenizer_files_token_ids_only(tok_copy):
    """A checkpoint without tokenizer files loads; text needs a tokenizer and says so."""
    (tok_copy / "tokenizer.json").unlink()
    tok = Tokenizer.from_dir(tok_copy)
    assert not tok.has_text
    eos = json.loads((tok_copy / "config.json").read_text()).get("eos_token_id")
    assert tok.eos_token_ids == ({eos} if isinstance(eos, int) else set(eos or ()))
    assert tok.decode([1, 2, 3]) == ""
    with pytest.raises(NoTokenizer, match="tokenizer.json") as e:
        tok.encode("hello")
    assert e.value.path == str(tok_copy)
    with pytest.raises(NoTokenizer, match="chat prompt"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_corrupt_tokenizer_json_names_the_file(tok_copy):
    (tok_copy / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tok_copy)


def test_unreadable_tokenizer_config_names_the_file(tok_copy):
    (tok_copy / "tokenizer_config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tok_copy)


def test_non_string_prompt_is_a_bad_request(tokenizers):
    with pytest.raises(InvalidRequestError) as e:
        tokenizers["qwen3_moe"].encode([1, 2, 3])
    assert e.value.field == "prompt"


# ---------------------------------------------------------------- tiktoken.model (Kimi-K2)

@pytest.fixture(scope="module")
def kimi(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir("kimi_k2", "bf16"))


@pytest.fixture(scope="module")
def kimi_reference():
    """The tiny Kimi BPE as a `tokenizers` tokenizer: same vocabulary, merges, split."""
    from moed.testing.tiny import TOKENIZER_VOCAB, TOKENIZERS, train_tokenizer
    return train_tokenizer(TOKENIZERS["kimi_k2"], TOKENIZER_VOCAB)


@pytest.fixture
def kimi_copy(tiny_model_dir, tmp_path):
    return copy_of(tiny_model_dir, tmp_path, "kimi_k2")


def test_kimi_checkpoint_has_no_tokenizer_json(kimi, tiny_model_dir):
    from moed.model.tiktoken_bpe import TiktokenBPE
    d = tiny_model_dir("kimi_k2", "bf16")
    assert (d / "tiktoken.model").is_file() and not (d / "tokenizer.json").exists()
    assert isinstance(kimi.backend, TiktokenBPE)


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_kimi_round_trip(kimi, kind):
    text = TEXTS[kind]
    ids = kimi.encode(text)
    assert ids and all(0 <= i < kimi.vocab_size for i in ids)
    assert kimi.decode(ids) == text


def test_kimi_agrees_with_tokenizers_on_the_same_vocabulary(kimi, kimi_reference):
    """tiktoken merges the lowest-ranked pair, tokenizers the earliest-learned merge:
    the same thing when ranks are the merge order, so every id must agree."""
    from moed.testing.tiny import CORPUS
    texts = (list(TEXTS.values()) + CORPUS.read_text(encoding="utf-8").splitlines(True)
             + ["don't STOP'S Ǆemo 12345 \n\n\t x  \r\n", "<|im_user|>user<|im_middle|>世界"])
    assert kimi.vocab_size == kimi_reference.get_vocab_size()
    for text in texts:
        ids = kimi.encode(text, add_special_tokens=False)
        assert ids == kimi_reference.encode(text, add_special_tokens=False).ids, text
        assert kimi.decode(ids, False) == kimi_reference.decode(ids, skip_special_tokens=False)
    for i in range(kimi.vocab_size):
        token = kimi_reference.id_to_token(i)
        assert kimi.token_to_id(token) == i, (i, token)


def test_kimi_special_tokens(kimi):
    assert kimi.bos_token_id == kimi.token_to_id("[BOS]") == kimi.backend.num_ranks
    assert kimi.eos_token_ids == {kimi.token_to_id("[EOS]"), kimi.token_to_id("<|im_end|>")}
    assert kimi.add_bos is None and kimi.encode("hi") == kimi.encode("hi", False)  # no BOS
    assert kimi.token_to_id("[PAD]") == kimi.vocab_size - 1
    reserved = kimi.backend.num_ranks + 5
    assert kimi.token_to_id(f"<|reserved_token_{reserved}|>") == reserved


def test_kimi_chat_markers_are_single_ids(kimi):
    text = kimi.apply_chat_template(CONVERSATION)
    assert text.startswith("<|im_system|>system<|im_middle|>")
    assert text.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
    ids = kimi.encode(text)
    for marker, count in [("<|im_system|>", 1), ("<|im_user|>", 2), ("<|im_assistant|>", 2),
                          ("<|im_middle|>", 5), ("<|im_end|>", 4)]:
        assert ids.count(kimi.token_to_id(marker)) == count, marker
    assert kimi.decode(ids, skip_special_tokens=False) == text
    plain = kimi.decode(ids)
    assert "<|" not in plain and "Héllo 世界 🤖!" in plain


@pytest.mark.parametrize("kind", ["cjk", "emoji", "unseen", "accents"])
def test_kimi_streaming_multibyte(kimi, kind):
    ids = kimi.encode(TEXTS[kind])
    deltas, tail = stream(kimi, ids)
    assert "".join(deltas) + tail == TEXTS[kind] and tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_kimi_streaming_byte_tokens_one_at_a_time(kimi):
    text = "é世🤖a"
    byte_ids = [kimi.token_to_id(ch) for ch in bytes_as_tokens(text)]
    assert None not in byte_ids
    assert all(len(kimi.backend.encoding.decode_single_token_bytes(i)) == 1 for i in byte_ids)
    deltas, tail = stream(kimi, byte_ids)
    assert [d for d in deltas if d] == ["é", "世", "🤖", "a"] and tail == ""


def test_kimi_streaming_random_ids_match_decode(kimi):
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        ids = torch.randint(0, kimi.vocab_size + 8, (40,), generator=g).tolist()  # some unknown
        deltas, tail = stream(kimi, ids)
        assert "".join(deltas) + tail == kimi.decode(ids), trial


def test_kimi_long_runs_are_cut_but_round_trip(kimi, monkeypatch):
    from moed.model import tiktoken_bpe
    monkeypatch.setattr(tiktoken_bpe, "MAX_RUN_CHARS", 7)
    monkeypatch.setattr(tiktoken_bpe, "MAX_PIECE_CHARS", 20)
    text = "a" * 30 + " " * 16 + "世界" * 9 + "\n" + "x y " * 6
    pieces = list(tiktoken_bpe.pieces(text))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 20
    assert all(len(run) <= 7 for p in pieces for run in re.findall(r"\s+|\S+", p))
    assert kimi.decode(kimi.encode(text)) == text


def test_tokenizer_json_wins_over_tiktoken_model(kimi_copy, tiny_model_dir):
    shutil.copy(tiny_model_dir("qwen3_moe", "bf16") / "tokenizer.json", kimi_copy)
    tok = Tokenizer.from_dir(kimi_copy)
    assert type(tok.backend).__module__.startswith("tokenizers")


def test_kimi_reserved_ids_the_config_leaves_out(kimi_copy, kimi):
    """Only the named tokens listed: the ids between them are still reserved."""
    edit_json(kimi_copy / "tokenizer_config.json", lambda c: c.update(added_tokens_decoder={
        k: v for k, v in c["added_tokens_decoder"].items()
        if not v["content"].startswith("<|reserved_token_")}))
    tok = Tokenizer.from_dir(kimi_copy)
    assert tok.vocab_size == kimi.vocab_size
    text = kimi.apply_chat_template(CONVERSATION)
    assert tok.encode(text) == kimi.encode(text)


def write_ranks(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def base64_bytes():
    import base64
    return [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]


@pytest.mark.parametrize("lines,why", [
    (["not-a-line"], "base64-token rank"),
    (["aGk= x"], "base64-token rank"),
    (["!!!! 0"], "not base64"),
    (base64_bytes() + ["aGk= 300"], "no rank 256"),
    (base64_bytes() + ["AA== 256"], "listed twice"),
    (["aGk= 0"] + base64_bytes()[1:], "single bytes"),      # b"hi" where b"\x00" was
])
def test_malformed_tiktoken_model_names_the_file(kimi_copy, lines, why):
    write_ranks(kimi_copy / "tiktoken.model", lines)
    with pytest.raises(CheckpointError, match=why) as e:
        Tokenizer.from_dir(kimi_copy)
    assert e.value.path.endswith("tiktoken.model")


def test_binary_tiktoken_model_is_a_checkpoint_error(kimi_copy):
    (kimi_copy / "tiktoken.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        Tokenizer.from_dir(kimi_copy)


def test_added_token_inside_the_ranks_names_the_config(kimi_copy):
    edit_json(kimi_copy / "tokenizer_config.json",
              lambda c: c["added_tokens_decoder"].update({"3": {"content": "<|x|>"}}))
    with pytest.raises(CheckpointError, match="inside the BPE ranks") as e:
        Tokenizer.from_dir(kimi_copy)
    assert e.value.path.endswith("tokenizer_config.json")


def test_neither_tokenizer_file_token_ids_only_names_both(kimi_copy):
    from moed.model.tokenizer import has_tokenizer
    assert has_tokenizer(kimi_copy)
    (kimi_copy / "tiktoken.model").unlink()
    assert not has_tokenizer(kimi_copy)
    with pytest.raises(NoTokenizer, match="tokenizer.json nor tiktoken.model"):
        Tokenizer.from_dir(kimi_copy).encode("hello")


def test_kimi_tokenizer_worker_processes(tiny_model_dir, kimi):
    """The daemon's tokenizer workers load tiktoken.model too (not the thread fallback)."""
    import asyncio
    from moed.server.tokenizer_pool import TokenizerPool
    pool = TokenizerPool(tiny_model_dir("kimi_k2", "bf16"), 1, lambda: kimi)
    pool.start()
    try:
        ids = asyncio.run(pool.encode_chat(CONVERSATION))
    finally:
        pool.shutdown()
    assert pool.kind == "processes"
    assert list(ids) == kimi.encode(kimi.apply_chat_template(CONVERSATION))
