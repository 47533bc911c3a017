//! AdaLoRA: identity at init, the forward against the oracle, the merged
//! weight against the unmerged forward, the typed merge's unmerge,
//! gradients against finite differences.
use peft_core::adalora::{AdaLora, AdaLoraGrads, scale};
use peft_core::delta::DeltaRows;
use peft_core::method::LinearAdapter;
use peft_core::{Accum, Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// `[A, E, B]` in `[-1, 1)` from the seed.
fn tensors(c: &LoraCase) -> [Vec<f64>; 3] {
    let mut rng = Rng::new(c.seed);
    let mut v = |n: usize| (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect::<Vec<f64>>();
    [v(c.r * c.n_in), v(c.r), v(c.n_out * c.r)]
}

/// PEFT's factor for the case (`init_r = r`).
fn s_of(c: &LoraCase) -> f64 {
    scale(c.alpha, c.r).unwrap_or(0.0)
}

/// `dW = s B diag(E) A` and its magnitude `s |B| diag|E| |A|`, from the
/// rounded tensors, computed here without `peft-core`.
fn delta(c: &LoraCase, t: &[Vec<f64>; 3]) -> (M, M) {
    let s = s_of(c);
    let (a, e, b) = (M::new(c.r, c.n_in, t[0].clone()), &t[1], &t[2]);
    let be: Vec<f64> = (0..c.n_out * c.r).map(|i| b[i] * e[i % c.r]).collect();
    let be = M::new(c.n_out, c.r, be);
    let d = be.mul(&a).scale(s);
    let dm = be.abs().mul(&a.abs()).scale(s.abs());
    (d, dm)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    let layer = |c: &LoraCase, t: &[Vec<E>; 3]| -> Result<AdaLora<E, Vec<E>>, TestCaseError> {
        let [a, e, b] = t.clone();
        AdaLora::new(c.r, c.n_in, c.n_out, s_of(c), a, e, b).map_err(fail)
    };

    run(report, config, "adalora_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let mut l = layer(&c, &tensors(&c).map(|v| narrow(&v)))?;
        l.init_adapter(&mut Rng::new(c.seed ^ 1));
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let (y, yb) = (adapter_forward(backend, &l, &base, &t.x, c.t)?, base_forward(backend, &base, &t.x, c.t)?);
        // E = 0: the added term is s (h * 0) B^T, zeros (-0 aside).
        for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
        }
        Ok(())
    });

    run(report, config, "adalora_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let p: [Vec<E>; 3] = tensors(&c).map(|v| narrow(&v));
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = adapter_forward(backend, &layer(&c, &p)?, &base, &t.x, c.t)?;
        let (d, dm) = delta(&c, &p.clone().map(|v| wide(&v)));
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul_t(&w.add(&d));
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(1.5);
        close::<E>("y", &wide(&y), &want.d, &mag.d, c.n_in + 2 * c.r + 4)
    });

    run(report, config, "adalora_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let p: [Vec<E>; 3] = tensors(&c).map(|v| narrow(&v));
        let l = layer(&c, &p)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let mut sc = vec![E::ZERO; l.delta_scratch_len(c.n_out)];
        l.delta_rows(backend, 0, MatMut::new(&mut t.w, c.n_out, c.n_in).map_err(fail)?, Accum::Add, 1.0, &mut sc)
            .map_err(fail)?;
        let ym = base_forward(backend, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (_, dm) = delta(&c, &p.clone().map(|v| wide(&v)));
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(3.0);
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.d, c.n_in + 2 * c.r + 4)
    });

    run(report, config, "adalora_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let p: [Vec<E>; 3] = tensors(&c).map(|v| narrow(&v));
        let (_, dm) = delta(&c, &p.clone().map(|v| wide(&v)));
        super::check_delta_guard(backend, &layer(&c, &p)?, &t.w, &dm.d)
    });

    run(report, config, "adalora_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let p: [Vec<E>; 3] = tensors(&c).map(|v| narrow(&v));
        let l = layer(&c, &p)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut g: [Vec<E>; 3] = p.clone().map(|v| vec![E::ZERO; v.len()]);
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        {
            let [ga, ge, gb] = &mut g;
            let grads = AdaLoraGrads { a: ga, e: ge, b: gb };
            let (xv, gv) =
                (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
            l.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), grads, &mut sc)
                .map_err(fail)?;
        }
        let pw: [Vec<f64>; 3] = p.clone().map(|v| wide(&v));
        let (w, gm) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], p: &[Vec<f64>; 3]| {
            let (d, _) = delta(&c, p);
            oracle::dot(&gm, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.add(&d)))
        };
        let xw = wide(&t.x);
        let scale = (s_of(&c) + 1.0) * (c.t * c.n_out * c.n_in * c.r) as f64;
        let k = c.t + c.n_out + c.n_in + 2 * c.r;
        for i in 0..3 {
            let fd = oracle::grad_fd(&pw[i], 1e-6, |q| {
                let mut p2 = pw.clone();
                p2[i] = q.to_vec();
                loss(&xw, &p2)
            });
            close_norm::<E>(["dA", "dE", "dB"][i], &wide(&g[i]), &fd, scale, k)?;
        }
        let fx = oracle::grad_fd(&xw, 1e-6, |q| loss(q, &pw));
        close_norm::<E>("dx", &wide(&gx), &fx, scale, k)
    });
}
