"""The generator against the spec's float64 test vectors (spec/vectors, made by an independent numpy
implementation): every float vector, read from its safetensors file by this package, run in float64
(tolerance 1e-12 (1 + |expected|)) and in float32 (1e-4 (1 + |expected|))."""

import json

import numpy as np
import pytest
import torch

from conftest import VECTORS
from iapt_train import IaptConfig, IaptGenerator, fit_rational, generators_from_file
from iapt_train.generator import fixed_activation, rational

MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
# This package trains and reads float adapters (F32/F16/BF16); spec 1.1's Q8_0 vector is the Rust side's.
FLOAT_VECTORS = [v for v in MANIFEST["vectors"] if all(t["dtype"] in ("F32", "F16", "BF16") for t in v["tensors"])]


def test_float_vectors_are_most_of_the_manifest():
    assert len(FLOAT_VECTORS) >= 11
    assert {v["config"]["activation"] for v in FLOAT_VECTORS} >= {"rational", "gelu", "gelu_tanh", "silu", "relu", "identity", "tanh"}


@pytest.mark.parametrize("vec", FLOAT_VECTORS, ids=[v["name"] for v in FLOAT_VECTORS])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_spec_vector(vec, dtype, tol):
    cfg, meta, gens = generators_from_file(str(VECTORS / vec["files"]["safetensors"]))
    assert cfg.n_soft_tokens == vec["config"]["n_soft_tokens"]
    assert cfg.pool_scale == np.float32(vec["config"]["pool_scale"])
    gens = gens.to(dtype).eval()
    hidden = np.load(VECTORS / vec["files"]["hidden"])
    expected = np.load(VECTORS / vec["files"]["expected"])
    n = vec["n_instruction_tokens"]
    assert hidden.shape[1] == n
    for l, g in enumerate(gens):
        h = torch.from_numpy(hidden[l]).to(dtype).unsqueeze(0)
        # Extra rows past n (padding of a batch) must not change anything.
        h = torch.cat([h, 1e3 * torch.ones(1, 3, h.shape[-1], dtype=dtype)], dim=1)
        with torch.no_grad():
            got = g(h, torch.tensor([n])).squeeze(0).double().numpy()
        err = np.abs(got - expected[l]) / (1.0 + np.abs(expected[l]))
        assert err.max() <= tol, f"{vec['name']} layer {l}: {err.max():.3e}"


@pytest.mark.parametrize("variant", ["A", "B", "C", "D"])
def test_rational_init_fits_gelu(variant):
    num, den, err = fit_rational(variant, 6, 5, "gelu")
    assert num.shape == (7,)
    assert den.shape == ((6,) if variant == "C" else (5,))
    assert err < 0.02, err
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    got = rational(variant, num.double().unsqueeze(0), den.double().unsqueeze(0), x.unsqueeze(-1)).squeeze(-1)
    assert (got - fixed_activation("gelu", x)).abs().max() < 0.02


def test_rational_groups_use_contiguous_channel_blocks():
    # G = 2 over r = 4: channels 0,1 use row 0 (identity: P = x), channels 2,3 row 1 (P = 2, Q = 1).
    num = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    den = torch.zeros(2, 0, dtype=torch.float64)
    x = torch.tensor([[0.5, -1.0, 3.0, 4.0]], dtype=torch.float64)
    assert rational("B", num, den, x).tolist() == [[0.5, -1.0, 2.0, 2.0]]


def test_variant_d_is_b_in_eval_and_noisy_in_training():
    cfg = IaptConfig(bottleneck=8, n_soft_tokens=2, rational_variant="D")
    torch.manual_seed(0)
    g = IaptGenerator(16, cfg)
    x = torch.randn(3, 2, 8)
    g.eval()
    want = rational("B", g.act.numerator, g.act.denominator, x)
    assert torch.equal(g.act(x), want)
    g.train()
    assert not torch.allclose(g.act(x), want)


def test_softmax_runs_over_instruction_rows_only_and_n1_copies_z():
    cfg = IaptConfig(bottleneck=4, n_soft_tokens=3, activation="identity", pool_scale=0.5)
    torch.manual_seed(1)
    g = IaptGenerator(6, cfg).double()
    with torch.no_grad():
        g.up.weight.copy_(torch.randn(6, 4))
    h = torch.randn(2, 5, 6, dtype=torch.float64)
    p = g(h, torch.tensor([1, 5]))
    z0 = h[0, 0] @ g.down.weight.T + g.down.bias
    # n = 1: every soft token is g(Z[0]) W_up^T + b_up.
    for j in range(3):
        assert torch.allclose(p[0, j], z0 @ g.up.weight.T + g.up.bias, atol=1e-12)
    # n = 5, written out per the spec's formulas.
    z = h[1] @ g.down.weight.T + g.down.bias
    s = (z @ g.query.T) * 0.5
    a = torch.softmax(s, dim=0)
    want = (a.T @ z) @ g.up.weight.T + g.up.bias
    assert torch.allclose(p[1], want, atol=1e-12)
