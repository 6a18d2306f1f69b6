#!/usr/bin/env python3
"""Makes the IAPT spec v1 test vectors in spec/vectors/.

An independent reference: it shares no code with the Rust crates. It writes every adapter twice,
as safetensors (with the `safetensors` package) and as GGUF (with llama.cpp's `gguf` package), and
computes the expected soft tokens in float64 with numpy, following spec/iapt-v1.md section
"The generator" literally (loops and explicit power sums, no shortcuts).

Usage:  python3 spec/vectors/make_vectors.py            (rewrites the vectors in place)
        python3 spec/vectors/make_vectors.py --check    (recomputes, fails if any file would change)

Requires Python 3.10+, numpy, safetensors (0.4+), gguf (0.10+; made with numpy 2.4, safetensors
0.8, gguf 0.19); jsonschema, if installed, checks each vector's metadata against
spec/iapt-v1.schema.json. The output is deterministic: one fixed seed per vector.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import gguf
import safetensors
import safetensors.numpy
import gguf.quants
from safetensors import TensorSpec

HERE = Path(__file__).resolve().parent
SPEC_VERSION = "1.0"  # a vector with Q8_0 tensors says "1.1" (writers write the lowest version a file needs)
ROLES = ["down.weight", "down.bias", "pool.query", "up.weight", "up.bias", "act.num", "act.den"]
FIXED = ["identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"]
GGML_TYPE = {"F32": 0, "F16": 1, "Q8_0": 8, "BF16": 30}
Q8_SCALE_SUFFIX = "_scale"  # safetensors: a Q8_0 matrix NAME is NAME (I8) + NAME_scale (F16 [rows, cols/32])


# --------------------------------------------------------------------------------------------
# Vector definitions. Each is tiny; together they touch every activation and every dtype.
# --------------------------------------------------------------------------------------------

VECTORS = [
    dict(name="rational_b_f32", seed=101,
         covers="rational variant B (the paper's form), degrees 6/5, one group, both biases, all F32",
         L=2, d=8, r=4, m=4, n=5, act="rational", variant="B", M=6, N=5, G=1, scale=1.0,
         dtype="F32", biases=("down.bias", "up.bias")),
    dict(name="rational_a_g2_f16", seed=102,
         covers="rational variant A, degrees 5/4, two groups (channels 0-2 use row 0, 3-5 row 1), all F16; "
                "expected outputs use the F16-rounded weights",
         L=3, d=12, r=6, m=3, n=7, act="rational", variant="A", M=5, N=4, G=2, scale=1.0,
         dtype="F16", biases=("down.bias", "up.bias")),
    dict(name="rational_c_bf16", seed=103,
         covers="rational variant C (N+1 denominator coefficients b_0..b_N), degrees 4/3, four groups, "
                "BF16 matrices with F32 activation coefficients (mixed dtypes), down.bias only, "
                "pool scale 0.3 (the f32 value 0.300000011920928955078125 is used)",
         L=2, d=16, r=8, m=2, n=3, act="rational", variant="C", M=4, N=3, G=4, scale=0.3,
         dtype="BF16", act_dtype="F32", biases=("down.bias",)),
    dict(name="gelu_shared_f32", seed=104,
         covers="fixed gelu (erf form), shared iapt.shared.pool.query and iapt.shared.up.weight with "
                "per-layer down.weight, no biases, known optional provenance keys",
         L=3, d=8, r=4, m=2, n=4, act="gelu", scale=1.0, dtype="F32", biases=(),
         shared=("pool.query", "up.weight")),
    dict(name="silu_scale_half_n1", seed=105,
         covers="fixed silu, pool scale 0.5, a one-token instruction (n = 1: the softmax is exactly 1), "
                "up.bias only",
         L=2, d=8, r=4, m=3, n=1, act="silu", scale=0.5, dtype="F32", biases=("up.bias",)),
    dict(name="rational_d_extras", seed=106,
         covers="rational variant D (computed as B), degrees 3/2, two groups, shared down.weight, "
                "optional keys of non-string types kept through iapt.meta_types (readers report W002)",
         L=2, d=8, r=6, m=2, n=3, act="rational", variant="D", M=3, N=2, G=2, scale=1.0,
         dtype="F32", biases=("up.bias",), shared=("down.weight",)),
    dict(name="rational_b_deg0", seed=107,
         covers="rational variant B with denominator degree 0 (Q = 1: act.den has shape [1, 0], a "
                "zero-element tensor), numerator degree 2, one layer",
         L=1, d=8, r=4, m=2, n=3, act="rational", variant="B", M=2, N=0, G=1, scale=1.0,
         dtype="F32", biases=("down.bias", "up.bias")),
    dict(name="gelu_tanh_bf16", seed=108,
         covers="fixed gelu_tanh, all BF16, both biases",
         L=2, d=8, r=4, m=2, n=4, act="gelu_tanh", scale=1.0, dtype="BF16",
         biases=("down.bias", "up.bias")),
    dict(name="relu_f16", seed=109,
         covers="fixed relu, all F16, no biases, one soft token",
         L=2, d=8, r=4, m=1, n=6, act="relu", scale=1.0, dtype="F16", biases=()),
    dict(name="identity_f32", seed=110,
         covers="fixed identity, all shared tensors except up.weight, both biases shared",
         L=2, d=8, r=4, m=2, n=2, act="identity", scale=1.0, dtype="F32",
         biases=("down.bias", "up.bias"), shared=("down.weight", "down.bias", "pool.query", "up.bias")),
    dict(name="tanh_f32", seed=111,
         covers="fixed tanh, pool scale 2, three layers",
         L=3, d=8, r=4, m=3, n=5, act="tanh", scale=2.0, dtype="F32", biases=("down.bias",)),
    dict(name="silu_q8_0", seed=112,
         covers="spec 1.1: Q8_0 matrices (ggml blocks of 32 quantized by gguf-py; safetensors stores each "
                "as an I8 tensor and an F16 NAME_scale tensor), per-layer down.weight with rows of 64 "
                "(two blocks), a shared up.weight with rows of 32, F16 pool.query, F32 biases; expected "
                "outputs use the dequantized values d * q",
         L=2, d=64, r=32, m=2, n=4, act="silu", scale=1.0, dtype="F32", matrix_dtype="Q8_0",
         query_dtype="F16", biases=("down.bias", "up.bias"), shared=("up.weight",), spec_version="1.1"),
]

# Optional metadata, as (key, GGUF type name, value).
KNOWN_EXTRAS = [
    ("general.name", "string", "gelu shared test vector"),
    ("iapt.base_model.name", "string", "tiny-test-model"),
    ("iapt.converter.version", "string", "make_vectors.py 1"),
    ("iapt.source.file", "string", "none.pt"),
    ("iapt.source.sha256", "string", hashlib.sha256(b"iapt spec v1 test vector").hexdigest()),
]
TYPED_EXTRAS = [
    ("example.flag", "bool", True),
    ("example.layers", "array[u32]", [0, 1]),
    ("example.lr", "f32", 0.001),
    ("example.note", "string", "kept as-is"),
    ("example.seed", "u32", 1234),
]
VECTORS[3]["extras"] = KNOWN_EXTRAS
VECTORS[5]["extras"] = TYPED_EXTRAS


# --------------------------------------------------------------------------------------------
# Number formats
# --------------------------------------------------------------------------------------------

def f32(x: float) -> float:
    """The nearest binary32 value, as a Python float."""
    return float(np.float32(x))


def f32_text(x: float) -> str:
    """Canonical text of an f32: shortest decimal that reads back to the same f32, positional
    notation, no trailing '.0' (1.0 -> "1", 0.5 -> "0.5")."""
    return np.format_float_positional(np.float32(x), unique=True, trim="-")


def to_bf16_bits(a32: np.ndarray) -> np.ndarray:
    """Rounds float32 to bfloat16, nearest-even on the upper 16 bits (finite inputs only)."""
    bits = a32.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_f64(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


class Stored:
    """A tensor as stored: its dtype, the array to hand to the writers, and its exact value in f64."""

    def __init__(self, values32: np.ndarray, dtype: str):
        values32 = np.ascontiguousarray(values32, dtype=np.float32)
        self.dtype = dtype
        if dtype == "F32":
            self.raw = values32
            self.exact = values32.astype(np.float64)
        elif dtype == "F16":
            self.raw = values32.astype(np.float16)
            self.exact = self.raw.astype(np.float64)
        elif dtype == "BF16":
            self.raw = to_bf16_bits(values32)  # uint16 bit patterns
            self.exact = bf16_bits_to_f64(self.raw)
        elif dtype == "Q8_0":
            # gguf-py's quantizer (ggml's reference rule): uint8 blocks, [rows, cols / 32 * 34]
            self.source = values32
            self.raw = gguf.quants.quantize(values32, gguf.GGMLQuantizationType.Q8_0)
            self.scales, self.qs = q8_halves(self.raw)
            # exact value of each element, d * q, decoded here from the block bytes
            self.exact = (np.repeat(self.scales.astype(np.float64), 32, axis=-1) * self.qs.astype(np.float64))
        else:
            raise ValueError(dtype)
        self.shape = list(values32.shape)

    def le_bytes(self) -> bytes:
        """The data as GGUF stores it (Q8_0: the ggml blocks)."""
        return self.raw.astype(self.raw.dtype.newbyteorder("<")).tobytes()


def q8_halves(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The F16 scales [rows, cols/32] and the int8 values [rows, cols] of Q8_0 blocks
    [rows, cols/32*34]: each 34-byte block is a little-endian f16 d, then 32 int8 q."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, 34)
    scales = np.ascontiguousarray(b[:, :, :2]).view("<f2").reshape(rows, -1)
    qs = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(rows, -1)
    return scales, qs


# --------------------------------------------------------------------------------------------
# The generator, float64, written from the spec
# --------------------------------------------------------------------------------------------

def gelu_erf(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def activation(v: dict, U: np.ndarray, num: np.ndarray | None, den: np.ndarray | None) -> np.ndarray:
    out = np.empty_like(U)
    m, r = U.shape
    for j in range(m):
        for c in range(r):
            x = float(U[j, c])
            act = v["act"]
            if act == "identity":
                y = x
            elif act == "relu":
                y = x if x > 0.0 else 0.0
            elif act == "gelu":
                y = gelu_erf(x)
            elif act == "gelu_tanh":
                y = gelu_tanh(x)
            elif act == "silu":
                y = silu(x)
            elif act == "tanh":
                y = math.tanh(x)
            elif act == "rational":
                k = c // (r // v["G"])  # the channel's group
                a, b = num[k], den[k]
                p = sum(float(a[i]) * x ** i for i in range(v["M"] + 1))
                N = v["N"]
                if v["variant"] == "A":
                    q = 1.0 + sum(abs(float(b[i - 1])) * abs(x) ** i for i in range(1, N + 1))
                elif v["variant"] in ("B", "D"):
                    q = 1.0 + abs(sum(float(b[i - 1]) * x ** i for i in range(1, N + 1)))
                elif v["variant"] == "C":
                    q = 0.1 + abs(sum(float(b[i]) * x ** i for i in range(0, N + 1)))
                else:
                    raise ValueError(v["variant"])
                y = p / q
            else:
                raise ValueError(act)
            out[j, c] = y
    return out


def generate(v: dict, tensors: dict[str, Stored], H: np.ndarray) -> np.ndarray:
    """P_l for every layer: H is [L, n, d] (f64), the result [L, m, d] (f64)."""
    L, n, d = H.shape
    m = v["m"]
    s = f32(v["scale"])  # the pool scale is an f32 key: its f32 value is used

    def get(l: int, role: str) -> np.ndarray | None:
        for name in (f"iapt.blk.{l}.{role}", f"iapt.shared.{role}"):
            if name in tensors:
                return tensors[name].exact
        return None

    out = np.zeros((L, m, d), dtype=np.float64)
    for l in range(L):
        Wd, bd, Q = get(l, "down.weight"), get(l, "down.bias"), get(l, "pool.query")
        Wu, bu = get(l, "up.weight"), get(l, "up.bias")
        Z = H[l] @ Wd.T
        if bd is not None:
            Z = Z + bd
        S = (Z @ Q.T) * s  # [n, m]
        A = np.empty_like(S)
        for j in range(m):  # softmax over the n instruction rows, per soft token
            col = S[:, j]
            e = np.exp(col - col.max())
            A[:, j] = e / e.sum()
        Pbar = A.T @ Z  # [m, r]
        U = activation(v, Pbar, get(l, "act.num"), get(l, "act.den"))
        P = U @ Wu.T
        if bu is not None:
            P = P + bu
        out[l] = P
    return out


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

def gelu_fit(M: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of P/(1 + sum b_i x^i) near GELU on [-3, 3] (linearised least squares, ridge):
    a realistic starting point, as the paper initialises its rational activations to GELU."""
    xs = np.linspace(-3.0, 3.0, 121)
    g = np.array([gelu_erf(x) for x in xs])
    cols = [xs ** j for j in range(M + 1)] + [-g * xs ** i for i in range(1, N + 1)]
    X = np.stack(cols, axis=1)
    lam = 1e-2
    coef = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ g)
    return coef[: M + 1], coef[M + 1:]


def make_params(v: dict, rng: np.random.Generator) -> dict[str, Stored]:
    L, d, r, m = v["L"], v["d"], v["r"], v["m"]
    shared = set(v.get("shared", ()))
    shapes = {"down.weight": [r, d], "down.bias": [r], "pool.query": [m, r], "up.weight": [d, r], "up.bias": [d]}
    roles = ["down.weight", "pool.query", "up.weight"] + [b for b in v["biases"]]
    if v["act"] == "rational":
        G, M, N = v["G"], v["M"], v["N"]
        shapes["act.num"] = [G, M + 1]
        shapes["act.den"] = [G, N + 1 if v["variant"] == "C" else N]
        roles += ["act.num", "act.den"]

    def values(role: str) -> np.ndarray:
        shp = shapes[role]
        if role == "act.num":
            a0, _ = gelu_fit(v["M"], max(v["N"], 1))
            return np.stack([a0 + rng.normal(0.0, 0.05, size=len(a0)) for _ in range(shp[0])])
        if role == "act.den":
            if v["variant"] == "C":
                # b_0 near 1 keeps |sum b_i x^i| mostly away from 0; Q >= 0.1 holds anyway
                rows = [np.concatenate([[1.0], rng.normal(0.0, 0.3, size=shp[1] - 1)]) for _ in range(shp[0])]
                return np.array(rows).reshape(shp)
            if shp[1] == 0:
                return np.zeros(shp)
            _, b0 = gelu_fit(v["M"], v["N"])
            return np.stack([b0 + rng.normal(0.0, 0.05, size=len(b0)) for _ in range(shp[0])])
        return rng.normal(0.0, 0.3, size=shp)

    def dtype_of(role: str) -> str:
        if role.startswith("act."):
            return v.get("act_dtype", v["dtype"])
        if role in ("down.weight", "up.weight"):
            return v.get("matrix_dtype", v["dtype"])
        if role == "pool.query":
            return v.get("query_dtype", v["dtype"])
        return v["dtype"]

    out: dict[str, Stored] = {}
    for role in ROLES:  # canonical order: shared first, then layer by layer, roles in order
        if role in roles and role in shared:
            out[f"iapt.shared.{role}"] = Stored(values(role), dtype_of(role))
    for l in range(L):
        for role in ROLES:
            if role in roles and role not in shared:
                out[f"iapt.blk.{l}.{role}"] = Stored(values(role), dtype_of(role))
    return out


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def required_metadata(v: dict) -> list[tuple[str, str, object]]:
    """(key, GGUF type, value) in the spec's canonical order."""
    m = [
        ("iapt.spec_version", "string", v.get("spec_version", SPEC_VERSION)),
        ("iapt.n_layer", "u32", v["L"]),
        ("iapt.n_embd", "u32", v["d"]),
        ("iapt.n_soft_tokens", "u32", v["m"]),
        ("iapt.bottleneck", "u32", v["r"]),
        ("iapt.activation", "string", v["act"]),
        ("iapt.pool.type", "string", "query"),
        ("iapt.pool.scale", "f32", v["scale"]),
        ("iapt.base_model.arch", "string", "llama"),
    ]
    if v["act"] == "rational":
        m += [
            ("iapt.rational.variant", "string", v["variant"]),
            ("iapt.rational.numerator_degree", "u32", v["M"]),
            ("iapt.rational.denominator_degree", "u32", v["N"]),
            ("iapt.rational.groups", "u32", v["G"]),
        ]
    return m


DEFINED_TYPES = {
    "iapt.base_model.name": "string", "iapt.source.file": "string", "iapt.source.sha256": "string",
    "iapt.converter.version": "string", "general.name": "string",
}
KNOWN_OPTIONAL = set(DEFINED_TYPES) | {"iapt.meta_types"}


def text_of(ty: str, value: object) -> str:
    """The safetensors text form of a typed value."""
    if ty == "string":
        return str(value)
    if ty == "bool":
        return "true" if value else "false"
    if ty == "f32":
        return f32_text(value)
    if ty.startswith("array["):
        inner = ty[len("array["):-1]
        return "[" + ",".join(json.dumps(x) if inner == "string" else text_of(inner, x) for x in value) + "]"
    return str(int(value))


def safetensors_metadata(v: dict) -> dict[str, str]:
    meta = {k: text_of(t, x) for k, t, x in required_metadata(v)}
    types = {}
    for k, t, x in v.get("extras", []):
        meta[k] = text_of(t, x)
        if k not in DEFINED_TYPES and t != "string":
            types[k] = t
    if types:
        meta["iapt.meta_types"] = json.dumps(types, separators=(",", ":"), sort_keys=True)
    return dict(sorted(meta.items()))


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, Stored], metadata: dict[str, str]) -> None:
    write_safetensors_unsorted(path, tensors, metadata)
    sort_safetensors_metadata(path)


def sort_safetensors_metadata(path: Path) -> None:
    """The safetensors package writes `__metadata__` entries in hash-map order, which changes from
    run to run. Reorders them by key, as the spec's canonical form wants: the same entries, so the
    header keeps its length and every data offset stays valid."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + n].decode("utf-8")
    body = text.rstrip(" ")
    header = json.loads(body)
    meta = header["__metadata__"]
    old = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
    new = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
    start = body.index('"__metadata__":') + len('"__metadata__":')
    assert len(old.encode()) == len(new.encode())
    assert json.loads(body[start:start + len(old)]) == meta, "metadata object located"
    body = body[:start] + new + body[start + len(old):]
    assert json.loads(body) == header
    data[8:8 + n] = (body + text[len(body):]).encode("utf-8")
    path.write_bytes(bytes(data))


def safetensors_arrays(tensors: dict[str, Stored]) -> dict[str, np.ndarray]:
    """The arrays a safetensors file holds: a Q8_0 matrix as its int8 values under its name and its
    f16 scales under NAME_scale (spec 1.1); BF16 as uint16 bit patterns."""
    out = {}
    for k, t in tensors.items():
        if t.dtype == "Q8_0":
            out[k] = t.qs
            out[k + Q8_SCALE_SUFFIX] = t.scales
        else:
            out[k] = t.raw
    return out


def write_safetensors_unsorted(path: Path, tensors: dict[str, Stored], metadata: dict[str, str]) -> None:
    if all(t.dtype != "BF16" for t in tensors.values()):
        safetensors.numpy.save_file(safetensors_arrays(tensors), str(path), metadata=metadata)
        return
    # numpy has no bfloat16: hand the safetensors serializer the uint16 bit patterns and name the
    # dtype explicitly (the same call save_file makes, with dtype "bfloat16" instead of "uint16").
    keep = {k: np.ascontiguousarray(t.raw) for k, t in tensors.items()}
    specs = {
        k: TensorSpec(dtype="bfloat16" if tensors[k].dtype == "BF16" else a.dtype.name,
                      shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
        for k, a in keep.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=metadata)


def write_gguf(path: Path, v: dict, tensors: dict[str, Stored]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")  # writes general.architecture first
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "iapt")
    extras = sorted(v.get("extras", []))
    for k, t, x in required_metadata(v) + extras:
        if t == "string":
            w.add_string(k, x)
        elif t == "u32":
            w.add_uint32(k, x)
        elif t == "f32":
            w.add_float32(k, x)
        elif t == "bool":
            w.add_bool(k, x)
        elif t == "array[u32]":
            w.add_key_value(k, list(x), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
        else:
            raise ValueError(t)
    for name, t in tensors.items():  # canonical order
        if t.dtype == "BF16":
            w.add_tensor(name, t.raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif t.dtype == "Q8_0":
            w.add_tensor(name, t.raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t.raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------------------------
# Independent read-back checks (the files say what the spec says)
# --------------------------------------------------------------------------------------------

def check_safetensors(path: Path, tensors: dict[str, Stored], metadata: dict[str, str]) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0, "header length is a multiple of 8"
    header = json.loads(data[8:8 + n].decode("utf-8").rstrip(" "))
    assert header.pop("__metadata__") == metadata
    arrays = safetensors_arrays(tensors)
    assert set(header) == set(arrays)
    buf = data[8 + n:]
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    pos = 0
    for b, e in spans:
        assert b == pos, "no holes, no overlaps"
        pos = e
    assert pos == len(buf), "nothing after the last tensor"
    names = {"float32": "F32", "float16": "F16", "int8": "I8"}
    for k, e in header.items():
        a = arrays[k]
        t = tensors.get(k)
        want = "BF16" if t is not None and t.dtype == "BF16" else names[a.dtype.name]
        assert e["dtype"] == want and e["shape"] == list(a.shape), k
        b, e2 = e["data_offsets"]
        assert buf[b:e2] == a.astype(a.dtype.newbyteorder("<")).tobytes(), k


def check_gguf(path: Path, v: dict, tensors: dict[str, Stored]) -> None:
    r = gguf.GGUFReader(str(path))
    keys = [f.name for f in r.fields.values() if not f.name.startswith("GGUF.")]
    want = ["general.architecture", "general.type", "adapter.type"]
    want += [k for k, _, _ in required_metadata(v)] + [k for k, _, _ in sorted(v.get("extras", []))]
    assert keys == want, (keys, want)
    assert [t.name for t in r.tensors] == list(tensors)
    data = path.read_bytes()
    for rt in r.tensors:
        t = tensors[rt.name]
        # GGUF stores ne in reverse: row-major [r, d] is ne = [d, r]
        assert [int(x) for x in rt.field.parts[2]] == [len(t.shape)], rt.name
        # (for Q8_0, rt.shape is the element shape, ne[0] the row length in values)
        assert [int(x) for x in rt.shape] == list(reversed(t.shape)), (rt.name, rt.shape, t.shape)
        assert int(rt.tensor_type) == GGML_TYPE[t.dtype], rt.name
        assert rt.data_offset % 32 == 0, rt.name
        assert data[rt.data_offset:rt.data_offset + rt.n_bytes] == t.le_bytes(), rt.name


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def build(out_dir: Path) -> dict:
    manifest = {
        "spec_version": "1.1",  # the spec these vectors test (each file says the lowest version it needs)
        "generated_by": "spec/vectors/make_vectors.py",
        "about": (
            "Each vector is one adapter written in both containers (identical content), the hidden states "
            "entering each layer at the instruction rows, and the soft tokens P_l the generator must produce "
            "for them, computed in float64 from the stored (rounded) tensor values. Layer l uses hidden[l] "
            "as H and must produce expected[l]."
        ),
        "hidden_layout": "float32 little-endian .npy, C order, shape [n_layer, n, n_embd]: hidden[l] = H_l (rows 0..n of the residual stream entering layer l)",
        "expected_layout": "float64 little-endian .npy, C order, shape [n_layer, n_soft_tokens, n_embd]: expected[l] = P_l",
        "tolerance": {
            "f64": "|got - expected| <= 1e-12 * (1 + |expected|)",
            "f32": "|got - expected| <= 1e-4 * (1 + |expected|) (an f32 implementation of the same formulas)",
        },
        "vectors": [],
    }
    for v in VECTORS:
        rng = np.random.default_rng(v["seed"])
        tensors = make_params(v, rng)
        H32 = rng.normal(0.0, 1.0, size=(v["L"], v["n"], v["d"])).astype(np.float32)
        expected = generate(v, tensors, H32.astype(np.float64))
        assert np.all(np.isfinite(expected)) and np.abs(expected).max() < 50.0, v["name"]

        name = v["name"]
        meta = safetensors_metadata(v)
        write_safetensors(out_dir / f"{name}.safetensors", tensors, meta)
        write_gguf(out_dir / f"{name}.gguf", v, tensors)
        np.save(out_dir / f"{name}.hidden.npy", H32.astype("<f4"))
        np.save(out_dir / f"{name}.expected.npy", expected.astype("<f8"))
        check_safetensors(out_dir / f"{name}.safetensors", tensors, meta)
        check_gguf(out_dir / f"{name}.gguf", v, tensors)
        q8 = {k: t.source for k, t in tensors.items() if t.dtype == "Q8_0"}
        if q8:
            # The f32 values gguf-py quantized: a reader's own quantizer must give the same blocks.
            safetensors.numpy.save_file(q8, str(out_dir / f"{name}.q8source.safetensors"))

        rational = None
        if v["act"] == "rational":
            rational = {"variant": v["variant"], "numerator_degree": v["M"], "denominator_degree": v["N"], "groups": v["G"]}
        unknown = [k for k, _, _ in v.get("extras", []) if k not in KNOWN_OPTIONAL]
        manifest["vectors"].append({
            "name": name,
            "covers": v["covers"],
            "files": {
                "safetensors": f"{name}.safetensors",
                "gguf": f"{name}.gguf",
                "hidden": f"{name}.hidden.npy",
                "expected": f"{name}.expected.npy",
                **({"q8_source": f"{name}.q8source.safetensors"} if q8 else {}),
            },
            "n_instruction_tokens": v["n"],
            "config": {
                "spec_version": v.get("spec_version", SPEC_VERSION),
                "n_layer": v["L"],
                "n_embd": v["d"],
                "n_soft_tokens": v["m"],
                "bottleneck": v["r"],
                "activation": v["act"],
                "rational": rational,
                "pool_scale": f32(v["scale"]),
                "base_model_arch": "llama",
            },
            "metadata": meta,
            "tensors": [{"name": k, "dtype": t.dtype, "shape": t.shape} for k, t in tensors.items()],
            "warnings": [{"code": "W002", "subject": k} for k in sorted(unknown)],
        })
    check_schema(manifest)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_schema(manifest: dict) -> None:
    """Every vector's metadata satisfies spec/iapt-v1.schema.json (when `jsonschema` is installed)."""
    try:
        import jsonschema
    except ImportError:
        print("note: jsonschema is not installed; the metadata was not checked against the schema")
        return
    schema = json.loads((HERE.parent / "iapt-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for v in manifest["vectors"]:
        errors = [e.message for e in validator.iter_errors(v["metadata"])]
        assert not errors, (v["name"], errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare with the committed files")
    args = ap.parse_args()
    if not args.check:
        build(HERE)
        print(f"wrote {len(VECTORS)} vectors to {HERE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp)
        bad = [p.name for p in sorted(tmp.iterdir()) if not (HERE / p.name).exists() or (HERE / p.name).read_bytes() != p.read_bytes()]
    if bad:
        print("differs from the committed vectors:", ", ".join(bad))
        return 1
    print("the committed vectors are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
