#!/usr/bin/env python3
"""Writes the benchmark model for `iapt bench`: a ~1.1B-parameter llama-architecture GGUF (the shape
of TinyLlama 1.1B: n_embd 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000) with random
F16 weights, and a random IAPT adapter of the matching shape (r = 256, m = 4, rational B 6/5).

Nothing here is committed: write to /tmp or another ignored folder, then quantize with llama.cpp:

    python3 converters/python/make_bench_model.py /tmp/iapt-bench
    cargo run --release -p iapt-llama --example quantize -- /tmp/iapt-bench/bench-f16.gguf /tmp/iapt-bench/bench-q4_k_m.gguf q4_k_m
    iapt bench --model /tmp/iapt-bench/bench-q4_k_m.gguf --adapter /tmp/iapt-bench/bench.iapt.safetensors

Random weights are fine for speed: the work per token does not depend on the values.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import gguf

D, L, H, HKV, FFN, VOCAB, CTX = 2048, 22, 32, 4, 5632, 32000, 2048
R, M = 256, 4


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


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/iapt-bench")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(out / "bench-f16.gguf"), "llama")
    w.add_name("iapt-bench-1.1b-random")
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

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) / math.sqrt(cols)).astype(np.float16)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    kv = D // H * HKV
    w.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, D), dtype=np.float32).astype(np.float16))
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
    print(f"wrote {out}/bench-f16.gguf and {out}/bench.iapt.safetensors")


if __name__ == "__main__":
    main()
