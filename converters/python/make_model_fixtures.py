#!/usr/bin/env python3
"""Builds the model fixtures for the llama.cpp parity tests (crates/llama/tests/parity.rs).

For each architecture it makes a tiny Hugging Face model with random weights (3 layers, d = 64, GQA
4/2 heads), an F32 GGUF of it, a random IAPT adapter (safetensors, spec v1 metadata, rational B
activation), and reference outputs computed by Hugging Face transformers in float64 with the
injection of iapt_torch.py: 16 greedy steps, the tokens and the logits of every step.

- llama (Llama 2/3 style), qwen2 (q/k/v biases), qwen3 (q/k RMSNorm): the GGUF is written with
  gguf-py directly (with the q/k row permutation llama.cpp's HF converter applies to llama, none for
  qwen2/qwen3) and a small SentencePiece-style vocab with byte fallback (320 tokens).
- gemma2 (embeddings scaled by sqrt(d), post-norms around attention and FFN, attention and final
  logit soft-capping, GELU-tanh), gemma3 (as gemma2 with q/k RMSNorm, no soft-capping, local and
  global RoPE bases), phi3 (fused qkv and gate/up projections): the HF model is saved with
  save_pretrained beside the demo's SentencePiece tokenizer (demo/assets/tokenizer.model, 512
  pieces) and converted by llama.cpp's own convert_hf_to_gguf.py (--llama-cpp: a llama.cpp tree with
  convert_hf_to_gguf.py, conversion/ and gguf-py/). Every sliding window is set to the context
  length (256), so sliding-window attention equals full attention for every sequence the tests run.

Usage: python3 converters/python/make_model_fixtures.py [--llama-cpp DIR] [OUT_DIR [ARCH,ARCH,...]]
(default: converters/python/fixtures/models, every architecture). Deterministic for a given torch
version; the cases of architectures not rebuilt are kept.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

import gguf
import iapt_torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

# Every architecture, in the order of their seeds (1000 + i, 2000 + i, 3000 + i): append, never reorder.
ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
# Converted from a saved HF model by llama.cpp's convert_hf_to_gguf.py (the others: gguf-py directly).
HF_CONVERTED = {"gemma2", "gemma3", "phi3"}
DEMO_TOKENIZER = Path(__file__).parent / "demo" / "assets" / "tokenizer.model"
SPM_VOCAB = 512  # pieces in DEMO_TOKENIZER

N_LAYER = 3
D = 64
N_HEAD = 4
N_HEAD_KV = 2
FFN = 128
CTX = 256
STEPS = 16
M = 4  # soft tokens
R = 16  # bottleneck
WORDS = ["▁the", "▁and", "▁of", "▁to", "▁is", "▁in", "▁it", "▁you"]


def vocab():
    """SPM-style vocab: <unk>, <s>, </s>, 256 byte tokens, '▁', '▁a'..'▁z', 'a'..'z', a few words."""
    toks, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        toks.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    pieces = [("▁", -4.0)] + [("▁" + c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(w, -1.0) for w in WORDS]
    for p, s in pieces:
        toks.append(p)
        scores.append(s)
        types.append(1)
    return toks, scores, types


TOKENS, SCORES, TYPES = vocab()
VOCAB = len(TOKENS)

CHAT_TEMPLATES = {
    "llama": "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}",
    "qwen3": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "qwen2": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
}


def make_hf(arch: str, seed: int):
    vocab_size = SPM_VOCAB if arch in HF_CONVERTED else VOCAB
    common = dict(vocab_size=vocab_size, hidden_size=D, intermediate_size=FFN, num_hidden_layers=N_LAYER,
                  num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, max_position_embeddings=CTX,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = LlamaConfig(rms_norm_eps=1e-5, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(rms_norm_eps=1e-6, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = Qwen3Config(rms_norm_eps=1e-6, head_dim=D // N_HEAD, attention_bias=False, **common)
        model = Qwen3ForCausalLM(cfg)
    elif arch == "gemma2":
        # Tied embeddings (llama.cpp's gemma2 has no output tensor); query_pre_attn_scalar = head_dim is
        # the scale llama.cpp uses for every size but 27B.
        common.update(tie_word_embeddings=True, pad_token_id=0)
        cfg = Gemma2Config(rms_norm_eps=1e-6, head_dim=D // N_HEAD, query_pre_attn_scalar=D // N_HEAD,
                           sliding_window=CTX, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                           hidden_activation="gelu_pytorch_tanh", attn_implementation="eager", **common)
        model = Gemma2ForCausalLM(cfg)
    elif arch == "gemma3":
        common.update(tie_word_embeddings=True, pad_token_id=0)
        cfg = Gemma3TextConfig(rms_norm_eps=1e-6, head_dim=D // N_HEAD, query_pre_attn_scalar=D // N_HEAD,
                               sliding_window=CTX, hidden_activation="gelu_pytorch_tanh",
                               attn_implementation="eager", **common)
        model = Gemma3ForCausalLM(cfg)
    elif arch == "phi3":
        # One added token after the SentencePiece pieces, <|endoftext|>, as Phi-3's own vocabulary has
        # (llama.cpp's vocabulary loader looks it up in models named phi3).
        common.update(pad_token_id=0, vocab_size=SPM_VOCAB + 1)
        cfg = Phi3Config(rms_norm_eps=1e-5, original_max_position_embeddings=CTX, sliding_window=None,
                         attn_implementation="eager", **common)
        model = Phi3ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown architecture {arch}")
    # Gemma's RMSNorm scales by (1 + weight): centre its weights on 0 (llama.cpp's converter adds the 1).
    norm_centre = 0.0 if arch.startswith("gemma") else 1.0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(norm_centre + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lm_head" in name:
                p.copy_(3.0 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return cfg, model


def rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout (halves) -> GGUF/llama.cpp layout (interleaved pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(arch: str, cfg, model, path: Path):
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"iapt-tiny-{arch}")
    w.add_file_type(0)  # ALL_F32
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(D // N_HEAD)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores(SCORES)
    w.add_token_types(TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATES[arch])

    def t(name, arr):
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    t("token_embd.weight", sd["model.embed_tokens.weight"])
    for l in range(N_LAYER):
        p = f"model.layers.{l}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute(q, N_HEAD), permute(k, N_HEAD_KV)
        t(f"blk.{l}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        t(f"blk.{l}.attn_q.weight", q)
        t(f"blk.{l}.attn_k.weight", k)
        t(f"blk.{l}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        if arch == "qwen2":
            t(f"blk.{l}.attn_q.bias", sd[p + "self_attn.q_proj.bias"])
            t(f"blk.{l}.attn_k.bias", sd[p + "self_attn.k_proj.bias"])
            t(f"blk.{l}.attn_v.bias", sd[p + "self_attn.v_proj.bias"])
        if arch == "qwen3":
            t(f"blk.{l}.attn_q_norm.weight", sd[p + "self_attn.q_norm.weight"])
            t(f"blk.{l}.attn_k_norm.weight", sd[p + "self_attn.k_norm.weight"])
        t(f"blk.{l}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        t(f"blk.{l}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        t(f"blk.{l}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        t(f"blk.{l}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        t(f"blk.{l}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    t("output_norm.weight", sd["model.norm.weight"])
    t("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def convert_hf(arch: str, model, llama_cpp: Path, path: Path):
    """save_pretrained (float32) beside the demo's SentencePiece tokenizer, then llama.cpp's own
    convert_hf_to_gguf.py to an F32 GGUF."""
    conv = llama_cpp / "convert_hf_to_gguf.py"
    if not (conv.is_file() and (llama_cpp / "conversion").is_dir() and (llama_cpp / "gguf-py").is_dir()):
        sys.exit(f"--llama-cpp {llama_cpp}: needs convert_hf_to_gguf.py, conversion/ and gguf-py/ "
                 "(e.g. vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist)")
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / f"{arch}-hf"
        model.to(torch.float32).save_pretrained(hf, safe_serialization=True)
        shutil.copy(DEMO_TOKENIZER, hf / "tokenizer.model")
        if arch == "phi3":
            (hf / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": SPM_VOCAB}))
        (hf / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "chat_template": CHAT_TEMPLATES["llama"]}, indent=1))
        cmd = [sys.executable, str(conv), str(hf), "--outtype", "f32", "--model-name", f"iapt-tiny-{arch}",
               "--outfile", str(path)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def make_adapter(arch: str, seed: int, path: Path) -> iapt_torch.Generator:
    """A random rational-B (6, 5) adapter, written as spec v1 safetensors."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for l in range(N_LAYER):
        b = f"iapt.blk.{l}."
        tensors[b + "down.weight"] = (rng.standard_normal((R, D)) / math.sqrt(D)).astype(np.float32)
        tensors[b + "down.bias"] = (0.1 * rng.standard_normal(R)).astype(np.float32)
        tensors[b + "pool.query"] = rng.standard_normal((M, R)).astype(np.float32)
        tensors[b + "up.weight"] = (rng.standard_normal((D, R)) / math.sqrt(R)).astype(np.float32)
        tensors[b + "up.bias"] = (0.1 * rng.standard_normal(D)).astype(np.float32)
        tensors[b + "act.num"] = (rng.uniform(-1, 1, (1, 7)) * 0.5 ** np.arange(7)).astype(np.float32)
        tensors[b + "act.den"] = (rng.uniform(-1, 1, (1, 5)) * 0.5 ** np.arange(1, 6)).astype(np.float32)
    meta = {
        "iapt.spec_version": "1.0", "iapt.n_layer": str(N_LAYER), "iapt.n_embd": str(D),
        "iapt.n_soft_tokens": str(M), "iapt.bottleneck": str(R), "iapt.activation": "rational",
        "iapt.pool.type": "query", "iapt.pool.scale": "0.5", "iapt.base_model.arch": arch,
        "iapt.rational.variant": "B", "iapt.rational.numerator_degree": "6",
        "iapt.rational.denominator_degree": "5", "iapt.rational.groups": "1",
        "iapt.base_model.name": f"iapt-tiny-{arch}",
    }
    save_file(tensors, str(path), metadata=meta)
    return iapt_torch.Generator.from_tensors({k: torch.from_numpy(v).double() for k, v in tensors.items()}, meta)


class GgmlCpuGelu(torch.nn.Module):
    """GELU (tanh form) as ggml's CPU backend computes it in the pinned llama.cpp (ggml-cpu/vec.h,
    GGML_GELU_FP16): the input rounded to f16 and looked up in a table of f16 results, exact outside
    (-10, 10). Used only for the `logits_ggml_cpu` reference of the GELU architectures (Gemma)."""

    def forward(self, x):
        x16 = x.to(torch.float16).to(x.dtype)
        y = 0.5 * x16 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x16 * (1.0 + 0.044715 * x16 * x16)))
        y = y.to(torch.float16).to(x.dtype)
        return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


def with_ggml_cpu_gelu(model):
    """A copy of a Gemma model whose MLPs use GgmlCpuGelu."""
    import copy
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        layer.mlp.act_fn = GgmlCpuGelu()
    return m


def greedy(model, prompt: list[int], steps: int, injection_n: int | None, gen: iapt_torch.Generator | None):
    """Greedy decoding by full recomputation (no KV cache) in float64; returns (tokens, logits)."""
    hooks = iapt_torch.Injection(model.model.layers, gen, injection_n) if gen is not None else None
    seq = list(prompt)
    toks, logits = [], []
    try:
        with torch.no_grad():
            for _ in range(steps):
                out = model(torch.tensor([seq]), use_cache=False)
                row = out.logits[0, -1].to(torch.float64)
                tok = int(torch.argmax(row))
                logits.append(row.numpy())
                toks.append(tok)
                seq.append(tok)
    finally:
        if hooks is not None:
            hooks.remove()
    return toks, np.stack(logits)


MIN_GAP = 0.15


def min_gap(logits: np.ndarray) -> float:
    s = np.sort(logits, axis=1)
    return float((s[:, -1] - s[:, -2]).min())


def add_ggml_cpu_reference(arch, model, case, out: Path, prompt, n, gen):
    """For the GELU architectures, a second reference with ggml-cpu's f16 GELU table (same tokens,
    else the fixture is refused): the exact-mode parity bound (1e-4) holds against it on the CPU
    backend, while the plain reference differs from llama.cpp by that table's rounding (~3e-4)."""
    if not arch.startswith("gemma"):
        return
    toks, logits = greedy(with_ggml_cpu_gelu(model), prompt, STEPS, n, gen)
    if toks != case["tokens"]:
        sys.exit(f"{case['name']}: greedy tokens differ with ggml-cpu's GELU table")
    name = f"{case['name']}.ggml-cpu-gelu.logits.npy"
    np.save(out / name, logits)
    case["logits_ggml_cpu"] = name


def main():
    args = sys.argv[1:]
    llama_cpp = Path("/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp")
    if args[:1] == ["--llama-cpp"]:
        llama_cpp, args = Path(args[1]), args[2:]
    out = Path(args[0]) if args else Path(__file__).parent / "fixtures" / "models"
    out.mkdir(parents=True, exist_ok=True)
    iapt_torch.rmsnorm_in_input_dtype(modeling_llama.LlamaRMSNorm)
    iapt_torch.rmsnorm_in_input_dtype(modeling_qwen2.Qwen2RMSNorm)
    iapt_torch.rmsnorm_in_input_dtype(modeling_qwen3.Qwen3RMSNorm)
    iapt_torch.rmsnorm_in_input_dtype(modeling_phi3.Phi3RMSNorm)
    iapt_torch.rmsnorm_in_input_dtype(modeling_gemma2.Gemma2RMSNorm, offset=1.0)
    iapt_torch.rmsnorm_in_input_dtype(modeling_gemma3.Gemma3RMSNorm, offset=1.0)
    torch.manual_seed(0)
    manifest = {"steps": STEPS, "n_soft_tokens": M, "cases": []}
    archs = args[1].split(",") if len(args) > 1 else ARCHS
    old = out / "manifest.json"
    if old.exists():  # keep the cases of architectures not rebuilt this time
        manifest["cases"] = [c for c in json.loads(old.read_text())["cases"] if c["arch"] not in archs]
    for i, arch in enumerate(ARCHS):
        if arch not in archs:
            continue
        cfg, model = make_hf(arch, 1000 + i)
        model.eval()
        gguf_path = out / f"{arch}-tiny-f32.gguf"
        if arch in HF_CONVERTED:
            convert_hf(arch, model, llama_cpp, gguf_path)
        model = model.double().eval()
        if arch not in HF_CONVERTED:
            write_gguf(arch, cfg, model, gguf_path)
        vocab_size = cfg.vocab_size
        adapter_path = out / f"{arch}-tiny.iapt.safetensors"
        gen = make_adapter(arch, 2000 + i, adapter_path)
        rng = np.random.default_rng(3000 + i)
        for label, n in [("short", 12), ("long", 30)]:
            placeholders = [0] * M  # ids do not matter: the rows are replaced at every layer
            # Draw instructions until every greedy step has a clear winner (top-1 minus top-2 logit
            # >= MIN_GAP), so that F16 KV-cache and quantized runs can be held to identical tokens.
            while True:
                instr = [1] + [int(x) for x in rng.integers(3, vocab_size, n - 1)]
                toks, logits = greedy(model, instr + placeholders, STEPS, n, gen)
                if min_gap(logits) < MIN_GAP:
                    continue
                if label == "short" and min_gap(greedy(model, instr, STEPS, None, None)[1]) < MIN_GAP:
                    continue
                break
            name = f"{arch}-{label}-iapt"
            np.save(out / f"{name}.logits.npy", logits)
            case = {"name": name, "arch": arch, "model": gguf_path.name, "adapter": adapter_path.name,
                    "instruction": instr, "n_instr": n, "placeholders": placeholders, "tokens": toks,
                    "logits": f"{name}.logits.npy"}
            add_ggml_cpu_reference(arch, model, case, out, instr + placeholders, n, gen)
            manifest["cases"].append(case)
            if label == "short":
                toks, logits = greedy(model, instr, STEPS, None, None)
                name = f"{arch}-{label}-base"
                np.save(out / f"{name}.logits.npy", logits)
                case = {"name": name, "arch": arch, "model": gguf_path.name, "adapter": None,
                        "instruction": instr, "n_instr": n, "placeholders": [], "tokens": toks,
                        "logits": f"{name}.logits.npy"}
                add_ggml_cpu_reference(arch, model, case, out, instr, None, None)
                manifest["cases"].append(case)
    manifest["generated_by"] = f"make_model_fixtures.py (torch {torch.__version__})"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest['cases'])} cases to {out}")


if __name__ == "__main__":
    main()
