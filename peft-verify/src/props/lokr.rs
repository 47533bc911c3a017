//! LoKr: identity at PEFT's init, the forward against the oracle (`s kron(W1, W2)`), the merged
//! weight against the unmerged forward, gradients of every factor form
//! (full and low rank) against finite differences.
use peft_core::delta::DeltaRows;
use peft_core::lokr::{Factor, Lokr, LokrGrads};
use peft_core::lora::LoraConfig;
use peft_core::method::LinearAdapter;
use peft_core::{Accum, Backend, Dense, FrozenLinear, MatMut, MatRef, Reference};
use proptest::prelude::*;

use super::vals;
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

/// Dimensions `W1 [a, c]`, `W2 [b, d]`, rank, each factor's form and
/// values, a base, an input and an upstream gradient.
#[derive(Debug, Clone)]
pub struct LokrCase {
    d1: (usize, usize),
    d2: (usize, usize),
    r: usize,
    alpha: f64,
    /// `[W1 full or W1a, W1b]`, `[W2 ...]`: one or two value vectors each.
    f1: Vec<Vec<f64>>,
    f2: Vec<Vec<f64>>,
    w: Vec<f64>,
    t: usize,
    x: Vec<f64>,
    g: Vec<f64>,
}

fn factor(rows: usize, cols: usize, r: usize) -> impl Strategy<Value = Vec<Vec<f64>>> {
    prop_oneof![vals(rows * cols).prop_map(|v| vec![v]), (vals(rows * r), vals(r * cols)).prop_map(|(a, b)| vec![a, b])]
}

fn lokr_case() -> impl Strategy<Value = LokrCase> {
    (1usize..=3, 1usize..=3, 1usize..=3, 1usize..=3, 1usize..=2, 1usize..=3)
        .prop_flat_map(|(a, c, b, d, r, t)| {
            let (o, i) = (a * b, c * d);
            (
                Just(((a, c), (b, d), r, t)),
                factor(a, c, r),
                factor(b, d, r),
                (0.5f64..4.0, vals(o * i), vals(t * i), vals(t * o)),
            )
        })
        .prop_map(|((d1, d2, r, t), f1, f2, (alpha, w, x, g))| LokrCase { d1, d2, r, alpha, f1, f2, w, t, x, g })
}

/// A gradient buffer of the factor's form.
fn as_grad<E>(v: &mut [Vec<E>]) -> Factor<&mut [E]> {
    match v {
        [m] => Factor::Full(&mut m[..]),
        [a, b] => Factor::LowRank(&mut a[..], &mut b[..]),
        _ => Factor::Full(&mut []),
    }
}

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The full factor from its form.
fn full(f: &[Vec<f64>], (rows, cols): (usize, usize), r: usize) -> M {
    match f {
        [m] => M::new(rows, cols, m.clone()),
        [a, b] => M::new(rows, r, a.clone()).mul(&M::new(r, cols, b.clone())),
        _ => M::zeros(rows, cols),
    }
}

/// `dW = s kron(W1, W2)` and its magnitude.
fn delta(c: &LokrCase, f1: &[Vec<f64>], f2: &[Vec<f64>]) -> (M, M) {
    let s = c.alpha / c.r as f64;
    let (w1, w2) = (full(f1, c.d1, c.r), full(f2, c.d2, c.r));
    let abs = |f: &[Vec<f64>]| f.iter().map(|v| v.iter().map(|x| x.abs()).collect()).collect::<Vec<Vec<f64>>>();
    let (m1, m2) = (full(&abs(f1), c.d1, c.r), full(&abs(f2), c.d2, c.r));
    let ((a, cc), (b, d)) = (c.d1, c.d2);
    let (o, i) = (a * b, cc * d);
    let mut dw = M::zeros(o, i);
    let mut mag = M::zeros(o, i);
    for row in 0..o {
        for col in 0..i {
            dw.d[row * i + col] = s * w1.at(row / b, col / d) * w2.at(row % b, col % d);
            mag.d[row * i + col] = s * m1.at(row / b, col / d) * m2.at(row % b, col % d);
        }
    }
    (dw, mag)
}

fn as_factor<E: peft_core::Element>(v: &[Vec<E>]) -> Factor<&[E]> {
    match v {
        [m] => Factor::Full(&m[..]),
        [a, b] => Factor::LowRank(&a[..], &b[..]),
        _ => Factor::Full(&[]),
    }
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let round = |f: &[Vec<f64>]| f.iter().map(|v| narrow::<E>(v)).collect::<Vec<Vec<E>>>();

    run(report, config, "lokr_matches_oracle_and_merges", name, lokr_case(), |c| {
        let (f1, f2) = (round(&c.f1), round(&c.f2));
        let l = Lokr::new(&LoraConfig::new(c.r, c.alpha), c.d1, c.d2, as_factor(&f1), as_factor(&f2)).map_err(fail)?;
        let (o, i) = l.dims();
        let (mut w, x): (Vec<E>, Vec<E>) = (narrow(&c.w), narrow(&c.x));
        let mut y = vec![E::ZERO; c.t * o];
        let mut sc = vec![E::ZERO; l.forward_scratch_len(0)];
        {
            let base = Dense::new(&w, o, i).map_err(fail)?;
            let (xv, yv) = (MatRef::new(&x, c.t, i).map_err(fail)?, MatMut::new(&mut y, c.t, o).map_err(fail)?);
            l.forward(backend, &base, xv, yv, &mut sc).map_err(fail)?;
        }
        let wide_f = |f: &[Vec<E>]| f.iter().map(|v| wide(v)).collect::<Vec<Vec<f64>>>();
        let (d, dm) = delta(&c, &wide_f(&f1), &wide_f(&f2));
        let (xm, wm) = (M::new(c.t, i, wide(&x)), M::new(o, i, wide(&w)));
        let want = xm.mul_t(&wm.add(&d));
        let mag = xm.abs().mul_t(&wm.abs().add(&dm)).scale(1.5);
        close::<E>("y", &wide(&y), &want.d, &mag.d, i + 2 * c.r + 4)?;
        // Merged: W + dW gives the same output.
        l.delta_rows(backend, 0, MatMut::new(&mut w, o, i).map_err(fail)?, Accum::Add, 1.0, &mut sc).map_err(fail)?;
        let mut ym = vec![E::ZERO; c.t * o];
        Dense::new(&w, o, i)
            .map_err(fail)?
            .forward(backend, MatRef::new(&x, c.t, i).map_err(fail)?, MatMut::new(&mut ym, c.t, o).map_err(fail)?)
            .map_err(fail)?;
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.scale(2.0).d, i + 2 * c.r + 4)
    });

    run(report, config, "lokr_identity_at_init", name, lokr_case(), |c| {
        // Each factor form keeps its shape; PEFT's init (W1 = 0) then gives
        // dW = 0, so the output is the base's exactly.
        let (mut f1, mut f2) = (round(&c.f1), round(&c.f2));
        let parts = |v: &mut [Vec<E>]| -> Factor<Vec<E>> {
            match v {
                [a, b] => Factor::LowRank(core::mem::take(a), core::mem::take(b)),
                [m, ..] => Factor::Full(core::mem::take(m)),
                [] => Factor::Full(Vec::new()),
            }
        };
        let (w1, w2) = (parts(&mut f1), parts(&mut f2));
        let mut l = Lokr::new(&LoraConfig::new(c.r, c.alpha), c.d1, c.d2, w1, w2).map_err(fail)?;
        l.init_adapter(&mut peft_core::Rng::new(c.t as u64));
        let (o, i) = l.dims();
        let (w, x): (Vec<E>, Vec<E>) = (narrow(&c.w), narrow(&c.x));
        let base = Dense::new(&w, o, i).map_err(fail)?;
        let (mut y, mut yb) = (vec![E::ZERO; c.t * o], vec![E::ZERO; c.t * o]);
        let mut sc = vec![E::ZERO; l.forward_scratch_len(0)];
        let xv = MatRef::new(&x, c.t, i).map_err(fail)?;
        l.forward(backend, &base, xv, MatMut::new(&mut y, c.t, o).map_err(fail)?, &mut sc).map_err(fail)?;
        base.forward(backend, xv, MatMut::new(&mut yb, c.t, o).map_err(fail)?).map_err(fail)?;
        for (k, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", k, got, want);
        }
        Ok(())
    });

    run(report, config, "lokr_unmerge_restores", name, lokr_case(), |c| {
        let (f1, f2) = (round(&c.f1), round(&c.f2));
        let l = Lokr::new(&LoraConfig::new(c.r, c.alpha), c.d1, c.d2, as_factor(&f1), as_factor(&f2)).map_err(fail)?;
        let wide_f = |f: &[Vec<E>]| f.iter().map(|v| wide(v)).collect::<Vec<Vec<f64>>>();
        let (_, dm) = delta(&c, &wide_f(&f1), &wide_f(&f2));
        super::check_delta_guard(backend, &l, &narrow::<E>(&c.w), &dm.d)
    });

    run(report, config, "lokr_gradients_match_fd", name, lokr_case(), |c| {
        let (f1, f2) = (round(&c.f1), round(&c.f2));
        let l = Lokr::new(&LoraConfig::new(c.r, c.alpha), c.d1, c.d2, as_factor(&f1), as_factor(&f2)).map_err(fail)?;
        let (o, i) = l.dims();
        let (w, x, g): (Vec<E>, Vec<E>, Vec<E>) = (narrow(&c.w), narrow(&c.x), narrow(&c.g));
        let mut g1: Vec<Vec<E>> = f1.iter().map(|v| vec![E::ZERO; v.len()]).collect();
        let mut g2: Vec<Vec<E>> = f2.iter().map(|v| vec![E::ZERO; v.len()]).collect();
        let mut gx = vec![E::ZERO; c.t * i];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(0)];
        {
            let base = Dense::new(&w, o, i).map_err(fail)?;
            let grads = LokrGrads { w1: as_grad(&mut g1), w2: as_grad(&mut g2) };
            let (xv, gv) = (MatRef::new(&x, c.t, i).map_err(fail)?, MatRef::new(&g, c.t, o).map_err(fail)?);
            l.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, i).map_err(fail)?), grads, &mut sc)
                .map_err(fail)?;
        }
        let wide_f = |f: &[Vec<E>]| f.iter().map(|v| wide(v)).collect::<Vec<Vec<f64>>>();
        let (p1, p2) = (wide_f(&f1), wide_f(&f2));
        let (wm, gm) = (M::new(o, i, wide(&w)), M::new(c.t, o, wide(&g)));
        let loss = |x: &[f64], p1: &[Vec<f64>], p2: &[Vec<f64>]| {
            let (d, _) = delta(&c, p1, p2);
            oracle::dot(&gm, &M::new(c.t, i, x.to_vec()).mul_t(&wm.add(&d)))
        };
        let xw = wide(&x);
        let scale = (c.alpha / c.r as f64 + 1.0) * (c.t * o * i * 4) as f64;
        let k = c.t + o + i + 2 * c.r;
        for (which, grads) in [(0usize, &g1), (1, &g2)] {
            for (part, got) in grads.iter().enumerate() {
                let base_f = if which == 0 { &p1 } else { &p2 };
                let fd = oracle::grad_fd(&base_f[part], 1e-6, |p| {
                    let mut f = base_f.clone();
                    f[part] = p.to_vec();
                    if which == 0 { loss(&xw, &f, &p2) } else { loss(&xw, &p1, &f) }
                });
                close_norm::<E>(&format!("dW{}[{part}]", which + 1), &wide(got), &fd, scale, k)?;
            }
        }
        let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &p1, &p2));
        close_norm::<E>("dx", &wide(&gx), &fx, scale, k)
    });
}
