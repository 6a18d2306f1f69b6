"""The base architectures IAPT can be trained on here: those the llama.cpp hook of this toolkit
supports (`crates/llama/src/arch.rs`), by their Hugging Face `model_type`."""

from __future__ import annotations

from torch import nn

#: Hugging Face `config.model_type` -> llama.cpp `general.architecture` (spec `iapt.base_model.arch`).
#: Mistral checkpoints are converted by llama.cpp to the `llama` architecture.
HF_TO_LLAMA_CPP = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}


def llama_cpp_arch(model) -> str:
    """The llama.cpp architecture name of a supported Hugging Face causal LM; ValueError otherwise."""
    mt = getattr(model.config, "model_type", None)
    if mt not in HF_TO_LLAMA_CPP:
        hint = " (load Gemma 3 as text only, Gemma3ForCausalLM)" if mt == "gemma3" else ""
        raise ValueError(f"model_type {mt!r} is not supported{hint}; supported: {', '.join(sorted(HF_TO_LLAMA_CPP))}")
    return HF_TO_LLAMA_CPP[mt]


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers` for every supported family). Each
    layer's first argument (or `hidden_states` keyword) is the residual stream entering it: for
    Gemma after the sqrt(d) embedding scaling, as spec v1 requires."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError("cannot find the decoder layers (expected model.model.layers)")
    return layers


def dims(model) -> tuple[int, int]:
    """(n_layer, n_embd) of the base model, as `iapt.n_layer` / `iapt.n_embd` must say."""
    cfg = model.config
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)
