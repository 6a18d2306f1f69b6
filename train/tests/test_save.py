"""save_pretrained writes what spec v1 asks (checked by the Rust validator and by `iapt pack`, which
rewrites a file canonically), and from_pretrained reads it back to the same function."""

import json
import struct

import pytest
import torch

from conftest import run_iapt, validate_json
from iapt_train import ADAPTER_FILE, IaptConfig, IaptModel, get_iapt_model
from iapt_train.io import float_text, read_safetensors
from tinymodels import random_llama

REQUIRED = {"iapt.spec_version", "iapt.n_layer", "iapt.n_embd", "iapt.n_soft_tokens", "iapt.bottleneck",
            "iapt.activation", "iapt.pool.type", "iapt.pool.scale", "iapt.base_model.arch"}
RATIONAL = {"iapt.rational.variant", "iapt.rational.numerator_degree", "iapt.rational.denominator_degree",
            "iapt.rational.groups"}


def trained_like(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.generators.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("cfg", [
    IaptConfig(n_soft_tokens=4, bottleneck=8),
    IaptConfig(n_soft_tokens=2, bottleneck=8, rational_variant="C", numerator_degree=3, denominator_degree=2,
               rational_groups=4, pool_scale=0.3),
    IaptConfig(n_soft_tokens=1, bottleneck=6, rational_variant="A", denominator_degree=0, rational_groups=3,
               down_bias=False),
    IaptConfig(n_soft_tokens=3, bottleneck=4, activation="gelu", up_bias=False, name="my adapter \"x\""),
], ids=["rational-b", "rational-c-g4", "rational-a-n0", "gelu-nobias"])
def test_file_is_valid_canonical_and_reads_back(cfg, tmp_path):
    torch.manual_seed(0)
    model = trained_like(get_iapt_model(random_llama(seed=1), cfg))
    path = model.save_pretrained(tmp_path / "out")
    assert path.endswith(ADAPTER_FILE)
    v = validate_json(path)
    assert v["rc"] == 0 and v["valid"] and v["findings"] == [], v
    # `iapt pack` writes the canonical file: ours already is, byte for byte.
    run_iapt("pack", path, "--output", tmp_path / "packed.safetensors")
    assert (tmp_path / "packed.safetensors").read_bytes() == open(path, "rb").read()
    # Through GGUF and back: the same bytes again.
    run_iapt("pack", path, "--output", tmp_path / "a.gguf")
    run_iapt("pack", tmp_path / "a.gguf", "--output", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == open(path, "rb").read()

    tensors, meta = read_safetensors(path)
    keys = set(meta)
    assert REQUIRED <= keys
    assert (RATIONAL <= keys) == cfg.is_rational and (keys & RATIONAL == set()) == (not cfg.is_rational)
    assert meta["iapt.n_layer"] == "2" and meta["iapt.n_embd"] == "32" and meta["iapt.base_model.arch"] == "llama"
    assert meta["iapt.pool.scale"] == float_text(cfg.pool_scale)
    assert ("iapt.blk.0.down.bias" in tensors) == cfg.down_bias
    assert ("iapt.blk.1.up.bias" in tensors) == cfg.up_bias
    assert len(tensors) == 2 * (3 + cfg.down_bias + cfg.up_bias + 2 * cfg.is_rational)

    again = IaptModel.from_pretrained(random_llama(seed=1), tmp_path / "out")
    ids = torch.tensor([[1, 5, 6, 7] + [0] * cfg.n_soft_tokens + [8, 9]])
    n = torch.tensor([4])
    with torch.no_grad():
        a = model(input_ids=ids, instruction_lengths=n).logits
        b = again(input_ids=ids, instruction_lengths=n).logits
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in again.parameters())


def test_pool_scale_default_is_inverse_sqrt_r_as_f32():
    assert IaptConfig(bottleneck=64).pool_scale == 0.125
    s = IaptConfig(bottleneck=10).pool_scale
    assert s != 10 ** -0.5 and abs(s - 10 ** -0.5) < 1e-8
    assert float_text(s) == "0.31622776"
    assert float_text(0.3) == "0.3" and float_text(1.0) == "1" and float_text(1e-7) == "0.0000001"


@pytest.mark.parametrize("dtype,name", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_precision_files(dtype, name, tmp_path):
    torch.manual_seed(0)
    model = trained_like(get_iapt_model(random_llama(seed=1), n_soft_tokens=2, bottleneck=8))
    path = model.save_pretrained(tmp_path, dtype=dtype)
    v = validate_json(path)
    assert v["rc"] == 0 and v["findings"] == [], v
    raw = open(path, "rb").read()
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["iapt.blk.0.down.weight"]["dtype"] == name
    assert header["iapt.blk.0.act.num"]["dtype"] == "F32"
    tensors, _ = read_safetensors(path)
    assert torch.equal(tensors["iapt.blk.1.up.weight"], model.generators[1].up.weight.detach().to(dtype))


def test_metadata_is_checked_against_the_model(tmp_path):
    torch.manual_seed(0)
    get_iapt_model(random_llama(seed=1), n_soft_tokens=2, bottleneck=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        IaptModel.from_pretrained(random_llama(seed=1, layers=3), tmp_path)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="not supported"):
        get_iapt_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)), IaptConfig())


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="divide"):
        IaptConfig(bottleneck=6, rational_groups=4)
    with pytest.raises(ValueError, match="activation"):
        IaptConfig(activation="swish")
    with pytest.raises(ValueError, match="0..=8"):
        IaptConfig(numerator_degree=9)
    with pytest.raises(ValueError, match="n_soft_tokens"):
        IaptConfig(n_soft_tokens=0)
