"""The instruction/response boundary: `IaptDataCollator` turns `{"instruction", "response"}`
records into batches whose soft slots sit right after the (chat-templated) instruction and whose
loss covers the response only."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

IGNORE = -100


def load_jsonl(path: str) -> List[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON: {e}") from None
    return rows


class IaptDataCollator:
    """Builds training batches for an `IaptModel` (works as a `transformers.Trainer` data
    collator and in a plain loop).

    Each record is `{"instruction": str, "response": str}` (other keys are ignored), or already
    tokenized as `{"instruction_ids": [...], "response_ids": [...]}` (used as given: no EOS is
    added). A row of the batch is

        instruction ids (n tokens) | m slot ids | response ids + EOS | padding

    - **instruction ids** (spec: "the instruction is every token before the soft slots, BOS and
      chat-template tokens included"): with a chat template, the tokenizer's
      `apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True)`
      (with a system message first if `system_prompt` is given), so the soft slots follow the
      assistant prefix, where a served request's prompt ends; without one,
      `tokenizer(instruction)` with the tokenizer's own special tokens (BOS). `n` must be >= 1.
    - **m slot ids**: `slot_token_id`; their embeddings are replaced before layer 0 (spec step 4),
      so the id only matters for `init_up_bias_from_batch` (the base's own rows at the slots).
    - **response ids**: `tokenizer(response, add_special_tokens=False)` then EOS (`add_eos`).
    - `labels` are the input ids on the response (EOS included) and -100 elsewhere, so the loss
      is the response's only; the first response token is predicted at the last soft slot.
    - `instruction_lengths` `[B]` carries every `n` to `IaptModel.forward`; `attention_mask` is 0
      on the right padding.

    Args:
        tokenizer: a Hugging Face tokenizer (not needed for pre-tokenized records).
        n_soft_tokens: `m` (`IaptConfig.n_soft_tokens`); or pass `model=` to read it.
        model: an `IaptModel`, to take `m` and `slot_token_id` from.
        chat_template: True, False, or None (default: use the tokenizer's chat template when it has one).
        system_prompt: an optional system message for the chat template.
        slot_token_id: id placed in the soft slots (default: the model's, else the tokenizer's pad,
            else EOS, else 0).
        pad_token_id: id of the right padding (default: pad, else EOS, else 0).
        eos_token_id: the EOS appended to responses and that ends generation (default: the tokenizer's).
        add_eos: append EOS to the response (default True).
        max_length: refuse (ValueError) a row longer than this; `fits()` tells beforehand.
    """

    def __init__(self, tokenizer=None, n_soft_tokens: Optional[int] = None, *, model=None,
                 chat_template: Optional[bool] = None, system_prompt: Optional[str] = None,
                 slot_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, add_eos: bool = True, max_length: Optional[int] = None):
        self.tokenizer = tokenizer
        if n_soft_tokens is None:
            if model is None:
                raise ValueError("give n_soft_tokens or model")
            n_soft_tokens = model.iapt_config.n_soft_tokens
        self.m = int(n_soft_tokens)
        if chat_template is None:
            chat_template = bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        tok_pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if slot_token_id is None and model is not None:
            slot_token_id = model.slot_token_id
        self.slot_token_id = next((t for t in (slot_token_id, tok_pad, tok_eos) if t is not None), 0)
        self.pad_token_id = next((t for t in (pad_token_id, tok_pad, eos_token_id, tok_eos) if t is not None), 0)
        self.eos_token_id = eos_token_id if eos_token_id is not None else tok_eos
        self.add_eos = add_eos
        self.max_length = max_length

    # --- tokenization --------------------------------------------------------------------------

    def encode_instruction(self, instruction: str) -> List[int]:
        """The instruction's ids: everything before the soft slots (what `IaptModel.generate` takes)."""
        if self.tokenizer is None:
            raise ValueError("a tokenizer is needed for text records")
        if self.chat_template:
            msgs = []
            if self.system_prompt:
                msgs.append({"role": "system", "content": self.system_prompt})
            msgs.append({"role": "user", "content": instruction})
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = list(self.tokenizer(instruction)["input_ids"])
        if not ids:
            raise ValueError("an instruction must have at least one token (spec: n >= 1)")
        return [int(t) for t in ids]

    def encode_response(self, response: str) -> List[int]:
        if self.tokenizer is None:
            raise ValueError("a tokenizer is needed for text records")
        ids = [int(t) for t in self.tokenizer(response, add_special_tokens=False)["input_ids"]]
        if self.add_eos:
            if self.eos_token_id is None:
                raise ValueError("the tokenizer has no EOS token; pass add_eos=False")
            ids.append(int(self.eos_token_id))
        return ids

    def encode(self, record: Dict[str, Any]) -> Dict[str, List[int]]:
        """`{"instruction_ids", "response_ids"}` of a record (pre-tokenized records pass through)."""
        if "instruction_ids" in record:
            return {"instruction_ids": [int(t) for t in record["instruction_ids"]],
                    "response_ids": [int(t) for t in record.get("response_ids", [])]}
        if "instruction" not in record or "response" not in record:
            raise ValueError(f"a record needs 'instruction' and 'response' (got keys {sorted(record)})")
        return {"instruction_ids": self.encode_instruction(record["instruction"]),
                "response_ids": self.encode_response(record["response"])}

    def length(self, record: Dict[str, Any]) -> int:
        e = self.encode(record)
        return len(e["instruction_ids"]) + self.m + len(e["response_ids"])

    def fits(self, record: Dict[str, Any]) -> bool:
        """Whether the record's row is at most `max_length` tokens."""
        return self.max_length is None or self.length(record) <= self.max_length

    # --- batches -------------------------------------------------------------------------------

    def __call__(self, features: Sequence[Union[Dict[str, Any], Any]]) -> Dict[str, torch.Tensor]:
        enc = [self.encode(dict(f)) for f in features]
        rows = []
        for e in enc:
            ins, resp = e["instruction_ids"], e["response_ids"]
            if not ins:
                raise ValueError("an instruction must have at least one token (spec: n >= 1)")
            seq = ins + [self.slot_token_id] * self.m + resp
            if self.max_length is not None and len(seq) > self.max_length:
                raise ValueError(f"a row of {len(seq)} tokens exceeds max_length {self.max_length}")
            rows.append((seq, len(ins), len(resp)))
        T = max(len(s) for s, _, _ in rows)
        B = len(rows)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        n = torch.empty(B, dtype=torch.long)
        for i, (seq, ni, nr) in enumerate(rows):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            start = ni + self.m
            labels[i, start: start + nr] = torch.tensor(seq[start: start + nr], dtype=torch.long)
            n[i] = ni
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "instruction_lengths": n}
