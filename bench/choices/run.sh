#!/usr/bin/env bash
# n choices from one prefill (issue 33, item 2): `iapt serve` answers one request with N choices
# (the prompt and the adapter's soft tokens decoded once, the sequence forked with llama.cpp's
# seq_cp) against N separate requests sent at once, on the bench model (hidden size 2048, Q4_K_M,
# random weights; bench/tenants makes it) with one IAPT adapter: wall time and prompt rows the engine
# computed (/metrics), side by side in one run, REPS rounds in alternating order
# (bench/choices/measure.py). Also compares choice i with the request with seed + i (identical in
# exact mode, which the engine's tests check; here the common prefix is reported).
#
#   bash bench/choices/run.sh        (from a fresh clone: builds, makes the bench model)
#
# Settings (environment): N 8, PROMPT 512, GEN 32, REPS 3, THREADS 2, OUT bench/choices/results.
# Writes OUT/results.json and OUT/results.md (with the machine and the command).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
export N=${N:-8} PROMPT=${PROMPT:-512} GEN=${GEN:-32} REPS=${REPS:-3}
THREADS=${THREADS:-2}
OUT=${OUT:-bench/choices/results}
WORK=target/choices
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# The release iapt and the bench model with its adapters, as bench/tenants makes them.
# (bench/tenants reads PROMPT, GEN, ... itself: not ours.)
read -r MODEL ADAPTERS IAPT < <(env -u N -u PROMPT -u GEN -u REPS bash bench/tenants/run.sh --prepare | tail -n 1)
PY=.venv/bin/python # made by scripts/setup (bench/tenants/run.sh runs it)

SERVER_PID=
stop() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null; SERVER_PID=; }
trap stop EXIT
CTX=$((N * (PROMPT + 16 + GEN + 64)))
SERVE=("$IAPT" serve --model "$MODEL" --adapter "t0=$ADAPTERS/iapt-00.safetensors" --parallel "$N" --ctx-size "$CTX"
  --threads "$THREADS" --host 127.0.0.1 --port 0)
log "starting: ${SERVE[*]}"
"${SERVE[@]}" >"$WORK/serve.out" 2>"$WORK/serve.log" &
SERVER_PID=$!
PORT=$(wait_iapt_port "$WORK/serve.out" "$WORK/serve.log" "$SERVER_PID" 120)
log "N=$N choices, PROMPT=$PROMPT, GEN=$GEN, REPS=$REPS"
MODEL_ID=t0 "$PY" bench/choices/measure.py "http://127.0.0.1:$PORT" "$OUT/results.json" | tee "$WORK/measure.log"
stop

"$PY" - "$OUT/results.json" "$OUT/results.md" "${SERVE[*]}" <<'PYEOF'
import json, os, subprocess, sys
s = json.load(open(sys.argv[1]))
cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p' | head -n1"], capture_output=True, text=True).stdout.strip()
lines = [
    "# n choices from one prefill vs n separate requests", "",
    f"`bash bench/choices/run.sh` (N={s['n']}, PROMPT={s['prompt_tokens']}, GEN={s['generated_tokens']}, REPS={s['reps']}); "
    f"machine: {os.cpu_count()} vCPU {cpu}; server: `{sys.argv[3]}`.", "",
    "| | wall time (median) | prompt rows computed |", "| --- | ---: | ---: |",
    f"| one request, n = {s['n']} | {s['median_a_s']:.2f} s | {s['a_prefill_rows']} |",
    f"| {s['n']} requests at once, n = 1 | {s['median_b_s']:.2f} s | {s['b_prefill_rows']} |", "",
    f"Speed-up (median of the per-round ratios): **{s['speedup_median_of_pairs']:.2f}x**; prompt rows computed "
    f"{s['b_prefill_rows'] / s['a_prefill_rows']:.0f}x fewer.", "",
    f"Choice i against the separate request with seed + i (temperature 1): the same first token in "
    f"{s['first_token_same']}/{s['choices']}, all {s['generated_tokens']} tokens the same in {s['all_tokens_same']}/{s['choices']}. "
    "In exact mode (F32 KV cache, `crates/engine/tests/engine.rs`) they are identical; here (F16 KV, Q4_K_M) "
    "llama.cpp's arithmetic differs slightly between batch shapes (one prefill vs eight in one batch), and "
    "the random bench model's next-token distribution is nearly flat, so a draw at temperature 1 can fall "
    "on the other side of a boundary that moved by a rounding error.", "",
    "Rounds: " + "; ".join(f"{r['a_s']:.2f} s vs {r['b_s']:.2f} s" for r in s["rounds"]) + ".",
]
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
