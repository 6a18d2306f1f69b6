"""The injection (spec v1, "Injection into the base model") against the repository's independent
PyTorch twin (converters/python/iapt_torch.py), and its properties: per-row instruction lengths,
slot ids that do not matter, instruction rows untouched, generate() = prefill + plain decoding."""

import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from iapt_train import IaptConfig, get_iapt_model
from iapt_train.io import read_safetensors
from tinymodels import random_llama

sys.path.insert(0, str(REPO / "converters" / "python"))
import iapt_torch  # noqa: E402


def perturbed(model, seed=5, scale=0.5):
    """Makes every generator tensor non-trivial (up.weight starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.generators.named_parameters():
            # Rational coefficients move less: a wild rational makes Horner's rule and power sums
            # (the twin's) differ by more than rounding.
            s = scale * (0.1 if ".act." in name else 1.0)
            p.add_(s * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            p.copy_(p.float().to(p.dtype))  # values a float32 file holds exactly
    return model


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    base = random_llama(seed=3).double()
    torch.manual_seed(4)
    model = perturbed(get_iapt_model(base, IaptConfig(n_soft_tokens=3, bottleneck=8, rational_groups=2)).double())
    return model


def test_matches_the_independent_pytorch_twin(llama64, tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    # transformers' RMSNorm computes in float32 even in a float64 model: compute in float64 here,
    # so that the two implementations are compared at float64 precision.
    orig = modeling_llama.LlamaRMSNorm.forward
    iapt_torch.rmsnorm_in_input_dtype(modeling_llama.LlamaRMSNorm)
    patched = modeling_llama.LlamaRMSNorm.forward
    modeling_llama.LlamaRMSNorm.forward = orig
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", patched)
    model = llama64
    path = model.save_pretrained(tmp_path)
    tensors, meta = read_safetensors(path)
    # The twin parses iapt.pool.scale as a float64 ("0.35355338"); the spec says the f32 value is
    # used (0.3535533845424652...), as this package does: give the twin that value.
    meta = dict(meta, **{"iapt.pool.scale": repr(float(np.float32(meta["iapt.pool.scale"])))})
    twin = iapt_torch.Generator.from_tensors({k: v.double() for k, v in tensors.items()}, meta)
    n, m = 7, 3
    ids = torch.tensor([[1] + list(range(10, 16)) + [0] * m + [20, 21, 22]])
    with torch.no_grad():
        ours = model(input_ids=ids, instruction_lengths=torch.tensor([n]), use_cache=False).logits
        hooks = iapt_torch.Injection(model.base_model.model.layers, twin, n)
        try:
            with model.disable_adapter():
                theirs = model(input_ids=ids, use_cache=False).logits
        finally:
            hooks.remove()
        base = model.base_model(input_ids=ids, use_cache=False).logits
    assert (ours - theirs).abs().max() <= 1e-10 * theirs.abs().max()
    # The adapter changes the soft rows and everything after them, and nothing before them.
    assert torch.equal(ours[:, :n], base[:, :n])
    assert (ours[:, n:] - base[:, n:]).abs().max() > 1e-2


def test_ragged_batch_equals_rows_one_by_one(llama64):
    model = llama64
    m = 3
    rows = [([1, 10, 11], [30, 31, 2]), ([1, 12, 13, 14, 15, 16], [32, 2])]
    batch_ids, n = [], []
    T = max(len(a) + m + len(b) for a, b in rows)
    for a, b in rows:
        seq = a + [0] * m + b
        batch_ids.append(seq + [3] * (T - len(seq)))
        n.append(len(a))
    ids = torch.tensor(batch_ids)
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor([[len(a) + m + len(b)] for a, b in rows])).long()
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask, instruction_lengths=torch.tensor(n), use_cache=False).logits
        for i, (a, b) in enumerate(rows):
            L = len(a) + m + len(b)
            alone = model(input_ids=ids[i: i + 1, :L], instruction_lengths=torch.tensor([n[i]]), use_cache=False).logits
            assert (together[i, :L] - alone[0]).abs().max() < 1e-9


def test_slot_token_ids_do_not_matter(llama64):
    model = llama64
    a = torch.tensor([[1, 10, 11, 12, 0, 0, 0, 40, 41]])
    b = a.clone()
    b[0, 4:7] = torch.tensor([50, 51, 52])
    with torch.no_grad():
        la = model(input_ids=a, instruction_lengths=torch.tensor([4]), use_cache=False).logits
        lb = model(input_ids=b, instruction_lengths=torch.tensor([4]), use_cache=False).logits
    assert torch.equal(la, lb)


def test_forward_needs_instruction_lengths_and_room_for_the_slots(llama64):
    ids = torch.tensor([[1, 10, 11, 12, 0, 0]])
    with pytest.raises(ValueError, match="instruction_lengths"):
        llama64(input_ids=ids)
    with pytest.raises(ValueError, match="soft slots"):
        llama64(input_ids=ids, instruction_lengths=torch.tensor([4]))
    with pytest.raises(ValueError, match="n >= 1"):
        llama64(input_ids=ids, instruction_lengths=torch.tensor([0]))


def test_generate_is_prefill_with_soft_tokens_then_plain_decoding(llama64):
    model = llama64
    prompt = torch.tensor([[1, 10, 11, 12, 13]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=3)
    seq = out.sequences
    assert seq.shape == (1, 5 + 6) and torch.equal(seq[:, :5], prompt)  # the slot columns are removed
    new = seq[0, 5:].tolist()
    # Teacher-forced full forward (no KV cache) on instruction + slots + the generated tokens.
    full = torch.tensor([[1, 10, 11, 12, 13] + [model.slot_token_id] * 3 + new])
    with torch.no_grad():
        ref = model(input_ids=full, instruction_lengths=torch.tensor([5]), use_cache=False).logits[0]
    for k, step_logits in enumerate(out.logits):
        want = ref[5 + 3 - 1 + k]
        # generate() hands out float32 logits.
        assert (step_logits[0].double() - want).abs().max() <= 1e-6 * want.abs().max()
        assert int(want.argmax()) == new[k]


def test_generate_rows_of_different_lengths(llama64):
    model = llama64
    a, b = [1, 10, 11], [1, 12, 13, 14, 15]
    ids = torch.tensor([[3, 3] + a, b])  # left padding
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=3)
    for row, p in zip(out, [a, b]):
        alone = model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=3)[0]
        assert row[: alone.shape[0]].tolist() == alone.tolist()


def test_disable_adapter_is_the_base_model(llama64):
    ids = torch.tensor([[1, 10, 11, 12, 0, 0, 0, 40]])
    with torch.no_grad():
        with llama64.disable_adapter():
            a = llama64(input_ids=ids, use_cache=False).logits
        b = llama64.base_model(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)


def test_base_is_frozen_and_generators_train():
    base = random_llama(seed=0)
    model = get_iapt_model(base, n_soft_tokens=2, bottleneck=4, activation="gelu", layers=[-1])
    assert not any(p.requires_grad for p in model.base_model.parameters())
    assert all(p.requires_grad for p in model.generators[1].parameters())
    assert not any(p.requires_grad for p in model.generators[0].parameters())
    assert model.adapter_parameters(trainable_only=True) == sum(p.numel() for p in model.generators[1].parameters())
