#!/usr/bin/env python3
"""The table of bench/tenants: reads OUT/rows/*.json (loadgen.py and run.sh's `iapt batch` row),
writes OUT/results.json (settings, machine, versions, every row without its per-request detail, the
targets, the memory per adapter) and OUT/table.md. Fails (exit 1) when a row of --expect-rows is
missing.

    python3 bench/tenants/report.py OUT --settings JSON [--expect-rows "id id ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Shapes for the memory-per-adapter table: n_embd, n_layer, n_head, n_head_kv.
SHAPES = {"TinyLlama-1.1B shape (this run)": (2048, 22, 32, 4), "LLaMA-2-7B": (4096, 32, 32, 32)}
PAPER_D, PAPER_R, M, LORA_R = 4096, 320, 4, 8


def iapt_params(d: int, n_layer: int, r: int, m: int = M) -> int:
    """spec/iapt-v1.md, per layer: W_down r x d, b_down r, Q m x r, W_up d x r, b_up d, rational 7 + 5."""
    return n_layer * (r * d + r + m * r + d * r + d + 7 + 5)


def lora_params(d: int, n_layer: int, n_head: int, n_head_kv: int, targets: str, r: int = LORA_R) -> int:
    """A (r x d_in) + B (d_out x r) per target and layer."""
    kv = d // n_head * n_head_kv
    dims = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d)}
    return n_layer * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def sh(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({' '.join(cmd)}: {e})"


def machine() -> dict:
    lscpu = sh(["lscpu"])
    mem = next((l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal")), "?")
    return {"lscpu": lscpu, "model_name": re.search(r"Model name:\s*(.*)", lscpu).group(1) if "Model name" in lscpu else "?",
            "nproc": sh(["nproc"]), "mem_total": mem, "kernel": platform.release()}


def cmake_version(cmakelists: Path, prefix: str) -> str:
    """X.Y.Z from a llama.cpp or ggml CMakeLists.txt's PREFIX_VERSION_{MAJOR,MINOR,PATCH}."""
    try:
        t = cmakelists.read_text()
    except OSError:
        return "?"
    parts = [re.search(rf"set\({prefix}_VERSION_{k}\s+(\d+)\)", t) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) for p in parts) if all(parts) else "?"


def versions(settings: dict) -> dict:
    lock = (ROOT / "Cargo.lock").read_text()
    m = re.search(r'name = "llama-cpp-sys-2"\nversion = "([^"]+)"', lock)
    sys_ver = m.group(1) if m else "?"
    # llama-cpp-sys-2's bundled llama.cpp, as cargo unpacked it
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    src = next(iter(sorted(home.glob(f"registry/src/*/llama-cpp-sys-2-{sys_ver}/llama.cpp"))), None)
    bundled = (f"llama.cpp {cmake_version(src / 'CMakeLists.txt', 'LLAMA')}, ggml {cmake_version(src / 'ggml/CMakeLists.txt', 'GGML')}"
               if src else "llama.cpp ?")
    server_ver = sh([settings["llama_server"], "--version"]) if settings.get("llama_server") else "?"
    server_ver = " ".join(l for l in server_ver.splitlines() if l.startswith("version"))
    v = {"llama_cpp": f"one llama.cpp: {settings.get('llama_version', '?')}; libraries {settings.get('llama_lib', '?')}",
         "llama_server": f"`llama-server --version`: {server_ver}; loads the libraries above (scripts/llama-cpp checks with ldd)",
         "iapt_llama_cpp": f"llama-cpp-sys-2 {sys_ver} ({bundled}; shared libraries, the same files llama-server loads)",
         "iapt": sh([settings["iapt_bin"], "--version"]) if settings.get("iapt_bin") else "?",
         "rustc": sh(["rustc", "--version"]), "python": platform.python_version()}
    adapters = Path(settings.get("adapters", "")) / "adapters.json"
    if adapters.is_file():
        a = json.loads(adapters.read_text())
        if "lora" in a:
            v.update({k: a["lora"][k] for k in ("torch", "transformers", "peft")})
    return v


def fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def row_line(r: dict, s: dict | None = None) -> str:
    s = s or {}
    if r["server"] == "llama-lora-start":
        return (f"| {r['label']} | llama-server, {r['n_lora']} LoRA adapters preloaded | {r['n_lora']} | — | — | "
                f"ready after **{r['startup_s']:.1f} s** | — | — | — | {r['peak_rss_kib'] / 1024:.0f} |")
    kind = {"llama-base": "llama-server, base", "llama-lora": "llama-server, LoRA per request", "iapt": "`iapt serve`, IAPT",
            "iapt-base": "`iapt serve`, base", "llama-base-kvu": "llama-server, base, `-kvu`",
            "iapt-base-kvu": "`iapt serve`, base, `--kv-unified`", "iapt-batch": "`iapt batch` (offline), IAPT"}[r["server"]]
    tenants = "—" if not r["tenants"] else f"{r['tenants']}" + {"skewed": " skewed", "zipf1.1": " Zipf 1.1"}.get(r["mix"], "")
    if r["server"] == "iapt-batch":
        s = r["stats"]
        return (f"| {r['label']} | {kind} | {tenants} | {s['parallel']} | {s['requests']} x {r['max_tokens']} | "
                f"**{s['tokens_per_s']:.2f}** (decode-only {s['decode_tokens_per_s']:.2f}) | "
                f"{r['requests_per_s']:.3f} | — | — | {r['peak_rss_kib'] / 1024:.0f} |")
    if r["label"] in ("disk-small", "disk-large"):
        kind = f"`iapt serve`, on demand, cap {s.get('cap_small' if r['label'] == 'disk-small' else 'cap_large')}"
    x = r["run"]
    hit = f" ({x['tenants_hit']} hit)" if r["tenants"] > 1 else ""
    return (f"| {r['label']} | {kind} | {tenants}{hit} | {r['concurrency']} | {x['requests']} x {r['max_tokens']} | "
            f"**{x['output_tokens_per_s']:.2f}** | {x['requests_per_s']:.3f} | {x['ttft_p50_s']:.2f} / {x['ttft_p99_s']:.2f} | "
            f"{fmt(x['itl_p50_ms'], '.0f')} / {fmt(x['itl_p99_ms'], '.0f')} | {r['peak_rss_kib'] / 1024:.0f} |")


def phases(per_request: list[dict] | None) -> dict | None:
    """From the chunk timeline: the prefill phase (run start -> every request has its first token),
    the decode phase after it, and the output rate in each."""
    if not per_request or any(not r.get("chunk_ms") for r in per_request):
        return None
    first_all = max(r["chunk_ms"][0] for r in per_request)
    end = max(r["chunk_ms"][-1] for r in per_request)
    chunks = sorted(x for r in per_request for x in r["chunk_ms"])
    after = sum(1 for x in chunks if x > first_all)
    gaps = sorted(b - a for a, b in zip(chunks, chunks[1:]) if b > first_all)
    return {"prefill_phase_s": first_all / 1e3, "decode_phase_s": (end - first_all) / 1e3,
            "decode_phase_chunks": after,
            "decode_phase_chunks_per_s": after / ((end - first_all) / 1e3) if end > first_all else None,
            # the largest silences of the whole server in the decode phase (no client got a token)
            "decode_phase_max_silence_ms": gaps[-1] if gaps else None}


def tps(rows: dict, label: str):
    r = rows.get(label)
    if r is None:
        return None
    return r["stats"]["tokens_per_s"] if r["server"] == "iapt-batch" else r["run"]["output_tokens_per_s"]


def targets(rows: dict, n: int, suffix: str, gen: int) -> dict | None:
    named = {"": f"t{n}", "-short": "short", "-rep": "rep", "-big": "big"}[suffix]
    base_p = "base-big" if suffix == "-big" else "base-p" + suffix
    base_1 = "base-1" if suffix == "-big" else "base-1" + suffix
    ids = {"base_p": base_p, "base_1": base_1, "iapt": f"iapt-{named}", "lora": f"lora-{named}"}
    v = {k: tps(rows, i) for k, i in ids.items()}
    if any(x is None for x in v.values()):
        return None
    gain = v["base_p"] / v["base_1"]
    ratio = v["iapt"] / v["lora"]
    out = {"generated_tokens": gen, "rows": ids, "tokens_per_s": v,
           "iapt_over_base": v["iapt"] / v["base_p"], "target_iapt_over_base": 0.95,
           "base_batching_gain": gain, "iapt_over_lora": ratio, "share_of_gain": ratio / gain,
           "share_of_gain_excess": (ratio - 1) / (gain - 1) if gain != 1 else None, "target_share": 0.90}
    # The engine alone, without adapters, against llama-server's bare base (target >= 0.97).
    engine_base = {"": "iapt-base-p", "-rep": "iapt-base-p-rep"}.get(suffix)
    if engine_base and tps(rows, engine_base) is not None:
        out["engine_base_row"] = engine_base
        out["engine_base_over_base"] = tps(rows, engine_base) / v["base_p"]
        out["target_engine_base_over_base"] = 0.97
    return out


def metric(row: dict, name: str) -> float | None:
    """An unlabelled metric of a row's `/metrics` text after its run."""
    lines = row.get("metrics")
    if not lines:
        return None
    text = lines if isinstance(lines, str) else "\n".join(lines)
    for l in text.splitlines():
        if l.startswith(name + " "):
            return float(l.rpartition(" ")[2])
    return None


def disk(rows: dict, settings: dict, adapters_info: dict | None) -> dict | None:
    """Adapters on demand (issue 29): each capped row's throughput, loads, load latency, peak RSS,
    and the targets: capped throughput >= 0.9x the larger cap's; peak RSS <= base + cap x adapter
    file size + 10%."""
    small, large = rows.get("disk-small"), rows.get("disk-large")
    if not small or not large:
        return None
    base = rows.get("iapt-base-p")
    files = (adapters_info or {}).get("iapt", {}).get("files") or [{}]
    file_bytes = files[0].get("bytes")
    out = {}
    for key, r, cap in (("small", small, int(settings["cap_small"])), ("large", large, int(settings["cap_large"]))):
        loads = metric(r, "iapt_adapter_loads_all_total") or 0
        secs = metric(r, "iapt_adapter_load_seconds_all_total") or 0
        out[key] = {"cap": cap, "tokens_per_s": r["run"]["output_tokens_per_s"], "loads": int(loads),
                    "load_ms_mean": 1e3 * secs / loads if loads else None, "evictions": int(metric(r, "iapt_adapter_evictions_total") or 0),
                    "resident_at_end": int(metric(r, "iapt_adapters_resident") or 0), "peak_rss_kib": r["peak_rss_kib"],
                    "tenants_hit": r["run"]["tenants_hit"]}
        if base and file_bytes:
            bound = (base["peak_rss_kib"] * 1024 + cap * file_bytes) * 1.10
            out[key]["rss_bound_kib"] = bound / 1024
            out[key]["rss_within_bound"] = r["peak_rss_kib"] * 1024 <= bound
    out["small_over_large"] = out["small"]["tokens_per_s"] / out["large"]["tokens_per_s"]
    out["target_small_over_large"] = 0.9
    lora = rows.get("lora-disk-start")
    if lora:
        out["lora_start"] = {"n": lora["n_lora"], "startup_s": lora["startup_s"], "peak_rss_kib": lora["peak_rss_kib"]}
    return out


def metric_delta(row: dict, names: list[str]) -> float | None:
    """A counter's growth over the measured run (/metrics before and after it), the first name found."""
    for name in names:
        after = metric(row, name)
        before = metric({"metrics": row.get("metrics_before")}, name)
        if after is not None and before is not None:
            return after - before
    return None


def prefix(rows: dict) -> dict | None:
    """The prefix cache (issue 30): per row, the prompt tokens each server computed in the measured
    run, TTFT, throughput, the cache's bytes; and the targets: TTFT p50 with the cache >= 5x lower
    than without; prompt tokens computed <= 1.2x the bare base's; IAPT >= 0.9x the bare base's
    throughput; the IAPT / LoRA throughput ratio."""
    got = {k: rows[k] for k in ("prefix-iapt", "prefix-iapt-nocache", "prefix-iapt-fill", "prefix-lora", "prefix-base",
                                 "chat-iapt", "chat-iapt-nocache", "chat-iapt-fill", "chat-lora", "chat-base") if k in rows}
    if not got:
        return None
    out = {}
    for k, r in got.items():
        computed = metric_delta(r, ["iapt_engine_prefill_rows_total", "llamacpp:prompt_tokens_total"])
        sent = sum(x.get("prompt_tokens", r["prompt_tokens"]) for x in r.get("per_request", [])) or r["run"]["requests"] * r["prompt_tokens"]
        out[k] = {"prompt_tokens_computed": computed, "prompt_tokens_sent": sent,
                  "ttft_p50_s": r["run"]["ttft_p50_s"], "ttft_p99_s": r["run"]["ttft_p99_s"],
                  "tokens_per_s": r["run"]["output_tokens_per_s"], "peak_rss_kib": r["peak_rss_kib"],
                  "cache_bytes": metric(r, "iapt_prefix_cache_bytes"), "cache_hits": metric_delta(r, ["iapt_prefix_cache_hits_total"])}
    def ratio(a, b, key):
        x, y = out.get(a, {}).get(key), out.get(b, {}).get(key)
        return x / y if x and y else None
    for key, a, b, field in (
        ("ttft_p50_nocache_over_cache", "prefix-iapt-nocache", "prefix-iapt", "ttft_p50_s"),
        ("computed_iapt_over_base", "prefix-iapt", "prefix-base", "prompt_tokens_computed"),
        ("tps_iapt_over_base", "prefix-iapt", "prefix-base", "tokens_per_s"),
        ("tps_iapt_over_lora", "prefix-iapt", "prefix-lora", "tokens_per_s"),
        ("chat_ttft_p50_nocache_over_cache", "chat-iapt-nocache", "chat-iapt", "ttft_p50_s"),
        ("chat_computed_iapt_over_base", "chat-iapt", "chat-base", "prompt_tokens_computed"),
        ("chat_tps_iapt_over_base", "chat-iapt", "chat-base", "tokens_per_s"),
        ("chat_tps_iapt_over_lora", "chat-iapt", "chat-lora", "tokens_per_s"),
        # --min-step-rows 0 (every step filled to --batch-tokens) against the default.
        ("ttft_p50_fill_over_cut", "prefix-iapt-fill", "prefix-iapt", "ttft_p50_s"),
        ("tps_cut_over_fill", "prefix-iapt", "prefix-iapt-fill", "tokens_per_s"),
        ("chat_ttft_p50_fill_over_cut", "chat-iapt-fill", "chat-iapt", "ttft_p50_s"),
        ("chat_tps_cut_over_fill", "chat-iapt", "chat-iapt-fill", "tokens_per_s"),
    ):
        out[key] = ratio(a, b, field)
    return out


def engine_steps(row: dict) -> dict | None:
    """The engine's decode-only steps of an `iapt serve` row, from its /metrics after the run: ms
    per step, of which inside llama_decode, and the rest (the engine's own)."""
    lines = row.get("metrics")
    if not lines:
        return None
    text = lines if isinstance(lines, str) else "\n".join(lines)
    val = {}
    for l in text.splitlines():
        if l.startswith("iapt_engine_"):
            k, _, x = l.rpartition(" ")
            val[k] = float(x)
    steps = val.get("iapt_engine_decode_only_steps_total")
    if not steps:
        return None
    ms = lambda k: 1e3 * val[k] / steps
    return {"decode_only_steps": int(steps), "tokens_per_step": val["iapt_engine_decode_only_tokens_total"] / steps,
            "step_ms": ms("iapt_engine_decode_only_seconds_total"), "llama_decode_ms": ms("iapt_engine_decode_only_llama_seconds_total"),
            "engine_own_ms": ms("iapt_engine_decode_only_seconds_total") - ms("iapt_engine_decode_only_llama_seconds_total")}


def memory(rows: dict, n: int, adapters_info: dict | None) -> dict:
    info = adapters_info or {}
    shapes = dict(SHAPES)
    if info.get("shape") == "tiny":  # the smoke's base (make_adapters.py's "tiny")
        shapes = {"tiny llama fixture (this run)": (64, 3, 4, 2), "LLaMA-2-7B": SHAPES["LLaMA-2-7B"]}
    first = next(iter(shapes.values()))
    r_run = info.get("iapt", {}).get("bottleneck") or round(first[0] * PAPER_R / PAPER_D)
    out = {"shapes": {}}
    for name, (d, n_layer, n_head, n_head_kv) in shapes.items():
        r = r_run if "this run" in name else round(d * PAPER_R / PAPER_D)
        ip = iapt_params(d, n_layer, r)
        out["shapes"][name] = {
            # Resident as stored (issue 29): F16, or Q8_0's 34 bytes per 32 values (the matrices; the
            # few biases and queries are counted at the same rate, a rounding error here).
            "iapt_r": r, "iapt_params": ip, "iapt_resident_f16_bytes": 2 * ip, "iapt_resident_q8_0_bytes": ip * 34 // 32,
            "lora_qkvo_params": lora_params(d, n_layer, n_head, n_head_kv, "qkvo"),
            "lora_qv_params": lora_params(d, n_layer, n_head, n_head_kv, "qv"),
        }
        for k in ("qkvo", "qv"):
            out["shapes"][name][f"lora_{k}_resident_f16_bytes"] = 2 * out["shapes"][name][f"lora_{k}_params"]

    def rss(label):
        r = rows.get(label)
        return None if r is None else r["peak_rss_kib"]

    pairs = {"iapt": (f"iapt-t{n}", "iapt-base-p"), "lora": (f"lora-t{n}", "base-p")}
    out["measured_rss_delta_per_adapter_kib"] = {
        k: (rss(a) - rss(b)) / n if rss(a) is not None and rss(b) is not None else None for k, (a, b) in pairs.items()}
    return out


def mib(b):
    return f"{b / 2**20:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--settings", required=True, help="JSON object from run.sh")
    ap.add_argument("--expect-rows", default="")
    ap.add_argument("--strict-base-agreement", action="store_true",
                    help="fail unless every server's base model gave the same greedy text in the applied check")
    a = ap.parse_args()
    settings = json.loads(a.settings)
    rows = {}
    for p in sorted((a.out / "rows").glob("*.json")):
        r = json.loads(p.read_text())
        if r["server"] == "iapt-batch":  # wall_s: the engine's run, model load excluded
            r["requests_per_s"] = r["stats"]["requests"] / r["stats"]["wall_s"]
        rows[r["label"]] = r
    missing = [i for i in a.expect_rows.split() if i not in rows]
    if missing:
        print(f"report: rows missing: {' '.join(missing)}", file=sys.stderr)
        return 1
    base_texts = {k: r["applied_check"]["base"] for k, r in rows.items() if "applied_check" in r}
    base_agree = len(set(base_texts.values())) <= 1
    if a.strict_base_agreement and not base_agree:
        print(f"report: the base model's greedy text differs between rows: {base_texts}", file=sys.stderr)
        return 1
    n = int(settings["n_adapters"])
    adapters_json = Path(settings.get("adapters", "")) / "adapters.json"
    adapters_info = json.loads(adapters_json.read_text()) if adapters_json.is_file() else None
    res = {"settings": settings, "machine": machine(), "versions": versions(settings),
           "targets": {"gen": targets(rows, n, "", int(settings["gen"])),
                       "gen_short": targets(rows, n, "-short", int(settings["gen_short"])),
                       "gen_second_sample": targets(rows, n, "-rep", int(settings["gen"])),
                       "big": targets(rows, n, "-big", int(settings["gen"]))},
           "base_text_agrees_across_servers": base_agree,
           "disk": disk(rows, settings, adapters_info),
           "prefix": prefix(rows),
           "memory": memory(rows, n, adapters_info), "adapters": adapters_info,
           "rows": {k: {kk: vv for kk, vv in v.items() if kk not in ("per_request",)} for k, v in rows.items()},
           "per_request": {k: v.get("per_request") for k, v in rows.items()}}
    for k, v in res["rows"].items():
        v["phases"] = phases(res["per_request"].get(k)) if v["server"] not in ("iapt-batch", "llama-lora-start") and v.get("concurrency", 0) > 1 else None
    for v in res["rows"].values():  # keep the Prometheus text short: totals and sums, not every bucket
        v["engine_steps"] = engine_steps(v)
        if "metrics" in v:
            v["metrics"] = [l for l in v["metrics"].splitlines() if l and not l.startswith("#") and "_bucket{" not in l]
    (a.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")

    s = settings
    L = [f"Settings: {s['requests']} requests per run ({s.get('requests_serial', s['requests'])} in the 1-in-flight rows; after {s['warmup']} warm-up requests of {s['warmup_gen']} tokens), "
         f"prompts of {s['prompt']} tokens, greedy, `ignore_eos`, {s['threads']} threads for every server, "
         f"{s['parallel']} slots, context {s['ctx']} ({s['ctx_per_seq']} per slot), batch {s['batch']} / ubatch {s['ubatch']}; "
         f"machine: {res['machine']['model_name']}, {res['machine']['nproc']} CPUs; run took {s['wall_s']} s.", "",
         "| row | server | tenants | in flight | requests x generated | output tok/s | req/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | peak RSS (MiB) |",
         "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = s["rows"].split()
    for k in order:
        if k in rows:
            L.append(row_line(rows[k], s))
    L += ["", "Phases (from the chunk timeline of each run; one wave of requests when all are in flight at once): "
          "prefill phase = until every request has its first token; decode phase = after it.", "",
          "| row | prefill phase (s) | decode phase (s) | decode-phase output tok/s | longest silence in the decode phase (ms) |",
          "| --- | ---: | ---: | ---: | ---: |"]
    for k in order:
        ph = res["rows"].get(k, {}).get("phases")
        if ph:
            L.append(f"| {k} | {ph['prefill_phase_s']:.1f} | {ph['decode_phase_s']:.1f} | "
                     f"{fmt(ph['decode_phase_chunks_per_s'])} | {fmt(ph['decode_phase_max_silence_ms'], '.0f')} |")
    L += ["", "`iapt serve`'s decode-only steps (every running sequence decodes one token; from `/metrics` after the run): "
          "ms per step, of which inside `llama_decode`, and the engine's own (batch, sampling, events).", "",
          "| row | decode-only steps | tokens per step | ms per step | in llama_decode | engine's own |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for k in order:
        e = res["rows"].get(k, {}).get("engine_steps")
        if e:
            L.append(f"| {k} | {e['decode_only_steps']} | {e['tokens_per_step']:.1f} | {e['step_ms']:.1f} | {e['llama_decode_ms']:.1f} | {e['engine_own_ms']:.2f} |")
    L.append("")
    for key, t in res["targets"].items():
        if t is None:
            continue
        ok1 = "met" if t["iapt_over_base"] >= 0.95 else "**missed**"
        ok2 = "met" if t["share_of_gain"] >= 0.90 else "**missed**"
        what = {"gen_second_sample": "second sample (the -rep rows)", "big": f"{s.get('tenants_big')} tenants, {s.get('parallel_big')} in flight (the -big rows)"}.get(
            key, f"{t['generated_tokens']} generated tokens")
        inflight = s.get("parallel_big") if key == "big" else s["parallel"]
        tenants = s.get("tenants_big") if key == "big" else n
        if "engine_base_over_base" in t:
            ok0 = "met" if t["engine_base_over_base"] >= 0.97 else "**missed**"
            L.append(f"- {what}: `iapt serve` base only / bare base, {inflight} in flight = **{t['engine_base_over_base']:.3f}x** (target >= 0.97: {ok0}).")
        L.append(f"- {what}: IAPT with {tenants} tenants / bare base, {inflight} in flight = "
                 f"{t['tokens_per_s']['iapt']:.2f} / {t['tokens_per_s']['base_p']:.2f} = **{t['iapt_over_base']:.3f}x** "
                 f"(target >= 0.95: {ok1}); bare-base batching gain ({inflight} / 1 in flight) = "
                 f"{t['tokens_per_s']['base_p']:.2f} / {t['tokens_per_s']['base_1']:.2f} = {t['base_batching_gain']:.2f}x; "
                 f"IAPT / LoRA with {tenants} tenants = {t['tokens_per_s']['iapt']:.2f} / {t['tokens_per_s']['lora']:.2f} = "
                 f"{t['iapt_over_lora']:.2f}x = **{100 * t['share_of_gain']:.0f}%** of the gain (target >= 90%: {ok2}; "
                 f"as excess over 1x: {100 * t['share_of_gain_excess']:.0f}%).")
    d = res.get("disk")
    if d:
        L += ["", f"Adapters on demand: {s.get('disk_adapters')} IAPT adapter files, `iapt serve --adapter-dir` with a resident cap, "
              f"{s.get('requests_disk')} requests, Zipf (s 1.1) over the adapters, {s['parallel']} in flight, {s['prompt']} + {s.get('gen_disk')} tokens:", "",
              "| cap | output tok/s | adapters hit | loads | mean load (ms) | evictions | peak RSS (MiB) | RSS bound: base + cap x file + 10% (MiB) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for key in ("small", "large"):
            x = d[key]
            L.append(f"| {x['cap']} | {x['tokens_per_s']:.2f} | {x['tenants_hit']} | {x['loads']} | {fmt(x['load_ms_mean'], '.0f')} | {x['evictions']} | "
                     f"{x['peak_rss_kib'] / 1024:.0f} | {fmt(x.get('rss_bound_kib') and x['rss_bound_kib'] / 1024, '.0f')} "
                     f"({'within' if x.get('rss_within_bound') else '**over**'}) |")
        ok = "met" if d["small_over_large"] >= 0.9 else "**missed**"
        L.append("")
        L.append(f"- cap {d['small']['cap']} / cap {d['large']['cap']} throughput = **{d['small_over_large']:.3f}x** (target >= 0.9: {ok}); "
                 f"every request answered (the load generator fails the run otherwise).")
        if "lora_start" in d:
            ls = d["lora_start"]
            L.append(f"- llama-server with {ls['n']} LoRA adapters (`--lora` each, preloaded): ready after {ls['startup_s']:.1f} s, "
                     f"peak RSS {ls['peak_rss_kib'] / 1024:.0f} MiB.")
    px = res.get("prefix")
    if px:
        L += ["", f"The prefix cache (issue 30): every prompt = one {s.get('prefix_sys')}-token system prompt + {s.get('prefix_user')} tokens "
              f"of its own, {s['n_adapters']} tenants (uniform), {s['parallel']} in flight, {s.get('requests_prefix')} requests x "
              f"{s.get('gen_prefix')} generated, after {s['warmup']} warm-up requests with the same system prompt:", "",
              "| row | prompt tokens sent / computed | TTFT p50 / p99 (s) | output tok/s | cache (MiB) |", "| --- | ---: | ---: | ---: | ---: |"]
        for k in ("prefix-iapt", "prefix-iapt-nocache", "prefix-iapt-fill", "prefix-lora", "prefix-base",
                  "chat-iapt", "chat-iapt-nocache", "chat-iapt-fill", "chat-lora", "chat-base"):
            if k in px:
                x = px[k]
                L.append(f"| {k} | {x['prompt_tokens_sent']} / {fmt(x['prompt_tokens_computed'], '.0f')} | {fmt(x['ttft_p50_s'])} / {fmt(x['ttft_p99_s'])} | "
                         f"{x['tokens_per_s']:.2f} | {fmt(x['cache_bytes'] and x['cache_bytes'] / 2**20, '.0f')} |")
        L += ["", f"- TTFT p50 without the cache / with it: **{fmt(px['ttft_p50_nocache_over_cache'])}x** (target >= 5); prompt tokens computed, "
              f"IAPT / bare base: {fmt(px['computed_iapt_over_base'])}x (target <= 1.2); throughput IAPT / bare base: "
              f"{fmt(px['tps_iapt_over_base'])}x (target >= 0.9); IAPT / LoRA: {fmt(px['tps_iapt_over_lora'])}x.",
              f"- The chat rows ({s.get('chat_turns')} turns per tenant, a first prompt of {s.get('chat_first')} tokens, {s.get('chat_user')} new "
              f"tokens and the answer added each turn, {s.get('gen_chat')} generated): TTFT p50 without / with the cache "
              f"{fmt(px['chat_ttft_p50_nocache_over_cache'])}x; prompt tokens computed IAPT / bare base {fmt(px['chat_computed_iapt_over_base'])}x; "
              f"throughput IAPT / bare base {fmt(px['chat_tps_iapt_over_base'])}x, IAPT / LoRA {fmt(px['chat_tps_iapt_over_lora'])}x.",
              f"- The step rule (`--min-step-rows`, default 128) against every step filled to --batch-tokens (the -fill rows, "
              f"`--min-step-rows 0`, with the cache): TTFT p50 fill / default {fmt(px['ttft_p50_fill_over_cut'])}x (shared prompt), "
              f"{fmt(px['chat_ttft_p50_fill_over_cut'])}x (chat); throughput default / fill {fmt(px['tps_cut_over_fill'])}x, "
              f"{fmt(px['chat_tps_cut_over_fill'])}x."]
    L += ["", "| memory per resident adapter | IAPT (m 4) params | IAPT resident, F16 / Q8_0 | LoRA r 8 q/k/v/o params | LoRA q/k/v/o resident (f16) | LoRA r 8 q/v params |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in res["memory"]["shapes"].items():
        L.append(f"| {name}, IAPT r {m['iapt_r']} | {m['iapt_params']:,} | {mib(m['iapt_resident_f16_bytes'])} / {mib(m['iapt_resident_q8_0_bytes'])} | "
                 f"{m['lora_qkvo_params']:,} | {mib(m['lora_qkvo_resident_f16_bytes'])} | {m['lora_qv_params']:,} |")
    d = res["memory"]["measured_rss_delta_per_adapter_kib"]
    L.append("")
    L.append(f"Measured (peak RSS with {n} adapters - peak RSS of the same server without, / {n}): IAPT "
             f"{fmt(d['iapt'] and d['iapt'] / 1024, '.1f')} MiB, LoRA {fmt(d['lora'] and d['lora'] / 1024, '.1f')} MiB per adapter.")
    L.append("")
    L.append(f"Versions: llama-server: {res['versions']['llama_server']}; iapt: {res['versions']['iapt_llama_cpp']}.")
    (a.out / "table.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
