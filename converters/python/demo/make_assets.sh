#!/usr/bin/env bash
# Regenerates the Rust-side demo assets from the committed PyTorch outputs and measures the
# accuracy table of EVAL.md.
#
#   converters/python/demo/make_assets.sh          # assets, then the table
#   converters/python/demo/make_assets.sh assets   # only the quantized bases and the adapter GGUF
#   converters/python/demo/make_assets.sh table    # only the table (Markdown on stdout)
#
# Inputs (committed, made by train_demo.py): assets/base-f16.gguf, assets/adapter_model.bin,
# assets/adapter_config.json, assets/held_out.jsonl, assets/prompt_format.json, ../RESULTS.md.
# Outputs (committed): assets/base-q8_0.gguf, assets/base-q4_k_m.gguf, assets/adapter.iapt.gguf.
#
# The iapt binary is `cargo run --release -p iapt --` unless IAPT names another command, e.g.
#   IAPT=target/debug/iapt converters/python/demo/make_assets.sh
# (llama.cpp is built optimised in both cargo profiles, so a debug iapt measures the same numbers.)
# THREADS (default 1) is passed to every command: the results do not depend on it, but on a busy
# machine more llama.cpp threads than free cores make the evaluation much slower.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
cd "$root"
A=converters/python/demo/assets
THREADS="${THREADS:-1}"
read -r -a IAPT_CMD <<<"${IAPT:-cargo run --release -q -p iapt --}"
iapt() { "${IAPT_CMD[@]}" "$@"; }

make_assets() {
    iapt quantize "$A/base-f16.gguf" -o "$A/base-q8_0.gguf" --type q8_0 --threads "$THREADS"
    # Every weight matrix has rows of 256 or 512 values, so the K-quants apply (no fallback types;
    # `iapt quantize` warns if a tensor's rows are not a multiple of 256).
    iapt quantize "$A/base-f16.gguf" -o "$A/base-q4_k_m.gguf" --type q4_k_m --threads "$THREADS"
    iapt convert "$A/adapter_model.bin" --config "$A/adapter_config.json" --base "$A/base-f16.gguf" -o "$A/adapter.iapt.gguf"
    iapt validate "$A/adapter.iapt.gguf" >/dev/null
}

# "base + IAPT adapter:   96.0% (288/300)" -> "96.0% (288/300)"
score() { sed -n "s/^$1: *\\(.*\\)\$/\\1/p"; }

# One table row: runtime label, model file.
row() {
    local out
    out="$(iapt eval --model "$A/$2" --adapter "$A/adapter.iapt.gguf" --data "$A/held_out.jsonl" --no-adapter-too \
        --threads "$THREADS" --ctx-size 128 2>/dev/null)"
    echo "| $1 | $(score 'base without adapter' <<<"$out") | $(score 'base + IAPT adapter' <<<"$out") | $(score 'lift' <<<"$out") |"
}

table() {
    local n pt_base pt_iapt
    n="$(grep -c . "$A/held_out.jsonl")"
    pt_base="$(sed -n 's/^| base without adapter (PyTorch f32) | \(.*\) |$/\1/p' converters/python/demo/RESULTS.md)"
    pt_iapt="$(sed -n 's/^| base + IAPT adapter (PyTorch f32) | \(.*\) |$/\1/p' converters/python/demo/RESULTS.md)"
    echo "Held-out set: \`assets/held_out.jsonl\`, all $n examples; greedy; exact match after strip (\`assets/prompt_format.json\`)."
    echo
    echo "| runtime, base weights | base without adapter | base + IAPT adapter | lift |"
    echo "|---|---|---|---|"
    local pt_lift
    pt_lift="$(awk -v a="${pt_base%\%}" -v b="${pt_iapt%\%}" 'BEGIN { if (a != "" && b != "") printf "%+.1f points", b - a }')"
    echo "| PyTorch, f32 (from RESULTS.md) | ${pt_base:-?} | ${pt_iapt:-?} | $pt_lift |"
    row "llama.cpp, F16 (\`base-f16.gguf\`)" base-f16.gguf
    row "llama.cpp, Q8_0 (\`base-q8_0.gguf\`)" base-q8_0.gguf
    row "llama.cpp, Q4_K_M (\`base-q4_k_m.gguf\`)" base-q4_k_m.gguf
}

case "${1:-all}" in
    assets) make_assets ;;
    table) table ;;
    all)
        make_assets
        table
        ;;
    *)
        echo "usage: $0 [assets|table|all]" >&2
        exit 2
        ;;
esac
