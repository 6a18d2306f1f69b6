#!/usr/bin/env bash
# A client nobody here wrote, as the proof (issue 33, item 6): EleutherAI's lm-evaluation-harness
# (`lm_eval`, model `local-completions`) against `iapt serve` on the embedded demo's 300 held-out
# examples (a local task: tasks/iapt_demo_reverse.yaml reads converters/python/demo/assets/
# held_out.jsonl, no hub), with the adapter (`model` = the adapter's name) and without it (`model` =
# the base id), beside `iapt eval` on the same file. lm-eval scores with its own exact_match
# after its remove_whitespace filter; the task asks for greedy decoding, 24 new tokens at most and
# the stop "\n", which is `iapt eval`'s rule.
#
#   bash bench/lm-eval/run.sh
#
# Steps: make the venv (once; pinned, no torch) -> start iapt serve on 127.0.0.1, a free port ->
# check with POST /tokenize that the text prompts give iapt eval's prompt ids -> lm-eval with the
# adapter, lm-eval on the base -> the base through the server with iapt eval's own token ids
# (no lm-eval; see the note on the base below) -> probe /v1/chat/completions and, if the model has
# a chat template the server can apply, lm-eval local-chat-completions with the adapter -> stop the
# server -> iapt eval (with --no-adapter-too) -> results.{json,md} in OUT. Exit 1 when a comparison
# that must hold fails: lm-eval with the adapter (completions, and chat when it runs) and the base
# with iapt eval's token ids must give iapt eval's score and the same answer on every row.
#
# The base without the adapter: iapt eval feeds it [BOS] + instruction + the demo's 4 slot ids
# (`<slot>`, a control token) as ordinary input; the base task (tasks/iapt_demo_reverse_base.yaml)
# spells them out in the prompt text, which iapt serve parses into the slot ids as llama-server
# parses special-token text. Both lm-eval runs must give iapt eval's scores, answer for answer.
#
# Settings (environment): IAPT_BIN (target/release/iapt), MODEL, ADAPTER (the demo's Q4_K_M base and
# adapter), THREADS ($(nproc)), LIMIT (first N examples only, for a quick try), VENV
# (target/lm-eval-venv), PYTHON (python3, >= 3.10), WORK (target/lm-eval), OUT (bench/lm-eval).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
A=converters/python/demo/assets
IAPT_BIN=${IAPT_BIN:-target/release/iapt}
MODEL=${MODEL:-$A/base-q4_k_m.gguf}
ADAPTER=${ADAPTER:-$A/adapter.iapt.gguf}
DATA=$A/held_out.jsonl # the task YAML names this file
FORMAT=$A/prompt_format.json
THREADS=${THREADS:-$(nproc)}
LIMIT=${LIMIT:-}
VENV=${VENV:-target/lm-eval-venv}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-target/lm-eval}
OUT=${OUT:-bench/lm-eval}
HERE=bench/lm-eval
TASK=iapt_demo_reverse
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

if [ ! -x "$IAPT_BIN" ]; then
  echo "error: $IAPT_BIN: no iapt binary; build it with \`cargo build --release -p iapt\` (or set IAPT_BIN)" >&2
  exit 2
fi
for f in "$MODEL" "$ADAPTER" "$DATA" "$FORMAT"; do
  [ -f "$f" ] || { echo "error: $f is missing" >&2; exit 2; }
done
mkdir -p "$WORK" "$OUT"
rm -rf "$WORK/out" "$WORK"/*.json "$WORK"/*.jsonl "$WORK"/*.log

# 1. The venv: lm-eval and exactly what its API path needs, pinned (requirements.txt), no pip cache.
REQ_SUM=$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$REQ_SUM" ]; then
  log "making $VENV (lm-eval and its API dependencies, pinned; no torch)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: lm-eval 0.4.13 needs Python >= 3.10 (PYTHON=$PYTHON)" >&2; exit 2; }
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || { echo "error: $PYTHON -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 2; }
  "$VENV/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check --no-deps -r "$HERE/requirements.txt"
  echo "$REQ_SUM" >"$VENV/.requirements.sha256"
fi
PY=$VENV/bin/python
LM_EVAL_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("lm_eval"))')
# lm-eval's `datasets` loads the JSON-lines file with its built-in loader; no hub, caches under WORK.
export HF_HOME=$PWD/$WORK/hf HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 2. The server, on a free port; always stopped.
SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM
BASE_ID=$(basename "$MODEL" .gguf)
SERVE=("$IAPT_BIN" serve --model "$MODEL" --adapter "reverse=$ADAPTER" --host 127.0.0.1 --port 0 --threads "$THREADS")
log "starting: ${SERVE[*]}"
"${SERVE[@]}" >"$WORK/serve.out" 2>"$WORK/serve.log" &
SERVER_PID=$!
PORT=$(wait_iapt_port "$WORK/serve.out" "$WORK/serve.log" "$SERVER_PID" 120)
URL=http://127.0.0.1:$PORT
until "$PY" -c "import urllib.request, sys; urllib.request.urlopen('$URL/health', timeout=5)" 2>/dev/null; do
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "error: iapt serve exited" >&2; exit 1; }
  sleep 0.5
done
log "iapt serve ready on $URL (models: reverse, $BASE_ID)"

# 3. Same prompt ids as iapt eval?
"$PY" $HERE/check.py tokenize "$URL" "$DATA" "$FORMAT" "$WORK/tokenize.json" $LIMIT

# 4. lm-eval, with the adapter and without it. tokenizer_backend=None: the requests are text and the
# server tokenizes (lm-eval's default looks for vLLM's GET /tokenizer_info, which iapt serve does not
# have, then falls back to a Hugging Face tokenizer, i.e. transformers).
LIMIT_ARGS=()
[ -n "$LIMIT" ] && LIMIT_ARGS=(--limit "$LIMIT")
COMMANDS=("${SERVE[*]}")
declare -A SECONDS_OF
lm_eval_run() { # label endpoint-model lm-eval-model task [extra args...]
  local label=$1 kind=$2 model=$3 task=$4
  shift 4
  local api=completions args="tokenizer_backend=None,tokenized_requests=False,"
  [ "$kind" = local-chat-completions ] && { api=chat/completions; args=""; }
  local cmd=("$VENV/bin/lm_eval" --model "$kind"
    --model_args "base_url=$URL/v1/$api,model=$model,${args}num_concurrent=1,max_retries=1"
    --include_path "$HERE/tasks" --tasks "$task" --output_path "$WORK/out/$label" --log_samples "$@" "${LIMIT_ARGS[@]}")
  log "lm-eval ($label): ${cmd[*]}"
  COMMANDS+=("${cmd[*]}")
  local t0=$SECONDS
  "${cmd[@]}" >"$WORK/lm-eval-$label.log" 2>&1 || { tail -n 30 "$WORK/lm-eval-$label.log" >&2; echo "error: lm-eval ($label) failed" >&2; exit 1; }
  SECONDS_OF[lm_eval_$label]=$((SECONDS - t0))
  grep -F "|$task" "$WORK/lm-eval-$label.log" >&2 || true
}
lm_eval_run adapter local-completions reverse "$TASK"
lm_eval_run base local-completions "$BASE_ID" "${TASK}_base"

# 5. The base with iapt eval's own token ids, through the server (no lm-eval).
log "base model, iapt eval's prompt ids as a token-id prompt"
t0=$SECONDS
"$PY" $HERE/check.py base-ids "$URL" "$BASE_ID" "$DATA" "$WORK/base-ids.jsonl" $LIMIT
SECONDS_OF[base_token_ids]=$((SECONDS - t0))
COMMANDS+=("python3 $HERE/check.py base-ids $URL $BASE_ID $DATA $WORK/base-ids.jsonl   # POST /v1/completions {\"model\": \"$BASE_ID\", \"prompt\": prompt_ids, \"max_tokens\": 24, \"temperature\": 0, \"stop\": [\"\\n\"]}")

# 6. Chat: lm-eval's local-chat-completions, if the server can apply the model's chat template.
"$PY" $HERE/check.py chat-probe "$URL" reverse "$DATA" "$WORK/chat-probe.json"
if "$PY" -c "import json, sys; sys.exit(json.load(open('$WORK/chat-probe.json'))['status'] != 200)"; then
  lm_eval_run chat local-chat-completions reverse "$TASK" --apply_chat_template
else
  log "chat refused: $("$PY" -c "import json; print(json.dumps(json.load(open('$WORK/chat-probe.json'))['response']))")"
fi
stop_server

# 7. iapt eval on the same file, the server stopped (same threads).
EVAL=("$IAPT_BIN" eval --model "$MODEL" --adapter "$ADAPTER" --data "$DATA" --no-adapter-too --json
  --answers "$WORK/iapt-eval-answers.jsonl" --threads "$THREADS" "${LIMIT_ARGS[@]}")
log "iapt eval: ${EVAL[*]}"
COMMANDS+=("${EVAL[*]}")
t0=$SECONDS
"${EVAL[@]}" >"$WORK/iapt-eval.json"
SECONDS_OF[iapt_eval]=$((SECONDS - t0))

# 8. Side by side.
SECONDS_OF[total]=$SECONDS
export S_DATE=$(date -u +%Y-%m-%dT%H:%MZ) S_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + local changes')"
export S_MACHINE="$(nproc) vCPU, $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(free -g | awk '/^Mem:/ {print $2}') GiB"
export S_IAPT="$IAPT_BIN ($("$IAPT_BIN" --version), sha256 $(sha256sum "$IAPT_BIN" | cut -c1-12))"
export S_VENV_MIB=$(du -sm "$VENV" | cut -f1) S_LM_EVAL=$LM_EVAL_VERSION S_WORK=$WORK S_DATA=$DATA S_MODEL=$MODEL S_ADAPTER=$ADAPTER
S_SECONDS=$(for k in "${!SECONDS_OF[@]}"; do echo "$k=${SECONDS_OF[$k]}"; done | sort)
export S_SECONDS
S_COMMANDS=$(printf '%s\n' "${COMMANDS[@]}")
export S_COMMANDS
"$PY" - <<'EOF'
import json, os
e, w = os.environ, os.environ["S_WORK"]
json.dump({
    "date": e["S_DATE"], "commit": e["S_COMMIT"], "machine": e["S_MACHINE"], "iapt": e["S_IAPT"],
    "lm_eval_version": e["S_LM_EVAL"], "venv_mib": int(e["S_VENV_MIB"]),
    "data": e["S_DATA"], "model": e["S_MODEL"], "adapter": e["S_ADAPTER"],
    "seconds": {k: float(v) for k, v in (l.split("=") for l in e["S_SECONDS"].splitlines())},
    "commands": e["S_COMMANDS"].splitlines(),
    "iapt_eval_json": f"{w}/iapt-eval.json", "iapt_eval_answers": f"{w}/iapt-eval-answers.jsonl",
    "tokenize_json": f"{w}/tokenize.json", "base_ids_answers": f"{w}/base-ids.jsonl",
    "chat_probe_json": f"{w}/chat-probe.json",
    "lm_eval_adapter_dir": f"{w}/out/adapter", "lm_eval_base_dir": f"{w}/out/base", "lm_eval_chat_dir": f"{w}/out/chat",
}, open(f"{w}/summary.json", "w"), indent=1)
EOF
"$PY" $HERE/check.py report "$WORK" "$OUT"
