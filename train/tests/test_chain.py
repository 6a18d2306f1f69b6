"""The chain, end to end on tiny random models (no download): train a few steps with the package,
save, `iapt validate --model`, then `iapt run` in exact mode (F32 KV cache, flash attention off, one
thread) must match the package's own forward to <= 1e-4 on the logits of every generated step.

The base models are the committed F32 GGUFs of the llama.cpp parity tests, read back into Hugging
Face transformers (tinymodels.load_gguf_model); before anything else each reconstruction is checked
against the committed float64 reference logits of its base model, so the two sides run the same
weights. The error measure is the parity tests' one: max |got - want| / max |want| per step.
"""

import numpy as np
import pytest
import torch

from conftest import FIXTURES, run_iapt, validate_json
from iapt_train import IaptConfig, IaptDataCollator, TrainArgs, get_iapt_model, train
from tinymodels import GgmlCpuGelu, load_gguf_model, tiny_tokenizer, word_records

import json

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
EXACT = ["--kv-type", "f32", "--flash-attn", "off", "--threads", "1", "--ctx-size", "256"]
TOL = 1e-4
STEPS = 8

CASES = {
    # name: (GGUF arch, HF class override, adapter config)
    "llama": ("llama", None, IaptConfig(n_soft_tokens=4, bottleneck=16, rational_groups=2)),
    "mistral": ("llama", "mistral", IaptConfig(n_soft_tokens=2, bottleneck=8, activation="gelu")),
    "qwen2": ("qwen2", None, IaptConfig(n_soft_tokens=3, bottleneck=12, rational_variant="C", rational_groups=3)),
    "qwen3": ("qwen3", None, IaptConfig(n_soft_tokens=4, bottleneck=16, activation="relu", down_bias=False)),
    "gemma2": ("gemma2", None, IaptConfig(n_soft_tokens=4, bottleneck=16, rational_variant="A", pool_scale=0.3)),
    "gemma3": ("gemma3", None, IaptConfig(n_soft_tokens=3, bottleneck=12, activation="gelu_tanh", up_bias=False)),
    "phi3": ("phi3", None, IaptConfig(n_soft_tokens=2, bottleneck=8, rational_variant="D", numerator_degree=4,
                                      denominator_degree=3)),
}


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_reconstruction(model, arch):
    """The HF model read back from the GGUF reproduces the committed float64 reference (made by
    transformers from the original weights) to f32 precision."""
    case = next(c for c in MANIFEST["cases"] if c["arch"] == arch and c["adapter"] is None)
    want = np.load(FIXTURES / case["logits"])
    seq = case["instruction"] + case["tokens"][:-1]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, len(case["instruction"]) - 1:].double().numpy()
    err = max(rel_err(g, w) for g, w in zip(got, want))
    assert err <= 1e-4, f"{arch}: the HF model read from the GGUF differs from the reference: {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_train_save_validate_run(name, tmp_path):
    arch, override, cfg = CASES[name]
    gguf_path = FIXTURES / f"{arch}-tiny-f32.gguf"
    base, gguf_arch = load_gguf_model(gguf_path, override)
    assert gguf_arch == arch
    check_reconstruction(base, arch)

    # Train a few steps on a toy task with the package's collator and loop.
    tok = tiny_tokenizer(chat=True)
    torch.manual_seed(0)
    model = get_iapt_model(base, cfg)
    before = {k: v.detach().clone() for k, v in model.generators.state_dict().items()}
    collator = IaptDataCollator(tok, model=model)
    records = word_records(24, seed=1)
    model.init_up_bias_from_batch(collator(records))
    log = train(model, collator, records, TrainArgs(steps=5, batch_size=8, lr=2e-2, warmup_steps=1, eval_every=0,
                                                    progress=False, seed=0))
    assert len(log) >= 2 and all(np.isfinite(e["loss"]) for e in log if "loss" in e)
    after = model.generators.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("up.weight"))

    # Save; the Rust validator accepts the file against the GGUF base model, with no finding at all.
    path = model.save_pretrained(tmp_path / "adapter")
    v = validate_json(path, gguf_path)
    assert v["rc"] == 0 and v["valid"] and v["findings"] == [] and v["base_model_arch"] == arch, v

    # iapt run (llama.cpp, exact mode) vs the package's generate() on the same instruction.
    instr = collator.encode_instruction("reverse the words : owl pen egg")
    npy = tmp_path / "logits.npy"
    run_iapt("run", "--model", gguf_path, "--adapter", path, "--prompt-tokens", ",".join(map(str, instr)),
             "--temp", "0", "--n-predict", STEPS, "--dump-logits", npy, *EXACT)
    theirs = np.load(npy).astype(np.float64)
    assert 3 <= theirs.shape[0] <= STEPS and theirs.shape[1] == base.config.vocab_size

    if arch.startswith("gemma"):
        # ggml's CPU GELU goes through an f16 table (see GgmlCpuGelu): emulate it for the comparison.
        for layer in base.model.layers:
            layer.mlp.act_fn = GgmlCpuGelu()
    ids = torch.tensor([instr])
    out = model.generate(ids, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0)
    ours = np.stack([x[0].double().numpy() for x in out.logits])
    k = theirs.shape[0]
    tokens = out.sequences[0, len(instr):].tolist()
    assert tokens[:k] == theirs.argmax(1).tolist()
    errs = [rel_err(theirs[i], ours[i]) for i in range(k)]
    assert max(errs) <= TOL, f"{name}: per-step relative errors {['%.1e' % e for e in errs]}"

    # The adapter matters: the base model alone on the same ids is far from these logits.
    with torch.no_grad(), model.disable_adapter():
        plain = base(input_ids=torch.tensor([instr + [0] * cfg.n_soft_tokens]), use_cache=False).logits[0, -1].double().numpy()
    lift = rel_err(plain, ours[0])
    print(f"\nchain {name}: {k} steps, max relative error iapt run vs package {max(errs):.1e}; "
          f"adapter vs base alone {lift:.2f}")
    assert lift > 100 * TOL
