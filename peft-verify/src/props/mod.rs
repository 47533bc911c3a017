//! The properties, one module per method (see the table in the crate docs).

pub mod adalora;
pub mod adapter;
pub mod attention;
pub mod boft;
pub mod c3a;
pub mod dora;
pub mod embedding;
pub mod errors;
pub mod fourierft;
pub mod gemm;
pub mod hra;
pub mod ia3;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod miss;
pub mod oft;
pub mod optim;
pub mod prompt;
pub mod randlora;
pub mod road;
pub mod set;
pub mod shira;
pub mod storage;
pub mod trainable_tokens;
pub mod training;
pub mod vblora;
pub mod vera;
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::{Backend, FrozenLinear, MatMut, MatRef};
use proptest::prelude::*;

use crate::{CaseResult, Precision, close, wide};

/// The greatest common divisor (the block sizes the shapes of a case admit).
pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `y = f(x)` through `layer` over `base`, `x` of `t` rows, its scratch
/// sized by the trait; an error is the case's failure.
pub(crate) fn adapter_forward<E: Precision, B: Backend<E>, A: LinearAdapter<E>, L: FrozenLinear<E>>(
    backend: &B,
    layer: &A,
    base: &L,
    x: &[E],
    t: usize,
) -> Result<Vec<E>, TestCaseError> {
    let fail = |e: &dyn core::fmt::Display| TestCaseError::fail(format!("unexpected error: {e}"));
    let (n_in, n_out) = (layer.in_features(), layer.out_features());
    let mut y = vec![E::ZERO; t * n_out];
    let mut sc = vec![E::ZERO; layer.forward_scratch_len(t)];
    let xv = MatRef::new(x, t, n_in).map_err(|e| fail(&e))?;
    let yv = MatMut::new(&mut y, t, n_out).map_err(|e| fail(&e))?;
    layer.forward(backend, base, xv, yv, &mut sc).map_err(|e| fail(&e))?;
    Ok(y)
}

/// `y = x W^T + b` of `base` alone, `x` of `t` rows.
pub(crate) fn base_forward<E: Precision, B: Backend<E>, L: FrozenLinear<E>>(
    backend: &B,
    base: &L,
    x: &[E],
    t: usize,
) -> Result<Vec<E>, TestCaseError> {
    let fail = |e: &dyn core::fmt::Display| TestCaseError::fail(format!("unexpected error: {e}"));
    let (n_in, n_out) = (base.in_features(), base.out_features());
    let mut y = vec![E::ZERO; t * n_out];
    let xv = MatRef::new(x, t, n_in).map_err(|e| fail(&e))?;
    let yv = MatMut::new(&mut y, t, n_out).map_err(|e| fail(&e))?;
    base.forward(backend, xv, yv).map_err(|e| fail(&e))?;
    Ok(y)
}

/// `layer` over `base` gives exactly (bit for bit) the base's own output
/// on `x` of `t` rows: what a method at an identity initialization must
/// do.
pub(crate) fn check_base_output<E: Precision, B: Backend<E>, A: LinearAdapter<E>, L: FrozenLinear<E>>(
    backend: &B,
    layer: &A,
    base: &L,
    x: &[E],
    t: usize,
) -> CaseResult {
    let y = adapter_forward(backend, layer, base, x, t)?;
    let yb = base_forward(backend, base, x, t)?;
    for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
        prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
    }
    Ok(())
}

/// The typed merge ([`WeightUpdate::merge_into`]) of an additive `d` into
/// a copy of `w0`, three ways: with a backup, dropping the guard gives `w0`
/// back bit for bit; without, [`unmerge`](peft_core::method::Merged::unmerge)
/// gives it back within two roundings of `2 |W| + |dW|` (`dmag`: `|dW|` per
/// element, from the oracle); [`keep`](peft_core::method::Merged::keep)
/// leaves the same merged bits as the guard showed.
pub(crate) fn check_delta_guard<E: Precision, B: Backend<E>, D: WeightUpdate<E>>(
    backend: &B,
    d: &D,
    w0: &[E],
    dmag: &[f64],
) -> CaseResult {
    let fail = |e: B::Error| TestCaseError::fail(format!("unexpected error: {e}"));
    let mut sc = vec![E::ZERO; d.update_scratch_len(d.weight_dims().0)];
    let (mut w, mut backup) = (w0.to_vec(), vec![E::ZERO; w0.len()]);
    let merged =
        bits(d.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut sc).map_err(fail)?.weight());
    prop_assert!(bits(&w) == bits(w0), "dropping the guard (with a backup) did not restore W bit for bit");
    let guard = d.merge_into(backend, MergeTarget::new(&mut w), &mut sc).map_err(fail)?;
    prop_assert!(bits(guard.weight()) == merged, "a second merge of the same W differs");
    guard.unmerge().map_err(fail)?;
    let mag: Vec<f64> = w0.iter().zip(dmag).map(|(x, m)| 2.0 * x.to_f64().abs() + m).collect();
    close::<E>("unmerged W", &wide(&w), &wide(w0), &mag, 1)?;
    let mut w = w0.to_vec();
    let kept = d.merge_into(backend, MergeTarget::new(&mut w), &mut sc).map_err(fail)?.keep();
    prop_assert!(bits(kept) == merged, "keep did not leave the merged weight");
    Ok(())
}

/// The bits of each value (widened to f64, exactly): what a bit-for-bit
/// comparison compares.
pub(crate) fn bits<E: Precision>(v: &[E]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// `n` values uniform in `[-1, 1)`.
pub fn vals(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-1.0f64..1.0, n)
}
