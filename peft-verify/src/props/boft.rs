//! BOFT, with one factor and with butterfly factors: identity at PEFT's
//! init, the forward against the oracle, the merged weight against the
//! unmerged forward, the typed merge's unmerge, gradients against finite
//! differences.
use peft_core::boft::{Boft, BoftGrads};
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward, check_base_output};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// `(factors, block)` from the seed: blocks of 2 when `in` is even, with
/// up to as many butterfly factors as PEFT allows (`N` a multiple of
/// `2^(F-1)`); else the largest block up to 3 dividing `in`, one factor.
fn form(c: &LoraCase) -> (usize, usize) {
    if c.n_in % 2 == 1 {
        return (1, (1..=3).rev().find(|b| c.n_in.is_multiple_of(*b)).unwrap_or(1));
    }
    let n = c.n_in / 2;
    let max_m = (0..).take_while(|&m| m == 0 || n.is_multiple_of(1 << m)).last().unwrap_or(0);
    (1 + (c.seed as usize / 3) % (max_m + 1), 2)
}

/// `boft_R` (entries in `[-0.5, 0.5)`) and `boft_s` (in `[0.5, 1.5)`).
fn tensors(c: &LoraCase) -> (Vec<f64>, Vec<f64>) {
    let (f, b) = form(c);
    let mut rng = Rng::new(c.seed);
    let r = (0..f * c.n_in * b).map(|_| rng.uniform_range(-0.5, 0.5)).collect();
    let s = (0..c.n_out).map(|_| rng.uniform_range(0.5, 1.5)).collect();
    (r, s)
}

/// PEFT's `block_butterfly_perm(n, nb, r, m)`, written as PEFT's loop.
fn butterfly_perm(n: usize, nb: usize, r: usize, m: usize) -> Vec<usize> {
    if m == 0 {
        return (0..n).collect();
    }
    let block_size = n / nb;
    let step = block_size / r;
    let seq: Vec<usize> = (0..step).step_by(2).chain((1..step).step_by(2)).collect();
    let mut sorted = vec![0; block_size];
    for (i, pos) in seq.iter().enumerate() {
        sorted[i * r..i * r + r].copy_from_slice(&(pos * r..pos * r + r).collect::<Vec<_>>());
    }
    let mut idx: Vec<usize> = (0..n).collect();
    for start in (0..n).step_by(block_size) {
        let tmp = idx[start..start + block_size].to_vec();
        for (k, &o) in sorted.iter().enumerate() {
            idx[start + k] = tmp[o];
        }
    }
    idx
}

/// `M [in, in]` from PEFT's formulas (`cayley_batch`, `block_diag`,
/// `boft_P`), in f64, without `peft-core`.
fn rotation(n_in: usize, factors: usize, b: usize, r: &[f64]) -> M {
    let nb = n_in / b;
    let eye = |n: usize| M::new(n, n, (0..n * n).map(|k| if k % (n + 1) == 0 { 1.0 } else { 0.0 }).collect());
    let mut total = eye(n_in);
    for f in 0..factors {
        let mut bd = M::zeros(n_in, n_in);
        for k in 0..nb {
            let blk = &r[(f * nb + k) * b * b..][..b * b];
            let mut s = M::zeros(b, b);
            for i in 0..b {
                for j in 0..b {
                    s.d[i * b + j] = 0.5 * (blk[i * b + j] - blk[j * b + i]);
                }
            }
            let q = eye(b).add(&s.scale(-1.0)).mul(&oracle::inverse(&eye(b).add(&s)));
            for i in 0..b {
                for j in 0..b {
                    bd.d[(k * b + i) * n_in + k * b + j] = q.d[i * b + j];
                }
            }
        }
        let perm = butterfly_perm(n_in, nb >> f, b / 2, factors - 1);
        let mut p = M::zeros(n_in, n_in);
        for (j, &pj) in perm.iter().enumerate() {
            p.d[j * n_in + pj] = 1.0;
        }
        let mf = p.mul(&bd).mul_t(&p);
        total = mf.mul(&total);
    }
    total
}

/// The frozen base over the case's weight and bias.
fn base_of<'t, E: Precision>(c: &LoraCase, t: &'t Tensors<E>) -> Result<Dense<'t, E>, TestCaseError> {
    let d = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
    match &t.bias {
        Some(b) => d.with_bias(b).map_err(fail),
        None => Ok(d),
    }
}

/// `y = (x M W^T) * s + b` in f64.
fn oracle_y(c: &LoraCase, x: &M, w: &M, m: &M, s: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let h = x.mul(m).mul_t(w);
    (0..c.t * c.n_out).map(|i| h.d[i] * s[i % c.n_out] + bias.map_or(0.0, |b| b[i % c.n_out])).collect()
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    // The layer over its tensors in `E`, and the tensors widened back.
    type Layer<E> = (Boft<E, Vec<E>>, Vec<f64>, Vec<f64>);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let (f, b) = form(c);
        let (r, s) = tensors(c);
        let (r, s): (Vec<E>, Vec<E>) = (narrow(&r), narrow(&s));
        let (rw, sw) = (wide(&r), wide(&s));
        Ok((Boft::new(f, b, c.n_in, c.n_out, r, s).map_err(fail)?, rw, sw))
    };
    let bias_of = |t: &Tensors<E>| t.bias.as_ref().map(|b| wide(b)).unwrap_or_default();
    // |x| |M| |W|^T |s| + |b|, and a rounding count for the factors' solves and products.
    let mag = |c: &LoraCase, x: &M, w: &M, m: &M, s: &[f64], bias: &[f64]| -> Vec<f64> {
        let h = x.abs().mul(&m.abs()).mul_t(&w.abs());
        (0..c.t * c.n_out)
            .map(|i| h.d[i] * s[i % c.n_out].abs() + bias.get(i % c.n_out).map_or(0.0, |b| b.abs()))
            .collect()
    };
    let count = |c: &LoraCase| {
        let (f, b) = form(c);
        f * (8 * b * b * b + 8) + c.n_in + 8
    };

    run(report, config, "boft_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (f, b) = form(&c);
        let l = Boft::new(f, b, c.n_in, c.n_out, vec![E::ZERO; f * c.n_in * b], vec![E::from_f64(1.0); c.n_out])
            .map_err(fail)?;
        let d = base_of(&c, &t)?;
        check_base_output(backend, &l, &d, &t.x, c.t)
    });

    run(report, config, "boft_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, r, s) = layer(&c)?;
        let y = adapter_forward(backend, &l, &base_of(&c, &t)?, &t.x, c.t)?;
        let (f, b) = form(&c);
        let m = rotation(c.n_in, f, b, &r);
        let (x, w, bias) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)), bias_of(&t));
        let want = oracle_y(&c, &x, &w, &m, &s, t.bias.as_ref().map(|_| &bias[..]));
        close::<E>("y", &wide(&y), &want, &mag(&c, &x, &w, &m, &s, &bias), count(&c))
    });

    run(report, config, "boft_merged_equals_unmerged", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, r, s) = layer(&c)?;
        let d = base_of(&c, &t)?;
        let y = adapter_forward(backend, &l, &d, &t.x, c.t)?;
        let mut w = t.w.clone();
        let mut backup = vec![E::ZERO; w.len()];
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.n_out)];
        let guard = l.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut sc).map_err(fail)?;
        // BOFT leaves the bias as it is: the merged layer is the merged weight and the same bias.
        let merged = guard.weight().to_vec();
        drop(guard);
        let md = Dense::new(&merged, c.n_out, c.n_in).map_err(fail)?;
        let md = match &t.bias {
            Some(b) => md.with_bias(b).map_err(fail)?,
            None => md,
        };
        let ym = base_forward(backend, &md, &t.x, c.t)?;
        let (f, b) = form(&c);
        let m = rotation(c.n_in, f, b, &r);
        let (x, w0, bias) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)), bias_of(&t));
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag(&c, &x, &w0, &m, &s, &bias), 2 * count(&c))
    });

    run(report, config, "boft_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, r, _) = layer(&c)?;
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.n_out)];
        let bits = |v: &[E]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        let (mut w, mut backup) = (t.w.clone(), vec![E::ZERO; t.w.len()]);
        l.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut sc)
            .map_err(fail)?
            .unmerge()
            .map_err(fail)?;
        prop_assert!(bits(&w) == bits(&t.w), "not restored bit for bit from the backup");
        // Without a backup: M and 1 / s undo M^T and s, up to rounding scaled by |W| |M|^T |M| (|s| / |s|).
        l.merge_into(backend, MergeTarget::new(&mut w), &mut sc).map_err(fail)?.unmerge().map_err(fail)?;
        let (f, b) = form(&c);
        let m = rotation(c.n_in, f, b, &r);
        let w0 = M::new(c.n_out, c.n_in, wide(&t.w));
        let m_abs = w0.abs().mul_t(&m.abs()).mul(&m.abs());
        close::<E>("unmerged W", &wide(&w), &wide(&t.w), &m_abs.d, 4 * count(&c))
    });

    run(report, config, "boft_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, r, s) = layer(&c)?;
        let (f, b) = form(&c);
        let d = base_of(&c, &t)?;
        let (mut gr, mut gs) = (vec![E::ZERO; r.len()], vec![E::ZERO; s.len()]);
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gm) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        let grads = BoftGrads { r: &mut gr, s: &mut gs };
        l.backward(backend, &d, xv, gm, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), grads, &mut sc)
            .map_err(fail)?;
        let (w, g, bias) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)), bias_of(&t));
        let bias = t.bias.as_ref().map(|_| &bias[..]);
        let loss = |x: &[f64], r: &[f64], s: &[f64]| {
            let y = oracle_y(&c, &M::new(c.t, c.n_in, x.to_vec()), &w, &rotation(c.n_in, f, b, r), s, bias);
            oracle::dot(&g, &M::new(c.t, c.n_out, y))
        };
        let xw = wide(&t.x);
        let scale = 4.0 * (c.t * c.n_out * c.n_in * b * b * f * 8) as f64;
        let k = c.t + c.n_out + c.n_in + count(&c);
        close_norm::<E>("dR", &wide(&gr), &oracle::grad_fd(&r, 1e-6, |p| loss(&xw, p, &s)), scale, k)?;
        close_norm::<E>("ds", &wide(&gs), &oracle::grad_fd(&s, 1e-6, |p| loss(&xw, &r, p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &r, &s)), scale, k)
    });
}
