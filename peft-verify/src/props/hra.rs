//! HRA, with and without Gram-Schmidt: identity at PEFT's init, the forward
//! against the oracle, the merged weight against the unmerged forward, the
//! typed merge's unmerge, gradients against finite differences.
use peft_core::hra::Hra;
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The case's form (odd seeds: Gram-Schmidt) and rank (at most `in` with
/// Gram-Schmidt).
fn form(c: &LoraCase) -> (bool, usize) {
    let gs = c.seed % 2 == 1;
    (gs, if gs { c.r.min(c.n_in) } else { c.r })
}

/// `U [in, r]` from the seed: entries in `[-1, 1)`, each column shifted
/// away from zero (so no column is degenerate).
fn vectors(c: &LoraCase, r: usize) -> Vec<f64> {
    let mut rng = Rng::new(c.seed);
    (0..c.n_in * r).map(|k| rng.uniform_range(-1.0, 1.0) + if k % (r + 1) == 0 { 2.0 } else { 0.0 }).collect()
}

/// `H [in, in]` from PEFT's formulas, in f64, without `peft-core`.
fn h_matrix(n: usize, r: usize, gs: bool, u: &[f64]) -> M {
    let column = |i: usize| (0..n).map(|k| u[k * r + i]).collect::<Vec<f64>>();
    let unit = |v: Vec<f64>| {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f64>>()
    };
    let mut h = M::new(n, n, (0..n * n).map(|k| if k % (n + 1) == 0 { 1.0 } else { 0.0 }).collect());
    if gs {
        let mut ws: Vec<Vec<f64>> = Vec::new();
        for i in 0..r {
            let mut v = column(i);
            for w in &ws {
                let c: f64 = w.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(w).for_each(|(x, y)| *x -= c * y);
            }
            ws.push(unit(v));
        }
        for a in 0..n {
            for b in 0..n {
                h.d[a * n + b] -= 2.0 * ws.iter().map(|w| w[a] * w[b]).sum::<f64>();
            }
        }
    } else {
        for i in 0..r {
            let u = unit(column(i));
            // H <- H (I - 2 u u^T) = H - 2 (H u) u^T.
            let hu: Vec<f64> = (0..n).map(|a| (0..n).map(|b| h.d[a * n + b] * u[b]).sum()).collect();
            for (row, ha) in h.d.chunks_exact_mut(n).zip(&hu) {
                for (x, ub) in row.iter_mut().zip(&u) {
                    *x -= 2.0 * ha * ub;
                }
            }
        }
    }
    h
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    // The layer over `U` in `E`, and `U` widened back (what the oracle reads).
    type Layer<E> = (Hra<E, Vec<E>>, Vec<f64>);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let (gs, r) = form(c);
        let u: Vec<E> = narrow(&vectors(c, r));
        let uw = wide(&u);
        Ok((Hra::new(r, c.n_in, c.n_out, gs, u).map_err(fail)?, uw))
    };
    // |x| |W0| scaled: an orthogonal H keeps norms, so each output is bounded by ||x|| ||w_row||.
    let bound = |c: &LoraCase, x: &M, w: &M| -> Vec<f64> {
        let xn: Vec<f64> = (0..c.t).map(|t| (0..c.n_in).map(|k| x.at(t, k).powi(2)).sum::<f64>().sqrt()).collect();
        let wn: Vec<f64> = (0..c.n_out).map(|o| (0..c.n_in).map(|k| w.at(o, k).powi(2)).sum::<f64>().sqrt()).collect();
        (0..c.t * c.n_out).map(|i| xn[i / c.n_out] * wn[i % c.n_out] * (c.n_in as f64).sqrt()).collect()
    };

    run(report, config, "hra_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        // PEFT's init with an even rank, without Gram-Schmidt (with it, PEFT's pairs divide by zero).
        let r = 2 * c.r.div_ceil(2);
        let mut l = Hra::new(r, c.n_in, c.n_out, false, vec![E::ZERO; c.n_in * r]).map_err(fail)?;
        l.init_adapter(&mut Rng::new(c.seed ^ 1));
        prop_assume!(l.vectors().chunks(r).any(|row| row.iter().any(|v| v.to_f64() != 0.0)));
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = adapter_forward(backend, &l, &base, &t.x, c.t)?;
        let yb = base_forward(backend, &base, &t.x, c.t)?;
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        // Pairs of equal reflections cancel up to the rounding of each step.
        close::<E>("y at init", &wide(&y), &wide(&yb), &bound(&c, &x, &w), 4 * r + c.n_in + 4)
    });

    run(report, config, "hra_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, u) = layer(&c)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (gs, r) = form(&c);
        let h = h_matrix(c.n_in, r, gs, &u);
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul_t(&w.mul(&h));
        close::<E>("y", &wide(&y), &want.d, &bound(&c, &x, &w), 4 * r * r + c.n_in + 4)
    });

    run(report, config, "hra_merged_equals_unmerged", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, _) = layer(&c)?;
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
        let (x, wm) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let r = form(&c).1;
        close::<E>("merged y", &wide(&ym), &wide(&y), &bound(&c, &x, &wm), 8 * r * r + 2 * c.n_in + 4)
    });

    run(report, config, "hra_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, _) = layer(&c)?;
        let r = form(&c).1;
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.n_out)];
        let bits = |v: &[E]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        let (mut w, mut backup) = (t.w.clone(), vec![E::ZERO; t.w.len()]);
        l.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut sc)
            .map_err(fail)?
            .unmerge()
            .map_err(fail)?;
        prop_assert!(bits(&w) == bits(&t.w), "not restored bit for bit from the backup");
        // Without a backup: H^T undoes H up to rounding (each row keeps its norm).
        l.merge_into(backend, MergeTarget::new(&mut w), &mut sc).map_err(fail)?.unmerge().map_err(fail)?;
        let wm = M::new(c.n_out, c.n_in, wide(&t.w));
        let mag: Vec<f64> = (0..c.n_out * c.n_in)
            .map(|i| (0..c.n_in).map(|k| wm.at(i / c.n_in, k).powi(2)).sum::<f64>().sqrt())
            .collect();
        close::<E>("unmerged W", &wide(&w), &wide(&t.w), &mag, 8 * r * r + 4)
    });

    run(report, config, "hra_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, u) = layer(&c)?;
        let (gs, r) = form(&c);
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut gu = vec![E::ZERO; u.len()];
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gv) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        l.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), &mut gu, &mut sc)
            .map_err(fail)?;
        let (w, gm) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], u: &[f64]| {
            let h = h_matrix(c.n_in, r, gs, u);
            oracle::dot(&gm, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.mul(&h)))
        };
        let xw = wide(&t.x);
        let scale = 4.0 * (c.t * c.n_out * c.n_in * (r + 1) * (r + 1)) as f64;
        let k = c.t + c.n_out + 2 * c.n_in + 4 * r * r;
        close_norm::<E>("dU", &wide(&gu), &oracle::grad_fd(&u, 1e-6, |p| loss(&xw, p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &u)), scale, k)
    });
}
