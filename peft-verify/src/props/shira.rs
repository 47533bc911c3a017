//! SHiRA: identity at init, the forward against the oracle, the merged
//! weight against the unmerged forward, the typed merge's unmerge,
//! gradients against finite differences.
use peft_core::delta::DeltaRows;
use peft_core::method::LinearAdapter;
use peft_core::shira::Shira;
use peft_core::{Accum, Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, base_forward};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The adapter over values in `E`, and the values widened back.
type Layer<E> = (Shira<E, Vec<E>, Vec<u32>>, Vec<f64>);

/// A fresh adapter (distinct random positions, `w = 0`) of `min(r (in +
/// out), in out)` positions, then values in `[-1, 1)` from the seed.
fn setup<E: Precision>(c: &LoraCase) -> Result<Layer<E>, TestCaseError> {
    let n = (c.r * (c.n_in + c.n_out)).min(c.n_in * c.n_out);
    let mut s = Shira::new(c.n_in, c.n_out, 1.0, vec![E::ZERO; n], vec![0u32; n], vec![0u32; n]).map_err(fail)?;
    let mut rng = Rng::new(c.seed);
    s.init_adapter(&mut rng).map_err(fail)?;
    let w: Vec<E> = narrow(&(0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect::<Vec<f64>>());
    s.weight_mut().copy_from_slice(&w);
    Ok((s, wide(&w)))
}

/// `dW` from the positions and values, and its magnitude.
fn delta<E: Precision>(c: &LoraCase, s: &Shira<E, Vec<E>, Vec<u32>>, w: &[f64]) -> (M, M) {
    let mut d = vec![0.0; c.n_out * c.n_in];
    for ((&r, &col), v) in s.rows().iter().zip(s.cols()).zip(w) {
        d[r as usize * c.n_in + col as usize] += v;
    }
    let m = d.iter().map(|x: &f64| x.abs()).collect();
    (M::new(c.n_out, c.n_in, d), M::new(c.n_out, c.n_in, m))
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();

    run(report, config, "shira_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mut s, _) = setup::<E>(&c)?;
        s.weight_mut().fill(E::ZERO);
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let (y, yb) = (adapter_forward(backend, &s, &base, &t.x, c.t)?, base_forward(backend, &base, &t.x, c.t)?);
        for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
        }
        // The mask: distinct positions in row-major order.
        let flat: Vec<usize> =
            s.rows().iter().zip(s.cols()).map(|(&r, &col)| r as usize * c.n_in + col as usize).collect();
        prop_assert!(flat.windows(2).all(|p| p[0] < p[1]), "positions not distinct and sorted: {:?}", flat);
        Ok(())
    });

    run(report, config, "shira_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (s, w) = setup::<E>(&c)?;
        let y = adapter_forward(backend, &s, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (d, dm) = delta(&c, &s, &w);
        let (x, wm) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let mag = x.abs().mul_t(&wm.abs().add(&dm)).scale(1.5);
        close::<E>("y", &wide(&y), &x.mul_t(&wm.add(&d)).d, &mag.d, 2 * c.n_in + 4)
    });

    run(report, config, "shira_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let (s, w) = setup::<E>(&c)?;
        let y = adapter_forward(backend, &s, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let (_, dm) = delta(&c, &s, &w);
        let w0 = M::new(c.n_out, c.n_in, wide(&t.w));
        s.delta_rows(backend, 0, MatMut::new(&mut t.w, c.n_out, c.n_in).map_err(fail)?, Accum::Add, 1.0, &mut [])
            .map_err(fail)?;
        let ym = base_forward(backend, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x, c.t)?;
        let x = M::new(c.t, c.n_in, wide(&t.x));
        let mag = x.abs().mul_t(&w0.abs().add(&dm)).scale(3.0);
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.d, 2 * c.n_in + 4)
    });

    run(report, config, "shira_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (s, w) = setup::<E>(&c)?;
        let (_, dm) = delta(&c, &s, &w);
        super::check_delta_guard(backend, &s, &t.w, &dm.d)
    });

    run(report, config, "shira_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (s, w) = setup::<E>(&c)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let mut gw = vec![E::ZERO; w.len()];
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let (xv, gv) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        s.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), &mut gw, &mut [])
            .map_err(fail)?;
        let (wm, gm) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], v: &[f64]| {
            let (d, _) = delta(&c, &s, v);
            oracle::dot(&gm, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&wm.add(&d)))
        };
        let xw = wide(&t.x);
        let scale = 2.0 * (c.t * c.n_out * c.n_in) as f64;
        let k = c.t + c.n_out + 2 * c.n_in + 4;
        close_norm::<E>("dw", &wide(&gw), &oracle::grad_fd(&w, 1e-6, |p| loss(&xw, p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &w)), scale, k)
    });
}
