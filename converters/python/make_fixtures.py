#!/usr/bin/env python3
"""Writes the `iapt convert` test fixtures with real PyTorch, and the expected converted bytes.

This is the training-side twin of `crates/convert`: the modules below have the reference training
layout of the design note (`...layers.{l}.prompt_generator.{down, pooler.query, up, activation}`),
and every fixture is written by `torch.save` (or `safetensors.torch`) exactly as a training script
would. For each fixture, `fixtures/expected.json` records, per IAPT tensor name, the dtype, the
row-major shape, and the SHA-256 of the tensor's little-endian bytes in the source dtype
(`sha256`), converted to f16 (`f16_sha256`) and to f32 (`f32_sha256`), computed by PyTorch.
The Rust tests compare the converter's output against these bit for bit.

Usage:
    python3 make_fixtures.py                 # (re)writes converters/python/fixtures/
    python3 make_fixtures.py --bench OUT.pt  # the 84M-parameter LLaMA-2-7B-shaped bf16 benchmark
                                             # checkpoint (never commit it)

Needs: torch (CPU is fine), numpy, safetensors. The fixtures are committed so CI needs none of them.
"""

import argparse
import collections
import hashlib
import io
import json
import os
import zipfile

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
PREFIX = "base_model.model.model."


# --- The reference training layout -------------------------------------------------------------


class Rational(nn.Module):
    """Padé activation unit coefficients: numerator [G, M+1], denominator [G, N]."""

    def __init__(self, groups, m_deg, n_deg):
        super().__init__()
        self.numerator = nn.Parameter(torch.randn(groups, m_deg + 1) * 0.5)
        self.denominator = nn.Parameter(torch.randn(groups, n_deg) * 0.5)


class Pooler(nn.Module):
    def __init__(self, m, r):
        super().__init__()
        self.query = nn.Parameter(torch.randn(m, r))


class PromptGenerator(nn.Module):
    def __init__(self, d, r, m, activation, down_bias=True, up_bias=True):
        super().__init__()
        self.down = nn.Linear(d, r, bias=down_bias)
        self.pooler = Pooler(m, r)
        if activation is not None:
            self.activation = activation
        self.up = nn.Linear(r, d, bias=up_bias)


class Layer(nn.Module):
    def __init__(self, d, generator, with_norm):
        super().__init__()
        if with_norm:
            # A frozen base-model weight the converter must ignore.
            self.input_layernorm = nn.LayerNorm(d, elementwise_affine=True, bias=False)
        self.prompt_generator = generator


class Inner(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.model = inner


def reference_model(n_layer, d, r, m, groups=1, shared_activation=False, up_bias=True, with_norm=False, rational=True):
    shared = Rational(groups, 6, 5) if (rational and shared_activation) else None
    layers = []
    for _ in range(n_layer):
        act = shared if shared is not None else (Rational(groups, 6, 5) if rational else None)
        layers.append(Layer(d, PromptGenerator(d, r, m, act, up_bias=up_bias), with_norm))
    # base_model.model.model.layers.{l}...
    base = Wrap(Wrap(Inner(layers)))
    root = nn.Module()
    root.base_model = base
    return root


ROLE_OF = {
    "prompt_generator.down.weight": "down.weight",
    "prompt_generator.down.bias": "down.bias",
    "prompt_generator.pooler.query": "pool.query",
    "prompt_generator.up.weight": "up.weight",
    "prompt_generator.up.bias": "up.bias",
    "prompt_generator.activation.numerator": "act.num",
    "prompt_generator.activation.denominator": "act.den",
}


def iapt_tensors_reference(sd, shared_roles=()):
    """Maps a reference-layout state_dict to {iapt name: tensor} (what the converter must write)."""
    out = {}
    for key, t in sd.items():
        if ".layers." not in key:
            continue
        rest = key.split(".layers.", 1)[1]
        layer, suffix = rest.split(".", 1)
        role = ROLE_OF.get(suffix)
        if role is None:
            continue
        if role in shared_roles:
            out["iapt.shared." + role] = t
        else:
            out["iapt.blk.%s.%s" % (layer, role)] = t
    return out


# --- Expected values ---------------------------------------------------------------------------


DTYPE_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def le_bytes(t):
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def describe(tensors):
    out = {}
    for name, t in sorted(tensors.items()):
        out[name] = {
            "dtype": DTYPE_NAME[t.dtype],
            "shape": list(t.shape),
            "sha256": hashlib.sha256(le_bytes(t)).hexdigest(),
            "f16_sha256": hashlib.sha256(le_bytes(t.to(torch.float16))).hexdigest(),
            "f32_sha256": hashlib.sha256(le_bytes(t.to(torch.float32))).hexdigest(),
        }
    return out


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# --- Fixtures ----------------------------------------------------------------------------------


def reference_config(r, m, arch="llama", variant="B"):
    return {
        "n_soft_tokens": m,
        "bottleneck": r,
        "activation": {"kind": "rational", "variant": variant},
        "base_model_arch": arch,
        "pool_scale": 1.0,
    }


def fx(name):
    return os.path.join(FIXTURES, name)


def make_ref_f32(expected):
    torch.manual_seed(1)
    model = reference_model(2, 32, 8, 4, with_norm=True)
    model.register_buffer("step", torch.tensor(7))  # a LongStorage the converter must ignore
    sd = model.state_dict()
    torch.save(sd, fx("ref_f32.pt"))
    write_json(fx("ref_config.json"), reference_config(8, 4))
    expected["ref_f32.pt"] = describe(iapt_tensors_reference(sd))
    # The same state_dict as a single safetensors file: the same expected tensors.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, fx("ref_f32.safetensors"))
    expected["ref_f32.safetensors"] = expected["ref_f32.pt"]
    return sd


def make_ref_bf16(expected):
    torch.manual_seed(2)
    # One activation module shared by all layers: the converter writes iapt.shared.act.*.
    model = reference_model(3, 48, 16, 4, groups=2, shared_activation=True, up_bias=False).to(torch.bfloat16)
    sd = model.state_dict()
    torch.save(sd, fx("ref_bf16.pt"))
    write_json(fx("ref_bf16_config.json"), reference_config(16, 4))
    expected["ref_bf16.pt"] = describe(iapt_tensors_reference(sd, shared_roles=("act.num", "act.den")))


def make_sharded(expected):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = reference_model(2, 32, 8, 4).to(torch.float16)
    sd = model.state_dict()
    keys = list(sd.keys())
    half = len(keys) // 2
    shards = [keys[:half], keys[half:]]
    os.makedirs(fx("sharded_st"), exist_ok=True)
    weight_map = {}
    for i, ks in enumerate(shards):
        name = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
        save_file({k: sd[k].contiguous() for k in ks}, os.path.join(fx("sharded_st"), name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    write_json(os.path.join(fx("sharded_st"), "model.safetensors.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(os.path.join(fx("sharded_st"), "config.json"), reference_config(8, 4))
    expected["sharded_st/model.safetensors.index.json"] = describe(iapt_tensors_reference(sd))

    torch.manual_seed(4)
    model = reference_model(2, 32, 8, 4).to(torch.bfloat16)
    sd = model.state_dict()
    keys = list(sd.keys())
    shards = [keys[: len(keys) // 3], keys[len(keys) // 3 :]]
    os.makedirs(fx("sharded_bin"), exist_ok=True)
    weight_map = {}
    for i, ks in enumerate(shards):
        name = "pytorch_model-%05d-of-%05d.bin" % (i + 1, len(shards))
        torch.save(collections.OrderedDict((k, sd[k]) for k in ks), os.path.join(fx("sharded_bin"), name))
        weight_map.update({k: name for k in ks})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    write_json(os.path.join(fx("sharded_bin"), "pytorch_model.bin.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(os.path.join(fx("sharded_bin"), "config.json"), reference_config(8, 4))
    expected["sharded_bin/pytorch_model.bin.index.json"] = describe(iapt_tensors_reference(sd))


def make_views(expected):
    """Every tensor is a view into shared storages: offsets, a transpose, a strided column slice."""
    torch.manual_seed(5)
    n_layer, d, r, m = 2, 32, 8, 4
    flat = torch.randn(4096)
    wide = torch.randn(r, 2 * d)
    sd = collections.OrderedDict()
    off = 0

    def take(shape):
        nonlocal off
        n = 1
        for s in shape:
            n *= s
        t = flat[off : off + n].view(*shape)
        off += n + 3  # leave gaps so offsets are not just running sums
        return t

    for l in range(n_layer):
        p = "%slayers.%d.prompt_generator." % (PREFIX, l)
        sd[p + "down.weight"] = wide[:, l::2] if l == 1 else take((r, d))  # stride (2d, 2)
        sd[p + "down.bias"] = take((r,))
        sd[p + "pooler.query"] = take((m, r))
        sd[p + "up.weight"] = take((r, d)).t()  # [d, r] with stride (1, d)
        sd[p + "up.bias"] = take((d,))
    assert not sd[PREFIX + "layers.0.prompt_generator.up.weight"].is_contiguous()
    assert not sd[PREFIX + "layers.1.prompt_generator.down.weight"].is_contiguous()
    torch.save(sd, fx("views.pt"))
    cfg = {"n_soft_tokens": m, "bottleneck": r, "activation": {"kind": "gelu"}, "base_model_arch": "qwen2", "pool_scale": 0.5}
    write_json(fx("views_config.json"), cfg)
    expected["views.pt"] = describe(iapt_tensors_reference(sd))


def make_big_endian(expected):
    """ref_f32.pt re-written as a big-endian machine would: byteorder `big`, storages byte-swapped."""
    src = zipfile.ZipFile(fx("ref_f32.pt"))
    sd = torch.load(fx("ref_f32.pt"), weights_only=True)
    sizes = {}
    # Element size per storage key, from the tensors that use it.
    for t in sd.values():
        sizes[t.untyped_storage().data_ptr()] = t.element_size()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as out:
        pkl = None
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):
                pkl = src.read(info)
        # Map storage keys to element sizes by reading the pickle's persistent ids.
        import pickle

        class P(pickle.Unpickler):
            seen = {}

            def find_class(self, mod, name):
                if mod == "torch" and name.endswith("Storage"):
                    return name
                if mod == "torch._utils":
                    return lambda *a: None
                if mod == "collections":
                    return collections.OrderedDict
                raise pickle.UnpicklingError(mod + "." + name)

            def persistent_load(self, pid):
                P.seen[pid[2]] = pid[1]
                return None

        P(io.BytesIO(pkl)).load()
        esize = {"FloatStorage": 4, "LongStorage": 8}
        for info in src.infolist():
            data = src.read(info)
            parts = info.filename.split("/")
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif len(parts) == 3 and parts[1] == "data":
                n = esize[P.seen[parts[2]]]
                data = b"".join(data[i : i + n][::-1] for i in range(0, len(data), n))
            out.writestr(zipfile.ZipInfo(info.filename), data, compress_type=zipfile.ZIP_STORED)
    with open(fx("big_endian.pt"), "wb") as f:
        f.write(buf.getvalue())
    back = torch.load(fx("big_endian.pt"), weights_only=True)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    expected["big_endian.pt"] = expected["ref_f32.pt"]


class Evil:
    """Unpickling this runs a shell command. The converter must refuse it without running it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/iapt-convert-pwned",))


def make_malicious():
    torch.manual_seed(6)
    sd = reference_model(1, 16, 8, 4).state_dict()
    sd["base_model.payload"] = Evil()
    torch.save(sd, fx("malicious.pt"))


def make_legacy():
    torch.manual_seed(7)
    sd = reference_model(1, 16, 8, 4).state_dict()
    torch.save(sd, fx("legacy.pt"), _use_new_zipfile_serialization=False)


def make_blocks(expected):
    """A non-reference layout read through converters/profiles/blocks.json: x @ W convention weights
    (transposed), one pool-query tensor for all layers, a fixed activation."""
    torch.manual_seed(8)
    n_layer, d, r, m = 3, 16, 8, 2
    sd = collections.OrderedDict()
    sd["encoder.queries"] = torch.randn(m, r)
    want = {"iapt.shared.pool.query": sd["encoder.queries"]}
    for l in range(n_layer):
        w_down = torch.randn(d, r)  # used as x @ w_down
        w_up = torch.randn(r, d)
        sd["encoder.blocks.%d.gen.w_down" % l] = w_down
        sd["encoder.blocks.%d.gen.w_up" % l] = w_up
        sd["encoder.blocks.%d.gen.b_up" % l] = torch.randn(d)
        want["iapt.blk.%d.down.weight" % l] = w_down.t()
        want["iapt.blk.%d.up.weight" % l] = w_up.t()
        want["iapt.blk.%d.up.bias" % l] = sd["encoder.blocks.%d.gen.b_up" % l]
    torch.save(sd, fx("blocks.pt"))
    write_json(fx("blocks_config.json"), {"activation": {"kind": "relu"}, "base_model_arch": "llama"})
    expected["blocks.pt"] = describe(want)


def make_bench(path):
    """LLaMA-2-7B IAPT shape: 32 layers, d=4096, r=320, m=4, rational 6/5, bf16 (~84M parameters)."""
    torch.manual_seed(9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model = reference_model(32, 4096, 320, 4).to(torch.bfloat16)
    sd = model.state_dict()
    n = sum(t.numel() for t in sd.values())
    torch.save(sd, path)
    cfg = os.path.splitext(path)[0] + "_config.json"
    write_json(cfg, reference_config(320, 4))
    print("wrote %s (%d parameters) and %s" % (path, n, cfg))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", metavar="OUT.pt", help="write the benchmark checkpoint instead of the fixtures")
    args = ap.parse_args()
    if args.bench:
        make_bench(args.bench)
        return
    os.makedirs(FIXTURES, exist_ok=True)
    expected = collections.OrderedDict()
    make_ref_f32(expected)
    make_ref_bf16(expected)
    make_sharded(expected)
    make_views(expected)
    make_big_endian(expected)
    make_blocks(expected)
    make_malicious()
    make_legacy()
    write_json(fx("expected.json"), expected)
    total = 0
    for root, _, files in os.walk(FIXTURES):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print("fixtures: %d bytes in %s" % (total, FIXTURES))


if __name__ == "__main__":
    main()
