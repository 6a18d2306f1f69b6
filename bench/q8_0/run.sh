#!/usr/bin/env bash
# What Q8_0 adapter tensors (spec 1.1) cost in accuracy, side by side with the F16 adapter (issue 29):
#
# 1. the demo: exact-match accuracy on its 300 held-out examples with the F16 adapter and with the
#    same adapter packed to Q8_0 (`iapt pack --dtype q8_0`), on the Q4_K_M demo base (`iapt eval`);
# 2. the bench model (hidden size 2048, bench/tenants): for PROMPTS random prompts of PROMPT tokens
#    and each of N_ADAPTERS F16 adapters and its Q8_0 pack, the logits of GEN greedy steps
#    (`iapt run --dump-logits`), compared while both continuations agree: the largest absolute
#    difference over the logit vector's spread, the RMS difference over the logits' RMS, and how
#    many first tokens and whole continuations are the same. The adapter files' sizes too.
#
#   bash bench/q8_0/run.sh          (from a fresh clone: builds, makes the bench model and adapters)
#
# Settings (environment): PROMPTS 8, PROMPT 128, GEN 16, N_ADAPTERS 4, THREADS 2, OUT bench/q8_0/results
set -euo pipefail
cd "$(dirname "$0")/../.."
PROMPTS=${PROMPTS:-8}
PROMPT=${PROMPT:-128}
GEN=${GEN:-16}
N_ADAPTERS=${N_ADAPTERS:-4}
THREADS=${THREADS:-2}
OUT=${OUT:-bench/q8_0/results}
WORK=target/q8_0
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# The release iapt, the bench model and its adapters, as bench/tenants makes them.
read -r MODEL ADAPTERS IAPT < <(bash bench/tenants/run.sh --prepare | tail -n 1)
PY=.venv/bin/python   # scripts/setup (run by bench/tenants/run.sh) made it, with numpy

log "demo: F16 vs Q8_0 adapter on the Q4_K_M base, 300 held-out examples"
A=converters/python/demo/assets
"$IAPT" pack "$A/adapter.iapt.gguf" --dtype q8_0 -o "$WORK/demo-q8_0.iapt.gguf"
for kind in f16 q8_0; do
  adapter=$A/adapter.iapt.gguf
  [ "$kind" = q8_0 ] && adapter=$WORK/demo-q8_0.iapt.gguf
  "$IAPT" eval --model "$A/base-q4_k_m.gguf" --adapter "$adapter" --data "$A/held_out.jsonl" --threads "$THREADS" --json \
    >"$WORK/demo-$kind.json"
done

log "bench model: $N_ADAPTERS adapters x $PROMPTS prompts x $GEN greedy steps, F16 vs Q8_0"
for i in $(seq 0 $((N_ADAPTERS - 1))); do
  n=$(printf %02d "$i")
  "$IAPT" pack "$ADAPTERS/iapt-$n.safetensors" --dtype q8_0 -o "$WORK/iapt-$n-q8_0.safetensors" 2>/dev/null
  for p in $(seq 0 $((PROMPTS - 1))); do
    toks=$("$PY" -c "import random; r = random.Random($p); print(','.join(['1'] + [str(r.randrange(3, 30000)) for _ in range($PROMPT - 1)]))")
    for kind in f16 q8_0; do
      adapter=$ADAPTERS/iapt-$n.safetensors
      [ "$kind" = q8_0 ] && adapter=$WORK/iapt-$n-q8_0.safetensors
      "$IAPT" run --model "$MODEL" --adapter "$adapter" --prompt-tokens "$toks" --n-predict "$GEN" --temp 0 \
        --threads "$THREADS" --dump-logits "$WORK/logits-$n-$p-$kind.npy" >/dev/null 2>&1
    done
  done
done
"$PY" bench/q8_0/report.py --work "$WORK" --adapters "$ADAPTERS" --n-adapters "$N_ADAPTERS" --prompts "$PROMPTS" \
  --prompt "$PROMPT" --gen "$GEN" --threads "$THREADS" --out "$OUT"
