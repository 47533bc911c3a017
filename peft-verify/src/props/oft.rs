//! OFT, in its forms (the Cayley-Neumann series of 1 to 6 terms, the exact
//! Cayley transform, one shared block, COFT's projection): identity at
//! PEFT's init, the forward against the oracle, the merged weight against
//! the unmerged forward, the typed merge's unmerge, gradients against
//! finite differences.
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::oft::{Cayley, Oft, OftSpec};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, check_base_output};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The case's settings from its seed: the largest block up to 4 dividing
/// `in`; seed mod 4 picks the series (1 to 6 terms), the exact transform,
/// a shared block (5 terms) or COFT (`eps` 0.3, the series).
fn spec(c: &LoraCase) -> OftSpec {
    let block = (1..=4).rev().find(|b| c.n_in.is_multiple_of(*b)).unwrap_or(1);
    let terms = 1 + (c.seed / 4 % 6) as usize;
    let neumann = Cayley::Neumann { terms };
    match c.seed % 4 {
        0 => OftSpec { block, shared: false, cayley: neumann, coft_eps: None },
        1 => OftSpec { block, shared: false, cayley: Cayley::Exact, coft_eps: None },
        2 => OftSpec { block, shared: true, cayley: Cayley::Neumann { terms: 5 }, coft_eps: None },
        _ => OftSpec { block, shared: false, cayley: neumann, coft_eps: Some(0.3) },
    }
}

/// Stored blocks and one block's vector length.
fn dims(c: &LoraCase, s: &OftSpec) -> (usize, usize) {
    (if s.shared { 1 } else { c.n_in / s.block }, s.block * (s.block - 1) / 2)
}

/// `oft_R` from the seed, entries in `[-0.4, 0.4)`.
fn vectors(c: &LoraCase, s: &OftSpec) -> Vec<f64> {
    let (rs, n) = dims(c, s);
    let mut rng = Rng::new(c.seed);
    (0..rs * n).map(|_| rng.uniform_range(-0.4, 0.4)).collect()
}

/// `R_bd [in, in]` from PEFT's formulas (`_pytorch_skew_symmetric`,
/// `_project_batch`, `_cayley_batch`, `_block_diagonal`), in f64, without
/// `peft-core`.
fn rotation(n_in: usize, s: &OftSpec, v: &[f64]) -> M {
    let b = s.block;
    let nb = n_in / b;
    let (rs, n_el) = (if s.shared { 1 } else { nb }, b * (b - 1) / 2);
    let eye = |n: usize| M::new(n, n, (0..n * n).map(|k| if k % (n + 1) == 0 { 1.0 } else { 0.0 }).collect());
    let mut out = M::zeros(n_in, n_in);
    for k in 0..nb {
        let vk = &v[(if s.shared { 0 } else { k }) * n_el..][..n_el];
        let mut q = M::zeros(b, b);
        let mut idx = 0;
        for i in 0..b {
            for j in i + 1..b {
                q.d[i * b + j] = vk[idx];
                q.d[j * b + i] = -vk[idx];
                idx += 1;
            }
        }
        if let Some(eps) = s.coft_eps {
            let eps = eps / (rs as f64).sqrt();
            let norm = q.d.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > eps {
                q = q.scale(eps / norm);
            }
        }
        let r = match s.cayley {
            Cayley::Exact => eye(b).add(&q.scale(-1.0)).mul(&oracle::inverse(&eye(b).add(&q))),
            Cayley::Neumann { terms } => {
                // PEFT's loop: I, += 2Q, += 2Q^2, += 2Q^p for p = 3 .. terms - 2, += Q^(last + 1).
                let mut r = eye(b);
                if terms > 1 {
                    r = r.add(&q.scale(2.0));
                    if terms > 2 {
                        let mut p = q.mul(&q);
                        r = r.add(&p.scale(2.0));
                        for _ in 3..terms.saturating_sub(1) {
                            p = p.mul(&q);
                            r = r.add(&p.scale(2.0));
                        }
                        r = r.add(&p.mul(&q));
                    }
                }
                r
            }
        };
        for i in 0..b {
            for j in 0..b {
                out.d[(k * b + i) * n_in + k * b + j] = r.d[i * b + j];
            }
        }
    }
    out
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    // The layer over `oft_R` in `E`, and `oft_R` widened back (what the oracle reads).
    type Layer<E> = (Oft<E, Vec<E>>, Vec<f64>);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let s = spec(c);
        let v: Vec<E> = narrow(&vectors(c, &s));
        let vw = wide(&v);
        Ok((Oft::new(s, c.n_in, c.n_out, v).map_err(fail)?, vw))
    };
    // |x| |R_bd| |W0|^T: each output's magnitude, and a rounding count for the series' products.
    let bound = |x: &M, r: &M, w: &M| x.abs().mul(&r.abs()).mul_t(&w.abs()).d;
    let count = |c: &LoraCase| {
        let s = spec(c);
        4 * s.block * s.block * (s.block + 8) + c.n_in + 8
    };

    run(report, config, "oft_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mut l, _) = layer(&c)?;
        l.init_adapter();
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        check_base_output(backend, &l, &base, &t.x, c.t)
    });

    run(report, config, "oft_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, v) = layer(&c)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let r = rotation(c.n_in, &spec(&c), &v);
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul(&r).mul_t(&w);
        close::<E>("y", &wide(&y), &want.d, &bound(&x, &r, &w), count(&c))
    });

    run(report, config, "oft_merged_equals_unmerged", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, v) = layer(&c)?;
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
        let r = rotation(c.n_in, &spec(&c), &v);
        let (x, w0) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        close::<E>("merged y", &wide(&ym), &wide(&y), &bound(&x, &r, &w0), 2 * count(&c))
    });

    run(report, config, "oft_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, v) = layer(&c)?;
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.n_out)];
        let bits = |v: &[E]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        let (mut w, mut backup) = (t.w.clone(), vec![E::ZERO; t.w.len()]);
        l.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut sc)
            .map_err(fail)?
            .unmerge()
            .map_err(fail)?;
        prop_assert!(bits(&w) == bits(&t.w), "not restored bit for bit from the backup");
        // Without a backup: each block's inverse undoes it, up to rounding scaled by |W| |R^T| |R^-T|.
        l.merge_into(backend, MergeTarget::new(&mut w), &mut sc).map_err(fail)?.unmerge().map_err(fail)?;
        let r = rotation(c.n_in, &spec(&c), &v);
        let w0 = M::new(c.n_out, c.n_in, wide(&t.w));
        let mag = w0.abs().mul_t(&r.abs()).mul_t(&oracle::inverse(&r).abs()).d;
        close::<E>("unmerged W", &wide(&w), &wide(&t.w), &mag, 4 * count(&c))
    });

    run(report, config, "oft_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, v) = layer(&c)?;
        let s = spec(&c);
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut gv = vec![E::ZERO; v.len()];
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gm) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        l.backward(backend, &base, xv, gm, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), &mut gv, &mut sc)
            .map_err(fail)?;
        let (w, g) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        // COFT's projection is outside the gradient (PEFT's no_grad copy): differentiate at the projected vector.
        let v0 = project(&c, &s, &v);
        let plain = OftSpec { coft_eps: None, ..s };
        let loss = |x: &[f64], v: &[f64]| {
            oracle::dot(&g, &M::new(c.t, c.n_in, x.to_vec()).mul(&rotation(c.n_in, &plain, v)).mul_t(&w))
        };
        let xw = wide(&t.x);
        let scale = 4.0 * (c.t * c.n_out * c.n_in * s.block * s.block * 8) as f64;
        let k = c.t + c.n_out + c.n_in + count(&c);
        close_norm::<E>("dv", &wide(&gv), &oracle::grad_fd(&v0, 1e-6, |p| loss(&xw, p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &v0)), scale, k)
    });
}

/// COFT's projection of each stored block's vector (PEFT's
/// `_project_batch`): scaled onto the ball `||Q||_F <= eps / sqrt(r_s)`.
fn project(c: &LoraCase, s: &OftSpec, v: &[f64]) -> Vec<f64> {
    let (rs, n) = dims(c, s);
    let Some(eps) = s.coft_eps else { return v.to_vec() };
    let eps = eps / (rs as f64).sqrt();
    v.chunks(n.max(1))
        .flat_map(|blk| {
            let norm = (2.0 * blk.iter().map(|x| x * x).sum::<f64>()).sqrt();
            let f = if norm <= eps { 1.0 } else { eps / norm };
            blk.iter().map(move |x| x * f).collect::<Vec<_>>()
        })
        .collect()
}
