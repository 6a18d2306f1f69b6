"""The PyTorch twin of IAPT v1 (docs: shared design note "iapt-v1", spec/iapt-v1.md).

An independent implementation of the generator (float64 or float32, plain torch ops) and of the
injection as forward pre-hooks on Hugging Face decoder layers (LlamaDecoderLayer, Qwen2DecoderLayer,
Qwen3DecoderLayer, Gemma2DecoderLayer, Gemma3DecoderLayer, Phi3DecoderLayer: every one whose first
argument, or `hidden_states` keyword, is the residual stream entering the layer). For Gemma that is
after the embedding scaling by sqrt(d) (done by the scaled embedding module, before layer 0), as the
semantics require; for post-norm blocks (Gemma 2/3) it is still the previous layer's output. It is the reference the llama.cpp hook is tested against (see make_model_fixtures.py).

Per layer l, with H = the residual stream entering layer l at the n instruction rows:

    Z = H W_down^T + b_down          S = (Z Q^T) * s          A = softmax over the n rows
    P_l = g(A^T Z) W_up^T + b_up     and rows n .. n+m-1 of the layer input are replaced by P_l.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Rational:
    """A rational activation: variant A/B/C/D, numerator [G, M+1], denominator [G, N] ([G, N+1] for C)."""

    variant: str
    num: torch.Tensor
    den: torch.Tensor


def apply_activation(name: str, x: torch.Tensor, rational: Rational | None = None) -> torch.Tensor:
    """g(x) elementwise; x is [m, r]. Rational coefficients are grouped over contiguous channel blocks."""
    if name == "identity":
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name != "rational":
        raise ValueError(f"unknown activation {name}")
    assert rational is not None
    g = rational.num.shape[0]
    r = x.shape[-1]
    block = r // g
    out = torch.empty_like(x)
    for k in range(g):
        xs = x[..., k * block:(k + 1) * block]
        a = rational.num[k].to(x.dtype)
        b = rational.den[k].to(x.dtype)
        p = sum(a[j] * xs**j for j in range(a.shape[0]))
        if rational.variant == "A":
            q = 1.0 + sum(b[i - 1].abs() * xs.abs() ** i for i in range(1, b.shape[0] + 1)) if b.shape[0] else torch.ones_like(xs)
        elif rational.variant in ("B", "D"):
            q = 1.0 + (sum(b[i - 1] * xs**i for i in range(1, b.shape[0] + 1)) if b.shape[0] else torch.zeros_like(xs)).abs()
        elif rational.variant == "C":
            q = 0.1 + sum(b[i] * xs**i for i in range(0, b.shape[0])).abs()
        else:
            raise ValueError(f"unknown variant {rational.variant}")
        out[..., k * block:(k + 1) * block] = p / q
    return out


@dataclass
class LayerWeights:
    """One layer's generator weights (row-major, PyTorch order, as in the spec)."""

    down_weight: torch.Tensor  # [r, d]
    pool_query: torch.Tensor  # [m, r]
    up_weight: torch.Tensor  # [d, r]
    down_bias: torch.Tensor | None = None  # [r]
    up_bias: torch.Tensor | None = None  # [d]
    rational: Rational | None = None


@dataclass
class Generator:
    """The IAPT generator for every layer."""

    activation: str
    pool_scale: float
    layers: list[LayerWeights] = field(default_factory=list)

    @property
    def n_soft_tokens(self) -> int:
        return self.layers[0].pool_query.shape[0]

    def generate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """P_l [m, d] from the instruction rows h [n, d] (computed in h's dtype)."""
        w = self.layers[layer]
        dt = h.dtype
        z = h @ w.down_weight.to(dt).T
        if w.down_bias is not None:
            z = z + w.down_bias.to(dt)
        s = (z @ w.pool_query.to(dt).T) * self.pool_scale  # [n, m]
        a = torch.softmax(s, dim=0)  # over the n rows, per soft token
        pbar = a.T @ z  # [m, r]
        u = apply_activation(self.activation, pbar, w.rational)
        p = u @ w.up_weight.to(dt).T
        if w.up_bias is not None:
            p = p + w.up_bias.to(dt)
        return p

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "Generator":
        """From spec tensor names (`iapt.blk.{l}.*` / `iapt.shared.*`) and string metadata."""
        n_layer = int(meta["iapt.n_layer"])
        act = meta["iapt.activation"]
        variant = meta.get("iapt.rational.variant")

        def get(l: int, role: str):
            return tensors.get(f"iapt.blk.{l}.{role}", tensors.get(f"iapt.shared.{role}"))

        layers = []
        for l in range(n_layer):
            rat = Rational(variant, get(l, "act.num"), get(l, "act.den")) if act == "rational" else None
            layers.append(LayerWeights(get(l, "down.weight"), get(l, "pool.query"), get(l, "up.weight"),
                                       get(l, "down.bias"), get(l, "up.bias"), rat))
        return Generator(act, float(meta["iapt.pool.scale"]), layers)


class Injection:
    """Forward pre-hooks that replace rows n .. n+m-1 of every decoder layer's input with P_l.

    The hooks act on any forward whose sequence covers the soft slots (batch row 0); shorter inputs
    (decode steps with a KV cache) pass through, since the soft tokens then live in the cache.
    """

    def __init__(self, decoder_layers, generator: Generator, n_instr: int):
        self.generator = generator
        self.n = n_instr
        self.handles = []
        for l, layer in enumerate(decoder_layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook(l), with_kwargs=True))

    def _hook(self, l: int):
        def hook(module, args, kwargs):
            if args:
                hs = args[0]
            else:
                hs = kwargs["hidden_states"]
            n, m = self.n, self.generator.n_soft_tokens
            if hs.shape[1] < n + m:
                return None
            hs = hs.clone()
            hs[0, n:n + m, :] = self.generator.generate(l, hs[0, :n, :])
            if args:
                return (hs,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hs
            return args, kwargs

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def rmsnorm_in_input_dtype(module_cls, offset: float = 0.0):
    """Make an HF RMSNorm class compute in its input dtype (HF upcasts to float32, which would cap a
    float64 reference at float32 precision). offset = 1.0 for Gemma's RMSNorm, which scales by
    (1 + weight) and names its epsilon `eps`."""

    def forward(self, hidden_states):
        eps = getattr(self, "variance_epsilon", None)
        if eps is None:
            eps = self.eps
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return (offset + self.weight) * (hidden_states * torch.rsqrt(variance + eps))

    module_cls.forward = forward
