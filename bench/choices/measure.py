"""n choices from one prefill against n separate requests (issue 33, item 2), on a running
`iapt serve` (bench/choices/run.sh starts it): for REPS rounds, in alternating order,
  A: one /v1/completions request with n choices (seed s),
  B: n requests with one choice each, sent at once (seeds s .. s+n-1),
timing each (wall clock, client side) and reading the engine's computed prompt rows
(`iapt_engine_prefill_rows_total`) from /metrics around it. Every round also compares choice i of
A with B's request with seed s+i: identical in exact mode (crates/engine/tests/engine.rs, F32 KV);
here (F16 KV, Q4_K_M, batches of different shapes) llama.cpp's arithmetic is not bit-identical
across batch shapes, so a sampled continuation may part after a while: the common prefix is
reported. Writes a JSON summary to argv[2].

usage: measure.py URL OUT.json   (settings in the environment: MODEL_ID, N, PROMPT, GEN, REPS)
"""

import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request

url, out = sys.argv[1], sys.argv[2]
model = os.environ["MODEL_ID"]
n, prompt_len, gen, reps = (int(os.environ[k]) for k in ("N", "PROMPT", "GEN", "REPS"))


def post(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def prefill_rows():
    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("iapt_engine_prefill_rows_total"):
                return int(float(line.split()[-1]))
    raise SystemExit("no iapt_engine_prefill_rows_total in /metrics")


def body(prompt, seed, choices):
    return {"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 1.0, "seed": seed, "n": choices,
            "ignore_eos": True, "logprobs": 0}


def tokens(choice):
    return choice["logprobs"]["tokens"]


def run_a(prompt, seed):
    r0, t0 = prefill_rows(), time.monotonic()
    r = post("/v1/completions", body(prompt, seed, n))
    return time.monotonic() - t0, prefill_rows() - r0, [tokens(c) for c in r["choices"]]


def run_b(prompt, seed):
    r0, t0 = prefill_rows(), time.monotonic()
    got = [None] * n

    def one(i):
        got[i] = tokens(post("/v1/completions", body(prompt, seed + i, 1))["choices"][0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, prefill_rows() - r0, got


# Warm-up: one short request (the first decode allocates llama.cpp's buffers).
post("/v1/completions", {"model": model, "prompt": [1, 2, 3], "max_tokens": 2})
rounds = []
for k in range(reps):
    rng = random.Random(k)
    prompt = [1] + [rng.randrange(3, 30000) for _ in range(prompt_len - 1)]
    seed = 1000 * k
    order = ("A", "B") if k % 2 == 0 else ("B", "A")
    res = {}
    for which in order:
        res[which] = (run_a if which == "A" else run_b)(prompt, seed)
    common = []
    for a, b in zip(res["A"][2], res["B"][2]):
        k_same = 0
        while k_same < min(len(a), len(b)) and a[k_same] == b[k_same]:
            k_same += 1
        common.append(k_same)
    rounds.append({"a_s": res["A"][0], "b_s": res["B"][0], "a_prefill_rows": res["A"][1], "b_prefill_rows": res["B"][1],
                   "common_prefix_tokens": common})
    print(f"round {k}: n={n} in one request {res['A'][0]:.2f} s, {res['A'][1]} prompt rows; {n} requests {res['B'][0]:.2f} s, "
          f"{res['B'][1]} prompt rows; tokens choice i shares with the request with seed + i: {common} of {gen}", flush=True)

summary = {
    "model": model, "n": n, "prompt_tokens": prompt_len, "generated_tokens": gen, "reps": reps, "rounds": rounds,
    "median_a_s": statistics.median(r["a_s"] for r in rounds), "median_b_s": statistics.median(r["b_s"] for r in rounds),
    "speedup_median_of_pairs": statistics.median(r["b_s"] / r["a_s"] for r in rounds),
    "a_prefill_rows": rounds[0]["a_prefill_rows"], "b_prefill_rows": rounds[0]["b_prefill_rows"],
    "first_token_same": sum(c > 0 for r in rounds for c in r["common_prefix_tokens"]),
    "all_tokens_same": sum(c == gen for r in rounds for c in r["common_prefix_tokens"]),
    "choices": n * reps,
}
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
