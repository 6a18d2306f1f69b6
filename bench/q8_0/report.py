"""The table of bench/q8_0/run.sh: demo accuracy (the adapter as committed vs Q8_0), the bench
model's logit error of the Q8_0 and BF16 adapters against the F16 one, and memory per resident
adapter. Writes OUT/results.json and OUT/table.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np


def logit_error(w: Path, kind: str, n_adapters: int, prompts: int) -> dict:
    """`kind`'s logits against F16's, over the steps where both greedy continuations agree."""
    max_rel, num, den, steps, first, whole, runs = 0.0, 0.0, 0.0, 0, 0, 0, 0
    for n in range(n_adapters):
        for p in range(prompts):
            a = np.load(w / f"logits-{n:02d}-{p}-f16.npy").astype(np.float64)
            b = np.load(w / f"logits-{n:02d}-{p}-{kind}.npy").astype(np.float64)
            ta, tb = a.argmax(axis=1), b.argmax(axis=1)
            runs += 1
            first += int(ta[0] == tb[0])
            whole += int((ta == tb).all())
            # Step s is compared when the tokens before it agree (both saw the same context).
            agree = int(np.argmax(ta != tb)) if (ta != tb).any() else len(ta) - 1
            for s in range(agree + 1):
                d = np.abs(a[s] - b[s])
                max_rel = max(max_rel, float(d.max() / (a[s].max() - a[s].min())))
                num += float((d ** 2).mean())
                den += float((a[s] ** 2).mean())
                steps += 1
    return {"max_abs_diff_over_spread": max_rel, "rms_diff_over_rms": (num / den) ** 0.5, "steps_compared": steps,
            "first_token_same": first, "continuation_same": whole, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser()
    for a in ("--work", "--adapters", "--out"):
        ap.add_argument(a, type=Path, required=True)
    for a in ("--n-adapters", "--prompts", "--prompt", "--gen", "--n-mem", "--threads"):
        ap.add_argument(a, type=int, required=True)
    args = ap.parse_args()
    w = args.work

    demo = {k: json.loads((w / f"demo-{k}.json").read_text())["with_adapter"] for k in ("f16", "q8_0")}
    sizes = {"demo": os.path.getsize("converters/python/demo/assets/adapter.iapt.gguf"),
             "demo_q8_0": os.path.getsize(w / "demo-q8_0.iapt.gguf"),
             "f16": os.path.getsize(args.adapters / "iapt-00.safetensors"),
             "q8_0": os.path.getsize(w / "iapt-00-q8_0.safetensors"),
             "bf16": os.path.getsize(w / "iapt-00-bf16.safetensors")}
    logits = {k: logit_error(w, k, args.n_adapters, args.prompts) for k in ("q8_0", "bf16")}
    rss = {f"{k}-{c}": int((w / f"rss-{k}-{c}.txt").read_text().split()[-1]) * 1024 for k in ("f16", "q8_0") for c in (1, args.n_mem)}
    per = {k: (rss[f"{k}-{args.n_mem}"] - rss[f"{k}-1"]) / (args.n_mem - 1) for k in ("f16", "q8_0")}
    res = {
        "demo": {"as_committed": [demo["f16"]["correct"], demo["f16"]["n"]], "q8_0": [demo["q8_0"]["correct"], demo["q8_0"]["n"]],
                 "base": "converters/python/demo/assets/base-q4_k_m.gguf"},
        "logits_vs_f16": logits,
        "memory": {"peak_rss_bytes": rss, "per_adapter_bytes": per, "per_adapter_over_file": {k: per[k] / sizes[k] for k in per},
                   "n": args.n_mem},
        "sizes": sizes,
        "settings": {"adapters": args.n_adapters, "prompts": args.prompts, "prompt_tokens": args.prompt, "gen": args.gen,
                     "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    c0, t0 = res["demo"]["as_committed"]
    c1, t1 = res["demo"]["q8_0"]
    L = ["Demo (300 held-out examples, Q4_K_M base, `iapt eval`):", "",
         "| adapter | correct | file |", "| --- | ---: | ---: |",
         f"| as committed (F32, as trained) | {c0}/{t0} ({100 * c0 / t0:.1f}%) | {sizes['demo'] / 1024:.0f} KiB |",
         f"| Q8_0 matrices (`iapt pack --dtype q8_0`) | {c1}/{t1} ({100 * c1 / t1:.1f}%) | {sizes['demo_q8_0'] / 1024:.0f} KiB |",
         "", f"Bench model (hidden 2048, Q4_K_M, random weights), {args.n_adapters} adapters x {args.prompts} prompts of "
         f"{args.prompt} tokens x {args.gen} greedy steps, against the F16 adapter (steps compared while the continuations agree):", "",
         "| adapter | file | max abs logit diff / spread | RMS diff / RMS | first token same | whole continuation same |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for k, name in (("q8_0", "Q8_0 matrices"), ("bf16", "BF16 (yardstick)")):
        e = logits[k]
        L.append(f"| {name} | {sizes[k] / 2**20:.1f} MiB | {e['max_abs_diff_over_spread']:.2e} | {e['rms_diff_over_rms']:.2e} | "
                 f"{e['first_token_same']}/{e['runs']} | {e['continuation_same']}/{e['runs']} |")
    L += ["", f"Memory per resident adapter (`iapt batch`, peak RSS with {args.n_mem} adapters minus with 1, / {args.n_mem - 1}):", ""]
    for k in ("f16", "q8_0"):
        L.append(f"- {k.upper()}: {per[k] / 2**20:.1f} MiB per adapter, **{per[k] / sizes[k]:.3f}x** its file "
                 f"({sizes[k] / 2**20:.1f} MiB)")
    (args.out / "table.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
