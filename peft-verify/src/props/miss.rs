//! MiSS, each of its three variants: identity at init, the forward against
//! the oracle, the merged weight against the unmerged forward, the typed
//! merge's unmerge (bat: from a backup only), gradients against finite
//! differences.
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::miss::{Miss, MissVariant};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward, gcd};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The case's variant and shard size, from its seed: balance with `r <=
/// in`; mini with `mini_r` the largest divisor of `out` up to 3; bat with `r`
/// the largest common divisor of `in` and `out` up to 4.
fn variant(c: &LoraCase) -> (MissVariant, usize) {
    let r = c.r.min(c.n_in).max(1);
    match c.seed % 3 {
        0 => (MissVariant::Balance, r),
        1 => (
            (1..=3)
                .rev()
                .find(|m| c.n_out.is_multiple_of(*m))
                .map_or(MissVariant::Balance, |m| MissVariant::Mini { mini_r: m }),
            r,
        ),
        _ => (MissVariant::Bat, (1..=4).rev().find(|k| gcd(c.n_in, c.n_out).is_multiple_of(*k)).unwrap_or(1)),
    }
}

/// `D` in `[-1, 1)` from the seed, of the variant's length.
fn block(c: &LoraCase, v: MissVariant, r: usize) -> Vec<f64> {
    let len = match v {
        MissVariant::Balance => r * c.n_out,
        MissVariant::Mini { mini_r } => r * mini_r,
        MissVariant::Bat => c.n_out * r,
    };
    let mut rng = Rng::new(c.seed);
    (0..len).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
}

/// `dW` and its magnitude from `D` and `W`, written from PEFT's formulas
/// without `peft-core`.
fn delta(c: &LoraCase, v: MissVariant, r: usize, d: &[f64], w: &[f64]) -> (M, M) {
    let (o, i) = (c.n_out, c.n_in);
    let (mut dw, mut dm) = (vec![0.0; o * i], vec![0.0; o * i]);
    for row in 0..o {
        for col in 0..i {
            let at = row * i + col;
            match v {
                MissVariant::Balance => (dw[at], dm[at]) = (d[(col % r) * o + row], d[(col % r) * o + row].abs()),
                MissVariant::Mini { mini_r } => {
                    let x = d[(col % r) * mini_r + row % mini_r];
                    (dw[at], dm[at]) = (x, x.abs());
                }
                MissVariant::Bat => {
                    // dW_{a,c} = W_{a,c} D[a] + D[a]: row (a r + p), column (c r + q).
                    let (a, p, cb, q) = (row / r, row % r, col / r, col % r);
                    let da = |k: usize, l: usize| d[a * r * r + k * r + l];
                    let mut sum = da(p, q);
                    let mut mag = da(p, q).abs();
                    for k in 0..r {
                        let wv = w[row * i + cb * r + k];
                        sum += wv * da(k, q);
                        mag += (wv * da(k, q)).abs();
                    }
                    (dw[at], dm[at]) = (sum, mag);
                }
            }
        }
    }
    (M::new(o, i, dw), M::new(o, i, dm))
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    // The layer over `D` in `E`, and `D` widened back (what the oracle reads).
    type Layer<E> = (Miss<E, Vec<E>>, Vec<f64>);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let (v, r) = variant(c);
        let d: Vec<E> = narrow(&block(c, v, r));
        let dw = wide(&d);
        Ok((Miss::new(v, r, c.n_in, c.n_out, d).map_err(fail)?, dw))
    };

    run(report, config, "miss_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mut l, _) = layer(&c)?;
        l.init_adapter();
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = adapter_forward(backend, &l, &base, &t.x, c.t)?;
        let yb = base_forward(backend, &base, &t.x, c.t)?;
        // D = 0: the added terms are sums of zeros (-0 aside).
        for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?} ({:?})", i, got, want, l.variant());
        }
        Ok(())
    });

    run(report, config, "miss_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, d) = layer(&c)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (v, r) = variant(&c);
        let (dw, dm) = delta(&c, v, r, &d, &wide(&t.w));
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(2.0);
        close::<E>("y", &wide(&y), &x.mul_t(&w.add(&dw)).d, &mag.d, 2 * c.n_in + 2 * r + 4)
    });

    run(report, config, "miss_merged_equals_unmerged", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, d) = layer(&c)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let mut w = t.w.clone();
        let mut backup = vec![E::ZERO; w.len()];
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.n_out)];
        let guard = l.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut sc).map_err(fail)?;
        let mut ym = vec![E::ZERO; c.t * c.n_out];
        let (xv, yv) =
            (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatMut::new(&mut ym, c.t, c.n_out).map_err(fail)?);
        guard.forward(xv, yv).map_err(fail)?;
        drop(guard);
        let (v, r) = variant(&c);
        let (_, dm) = delta(&c, v, r, &d, &wide(&t.w));
        let (x, wm) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let mag = x.abs().mul_t(&wm.abs().add(&dm)).scale(3.0);
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.d, 2 * c.n_in + 2 * r + 4)
    });

    run(report, config, "miss_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, d) = layer(&c)?;
        let (v, r) = variant(&c);
        if v != MissVariant::Bat {
            let (_, dm) = delta(&c, v, r, &d, &wide(&t.w));
            return super::check_delta_guard(backend, &l, &t.w, &dm.d);
        }
        // Bat: restored bit for bit from a backup; without one, refused with W untouched.
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.n_out)];
        let (mut w, mut backup) = (t.w.clone(), vec![E::ZERO; t.w.len()]);
        l.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut sc)
            .map_err(fail)?
            .unmerge()
            .map_err(fail)?;
        let bits = |v: &[E]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        prop_assert!(bits(&w) == bits(&t.w), "bat: not restored from the backup");
        prop_assert!(l.merge_into(backend, MergeTarget::new(&mut w), &mut sc).is_err(), "bat merged without a backup");
        prop_assert!(bits(&w) == bits(&t.w), "bat: a refused merge changed W");
        Ok(())
    });

    run(report, config, "miss_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, d) = layer(&c)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut gd = vec![E::ZERO; d.len()];
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gv) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        l.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), &mut gd, &mut sc)
            .map_err(fail)?;
        let (v, r) = variant(&c);
        let (ww, gm) = (wide(&t.w), M::new(c.t, c.n_out, wide(&t.g)));
        let w = M::new(c.n_out, c.n_in, ww.clone());
        let loss = |x: &[f64], d: &[f64]| {
            let (dw, _) = delta(&c, v, r, d, &ww);
            oracle::dot(&gm, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.add(&dw)))
        };
        let xw = wide(&t.x);
        let scale = 2.0 * (c.t * c.n_out * c.n_in * (r + 1)) as f64;
        let k = c.t + c.n_out + 2 * c.n_in + 2 * r;
        close_norm::<E>("dD", &wide(&gd), &oracle::grad_fd(&d, 1e-6, |p| loss(&xw, p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &d)), scale, k)
    });
}
