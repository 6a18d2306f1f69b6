"""`IaptConfig`: every option of an IAPT adapter, with the name spec v1 gives it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence

import numpy as np

#: Fixed activations of spec v1 (`iapt.activation`), besides `rational`.
FIXED_ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu", "tanh")
#: Every activation of spec v1.
ACTIVATIONS = FIXED_ACTIVATIONS + ("rational",)
#: Rational variants of spec v1 (`iapt.rational.variant`).
RATIONAL_VARIANTS = ("A", "B", "C", "D")
#: Limits of spec v1 (section Limits).
MAX_SOFT_TOKENS = 4096
MAX_WIDTH = 1 << 20
MAX_RATIONAL_DEGREE = 8


def f32(x: float) -> float:
    """The value `x` has once stored as an IEEE binary32 (what a spec file holds for `iapt.pool.scale`)."""
    return float(np.float32(x))


@dataclass
class IaptConfig:
    """The configuration of an IAPT adapter (spec v1, section "Metadata keys").

    Each field says which spec key it becomes in the saved file. The base model's layer count `L`
    (`iapt.n_layer`), hidden size `d` (`iapt.n_embd`) and architecture (`iapt.base_model.arch`) are
    not options: `get_iapt_model` reads them from the model.

    Attributes:
        n_soft_tokens: `m`, the soft tokens each layer's generator makes and the number of soft
            slots placed right after the instruction (spec `iapt.n_soft_tokens`, 1..=4096). The
            paper and the demo use 4.
        bottleneck: `r`, the width of the generator's bottleneck: `W_down` is `[r, d]`, `W_up` is
            `[d, r]`, the pooling queries `Q` are `[m, r]` (spec `iapt.bottleneck`).
        activation: `g`, applied elementwise to the pooled bottleneck `Pbar` (spec
            `iapt.activation`): `rational` (a learned Padé activation unit, the paper's choice),
            or a fixed `identity`, `relu`, `gelu` (erf form), `gelu_tanh`, `silu`, `tanh`.
        rational_variant: the denominator form of the rational activation (spec
            `iapt.rational.variant`): `A` `1 + sum |b_i| |x|^i`, `B` `1 + |sum b_i x^i|` (the
            paper's), `C` `0.1 + |sum_{i>=0} b_i x^i|`, `D` as B in the file; in training D
            multiplies every coefficient by `1 + u`, `u ~ U(-rational_noise, rational_noise)`, and
            computes exactly B in evaluation. Only with `activation="rational"`.
        numerator_degree: `M`, degree of the rational numerator `P(x) = sum_{j<=M} a_j x^j`
            (spec `iapt.rational.numerator_degree`, 0..=8; the paper: 6).
        denominator_degree: `N`, degree of the rational denominator (spec
            `iapt.rational.denominator_degree`, 0..=8; the paper: 5).
        rational_groups: `G`, the number of coefficient sets; the `r` channels split into `G`
            contiguous blocks, each with its own coefficients (spec `iapt.rational.groups`; must
            divide `bottleneck`; 1 is the paper's choice).
        rational_init: the function the rational activation is fitted to at initialisation
            (least squares on [-3, 3]): `gelu` (the paper's), `gelu_tanh`, `silu`, `tanh`, `relu`
            or `identity`. Not stored in the file.
        rational_noise: the relative coefficient noise of variant D in training (not stored).
        pool_scale: `s`, the factor of the pooling scores `S = (Z Q^T) * s` (spec
            `iapt.pool.scale`, an f32). `None` (default) means `1 / sqrt(bottleneck)`, the scaled
            dot product (0.125 for r = 64, the demo's value). The value is rounded to f32 here, so
            training computes with exactly the value the file stores.
        down_bias: whether the down-projection has a bias `b_down` (spec tensor `down.bias`;
            absent means 0).
        up_bias: whether the up-projection has a bias `b_up` (spec tensor `up.bias`; absent
            means 0). With `init_up_bias="slot_mean"` it starts at the base model's own mean
            residual row at the soft slots, so training starts from the base's behaviour.
        layers: which layers' generators are trained (`None`: all). The spec has one generator
            per layer and replaces the soft rows before **every** layer (`x_l[n + j] := P_l[j]`),
            so a file always holds all `L` generators: a layer left out keeps its generator frozen
            at its initial value (with `up.weight = 0`, a constant row: `up.bias`). Negative
            indices count from the last layer.
        init_up_bias: `slot_mean` (the demo's no-op start: `up.bias` of layer l is the mean of
            the residual rows entering layer l at the soft slots of the base model without the
            adapter, measured by `IaptModel.init_up_bias_from_batch`) or `zeros`. `up.weight`
            always starts at zero. Not stored in the file.
        name: an optional human name for the adapter (spec `general.name`).
    """

    n_soft_tokens: int = 4
    bottleneck: int = 64
    activation: str = "rational"
    rational_variant: str = "B"
    numerator_degree: int = 6
    denominator_degree: int = 5
    rational_groups: int = 1
    rational_init: str = "gelu"
    rational_noise: float = 0.1
    pool_scale: Optional[float] = None
    down_bias: bool = True
    up_bias: bool = True
    layers: Optional[Sequence[int]] = None
    init_up_bias: str = "slot_mean"
    name: Optional[str] = None

    def __post_init__(self):
        self.validate()
        if self.pool_scale is None:
            self.pool_scale = 1.0 / math.sqrt(self.bottleneck)
        self.pool_scale = f32(self.pool_scale)
        if self.layers is not None:
            self.layers = [int(x) for x in self.layers]

    def validate(self):
        """Raises ValueError for a value spec v1 (or this trainer) does not allow."""
        if not 1 <= int(self.n_soft_tokens) <= MAX_SOFT_TOKENS:
            raise ValueError(f"n_soft_tokens must be in 1..={MAX_SOFT_TOKENS}, got {self.n_soft_tokens}")
        if not 1 <= int(self.bottleneck) <= MAX_WIDTH:
            raise ValueError(f"bottleneck must be in 1..={MAX_WIDTH}, got {self.bottleneck}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.activation == "rational":
            if self.rational_variant not in RATIONAL_VARIANTS:
                raise ValueError(f"rational_variant must be A, B, C or D, got {self.rational_variant!r}")
            for k in ("numerator_degree", "denominator_degree"):
                v = int(getattr(self, k))
                if not 0 <= v <= MAX_RATIONAL_DEGREE:
                    raise ValueError(f"{k} must be in 0..={MAX_RATIONAL_DEGREE}, got {v}")
            g = int(self.rational_groups)
            if g < 1 or self.bottleneck % g != 0:
                raise ValueError(f"rational_groups ({g}) must be >= 1 and divide bottleneck ({self.bottleneck})")
            if self.rational_init not in FIXED_ACTIVATIONS:
                raise ValueError(f"rational_init must be one of {', '.join(FIXED_ACTIVATIONS)}")
        if self.pool_scale is not None and not math.isfinite(float(self.pool_scale)):
            raise ValueError("pool_scale must be finite")
        if self.init_up_bias not in ("slot_mean", "zeros"):
            raise ValueError(f"init_up_bias must be 'slot_mean' or 'zeros', got {self.init_up_bias!r}")

    @property
    def is_rational(self) -> bool:
        return self.activation == "rational"

    @property
    def den_len(self) -> int:
        """Columns of `act.den`: N, or N + 1 for variant C."""
        return self.denominator_degree + (1 if self.rational_variant == "C" else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IaptConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
