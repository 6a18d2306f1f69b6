#!/usr/bin/env python3
"""The control for reproduce_demo.py: the demo's own trainer (converters/python/demo/train_demo.py,
stages `adapter` and `eval`, unchanged) on the same base (base-f16.gguf read back into PyTorch), the
same regenerated data and the same seeds. It tells how much of a difference between
reproduce_demo.py's accuracy and the demo's 96.0% comes from the package and how much from the base
(the committed adapter was trained on the f32 weights, which are not committed) and the seed.

    python3 train/examples/demo_control.py --seed 1236 --output target/train-demo-control
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reproduce_demo import ASSETS, DEMO, load_base  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1236, help="as reproduce_demo.py: torch seed S, batches Random(S + 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", required=True)
    ap.add_argument("--base-hf", help="as reproduce_demo.py: a Hugging Face base directory instead of base-f16.gguf")
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="demo-control-")
    os.environ["IAPT_DEMO_WORK"] = work
    sys.path.insert(0, str(DEMO))
    import train_demo

    torch.set_num_threads(args.threads)
    train_demo.make_corpus(SimpleNamespace(n_held_out=300, n_base=60000, n_adapter=4000))
    shutil.copy(ASSETS / "tokenizer.model", os.path.join(work, "tokenizer.model"))
    if args.base_hf:
        shutil.copytree(args.base_hf, os.path.join(work, "base_hf"))
    else:
        load_base(ASSETS / "base-f16.gguf").save_pretrained(os.path.join(work, "base_hf"))
    # train_adapter seeds torch with SEED + 2 and draws batches with Random(SEED + 3).
    train_demo.SEED = args.seed - 2
    ns = SimpleNamespace(batch=32, adapter_steps=1000, adapter_lr=1e-2, slot_reset_prob=0.0, threads=args.threads)
    train_demo.train_adapter(ns)
    train_demo.evaluate(ns)
    ev = json.load(open(os.path.join(work, "eval.json")))
    res = {"seed": args.seed, "base": args.base_hf or "base-f16.gguf", "held_out_adapter": ev["held_out_adapter"], "held_out_base": ev["held_out_base"],
           "adapter_train_seconds": float(open(os.path.join(work, "adapter_train_seconds.txt")).read())}
    (out / f"control-{args.seed}{'-hf' if args.base_hf else ''}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
