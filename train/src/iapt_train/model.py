"""`get_iapt_model` and `IaptModel`: a frozen Hugging Face decoder with one IAPT generator per layer.

The injection is spec v1's (section "Injection into the base model"):

1. the instruction is every token before the soft slots (BOS and chat-template tokens included),
   positions `0 .. n-1`;
2. the `m` soft slots follow at positions `n .. n+m-1` (plain positions, RoPE too); the response
   starts at `n+m`, its first token predicted from the logits at `n+m-1`;
3. the generator of layer `l` reads `x_l[0 .. n)`, the residual stream entering layer `l` at the
   instruction rows (for layer 0: the embeddings after any scaling, e.g. Gemma's sqrt(d));
4. before layer `l` runs, `x_l[n + j] := P_l[j]` for `j < m` (the slot token ids do not matter);
5. one forward pass does all of it (attention is causal);
6. decoding reads the soft tokens from the KV cache only: nothing is recomputed.

It is implemented with a forward pre-hook on each decoder layer, which replaces the soft rows of
the layer's input; sequences in a batch each have their own `n` (right padding).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from . import __version__
from .arch import decoder_layers, dims, llama_cpp_arch
from .config import IaptConfig
from .generator import IaptGenerator, fit_rational
from .io import SPEC_VERSION, float_text, read_safetensors, write_safetensors

ADAPTER_FILE = "adapter.iapt.safetensors"
SIDE_FILE = "iapt_train.json"


@dataclass
class _State:
    n: torch.Tensor  # [B] instruction lengths
    n_max: int
    mode: str  # "inject" | "record"
    record: Optional[list] = None


def _spec_config(meta: dict) -> IaptConfig:
    act = meta["iapt.activation"]
    kw = dict(n_soft_tokens=int(meta["iapt.n_soft_tokens"]), bottleneck=int(meta["iapt.bottleneck"]),
              activation=act, pool_scale=float(meta["iapt.pool.scale"]), name=meta.get("general.name"))
    if meta.get("iapt.pool.type", "query") != "query":
        raise ValueError(f"iapt.pool.type {meta['iapt.pool.type']!r} is not 'query' (spec v1)")
    if act == "rational":
        kw.update(rational_variant=meta["iapt.rational.variant"],
                  numerator_degree=int(meta["iapt.rational.numerator_degree"]),
                  denominator_degree=int(meta["iapt.rational.denominator_degree"]),
                  rational_groups=int(meta["iapt.rational.groups"]))
    return IaptConfig(**kw)


def _role(tensors: dict, layer: int, role: str):
    t = tensors.get(f"iapt.blk.{layer}.{role}")
    return t if t is not None else tensors.get(f"iapt.shared.{role}")


def generators_from_file(path: str, device=None):
    """Reads a spec v1 safetensors adapter (F32/F16/BF16 tensors; per-layer or shared roles) into
    `(config, metadata, generators)`: one float32 `IaptGenerator` per layer computing the file's
    function (a shared tensor is copied into every layer). No base model is needed."""
    tensors, meta = read_safetensors(path)
    major = meta.get("iapt.spec_version", "1.0").split(".")[0]
    if major != "1":
        raise ValueError(f"{path}: spec version {meta.get('iapt.spec_version')} is not 1.x")
    cfg = _spec_config(meta)
    n_layer, d = int(meta["iapt.n_layer"]), int(meta["iapt.n_embd"])
    cfg.down_bias = _role(tensors, 0, "down.bias") is not None
    cfg.up_bias = _role(tensors, 0, "up.bias") is not None
    fitted = _placeholder_fit(cfg)
    gens = nn.ModuleList([IaptGenerator(d, cfg, fitted=fitted, device=device) for _ in range(n_layer)])
    _load_into(gens, tensors, cfg)
    return cfg, meta, gens


def _placeholder_fit(cfg: IaptConfig):
    if not cfg.is_rational:
        return None
    return (torch.zeros(cfg.numerator_degree + 1), torch.zeros(cfg.den_len), 0.0)


def _load_into(gens: nn.ModuleList, tensors: dict, cfg: IaptConfig):
    with torch.no_grad():
        for l, g in enumerate(gens):
            def put(dst, role):
                src = _role(tensors, l, role)
                if src is None:
                    raise ValueError(f"tensor {role} of layer {l} is missing")
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"tensor {role} of layer {l}: shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))

            put(g.down.weight, "down.weight")
            if g.down.bias is not None:
                put(g.down.bias, "down.bias")
            put(g.query, "pool.query")
            put(g.up.weight, "up.weight")
            if g.up.bias is not None:
                put(g.up.bias, "up.bias")
            if cfg.is_rational:
                put(g.act.numerator, "act.num")
                put(g.act.denominator, "act.den")


class IaptModel(nn.Module):
    """A frozen causal LM with IAPT generators attached (made by `get_iapt_model` or
    `IaptModel.from_pretrained`). Attributes the wrapper does not define are read from the base
    model (`model.config`, `model.device`, `model.generation_config`, ...), as PEFT does.

    Attributes:
        base_model: the Hugging Face model (its parameters have `requires_grad=False`).
        iapt_config: the `IaptConfig`.
        generators: `nn.ModuleList` of `IaptGenerator`, one per decoder layer.
        arch: the llama.cpp architecture name written as `iapt.base_model.arch`.
        slot_token_id: the token id `generate()` places in the soft slots (any id works: the slot
            rows are replaced before every layer).
    """

    def __init__(self, base_model, config: IaptConfig, *, fitted=None, slot_token_id: Optional[int] = None):
        super().__init__()
        self.base_model = base_model
        self.iapt_config = config
        self.arch = llama_cpp_arch(base_model)
        self.n_layer, self.n_embd = dims(base_model)
        layers = decoder_layers(base_model)
        if len(layers) != self.n_layer:
            raise ValueError(f"the model has {len(layers)} decoder layers but config.num_hidden_layers = {self.n_layer}")
        for p in base_model.parameters():
            p.requires_grad_(False)
        device = next(base_model.parameters()).device
        if config.is_rational and fitted is None:
            fitted = fit_rational(config.rational_variant, config.numerator_degree, config.denominator_degree,
                                  config.rational_init)
        self.rational_fit_error = None if fitted is None else float(fitted[2])
        self.generators = nn.ModuleList([IaptGenerator(self.n_embd, config, fitted=fitted, device=device)
                                         for _ in range(self.n_layer)])
        self._apply_trainable_layers()
        if slot_token_id is None:
            cfg = base_model.config
            slot_token_id = next((t for t in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None))
                                  if isinstance(t, int)), 0)
        self.slot_token_id = int(slot_token_id)
        self._state: Optional[_State] = None
        self._enabled = True
        self._handles = [layer.register_forward_pre_hook(self._hook(l), with_kwargs=True)
                         for l, layer in enumerate(layers)]

    # --- attribute forwarding ------------------------------------------------------------------

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    # --- state dict: the generators only ----------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The generators' tensors only (`generators.{l}.down.weight`, ...): the base model is
        frozen and not part of the adapter, so checkpoints (the Hugging Face Trainer's
        `model.safetensors` included) are adapter-sized. `base_model.state_dict()` has the rest."""
        return self.generators.state_dict(destination=destination, prefix=prefix + "generators.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads what `state_dict()` returns (keys `generators.*`; other keys are ignored)."""
        sub = {k[len("generators."):]: v for k, v in state_dict.items() if k.startswith("generators.")}
        return self.generators.load_state_dict(sub, strict=strict, assign=assign)

    # --- trainable layers ----------------------------------------------------------------------

    def trainable_layer_indices(self) -> list[int]:
        if self.iapt_config.layers is None:
            return list(range(self.n_layer))
        out = []
        for l in self.iapt_config.layers:
            ll = l + self.n_layer if l < 0 else l
            if not 0 <= ll < self.n_layer:
                raise ValueError(f"layer {l} out of range for a model of {self.n_layer} layers")
            out.append(ll)
        return sorted(set(out))

    def _apply_trainable_layers(self):
        keep = set(self.trainable_layer_indices())
        for l, g in enumerate(self.generators):
            for p in g.parameters():
                p.requires_grad_(l in keep)

    def adapter_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.generators.parameters() if p.requires_grad or not trainable_only)

    def print_trainable_parameters(self):
        base = sum(p.numel() for p in self.base_model.parameters())
        tr = self.adapter_parameters(True)
        print(f"trainable params: {tr:,} || all params: {base + self.adapter_parameters():,} || "
              f"trainable%: {100.0 * tr / (base + self.adapter_parameters()):.4f}")

    # --- the injection -------------------------------------------------------------------------

    def _hook(self, l: int):
        def hook(module, args, kwargs):
            st = self._state
            if st is None:
                return None
            hs = args[0] if args else kwargs["hidden_states"]
            m = self.iapt_config.n_soft_tokens
            if hs.shape[1] < st.n_max + m:
                return None  # a decode step: the soft tokens are in the KV cache (spec: Decoding)
            cp = kwargs.get("cache_position")
            if isinstance(cp, torch.Tensor) and cp.numel() and int(cp.reshape(-1)[0]) != 0:
                return None  # a forward that continues a cache does not hold the instruction
            B, _, d = hs.shape
            n = st.n.to(hs.device)
            if n.shape[0] != B:
                if B % n.shape[0]:
                    raise ValueError(f"instruction_lengths has {n.shape[0]} rows, the batch {B}")
                n = n.repeat_interleave(B // n.shape[0])
            idx = (n.unsqueeze(1) + torch.arange(m, device=hs.device)).unsqueeze(-1).expand(B, m, d)
            if st.mode == "record":
                st.record.append((l, torch.gather(hs, 1, idx).detach().float()))
                return None
            p = self.generators[l](hs[:, : st.n_max], n).to(hs.dtype)
            hs = hs.scatter(1, idx, p)
            if args:
                return (hs,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hs
            return args, kwargs

        return hook

    @contextlib.contextmanager
    def _injecting(self, n: torch.Tensor, total_len: int, mode: str = "inject"):
        n = torch.as_tensor(n, dtype=torch.long).reshape(-1)
        m = self.iapt_config.n_soft_tokens
        if n.numel() == 0:
            raise ValueError("instruction_lengths is empty")
        if int(n.min()) < 1:
            raise ValueError("every instruction needs at least one token (spec: n >= 1)")
        n_max = int(n.max())
        if n_max + m > total_len:
            raise ValueError(f"the sequence ({total_len} tokens) does not hold an instruction of {n_max} tokens "
                             f"and its {m} soft slots")
        prev = self._state
        self._state = _State(n=n, n_max=n_max, mode=mode, record=[] if mode == "record" else None)
        try:
            yield self._state
        finally:
            self._state = prev

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context the model is the base model alone (no injection)."""
        old = self._enabled
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = old

    def forward(self, input_ids=None, attention_mask=None, labels=None, instruction_lengths=None, **kwargs):
        """The base model's forward with the soft rows replaced before every layer.

        Args:
            input_ids: `[B, T]`, each row `instruction (n_b tokens) + m slot ids + response +
                padding` (what `IaptDataCollator` makes).
            instruction_lengths: `[B]` the `n_b` (>= 1) of each row: the soft slots are at
                `n_b .. n_b+m-1`. Required unless inside `disable_adapter()`.
            labels, attention_mask, **kwargs: passed to the base model (labels give the usual
                shifted cross-entropy; the collator sets -100 outside the response).
        """
        if not self._enabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if instruction_lengths is None:
            raise ValueError("IaptModel.forward needs instruction_lengths (the soft slots follow each "
                             "instruction); use IaptDataCollator, or disable_adapter() for the base model")
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        with self._injecting(instruction_lengths, ref.shape[1]):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    # --- initialisation from data ----------------------------------------------------------------

    @torch.no_grad()
    def init_up_bias_from_batch(self, batch: dict, chunk_size: Optional[int] = None):
        """The demo's no-op start (`IaptConfig.init_up_bias="slot_mean"`): sets `up.bias` of every
        layer to the mean residual row entering that layer at the soft slots, in the base model
        without the adapter, over `batch` (a collator output). `up.weight` is zero, so the adapter
        then starts as (close to) the base model with its slot tokens. Runs the decoder only (no
        logits), `chunk_size` rows at a time (default: all at once)."""
        if not self.iapt_config.up_bias:
            return
        ids = batch["input_ids"]
        n = torch.as_tensor(batch["instruction_lengths"])
        am = batch.get("attention_mask")
        step = chunk_size or ids.shape[0]
        decoder = self.base_model.get_decoder() if hasattr(self.base_model, "get_decoder") else self.base_model.model
        was = self.base_model.training
        self.base_model.eval()
        per_layer: dict = {}
        try:
            for i in range(0, ids.shape[0], step):
                # Trailing padding columns of this chunk are dropped (causal: nothing changes).
                width = int(am[i: i + step].sum(1).max()) if am is not None else ids.shape[1]
                cid = ids[i: i + step, :width].to(self.device)
                with self._injecting(n[i: i + step], width, mode="record") as st:
                    decoder(input_ids=cid, attention_mask=None if am is None else am[i: i + step, :width].to(self.device),
                            use_cache=False)
                for l, rows in st.record:
                    per_layer.setdefault(l, []).append(rows)
        finally:
            self.base_model.train(was)
        for l, chunks in per_layer.items():
            rows = torch.cat(chunks, dim=0)
            self.generators[l].up.bias.copy_(rows.mean(dim=(0, 1)).to(self.generators[l].up.bias.dtype))

    # --- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """`transformers` generation with the adapter: `input_ids` are instructions (for a chat
        model: the chat-templated prompt with the generation prompt, e.g. from
        `IaptDataCollator.encode_instruction`). The `m` soft slots are appended, the prefill
        injects the soft tokens (spec: the generators run once per sequence), and decoding then
        reads them from the KV cache. Every `generate` keyword works (`max_new_tokens`,
        `do_sample`, `output_logits`, ...).

        Returns what `transformers` returns, with the slot columns removed from the sequences:
        `out[:, input_ids.shape[1]:]` is the response. Rows of different lengths (an
        `attention_mask` with zeros, left or right padding) are generated one by one and the
        results right-padded with the pad token; use equal lengths for `return_dict_in_generate`.
        """
        if not self._enabled:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            if kwargs.get("return_dict_in_generate"):
                raise ValueError("rows of different lengths: call generate per length for return_dict_in_generate")
            outs = []
            for row, mask in zip(input_ids, attention_mask.bool()):
                outs.append(self.generate(row[mask].unsqueeze(0), **kwargs)[0])
            pad = self._pad_id(kwargs)
            width = max(o.shape[0] for o in outs)
            res = torch.full((len(outs), width), pad, dtype=input_ids.dtype, device=input_ids.device)
            for i, o in enumerate(outs):
                res[i, : o.shape[0]] = o
            return res
        B, n = input_ids.shape
        m = self.iapt_config.n_soft_tokens
        slots = torch.full((B, m), self.slot_token_id, dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([input_ids, slots], dim=1)
        mask = torch.ones_like(ids)
        with self._injecting(torch.full((B,), n, dtype=torch.long), ids.shape[1]):
            out = self.base_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        keep = lambda seq: torch.cat([seq[:, :n], seq[:, n + m:]], dim=1)  # noqa: E731
        if isinstance(out, torch.Tensor):
            return keep(out)
        out.sequences = keep(out.sequences)
        return out

    def _pad_id(self, kwargs) -> int:
        for t in (kwargs.get("pad_token_id"), getattr(self.base_model.generation_config, "pad_token_id", None),
                  getattr(self.base_model.config, "pad_token_id", None)):
            if isinstance(t, int):
                return t
        eos = getattr(self.base_model.generation_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)) and eos:
            eos = eos[0]
        return eos if isinstance(eos, int) else 0

    # --- files -----------------------------------------------------------------------------------

    def spec_tensors(self, dtype: torch.dtype = torch.float32) -> dict:
        """The adapter's tensors under their spec v1 names (`iapt.blk.{l}.{role}`), in `dtype`
        (float32, float16 or bfloat16; the activation coefficients stay float32)."""
        out = {}
        for l, g in enumerate(self.generators):
            b = f"iapt.blk.{l}."
            cast = lambda t: t.detach().to("cpu", dtype).contiguous()  # noqa: E731
            out[b + "down.weight"] = cast(g.down.weight)
            if g.down.bias is not None:
                out[b + "down.bias"] = cast(g.down.bias)
            out[b + "pool.query"] = cast(g.query)
            out[b + "up.weight"] = cast(g.up.weight)
            if g.up.bias is not None:
                out[b + "up.bias"] = cast(g.up.bias)
            if self.iapt_config.is_rational:
                out[b + "act.num"] = g.act.numerator.detach().to("cpu", torch.float32).contiguous()
                out[b + "act.den"] = g.act.denominator.detach().to("cpu", torch.float32).contiguous()
        return out

    def spec_metadata(self, name: Optional[str] = None, base_model_name: Optional[str] = None) -> dict:
        """The `__metadata__` of the saved file: every required key of spec v1 from the model and
        the config, plus the spec's optional provenance keys."""
        c = self.iapt_config
        meta = {
            "iapt.spec_version": SPEC_VERSION,
            "iapt.n_layer": str(self.n_layer),
            "iapt.n_embd": str(self.n_embd),
            "iapt.n_soft_tokens": str(c.n_soft_tokens),
            "iapt.bottleneck": str(c.bottleneck),
            "iapt.activation": c.activation,
            "iapt.pool.type": "query",
            "iapt.pool.scale": float_text(c.pool_scale),
            "iapt.base_model.arch": self.arch,
            "iapt.converter.version": f"iapt-train {__version__}",
        }
        if c.is_rational:
            meta.update({
                "iapt.rational.variant": c.rational_variant,
                "iapt.rational.numerator_degree": str(c.numerator_degree),
                "iapt.rational.denominator_degree": str(c.denominator_degree),
                "iapt.rational.groups": str(c.rational_groups),
            })
        bname = base_model_name or getattr(self.base_model.config, "_name_or_path", None) or getattr(
            self.base_model, "name_or_path", None)
        if bname:
            meta["iapt.base_model.name"] = str(bname)
        name = name or c.name
        if name:
            meta["general.name"] = str(name)
        return meta

    def save_pretrained(self, save_directory: str, dtype: Union[str, torch.dtype] = torch.float32,
                        name: Optional[str] = None, base_model_name: Optional[str] = None, **_ignored) -> str:
        """Writes `save_directory/adapter.iapt.safetensors`, a canonical spec v1 safetensors adapter
        (`iapt validate --model BASE.gguf` accepts it as it is; `iapt run/serve --adapter` load
        it; `iapt pack` turns it into GGUF), and `save_directory/iapt_train.json` (the training
        options the file does not hold, for `from_pretrained`). Returns the adapter's path.

        Args:
            dtype: of the matrices, queries and biases: float32 (default), float16 or bfloat16;
                rational coefficients are always float32.
            name: `general.name` (default: `IaptConfig.name`).
            base_model_name: `iapt.base_model.name` (default: the base model's `name_or_path`).
        Extra keywords (as the Hugging Face Trainer passes) are ignored."""
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "f32": torch.float32, "float16": torch.float16, "f16": torch.float16,
                     "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, ADAPTER_FILE)
        write_safetensors(path, self.spec_tensors(dtype), self.spec_metadata(name, base_model_name))
        side = {"iapt_config": self.iapt_config.to_dict(), "slot_token_id": self.slot_token_id,
                "base_model_type": self.base_model.config.model_type, "arch": self.arch,
                "n_layer": self.n_layer, "n_embd": self.n_embd, "package": f"iapt-train {__version__}"}
        with open(os.path.join(save_directory, SIDE_FILE), "w") as f:
            json.dump(side, f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, base_model, path: str, is_trainable: bool = False) -> "IaptModel":
        """Attaches a saved adapter to `base_model`. `path` is a directory written by
        `save_pretrained` or any spec v1 safetensors adapter file (F32/F16/BF16; shared roles are
        copied into every layer). The file's architecture, layer count and width must match the
        model's. With `is_trainable=False` (default) the generators are frozen and in eval mode."""
        side = {}
        if os.path.isdir(path):
            sp = os.path.join(path, SIDE_FILE)
            if os.path.exists(sp):
                with open(sp) as f:
                    side = json.load(f)
            path = os.path.join(path, ADAPTER_FILE)
        tensors, meta = read_safetensors(path)
        cfg = _spec_config(meta)
        extra = side.get("iapt_config", {})
        for k in ("layers", "rational_init", "rational_noise", "init_up_bias"):
            if k in extra:
                setattr(cfg, k, extra[k])
        cfg.down_bias = _role(tensors, 0, "down.bias") is not None
        cfg.up_bias = _role(tensors, 0, "up.bias") is not None
        arch = llama_cpp_arch(base_model)
        n_layer, d = dims(base_model)
        if meta.get("iapt.base_model.arch") != arch:
            raise ValueError(f"adapter for {meta.get('iapt.base_model.arch')!r}, model is {arch!r}")
        if int(meta["iapt.n_layer"]) != n_layer or int(meta["iapt.n_embd"]) != d:
            raise ValueError(f"adapter shape (n_layer {meta['iapt.n_layer']}, n_embd {meta['iapt.n_embd']}) "
                             f"does not match the model ({n_layer}, {d})")
        model = cls(base_model, cfg, fitted=_placeholder_fit(cfg), slot_token_id=side.get("slot_token_id"))
        _load_into(model.generators, tensors, cfg)
        if not is_trainable:
            for p in model.generators.parameters():
                p.requires_grad_(False)
            model.eval()
        return model

    def remove_hooks(self):
        """Detaches the injection from the base model for good (the base model is left as it was,
        frozen)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def get_iapt_model(model, config: Optional[IaptConfig] = None, *, slot_token_id: Optional[int] = None,
                   **config_kwargs) -> IaptModel:
    """Freezes `model` (a supported Hugging Face causal LM: llama, mistral, qwen2, qwen3, gemma2,
    gemma3 text, phi3) and attaches one IAPT generator per decoder layer; returns the `IaptModel`.

    Args:
        config: the `IaptConfig` (default: `IaptConfig(**config_kwargs)`).
        slot_token_id: the token id placed in the soft slots by `generate()` (default: the
            model's pad, else EOS, else 0; the id never changes the adapter's output).

    Seeding: call `torch.manual_seed` before this function for reproducible initial weights.
    """
    if config is None:
        config = IaptConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError("give either config or keyword options, not both")
    return IaptModel(model, config, slot_token_id=slot_token_id)


def trainable_parameters(model: IaptModel) -> Iterable[nn.Parameter]:
    """The parameters an optimizer should get (the trained generators)."""
    return [p for p in model.generators.parameters() if p.requires_grad]


__all__: Sequence[str] = ["IaptModel", "get_iapt_model", "generators_from_file", "trainable_parameters",
                          "ADAPTER_FILE"]
