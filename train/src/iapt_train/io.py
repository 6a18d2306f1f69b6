"""Reading and writing IAPT spec v1 adapters in the safetensors container.

The writer produces the spec's canonical file (section "Canonical files"): compact JSON header,
`__metadata__` first with its keys sorted bytewise, tensors in the canonical order (shared tensors
first, then layer by layer in role order), data contiguous, header padded with spaces to a multiple
of 8. `iapt pack` of such a file gives back the same bytes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Dict, Mapping

import numpy as np
import torch

#: Role order of spec v1 (table "Tensor names").
ROLES = ("down.weight", "down.bias", "pool.query", "up.weight", "up.bias", "act.num", "act.den")
#: Spec keys this writer emits (and so never reports as unknown).
SPEC_VERSION = "1.0"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_FROM_NAME = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def float_text(x: float) -> str:
    """Canonical text of an f32 value (spec: shortest round-trip decimal, positional, no trailing .0)."""
    v = np.float32(x)
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return np.format_float_positional(v, unique=True, trim="-")


def tensor_sort_key(name: str):
    """Canonical order: shared first (role order), then by layer, then role order."""
    parts = name.split(".")
    if parts[1] == "shared":
        return (0, 0, ROLES.index(".".join(parts[2:])))
    return (1, int(parts[2]), ROLES.index(".".join(parts[3:])))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    if t.dtype == torch.float16:
        return t.numpy().astype("<f2").tobytes()
    return t.numpy().astype("<f4").tobytes()


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Writes a canonical spec v1 safetensors file, atomically (temporary file, then rename)."""
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise TypeError(f"metadata {k}: values are text, got {type(v).__name__}")
    names = sorted(tensors, key=tensor_sort_key)
    header: Dict[str, object] = {"__metadata__": {k: metadata[k] for k in sorted(metadata, key=lambda s: s.encode())}}
    blobs = []
    off = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not F32, F16 or BF16")
        if not torch.isfinite(t.detach().float()).all():
            raise ValueError(f"{name}: non-finite values cannot be saved (spec E207)")
        b = _tensor_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_safetensors(path: str):
    """(tensors, metadata) of a safetensors file with F32/F16/BF16 tensors (spec 1.1's Q8_0 pairs
    are refused: this package trains float adapters)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: header too large")
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        dt = info["dtype"]
        if dt not in _FROM_NAME:
            raise ValueError(f"{path}: tensor {name} has dtype {dt}; only F32, F16 and BF16 adapters are read here")
        b, e = info["data_offsets"]
        buf = bytearray(data[b:e])
        if dt == "BF16":
            t = torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16) if buf else torch.empty(0, dtype=torch.bfloat16)
        else:
            t = torch.frombuffer(buf, dtype=_FROM_NAME[dt]) if buf else torch.empty(0, dtype=_FROM_NAME[dt])
        tensors[name] = t.reshape(info["shape"]).clone()
    return tensors, dict(meta)
