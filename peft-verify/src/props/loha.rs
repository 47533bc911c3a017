//! LoHa: identity at init, the forward against the oracle, the merged
//! weight against the unmerged forward, the typed merge's unmerge, gradients against finite
//! differences.
use peft_core::delta::DeltaRows;
use peft_core::loha::{Loha, LohaGrads};
use peft_core::lora::LoraConfig;
use peft_core::method::LinearAdapter;
use peft_core::{Accum, Backend, Dense, FrozenLinear, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The four factors `[W1a, W1b, W2a, W2b]` in `[-1, 1)` from the seed.
fn factors(c: &LoraCase) -> [Vec<f64>; 4] {
    let mut rng = Rng::new(c.seed);
    let mut v = |n: usize| (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect::<Vec<f64>>();
    let (na, nb) = (c.n_out * c.r, c.r * c.n_in);
    [v(na), v(nb), v(na), v(nb)]
}

/// `dW = s (W1a W1b) * (W2a W2b)` and its magnitude, from the rounded factors.
fn delta(c: &LoraCase, f: &[Vec<f64>; 4]) -> (M, M) {
    let s = c.alpha / c.r as f64;
    let m = |k: usize, r, cols| M::new(r, cols, f[k].clone());
    let (p1, p2) = (m(0, c.n_out, c.r).mul(&m(1, c.r, c.n_in)), m(2, c.n_out, c.r).mul(&m(3, c.r, c.n_in)));
    let (q1, q2) = (
        m(0, c.n_out, c.r).abs().mul(&m(1, c.r, c.n_in).abs()),
        m(2, c.n_out, c.r).abs().mul(&m(3, c.r, c.n_in).abs()),
    );
    let d = M::new(c.n_out, c.n_in, p1.d.iter().zip(&p2.d).map(|(a, b)| s * a * b).collect());
    let dm = M::new(c.n_out, c.n_in, q1.d.iter().zip(&q2.d).map(|(a, b)| s * a * b).collect());
    (d, dm)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    let layer = |c: &LoraCase, f: &[Vec<E>; 4]| -> Result<Loha<E, Vec<E>>, TestCaseError> {
        Loha::new(&LoraConfig::new(c.r, c.alpha), c.n_in, c.n_out, f.clone()).map_err(fail)
    };
    let fwd = |c: &LoraCase, l: &Loha<E, Vec<E>>, base: &Dense<'_, E>, x: &[E]| -> Result<Vec<E>, TestCaseError> {
        let mut y = vec![E::ZERO; c.t * c.n_out];
        let mut sc = vec![E::ZERO; l.forward_scratch_len(0)];
        let (xv, yv) = (MatRef::new(x, c.t, c.n_in).map_err(fail)?, MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?);
        l.forward(backend, base, xv, yv, &mut sc).map_err(fail)?;
        Ok(y)
    };

    run(report, config, "loha_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let f: [Vec<E>; 4] = factors(&c).map(|v| narrow(&v));
        let mut l = layer(&c, &f)?;
        l.init_adapter(&mut Rng::new(c.seed ^ 1));
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = fwd(&c, &l, &base, &t.x)?;
        let mut yb = vec![E::ZERO; c.t * c.n_out];
        base.forward(
            backend,
            MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?,
            MatMut::new(&mut yb, c.t, c.n_out).map_err(fail)?,
        )
        .map_err(fail)?;
        // W2b = 0: dW = 0 exactly, and x 0^T adds zeros (-0 aside).
        for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
        }
        Ok(())
    });

    run(report, config, "loha_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let f: [Vec<E>; 4] = factors(&c).map(|v| narrow(&v));
        let l = layer(&c, &f)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = fwd(&c, &l, &base, &t.x)?;
        let (d, dm) = delta(&c, &f.clone().map(|v| wide(&v)));
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul_t(&w.add(&d));
        // dW is rounded to E once more before it meets x.
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(1.5);
        close::<E>("y", &wide(&y), &want.d, &mag.d, c.n_in + 2 * c.r + 4)
    });

    run(report, config, "loha_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let f: [Vec<E>; 4] = factors(&c).map(|v| narrow(&v));
        let l = layer(&c, &f)?;
        let y = fwd(&c, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x)?;
        let mut sc = vec![E::ZERO; l.forward_scratch_len(0)];
        l.delta_rows(backend, 0, MatMut::new(&mut t.w, c.n_out, c.n_in).map_err(fail)?, Accum::Add, 1.0, &mut sc)
            .map_err(fail)?;
        let mut ym = vec![E::ZERO; c.t * c.n_out];
        let merged = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        merged
            .forward(
                backend,
                MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?,
                MatMut::new(&mut ym, c.t, c.n_out).map_err(fail)?,
            )
            .map_err(fail)?;
        let (_, dm) = delta(&c, &f.clone().map(|v| wide(&v)));
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(3.0);
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.d, c.n_in + 2 * c.r + 4)
    });

    run(report, config, "loha_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let f: [Vec<E>; 4] = factors(&c).map(|v| narrow(&v));
        let (_, dm) = delta(&c, &f.clone().map(|v| wide(&v)));
        super::check_delta_guard(backend, &layer(&c, &f)?, &t.w, &dm.d)
    });

    run(report, config, "loha_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let f: [Vec<E>; 4] = factors(&c).map(|v| narrow(&v));
        let l = layer(&c, &f)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut g: [Vec<E>; 4] = f.clone().map(|v| vec![E::ZERO; v.len()]);
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(0)];
        {
            let [g0, g1, g2, g3] = &mut g;
            let grads = LohaGrads { w1a: g0, w1b: g1, w2a: g2, w2b: g3 };
            let (xv, gv) =
                (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
            l.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), grads, &mut sc)
                .map_err(fail)?;
        }
        let fw: [Vec<f64>; 4] = f.clone().map(|v| wide(&v));
        let (w, gm) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], f: &[Vec<f64>; 4]| {
            let (d, _) = delta(&c, f);
            oracle::dot(&gm, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.add(&d)))
        };
        let xw = wide(&t.x);
        let s = c.alpha / c.r as f64;
        let scale = (s + 1.0) * (c.t * c.n_out * c.n_in * c.r * c.r) as f64;
        let k = c.t + c.n_out + c.n_in + 2 * c.r;
        for i in 0..4 {
            let fd = oracle::grad_fd(&fw[i], 1e-6, |p| {
                let mut f2 = fw.clone();
                f2[i] = p.to_vec();
                loss(&xw, &f2)
            });
            close_norm::<E>(["dW1a", "dW1b", "dW2a", "dW2b"][i], &wide(&g[i]), &fd, scale, k)?;
        }
        let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &fw));
        close_norm::<E>("dx", &wide(&gx), &fx, scale, k)
    });
}
