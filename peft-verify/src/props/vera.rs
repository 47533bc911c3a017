//! VeRA: identity at init, the forward against the oracle, the merged
//! weight against the unmerged forward, the typed merge's unmerge,
//! gradients against finite differences. The shared projections are drawn
//! wider than the layer (up to 2 more inputs and outputs), so a wrong slice
//! of `vera_A` or `vera_B` fails the oracle.
use peft_core::delta::DeltaRows;
use peft_core::method::LinearAdapter;
use peft_core::vera::{D_INITIAL, Vera, VeraGrads, VeraProjection};
use peft_core::{Accum, Backend, Dense, FrozenLinear, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The projections' widths and `[vera_A, vera_B, lambda_d, lambda_b]`
/// drawn from the seed (uniform in `[-1, 1)`).
fn tensors(c: &LoraCase) -> (usize, usize, [Vec<f64>; 4]) {
    let (max_in, max_out) = (c.n_in + (c.seed % 3) as usize, c.n_out + ((c.seed / 3) % 3) as usize);
    let mut rng = Rng::new(c.seed);
    let mut v = |n: usize| (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect::<Vec<f64>>();
    (max_in, max_out, [v(c.r * max_in), v(max_out * c.r), v(c.r), v(c.n_out)])
}

/// `dW = diag(lambda_b) B diag(lambda_d) A` with `A = vera_A[:, :in]`, `B =
/// vera_B[:out, :]`, and its magnitude, from the rounded tensors.
fn delta(c: &LoraCase, max_in: usize, t: &[Vec<f64>; 4]) -> (M, M) {
    let a = M::new(c.r, c.n_in, (0..c.r).flat_map(|k| t[0][k * max_in..k * max_in + c.n_in].to_vec()).collect());
    let bs = |abs: bool| {
        let d = (0..c.n_out)
            .flat_map(|j| (0..c.r).map(move |k| (j, k)))
            .map(|(j, k)| t[3][j] * t[1][j * c.r + k] * t[2][k])
            .map(|v| if abs { v.abs() } else { v })
            .collect();
        M::new(c.n_out, c.r, d)
    };
    (bs(false).mul(&a), bs(true).mul(&a.abs()))
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    type Parts<E> = (VeraProjection<E, Vec<E>>, Vera<E, Vec<E>>);
    let parts = |c: &LoraCase, max_in: usize, max_out: usize, t: &[Vec<E>; 4]| -> Result<Parts<E>, TestCaseError> {
        let proj = VeraProjection::new(c.r, max_in, max_out, t[0].clone(), t[1].clone()).map_err(fail)?;
        Ok((proj, Vera::new(c.r, c.n_in, c.n_out, t[2].clone(), t[3].clone()).map_err(fail)?))
    };
    let fwd = |c: &LoraCase, (p, v): &Parts<E>, base: &Dense<'_, E>, x: &[E]| -> Result<Vec<E>, TestCaseError> {
        let mut y = vec![E::ZERO; c.t * c.n_out];
        let mut sc = vec![E::ZERO; v.bound(p).forward_scratch_len(c.t)];
        let (xv, yv) = (MatRef::new(x, c.t, c.n_in).map_err(fail)?, MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?);
        v.bound(p).forward(backend, base, xv, yv, &mut sc).map_err(fail)?;
        Ok(y)
    };

    run(report, config, "vera_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mi, mo, f) = tensors(&c);
        let mut parts = parts(&c, mi, mo, &f.map(|v| narrow(&v)))?;
        parts.1.init_adapter(D_INITIAL);
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = fwd(&c, &parts, &base, &t.x)?;
        let mut yb = vec![E::ZERO; c.t * c.n_out];
        base.forward(
            backend,
            MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?,
            MatMut::new(&mut yb, c.t, c.n_out).map_err(fail)?,
        )
        .map_err(fail)?;
        // lambda_b = 0: the delta adds exact zeros.
        for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
        }
        Ok(())
    });

    run(report, config, "vera_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mi, mo, f) = tensors(&c);
        let f: [Vec<E>; 4] = f.map(|v| narrow(&v));
        let parts = parts(&c, mi, mo, &f)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let y = fwd(&c, &parts, &base, &t.x)?;
        let (d, dm) = delta(&c, mi, &f.map(|v| wide(&v)));
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let want = x.mul_t(&w.add(&d));
        // x A^T, its lambda_d scaling and z each round once more to E.
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(3.0);
        close::<E>("y", &wide(&y), &want.d, &mag.d, c.n_in + 2 * c.r + 4)
    });

    run(report, config, "vera_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let w0 = t.w.clone();
        let (mi, mo, f) = tensors(&c);
        let f: [Vec<E>; 4] = f.map(|v| narrow(&v));
        let parts = parts(&c, mi, mo, &f)?;
        let y = fwd(&c, &parts, &Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?, &t.x)?;
        let mut sc = vec![E::ZERO; parts.1.bound(&parts.0).delta_scratch_len(c.n_out)];
        let dst = MatMut::new(&mut t.w, c.n_out, c.n_in).map_err(fail)?;
        parts.1.bound(&parts.0).delta_rows(backend, 0, dst, Accum::Add, 1.0, &mut sc).map_err(fail)?;
        let mut ym = vec![E::ZERO; c.t * c.n_out];
        Dense::new(&t.w, c.n_out, c.n_in)
            .map_err(fail)?
            .forward(
                backend,
                MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?,
                MatMut::new(&mut ym, c.t, c.n_out).map_err(fail)?,
            )
            .map_err(fail)?;
        let (_, dm) = delta(&c, mi, &f.map(|v| wide(&v)));
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&w0)));
        let mag = x.abs().mul_t(&w.abs().add(&dm)).scale(4.0);
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.d, c.n_in + 2 * c.r + 4)
    });

    run(report, config, "vera_unmerge_restores", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (mi, mo, f) = tensors(&c);
        let f: [Vec<E>; 4] = f.map(|v| narrow(&v));
        let (proj, layer) = parts(&c, mi, mo, &f)?;
        let (_, dm) = delta(&c, mi, &f.map(|v| wide(&v)));
        super::check_delta_guard(backend, &layer.bound(&proj), &t.w, &dm.d)
    });

    run(report, config, "vera_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (mi, mo, f) = tensors(&c);
        let f: [Vec<E>; 4] = f.map(|v| narrow(&v));
        let parts = parts(&c, mi, mo, &f)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let (mut gd, mut gb) = (vec![E::ZERO; c.r], vec![E::ZERO; c.n_out]);
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; parts.1.bound(&parts.0).backward_scratch_len(c.t)];
        let (xv, gv) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        let grads = VeraGrads { lambda_d: &mut gd, lambda_b: &mut gb };
        let gxv = MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?;
        parts.1.bound(&parts.0).backward(backend, &base, xv, gv, Some(gxv), grads, &mut sc).map_err(fail)?;
        let fw: [Vec<f64>; 4] = f.map(|v| wide(&v));
        let (w, gm) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], f: &[Vec<f64>; 4]| {
            let (d, _) = delta(&c, mi, f);
            oracle::dot(&gm, &M::new(c.t, c.n_in, x.to_vec()).mul_t(&w.add(&d)))
        };
        let xw = wide(&t.x);
        let scale = (c.t * c.n_out * c.n_in * c.r) as f64;
        let k = c.t + c.n_out + c.n_in + 2 * c.r;
        for (i, got) in [(2, &gd), (3, &gb)] {
            let fd = oracle::grad_fd(&fw[i], 1e-6, |p| {
                let mut f2 = fw.clone();
                f2[i] = p.to_vec();
                loss(&xw, &f2)
            });
            close_norm::<E>(["", "", "dlambda_d", "dlambda_b"][i], &wide(got), &fd, scale, k)?;
        }
        let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &fw));
        close_norm::<E>("dx", &wide(&gx), &fx, scale, k)
    });
}
