#!/usr/bin/env python3
"""Writes the tenants' adapters for bench/tenants: N IAPT adapters and N LoRA adapters for one base.

- IAPT (numpy + safetensors only): 22-layer (or --shape's) random generators, m soft tokens, bottleneck
  r (default: the paper's ratio r/d = 320/4096, i.e. 160 at d = 2048), rational B 6/5, F16 storage,
  spec v1 metadata; one seed per adapter. Files: iapt-NN.safetensors.
- LoRA (torch + PEFT + llama.cpp's convert_lora_to_gguf.py): a transformers LlamaForCausalLM of the
  base's shape whose weights are never initialised (meta device, then uninitialised CPU storage:
  PEFT only reads the adapter's own tensors), wrapped by PEFT's get_peft_model with rank r, alpha = r,
  targets q/k/v/o, init_lora_weights=False (so A and B both keep nn.Linear's random init: non-zero),
  torch.manual_seed(seed) per adapter, save_pretrained, then converted by the llama.cpp converter
  (--base: the saved config.json; --outtype f16). Files: lora-NN.gguf.

Shapes: --shape bench (the TinyLlama-1.1B shape of converters/python/make_bench_model.py) or tiny
(converters/python/make_model_fixtures.py's llama fixture: d 64, 3 layers, 4/2 heads, FFN 128,
vocab 320). Deterministic for a given torch/PEFT version (recorded in adapters.json).

    python3 bench/tenants/make_adapters.py OUT_DIR --shape bench --iapt 16 --lora 16 \
        --convert VENDOR/llama.cpp/convert_lora_to_gguf.py

The committed smoke fixtures (bench/tenants/fixtures) are `--shape tiny --iapt 2 --lora 2`
(bench/tenants/fixtures/regenerate.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# name: n_embd, n_layer, n_head, n_head_kv, n_ff, vocab, context
SHAPES = {
    "bench": (2048, 22, 32, 4, 5632, 32000, 2048),
    "tiny": (64, 3, 4, 2, 128, 320, 256),
}
# The paper's LLaMA-2-7B generator: d = 4096, bottleneck 320 (shared/design/iapt-v1.md).
PAPER_D, PAPER_R = 4096, 320


def paper_bottleneck(d: int) -> int:
    """r with the paper's ratio r/d = 320/4096, at least 4."""
    return max(4, round(d * PAPER_R / PAPER_D))


def save_safetensors(path: Path, tensors: dict, metadata: dict):
    """safetensors with a canonical header (sorted keys, tensors in name order): the same bytes every
    time (safetensors' own writer orders the metadata by a hash map)."""
    header, offset, blobs = {"__metadata__": dict(sorted(metadata.items()))}, 0, []
    dtypes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        b = a.tobytes()
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for b in blobs:
            f.write(b)


def write_iapt(path: Path, seed: int, d: int, n_layer: int, r: int, m: int) -> int:
    """One random IAPT adapter (same construction as make_bench_model.py's); returns its parameter count."""
    rng = np.random.default_rng(seed)
    t = {}
    for l in range(n_layer):
        b = f"iapt.blk.{l}."
        t[b + "down.weight"] = (rng.standard_normal((r, d), dtype=np.float32) / math.sqrt(d)).astype(np.float16)
        t[b + "down.bias"] = np.zeros(r, dtype=np.float16)
        t[b + "pool.query"] = rng.standard_normal((m, r), dtype=np.float32).astype(np.float16)
        t[b + "up.weight"] = (rng.standard_normal((d, r), dtype=np.float32) / math.sqrt(r)).astype(np.float16)
        t[b + "up.bias"] = np.zeros(d, dtype=np.float16)
        t[b + "act.num"] = (rng.uniform(-1, 1, (1, 7)) * 0.5 ** np.arange(7)).astype(np.float16)
        t[b + "act.den"] = (rng.uniform(-1, 1, (1, 5)) * 0.5 ** np.arange(1, 6)).astype(np.float16)
    meta = {
        "iapt.spec_version": "1.0", "iapt.n_layer": str(n_layer), "iapt.n_embd": str(d), "iapt.n_soft_tokens": str(m),
        "iapt.bottleneck": str(r), "iapt.activation": "rational", "iapt.pool.type": "query", "iapt.pool.scale": "1.0",
        "iapt.base_model.arch": "llama", "iapt.rational.variant": "B", "iapt.rational.numerator_degree": "6",
        "iapt.rational.denominator_degree": "5", "iapt.rational.groups": "1",
    }
    save_safetensors(path, t, meta)
    return sum(a.size for a in t.values())


def write_loras(out: Path, n: int, seed0: int, shape: tuple, rank: int, convert: Path) -> dict:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    d, n_layer, n_head, n_head_kv, n_ff, vocab, ctx = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=n_ff, num_hidden_layers=n_layer,
                      num_attention_heads=n_head, num_key_value_heads=n_head_kv, max_position_embeddings=ctx,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      architectures=["LlamaForCausalLM"])
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "rank": rank, "alpha": rank, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "files": []}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        cfg.save_pretrained(base_dir)  # what the converter reads (config only, no weights)
        for i in range(n):
            with torch.device("meta"):
                model = LlamaForCausalLM(cfg)
            # Uninitialised CPU storage: never read (only the adapter's tensors are saved), and
            # untouched pages cost no memory.
            model = model.to_empty(device="cpu")
            torch.manual_seed(seed0 + i)
            lcfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
            pm = get_peft_model(model, lcfg)
            n_params = 0
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    n_params += p.numel()
                    if not torch.isfinite(p.detach()).all() or float(p.detach().abs().max()) == 0.0:
                        sys.exit(f"make_adapters: LoRA tensor {name} is zero or not finite")
            peft_dir = Path(tmp) / f"peft-{i:02d}"
            pm.save_pretrained(peft_dir)
            dst = out / f"lora-{i:02d}.gguf"
            cmd = [sys.executable, str(convert), "--base", str(base_dir), "--outtype", "f16", "--outfile", str(dst),
                   str(peft_dir)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not dst.is_file():
                sys.exit(f"make_adapters: {' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            info["files"].append({"file": dst.name, "seed": seed0 + i, "params": n_params, "bytes": dst.stat().st_size})
            print(f"wrote {dst} ({n_params} LoRA parameters)", flush=True)
            del pm, model
    return info


def main():
    ap = argparse.ArgumentParser(description="IAPT and LoRA adapters for the tenants benchmark.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--iapt", type=int, default=16, metavar="N", help="IAPT adapters to write (default 16)")
    ap.add_argument("--lora", type=int, default=16, metavar="N", help="LoRA adapters to write (default 16)")
    ap.add_argument("--bottleneck", type=int, default=0, metavar="R", help="IAPT r (default: the paper's ratio, 320/4096 of d)")
    ap.add_argument("--soft-tokens", type=int, default=4, metavar="M")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=14000, help="first seed (adapter i uses seed + i)")
    ap.add_argument("--convert", type=Path, help="llama.cpp's convert_lora_to_gguf.py (needed with --lora > 0)")
    a = ap.parse_args()
    shape = SHAPES[a.shape]
    d, n_layer = shape[0], shape[1]
    r = a.bottleneck or paper_bottleneck(d)
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the converter and PEFT must not look anything up

    info = {"shape": a.shape, "n_embd": d, "n_layer": n_layer, "iapt": {"bottleneck": r, "soft_tokens": a.soft_tokens,
                                                                       "files": []}}
    for i in range(a.iapt):
        p = a.out / f"iapt-{i:02d}.safetensors"
        n_params = write_iapt(p, a.seed + 1000 + i, d, n_layer, r, a.soft_tokens)
        info["iapt"]["files"].append({"file": p.name, "seed": a.seed + 1000 + i, "params": n_params,
                                      "bytes": p.stat().st_size})
        print(f"wrote {p} ({n_params} IAPT parameters, r {r}, m {a.soft_tokens})", flush=True)
    if a.lora:
        if not a.convert or not a.convert.is_file():
            ap.error("--lora needs --convert PATH/convert_lora_to_gguf.py")
        info["lora"] = write_loras(a.out, a.lora, a.seed, shape, a.lora_rank, a.convert)
    (a.out / "adapters.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
