#!/usr/bin/env bash
# bench/tenants (issue 14): one backbone, many tenants. llama-server (llama.cpp's own server, built
# by scripts/llama-cpp from the same llama.cpp as `iapt` and linked to the same libllama/libggml
# files) with one LoRA adapter per tenant (per-request `lora`) and on the bare base
# model, against `iapt serve` with one IAPT adapter per tenant (`model` = adapter), all measured by the
# same load generator (bench/tenants/loadgen.py), plus `iapt batch` offline. Writes the table
# (table.md) and the raw figures (results.json, rows/*.json, logs/) to OUT.
#
#   bash bench/tenants/run.sh            the full run (~30 min on a 2-vCPU machine once built), from
#                                        a fresh clone: release build, llama-server, bench model,
#                                        16 LoRA + 16 IAPT adapters, every row; OUT = bench/tenants/results
#   bash bench/tenants/run.sh --prepare  only build and make the model and adapters, then print
#                                        "MODEL ADAPTERS IAPT_BIN" on stdout (bench/q8_0 uses it)
#   bash bench/tenants/run.sh --smoke    CI: the tiny fixture model and the committed adapters
#                                        (bench/tenants/fixtures: no torch needed), 2 tenants, 4
#                                        requests per row, every row kind; OUT = $WORK/smoke
#
# Settings (environment; full-run defaults, smoke defaults in brackets):
#   REQUESTS 16 [4]    requests per measured run        GEN 128 [8]     generated tokens per request
#   REQUESTS_SERIAL 8 [2]  requests per run of the "1 in flight" rows (each request runs alone, so
#                      fewer give the same figure; they are the slowest rows)
#   GEN_SHORT 32 [4]   the short-generation rows        PROMPT 128 [16] prompt tokens (BOS included)
#   WARMUP 2 [1]       warm-up requests before each run WARMUP_GEN 8 [2] their generated tokens
#   PARALLEL 16 [2]    server slots = requests in flight (the "1 in flight" rows use 1)
#   N_ADAPTERS 16 [2]  adapters resident in each adapter server (tenants 1, 4 and N_ADAPTERS use the first ones)
#   TENANTS_BIG 64 [2], PARALLEL_BIG 32 [4], REQUESTS_BIG 64 [8]: the "big" rows (bare base, LoRA,
#                      IAPT): that many tenants (and adapters resident), slots and requests in flight
#   DISK_ADAPTERS 1000 [6], CAP_SMALL 32 [2], CAP_LARGE 256 [4], REQUESTS_DISK 256 [8], GEN_DISK 64 [4]:
#                      the "disk" rows (issue 29): that many IAPT adapters on disk (hard links to the
#                      made ones, WORK/disk-N), `iapt serve --adapter-dir` with a resident cap of
#                      CAP_SMALL and CAP_LARGE, Zipf (s 1.1) traffic; and llama-server started with
#                      that many LoRA adapters (copies), its start time and RSS
#   PREFIX_SYS 1024 [48], PREFIX_USER 64 [8], GEN_PREFIX 64 [4], REQUESTS_PREFIX 16 [4], CTX_PREFIX 1280 [256]:
#                      the "prefix" rows (issue 30): every prompt a shared PREFIX_SYS-token system
#                      prompt + PREFIX_USER tokens of its own, N_ADAPTERS tenants, CTX_PREFIX per slot
#   CHAT_FIRST 256 [16], CHAT_USER 64 [8], CHAT_TURNS 4 [2], GEN_CHAT 32 [4]: the "chat" rows (issue 30):
#                      a CHAT_TURNS-turn conversation per tenant, the first prompt CHAT_FIRST tokens, each
#                      later one the previous prompt + its answer + CHAT_USER new tokens
#   THREADS 2          threads for every server           CTX_PER_SEQ 512 [256] context per slot (a multiple
#                      of 256: llama.cpp pads a slot's context to one; -c = --ctx-size = PARALLEL x this)
#   BATCH 512          tokens per step (iapt --batch-tokens, llama-server -b); UBATCH 512 (-ub / --ubatch-size)
#   ROWS "..."         row ids to run (default: all; see `rows` below)
#   WORK target/tenants   built model, adapters, Python venv for PEFT
#   BENCH_MODEL        an existing Q4_K_M bench model to use instead of making one
#   IAPT_BIN           an existing iapt binary (default: built here: release + target-cpu=native;
#                      smoke: the debug build); llama-server is built for the same profile and flags
#   OUT                where the results go
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
ROOT=$(pwd)
HERE=bench/tenants

smoke=0
prepare=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    --prepare) prepare=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
T_START=$(date +%s)
PEFT_VERSION=0.21.2

WORK=${WORK:-target/tenants}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
if [ "$smoke" = 1 ]; then
  REQUESTS=${REQUESTS:-4} REQUESTS_SERIAL=${REQUESTS_SERIAL:-2} GEN=${GEN:-8} GEN_SHORT=${GEN_SHORT:-4} PROMPT=${PROMPT:-16} WARMUP=${WARMUP:-1}
  WARMUP_GEN=${WARMUP_GEN:-2} PARALLEL=${PARALLEL:-2} N_ADAPTERS=${N_ADAPTERS:-2} CTX_PER_SEQ=${CTX_PER_SEQ:-256}
  TENANTS_BIG=${TENANTS_BIG:-2} PARALLEL_BIG=${PARALLEL_BIG:-4} REQUESTS_BIG=${REQUESTS_BIG:-8}
  DISK_ADAPTERS=${DISK_ADAPTERS:-6} CAP_SMALL=${CAP_SMALL:-2} CAP_LARGE=${CAP_LARGE:-4} REQUESTS_DISK=${REQUESTS_DISK:-8} GEN_DISK=${GEN_DISK:-4}
  PREFIX_SYS=${PREFIX_SYS:-48} PREFIX_USER=${PREFIX_USER:-8} GEN_PREFIX=${GEN_PREFIX:-4} REQUESTS_PREFIX=${REQUESTS_PREFIX:-4} CTX_PREFIX=${CTX_PREFIX:-256}
  CHAT_FIRST=${CHAT_FIRST:-16} CHAT_USER=${CHAT_USER:-8} CHAT_TURNS=${CHAT_TURNS:-2} GEN_CHAT=${GEN_CHAT:-4}
  OUT=${OUT:-$WORK/smoke} VOCAB=tiny
else
  REQUESTS=${REQUESTS:-16} REQUESTS_SERIAL=${REQUESTS_SERIAL:-8} GEN=${GEN:-128} GEN_SHORT=${GEN_SHORT:-32}
  PROMPT=${PROMPT:-128} WARMUP=${WARMUP:-2}
  WARMUP_GEN=${WARMUP_GEN:-8} PARALLEL=${PARALLEL:-16} N_ADAPTERS=${N_ADAPTERS:-16} CTX_PER_SEQ=${CTX_PER_SEQ:-512}
  TENANTS_BIG=${TENANTS_BIG:-64} PARALLEL_BIG=${PARALLEL_BIG:-32} REQUESTS_BIG=${REQUESTS_BIG:-64}
  DISK_ADAPTERS=${DISK_ADAPTERS:-1000} CAP_SMALL=${CAP_SMALL:-32} CAP_LARGE=${CAP_LARGE:-256} REQUESTS_DISK=${REQUESTS_DISK:-256} GEN_DISK=${GEN_DISK:-64}
  PREFIX_SYS=${PREFIX_SYS:-1024} PREFIX_USER=${PREFIX_USER:-64} GEN_PREFIX=${GEN_PREFIX:-64} REQUESTS_PREFIX=${REQUESTS_PREFIX:-16} CTX_PREFIX=${CTX_PREFIX:-1280}
  CHAT_FIRST=${CHAT_FIRST:-256} CHAT_USER=${CHAT_USER:-64} CHAT_TURNS=${CHAT_TURNS:-4} GEN_CHAT=${GEN_CHAT:-32}
  OUT=${OUT:-$HERE/results} VOCAB=bench
fi
THREADS=${THREADS:-2} BATCH=${BATCH:-512} UBATCH=${UBATCH:-512}
CTX=$((PARALLEL * CTX_PER_SEQ))
[ $((PROMPT + GEN + 4)) -le "$CTX_PER_SEQ" ] || die "PROMPT + GEN + 4 soft tokens must fit CTX_PER_SEQ ($CTX_PER_SEQ)"
TENANT_SET="1 4 $N_ADAPTERS"
if [ "$N_ADAPTERS" -lt 4 ]; then TENANT_SET="1 $N_ADAPTERS"; fi
N_MADE=$((N_ADAPTERS > TENANTS_BIG ? N_ADAPTERS : TENANTS_BIG)) # adapters of each kind to make

# The rows: id | server kind | tenants | mix | in flight | generated tokens | requests
rows() {
  local r=$REQUESTS s=$REQUESTS_SERIAL
  echo "base-p | llama-base | 0 | uniform | $PARALLEL | $GEN | $r"
  echo "base-1 | llama-base | 0 | uniform | 1 | $GEN | $s"
  for t in $TENANT_SET; do echo "lora-t$t | llama-lora | $t | uniform | $PARALLEL | $GEN | $r"; done
  for t in $TENANT_SET; do echo "iapt-t$t | iapt | $t | uniform | $PARALLEL | $GEN | $r"; done
  echo "lora-skew | llama-lora | $N_ADAPTERS | skewed | $PARALLEL | $GEN | $r"
  echo "iapt-skew | iapt | $N_ADAPTERS | skewed | $PARALLEL | $GEN | $r"
  echo "iapt-base-p | iapt-base | 0 | uniform | $PARALLEL | $GEN | $r"
  # The KV layout: one unified cache for every sequence (llama-server -kvu, iapt --kv-unified)
  # against the default one stream per sequence (base-p, iapt-base-p).
  echo "base-p-kvu | llama-base-kvu | 0 | uniform | $PARALLEL | $GEN | $r"
  echo "iapt-base-p-kvu | iapt-base-kvu | 0 | uniform | $PARALLEL | $GEN | $r"
  echo "base-p-short | llama-base | 0 | uniform | $PARALLEL | $GEN_SHORT | $r"
  echo "base-1-short | llama-base | 0 | uniform | 1 | $GEN_SHORT | $s"
  echo "lora-short | llama-lora | $N_ADAPTERS | uniform | $PARALLEL | $GEN_SHORT | $r"
  echo "iapt-short | iapt | $N_ADAPTERS | uniform | $PARALLEL | $GEN_SHORT | $r"
  echo "batch | iapt-batch | $N_ADAPTERS | uniform | $PARALLEL | $GEN | $r"
  # Many tenants, more in flight: TENANTS_BIG adapters resident, PARALLEL_BIG slots.
  echo "base-big | llama-base | 0 | uniform | $PARALLEL_BIG | $GEN | $REQUESTS_BIG"
  echo "lora-big | llama-lora | $TENANTS_BIG | uniform | $PARALLEL_BIG | $GEN | $REQUESTS_BIG"
  echo "iapt-big | iapt | $TENANTS_BIG | uniform | $PARALLEL_BIG | $GEN | $REQUESTS_BIG"
  # A second sample of the rows the targets are computed from, last (the order effect and the
  # run-to-run spread show in the pair).
  echo "base-p-rep | llama-base | 0 | uniform | $PARALLEL | $GEN | $r"
  echo "base-1-rep | llama-base | 0 | uniform | 1 | $GEN | $s"
  echo "lora-rep | llama-lora | $N_ADAPTERS | uniform | $PARALLEL | $GEN | $r"
  echo "iapt-rep | iapt | $N_ADAPTERS | uniform | $PARALLEL | $GEN | $r"
  echo "iapt-base-p-rep | iapt-base | 0 | uniform | $PARALLEL | $GEN | $r"
  # Adapters on demand (issue 29): DISK_ADAPTERS on disk, two resident caps, Zipf traffic; and
  # llama-server started with as many LoRA adapters (start time and memory; no load).
  echo "disk-small | iapt-disk-small | $DISK_ADAPTERS | zipf1.1 | $PARALLEL | $GEN_DISK | $REQUESTS_DISK"
  echo "disk-large | iapt-disk-large | $DISK_ADAPTERS | zipf1.1 | $PARALLEL | $GEN_DISK | $REQUESTS_DISK"
  echo "lora-disk-start | llama-lora-start | $DISK_ADAPTERS | zipf1.1 | $PARALLEL | $GEN_DISK | 0"
  # The prefix cache (issue 30): every prompt = one PREFIX_SYS-token system prompt + its own
  # PREFIX_USER tokens, N_ADAPTERS tenants: iapt serve with and without its cache, llama-server with
  # a LoRA per tenant and on the bare base, both with their prompt cache on (its default).
  echo "prefix-iapt | iapt-prefix | $N_ADAPTERS | uniform | $PARALLEL | $GEN_PREFIX | $REQUESTS_PREFIX"
  echo "prefix-iapt-nocache | iapt-prefix-nocache | $N_ADAPTERS | uniform | $PARALLEL | $GEN_PREFIX | $REQUESTS_PREFIX"
  # The same with every step filled to --batch-tokens (--min-step-rows 0): the step rule's share.
  echo "prefix-iapt-fill | iapt-prefix-fill | $N_ADAPTERS | uniform | $PARALLEL | $GEN_PREFIX | $REQUESTS_PREFIX"
  echo "prefix-lora | llama-lora-prefix | $N_ADAPTERS | uniform | $PARALLEL | $GEN_PREFIX | $REQUESTS_PREFIX"
  echo "prefix-base | llama-base-prefix | 0 | uniform | $PARALLEL | $GEN_PREFIX | $REQUESTS_PREFIX"
  # A CHAT_TURNS-turn chat per tenant (a conversation per tenant, its prompt growing by the answer and
  # CHAT_USER new tokens each turn), the same four servers (the prefix context per slot).
  local nchat=$((N_ADAPTERS * CHAT_TURNS))
  echo "chat-iapt | iapt-prefix-chat | $N_ADAPTERS | uniform | $PARALLEL | $GEN_CHAT | $nchat"
  echo "chat-iapt-nocache | iapt-prefix-nocache-chat | $N_ADAPTERS | uniform | $PARALLEL | $GEN_CHAT | $nchat"
  echo "chat-iapt-fill | iapt-prefix-fill-chat | $N_ADAPTERS | uniform | $PARALLEL | $GEN_CHAT | $nchat"
  echo "chat-lora | llama-lora-prefix-chat | $N_ADAPTERS | uniform | $PARALLEL | $GEN_CHAT | $nchat"
  echo "chat-base | llama-base-prefix-chat | 0 | uniform | $PARALLEL | $GEN_CHAT | $nchat"
}
ALL_ROWS=$(rows | cut -d'|' -f1 | tr -d ' ' | tr '\n' ' ')
ROWS=${ROWS:-$ALL_ROWS}
for r in $ROWS; do case " $ALL_ROWS " in *" $r "*) ;; *) die "unknown row $r (rows: $ALL_ROWS)" ;; esac; done

# --- tools: the client venv, the iapt binary, llama-server of the same llama.cpp ---------------
bash scripts/setup >&2
PY=$ROOT/.venv/bin/python
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$smoke" = 1 ]; then
  log "cargo build -p iapt (debug); llama-server against its llama.cpp (scripts/llama-cpp --server)"
  cargo build --quiet -p iapt
  LLAMA=$(bash scripts/llama-cpp --server | tail -n 1)
  IAPT_BIN=${IAPT_BIN:-$TARGET/debug/iapt}
else
  log "cargo build --release -p iapt with -C target-cpu=native; llama-server against its llama.cpp"
  export RUSTFLAGS="-C target-cpu=native"
  cargo build --quiet --release -p iapt
  LLAMA=$(bash scripts/llama-cpp --release --server | tail -n 1)
  unset RUSTFLAGS
  IAPT_BIN=${IAPT_BIN:-$TARGET/release/iapt}
fi
# shellcheck source=/dev/null
. "$LLAMA/env.sh"
[ -x "$LLAMA_SERVER" ] || die "no llama-server at $LLAMA_SERVER"
[ -x "$IAPT_BIN" ] || die "no iapt binary at $IAPT_BIN"
log "one llama.cpp: $LLAMA_VERSION; libraries $LLAMA_LIB"

# --- the base model and the adapters -----------------------------------------------------------
if [ "$smoke" = 1 ]; then
  MODEL=$ROOT/converters/python/fixtures/models/llama-tiny-f32.gguf
  ADAPTERS=$ROOT/$HERE/fixtures
else
  if [ -n "${BENCH_MODEL:-}" ]; then
    MODEL=$BENCH_MODEL
  else
    MODEL=$WORK/model/bench-q4_k_m.gguf
    if [ ! -f "$MODEL" ]; then
      log "bench model: converters/python/make_bench_model.py (numpy, safetensors, gguf in $WORK/model-venv), then iapt quantize q4_k_m"
      reqs=converters/python/requirements-bench.txt
      if ! cmp -s "$reqs" "$WORK/model-venv/requirements.txt"; then
        python3 -m venv "$WORK/model-venv"
        "$WORK/model-venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs" >&2
        cp "$reqs" "$WORK/model-venv/requirements.txt"
      fi
      "$WORK/model-venv/bin/python" converters/python/make_bench_model.py "$WORK/model" >&2
      "$IAPT_BIN" quantize "$WORK/model/bench-f16.gguf" -o "$MODEL" --type q4_k_m --threads "$THREADS" >&2
      rm -f "$WORK/model/bench-f16.gguf"
    fi
  fi
  ADAPTERS=$WORK/adapters
  want="{\"iapt\": $N_MADE, \"lora\": $N_MADE}"
  if [ "$(cat "$ADAPTERS/.made" 2>/dev/null)" != "$want" ]; then
    log "adapters: $N_MADE IAPT + $N_MADE LoRA (PEFT $PEFT_VERSION in $WORK/peft-venv, llama.cpp's converter)"
    if [ ! -x "$WORK/peft-venv/bin/python" ] || ! "$WORK/peft-venv/bin/python" -c "import peft, sys; sys.exit(peft.__version__ != '$PEFT_VERSION')" 2>/dev/null; then
      python3 -m venv --system-site-packages "$WORK/peft-venv"
      "$WORK/peft-venv/bin/pip" install --quiet --disable-pip-version-check "peft==$PEFT_VERSION" >&2
    fi
    rm -rf "$ADAPTERS"
    "$WORK/peft-venv/bin/python" "$HERE/make_adapters.py" "$ADAPTERS" --shape bench --iapt "$N_MADE" \
      --lora "$N_MADE" --convert "$LLAMA_PY_SRC/convert_lora_to_gguf.py" >&2
    echo "$want" >"$ADAPTERS/.made"
  fi
fi
for i in $(seq 0 $((N_MADE - 1))); do
  n=$(printf %02d "$i")
  [ -f "$ADAPTERS/lora-$n.gguf" ] && [ -f "$ADAPTERS/iapt-$n.safetensors" ] || die "adapter $n missing in $ADAPTERS"
done

if [ "$prepare" = 1 ]; then
  echo "$MODEL $ADAPTERS $IAPT_BIN"
  exit 0
fi

# The disk rows' adapters: DISK_ADAPTERS copies of the made adapters (IAPT tNN.safetensors, LoRA
# lora-NN.gguf), made when a disk row is asked for.
DISK=$WORK/disk-$DISK_ADAPTERS
case " $ROWS " in
  *" disk-"* | *" lora-disk-start "*)
    if [ "$(cat "$DISK/.made" 2>/dev/null)" != "$DISK_ADAPTERS $ADAPTERS" ]; then
      log "disk: $DISK_ADAPTERS IAPT and $DISK_ADAPTERS LoRA adapter files in $DISK (copies of the $N_MADE made ones)"
      rm -rf "$DISK" && mkdir -p "$DISK/iapt" "$DISK/lora"
      for i in $(seq 0 $((DISK_ADAPTERS - 1))); do
        src=$(printf %02d $((i % N_MADE)))
        # Hard links where the file system allows (1000 copies would take ~33 GB): each name is its
        # own file to the servers, which read it whole; the page cache then holds one copy of the
        # bytes of each of the N_MADE distinct adapters.
        ln -f "$ADAPTERS/iapt-$src.safetensors" "$DISK/iapt/t$(printf %02d "$i").safetensors" 2>/dev/null ||
          cp "$ADAPTERS/iapt-$src.safetensors" "$DISK/iapt/t$(printf %02d "$i").safetensors"
        ln -f "$ADAPTERS/lora-$src.gguf" "$DISK/lora/lora-$(printf %02d "$i").gguf" 2>/dev/null ||
          cp "$ADAPTERS/lora-$src.gguf" "$DISK/lora/lora-$(printf %02d "$i").gguf"
      done
      echo "$DISK_ADAPTERS $ADAPTERS" >"$DISK/.made"
    fi
    ;;
esac

# --- servers -----------------------------------------------------------------------------------
rm -rf "$OUT/rows" "$OUT/logs"
mkdir -p "$OUT/rows" "$OUT/logs"
SERVER_PID="" CHILD_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
# On exit or a signal: the load generator (or `iapt batch`) and the server. Children run in the
# background and are waited for, so that a signal interrupts the wait at once.
stop_all() {
  if [ -n "$CHILD_PID" ]; then kill -TERM "$CHILD_PID" 2>/dev/null || true; wait "$CHILD_PID" 2>/dev/null || true; fi
  CHILD_PID=""
  stop_server
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
# run_child CMD...: runs CMD in the background and waits for it; returns its status.
run_child() {
  "$@" &
  CHILD_PID=$!
  local rc=0
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  return "$rc"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_ready URL LOG: until GET URL is 200; fails if the server exits or takes over 600 s.
wait_ready() {
  local url=$1 logf=$2 t0=$SECONDS
  until python3 -c "import sys, urllib.request as u; sys.exit(u.urlopen('$url', timeout=5).status != 200)" 2>/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$logf" >&2; die "the server exited before it was ready ($logf)"; }
    [ $((SECONDS - t0)) -lt 600 ] || { tail -20 "$logf" >&2; die "the server was not ready in 600 s ($logf)"; }
    sleep 0.5
  done
}

# start_server KIND LABEL SLOTS ADAPTERS: llama-base[-kvu] | llama-lora | iapt | iapt-base[-kvu] with
# SLOTS slots (SLOTS x CTX_PER_SEQ context) and the first ADAPTERS adapters; sets SERVER_PID, BASE_URL.
start_server() {
  local kind=$1 label=$2 slots=$3 n_adapters=$4 logf="$OUT/logs/$2.server.log" port args=() i n
  local ctx=$((slots * CTX_PER_SEQ))
  case "$kind" in *-prefix*) ctx=$((slots * CTX_PREFIX)) ;; esac
  case "$kind" in
    llama-base | llama-lora | llama-base-kvu | llama-lora-start | llama-lora-prefix* | llama-base-prefix*)
      port=$(free_port)
      args=(-m "$MODEL" --host 127.0.0.1 --port "$port" -t "$THREADS" -tb "$THREADS" -np "$slots" -c "$ctx"
        -b "$BATCH" -ub "$UBATCH" --alias base --metrics --no-webui)
      # The prompt cache (host memory) only where it is measured.
      case "$kind" in *-prefix*) ;; *) args+=(--cache-ram 0) ;; esac
      if [ "$kind" = llama-base-kvu ]; then args+=(-kvu); fi
      if [ "$kind" = llama-lora ] || [ "${kind#llama-lora-prefix}" != "$kind" ]; then
        for i in $(seq 0 $((n_adapters - 1))); do args+=(--lora "$ADAPTERS/lora-$(printf %02d "$i").gguf"); done
        args+=(--lora-init-without-apply)
      fi
      if [ "$kind" = llama-lora-start ]; then
        for i in $(seq 0 $((DISK_ADAPTERS - 1))); do args+=(--lora "$DISK/lora/lora-$(printf %02d "$i").gguf"); done
        args+=(--lora-init-without-apply)
      fi
      echo "$LLAMA_SERVER ${args[*]}" >"$logf"
      "$LLAMA_SERVER" "${args[@]}" >>"$logf" 2>&1 &
      SERVER_PID=$!
      BASE_URL=http://127.0.0.1:$port
      ;;
    iapt | iapt-base | iapt-base-kvu | iapt-disk-small | iapt-disk-large | iapt-prefix*)
      args=(serve --model "$MODEL" --host 127.0.0.1 --port 0 --parallel "$slots" --ctx-size "$ctx"
        --batch-tokens "$BATCH" --ubatch-size "$UBATCH" --threads "$THREADS" --alias base --queue 256)
      if [ "$kind" = iapt-base-kvu ]; then args+=(--kv-unified); fi
      case "$kind" in iapt-prefix-nocache*) args+=(--cache-mib 0) ;; esac
      case "$kind" in iapt-prefix-fill*) args+=(--min-step-rows 0) ;; esac
      if [ "$kind" = iapt-disk-small ]; then args+=(--adapter-dir "$DISK/iapt" --max-resident-adapters "$CAP_SMALL"); fi
      if [ "$kind" = iapt-disk-large ]; then args+=(--adapter-dir "$DISK/iapt" --max-resident-adapters "$CAP_LARGE"); fi
      if [ "$kind" = iapt ] || [ "${kind#iapt-prefix}" != "$kind" ]; then
        for i in $(seq 0 $((n_adapters - 1))); do
          n=$(printf %02d "$i")
          args+=(--adapter "t$n=$ADAPTERS/iapt-$n.safetensors")
        done
      fi
      echo "$IAPT_BIN ${args[*]}" >"$logf"
      : >"$logf.stdout" # empty before the server starts, so the ready line below is this server's
      "$IAPT_BIN" "${args[@]}" >>"$logf.stdout" 2>>"$logf" &
      SERVER_PID=$!
      local port
      port=$(wait_iapt_port "$logf.stdout" "$logf" "$SERVER_PID" 600) || die "iapt serve did not start ($logf)"
      BASE_URL=http://127.0.0.1:$port
      ;;
  esac
  wait_ready "$BASE_URL/health" "$logf"
}

# run_row ID KIND TENANTS MIX INFLIGHT GEN REQUESTS: the servers have PARALLEL slots (INFLIGHT where
# more) and N_ADAPTERS adapters resident (TENANTS where more).
run_row() {
  local id=$1 kind=$2 tenants=$3 mix=$4 inflight=$5 gen=$6 nreq=$7 t0=$SECONDS
  local slots=$((inflight > PARALLEL ? inflight : PARALLEL)) n_adapters=$((tenants > N_ADAPTERS ? tenants : N_ADAPTERS))
  log "row $id: $kind, tenants $tenants ($mix), $inflight in flight, $nreq requests, $gen generated each"
  if [ "$kind" = iapt-batch ]; then
    run_batch "$id" "$tenants" "$mix" "$inflight" "$gen"
    return
  fi
  local t_start
  t_start=$(date +%s.%N)
  start_server "$kind" "$id" "$slots" "$n_adapters"
  local startup=$((SECONDS - t0)) metrics=() client=${kind%-kvu} prompt=$PROMPT shared=()
  case "$kind" in iapt-disk-*) client=iapt ;; esac
  case "$kind" in
    *-prefix*-chat)
      client=${kind%%-prefix*}
      prompt=$CHAT_FIRST shared=(--turns "$CHAT_TURNS" --turn-tokens "$CHAT_USER")
      metrics=(--metrics-url "$BASE_URL/metrics")
      ;;
    *-prefix*)
      client=${kind%%-prefix*}
      prompt=$((PREFIX_SYS + PREFIX_USER)) shared=(--shared-prefix-tokens "$PREFIX_SYS")
      metrics=(--metrics-url "$BASE_URL/metrics")
      ;;
  esac
  if [ "$kind" = llama-lora-start ]; then
    # Started with every LoRA adapter: how long it took and what it holds; no load.
    python3 - "$OUT/rows/$id.json" "$id" "$t_start" "$SERVER_PID" "$DISK_ADAPTERS" <<'PY'
import json, sys, time
out, label, t0, pid, n = sys.argv[1:6]
hwm = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
json.dump({"label": label, "server": "llama-lora-start", "n_lora": int(n), "startup_s": time.time() - float(t0),
           "peak_rss_kib": hwm}, open(out, "w"), indent=1)
PY
    stop_server
    return
  fi
  [ "${kind#iapt}" != "$kind" ] && metrics=(--metrics-url "$BASE_URL/metrics")
  case "$kind" in iapt-disk-*) metrics+=(--plan-label disk) ;; esac # both caps serve the same requests
  run_child "$PY" "$HERE/loadgen.py" --base-url "$BASE_URL/v1" --server "$client" --model base --tenants "$tenants" --mix "$mix" \
    --requests "$nreq" --concurrency "$inflight" --prompt-tokens "$prompt" --max-tokens "$gen" --words "$VOCAB" \
    --warmup "$WARMUP" --warmup-tokens "$WARMUP_GEN" --label "$id" --pid "$SERVER_PID" "${metrics[@]}" "${shared[@]}" \
    --out "$OUT/rows/$id.json" >&2 || { stop_server; die "row $id failed (server log: $OUT/logs/$id.server.log)"; }
  stop_server
  python3 - "$OUT/rows/$id.json" "$startup" "$((SECONDS - t0))" <<'PY'
import json, sys
p = sys.argv[1]
d = json.load(open(p))
d["server_startup_s"], d["row_wall_s"] = int(sys.argv[2]), int(sys.argv[3])
json.dump(d, open(p, "w"), indent=1)
PY
}

# Runs `iapt batch` (the arguments after "--"), checks its results, writes the row's JSON (peak RSS:
# the child's ru_maxrss).
BATCH_RUNNER=$(cat <<'PY'
import json, resource, signal, subprocess, sys, time
out, label, n_req, prompt, gen, tenants, mix, par = sys.argv[1:9]
cmd = sys.argv[10:]
t0 = time.perf_counter()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
signal.signal(signal.SIGTERM, lambda *_: (p.terminate(), sys.exit(143)))
_, err = p.communicate()
wall = time.perf_counter() - t0
if p.returncode != 0:
    sys.exit(f"iapt batch exited {p.returncode}:\n{err[-3000:]}")
stats = json.loads(err.strip().splitlines()[-1])
lines = [json.loads(l) for l in open(cmd[cmd.index("--out") + 1])]
if len(lines) != int(n_req):
    sys.exit(f"iapt batch wrote {len(lines)} results for {n_req} requests")
bad = [l for l in lines if not 1 <= l["n_tokens"] <= int(gen) or (l["n_tokens"] < int(gen) and not l["stopped_at_eog"])]
if bad:
    sys.exit(f"iapt batch: wrong token counts: {bad[:3]}")
json.dump({"label": label, "server": "iapt-batch", "tenants": int(tenants), "mix": mix, "concurrency": int(par),
           "prompt_tokens": int(prompt), "max_tokens": int(gen), "stats": stats,
           "output_tokens": sum(l["n_tokens"] for l in lines), "stopped_at_eog": sum(l["stopped_at_eog"] for l in lines),
           "process_wall_s": wall, "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss},
          open(out, "w"), indent=1)
print(f"batch {label}: {json.dumps(stats)}", file=sys.stderr)
PY
)

# run_batch ID TENANTS MIX PARALLEL GEN: `iapt batch` offline on the same kind of prompts.
run_batch() {
  local id=$1 tenants=$2 mix=$3 par=$4 gen=$5 t0=$SECONDS args=() i n
  "$PY" "$HERE/loadgen.py" --emit-jsonl "$OUT/logs/$id.requests.jsonl" --base-url unused --server iapt \
    --tenants "$tenants" --mix "$mix" --requests "$REQUESTS" --prompt-tokens "$PROMPT" --words "$VOCAB" --label "$id" \
    --out /dev/null >&2
  for i in $(seq 0 $((N_ADAPTERS - 1))); do
    n=$(printf %02d "$i")
    args+=(--adapter "t$n=$ADAPTERS/iapt-$n.safetensors")
  done
  run_child python3 -c "$BATCH_RUNNER" "$OUT/rows/$id.json" "$id" "$REQUESTS" "$PROMPT" "$gen" "$tenants" "$mix" "$par" -- "$IAPT_BIN" batch \
    --model "$MODEL" "${args[@]}" --requests "$OUT/logs/$id.requests.jsonl" --out "$OUT/logs/$id.out.jsonl" \
    --parallel "$par" --batch-tokens "$BATCH" --ubatch-size "$UBATCH" --n-predict "$gen" --threads "$THREADS" \
    --ctx-size "$CTX" --temp 0 --json || die "row $id (iapt batch) failed"
  python3 - "$OUT/rows/$id.json" "$((SECONDS - t0))" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["row_wall_s"] = int(sys.argv[2])
json.dump(d, open(sys.argv[1], "w"), indent=1)
PY
}

log "model $MODEL; adapters $ADAPTERS; out $OUT; rows: $ROWS"
while IFS='|' read -r id kind tenants mix inflight gen nreq; do
  id=$(echo "$id" | tr -d ' ')
  case " $ROWS " in *" $id "*) ;; *) continue ;; esac
  # shellcheck disable=SC2086
  run_row "$id" $kind $tenants $mix $inflight $gen $nreq </dev/null
done < <(rows)

# --- llama.cpp alone: its own decode throughput on the same libraries, one and PARALLEL sequences,
# one KV stream per sequence and unified (-kvu): the ceiling of both servers' decode steps ----------
if [ "$smoke" = 0 ]; then
  log "llama-batched-bench (llama.cpp alone): $OUT/llama-batched-bench.txt"
  {
    for kvu in "" "-kvu"; do
      echo "# $LLAMA_BATCHED_BENCH -m MODEL -c $CTX -b $BATCH -ub $UBATCH -npp $PROMPT -ntg $GEN -npl 1,$PARALLEL -t $THREADS -tb $THREADS $kvu"
      # shellcheck disable=SC2086 # $kvu: empty or one flag
      "$LLAMA_BATCHED_BENCH" -m "$MODEL" -c "$CTX" -b "$BATCH" -ub "$UBATCH" -npp "$PROMPT" -ntg "$GEN" -npl "1,$PARALLEL" \
        -t "$THREADS" -tb "$THREADS" $kvu 2>&1 | grep '^|'
    done
  } >"$OUT/llama-batched-bench.txt"
fi

# --- the table ---------------------------------------------------------------------------------
SETTINGS=$(python3 -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:])))' \
  smoke="$smoke" requests="$REQUESTS" requests_serial="$REQUESTS_SERIAL" gen="$GEN" gen_short="$GEN_SHORT" prompt="$PROMPT" warmup="$WARMUP" \
  warmup_gen="$WARMUP_GEN" parallel="$PARALLEL" n_adapters="$N_ADAPTERS" threads="$THREADS" ctx="$CTX" \
  tenants_big="$TENANTS_BIG" parallel_big="$PARALLEL_BIG" requests_big="$REQUESTS_BIG" \
  disk_adapters="$DISK_ADAPTERS" cap_small="$CAP_SMALL" cap_large="$CAP_LARGE" requests_disk="$REQUESTS_DISK" gen_disk="$GEN_DISK" \
  prefix_sys="$PREFIX_SYS" prefix_user="$PREFIX_USER" gen_prefix="$GEN_PREFIX" requests_prefix="$REQUESTS_PREFIX" \
  chat_first="$CHAT_FIRST" chat_user="$CHAT_USER" chat_turns="$CHAT_TURNS" gen_chat="$GEN_CHAT" \
  ctx_per_seq="$CTX_PER_SEQ" batch="$BATCH" ubatch="$UBATCH" model="$MODEL" adapters="$ADAPTERS" iapt_bin="$IAPT_BIN" \
  llama_server="$LLAMA_SERVER" llama_version="$LLAMA_VERSION" llama_src="$LLAMA_SRC" llama_lib="$LLAMA_LIB" rows="$ROWS" \
  wall_s="$(($(date +%s) - T_START))" command="bash bench/tenants/run.sh $*")
strict=()
# Both servers run the same libllama, so on the tiny F32 fixture their greedy tokens must agree; a
# quantized model's batched runs may still differ in a last bit (other batch shapes), so the full
# run only reports it.
if [ "$smoke" = 1 ]; then strict=(--strict-base-agreement); fi
python3 "$HERE/report.py" "$OUT" --settings "$SETTINGS" --expect-rows "$ROWS" "${strict[@]}" >&2
log "done in $(($(date +%s) - T_START)) s: $OUT/table.md, $OUT/results.json"
