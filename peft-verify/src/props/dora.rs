//! DoRA: the identity at init, the forward against the oracle, merged
//! equals unmerged, unmerge restores, gradients against finite
//! differences (the norm held constant, as PEFT detaches it).
use peft_core::dora::{Dora, DoraGrads, backward_scratch_len, refresh_scratch_len};
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::{Backend, Dense, FrozenLinear, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, bound, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// A magnitude in `[0.5, 2)` per output row, from the case's seed.
fn magnitude(c: &LoraCase) -> Vec<f64> {
    let mut rng = Rng::new(c.seed);
    (0..c.n_out).map(|_| rng.uniform_range(0.5, 2.0)).collect()
}

/// `|x| (|W| + s |B| |A|)^T`: the magnitude of `z` summed term by term (the
/// base and low-rank parts may cancel in `z` itself).
fn z_mag<E: Precision>(c: &LoraCase, t: &Tensors<E>) -> M {
    let x = M::new(c.t, c.n_in, wide(&t.x)).abs();
    let (w, a, b) =
        (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.r, c.n_in, wide(&t.a)), M::new(c.n_out, c.r, wide(&t.b)));
    x.mul_t(&w.abs()).add(&x.mul_t(&a.abs()).mul_t(&b.abs()).scale(c.scale()))
}

/// `V = W + s B A` of the rounded tensors, and its row norms, in f64.
fn v_and_norms<E: Precision>(c: &LoraCase, t: &Tensors<E>) -> (M, Vec<f64>) {
    let (w, a, b) =
        (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.r, c.n_in, wide(&t.a)), M::new(c.n_out, c.r, wide(&t.b)));
    let v = w.add(&b.mul(&a).scale(c.scale()));
    let n = (0..c.n_out).map(|i| (0..c.n_in).map(|j| v.at(i, j).powi(2)).sum::<f64>().sqrt()).collect();
    (v, n)
}

/// DoRA divides by the row norms of `W + s B A` (PEFT adds no epsilon): a
/// zero row is NaN in both. The properties take rows whose norm is at
/// least 0.05 (entries are in [-1, 1]).
fn well_posed<E: Precision>(c: &LoraCase, t: &Tensors<E>) -> Result<(), TestCaseError> {
    let (_, n) = v_and_norms(c, t);
    let w = M::new(c.n_out, c.n_in, wide(&t.w));
    let nw = (0..c.n_out).map(|i| (0..c.n_in).map(|j| w.at(i, j).powi(2)).sum::<f64>().sqrt());
    prop_assume!(n.iter().all(|v| *v >= 0.05), "a row of W + s B A is (nearly) zero");
    prop_assume!(nw.into_iter().all(|v| v >= 0.05), "a row of W is (nearly) zero");
    Ok(())
}

/// The adapter over the case's tensors (magnitude `m`), norms refreshed.
fn dora<'t, E: Precision, B: Backend<E>>(
    backend: &B,
    c: &LoraCase,
    t: &'t Tensors<E>,
    m: &'t [E],
    base: &Dense<'_, E>,
) -> Result<Dora<E, &'t [E], Vec<E>>, TestCaseError> {
    let mut d = Dora::new(&c.config(), c.n_in, c.n_out, &t.a[..], &t.b[..], m, vec![E::ZERO; c.n_out]).map_err(fail)?;
    let mut scratch = vec![E::ZERO; refresh_scratch_len(base, 2)];
    d.refresh_norms(backend, base, &mut scratch).map_err(fail)?;
    Ok(d)
}

fn base_of<'w, E: Precision>(c: &LoraCase, w: &'w [E], bias: Option<&'w [E]>) -> Result<Dense<'w, E>, TestCaseError> {
    let base = Dense::new(w, c.n_out, c.n_in).map_err(fail)?;
    match bias {
        Some(b) => base.with_bias(b).map_err(fail),
        None => Ok(base),
    }
}

fn forward<E: Precision, B: Backend<E>>(
    backend: &B,
    d: &Dora<E, &[E], Vec<E>>,
    base: &Dense<'_, E>,
    c: &LoraCase,
    x: &[E],
) -> Result<Vec<E>, TestCaseError> {
    let mut y = vec![E::ZERO; c.t * c.n_out];
    let mut scratch = vec![E::ZERO; c.t * c.r];
    let (xv, yv) = (MatRef::new(x, c.t, c.n_in).map_err(fail)?, MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?);
    d.forward(backend, base, xv, yv, &mut scratch).map_err(fail)?;
    Ok(y)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();

    run(report, config, "dora_identity_at_init", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        well_posed(&c, &t)?;
        let base = base_of(&c, &t.w, t.bias.as_deref())?;
        let mut yb = vec![E::ZERO; c.t * c.n_out];
        let x = MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?;
        base.forward(backend, x, MatMut::new(&mut yb, c.t, c.n_out).map_err(fail)?).map_err(fail)?;
        let mut m = vec![E::ZERO; c.n_out];
        let mut d =
            Dora::new(&c.config(), c.n_in, c.n_out, &mut t.a[..], &mut t.b[..], &mut m[..], vec![E::ZERO; c.n_out])
                .map_err(fail)?;
        let mut scratch = vec![E::ZERO; refresh_scratch_len(&base, 1)];
        d.init_adapter(backend, &base, &mut Rng::new(c.seed), &mut scratch).map_err(fail)?;
        prop_assert!(d.lora().lora_b().iter().all(|v| v.to_f64() == 0.0), "B is not zero at init");
        prop_assert!(d.magnitude() == d.norms(), "m != ||W||_row at init");
        let mut y = vec![E::ZERO; c.t * c.n_out];
        let mut sc = vec![E::ZERO; c.t * c.r];
        d.forward(backend, &base, x, MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?, &mut sc).map_err(fail)?;
        // m / n = 1 exactly and B = 0: the base's output (x W^T rounded,
        // times 1, plus the bias rounded once, as the base's own forward).
        for (i, (got, want)) in y.iter().zip(&yb).enumerate() {
            prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
        }
        Ok(())
    });

    run(report, config, "dora_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        well_posed(&c, &t)?;
        let m: Vec<E> = narrow(&magnitude(&c));
        let base = base_of(&c, &t.w, t.bias.as_deref())?;
        let d = dora(backend, &c, &t, &m, &base)?;
        let y = forward(backend, &d, &base, &c, &t.x)?;
        let (v, n) = v_and_norms(&c, &t);
        let x = M::new(c.t, c.n_in, wide(&t.x));
        let (z, zmag) = (x.mul_t(&v), z_mag(&c, &t));
        let bias = t.bias.as_deref().map(wide).unwrap_or_else(|| vec![0.0; c.n_out]);
        let (mut want, mut mag) = (vec![0.0; c.t * c.n_out], vec![0.0; c.t * c.n_out]);
        for i in 0..c.t {
            for j in 0..c.n_out {
                let ratio = m[j].to_f64() / n[j];
                want[i * c.n_out + j] = bias[j] + ratio * z.at(i, j);
                // Five roundings to E where LoRA has two: the base product,
                // the low-rank sum, x A^T, the norm and the scaling.
                mag[i * c.n_out + j] = 2.5 * (bias[j].abs() + ratio.abs() * zmag.at(i, j));
            }
        }
        close::<E>("y", &wide(&y), &want, &mag, 2 * c.n_in + c.r + 6)
    });

    run(report, config, "dora_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        well_posed(&c, &t)?;
        let m: Vec<E> = narrow(&magnitude(&c));
        let (v, n) = v_and_norms(&c, &t);
        let zmag = z_mag(&c, &t);
        let unmerged = {
            let base = base_of(&c, &t.w, t.bias.as_deref())?;
            let d = dora(backend, &c, &t, &m, &base)?;
            forward(backend, &d, &base, &c, &t.x)?
        };
        let (a, b, x, bias) = (t.a.clone(), t.b.clone(), t.x.clone(), t.bias.clone());
        let d =
            Dora::new(&c.config(), c.n_in, c.n_out, &a[..], &b[..], &m[..], vec![E::ZERO; c.n_out]).map_err(fail)?;
        let mut norms = vec![E::ZERO; c.n_out];
        let guard = d.merge_into(backend, MergeTarget::new(&mut t.w), &mut norms).map_err(fail)?;
        let merged_base = match &bias {
            Some(bv) => guard.base().with_bias(bv).map_err(fail)?,
            None => guard.base(),
        };
        let mut y = vec![E::ZERO; c.t * c.n_out];
        merged_base
            .forward(
                backend,
                MatRef::new(&x, c.t, c.n_in).map_err(fail)?,
                MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?,
            )
            .map_err(fail)?;
        let _ = &v;
        let bias_abs: Vec<f64> = bias.as_deref().map(wide).unwrap_or_else(|| vec![0.0; c.n_out]);
        let mag: Vec<f64> = (0..c.t * c.n_out)
            .map(|k| 3.0 * (bias_abs[k % c.n_out].abs() + m[k % c.n_out].to_f64() / n[k % c.n_out] * zmag.d[k]))
            .collect();
        close::<E>("merged y", &wide(&y), &wide(&unmerged), &mag, 2 * c.n_in + c.r + 8)
    });

    run(report, config, "dora_unmerge_restores", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        well_posed(&c, &t)?;
        let w0 = t.w.clone();
        let m: Vec<E> = narrow(&magnitude(&c));
        let (a, b) = (t.a.clone(), t.b.clone());
        let d =
            Dora::new(&c.config(), c.n_in, c.n_out, &a[..], &b[..], &m[..], vec![E::ZERO; c.n_out]).map_err(fail)?;
        let mut backup = vec![E::ZERO; w0.len()];
        let mut norms = vec![E::ZERO; c.n_out];
        d.merge_into(backend, MergeTarget::new(&mut t.w).with_backup(&mut backup), &mut norms)
            .map_err(fail)?
            .unmerge()
            .map_err(fail)?;
        prop_assert!(
            t.w.iter().zip(&w0).all(|(p, q)| p.to_bits64() == q.to_bits64()),
            "backup restore is not bit-exact"
        );
        d.merge_into(backend, MergeTarget::new(&mut t.w), &mut norms).map_err(fail)?.unmerge().map_err(fail)?;
        // Without a backup: V = W + p rounded, scaled by m / n, scaled back
        // by n / m, then - p: four roundings of values of size |W| + |p|
        // (times the ratio and back), plus the product's own (twice).
        let p = M::new(c.n_out, c.r, wide(&b)).abs().mul(&M::new(c.r, c.n_in, wide(&a)).abs()).scale(c.scale());
        let (_, n) = v_and_norms(&c, &t);
        for (i, (got, want)) in t.w.iter().zip(&w0).enumerate() {
            let row = i / c.n_in;
            let ratio = m[row].to_f64() / n[row];
            let size = want.to_f64().abs() + p.d[i];
            let tol = 8.0 * E::U * size * (1.0 + ratio.max(1.0 / ratio)) + 2.0 * bound::<E>(c.r, p.d[i]);
            prop_assert!(
                (got.to_f64() - want.to_f64()).abs() <= tol,
                "W[{}] drifted {} > {}",
                i,
                (got.to_f64() - want.to_f64()).abs(),
                tol
            );
        }
        Ok(())
    });

    run(report, config, "dora_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        well_posed(&c, &t)?;
        let m: Vec<E> = narrow(&magnitude(&c));
        let base = base_of(&c, &t.w, None)?;
        let d = dora(backend, &c, &t, &m, &base)?;
        let (mut ga, mut gb, mut gm, mut gx) = (
            vec![E::ZERO; c.r * c.n_in],
            vec![E::ZERO; c.n_out * c.r],
            vec![E::ZERO; c.n_out],
            vec![E::ZERO; c.t * c.n_in],
        );
        let mut scratch = vec![E::ZERO; backward_scratch_len(c.t, c.n_out, c.r)];
        d.backward(
            backend,
            &base,
            MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?,
            MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?,
            Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?),
            DoraGrads { a: &mut ga, b: &mut gb, magnitude: &mut gm },
            &mut scratch,
        )
        .map_err(fail)?;
        // The norm is held at its value for the tensors as given (detached).
        let (_, n0) = v_and_norms(&c, &t);
        let (w, s, gm_) = (M::new(c.n_out, c.n_in, wide(&t.w)), c.scale(), M::new(c.t, c.n_out, wide(&t.g)));
        let loss = |x: &[f64], a: &[f64], b: &[f64], mv: &[f64]| {
            let v = w.add(&M::new(c.n_out, c.r, b.to_vec()).mul(&M::new(c.r, c.n_in, a.to_vec())).scale(s));
            let z = M::new(c.t, c.n_in, x.to_vec()).mul_t(&v);
            let y =
                M::new(c.t, c.n_out, (0..c.t * c.n_out).map(|k| mv[k % c.n_out] / n0[k % c.n_out] * z.d[k]).collect());
            oracle::dot(&gm_, &y)
        };
        let (xw, aw, bw, mw) = (wide(&t.x), wide(&t.a), wide(&t.b), wide(&m));
        let fa = oracle::grad_fd(&aw, 1e-6, |p| loss(&xw, p, &bw, &mw));
        let fb = oracle::grad_fd(&bw, 1e-6, |p| loss(&xw, &aw, p, &mw));
        let fm = oracle::grad_fd(&mw, 1e-6, |p| loss(&xw, &aw, &bw, p));
        let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &aw, &bw, &mw));
        let ratio_max = (0..c.n_out).map(|j| mw[j] / n0[j]).fold(1.0, f64::max);
        let scale = (s + 1.0) * ratio_max * (c.t * c.n_out * c.r.max(1) * c.n_in) as f64;
        let k = c.t + c.n_out + c.r + c.n_in;
        close_norm::<E>("dA", &wide(&ga), &fa, scale, k)?;
        close_norm::<E>("dB", &wide(&gb), &fb, scale, k)?;
        close_norm::<E>("dm", &wide(&gm), &fm, scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &fx, scale, k)
    });
}
