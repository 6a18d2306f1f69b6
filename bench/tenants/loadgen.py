#!/usr/bin/env python3
"""The one load generator of bench/tenants: the same client for llama-server and `iapt serve`.

The official `openai` package's async client (the repository's `.venv`, pinned by
crates/cli/tests/openai/requirements.txt) sends streamed, greedy /v1/completions requests from
`--concurrency` workers (a closed loop: a worker sends its next request when its last one ends)
until `--requests` have run, after a warm-up run of `--warmup` requests. Each request picks its tenant
from the first `--tenants` adapters, uniformly or with a skewed (Zipf, s = 1, or `zipf1.1`: s = 1.1) mix,
seeded.

- llama-server (`--server llama-lora`): `lora: [{"id": tenant, "scale": 1.0}]` via extra_body (every
  adapter a request does not list gets scale 0 for it: the server's construct_lora_list);
  `--server llama-base`: no `lora` field. `--server iapt`: `model` = the tenant's adapter name
  (`--adapter-prefix` + two digits); `--server iapt-base`: `model` = `--model`.
- Prompts: distinct random lowercase strings without spaces (seeded by the run label and the request
  index), sized so that the prompt is exactly --prompt-tokens tokens: `--words bench`: in
  make_bench_model.py's vocab (BOS, byte tokens, "▁w<k>") a letter is one byte-fallback token and the
  tokenizer's leading "▁" three, so BOS + 3 + (n - 4) letters; `--words tiny`: in the tiny fixture's
  vocab ("▁a".."▁z", "a".."z", "▁the", "▁to", ...) the first letter merges with the leading "▁", so
  BOS + (n - 1) letters, the first not one that starts a word piece ("▁to" would merge further).
  The length is checked, not assumed: every response's usage.prompt_tokens must equal --prompt-tokens.
- `ignore_eos: true` on every request, and every response must report exactly --max-tokens completion
  tokens (usage.completion_tokens) in at most that many text chunks; any HTTP error, wrong count or missing
  usage fails the run (exit 1); a response of byte tokens only (no text at all) is timed at its end
  and counted (`requests_without_text`). Both servers stream one chunk per token, except that a byte token
  that does not complete a UTF-8 character is held back and sent with the next one: the inter-token
  latency is measured between text chunks, and `tokens_per_chunk` says how often that happened.

Before the warm-up, adapter runs check that the adapters are applied: greedy text from the base and
from the first two tenants' adapters for one prompt; an adapter's text equal to the base's fails the
run.

Reported (JSON, --out): aggregate output tokens/s (completion tokens of the measured run / wall time
from the first request sent to the last one ended), requests/s, time to first token p50/p99 (request
sent -> first text chunk), inter-token latency p50/p99 (gaps between consecutive text chunks, all
requests pooled), the server's peak RSS (VmHWM of --pid, a lifetime peak: load, warm-up and run), and
with --metrics-url the server's Prometheus text before and after the measured run (the prompt
tokens each server computed: `iapt_engine_prefill_rows_total`, `llamacpp:prompt_tokens_total`).
`--shared-prefix-tokens N`: every prompt starts with the same N-token system prompt (seeded once,
the warm-up's too) and ends with its own letters (issue 30's load). `--turns T`: conversations of
T turns, each turn's prompt the previous prompt + as many letters as the answer had tokens +
`--turn-tokens` new letters (a chat's growing prompt; every prompt's length is checked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request

try:  # the pinned openai (crates/cli/tests/openai/requirements.txt) is built on httpx2
    import httpx2 as httpx
except ImportError:
    import httpx
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

# Letters of a prompt of n tokens (BOS included), per vocabulary (see the module doc).
LETTERS = {"bench": lambda n: n - 4, "tiny": lambda n: n - 1}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Letters a prompt may start with: none that starts a longer piece after "▁" (the tiny vocab's words).
FIRST = {"bench": ALPHABET, "tiny": "bcdefghjklmnpqrsuvwxz"}


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def pick_tenants(n_req: int, tenants: int, mix: str, rng: random.Random) -> list[int]:
    if tenants <= 0:
        return [-1] * n_req
    if mix == "uniform":
        return [rng.randrange(tenants) for _ in range(n_req)]
    if mix == "skewed":
        return rng.choices(range(tenants), weights=zipf_weights(tenants), k=n_req)
    if mix == "zipf1.1":  # issue 29's load over many adapters
        return rng.choices(range(tenants), weights=zipf_weights(tenants, 1.1), k=n_req)
    raise ValueError(mix)


def prompt_text(vocab: str, n_tokens: int, rng: random.Random) -> str:
    # BOS is added by the server's tokenizer (checked against usage.prompt_tokens).
    n = LETTERS[vocab](n_tokens)
    return rng.choice(FIRST[vocab]) + "".join(rng.choice(ALPHABET) for _ in range(n - 1))


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def vm_hwm_kib(pid: int | None) -> int | None:
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


class Failure(Exception):
    pass


async def one_request(client: AsyncOpenAI, a, idx: int, tenant: int, prompt: str, max_tokens: int,
                      expect_prompt: int | None = -1) -> dict:
    extra = {"ignore_eos": True}
    model = a.model
    if a.server == "llama-lora":
        extra["lora"] = [{"id": tenant, "scale": 1.0}]
    elif a.server == "iapt":
        model = f"{a.adapter_prefix}{tenant:02d}"
    t0 = time.perf_counter()
    stamps: list[float] = []
    texts: list[str] = []
    usage = None
    finish = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body=extra)
    async for chunk in stream:
        now = time.perf_counter()
        for c in chunk.choices or []:
            if c.text:
                stamps.append(now)
                texts.append(c.text)
            if c.finish_reason:
                finish = c.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    t1 = time.perf_counter()
    where = f"request {idx} (tenant {tenant}, model {model})"
    if usage is None:
        raise Failure(f"{where}: no usage in the stream")
    want_prompt = a.prompt_tokens if expect_prompt == -1 else expect_prompt
    if want_prompt is not None and usage.prompt_tokens != want_prompt:
        raise Failure(f"{where}: prompt_tokens {usage.prompt_tokens}, expected {want_prompt}")
    if usage.completion_tokens != max_tokens:
        raise Failure(f"{where}: completion_tokens {usage.completion_tokens}, expected {max_tokens} (finish {finish})")
    if len(stamps) > max_tokens:
        raise Failure(f"{where}: {len(stamps)} text chunks for {max_tokens} tokens")
    no_text = not stamps
    if no_text:  # every token a byte held back (and dropped at the end): time the end instead
        stamps = [t1]
    return {"idx": idx, "chunks": len(stamps), "stamps": stamps, "no_text": no_text, "tenant": tenant, "t_send": t0, "t_end": t1, "ttft": stamps[0] - t0,
            "itl": [b - a_ for a_, b in zip(stamps, stamps[1:])], "tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens, "text": "".join(texts)}


def plan(a, label: str, n_req: int) -> tuple[list[int], list[str]]:
    """The tenant and the prompt of each request of a run (seeded by --seed and the run's label)."""
    rng = random.Random(f"{a.seed}/{label}/tenants")
    tenants = pick_tenants(n_req, a.tenants, a.mix, rng)
    prompts = [prompt_text(a.words, a.prompt_tokens, random.Random(f"{a.seed}/{label}/prompt/{i}"))
               for i in range(n_req)]
    if a.shared_prefix_tokens:
        # The same system prompt before every request (warm-up included: a product's is hot), then
        # the request's own letters: the prompt stays --prompt-tokens tokens (one letter, one token
        # after the first few; see the module doc).
        shared = prompt_text(a.words, a.shared_prefix_tokens, random.Random(f"{a.seed}/shared-prefix"))
        prompts = [shared + p[len(shared):] for p in prompts]
    if len(set(prompts)) != n_req:
        raise Failure("two prompts of one run are equal")
    return tenants, prompts


async def check_applied(client: AsyncOpenAI, a) -> dict:
    """Greedy 8 tokens of one short prompt from the base and from the first (up to) 2 tenants'
    adapters: each adapter's text must differ from the base's, or the adapter was not applied."""
    prompt = prompt_text(a.words, 16, random.Random(f"{a.seed}/check"))
    texts = {}
    for t in [-1] + list(range(min(a.tenants, 2))):
        extra, model = {"ignore_eos": True}, a.model
        if a.server == "llama-lora":
            # The base: adapter 0 at scale 0 (every adapter not listed is 0 too). Without a `lora`
            # field, this llama-server applies every --lora adapter at its global scale, which is
            # 1.0 even with --lora-init-without-apply (GET /lora-adapters says so).
            extra["lora"] = [{"id": max(t, 0), "scale": 1.0 if t >= 0 else 0.0}]
        elif t >= 0:
            model = f"{a.adapter_prefix}{t:02d}"
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
        texts["base" if t < 0 else f"tenant {t}"] = r.choices[0].text
    same = [k for k, v in texts.items() if k != "base" and v == texts["base"]]
    if same:
        raise Failure(f"adapter not applied? {', '.join(same)} gave the base model's text {texts['base']!r}")
    return texts


async def run_load(client: AsyncOpenAI, a, label: str, n_req: int, max_tokens: int) -> tuple[list[dict], float, float]:
    tenants, prompts = plan(a, label, n_req)
    turns = max(1, a.turns)
    # --turns T: request i is turn i % T of conversation i // T (its tenant and first prompt are
    # the conversation's first request's); a worker runs a conversation's turns one after another,
    # each prompt = the previous prompt + max_tokens letters standing for the answer (the random
    # bench model's text would re-tokenize into many more tokens) + --turn-tokens new letters.
    queue = list(range(0, n_req, turns))
    results: list[dict] = []

    async def worker():
        while queue:
            c = queue.pop(0)
            prompt, last = prompts[c], None
            for k in range(min(turns, n_req - c)):
                i = c + k
                if last is not None:
                    rng = random.Random(f"{a.seed}/{label}/turn/{i}")
                    prompt = prompt + "".join(rng.choice(ALPHABET) for _ in range(max_tokens + a.turn_tokens))
                want = a.prompt_tokens + k * (max_tokens + a.turn_tokens)
                last = await one_request(client, a, i, tenants[c], prompt, max_tokens, want)
                results.append(last)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(a.concurrency, n_req))))
    t1 = time.perf_counter()
    results.sort(key=lambda r: r["idx"])
    return results, t0, t1


def summarize(results: list[dict], t0: float, t1: float) -> dict:
    wall = t1 - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {
        "requests": len(results), "output_tokens": tokens, "wall_s": wall,
        "output_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50) if itl else None,
        "itl_p99_ms": 1e3 * percentile(itl, 99) if itl else None,
        "itl_mean_ms": 1e3 * sum(itl) / len(itl) if itl else None,
        "tenants_hit": len({r["tenant"] for r in results if r["tenant"] >= 0}),
        "tokens_per_chunk": tokens / sum(r["chunks"] for r in results),
        "requests_without_text": sum(r["no_text"] for r in results),
    }


async def amain(a) -> dict:
    # A new connection per request (no keep-alive): llama-server's HTTP library closes a kept-alive
    # connection after a few requests, and a request sent on it then fails (there are no retries).
    http = DefaultAsyncHttpxClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=a.timeout)
    client = AsyncOpenAI(base_url=a.base_url, api_key="unused", max_retries=0, timeout=a.timeout, http_client=http)
    out = {"label": a.label, "server": a.server, "tenants": a.tenants, "mix": a.mix, "concurrency": a.concurrency,
           "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens, "warmup_requests": a.warmup,
           "warmup_max_tokens": a.warmup_tokens}
    if a.server in ("llama-lora", "iapt"):
        out["applied_check"] = await check_applied(client, a)
    if a.warmup:
        wres, w0, w1 = await run_load(client, a, f"{a.plan_label or a.label}/warmup", a.warmup, a.warmup_tokens)
        out["warmup"] = summarize(wres, w0, w1)
    if a.metrics_url:
        with urllib.request.urlopen(a.metrics_url, timeout=30) as resp:
            out["metrics_before"] = resp.read().decode()
    res, t0, t1 = await run_load(client, a, a.plan_label or a.label, a.requests, a.max_tokens)
    out["run"] = summarize(res, t0, t1)
    out["per_request"] = [{"idx": r["idx"], "tenant": r["tenant"], "ttft_s": r["ttft"], "e2e_s": r["t_end"] - r["t_send"],
                           "start_s": r["t_send"] - t0, "tokens": r["tokens"], "prompt_tokens": r["prompt_tokens"],
                           # when each text chunk arrived, ms after the run's start (the step timeline)
                           "chunk_ms": [round(1e3 * (x - t0), 1) for x in r["stamps"]]} for r in res]
    out["peak_rss_kib"] = vm_hwm_kib(a.pid)
    if a.metrics_url:
        with urllib.request.urlopen(a.metrics_url, timeout=30) as resp:
            out["metrics"] = resp.read().decode()
    await client.close()
    return out


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="http://HOST:PORT/v1")
    ap.add_argument("--server", required=True, choices=["llama-base", "llama-lora", "iapt", "iapt-base"])
    ap.add_argument("--model", default="base", help="the `model` field where it is not the adapter")
    ap.add_argument("--adapter-prefix", default="t", help="iapt: adapter i is named PREFIX + two digits")
    ap.add_argument("--tenants", type=int, default=0, help="tenants (the first N adapters); 0 for the base")
    ap.add_argument("--mix", choices=["uniform", "skewed", "zipf1.1"], default="uniform")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--words", choices=sorted(LETTERS), default="bench", help="the model's vocabulary (prompt sizing)")
    ap.add_argument("--warmup", type=int, default=4, help="warm-up requests before the measured run (0: none)")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--turns", type=int, default=1, help="conversations of T turns (issue 30's chat load)")
    ap.add_argument("--turn-tokens", type=int, default=64, help="new user letters in each later turn")
    ap.add_argument("--shared-prefix-tokens", type=int, default=0,
                    help="every prompt starts with the same N-token system prompt (issue 30's load)")
    ap.add_argument("--label", default="run")
    ap.add_argument("--plan-label", help="seed the requests' tenants and prompts with this label instead of --label "
                                         "(rows that compare settings on the same requests share one)")
    ap.add_argument("--pid", type=int, help="the server's pid (peak RSS from /proc/PID/status VmHWM)")
    ap.add_argument("--metrics-url")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--emit-jsonl", metavar="FILE", help="write the run's requests as `iapt batch` JSON lines "
                    "(prompt, adapter as --server iapt names it) instead of sending them")
    a = ap.parse_args()
    if a.server in ("llama-lora", "iapt") and a.tenants < 1:
        ap.error(f"--server {a.server} needs --tenants >= 1")
    if a.server in ("llama-base", "iapt-base"):
        a.tenants = 0
    if a.emit_jsonl:
        tenants, prompts = plan(a, a.label, a.requests)
        with open(a.emit_jsonl, "w") as f:
            for i, (t, p) in enumerate(zip(tenants, prompts)):
                line = {"id": i, "prompt": p}
                if t >= 0:
                    line["adapter"] = f"{a.adapter_prefix}{t:02d}"
                f.write(json.dumps(line) + "\n")
        return 0
    try:
        out = asyncio.run(amain(a))
    except Failure as e:
        print(f"loadgen {a.label}: FAILED: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # HTTP status errors, connection errors: loud, with the body when there is one
        print(f"loadgen {a.label}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    r = out["run"]
    print(f"loadgen {a.label}: {r['requests']} requests, {r['output_tokens']} tokens in {r['wall_s']:.1f} s: "
          f"{r['output_tokens_per_s']:.2f} tok/s, {r['requests_per_s']:.3f} req/s, TTFT p50 {r['ttft_p50_s']:.2f} s "
          f"p99 {r['ttft_p99_s']:.2f} s, ITL p50 {ms(r['itl_p50_ms'])} p99 {ms(r['itl_p99_ms'])}, "
          f"peak RSS {out['peak_rss_kib']} KiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
