#!/usr/bin/env bash
# The mutation check of the conformance suite: each mutant below is one
# deliberate bug in `peft-core`, applied alone to a scratch copy of the
# workspace; the suite (`cargo test -p peft-verify --test suite`) must fail,
# and the property that failed is printed next to the mutant.
#
#   peft-verify/mutants.sh            # every mutant
#   peft-verify/mutants.sh adamw      # the mutants whose name contains "adamw"
#
# Prints one line per mutant (`killed by <properties>` or `SURVIVED`) and
# the kill rate; exits 1 if any mutant survived. It does not run in CI
# (about a minute per mutant on 2 cores); its last result is in
# peft-verify's crate docs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
filter=${1:-}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# One target directory for every mutant: only peft-core and its dependents
# rebuild between them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/mutants}"

# name | file (under peft-core/src) | perl substitution applied to it
mutants=(
  "gemm_kc_edge_off_by_one|backend/reference.rs|s/let kc = KC\.min\(k - p0\);/let kc = KC.min(k - p0).saturating_sub(usize::from(p0 > 0));/"
  "adamw_no_bias_correction|optim.rs|s/let bc1 = 1\.0 - libm::pow\(self\.beta1, f64::from\(t_exp\)\);/let bc1 = 1.0;/; s/let bc2 = 1\.0 - libm::pow\(self\.beta2, f64::from\(t_exp\)\);/let bc2 = 1.0;/"
  "adamw_no_weight_decay|optim.rs|s/let decay = f\(if s\.decay \{ 1\.0 - self\.lr \* self\.weight_decay \} else \{ 1\.0 \}\);/let decay = f(1.0);/"
  "adamw_coupled_weight_decay|optim.rs|s/let decay = f\(if s\.decay \{ 1\.0 - self\.lr \* self\.weight_decay \} else \{ 1\.0 \}\);/let decay = f(1.0); let wdc = f(if s.decay { self.weight_decay } else { 0.0 });/; s/let g = cc \* g\.to_accum\(\);/let g = cc * g.to_accum() + wdc * p.to_accum();/"
  "nonfinite_gradient_applied|optim.rs|s/if !g\.is_finite\(\) \{/if false {/; s/if !norm\.is_finite\(\) \{/if false {/"
  "nonfinite_loss_applied|optim.rs|s/if !l\.is_finite\(\) \{/if false {/"
  "sgd_momentum_dropped|optim.rs|s/\*v = mu \* \*v \+ g2;/*v = g2;/"
  "lora_b_random_at_init|lora/layer.rs|s/self\.b\.as_mut\(\)\.fill\(E::ZERO\);/rng.fill_normal(self.b.as_mut(), 0.1);/"
  "lora_scale_on_base_too|lora/forward.rs|s/base\.forward\(backend, x, y\.rb_mut\(\)\)\?;/base.forward(backend, x, y.rb_mut())?; for row in y.row_iter_mut() { for v in row.iter_mut() { *v = E::from_accum(v.to_accum() * self.scale_accum()); } }/"
  "lora_merge_forgets_scale|lora/merge.rs|s/from_f64\(factor \* self\.scale\)/from_f64(factor)/"
  "lora_grad_b_transposed_scale|lora/backward.rs|s/backend\.gemm\(gb, Accum::Add, grad_y, Op::T, t\.as_ref\(\), Op::N, s\)\?;/backend.gemm(gb, Accum::Add, grad_y, Op::T, t.as_ref(), Op::N, one)?;/"
  "adapter_residual_dropped|adapter/forward.rs|s/\*hv = if branch == E::Accum::ZERO \{ xv \} else \{ E::from_accum\(xv\.to_accum\(\) \+ branch\) \};/*hv = E::from_accum(branch);/"
  "prefix_hidden_from_early_queries|attention/mod.rs|s/let structural = j < p \|\| \{/let structural = (j < p \&\& j <= i) || {/"
)

killed=0
total=0
for m in "${mutants[@]}"; do
  IFS='|' read -r name file expr <<<"$m"
  [[ -n "$filter" && "$name" != *"$filter"* ]] && continue
  total=$((total + 1))
  rm -rf "$scratch/ws"
  mkdir -p "$scratch/ws"
  (cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$scratch/ws")
  target="$scratch/ws/peft-core/src/$file"
  before=$(md5sum "$target")
  perl -0pi -e "$expr" "$target"
  if [[ "$(md5sum "$target")" == "$before" ]]; then
    echo "$name: NOT APPLIED (the code it mutates has changed; update this script)"
    continue
  fi
  out=$(cd "$scratch/ws" && cargo test -q -p peft-verify --test suite 2>&1 || true)
  props=$(grep -oE '^[a-z0-9_]+ \((f32|f64|f16|bf16|-)\):' <<<"$out" | cut -d' ' -f1 | sort -u | paste -sd, - || true)
  if grep -q "test result: FAILED" <<<"$out"; then
    killed=$((killed + 1))
    echo "$name: killed by ${props:-a failing test of the suite}"
  elif grep -q "test result: ok" <<<"$out"; then
    echo "$name: SURVIVED"
  else
    echo "$name: did not build"
    grep -E '^error' <<<"$out" | head -3
  fi
done
echo "killed $killed of $total mutants"
[[ "$killed" == "$total" ]]
