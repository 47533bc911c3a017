//! FourierFT: identity at a zero spectrum, the forward against the oracle
//! (PEFT's inverse DFT written element-wise), the merged weight against the
//! unmerged forward, the typed merge's unmerge, gradients against finite
//! differences.
use peft_core::fourierft::FourierFt;
use peft_core::method::LinearAdapter;
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward, check_base_output, check_delta_guard};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// `(rows, cols, spectrum)` from the seed: up to 6 distinct frequencies,
/// coefficients in `[-2, 2)`; the scaling in `[1, 100)`.
fn frequencies(c: &LoraCase) -> (Vec<u32>, Vec<u32>, Vec<f64>, f64) {
    let mut rng = Rng::new(c.seed);
    let total = c.n_out * c.n_in;
    let n = 1 + (c.seed as usize / 7) % total.min(6);
    let mut picked: Vec<usize> = Vec::new();
    while picked.len() < n {
        let p = (rng.next_u64() % total as u64) as usize;
        if !picked.contains(&p) {
            picked.push(p);
        }
    }
    let rows = picked.iter().map(|p| (p / c.n_in) as u32).collect();
    let cols = picked.iter().map(|p| (p % c.n_in) as u32).collect();
    let w = (0..n).map(|_| rng.uniform_range(-2.0, 2.0)).collect();
    (rows, cols, w, rng.uniform_range(1.0, 100.0))
}

/// `dW` and `|dW|` per element from PEFT's `ifft2(S).real * scaling`,
/// written as the sum over the frequencies.
fn delta(c: &LoraCase, rows: &[u32], cols: &[u32], w: &[f64], scaling: f64) -> (M, M) {
    let (o, i) = (c.n_out, c.n_in);
    let s = scaling / (o * i) as f64;
    let (mut d, mut dm) = (vec![0.0; o * i], vec![0.0; o * i]);
    for a in 0..o {
        for col in 0..i {
            for ((&r, &cc), wj) in rows.iter().zip(cols).zip(w) {
                let angle =
                    2.0 * std::f64::consts::PI * (r as f64 * a as f64 / o as f64 + cc as f64 * col as f64 / i as f64);
                d[a * i + col] += s * wj * angle.cos();
                dm[a * i + col] += (s * wj).abs();
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
    // The layer over the spectrum in E, and the spectrum widened back.
    type Layer<E> = (FourierFt<E, Vec<E>, Vec<u32>>, Vec<f64>);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let (rows, cols, w, scaling) = frequencies(c);
        let w: Vec<E> = narrow(&w);
        let ww = wide(&w);
        Ok((FourierFt::new(c.n_in, c.n_out, scaling, w, rows, cols).map_err(fail)?, ww))
    };
    // |x| (|W| + |dW|)^T per output, and a rounding count for the tables' products.
    let bound = |x: &M, w: &M, dm: &M| x.abs().mul_t(&w.abs().add(dm)).d;
    let count = |c: &LoraCase| 4 * (c.n_in + c.n_out) + 24;

    run(report, config, "fourierft_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mut l, _) = layer(&c)?;
        l.init_adapter();
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        check_base_output(backend, &l, &base, &t.x, c.t)
    });

    run(report, config, "fourierft_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, w) = layer(&c)?;
        let y = adapter_forward(backend, &l, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (d, dm) = delta(&c, l.rows(), l.cols(), &w, frequencies(&c).3);
        let (x, w0) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul_t(&w0.add(&d));
        close::<E>("y", &wide(&y), &want.d, &bound(&x, &w0, &dm), count(&c))
    });

    run(report, config, "fourierft_merged_equals_unmerged", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, w) = layer(&c)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = adapter_forward(backend, &l, &base, &t.x, c.t)?;
        let mut merged = t.w.clone();
        let mut sc = vec![E::ZERO; peft_core::delta::DeltaRows::delta_scratch_len(&l, c.n_out)];
        let dst = MatMut::new(&mut merged, c.n_out, c.n_in).map_err(fail)?;
        peft_core::delta::DeltaRows::delta_rows(&l, backend, 0, dst, peft_core::Accum::Add, 1.0, &mut sc)
            .map_err(fail)?;
        let ym = base_forward(backend, &Dense::new(&merged, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (_, dm) = delta(&c, l.rows(), l.cols(), &w, frequencies(&c).3);
        let (x, w0) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        close::<E>("merged y", &wide(&ym), &wide(&y), &bound(&x, &w0, &dm), 2 * count(&c))
    });

    run(report, config, "fourierft_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, w) = layer(&c)?;
        let (_, dm) = delta(&c, l.rows(), l.cols(), &w, frequencies(&c).3);
        // Each element of dW rounds through the tables' products: scale |dW| by their count.
        let dmag: Vec<f64> = dm.d.iter().map(|v| v * (count(&c) as f64)).collect();
        check_delta_guard(backend, &l, &t.w, &dmag)
    });

    run(report, config, "fourierft_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (l, w) = layer(&c)?;
        let (rows, cols, _, scaling) = frequencies(&c);
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut gw = vec![E::ZERO; w.len()];
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gm) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        l.backward(backend, &base, xv, gm, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), &mut gw, &mut sc)
            .map_err(fail)?;
        let (w0, g) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], v: &[f64]| {
            let (d, _) = delta(&c, &rows, &cols, v, scaling);
            oracle::dot(&g, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w0.add(&d)))
        };
        let xw = wide(&t.x);
        let scale = 4.0 * (c.t * c.n_out * c.n_in) as f64 * (1.0 + scaling);
        let k = c.t + count(&c);
        close_norm::<E>("dw", &wide(&gw), &oracle::grad_fd(&w, 1e-6, |p| loss(&xw, p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &w)), scale, k)
    });
}
