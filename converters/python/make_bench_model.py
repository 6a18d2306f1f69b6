#!/usr/bin/env python3
"""Writes the benchmark model for `iapt bench`: a ~1.1B-parameter llama-architecture GGUF (the shape
of TinyLlama 1.1B: n_embd 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000) with random
F16 weights, and a random IAPT adapter of the matching shape (r = 256, m = 4, rational B 6/5).

Nothing here is committed: write to /tmp or another ignored folder, then quantize with llama.cpp:

    python3 converters/python/make_bench_model.py /tmp/iapt-bench
    cargo run --release -p iapt-llama --example quantize -- /tmp/iapt-bench/bench-f16.gguf /tmp/iapt-bench/bench-q4_k_m.gguf q4_k_m
    iapt bench --model /tmp/iapt-bench/bench-q4_k_m.gguf --adapter /tmp/iapt-bench/bench.iapt.safetensors

Random weights are fine for speed: the work per token does not depend on the values.

`--shape llama2-7b` writes the shape of LLaMA-2 7B instead (n_embd 4096, 32 layers, 32 heads and 32
KV heads, FFN 11008, vocab 32000, context 4096: 6.7B parameters, a 13.5 GB F16 file) and a random
adapter of the matching shape (r = 256, m = 4). Its weights are windows at random offsets into one
random pool (three pre-scaled F16 copies of 0.26 GB each), so that writing it takes seconds of computation and little memory
rather than 6.7 billion fresh draws (scripts/gpu/device-run's `model` stage). `--n-layer`,
`--n-embd`, `--n-head`, `--n-head-kv`, `--n-ff` and `--vocab` override a shape's sizes (a small
smoke test: `--shape llama2-7b --n-layer 2 --n-embd 256 --n-head 4 --n-head-kv 4 --n-ff 512 --vocab 1000`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import gguf

# name: (n_embd, n_layer, n_head, n_head_kv, n_ff, vocab, context, random pool or fresh draws)
SHAPES = {
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000, 2048, False),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 4096, True),
}
D, L, H, HKV, FFN, VOCAB, CTX = SHAPES["tinyllama-1.1b"][:7]
R, M = 256, 4
# Values in the random pool of a pooled shape: more than the largest tensor (vocab x n_embd).
POOL_MIN = 1 << 24


def vocab():
    toks, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        toks.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    i = 0
    while len(toks) < VOCAB:
        toks.append(f"▁w{i}")
        scores.append(-float(i))
        types.append(1)
        i += 1
    return toks, scores, types


def parse_args():
    ap = argparse.ArgumentParser(description="Random-weight llama GGUF (F16) and a matching random IAPT adapter, for `iapt bench`.")
    ap.add_argument("out", nargs="?", default="/tmp/iapt-bench", help="output folder (default /tmp/iapt-bench)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b", help="model shape (default tinyllama-1.1b)")
    for flag in ("n-layer", "n-embd", "n-head", "n-head-kv", "n-ff", "vocab"):
        ap.add_argument(f"--{flag}", type=int, metavar="N", help=f"override the shape's {flag}")
    a = ap.parse_args()
    d, l, h, hkv, ffn, voc, ctx, pooled = SHAPES[a.shape]
    d, l, h = a.n_embd or d, a.n_layer or l, a.n_head or h
    hkv, ffn, voc = a.n_head_kv or hkv, a.n_ff or ffn, a.vocab or voc
    if min(d, l, h, hkv, ffn) < 1 or d % h or h % hkv or voc < 260:
        ap.error("need positive sizes, n_embd divisible by n_head, n_head by n_head_kv, and vocab >= 260")
    return Path(a.out), a.shape, (d, l, h, hkv, ffn, voc, ctx), pooled


def main():
    global D, L, H, HKV, FFN, VOCAB, CTX
    out, shape, sizes, pooled = parse_args()
    D, L, H, HKV, FFN, VOCAB, CTX = sizes
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(out / "bench-f16.gguf"), "llama")
    w.add_name(f"iapt-bench-{shape}-random")
    w.add_file_type(1)  # MOSTLY_F16
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(FFN)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D // H)
    w.add_vocab_size(VOCAB)
    toks, scores, types = vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    if pooled:
        # One pool of standard normals (F16); every matrix is a window at a random offset, scaled
        # by 1/sqrt(cols) in the pool's values by choosing among a few pre-scaled pools.
        n_pool = max(POOL_MIN, VOCAB * D + 1)
        base = rng.standard_normal(n_pool, dtype=np.float32)
        pools = {}

        def window(rows, cols, scale):
            if scale not in pools:
                pools[scale] = (base * scale).astype(np.float16)
            off = int(rng.integers(0, n_pool - rows * cols + 1))
            return pools[scale][off : off + rows * cols].reshape(rows, cols)

        def mat(rows, cols):
            return window(rows, cols, 1.0 / math.sqrt(cols))

        def embd(rows, cols):
            return window(rows, cols, 1.0)
    else:

        def mat(rows, cols):
            return (rng.standard_normal((rows, cols), dtype=np.float32) / math.sqrt(cols)).astype(np.float16)

        def embd(rows, cols):
            return rng.standard_normal((rows, cols), dtype=np.float32).astype(np.float16)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    kv = D // H * HKV
    w.add_tensor("token_embd.weight", embd(VOCAB, D))
    for l in range(L):
        w.add_tensor(f"blk.{l}.attn_norm.weight", ones(D))
        w.add_tensor(f"blk.{l}.attn_q.weight", mat(D, D))
        w.add_tensor(f"blk.{l}.attn_k.weight", mat(kv, D))
        w.add_tensor(f"blk.{l}.attn_v.weight", mat(kv, D))
        w.add_tensor(f"blk.{l}.attn_output.weight", mat(D, D))
        w.add_tensor(f"blk.{l}.ffn_norm.weight", ones(D))
        w.add_tensor(f"blk.{l}.ffn_gate.weight", mat(FFN, D))
        w.add_tensor(f"blk.{l}.ffn_up.weight", mat(FFN, D))
        w.add_tensor(f"blk.{l}.ffn_down.weight", mat(D, FFN))
    w.add_tensor("output_norm.weight", ones(D))
    w.add_tensor("output.weight", mat(VOCAB, D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tensors = {}
    for l in range(L):
        b = f"iapt.blk.{l}."
        tensors[b + "down.weight"] = (rng.standard_normal((R, D), dtype=np.float32) / math.sqrt(D)).astype(np.float16)
        tensors[b + "down.bias"] = np.zeros(R, dtype=np.float16)
        tensors[b + "pool.query"] = rng.standard_normal((M, R), dtype=np.float32).astype(np.float16)
        tensors[b + "up.weight"] = (rng.standard_normal((D, R), dtype=np.float32) / math.sqrt(R)).astype(np.float16)
        tensors[b + "up.bias"] = np.zeros(D, dtype=np.float16)
        tensors[b + "act.num"] = (rng.uniform(-1, 1, (1, 7)) * 0.5 ** np.arange(7)).astype(np.float16)
        tensors[b + "act.den"] = (rng.uniform(-1, 1, (1, 5)) * 0.5 ** np.arange(1, 6)).astype(np.float16)
    meta = {
        "iapt.spec_version": "1.0", "iapt.n_layer": str(L), "iapt.n_embd": str(D), "iapt.n_soft_tokens": str(M),
        "iapt.bottleneck": str(R), "iapt.activation": "rational", "iapt.pool.type": "query", "iapt.pool.scale": "1.0",
        "iapt.base_model.arch": "llama", "iapt.rational.variant": "B", "iapt.rational.numerator_degree": "6",
        "iapt.rational.denominator_degree": "5", "iapt.rational.groups": "1",
    }
    save_file(tensors, str(out / "bench.iapt.safetensors"), metadata=meta)
    n_params = VOCAB * D * 2 + D + L * (2 * D + 2 * D * D + 2 * (D // H * HKV) * D + 3 * D * FFN)
    print(f"wrote {out}/bench-f16.gguf ({shape}: n_embd {D}, {L} layers, {H}/{HKV} heads, n_ff {FFN}, vocab {VOCAB}; "
          f"{n_params} parameters) and {out}/bench.iapt.safetensors")


if __name__ == "__main__":
    main()
