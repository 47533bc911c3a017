//! LN tuning: identity at PEFT's init, the forward against the oracle
//! (torch's LayerNorm and Llama's RMSNorm, written here from their
//! formulas), the merged norm against the unmerged forward, the
//! replacement's bit-exact unmerge, gradients against finite differences.
use peft_core::ln_tuning::{LnTuning, LnTuningGrads, Norm};
use peft_core::method::{MergeTarget, WeightUpdate};
use peft_core::{Backend, MatMut, MatRef, Reference};
use proptest::prelude::*;

use super::{bits, vals};
use crate::oracle;
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// One norm layer of width `d`, its base and trained parameters, and a
/// pass's input and output gradient.
#[derive(Clone, Debug)]
pub struct LnCase {
    t: usize,
    d: usize,
    norm: Norm,
    eps: f64,
    /// The base's weight and bias (the bias `None` for an RMSNorm or a
    /// LayerNorm without one).
    w0: Vec<f64>,
    b0: Option<Vec<f64>>,
    /// The adapter's.
    w: Vec<f64>,
    b: Option<Vec<f64>>,
    x: Vec<f64>,
    g: Vec<f64>,
}

/// Up to `max_t` rows of width up to `max_d`; `eps` in `[1e-3, 0.1)` keeps
/// `1 / sqrt(var + eps)` at most 32, which the finite differences need.
fn case_in((max_t, max_d): (usize, usize)) -> impl Strategy<Value = LnCase> {
    (1usize..=max_t, 1usize..=max_d, 0u8..3, 1e-3f64..0.1).prop_flat_map(|(t, d, kind, eps)| {
        let (norm, bias) = match kind {
            0 => (Norm::Layer, true),
            1 => (Norm::Layer, false),
            _ => (Norm::Rms, false),
        };
        let b = move || if bias { vals(d).prop_map(Some).boxed() } else { Just(None).boxed() };
        (vals(d), b(), vals(d), b(), vals(t * d), vals(t * d)).prop_map(move |(w0, b0, w, b, x, g)| LnCase {
            t,
            d,
            norm,
            eps,
            w0,
            b0,
            w: w.iter().map(|v| 1.0 + 0.5 * v).collect(),
            b,
            x,
            g,
        })
    })
}

/// The oracle: `y [t, d]` of the norm with parameters `w`, `b`, in f64
/// (two passes: the mean, then the biased variance, as torch defines
/// them).
fn oracle_norm(c: &LnCase, x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let d = c.d as f64;
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(c.d) {
        let mean = if c.norm == Norm::Layer { row.iter().sum::<f64>() / d } else { 0.0 };
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d;
        let r = 1.0 / (var + c.eps).sqrt();
        for (j, v) in row.iter().enumerate() {
            y.push((v - mean) * r * w[j] + b.map_or(0.0, |b| b[j]));
        }
    }
    y
}

/// `|xhat w| + |b|` per element: the output's magnitude for the bounds.
fn magnitude(c: &LnCase, x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let aw: Vec<f64> = w.iter().map(|v| v.abs()).collect();
    let ab: Option<Vec<f64>> = b.map(|b| b.iter().map(|v| v.abs()).collect());
    let zero = vec![0.0; c.d];
    let y = oracle_norm(c, x, &aw, None);
    y.iter().enumerate().map(|(i, v)| v.abs() + ab.as_deref().unwrap_or(&zero)[i % c.d]).collect()
}

/// The adapter over the case's trained parameters in `E`.
type Layer<E> = LnTuning<E, Vec<E>>;

fn adapter<E: Precision>(c: &LnCase) -> Result<Layer<E>, TestCaseError> {
    LnTuning::new(c.norm, c.d, c.eps, narrow(&c.w), c.b.as_deref().map(narrow)).map_err(fail)
}

fn forward<E: Precision>(l: &LnTuning<E, impl AsRef<[E]>>, c: &LnCase, x: &[E]) -> Result<Vec<E>, TestCaseError> {
    let mut y = vec![E::ZERO; c.t * c.d];
    let (xv, yv) = (MatRef::new(x, c.t, c.d).map_err(fail)?, MatMut::new(&mut y, c.t, c.d).map_err(fail)?);
    l.forward(xv, yv).map_err(fail)?;
    Ok(y)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();

    run(report, config, "ln_tuning_identity_at_init", name, case_in(dims), |c| {
        let (w0, b0, x) = (narrow::<E>(&c.w0), c.b0.as_deref().map(narrow::<E>), narrow::<E>(&c.x));
        let mut l = adapter::<E>(&c)?;
        l.init_from_base(&w0, b0.as_deref()).map_err(fail)?;
        let base = LnTuning::new(c.norm, c.d, c.eps, &w0[..], b0.as_deref()).map_err(fail)?;
        let (y, yb) = (forward(&l, &c, &x)?, forward(&base, &c, &x)?);
        prop_assert!(bits(&y) == bits(&yb), "the fresh adapter's output is not the base norm's");
        prop_assert!(bits(l.weight()) == bits(&w0), "the fresh weight is not a copy of the base's");
        Ok(())
    });

    run(report, config, "ln_tuning_matches_oracle", name, case_in(dims), |c| {
        let l = adapter::<E>(&c)?;
        let y = forward(&l, &c, &narrow::<E>(&c.x))?;
        let (x, w, b) = (wide(&narrow::<E>(&c.x)), wide(l.weight()), l.bias().map(wide));
        let want = oracle_norm(&c, &x, &w, b.as_deref());
        close::<E>("y", &wide(&y), &want, &magnitude(&c, &x, &w, b.as_deref()), 2 * c.d + 4)
    });

    run(report, config, "ln_tuning_merged_equals_unmerged", name, case_in(dims), |c| {
        // The merged base norm is the adapter's values: its output is the
        // unmerged adapter's, bit for bit.
        let l = adapter::<E>(&c)?;
        let x = narrow::<E>(&c.x);
        let (mut w, mut b) = (narrow::<E>(&c.w0), c.b0.as_deref().map(narrow::<E>));
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.d)];
        let guard = l.merge_into(backend, MergeTarget::new(&mut w).with_bias_opt(b.as_deref_mut()), &mut sc);
        let kept_w = guard.map_err(fail)?.keep().to_vec();
        let merged = LnTuning::new(c.norm, c.d, c.eps, &kept_w[..], b.as_deref()).map_err(fail)?;
        let (y, ym) = (forward(&l, &c, &x)?, forward(&merged, &c, &x)?);
        prop_assert!(bits(&y) == bits(&ym), "the merged norm's output differs from the unmerged adapter's");
        Ok(())
    });

    run(report, config, "ln_tuning_unmerge_restores", name, case_in(dims), |c| {
        let l = adapter::<E>(&c)?;
        let (w0, b0) = (narrow::<E>(&c.w0), c.b0.as_deref().map(narrow::<E>));
        let (mut w, mut b) = (w0.clone(), b0.clone());
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.d)];
        let target = MergeTarget::new(&mut w).with_bias_opt(b.as_deref_mut());
        let guard = l.merge_into(backend, target, &mut sc).map_err(fail)?;
        prop_assert!(bits(guard.weight()) == bits(l.weight()), "merged weight is not the adapter's");
        if let (Some(got), Some(own)) = (guard.bias(), l.bias()) {
            prop_assert!(bits(got) == bits(own), "merged bias is not the adapter's");
        }
        guard.unmerge().map_err(fail)?;
        prop_assert!(bits(&w) == bits(&w0), "the unmerge did not restore the weight bit for bit");
        prop_assert!(
            b.as_deref().map(bits::<E>) == b0.as_deref().map(bits::<E>),
            "the unmerge did not restore the bias"
        );
        Ok(())
    });

    run(report, config, "ln_tuning_gradients_match_fd", name, case_in((6, 10)), |c| {
        let l = adapter::<E>(&c)?;
        let (x, gy) = (narrow::<E>(&c.x), narrow::<E>(&c.g));
        let (mut gw, mut gb, mut gx) =
            (vec![E::ZERO; c.d], l.bias().map(|_| vec![E::ZERO; c.d]), vec![E::ZERO; x.len()]);
        let grads = LnTuningGrads { weight: &mut gw, bias: gb.as_deref_mut() };
        let (xv, gv) = (MatRef::new(&x, c.t, c.d).map_err(fail)?, MatRef::new(&gy, c.t, c.d).map_err(fail)?);
        l.backward(xv, gv, Some(MatMut::new(&mut gx, c.t, c.d).map_err(fail)?), grads).map_err(fail)?;
        let (xw, gw64, w, b) = (wide(&x), wide(&gy), wide(l.weight()), l.bias().map(wide));
        let loss = |x: &[f64], w: &[f64], b: Option<&[f64]>| {
            oracle_norm(&c, x, w, b).iter().zip(&gw64).map(|(y, g)| y * g).sum::<f64>()
        };
        let scale = 4.0 * (c.t * c.d) as f64 / c.eps.sqrt();
        let k = 2 * c.t + 2 * c.d + 4;
        close_norm::<E>("dw", &wide(&gw), &oracle::grad_fd(&w, 1e-6, |p| loss(&xw, p, b.as_deref())), scale, k)?;
        if let (Some(gb), Some(b)) = (&gb, &b) {
            close_norm::<E>("db", &wide(gb), &oracle::grad_fd(b, 1e-6, |p| loss(&xw, &w, Some(p))), scale, k)?;
        }
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &w, b.as_deref())), scale, k)
    });
}
