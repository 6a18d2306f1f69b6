#!/usr/bin/env python3
"""The embedded IAPT demo: a tiny Llama base model and an IAPT adapter that really learned a task.

Stages (all CPU, all seeded; `all` runs them in order):
    corpus     synthetic instruction corpus (6 base task families + 1 adapter task), held-out set
    tokenizer  SentencePiece BPE (byte_fallback, identity normalisation) trained on that corpus
    base       LlamaForCausalLM from scratch on the base families (the adapter task is never shown)
    adapter    freeze the base, train an IAPT adapter (4 soft tokens per layer, rational variant B)
    eval       greedy exact-match accuracy in PyTorch: base without adapter, base with adapter (f32)
    export     HF save_pretrained + tokenizer, llama.cpp's convert_hf_to_gguf.py to F16 GGUF,
               adapter_model.bin (torch.save) + adapter_config.json, demo prompts, RESULTS.md

Usage (see README.md for the exact commands and timings):
    nice -n 10 python3 train_demo.py all --llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp

Intermediate files go to demo/work/ (not committed); the committed assets go to demo/assets/.

The IAPT function implemented here is the one of shared/design/iapt-v1.md: at every decoder layer l,
with H = the residual stream entering layer l at the n instruction rows (BOS included),
    Z = H W_down^T + b_down, S = (Z Q^T) * s, A = softmax over the n rows (per soft token),
    Pbar = A^T Z, U = rational_B(Pbar), P_l = U W_up^T + b_up,
and rows n..n+3 of the residual stream entering layer l are REPLACED by P_l.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.environ.get("IAPT_DEMO_WORK", os.path.join(HERE, "work"))
ASSETS = os.path.join(HERE, "assets")

SEED = 1234

# --- The synthetic corpus ----------------------------------------------------------------------

# 20 words with distinct first letters (so "sort the words" is plain alphabetical order).
WORDS = [
    "apple", "bird", "cake", "door", "egg", "fish", "goat", "hat", "ink", "jam",
    "kite", "lamp", "moon", "nest", "owl", "pen", "queen", "rose", "sun", "tree",
]
NUMBER_WORDS = {3: "three", 4: "four", 5: "five"}
MIN_LEN, MAX_LEN = 3, 5

# Base task families: fixed instruction phrasing -> skill. The base model learns exactly these.
BASE_FAMILIES = {
    "reverse": "reverse the words:",
    "sort": "sort the words:",
    "dashes": "join the words with dashes:",
    "count": "count the words:",
    "first": "say the first word:",
    "last": "say the last word:",
}

# The adapter task: a NEW phrasing (never shown to the base model; its words occur in no base
# instruction except "the") that must trigger the "reverse" skill.
ADAPTER_FAMILY = "backward"
ADAPTER_PHRASE = "write the list backwards:"


def skill(kind, words):
    if kind in ("reverse", "backward"):
        return " ".join(reversed(words))
    if kind == "sort":
        return " ".join(sorted(words))
    if kind == "dashes":
        return "-".join(words)
    if kind == "count":
        return NUMBER_WORDS[len(words)]
    if kind == "first":
        return words[0]
    if kind == "last":
        return words[-1]
    raise ValueError(kind)


# Every response opens with this fixed token. The first response token is predicted at the last soft
# slot, whose residual row the adapter replaces at every layer (design note), so only the last layer
# would be left to compute a content-dependent first token; a fixed opener keeps all content tokens on
# ordinary rows that see the soft tokens through attention at every layer.
ANSWER_MARK = "="


def example(kind, words):
    phrase = ADAPTER_PHRASE if kind == ADAPTER_FAMILY else BASE_FAMILIES[kind]
    return {"task": kind, "instruction": phrase + " " + " ".join(words),
            "response": ANSWER_MARK + " " + skill(kind, words)}


def random_words(rng):
    return rng.sample(WORDS, rng.randint(MIN_LEN, MAX_LEN))


def make_corpus(args):
    """Writes work/corpus_base.jsonl, work/adapter_train.jsonl, work/held_out.jsonl, base_held_out."""
    rng = random.Random(SEED)
    # Held-out word lists for the adapter task first, so training never sees them (in any task).
    held_lists = set()
    while len(held_lists) < args.n_held_out:
        held_lists.add(tuple(random_words(rng)))
    held_lists = sorted(held_lists, key=lambda t: (len(t), t))
    rng.shuffle(held_lists)
    held = [example(ADAPTER_FAMILY, list(w)) for w in held_lists]
    held_set = set(held_lists)

    def fresh(rng):
        while True:
            w = tuple(random_words(rng))
            if w not in held_set:
                return list(w)

    kinds = list(BASE_FAMILIES)
    base = [example(kinds[i % len(kinds)], fresh(rng)) for i in range(args.n_base)]
    rng.shuffle(base)
    adapter_train = [example(ADAPTER_FAMILY, fresh(rng)) for _ in range(args.n_adapter)]
    base_held = [example(kinds[i % len(kinds)], fresh(rng)) for i in range(len(kinds) * 30)]
    os.makedirs(WORK, exist_ok=True)
    for name, rows in [("corpus_base", base), ("adapter_train", adapter_train), ("held_out", held),
                       ("base_held_out", base_held)]:
        write_jsonl(os.path.join(WORK, name + ".jsonl"), rows)
    print("corpus: %d base, %d adapter-train, %d held-out (adapter task), %d base held-out"
          % (len(base), len(adapter_train), len(held), len(base_held)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- Tokenizer ---------------------------------------------------------------------------------

UNK_ID, BOS_ID, EOS_ID, SLOT_ID = 0, 1, 2, 3
SLOT_PIECE = "<slot>"
M_SOFT = 4


def train_tokenizer(args):
    import sentencepiece as spm

    text_path = os.path.join(WORK, "tokenizer_text.txt")
    with open(text_path, "w") as f:
        for name in ("corpus_base", "adapter_train"):
            for r in read_jsonl(os.path.join(WORK, name + ".jsonl")):
                f.write(r["instruction"] + "\n" + r["response"] + "\n")
    spm.SentencePieceTrainer.train(
        input=text_path,
        model_prefix=os.path.join(WORK, "tokenizer"),
        model_type="bpe",
        vocab_size=args.vocab,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        control_symbols=[SLOT_PIECE],
        num_threads=2,
        minloglevel=2,
    )
    sp = load_sp()
    assert sp.piece_to_id(SLOT_PIECE) == SLOT_ID, sp.piece_to_id(SLOT_PIECE)
    print("tokenizer: %d pieces; e.g. %s" % (sp.get_piece_size(),
          sp.encode(ADAPTER_PHRASE + " cake owl sun", out_type=str)))


def load_sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=os.path.join(WORK, "tokenizer.model"))


def prompt_ids(sp, instruction):
    """The exact prompt: BOS, the instruction's SentencePiece ids, then 4 slot ids (<slot> = 3)."""
    return [BOS_ID] + sp.encode(instruction) + [SLOT_ID] * M_SOFT


def encode_rows(sp, rows):
    out = []
    for r in rows:
        p = prompt_ids(sp, r["instruction"])
        resp = sp.encode(r["response"]) + [EOS_ID]
        out.append((p, resp))
    return out


def make_batch(pairs):
    """Right-padded batch: input ids, labels (-100 outside the response), n (instruction length)."""
    T = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), T), EOS_ID, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    n = torch.empty(len(pairs), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p): len(seq)] = torch.tensor(r)
        n[i] = len(p) - M_SOFT
    return ids, labels, n


# --- Base model --------------------------------------------------------------------------------


def base_config(vocab):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
    )


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_base(args):
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    sp = load_sp()
    rows = read_jsonl(os.path.join(WORK, "corpus_base.jsonl"))
    pairs = encode_rows(sp, rows)
    if args.resume:
        model = LlamaForCausalLM.from_pretrained(os.path.join(WORK, "base_hf"), dtype=torch.float32)
    else:
        model = LlamaForCausalLM(base_config(sp.get_piece_size()))
    n_params = sum(p.numel() for p in model.parameters())
    print("base: %d parameters" % n_params)
    opt = torch.optim.AdamW(model.parameters(), lr=args.base_lr, betas=(0.9, 0.98), weight_decay=0.01)
    # Slot-row reset: for a random half of each batch, the 4 slot rows entering layers 1..L-1 are
    # reset to the <slot> embedding (what layer 0 sees), so the base learns its skills without
    # relying on what its own layers wrote into the slot rows: the rows an adapter later replaces.
    reset = {"sel": None, "n": None}

    def reset_hook(module, hargs, hkwargs):
        if reset["sel"] is None:
            return None
        hs = hargs[0] if hargs else hkwargs["hidden_states"]
        pos = torch.arange(hs.shape[1])
        n_ = reset["n"].unsqueeze(1)
        rows = (pos.unsqueeze(0) >= n_) & (pos.unsqueeze(0) < n_ + M_SOFT) & reset["sel"].unsqueeze(1)
        slot = model.model.embed_tokens.weight[SLOT_ID]
        hs = torch.where(rows.unsqueeze(-1), slot.expand_as(hs), hs)
        if hargs:
            return (hs,) + tuple(hargs[1:]), hkwargs
        hkwargs = dict(hkwargs)
        hkwargs["hidden_states"] = hs
        return hargs, hkwargs

    handles = []
    if args.slot_reset_prob > 0:
        handles = [layer.register_forward_pre_hook(reset_hook, with_kwargs=True)
                   for layer in model.model.layers[1:]]
    rng = random.Random(SEED + 1)
    gen = torch.Generator().manual_seed(SEED + 4)
    model.train()
    t0 = time.time()
    for step in range(args.base_steps):
        batch = rng.sample(pairs, args.batch)
        ids, labels, n = make_batch(batch)
        if handles:
            reset["n"] = n
            reset["sel"] = torch.rand(len(batch), generator=gen) < args.slot_reset_prob
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.base_steps, args.base_lr, 50)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.base_steps - 1:
            print("base step %4d loss %.4f  %.0fs" % (step, loss.item(), time.time() - t0), flush=True)
        if step % 300 == 299:
            model.save_pretrained(os.path.join(WORK, "base_hf"))
    for h in handles:
        h.remove()
    model.eval()
    model.save_pretrained(os.path.join(WORK, "base_hf"))
    with open(os.path.join(WORK, "base_train_seconds.txt"), "w") as f:
        f.write("%.1f\n" % (time.time() - t0))
    print("base: trained in %.0fs" % (time.time() - t0))


def load_base():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(WORK, "base_hf"), dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- IAPT adapter (reference training layout) --------------------------------------------------


def gelu_rational_init(num_deg=6, den_deg=5):
    """Variant-B rational coefficients approximating GELU (erf form) on [-3, 3], least squares."""
    x = torch.linspace(-3.0, 3.0, 4001, dtype=torch.float64)
    y = F.gelu(x)
    # Linearised least squares: P(x) - y * B(x) = y with B(x) = sum_{i>=1} b_i x^i (Q = 1 + B > 0).
    cols = [x ** j for j in range(num_deg + 1)] + [-y * x ** i for i in range(1, den_deg + 1)]
    A = torch.stack(cols, dim=1)
    sol = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    a = sol[: num_deg + 1].clone().requires_grad_(True)
    b = sol[num_deg + 1:].clone().requires_grad_(True)
    # Refine on the true variant-B form (the |.| in the denominator), still least squares.
    opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((rational_b(x, a.unsqueeze(0), b.unsqueeze(0)) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        err = (rational_b(x, a.unsqueeze(0), b.unsqueeze(0)) - y).abs().max().item()
    return a.detach().float(), b.detach().float(), err


def rational_b(x, num, den):
    """Variant B with G = 1: P(x) / (1 + |sum_{i=1..N} b_i x^i|); num [1, M+1], den [1, N]."""
    a = num[0]
    b = den[0]
    p = torch.zeros_like(x)
    for j in range(a.shape[0] - 1, -1, -1):
        p = p * x + a[j]
    q = torch.zeros_like(x)
    for i in range(b.shape[0] - 1, -1, -1):
        q = q * x + b[i]
    q = q * x  # sum_{i=1..N} b_i x^i
    return p / (1.0 + q.abs())


class Rational(nn.Module):
    def __init__(self, num_init, den_init):
        super().__init__()
        self.numerator = nn.Parameter(num_init.clone().unsqueeze(0))  # [G=1, M+1]
        self.denominator = nn.Parameter(den_init.clone().unsqueeze(0))  # [G=1, N]

    def forward(self, x):
        return rational_b(x, self.numerator, self.denominator)


class Pooler(nn.Module):
    def __init__(self, m, r):
        super().__init__()
        self.query = nn.Parameter(torch.randn(m, r) / math.sqrt(r))


class PromptGenerator(nn.Module):
    def __init__(self, d, r, m, scale, num_init, den_init):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(d, r)
        self.pooler = Pooler(m, r)
        self.activation = Rational(num_init, den_init)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)

    def forward(self, h, instr_mask):
        """h [B, T, d] (only rows where instr_mask is true are read) -> P [B, m, d]."""
        z = self.down(h)  # [B, T, r]
        s = torch.einsum("btr,mr->btm", z, self.pooler.query) * self.scale
        s = s.masked_fill(~instr_mask.unsqueeze(-1), float("-inf"))
        a = torch.softmax(s, dim=1)  # over the n instruction rows, per soft token
        pbar = torch.einsum("btm,btr->bmr", a, z)
        return self.up(self.activation(pbar))


class _Layer(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.prompt_generator = gen


class _Layers(nn.Module):
    def __init__(self, gens):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(g) for g in gens])


class _Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.model = inner


class IaptAdapter(nn.Module):
    """state_dict keys: base_model.model.model.layers.{l}.prompt_generator.{...} (the reference)."""

    def __init__(self, n_layer, d, r, m, scale):
        super().__init__()
        num, den, err = gelu_rational_init()
        self.gelu_fit_max_err = err
        gens = [PromptGenerator(d, r, m, scale, num, den) for _ in range(n_layer)]
        self.base_model = _Wrap(_Wrap(_Layers(gens)))
        self.m = m

    def generators(self):
        return [layer.prompt_generator for layer in self.base_model.model.model.layers]


class Injector:
    """forward_pre_hooks on each decoder layer: rows n..n+m-1 entering layer l := P_l."""

    def __init__(self, base, adapter):
        self.adapter = adapter
        self.n = None  # [B] instruction lengths, or None = hook inactive (base without adapter)
        self.handles = []
        for layer, gen in zip(base.model.layers, adapter.generators()):
            self.handles.append(layer.register_forward_pre_hook(self._make(gen), with_kwargs=True))

    def _make(self, gen):
        def hook(module, args, kwargs):
            if self.n is None:
                return None
            hs = args[0] if args else kwargs["hidden_states"]
            B, T, d = hs.shape
            m = self.adapter.m
            pos = torch.arange(T, device=hs.device)
            instr_mask = pos.unsqueeze(0) < self.n.unsqueeze(1)
            p = gen(hs, instr_mask).to(hs.dtype)
            idx = (self.n.unsqueeze(1) + torch.arange(m)).unsqueeze(-1).expand(B, m, d)
            hs = hs.scatter(1, idx, p)
            if args:
                return (hs,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hs
            return args, kwargs

        return hook


ADAPTER_R = 64
ADAPTER_SCALE = 1.0 / math.sqrt(ADAPTER_R)


def train_adapter(args):
    torch.manual_seed(SEED + 2)
    sp = load_sp()
    base = load_base()
    cfg = base.config
    adapter = IaptAdapter(cfg.num_hidden_layers, cfg.hidden_size, ADAPTER_R, M_SOFT, ADAPTER_SCALE)
    print("adapter: %d parameters; GELU fit max |err| on [-3,3] = %.2e"
          % (sum(p.numel() for p in adapter.parameters()), adapter.gelu_fit_max_err))
    inj = Injector(base, adapter)
    rows = read_jsonl(os.path.join(WORK, "adapter_train.jsonl"))
    pairs = encode_rows(sp, rows)
    # Start as a no-op: up.bias = the mean residual row the base itself has at the slot positions.
    with torch.no_grad():
        ids, _, n = make_batch(pairs[:256])
        out = base(input_ids=ids, output_hidden_states=True, use_cache=False)
        for l, gen in enumerate(adapter.generators()):
            h = out.hidden_states[l]  # entering layer l
            rows_ = torch.stack([h[i, n[i]: n[i] + M_SOFT] for i in range(len(n))])
            if args.slot_reset_prob > 0:
                # The state the base was trained to handle: slot rows reset to the <slot> embedding.
                gen.up.bias.copy_(base.model.embed_tokens.weight[SLOT_ID])
            else:
                gen.up.bias.copy_(rows_.mean(dim=(0, 1)))
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.adapter_lr, weight_decay=0.0)
    rng = random.Random(SEED + 3)
    t0 = time.time()
    for step in range(args.adapter_steps):
        batch = rng.sample(pairs, args.batch)
        ids, labels, n = make_batch(batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.adapter_steps, args.adapter_lr, 20)
        inj.n = n
        loss = base(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.adapter_steps - 1:
            print("adapter step %4d loss %.4f  %.0fs" % (step, loss.item(), time.time() - t0), flush=True)
    inj.n = None
    torch.save(adapter.state_dict(), os.path.join(WORK, "adapter_model.bin"))
    with open(os.path.join(WORK, "adapter_train_seconds.txt"), "w") as f:
        f.write("%.1f\n" % (time.time() - t0))
    print("adapter: trained in %.0fs" % (time.time() - t0))


def load_adapter(base):
    cfg = base.config
    adapter = IaptAdapter(cfg.num_hidden_layers, cfg.hidden_size, ADAPTER_R, M_SOFT, ADAPTER_SCALE)
    sd = torch.load(os.path.join(WORK, "adapter_model.bin"), map_location="cpu", weights_only=True)
    adapter.load_state_dict(sd)
    adapter.eval()
    return adapter


# --- Evaluation --------------------------------------------------------------------------------

MAX_NEW = 24


@torch.no_grad()
def greedy(base, inj, sp, rows, use_adapter, batch=64):
    """Greedy decoding, stop at EOS or a newline; returns the decoded, stripped responses."""
    prompts = [prompt_ids(sp, r["instruction"]) for r in rows]
    out = [None] * len(rows)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for L, idxs in sorted(by_len.items()):
        for k in range(0, len(idxs), batch):
            chunk = idxs[k: k + batch]
            ids = torch.tensor([prompts[i] for i in chunk])
            inj.n = torch.full((len(chunk),), L - M_SOFT) if use_adapter else None
            gen = [[] for _ in chunk]
            done = [False] * len(chunk)
            for _ in range(MAX_NEW):
                logits = base(input_ids=ids, use_cache=False).logits[:, -1]
                nxt = logits.argmax(-1)
                for j, t in enumerate(nxt.tolist()):
                    if done[j]:
                        continue
                    if t == EOS_ID or "\n" in sp.decode([t]):
                        done[j] = True
                    else:
                        gen[j].append(t)
                if all(done):
                    break
                ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
            for j, i in enumerate(chunk):
                out[i] = sp.decode(gen[j]).strip()
    inj.n = None
    return out


def accuracy(preds, rows):
    return 100.0 * sum(p == r["response"] for p, r in zip(preds, rows)) / len(rows)


def evaluate(args):
    torch.manual_seed(0)
    sp = load_sp()
    base = load_base()
    adapter = load_adapter(base)
    inj = Injector(base, adapter)
    held = read_jsonl(os.path.join(WORK, "held_out.jsonl"))
    base_held = read_jsonl(os.path.join(WORK, "base_held_out.jsonl"))
    res = {"n_held_out": len(held)}
    t0 = time.time()
    p0 = greedy(base, inj, sp, held, use_adapter=False)
    p1 = greedy(base, inj, sp, held, use_adapter=True)
    res["held_out_base"] = accuracy(p0, held)
    res["held_out_adapter"] = accuracy(p1, held)
    res["examples"] = [{"instruction": r["instruction"], "expected": r["response"], "base": a, "adapter": b}
                       for r, a, b in list(zip(held, p0, p1))[:8]]
    # Base families with their own phrasings (sanity: the base learned them).
    pb = greedy(base, inj, sp, base_held, use_adapter=False)
    per = {}
    for kind in BASE_FAMILIES:
        sel = [(p, r) for p, r in zip(pb, base_held) if r["task"] == kind]
        per[kind] = accuracy([p for p, _ in sel], [r for _, r in sel])
    res["base_families"] = per
    # What the base answers to the new phrasing (first word? last word?).
    hist = {}
    for p, r in zip(p0, held):
        w = r["instruction"].split(":", 1)[1].split()
        kind = "other"
        for k in BASE_FAMILIES:
            if p == ANSWER_MARK + " " + skill(k, w):
                kind = k
                break
        hist[kind] = hist.get(kind, 0) + 1
    res["base_behaviour_on_new_phrasing"] = hist
    res["eval_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(WORK, "eval.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


# --- Export ------------------------------------------------------------------------------------


def export(args):
    from gguf import GGUFReader

    os.makedirs(ASSETS, exist_ok=True)
    hf = os.path.join(WORK, "base_hf")
    shutil.copy(os.path.join(WORK, "tokenizer.model"), os.path.join(hf, "tokenizer.model"))
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        # The prompt format as a chat template (assets/chat_template.jinja): convert_hf_to_gguf.py
        # writes it to the GGUF as tokenizer.chat_template, and `iapt quantize` keeps it.
        with open(os.path.join(ASSETS, "chat_template.jinja")) as t:
            chat_template = t.read()
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "chat_template": chat_template}, f, indent=2)
    gguf_path = os.path.join(ASSETS, "base-f16.gguf")
    conv = os.path.join(args.llama_cpp, "convert_hf_to_gguf.py")
    cmd = [sys.executable, conv, hf, "--outtype", "f16", "--model-name", "iapt-demo-base", "--outfile", gguf_path]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    r = GGUFReader(gguf_path)
    for k in ["general.architecture", "llama.embedding_length", "llama.block_count",
              "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
              "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.add_bos_token"]:
        fld = r.fields.get(k)
        print("  %-36s %s" % (k, None if fld is None else fld.contents()))
    for t in r.tensors[:12]:
        print("  %-28s %-5s %s" % (t.name, t.tensor_type.name, list(t.shape)))
    print("  ... %d tensors" % len(r.tensors))
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert toks[SLOT_ID] == SLOT_PIECE, toks[:5]

    shutil.copy(os.path.join(WORK, "tokenizer.model"), os.path.join(ASSETS, "tokenizer.model"))
    shutil.copy(os.path.join(WORK, "adapter_model.bin"), os.path.join(ASSETS, "adapter_model.bin"))
    with open(os.path.join(ASSETS, "adapter_config.json"), "w") as f:
        json.dump({
            "n_soft_tokens": M_SOFT,
            "bottleneck": ADAPTER_R,
            "activation": {"kind": "rational", "variant": "B", "numerator_degree": 6,
                           "denominator_degree": 5, "groups": 1},
            "pool_scale": ADAPTER_SCALE,
            "base_model_arch": "llama",
        }, f, indent=2)
        f.write("\n")
    held = read_jsonl(os.path.join(WORK, "held_out.jsonl"))
    sp = load_sp()
    write_jsonl(os.path.join(ASSETS, "held_out.jsonl"),
                [{"instruction": r["instruction"], "response": r["response"],
                  "prompt_ids": prompt_ids(sp, r["instruction"])} for r in held])
    ev = json.load(open(os.path.join(WORK, "eval.json")))
    demo = [{"instruction": e["instruction"], "response": e["expected"], "prompt_ids": prompt_ids(sp, e["instruction"]),
             "pytorch_base": e["base"], "pytorch_adapter": e["adapter"]} for e in ev["examples"][:5]]
    write_jsonl(os.path.join(ASSETS, "demo_prompts.jsonl"), demo)
    with open(os.path.join(ASSETS, "prompt_format.json"), "w") as f:
        json.dump({
            "bos_id": BOS_ID, "eos_id": EOS_ID, "slot_id": SLOT_ID, "slot_piece": SLOT_PIECE,
            "n_soft_tokens": M_SOFT,
            "prompt": "[BOS] + sentencepiece(instruction, add_dummy_prefix) + [SLOT]*4",
            "soft_positions": "n .. n+3 where n = 1 + len(instruction ids) (BOS counted)",
            "decoding": "greedy; stop at EOS or a token whose text contains a newline; max 24 new tokens",
            "exact_match": "detokenize the generated ids (EOS excluded), strip leading/trailing "
                           "whitespace, compare with response as equal strings",
        }, f, indent=2)
        f.write("\n")
    ev["gguf_roundtrip"] = gguf_roundtrip_eval(gguf_path)
    write_results(ev, args)
    for name in sorted(os.listdir(ASSETS)):
        print("  %-22s %9d bytes" % (name, os.path.getsize(os.path.join(ASSETS, name))))


def gguf_roundtrip_eval(gguf_path):
    """Loads the F16 GGUF's weights back into the PyTorch model (undoing llama.cpp's q/k row
    permutation) and measures the held-out accuracy again: checks the conversion end to end."""
    import numpy as np
    from gguf import GGUFReader

    sp = load_sp()
    base = load_base()
    cfg = base.config
    tensors = {t.name: np.array(t.data) for t in GGUFReader(gguf_path).tensors}

    def unpermute(w, n_head):
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    roles = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for l in range(cfg.num_hidden_layers):
        for hf_role, gg_role in roles.items():
            names["model.layers.%d.%s.weight" % (l, hf_role)] = "blk.%d.%s.weight" % (l, gg_role)
    sd = base.state_dict()
    assert set(names) == set(sd), set(sd) ^ set(names)
    new, max_rel = {}, 0.0
    for hf_name, gg_name in names.items():
        w = tensors[gg_name].astype(np.float32)
        if gg_name.endswith("attn_q.weight"):
            w = unpermute(w, cfg.num_attention_heads)
        elif gg_name.endswith("attn_k.weight"):
            w = unpermute(w, cfg.num_key_value_heads)
        w = torch.from_numpy(w.copy())
        max_rel = max(max_rel, ((w - sd[hf_name]).abs().max() / sd[hf_name].abs().max()).item())
        new[hf_name] = w
    base.load_state_dict(new)
    inj = Injector(base, load_adapter(base))
    held = read_jsonl(os.path.join(WORK, "held_out.jsonl"))
    res = {"max_rel_diff": max_rel,
           "base": accuracy(greedy(base, inj, sp, held, use_adapter=False), held),
           "adapter": accuracy(greedy(base, inj, sp, held, use_adapter=True), held)}
    print("gguf round trip: %s" % res)
    return res


def write_results(ev, args):
    def secs(name):
        try:
            return float(open(os.path.join(WORK, name)).read())
        except OSError:
            return float("nan")

    lines = [
        "# PyTorch accuracies of the embedded demo",
        "",
        "Written by `train_demo.py export` from `work/eval.json` (measured by `train_demo.py eval`).",
        "",
        "Held-out set: `assets/held_out.jsonl`, %d examples of the adapter task (instruction phrasing "
        "`%s <words>`, expected answer: the words in reverse order). None of its word lists occurs in any "
        "training example." % (ev["n_held_out"], ADAPTER_PHRASE),
        "",
        "Prompt: `[BOS] instruction-ids [<slot>]x4`, greedy, stop at EOS or newline, exact match after strip "
        "(see README.md).",
        "",
        "| model | exact match |",
        "|---|---|",
        "| base without adapter (PyTorch f32) | %.1f%% |" % ev["held_out_base"],
        "| base + IAPT adapter (PyTorch f32) | %.1f%% |" % ev["held_out_adapter"],
        "| base F16 weights read back from `assets/base-f16.gguf` into PyTorch, without adapter | %.1f%% |"
        % ev["gguf_roundtrip"]["base"],
        "| the same, + IAPT adapter (f32) | %.1f%% |" % ev["gguf_roundtrip"]["adapter"],
        "",
        "Lift: %+.1f points (f32). The last two rows check the llama.cpp conversion (q/k row permutation "
        "undone, largest relative weight difference %.1e, i.e. F16 rounding); they are not llama.cpp runs."
        % (ev["held_out_adapter"] - ev["held_out_base"], ev["gguf_roundtrip"]["max_rel_diff"]),
        "",
        "What the base alone answers to the new phrasing (count over the held-out set, by which base skill "
        "its answer matches): `%s`." % json.dumps(ev["base_behaviour_on_new_phrasing"]),
        "",
        "Sanity check, base model without adapter on its own task families (%d held-out examples each, "
        "the fixed phrasings it was trained on):" % 30,
        "",
        "| family | phrasing | exact match |",
        "|---|---|---|",
    ]
    for k, v in ev["base_families"].items():
        lines.append("| %s | `%s` | %.1f%% |" % (k, BASE_FAMILIES[k], v))
    lines += [
        "",
        "Examples (first held-out rows):",
        "",
        "| instruction | expected | base | base + adapter |",
        "|---|---|---|---|",
    ]
    for e in ev["examples"]:
        lines.append("| `%s` | `%s` | `%s` | `%s` |" % (e["instruction"], e["expected"], e["base"], e["adapter"]))
    lines += [
        "",
        "Training time of this run (2 CPU cores shared with Rust builds and with other experiments of "
        "this session, `nice -n 10`, torch threads = %d): base %.0f s, adapter %.0f s; evaluation %.0f s. "
        "See README.md for uncontended timings." % (args.threads, secs("base_train_seconds.txt"),
                                                    secs("adapter_train_seconds.txt"), ev["eval_seconds"]),
        "",
        "llama.cpp rows (F16, Q8_0, 4-bit, with the adapter) are measured by `iapt eval` on the Rust side.",
        "",
    ]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["corpus", "tokenizer", "base", "adapter", "eval", "export", "all"])
    ap.add_argument("--llama-cpp", default="/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp",
                    help="a llama.cpp tree with convert_hf_to_gguf.py and conversion/")
    ap.add_argument("--n-base", type=int, default=60000)
    ap.add_argument("--n-adapter", type=int, default=4000)
    ap.add_argument("--n-held-out", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base-steps", type=int, default=1400)
    ap.add_argument("--base-lr", type=float, default=1e-3)
    ap.add_argument("--adapter-steps", type=int, default=1000)
    ap.add_argument("--adapter-lr", type=float, default=1e-2)
    ap.add_argument("--slot-reset-prob", type=float, default=0.0)
    ap.add_argument("--resume", action="store_true", help="base: continue from work/base_hf")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stages = ["corpus", "tokenizer", "base", "adapter", "eval", "export"] if args.stage == "all" else [args.stage]
    for s in stages:
        t0 = time.time()
        {"corpus": make_corpus, "tokenizer": train_tokenizer, "base": train_base, "adapter": train_adapter,
         "eval": evaluate, "export": export}[s](args)
        print("== %s done in %.0fs" % (s, time.time() - t0), flush=True)


if __name__ == "__main__":
    main()
