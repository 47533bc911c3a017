//! C3A: identity at PEFT's zero init, the forward against the oracle, the
//! merged weight against the unmerged forward, the typed merge's unmerge,
//! gradients against finite differences.
use peft_core::c3a::C3a;
use peft_core::delta::DeltaRows;
use peft_core::method::LinearAdapter;
use peft_core::{Accum, Backend, Dense, FrozenLinear, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, check_base_output, gcd};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The largest block size up to 4 dividing `in` and `out`.
fn block(c: &LoraCase) -> usize {
    (1..=4).rev().find(|b| gcd(c.n_in, c.n_out).is_multiple_of(*b)).unwrap_or(1)
}

/// The kernel `[out/b, in/b, b]` in `[-1, 1)` from the seed.
fn kernel(c: &LoraCase, b: usize) -> Vec<f64> {
    let mut rng = Rng::new(c.seed);
    (0..c.n_out / b * c.n_in).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
}

/// `dW` and its magnitude, from PEFT's FFT formula written element-wise:
/// `z[m b + j] = sum_n sum_s w[m, n, s] x[n b + (j + s) mod b] / in`.
fn delta(c: &LoraCase, b: usize, w: &[f64]) -> (M, M) {
    let (o, i, nb) = (c.n_out, c.n_in, c.n_in / b);
    let (mut d, mut dm) = (vec![0.0; o * i], vec![0.0; o * i]);
    for m in 0..o / b {
        for j in 0..b {
            for n in 0..nb {
                for s in 0..b {
                    let (col, v) = (n * b + (j + s) % b, w[(m * nb + n) * b + s] / i as f64);
                    d[(m * b + j) * i + col] += v;
                    dm[(m * b + j) * i + col] += v.abs();
                }
            }
        }
    }
    (M::new(o, i, d), M::new(o, i, dm))
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    // The layer over the kernel in E, and the kernel widened back.
    type Layer<E> = (C3a<E, Vec<E>>, Vec<f64>);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let b = block(c);
        let k: Vec<E> = narrow(&kernel(c, b));
        let kw = wide(&k);
        Ok((C3a::new(b, c.n_in, c.n_out, k).map_err(fail)?, kw))
    };

    run(report, config, "c3a_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mut l, _) = layer(&c)?;
        l.init_adapter();
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        check_base_output(backend, &l, &base, &t.x, c.t)
    });

    run(report, config, "c3a_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, k) = layer(&c)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (d, dm) = delta(&c, block(&c), &k);
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(1.5);
        close::<E>("y", &wide(&y), &x.mul_t(&w.add(&d)).d, &mag.d, 2 * c.n_in + 4)
    });

    run(report, config, "c3a_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let (l, k) = layer(&c)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (_, dm) = delta(&c, block(&c), &k);
        let w0 = M::new(c.n_out, c.n_in, wide(&t.w));
        l.delta_rows(backend, 0, MatMut::new(&mut t.w, c.n_out, c.n_in).map_err(fail)?, Accum::Add, 1.0, &mut [])
            .map_err(fail)?;
        let mut ym = vec![E::ZERO; c.t * c.n_out];
        let merged = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let (xv, yv) =
            (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatMut::new(&mut ym, c.t, c.n_out).map_err(fail)?);
        merged.forward(backend, xv, yv).map_err(fail)?;
        let x = M::new(c.t, c.n_in, wide(&t.x));
        let mag = x.abs().mul_t(&w0.abs().add(&dm)).scale(3.0);
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.d, 2 * c.n_in + 4)
    });

    run(report, config, "c3a_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, k) = layer(&c)?;
        let (_, dm) = delta(&c, block(&c), &k);
        super::check_delta_guard(backend, &l, &t.w, &dm.d)
    });

    run(report, config, "c3a_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, k) = layer(&c)?;
        let b = block(&c);
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut gk = vec![E::ZERO; k.len()];
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gv) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        l.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), &mut gk, &mut sc)
            .map_err(fail)?;
        let (w, gm) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], k: &[f64]| {
            let (d, _) = delta(&c, b, k);
            oracle::dot(&gm, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.add(&d)))
        };
        let xw = wide(&t.x);
        let scale = 2.0 * (c.t * c.n_out * c.n_in) as f64;
        let kk = c.t + c.n_out + 2 * c.n_in + 4;
        close_norm::<E>("dw", &wide(&gk), &oracle::grad_fd(&k, 1e-6, |p| loss(&xw, p)), scale, kk)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &k)), scale, kk)
    });
}
