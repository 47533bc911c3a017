//! (IA)^3, both kinds (output and feedforward): identity at init, the
//! forward against the oracle, merged equals unmerged, unmerge restores,
//! gradients against finite differences.
use peft_core::ia3::Ia3;
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::{Backend, Dense, FrozenLinear, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The kind (from the seed's parity) and a vector in `[0.5, 1.5)`.
fn vector(c: &LoraCase) -> (bool, Vec<f64>) {
    let feedforward = c.seed % 2 == 1;
    let mut rng = Rng::new(c.seed);
    let n = if feedforward { c.n_in } else { c.n_out };
    (feedforward, (0..n).map(|_| rng.uniform_range(0.5, 1.5)).collect())
}

fn base_of<'w, E: Precision>(c: &LoraCase, w: &'w [E], bias: Option<&'w [E]>) -> Result<Dense<'w, E>, TestCaseError> {
    let base = Dense::new(w, c.n_out, c.n_in).map_err(fail)?;
    match bias {
        Some(b) => base.with_bias(b).map_err(fail),
        None => Ok(base),
    }
}

fn forward<E: Precision, B: Backend<E>, S: AsRef<[E]>>(
    backend: &B,
    ia3: &Ia3<E, S>,
    base: &Dense<'_, E>,
    c: &LoraCase,
    x: &[E],
) -> Result<Vec<E>, TestCaseError> {
    let mut y = vec![E::ZERO; c.t * c.n_out];
    let mut scratch = vec![E::ZERO; ia3.forward_scratch_len(c.t)];
    let (xv, yv) = (MatRef::new(x, c.t, c.n_in).map_err(fail)?, MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?);
    ia3.forward(backend, base, xv, yv, &mut scratch).map_err(fail)?;
    Ok(y)
}

/// The oracle's output and magnitude for the rounded tensors and vector.
fn oracle_y<E: Precision>(c: &LoraCase, t: &Tensors<E>, ff: bool, l: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let w = M::new(c.n_out, c.n_in, wide(&t.w));
    let mut x = M::new(c.t, c.n_in, wide(&t.x));
    if ff {
        x.d.iter_mut().enumerate().for_each(|(k, v)| *v *= l[k % c.n_in]);
    }
    let bias = t.bias.as_deref().map(wide).unwrap_or_else(|| vec![0.0; c.n_out]);
    let (mut y, mut mag) = (x.mul_t(&w), x.abs().mul_t(&w.abs()));
    for k in 0..c.t * c.n_out {
        let j = k % c.n_out;
        let f = if ff { 1.0 } else { l[j] };
        y.d[k] = (y.d[k] + bias[j]) * f;
        mag.d[k] = (mag.d[k] + bias[j].abs()) * f.abs();
    }
    (y.d, mag.d)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();

    run(report, config, "ia3_identity_at_init", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (ff, l) = vector(&c);
        let mut lv: Vec<E> = narrow(&l);
        let mut ia3 = Ia3::new(c.n_in, c.n_out, ff, &mut lv[..]).map_err(fail)?;
        ia3.init_adapter();
        let base = base_of(&c, &t.w, t.bias.as_deref())?;
        let y = forward(backend, &ia3, &base, &c, &t.x)?;
        let mut yb = vec![E::ZERO; c.t * c.n_out];
        let x = MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?;
        base.forward(backend, x, MatMut::new(&mut yb, c.t, c.n_out).map_err(fail)?).map_err(fail)?;
        // l = 1: multiplying by one is exact, so the base's own output.
        for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
        }
        Ok(())
    });

    run(report, config, "ia3_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (ff, l) = vector(&c);
        let lv: Vec<E> = narrow(&l);
        let ia3 = Ia3::new(c.n_in, c.n_out, ff, &lv[..]).map_err(fail)?;
        let base = base_of(&c, &t.w, t.bias.as_deref())?;
        let y = forward(backend, &ia3, &base, &c, &t.x)?;
        let (want, mag) = oracle_y(&c, &t, ff, &wide(&lv));
        // One more rounding than the base (x * l, or y * l).
        let mag: Vec<f64> = mag.iter().map(|m| 1.5 * m).collect();
        close::<E>("y", &wide(&y), &want, &mag, c.n_in + 3)
    });

    run(report, config, "ia3_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let (ff, l) = vector(&c);
        let lv: Vec<E> = narrow(&l);
        let ia3 = Ia3::new(c.n_in, c.n_out, ff, &lv[..]).map_err(fail)?;
        let unmerged = forward(backend, &ia3, &base_of(&c, &t.w, t.bias.as_deref())?, &c, &t.x)?;
        let (_, mag) = oracle_y(&c, &t, ff, &wide(&lv));
        let x = t.x.clone();
        let bias0 = t.bias.clone();
        let mut bias = t.bias.clone();
        let merged = ia3
            .merge_into(&Reference, MergeTarget::new(&mut t.w).with_bias_opt(bias.as_deref_mut()), &mut [])
            .map_err(fail)?;
        let mb = match (ff, bias0.as_deref()) {
            (true, Some(b)) => merged.base().with_bias(b).map_err(fail)?,
            _ => merged.base(),
        };
        let mut y = vec![E::ZERO; c.t * c.n_out];
        mb.forward(
            backend,
            MatRef::new(&x, c.t, c.n_in).map_err(fail)?,
            MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?,
        )
        .map_err(fail)?;
        let mag: Vec<f64> = mag.iter().map(|m| 3.0 * m).collect();
        close::<E>("merged y", &wide(&y), &wide(&unmerged), &mag, c.n_in + 4)
    });

    run(report, config, "ia3_unmerge_restores", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let (ff, l) = vector(&c);
        let lv: Vec<E> = narrow(&l);
        let ia3 = Ia3::new(c.n_in, c.n_out, ff, &lv[..]).map_err(fail)?;
        let (w0, b0) = (t.w.clone(), t.bias.clone());
        let mut bias = t.bias.clone();
        let mut backup = vec![E::ZERO; c.n_out * c.n_in + c.n_out];
        let need = c.n_out * c.n_in + if ff || bias.is_none() { 0 } else { c.n_out };
        ia3.merge_into(
            &Reference,
            MergeTarget::new(&mut t.w).with_backup(&mut backup[..need]).with_bias_opt(bias.as_deref_mut()),
            &mut [],
        )
        .map_err(fail)?
        .unmerge()
        .map_err(fail)?;
        prop_assert!(t.w.iter().zip(&w0).all(|(p, q)| p.to_bits64() == q.to_bits64()), "W not restored bit for bit");
        prop_assert!(bias == b0, "bias not restored");
        // Without a backup: two roundings (times l, divided by l) per value.
        ia3.merge_into(&Reference, MergeTarget::new(&mut t.w).with_bias_opt(bias.as_deref_mut()), &mut [])
            .map_err(fail)?
            .unmerge()
            .map_err(fail)?;
        for (i, (got, want)) in t.w.iter().zip(&w0).enumerate() {
            let tol = 3.0 * E::U * want.to_f64().abs() + 3.0 * E::ETA;
            prop_assert!((got.to_f64() - want.to_f64()).abs() <= tol, "W[{}]: {:?} vs {:?}", i, got, want);
        }
        Ok(())
    });

    run(report, config, "ia3_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let (ff, l) = vector(&c);
        let lv: Vec<E> = narrow(&l);
        let ia3 = Ia3::new(c.n_in, c.n_out, ff, &lv[..]).map_err(fail)?;
        let base = base_of(&c, &t.w, t.bias.as_deref())?;
        let (mut gl, mut gx) = (vec![E::ZERO; lv.len()], vec![E::ZERO; c.t * c.n_in]);
        let mut scratch = vec![E::ZERO; ia3.backward_scratch_len(c.t)];
        ia3.backward(
            backend,
            &base,
            MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?,
            MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?,
            Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?),
            &mut gl,
            &mut scratch,
        )
        .map_err(fail)?;
        let g = M::new(c.t, c.n_out, wide(&t.g));
        // The oracle on f64 values (x and l perturbed without rounding).
        let (w, bias) =
            (M::new(c.n_out, c.n_in, wide(&t.w)), t.bias.as_deref().map(wide).unwrap_or_else(|| vec![0.0; c.n_out]));
        let loss = |x: &[f64], l: &[f64]| {
            let mut xm = M::new(c.t, c.n_in, x.to_vec());
            if ff {
                xm.d.iter_mut().enumerate().for_each(|(k, v)| *v *= l[k % c.n_in]);
            }
            let mut y = xm.mul_t(&w);
            for k in 0..c.t * c.n_out {
                let j = k % c.n_out;
                y.d[k] = (y.d[k] + bias[j]) * if ff { 1.0 } else { l[j] };
            }
            oracle::dot(&g, &y)
        };
        let (xw, lw) = (wide(&t.x), wide(&lv));
        let fl = oracle::grad_fd(&lw, 1e-6, |p| loss(&xw, p));
        let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &lw));
        let scale = 2.0 * (c.t * c.n_out * c.n_in) as f64;
        let k = c.t + c.n_out + c.n_in;
        close_norm::<E>("dl", &wide(&gl), &fl, scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &fx, scale, k)
    });
}
