"""The table of bench/q8_0/run.sh: demo accuracy (F16 vs Q8_0 adapter) and the bench model's logit
error of the Q8_0 adapter against the F16 one. Writes OUT/results.json and OUT/table.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    for a in ("--work", "--adapters", "--out"):
        ap.add_argument(a, type=Path, required=True)
    for a in ("--n-adapters", "--prompts", "--prompt", "--gen", "--threads"):
        ap.add_argument(a, type=int, required=True)
    args = ap.parse_args()
    w = args.work

    demo = {k: json.loads((w / f"demo-{k}.json").read_text()) for k in ("f16", "q8_0")}
    acc = {k: (v["with_adapter"]["correct"], v["with_adapter"]["n"]) for k, v in demo.items()}
    sizes = {"demo_f16": os.path.getsize("converters/python/demo/assets/adapter.iapt.gguf"),
             "demo_q8_0": os.path.getsize(w / "demo-q8_0.iapt.gguf"),
             "bench_f16": os.path.getsize(args.adapters / "iapt-00.safetensors"),
             "bench_q8_0": os.path.getsize(w / "iapt-00-q8_0.safetensors")}

    max_rel, rms_num, rms_den, steps = 0.0, 0.0, 0.0, 0
    first_same, cont_same, runs = 0, 0, 0
    for n in range(args.n_adapters):
        for p in range(args.prompts):
            a = np.load(w / f"logits-{n:02d}-{p}-f16.npy").astype(np.float64)
            b = np.load(w / f"logits-{n:02d}-{p}-q8_0.npy").astype(np.float64)
            ta, tb = a.argmax(axis=1), b.argmax(axis=1)
            runs += 1
            first_same += int(ta[0] == tb[0])
            cont_same += int((ta == tb).all())
            # Compare steps while the two continuations agree (then both saw the same tokens).
            k = 1 + (int(np.argmax(ta != tb)) if (ta != tb).any() else len(ta) - 1)
            for s in range(min(k, len(ta))):
                d = np.abs(a[s] - b[s])
                max_rel = max(max_rel, float(d.max() / (a[s].max() - a[s].min())))
                rms_num += float((d ** 2).mean())
                rms_den += float((a[s] ** 2).mean())
                steps += 1
    res = {
        "demo": {"f16": acc["f16"], "q8_0": acc["q8_0"], "base": "converters/python/demo/assets/base-q4_k_m.gguf"},
        "logits": {"steps_compared": steps, "max_abs_diff_over_spread": max_rel, "rms_diff_over_rms": (rms_num / rms_den) ** 0.5,
                   "first_token_same": first_same, "continuation_same": cont_same, "runs": runs},
        "sizes": sizes,
        "settings": {"adapters": args.n_adapters, "prompts": args.prompts, "prompt_tokens": args.prompt, "gen": args.gen,
                     "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    lg = res["logits"]
    L = ["| adapter | demo held-out (Q4_K_M base) | demo adapter file | bench adapter file |",
         "| --- | ---: | ---: | ---: |"]
    for k, name in (("f16", "F16 (as trained)"), ("q8_0", "Q8_0 (`iapt pack --dtype q8_0`)")):
        c, t = res["demo"][k]
        L.append(f"| {name} | {c}/{t} ({100 * c / t:.1f}%) | {sizes['demo_' + k] / 1024:.0f} KiB | {sizes['bench_' + k] / 2**20:.1f} MiB |")
    L += ["", f"Bench model (hidden 2048, Q4_K_M), {args.n_adapters} adapters x {args.prompts} prompts of {args.prompt} tokens x "
          f"{args.gen} greedy steps, Q8_0 adapter vs F16 adapter: largest |logit difference| / the logit vector's spread "
          f"**{lg['max_abs_diff_over_spread']:.2e}**, RMS difference / RMS of the logits **{lg['rms_diff_over_rms']:.2e}** over "
          f"{lg['steps_compared']} steps; first token the same in {lg['first_token_same']}/{lg['runs']} runs, the whole "
          f"continuation in {lg['continuation_same']}/{lg['runs']}."]
    (args.out / "table.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
