"""The IAPT generator of one layer (spec v1, section "The generator"), as a trainable `nn.Module`.

For one sequence with instruction rows `H = x_l[0 .. n)` (`n x d`):

    Z    = H W_down^T + b_down          n x r
    S    = (Z Q^T) * s                  n x m
    A    = softmax over the n rows      n x m   (per soft token)
    Pbar = A^T Z                        m x r
    U    = g(Pbar)                      m x r   (elementwise; rational: per channel group)
    P_l  = U W_up^T + b_up              m x d

The module works on a right-padded batch: rows at or past each sequence's `n` are masked out of
the softmax. It computes in float32, or in float64 when its parameters are float64, whatever the
dtype of the hidden states (the spec: "implementations compute in f32 or wider"), with autocast off.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import IaptConfig

SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def fixed_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """A fixed activation of spec v1, exactly as the spec writes it."""
    if name == "identity":
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / SQRT_2))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    raise ValueError(f"unknown activation {name!r}")


def _horner(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j coef[..., j] x^j; coef [G, K] broadcast against x [..., G, C] (coef[:, j] -> [G, 1])."""
    k = coef.shape[-1]
    if k == 0:
        return torch.zeros_like(x)
    out = coef[:, k - 1].unsqueeze(-1).expand_as(x)
    for j in range(k - 2, -1, -1):
        out = out * x + coef[:, j].unsqueeze(-1)
    return out


def rational(variant: str, num: torch.Tensor, den: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g(x) = P(x) / Q(x) of spec v1 for x [..., r], num [G, M+1], den [G, N] ([G, N+1] for C).

    Channel c uses coefficient row floor(c / (r / G)) (contiguous groups)."""
    g = num.shape[0]
    r = x.shape[-1]
    xs = x.reshape(*x.shape[:-1], g, r // g)
    p = _horner(num, xs)
    if variant == "A":
        ax = xs.abs()
        q = 1.0 + _horner(den.abs(), ax) * ax
    elif variant in ("B", "D"):
        q = 1.0 + (_horner(den, xs) * xs).abs()
    elif variant == "C":
        q = 0.1 + _horner(den, xs).abs()
    else:
        raise ValueError(f"unknown rational variant {variant!r}")
    return (p / q).reshape(x.shape)


def fit_rational(variant: str, num_deg: int, den_deg: int, target: str = "gelu"):
    """Coefficients (numerator [M+1], denominator [N] or [N+1] for C, float32) of a rational
    activation of the given variant fitted to `target` on [-3, 3]: linearised least squares, then
    L-BFGS on the true form (for variant B/D with GELU this is the demo's initialisation).
    Returns (num, den, max_abs_error)."""
    x = torch.linspace(-3.0, 3.0, 4001, dtype=torch.float64)
    y = fixed_activation(target, x)
    m1 = num_deg + 1
    if variant in ("B", "D"):
        # P(x) - y * B(x) = y with B(x) = sum_{i>=1} b_i x^i (Q = 1 + B where B > -1).
        cols = [x ** j for j in range(m1)] + [-y * x ** i for i in range(1, den_deg + 1)]
        sol = torch.linalg.lstsq(torch.stack(cols, 1), y.unsqueeze(1)).solution.squeeze(1)
        a, b = sol[:m1], sol[m1:]
    elif variant == "C":
        # Q = 0.1 + |b_0 + sum b_i x^i| with b_0 = 1: P(x) - y * sum_{i>=1} b_i x^i = 1.1 y.
        cols = [x ** j for j in range(m1)] + [-y * x ** i for i in range(1, den_deg + 1)]
        sol = torch.linalg.lstsq(torch.stack(cols, 1), (1.1 * y).unsqueeze(1)).solution.squeeze(1)
        a, b = sol[:m1], torch.cat([torch.ones(1, dtype=torch.float64), sol[m1:]])
    elif variant == "A":
        # Start from the variant-B fit with |b_i| (on [-3, 3] it is already close for GELU).
        nb, db, _ = fit_rational("B", num_deg, den_deg, target)
        a, b = nb.double(), db.double().abs()
    else:
        raise ValueError(f"unknown rational variant {variant!r}")
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    params = [a, b] if b.numel() else [a]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def f():
        return rational(variant, a.unsqueeze(0), b.unsqueeze(0), x.unsqueeze(-1)).squeeze(-1)

    def closure():
        opt.zero_grad()
        loss = ((f() - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        err = (f() - y).abs().max().item()
    return a.detach().float(), b.detach().float(), err


class RationalActivation(nn.Module):
    """The learned rational activation (Padé activation unit) of spec v1, `G` coefficient groups.

    Parameters `numerator` `[G, M+1]` (spec tensor `act.num`) and `denominator` `[G, N]` (`[G, N+1]`
    for variant C; spec tensor `act.den`), ascending powers."""

    def __init__(self, variant: str, num_deg: int, den_deg: int, groups: int, init: str = "gelu",
                 noise: float = 0.1, fitted=None):
        super().__init__()
        self.variant = variant
        self.noise = noise
        if fitted is None:
            fitted = fit_rational(variant, num_deg, den_deg, init)
        num, den, _ = fitted
        self.numerator = nn.Parameter(num.clone().unsqueeze(0).repeat(groups, 1))
        self.denominator = nn.Parameter(den.clone().unsqueeze(0).repeat(groups, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num, den = self.numerator.to(x.dtype), self.denominator.to(x.dtype)
        if self.variant == "D" and self.training and self.noise > 0:
            num = num * (1.0 + (torch.rand_like(num) * 2.0 - 1.0) * self.noise)
            den = den * (1.0 + (torch.rand_like(den) * 2.0 - 1.0) * self.noise)
        return rational(self.variant, num, den, x)


class FixedActivation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        return fixed_activation(self.name, x)

    def extra_repr(self):
        return self.name


class IaptGenerator(nn.Module):
    """One layer's generator. Submodules map to spec tensors as:

    `down` (nn.Linear d -> r): `down.weight` [r, d], `down.bias` [r];
    `query` [m, r]: `pool.query`; `up` (nn.Linear r -> d): `up.weight` [d, r], `up.bias` [d];
    `act` (rational only): `act.num`, `act.den`.

    Initialisation (in this order, so a seeded run is reproducible): `down` as `nn.Linear`,
    `query` ~ N(0, 1/r), the activation (fitted coefficients), `up.weight` = 0 and `up.bias` = 0
    (see `IaptConfig.init_up_bias` for the data-dependent start)."""

    def __init__(self, d: int, config: IaptConfig, fitted=None, device=None):
        super().__init__()
        r, m = config.bottleneck, config.n_soft_tokens
        self.pool_scale = float(config.pool_scale)
        self.down = nn.Linear(d, r, bias=config.down_bias, device=device, dtype=torch.float32)
        self.query = nn.Parameter(torch.randn(m, r, device=device) / math.sqrt(r))
        if config.is_rational:
            self.act = RationalActivation(config.rational_variant, config.numerator_degree,
                                          config.denominator_degree, config.rational_groups,
                                          config.rational_init, config.rational_noise, fitted)
            if device is not None:
                self.act.to(device)
        else:
            self.act = FixedActivation(config.activation)
        self.up = nn.Linear(r, d, bias=config.up_bias, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.up.weight.zero_()
            if self.up.bias is not None:
                self.up.bias.zero_()

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.down.weight.dtype, torch.float32)

    def forward(self, h: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """h: [B, T, d] hidden states entering the layer (rows at or after n[b] are ignored; T >= max n),
        n: [B] instruction lengths (>= 1). Returns P: [B, m, d] in the compute dtype."""
        dev = h.device.type
        with torch.autocast(device_type=dev, enabled=False):
            dt = self.compute_dtype
            x = h.to(dt)
            w_down = self.down.weight.to(dt)
            z = x @ w_down.T
            if self.down.bias is not None:
                z = z + self.down.bias.to(dt)
            s = (z @ self.query.to(dt).T) * self.pool_scale  # [B, T, m]
            rows = torch.arange(h.shape[1], device=h.device)
            valid = rows.unsqueeze(0) < n.to(h.device).unsqueeze(1)  # [B, T]
            s = s.masked_fill(~valid.unsqueeze(-1), float("-inf"))
            a = torch.softmax(s, dim=1)  # over the instruction rows, per soft token
            pbar = torch.einsum("btm,btr->bmr", a, z)
            u = self.act(pbar)
            p = u @ self.up.weight.to(dt).T
            if self.up.bias is not None:
                p = p + self.up.bias.to(dt)
            return p
