"""`iapt-train`: train an IAPT adapter on a JSON-lines file of {"instruction", "response"} records
and write it as a spec v1 safetensors file.

    iapt-train --model Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl --output out/
    iapt validate out/adapter.iapt.safetensors --model qwen2.5-0.5b-instruct-f16.gguf
    iapt serve --model qwen2.5-0.5b-instruct-f16.gguf --adapter myadapter=out/adapter.iapt.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from .config import ACTIVATIONS, FIXED_ACTIVATIONS, RATIONAL_VARIANTS, IaptConfig
from .training import TrainArgs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="iapt-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data and model")
    g.add_argument("--model", required=True, help="a Hugging Face causal LM: a local directory or a hub id "
                   "(llama, mistral, qwen2, qwen3, gemma2, gemma3 text, phi3)")
    g.add_argument("--tokenizer", help="tokenizer directory or id (default: --model)")
    g.add_argument("--data", required=True, help="training JSONL, one {\"instruction\", \"response\"} per line")
    g.add_argument("--eval-data", help="evaluation JSONL (default: --eval-fraction of --data, held out)")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out for evaluation "
                   "when no --eval-data is given (default 0.05; 0: no evaluation)")
    g.add_argument("--output", required=True, help="directory for adapter.iapt.safetensors and the logs")
    g.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="wrap each instruction in the tokenizer's chat template with the generation prompt "
                   "(auto: when the tokenizer has one)")
    g.add_argument("--system-prompt", help="a system message for the chat template")
    g.add_argument("--slot-token-id", type=int, help="id placed in the soft slots (default: pad, else EOS)")
    g.add_argument("--max-length", type=int, default=1024, help="skip records longer than this many tokens "
                   "(instruction + soft slots + response + EOS; default 1024)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the frozen base model (the generators train in float32)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    g.add_argument("--threads", type=int, help="torch CPU threads")

    a = ap.add_argument_group("adapter (IaptConfig; spec v1 keys in brackets)")
    a.add_argument("--soft-tokens", type=int, default=4, help="m [iapt.n_soft_tokens] (default 4)")
    a.add_argument("--bottleneck", type=int, default=64, help="r [iapt.bottleneck] (default 64)")
    a.add_argument("--activation", choices=ACTIVATIONS, default="rational", help="g [iapt.activation] (default rational)")
    a.add_argument("--rational-variant", choices=RATIONAL_VARIANTS, default="B", help="[iapt.rational.variant] (default B)")
    a.add_argument("--rational-degrees", default="6,5", help="M,N [iapt.rational.numerator_degree, "
                   "denominator_degree] (default 6,5)")
    a.add_argument("--rational-groups", type=int, default=1, help="G [iapt.rational.groups] (default 1)")
    a.add_argument("--rational-init", choices=FIXED_ACTIVATIONS, default="gelu",
                   help="function the rational activation starts as (default gelu)")
    a.add_argument("--pool-scale", type=float, help="s [iapt.pool.scale] (default 1/sqrt(r))")
    a.add_argument("--no-down-bias", action="store_true", help="no down.bias tensor")
    a.add_argument("--no-up-bias", action="store_true", help="no up.bias tensor")
    a.add_argument("--layers", help="comma-separated layers whose generators train (default: all; the "
                   "others stay at their initial value, the file holds all layers)")
    a.add_argument("--init-up-bias", choices=["slot_mean", "zeros"], default="slot_mean",
                   help="up.bias start (default slot_mean: the base's mean row at the slots, on 256 records)")
    a.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the saved matrices and biases (default float32)")
    a.add_argument("--name", help="general.name of the adapter")

    t = ap.add_argument_group("training (TrainArgs)")
    d = TrainArgs()
    t.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"records per step (default {d.batch_size})")
    t.add_argument("--micro-batch-size", type=int, help="records per forward/backward pass, gradients "
                   "accumulated to --batch-size (default: the whole batch at once)")
    t.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help=f"records per evaluation pass (default {d.eval_batch_size})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW (default {d.lr})")
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"(default {d.warmup_steps})")
    t.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help=f"cosine floor (default {d.min_lr_ratio})")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"(default {d.grad_clip}; 0: off)")
    t.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between evaluations (default {d.eval_every})")
    t.add_argument("--eval-generate", type=int, default=64, help="greedy exact-match on this many evaluation "
                   "records at each evaluation (default 64; 0: loss only)")
    t.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default {d.max_new_tokens})")
    t.add_argument("--seed", type=int, default=0, help="seeds the initial weights, the split and the batches (default 0)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import IaptDataCollator, load_jsonl
    from .model import get_iapt_model
    from .training import exact_match, train

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    os.makedirs(args.output, exist_ok=True)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    base.eval()

    num_deg, den_deg = (int(x) for x in args.rational_degrees.split(","))
    cfg = IaptConfig(
        n_soft_tokens=args.soft_tokens, bottleneck=args.bottleneck, activation=args.activation,
        rational_variant=args.rational_variant, numerator_degree=num_deg, denominator_degree=den_deg,
        rational_groups=args.rational_groups, rational_init=args.rational_init, pool_scale=args.pool_scale,
        down_bias=not args.no_down_bias, up_bias=not args.no_up_bias,
        layers=None if not args.layers else [int(x) for x in args.layers.split(",")],
        init_up_bias=args.init_up_bias, name=args.name)
    torch.manual_seed(args.seed)
    model = get_iapt_model(base, cfg, slot_token_id=args.slot_token_id)
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    collator = IaptDataCollator(tokenizer, model=model, chat_template=chat, system_prompt=args.system_prompt,
                                max_length=args.max_length)

    records = load_jsonl(args.data)
    kept = [r for r in records if collator.fits(r)]
    if len(kept) < len(records):
        print(f"skipped {len(records) - len(kept)} records longer than --max-length {args.max_length}", file=sys.stderr)
    if args.eval_data:
        train_rows, eval_rows = kept, [r for r in load_jsonl(args.eval_data) if collator.fits(r)]
    elif args.eval_fraction > 0 and len(kept) >= 2:
        rows = list(kept)
        random.Random(args.seed).shuffle(rows)
        k = max(1, int(round(len(rows) * args.eval_fraction)))
        eval_rows, train_rows = rows[:k], rows[k:]
    else:
        train_rows, eval_rows = kept, []
    if not train_rows:
        print("no training records", file=sys.stderr)
        return 2
    print(f"model {args.model} ({model.arch}, {model.n_layer} layers, d {model.n_embd}, {args.dtype}, {device}); "
          f"adapter {model.adapter_parameters():,} parameters; {len(train_rows)} training / {len(eval_rows)} evaluation "
          f"records; chat template {'on' if collator.chat_template else 'off'}", flush=True)
    if cfg.init_up_bias == "slot_mean" and cfg.up_bias:
        model.init_up_bias_from_batch(collator(train_rows[:256]), chunk_size=args.micro_batch_size or args.batch_size)

    targs = TrainArgs(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      eval_every=args.eval_every, eval_generate=args.eval_generate,
                      micro_batch_size=args.micro_batch_size, eval_batch_size=args.eval_batch_size,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.no_progress,
                      log_path=os.path.join(args.output, "train_log.jsonl"))
    open(targs.log_path, "w").close()
    train(model, collator, train_rows, targs, eval_rows)
    path = model.save_pretrained(args.output, dtype=args.save_dtype)
    summary = {"adapter": path, "seconds": round(time.time() - t0, 1), "train_records": len(train_rows),
               "eval_records": len(eval_rows)}
    if eval_rows and args.eval_generate > 0:
        acc, _ = exact_match(model, collator, eval_rows[: args.eval_generate], args.max_new_tokens,
                             args.eval_batch_size)
        summary["eval_exact_match"] = acc
    with open(os.path.join(args.output, "train_summary.json"), "w") as f:
        json.dump({"summary": summary, "args": vars(args)}, f, indent=2)
        f.write("\n")
    print(f"wrote {path} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
