#!/usr/bin/env bash
# What Q8_0 adapter tensors (spec 1.1) cost, side by side with the adapter as stored (issue 29):
#
# 1. the demo: exact-match accuracy on its 300 held-out examples with the adapter as committed (F32,
#    as trained) and with the same adapter packed to Q8_0 (`iapt pack --dtype q8_0`), on the Q4_K_M
#    demo base (`iapt eval`);
# 2. the bench model (hidden size 2048, bench/tenants, random weights): for PROMPTS random prompts of
#    PROMPT tokens and each of N_ADAPTERS F16 adapters, its Q8_0 pack and, as a yardstick, its BF16
#    pack (8 significant bits, the precision Q8_0 has per block), the logits of GEN greedy steps
#    (`iapt run --dump-logits`), compared with the F16 adapter's while both continuations agree: the
#    largest |difference| over the logit vector's spread, the RMS difference over the logits' RMS,
#    and how many first tokens and whole continuations are the same;
# 3. memory per resident adapter: `iapt batch` with 1 and with N_MEM adapters of each dtype (one
#    short request per adapter), peak RSS (GNU time): (RSS with N_MEM - RSS with 1) / (N_MEM - 1),
#    against the file size (1 adapter, not none, as the baseline: the generator's threads and
#    scratch exist once an adapter runs, whatever the count).
#
#   bash bench/q8_0/run.sh          (from a fresh clone: builds, makes the bench model and adapters)
#
# Settings (environment): PROMPTS 8, PROMPT 128, GEN 16, N_ADAPTERS 4, N_MEM 16, THREADS 2,
# OUT bench/q8_0/results, STEPS "demo logits memory" (the steps to run; the report reads every
# step's files from target/q8_0)
set -euo pipefail
cd "$(dirname "$0")/../.."
PROMPTS=${PROMPTS:-8}
PROMPT=${PROMPT:-128}
GEN=${GEN:-16}
N_ADAPTERS=${N_ADAPTERS:-4}
N_MEM=${N_MEM:-16}
THREADS=${THREADS:-2}
OUT=${OUT:-bench/q8_0/results}
STEPS=" ${STEPS:-demo logits memory} "
WORK=target/q8_0
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# The release iapt, the bench model and its adapters, as bench/tenants makes them.
read -r MODEL ADAPTERS IAPT < <(bash bench/tenants/run.sh --prepare | tail -n 1)
PY=.venv/bin/python # scripts/setup (run by bench/tenants/run.sh) made it, with numpy

# adapter KIND N: the bench adapter N as stored (f16) or packed (q8_0, bf16), packed on first use.
adapter() {
  local src
  src=$ADAPTERS/iapt-$2.safetensors
  [ "$1" = f16 ] && { echo "$src"; return; }
  [ -f "$WORK/iapt-$2-$1.safetensors" ] || "$IAPT" pack "$src" --dtype "$1" -o "$WORK/iapt-$2-$1.safetensors" 2>/dev/null
  echo "$WORK/iapt-$2-$1.safetensors"
}

A=converters/python/demo/assets
if [[ $STEPS == *" demo "* ]]; then
  log "demo: the adapter as committed vs Q8_0, on the Q4_K_M base, 300 held-out examples"
  "$IAPT" pack "$A/adapter.iapt.gguf" --dtype q8_0 -o "$WORK/demo-q8_0.iapt.gguf"
  for kind in f16 q8_0; do
    a=$A/adapter.iapt.gguf
    [ "$kind" = q8_0 ] && a=$WORK/demo-q8_0.iapt.gguf
    "$IAPT" eval --model "$A/base-q4_k_m.gguf" --adapter "$a" --data "$A/held_out.jsonl" --threads "$THREADS" --json \
      >"$WORK/demo-$kind.json"
  done
fi

if [[ $STEPS == *" logits "* ]]; then
  log "bench model: $N_ADAPTERS adapters x $PROMPTS prompts x $GEN greedy steps: F16, Q8_0, BF16"
  for i in $(seq 0 $((N_ADAPTERS - 1))); do
    n=$(printf %02d "$i")
    for p in $(seq 0 $((PROMPTS - 1))); do
      toks=$("$PY" -c "import random; r = random.Random($p); print(','.join(['1'] + [str(r.randrange(3, 30000)) for _ in range($PROMPT - 1)]))")
      for kind in f16 q8_0 bf16; do
        "$IAPT" run --model "$MODEL" --adapter "$(adapter "$kind" "$n")" --prompt-tokens "$toks" --n-predict "$GEN" --temp 0 \
          --threads "$THREADS" --dump-logits "$WORK/logits-$n-$p-$kind.npy" >/dev/null 2>&1
      done
    done
  done
fi

if [[ $STEPS == *" memory "* ]]; then
  log "memory: iapt batch with 1 and $N_MEM adapters, F16 and Q8_0, peak RSS"
  for kind in f16 q8_0; do
    for count in 1 "$N_MEM"; do
      args=()
      : >"$WORK/req-$kind-$count.jsonl"
      for i in $(seq 0 $((count - 1))); do
        n=$(printf %02d "$i")
        args+=(--adapter "a$n=$(adapter "$kind" "$n")")
      done
      # The same N_MEM requests either way (with 1 adapter all of them use it), so that the two runs
      # differ only in the adapters resident.
      for i in $(seq 0 $((N_MEM - 1))); do
        n=$(printf %02d $((i % count)))
        echo "{\"prompt_tokens\": [1, 2, 3, 4, 5, 6, 7, 8], \"adapter\": \"a$n\"}" >>"$WORK/req-$kind-$count.jsonl"
      done
      /usr/bin/time -f %M -o "$WORK/rss-$kind-$count.txt" "$IAPT" batch --model "$MODEL" "${args[@]}" \
        --requests "$WORK/req-$kind-$count.jsonl" --n-predict 1 --parallel 4 --threads "$THREADS" >/dev/null 2>&1
    done
  done
fi
"$PY" bench/q8_0/report.py --work "$WORK" --adapters "$ADAPTERS" --n-adapters "$N_ADAPTERS" --prompts "$PROMPTS" \
  --prompt "$PROMPT" --gen "$GEN" --n-mem "$N_MEM" --threads "$THREADS" --out "$OUT"
