"""Tiny models for the tests, made locally (no download).

- `load_gguf_model(path)`: the committed F32 GGUF fixtures of the llama.cpp parity tests
  (`converters/python/fixtures/models/*-tiny-f32.gguf`, random weights, 3 layers, d = 64) read back
  into the Hugging Face model they were made from: the configuration from the GGUF keys, the
  tensors with llama.cpp's conversions undone (the q/k row permutation of `llama`; the `+ 1` that
  llama.cpp's converter adds to Gemma's RMSNorm weights). The chain test runs the same weights in
  llama.cpp (`iapt run`) and in PyTorch.
- `tiny_tokenizer()`: a word-level `tokenizers` tokenizer with BOS/EOS and a chat template.
- `random_llama()`: a small random Llama for the tests that need no GGUF.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _fields(reader):
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 - fields gguf-py cannot decode are not needed here
            pass
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary pairs) -> Hugging Face's (halves), per head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_model(path, arch_override: str | None = None):
    """(hf_model float32 eval, arch) from a committed tiny F32 GGUF. `arch_override="mistral"`
    loads a llama GGUF as MistralForCausalLM (llama.cpp converts Mistral to `llama`)."""
    import gguf
    import transformers as tf

    r = gguf.GGUFReader(str(path))
    kv = _fields(r)
    arch = kv["general.architecture"]
    t = {x.name: np.array(x.data, dtype=np.float32) for x in r.tensors}
    k = lambda name, default=None: kv.get(f"{arch}.{name}", default)  # noqa: E731
    d, n_layer = int(k("embedding_length")), int(k("block_count"))
    n_head, n_kv = int(k("attention.head_count")), int(k("attention.head_count_kv"))
    head_dim = int(k("attention.key_length", d // n_head))
    vocab = t["token_embd.weight"].shape[0]
    common = dict(vocab_size=vocab, hidden_size=d, intermediate_size=int(k("feed_forward_length")),
                  num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
                  max_position_embeddings=int(k("context_length")), rms_norm_eps=float(k("attention.layer_norm_rms_epsilon")),
                  rope_theta=float(k("rope.freq_base", 10000.0)), bos_token_id=1, eos_token_id=2)
    sd = {}
    norm_offset = 0.0
    if arch == "llama":
        cls_cfg, cls_model = ((tf.MistralConfig, tf.MistralForCausalLM) if arch_override == "mistral"
                              else (tf.LlamaConfig, tf.LlamaForCausalLM))
        extra = dict(sliding_window=None) if arch_override == "mistral" else {}
        cfg = cls_cfg(tie_word_embeddings=False, head_dim=head_dim, **extra, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(tie_word_embeddings=False, **common)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(tie_word_embeddings=False, head_dim=head_dim, attention_bias=False, **common)
    elif arch == "gemma2":
        norm_offset = 1.0
        cfg = tf.Gemma2Config(tie_word_embeddings=True, pad_token_id=0, head_dim=head_dim,
                              query_pre_attn_scalar=head_dim, sliding_window=int(k("attention.sliding_window")),
                              attn_logit_softcapping=float(k("attn_logit_softcapping")),
                              final_logit_softcapping=float(k("final_logit_softcapping")),
                              hidden_activation="gelu_pytorch_tanh", attn_implementation="eager", **common)
    elif arch == "gemma3":
        norm_offset = 1.0
        common.pop("rope_theta")
        cfg = tf.Gemma3TextConfig(tie_word_embeddings=True, pad_token_id=0, head_dim=head_dim,
                                  query_pre_attn_scalar=head_dim, sliding_window=int(k("attention.sliding_window")),
                                  hidden_activation="gelu_pytorch_tanh", attn_implementation="eager", **common)
        rp = getattr(cfg, "rope_parameters", None) or {}
        # transformers' defaults must be the GGUF's RoPE bases (global and sliding-window layers).
        thetas = {v.get("rope_theta") for v in rp.values()} if isinstance(rp, dict) and all(
            isinstance(v, dict) for v in rp.values()) else set()
        if thetas and thetas != {float(k("rope.freq_base")), float(k("rope.freq_base_swa"))}:
            raise ValueError(f"gemma3 RoPE bases {thetas} differ from the GGUF's")
    elif arch == "phi3":
        common.update(pad_token_id=0)
        cfg = tf.Phi3Config(tie_word_embeddings=False, original_max_position_embeddings=common["max_position_embeddings"],
                            sliding_window=None, attn_implementation="eager", **common)
    else:
        raise ValueError(f"no loader for {arch}")
    with torch.device("cpu"):
        model = {"llama": cls_model if arch == "llama" else None, "qwen2": tf.Qwen2ForCausalLM,
                 "qwen3": tf.Qwen3ForCausalLM, "gemma2": tf.Gemma2ForCausalLM, "gemma3": tf.Gemma3ForCausalLM,
                 "phi3": tf.Phi3ForCausalLM}[arch](cfg)
    sd["model.embed_tokens.weight"] = t["token_embd.weight"]
    sd["model.norm.weight"] = t["output_norm.weight"] - norm_offset
    if "output.weight" in t:
        sd["lm_head.weight"] = t["output.weight"]
    for l in range(n_layer):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        sd[p + "input_layernorm.weight"] = t[b + "attn_norm.weight"] - norm_offset
        sd[p + "self_attn.o_proj.weight"] = t[b + "attn_output.weight"]
        sd[p + "mlp.down_proj.weight"] = t[b + "ffn_down.weight"]
        if arch == "phi3":
            sd[p + "self_attn.qkv_proj.weight"] = t[b + "attn_qkv.weight"]
            sd[p + "mlp.gate_up_proj.weight"] = t[b + "ffn_up.weight"]
            sd[p + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
            continue
        q, kk = t[b + "attn_q.weight"], t[b + "attn_k.weight"]
        if arch == "llama":
            q, kk = unpermute(q, n_head), unpermute(kk, n_kv)
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"] = q, kk
        sd[p + "self_attn.v_proj.weight"] = t[b + "attn_v.weight"]
        sd[p + "mlp.gate_proj.weight"] = t[b + "ffn_gate.weight"]
        sd[p + "mlp.up_proj.weight"] = t[b + "ffn_up.weight"]
        if arch == "qwen2":
            for x in "qkv":
                sd[p + f"self_attn.{x}_proj.bias"] = t[b + f"attn_{x}.bias"]
        if arch in ("qwen3", "gemma3"):
            sd[p + "self_attn.q_norm.weight"] = t[b + "attn_q_norm.weight"] - norm_offset
            sd[p + "self_attn.k_norm.weight"] = t[b + "attn_k_norm.weight"] - norm_offset
        if arch in ("gemma2", "gemma3"):
            sd[p + "post_attention_layernorm.weight"] = t[b + "post_attention_norm.weight"] - 1.0
            sd[p + "pre_feedforward_layernorm.weight"] = t[b + "ffn_norm.weight"] - 1.0
            sd[p + "post_feedforward_layernorm.weight"] = t[b + "post_ffw_norm.weight"] - 1.0
        else:
            sd[p + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
    state = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model, arch


class GgmlCpuGelu(torch.nn.Module):
    """GELU (tanh form) as ggml's CPU backend computes it (ggml-cpu/vec.h, GGML_GELU_FP16): the input
    rounded to f16 and looked up in a table of f16 results, exact outside (-10, 10). The same
    emulation as converters/python/make_model_fixtures.py: it alone moves Gemma's logits by ~3e-4,
    so an exact comparison with llama.cpp on the CPU uses it."""

    def forward(self, x):
        x16 = x.to(torch.float16).to(x.dtype)
        y = 0.5 * x16 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x16 * (1.0 + 0.044715 * x16 * x16)))
        y = y.to(torch.float16).to(x.dtype)
        return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


WORDS = ["apple", "bird", "cake", "door", "egg", "fish", "goat", "hat", "ink", "jam", "kite", "lamp",
         "moon", "nest", "owl", "pen", "reverse", "sort", "the", "words", "list", ":", "first", "last", "say"]

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(chat: bool = True):
    """A word-level tokenizer: <unk> 0, <s> 1, </s> 2, <pad> 3, <|user|> 4, <|assistant|> 5,
    <|system|> 6, then WORDS; BOS added to plain text; with `chat`, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=specials[4:])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def word_records(n: int, seed: int = 0, task: str = "reverse"):
    """{"instruction", "response"} records of a toy task over WORDS[:16]."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.sample(WORDS[:16], rng.randint(2, 4))
        if task == "reverse":
            resp = " ".join(reversed(w))
        else:
            resp = w[0]
        out.append({"instruction": f"{task} the words : {' '.join(w)}", "response": resp})
    return out


def random_llama(seed: int = 0, vocab: int = 64, d: int = 32, layers: int = 2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      initializer_range=1.0 / math.sqrt(d))
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # embeddings of unit scale, as a trained model's residual stream has
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model = model.to(dtype)
    model.eval()
    return model
