//! VB-LoRA: the forward against the oracle (PEFT's `_get_lora_matrices`
//! written out), the merged weight against the unmerged forward, the typed
//! merge's unmerge, gradients (the logits and the bank) against finite
//! differences.
use peft_core::method::LinearAdapter;
use peft_core::vblora::{VbLora, VbLoraGrads};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward, check_delta_guard, gcd};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// `(r, L, nv, k)`: the case's rank, the largest vector length up to 3
/// dividing `in` and `out`, 4 to 6 bank vectors, top 1 to 3.
fn shape(c: &LoraCase) -> (usize, usize, usize, usize) {
    let l = (1..=3).rev().find(|l| gcd(c.n_in, c.n_out).is_multiple_of(*l)).unwrap_or(1);
    let nv = 4 + (c.seed as usize % 3);
    (c.r, l, nv, 1 + (c.seed as usize / 3) % 3)
}

/// The bank, `logits_A`, `logits_B` from the seed (bank in `[-1, 1)`,
/// logits in `[-2, 2)`).
fn tensors(c: &LoraCase) -> [Vec<f64>; 3] {
    let (r, l, nv, _) = shape(c);
    let mut rng = Rng::new(c.seed);
    let mut v = |n: usize, s: f64| (0..n).map(|_| rng.uniform_range(-s, s)).collect::<Vec<f64>>();
    [v(nv * l, 1.0), v(r * (c.n_in / l) * nv, 2.0), v((c.n_out / l) * r * nv, 2.0)]
}

/// A row's mix: `sum_t softmax(top)[t] V[idx[t]]` (PEFT's
/// `_get_low_rank_matrix`), by sorting.
fn mix(z: &[f64], bank: &[f64], l: usize, k: usize) -> Vec<f64> {
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    let top = &order[..k];
    let m = z[top[0]];
    let e: Vec<f64> = top.iter().map(|&i| (z[i] - m).exp()).collect();
    let s: f64 = e.iter().sum();
    (0..l).map(|c| top.iter().zip(&e).map(|(&i, w)| w / s * bank[i * l + c]).sum()).collect()
}

/// `dW = B A [out, in]` in f64, without `peft-core`.
fn delta(c: &LoraCase, t: &[Vec<f64>; 3]) -> M {
    let (r, l, nv, k) = shape(c);
    let [bank, la, lb] = t;
    let a: Vec<f64> = la.chunks(nv).flat_map(|z| mix(z, bank, l, k)).collect();
    let m: Vec<f64> = lb.chunks(nv).flat_map(|z| mix(z, bank, l, k)).collect();
    let mut b = M::zeros(c.n_out, r);
    for o in 0..c.n_out / l {
        for q in 0..r {
            for cc in 0..l {
                b.d[(o * l + cc) * r + q] = m[(o * r + q) * l + cc];
            }
        }
    }
    b.mul(&M::new(r, c.n_in, a))
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    type Layer<E> = (VbLora<E, Vec<E>, Vec<E>>, [Vec<f64>; 3]);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let (r, l, _, k) = shape(c);
        let [bank, la, lb] = tensors(c).map(|v| narrow::<E>(&v));
        let wt = [wide(&bank), wide(&la), wide(&lb)];
        Ok((VbLora::new(r, l, k, c.n_in, c.n_out, bank, la, lb).map_err(fail)?, wt))
    };
    // |x| (|W| + |B| |A|) per output (each mix is a convex combination: |v| <= max |V|).
    let bound = |c: &LoraCase, x: &M, w: &M| {
        let (r, ..) = shape(c);
        let extra = r as f64;
        x.abs().mul_t(&w.abs().add(&M::new(c.n_out, c.n_in, vec![extra; c.n_out * c.n_in]))).d
    };
    let count = |c: &LoraCase| c.n_in + c.n_out + 16;

    run(report, config, "vblora_matches_oracle_and_merges", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, wt) = layer(&c)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = adapter_forward(backend, &l, &base, &t.x, c.t)?;
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul_t(&w.add(&delta(&c, &wt)));
        close::<E>("y", &wide(&y), &want.d, &bound(&c, &x, &w), count(&c))?;
        let mut merged = t.w.clone();
        let mut sc = vec![E::ZERO; peft_core::delta::DeltaRows::delta_scratch_len(&l, c.n_out)];
        let dst = MatMut::new(&mut merged, c.n_out, c.n_in).map_err(fail)?;
        peft_core::delta::DeltaRows::delta_rows(&l, backend, 0, dst, peft_core::Accum::Add, 1.0, &mut sc)
            .map_err(fail)?;
        let ym = base_forward(backend, &Dense::new(&merged, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        close::<E>("merged y", &wide(&ym), &wide(&y), &bound(&c, &x, &w), 2 * count(&c))
    });

    run(report, config, "vblora_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, _) = layer(&c)?;
        let (r, ..) = shape(&c);
        let dm = vec![(r * count(&c)) as f64; c.n_out * c.n_in];
        check_delta_guard(backend, &l, &t.w, &dm)
    });

    run(report, config, "vblora_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, wt) = layer(&c)?;
        // The selection is piecewise constant: differences across its edge (a tie at the k-th place) are not a
        // derivative.
        let (_, _, nv, k) = shape(&c);
        let gap = |z: &[f64]| {
            let mut v = z.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            k == nv || v[k - 1] - v[k] > 1e-3
        };
        prop_assume!(wt[1].chunks(nv).chain(wt[2].chunks(nv)).all(gap));
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let [gb, ga, gl] = [wt[0].len(), wt[1].len(), wt[2].len()].map(|n| vec![E::ZERO; n]);
        let (mut gbank, mut gla, mut glb) = (gb, ga, gl);
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gm) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        let grads = VbLoraGrads { logits_a: &mut gla, logits_b: &mut glb, bank: Some(&mut gbank) };
        l.backward(backend, &base, xv, gm, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), grads, &mut sc)
            .map_err(fail)?;
        let (w, g) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], tt: &[Vec<f64>; 3]| {
            oracle::dot(&g, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.add(&delta(&c, tt))))
        };
        let with = |i: usize, p: &[f64]| {
            let mut tt = wt.clone();
            tt[i] = p.to_vec();
            tt
        };
        let xw = wide(&t.x);
        let scale = 8.0 * (c.t * c.n_out * c.n_in * (c.r + 1)) as f64;
        let k = c.t + count(&c);
        close_norm::<E>("dV", &wide(&gbank), &oracle::grad_fd(&wt[0], 1e-6, |p| loss(&xw, &with(0, p))), scale, k)?;
        close_norm::<E>(
            "dlogits_A",
            &wide(&gla),
            &oracle::grad_fd(&wt[1], 1e-6, |p| loss(&xw, &with(1, p))),
            scale,
            k,
        )?;
        close_norm::<E>(
            "dlogits_B",
            &wide(&glb),
            &oracle::grad_fd(&wt[2], 1e-6, |p| loss(&xw, &with(2, p))),
            scale,
            k,
        )?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &wt)), scale, k)
    });
}
