//! RandLoRA: identity at PEFT's init, the forward against the oracle (PEFT's
//! `get_scaled_bases` written out, its index pairing included), the merged
//! weight against the unmerged forward, the typed merge's unmerge,
//! gradients against finite differences.
use peft_core::method::LinearAdapter;
use peft_core::randlora::{RandLora, RandLoraBases, RandLoraGrads};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward, check_base_output, check_delta_guard};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The case's shapes: rank `r` (the case's, at most 4), bases one larger
/// than the layer on every side (they serve the largest targeted layer),
/// `(r, min_dim, max_dim, n_b, nb)`.
fn shape(c: &LoraCase) -> (usize, usize, usize, usize, usize) {
    let r = c.r.min(4);
    let (mn, mx) = (c.n_in.min(c.n_out), c.n_in.max(c.n_out));
    let nb = mn.div_ceil(r);
    (r, mn + 1, mx + 1, nb + 1, nb)
}

/// Bases `A`, `B`, and `lambda`, `gamma` from the seed, all in `[-1, 1)`.
fn tensors(c: &LoraCase) -> [Vec<f64>; 4] {
    let (r, min_dim, max_dim, n_b, nb) = shape(c);
    let mn = c.n_in.min(c.n_out);
    let mut rng = Rng::new(c.seed);
    let mut v = |n: usize| (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect::<Vec<f64>>();
    [v(r * min_dim), v(max_dim * n_b * r), v(r * nb), v(nb * mn)]
}

/// `dW [out, in]` from PEFT's formulas, in f64, without `peft-core`.
fn delta(c: &LoraCase, t: &[Vec<f64>; 4], scaling: f64) -> M {
    let (r, min_dim, _, n_b, nb) = shape(c);
    let (mn, mx) = (c.n_in.min(c.n_out), c.n_in.max(c.n_out));
    let [a, b, lam, gam] = t;
    let j = r * nb;
    // UA [J, mn]: row k nb + b' = lambda[k, b'] A[k, :mn] * gamma[b', :]; UB [mx, J]: column b' r + k = B[:, b', k].
    let mut ua = M::zeros(j, mn);
    for k in 0..r {
        for bb in 0..nb {
            for col in 0..mn {
                ua.d[(k * nb + bb) * mn + col] = lam[k * nb + bb] * a[k * min_dim + col] * gam[bb * mn + col];
            }
        }
    }
    let mut ub = M::zeros(mx, j);
    for i in 0..mx {
        for bb in 0..nb {
            for k in 0..r {
                ub.d[i * j + bb * r + k] = b[(i * n_b + bb) * r + k];
            }
        }
    }
    let p = ub.mul(&ua).scale(scaling);
    if c.n_in <= c.n_out {
        p
    } else {
        let mut tr = M::zeros(mn, mx);
        for i in 0..mx {
            for col in 0..mn {
                tr.d[col * mx + i] = p.d[i * mn + col];
            }
        }
        tr
    }
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    let scaling = |c: &LoraCase| 0.5 + (c.seed % 5) as f64;
    // |x| (|W| + |dW| from |tensors|) per output.
    let bound = |c: &LoraCase, x: &M, w: &M, t: &[Vec<f64>; 4]| {
        let abs = t.clone().map(|v| v.iter().map(|x| x.abs()).collect::<Vec<f64>>());
        x.abs().mul_t(&w.abs().add(&delta(c, &abs, scaling(c)))).d
    };
    let count = |c: &LoraCase| 2 * (c.n_in + c.n_out) + 16;

    run(report, config, "randlora_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let [a, b, lam, gam] = tensors(&c).map(|v| narrow::<E>(&v));
        let (r, min_dim, max_dim, n_b, _) = shape(&c);
        let bases = RandLoraBases::new(r, min_dim, max_dim, n_b, a, b).map_err(fail)?;
        let mut l = RandLora::new(&bases, c.n_in, c.n_out, scaling(&c), lam, gam).map_err(fail)?;
        l.init_adapter();
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        check_base_output(backend, &l, &base, &t.x, c.t)
    });

    run(report, config, "randlora_matches_oracle_and_merges", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let [a, b, lam, gam] = tensors(&c).map(|v| narrow::<E>(&v));
        let wt = [wide(&a), wide(&b), wide(&lam), wide(&gam)];
        let (r, min_dim, max_dim, n_b, _) = shape(&c);
        let bases = RandLoraBases::new(r, min_dim, max_dim, n_b, a, b).map_err(fail)?;
        let l = RandLora::new(&bases, c.n_in, c.n_out, scaling(&c), lam, gam).map_err(fail)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = adapter_forward(backend, &l, &base, &t.x, c.t)?;
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul_t(&w.add(&delta(&c, &wt, scaling(&c))));
        let mag = bound(&c, &x, &w, &wt);
        close::<E>("y", &wide(&y), &want.d, &mag, count(&c))?;
        // The merged weight gives the unmerged output.
        let mut merged = t.w.clone();
        let mut sc = vec![E::ZERO; peft_core::delta::DeltaRows::delta_scratch_len(&l, c.n_out)];
        let dst = MatMut::new(&mut merged, c.n_out, c.n_in).map_err(fail)?;
        peft_core::delta::DeltaRows::delta_rows(&l, backend, 0, dst, peft_core::Accum::Add, 1.0, &mut sc)
            .map_err(fail)?;
        let ym = base_forward(backend, &Dense::new(&merged, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag, 2 * count(&c))
    });

    run(report, config, "randlora_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let [a, b, lam, gam] = tensors(&c).map(|v| narrow::<E>(&v));
        let abs = [wide(&a), wide(&b), wide(&lam), wide(&gam)].map(|v| v.iter().map(|x| x.abs()).collect::<Vec<_>>());
        let (r, min_dim, max_dim, n_b, _) = shape(&c);
        let bases = RandLoraBases::new(r, min_dim, max_dim, n_b, a, b).map_err(fail)?;
        let l = RandLora::new(&bases, c.n_in, c.n_out, scaling(&c), lam, gam).map_err(fail)?;
        let dm: Vec<f64> = delta(&c, &abs, scaling(&c)).d.iter().map(|v| v * count(&c) as f64).collect();
        check_delta_guard(backend, &l, &t.w, &dm)
    });

    run(report, config, "randlora_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let [a, b, lam, gam] = tensors(&c).map(|v| narrow::<E>(&v));
        let wt = [wide(&a), wide(&b), wide(&lam), wide(&gam)];
        let (r, min_dim, max_dim, n_b, _) = shape(&c);
        let bases = RandLoraBases::new(r, min_dim, max_dim, n_b, a, b).map_err(fail)?;
        let l = RandLora::new(&bases, c.n_in, c.n_out, scaling(&c), lam, gam).map_err(fail)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let (mut gl, mut gg) = (vec![E::ZERO; wt[2].len()], vec![E::ZERO; wt[3].len()]);
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gm) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        let grads = RandLoraGrads { lambda: &mut gl, gamma: &mut gg };
        l.backward(backend, &base, xv, gm, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), grads, &mut sc)
            .map_err(fail)?;
        let (w, g) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], lam: &[f64], gam: &[f64]| {
            let tt = [wt[0].clone(), wt[1].clone(), lam.to_vec(), gam.to_vec()];
            oracle::dot(&g, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.add(&delta(&c, &tt, scaling(&c)))))
        };
        let xw = wide(&t.x);
        let scale = 8.0 * (c.t * c.n_out * c.n_in * (c.n_in + c.n_out)) as f64 * scaling(&c);
        let k = c.t + count(&c);
        close_norm::<E>("dlambda", &wide(&gl), &oracle::grad_fd(&wt[2], 1e-6, |p| loss(&xw, p, &wt[3])), scale, k)?;
        close_norm::<E>("dgamma", &wide(&gg), &oracle::grad_fd(&wt[3], 1e-6, |p| loss(&xw, &wt[2], p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &wt[2], &wt[3])), scale, k)
    });
}
