"""A plain training loop (what `iapt-train` runs), evaluation loss and exact-match accuracy.

The `IaptModel` is an ordinary `nn.Module`, so any loop or the Hugging Face `Trainer` works too;
this one is the demo's recipe: AdamW on the generators only, linear warm-up then cosine decay to
`min_lr_ratio * lr`, gradient clipping, batches drawn with `random.Random(seed).sample` each step.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch

from .data import IaptDataCollator
from .model import IaptModel, trainable_parameters


@dataclass
class TrainArgs:
    """Options of `train()` (and of the `iapt-train` command line, same names with dashes).

    Attributes:
        steps: optimizer steps.
        batch_size: records per step.
        lr: peak learning rate (AdamW). The demo: 1e-2.
        warmup_steps: linear warm-up steps from lr/warmup to lr.
        min_lr_ratio: the cosine schedule ends at `min_lr_ratio * lr` (the demo: 0.1).
        weight_decay: AdamW weight decay (the demo: 0).
        grad_clip: clip the generators' gradient norm to this (0: off).
        eval_every: evaluate every this many steps (0: only at the end).
        micro_batch_size: split each step's batch into forward/backward passes of this many
            records, gradients accumulated, each pass weighted by its share of the batch's response
            tokens, so the step equals the whole batch's (None: one pass). Bounds memory on large models.
        eval_batch_size: records per evaluation batch.
        eval_generate: greedy exact-match accuracy on this many evaluation records at each
            evaluation (0: loss only).
        max_new_tokens: generation limit of the exact-match evaluation.
        seed: seeds the batch sampling (`random.Random(seed)`).
        progress: show a progress bar (tqdm).
        log_path: append one JSON line per logged step / evaluation to this file.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    micro_batch_size: Optional[int] = None
    eval_batch_size: int = 64
    eval_generate: int = 0
    max_new_tokens: int = 32
    seed: int = 0
    progress: bool = True
    log_path: Optional[str] = None


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to `min_ratio * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: IaptModel, collator: IaptDataCollator, records: Sequence[dict], batch_size: int = 64) -> float:
    """Mean cross-entropy per response token (EOS included) over `records`."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(records), batch_size):
            batch = _to(collator(records[i: i + batch_size]), model.device)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits.float()
            shift = labels[:, 1:]
            lp = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            total += lp.item()
            count += int((shift != -100).sum())
    finally:
        model.train(was)
    return total / max(1, count)


@torch.no_grad()
def exact_match(model: IaptModel, collator: IaptDataCollator, records: Sequence[dict], max_new_tokens: int = 32,
                batch_size: int = 64, decode: Optional[Callable[[List[int]], str]] = None):
    """Greedy decoding with the adapter; returns (accuracy in %, predictions). A prediction is the
    decoded response (special tokens skipped, stripped), compared with `record["response"].strip()`.
    Instructions of equal length are generated together."""
    if decode is None:
        tok = collator.tokenizer
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    was = model.training
    model.eval()
    preds: List[Optional[str]] = [None] * len(records)
    by_len = {}
    for i, r in enumerate(records):
        ids = collator.encode(r)["instruction_ids"]
        by_len.setdefault(len(ids), []).append((i, ids))
    eos = collator.eos_token_id
    try:
        for _, items in sorted(by_len.items()):
            for k in range(0, len(items), batch_size):
                chunk = items[k: k + batch_size]
                ids = torch.tensor([x for _, x in chunk], device=model.device)
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=collator.pad_token_id, eos_token_id=eos)
                for (i, _), row in zip(chunk, out[:, ids.shape[1]:].tolist()):
                    if eos is not None and eos in row:
                        row = row[: row.index(eos)]
                    preds[i] = decode(row).strip()
    finally:
        model.train(was)
    acc = 100.0 * sum(p == str(r.get("response", "")).strip() for p, r in zip(preds, records)) / max(1, len(records))
    return acc, preds


def accumulate_gradients(model: IaptModel, collator: IaptDataCollator, records: Sequence[dict],
                         micro_batch_size: Optional[int] = None) -> torch.Tensor:
    """Backward of the batch's loss (mean cross-entropy over its response tokens) into the
    generators' `.grad`, in passes of `micro_batch_size` records each weighted by its share of
    the response tokens (the same gradient as one pass, up to rounding). Returns the loss."""
    if not micro_batch_size or micro_batch_size >= len(records):
        loss = model(**_to(collator(records), model.device), use_cache=False).loss
        loss.backward()
        return loss.detach()
    parts = [collator(records[i: i + micro_batch_size]) for i in range(0, len(records), micro_batch_size)]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in parts]
    total = max(1, sum(counts))
    loss = torch.zeros(())
    for b, c in zip(parts, counts):
        part = model(**_to(b, model.device), use_cache=False).loss * (c / total)
        part.backward()
        loss = loss + part.detach().cpu()
    return loss


def train(model: IaptModel, collator: IaptDataCollator, records: Sequence[dict], args: TrainArgs,
          eval_records: Optional[Sequence[dict]] = None, decode: Optional[Callable[[List[int]], str]] = None):
    """Trains the generators of `model` on `records`; returns the list of logged entries.
    The base model stays in eval mode (frozen, no dropout); the generators train."""
    records = records if isinstance(records, list) else list(records)
    params = list(trainable_parameters(model))
    if not params:
        raise ValueError("nothing to train: no generator parameter requires grad")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    rng = random.Random(args.seed)
    log: List[dict] = []
    logf = open(args.log_path, "a") if args.log_path else None

    def emit(entry):
        log.append(entry)
        if logf:
            logf.write(json.dumps(entry) + "\n")
            logf.flush()

    bar = None
    if args.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.steps, desc="iapt-train", unit="step", dynamic_ncols=True)

    def evaluate(step):
        entry = {"step": step, "eval": True}
        if eval_records:
            entry["eval_loss"] = evaluate_loss(model, collator, eval_records, args.eval_batch_size)
            if args.eval_generate > 0:
                acc, _ = exact_match(model, collator, eval_records[: args.eval_generate], args.max_new_tokens,
                                     args.eval_batch_size, decode)
                entry["eval_exact_match"] = acc
        emit(entry)
        msg = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "eval")
        (bar.write if bar else print)("eval: " + msg)
        return entry

    model.train()
    model.base_model.eval()
    t0 = time.time()
    try:
        for step in range(args.steps):
            chosen = rng.sample(records, min(args.batch_size, len(records)))
            lr = lr_at(step, args.steps, args.lr, args.warmup_steps, args.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, collator, chosen, args.micro_batch_size)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            lv = loss.item()
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss is {lv} at step {step}")
            if bar:
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            if step % 25 == 0 or step == args.steps - 1:
                emit({"step": step, "loss": lv, "lr": lr, "seconds": round(time.time() - t0, 1)})
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps and eval_records:
                evaluate(step + 1)
        if eval_records:
            evaluate(args.steps)
    finally:
        if bar:
            bar.close()
        if logf:
            logf.close()
    model.eval()
    return log


def args_dict(a: TrainArgs) -> dict:
    return asdict(a)
