#!/usr/bin/env bash
# `peft merge` on a synthetic 1 GiB f16 sharded checkpoint (generated, not
# committed): peak resident memory against the largest tensor (32 MiB), and
# speed against copying the same files. Needs GNU time (/usr/bin/time).
#   benches/merge_1gib.sh [SCRATCH_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-$(mktemp -d)}
cargo build --release -q -p peft-faer --bin peft --example gen_sharded_base
target/release/examples/gen_sharded_base "$dir" 1
rm -rf "$dir/merged" "$dir/copy"
sync
measure() { # prints "seconds max_rss_kib"
    /usr/bin/time -f '%e %M' "$@" 2>&1 >/dev/null | tail -1
}
read -r base_s base_kib < <(measure target/release/peft inspect "$dir/adapter")
read -r merge_s merge_kib < <(measure target/release/peft merge --base "$dir/base" --adapter "$dir/adapter" --out "$dir/merged")
read -r copy_s _ < <(measure cp -r "$dir/base" "$dir/copy")
largest_kib=$((4096 * 4096 * 2 / 1024))
awk -v ms="$merge_s" -v cs="$copy_s" -v mk="$merge_kib" -v bk="$base_kib" -v lk="$largest_kib" 'BEGIN {
    printf "merge %.2f s, cp %.2f s: merge runs at %.2f of copy speed (target >= 0.5)\n", ms, cs, cs / ms
    printf "peak RSS %d KiB; peft inspect of the adapter alone %d KiB; extra %d KiB = %.2f x the largest tensor (target < 1.5)\n", mk, bk, mk - bk, (mk - bk) / lk
}'
rm -rf "$dir/merged" "$dir/copy"
