//! LoRA: init, forward against the oracle, merge and unmerge, gradients,
//! targets, the parameter report.
use peft_core::lora::{Lora, LoraConfig, LoraGrads, ParamReport};
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::{Backend, Dense, FrozenLinear, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::vals;
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

/// A LoRA layer and inputs, shape-matched.
#[derive(Debug, Clone)]
pub struct LoraCase {
    pub t: usize,
    pub n_in: usize,
    pub n_out: usize,
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub w: Vec<f64>,
    pub bias: Option<Vec<f64>>,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub x: Vec<f64>,
    pub g: Vec<f64>,
    pub seed: u64,
}

/// Small shapes (up to 6 tokens, 10 features).
pub fn case() -> impl Strategy<Value = LoraCase> {
    case_in((6, 10))
}

/// Shapes up to `max_t` tokens and `max_d` features in and out.
pub fn case_in((max_t, max_d): (usize, usize)) -> impl Strategy<Value = LoraCase> {
    (1usize..=max_t, 1usize..=max_d, 1usize..=max_d)
        .prop_flat_map(|(t, n_in, n_out)| (Just((t, n_in, n_out)), 1..=n_in.min(n_out)))
        .prop_flat_map(|((t, n_in, n_out), r)| {
            (
                (0.5f64..16.0, any::<bool>(), proptest::option::of(vals(n_out)), any::<u64>()),
                (vals(n_out * n_in), vals(r * n_in), vals(n_out * r), vals(t * n_in), vals(t * n_out)),
            )
                .prop_map(move |((alpha, rslora, bias, seed), (w, a, b, x, g))| LoraCase {
                    t,
                    n_in,
                    n_out,
                    r,
                    alpha,
                    rslora,
                    w,
                    bias,
                    a,
                    b,
                    x,
                    g,
                    seed,
                })
        })
}

impl LoraCase {
    pub fn config(&self) -> LoraConfig<'static> {
        LoraConfig::new(self.r, self.alpha).with_rslora(self.rslora)
    }

    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }
}

/// The case's tensors rounded to `E`.
pub struct Tensors<E> {
    pub w: Vec<E>,
    pub bias: Option<Vec<E>>,
    pub a: Vec<E>,
    pub b: Vec<E>,
    pub x: Vec<E>,
    pub g: Vec<E>,
}

impl<E: Precision> Tensors<E> {
    pub fn of(c: &LoraCase) -> Self {
        Self {
            w: narrow(&c.w),
            bias: c.bias.as_deref().map(narrow),
            a: narrow(&c.a),
            b: narrow(&c.b),
            x: narrow(&c.x),
            g: narrow(&c.g),
        }
    }
}

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

impl<E: Precision> Tensors<E> {
    /// The frozen base, with the case's bias.
    fn base(&self, c: &LoraCase) -> Result<Dense<'_, E>, TestCaseError> {
        let base = Dense::new(&self.w, c.n_out, c.n_in).map_err(fail)?;
        match &self.bias {
            Some(b) => base.with_bias(b).map_err(fail),
            None => Ok(base),
        }
    }

    /// The adapter over this case's `A` and `B`.
    fn lora(&self, c: &LoraCase) -> Result<Lora<E, &[E]>, TestCaseError> {
        Lora::new(&c.config(), c.n_in, c.n_out, &self.a[..], &self.b[..]).map_err(fail)
    }
}

/// The oracle's output and its magnitude for the tensors as rounded.
fn oracle_y<E: Precision>(c: &LoraCase, t: &Tensors<E>) -> (Vec<f64>, Vec<f64>) {
    let m = |d: &[E], r, cols| M::new(r, cols, wide(d));
    let (x, w, a, b) = (m(&t.x, c.t, c.n_in), m(&t.w, c.n_out, c.n_in), m(&t.a, c.r, c.n_in), m(&t.b, c.n_out, c.r));
    let bias = t.bias.as_deref().map(wide);
    let y = oracle::lora(&x, &w, bias.as_deref(), &a, &b, c.scale());
    let abs_bias = bias.as_ref().map(|v| v.iter().map(|x| x.abs()).collect::<Vec<_>>());
    let mag = oracle::lora(&x.abs(), &w.abs(), abs_bias.as_deref(), &a.abs(), &b.abs(), c.scale().abs());
    (y.d, mag.d)
}

fn forward<E: Precision, B: Backend<E>, S: AsRef<[E]>>(
    backend: &B,
    layer: &Lora<E, S>,
    base: &Dense<'_, E>,
    c: &LoraCase,
    x: &[E],
) -> Result<Vec<E>, B::Error> {
    let mut y = vec![E::ZERO; c.t * c.n_out];
    let mut scratch = vec![E::ZERO; layer.forward_scratch_len(c.t)];
    layer.forward(backend, base, MatRef::new(x, c.t, c.n_in)?, MatMut::new(&mut y, c.t, c.n_out)?, &mut scratch)?;
    Ok(y)
}

/// The merged base's forward, `x W'^T + b`.
fn base_forward<E: Precision, B: Backend<E>>(
    backend: &B,
    base: &Dense<'_, E>,
    c: &LoraCase,
    x: &[E],
) -> Result<Vec<E>, B::Error> {
    let mut y = vec![E::ZERO; c.t * c.n_out];
    base.forward(backend, MatRef::new(x, c.t, c.n_in)?, MatMut::new(&mut y, c.t, c.n_out)?)?;
    Ok(y)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    // Forward-type properties follow the profile's shapes; the gradient
    // properties (finite differences over every parameter) stay small.
    let dims = config.method_dims();
    run(report, config, "lora_identity_at_init", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let base = {
            let mut y = vec![E::ZERO; c.t * c.n_out];
            let x = MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?;
            let w = MatRef::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
            backend
                .gemm(
                    MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?,
                    peft_core::Accum::Replace,
                    x,
                    peft_core::Op::N,
                    w,
                    peft_core::Op::T,
                    <E::Accum as peft_core::Element>::from_f64(1.0),
                )
                .map_err(fail)?;
            if let Some(bias) = &t.bias {
                for row in y.chunks_exact_mut(c.n_out) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v = E::from_f64(v.to_f64() + b.to_f64());
                    }
                }
            }
            y
        };
        let x = t.x.clone();
        let cfg = c.config();
        let mut layer = Lora::new(&cfg, c.n_in, c.n_out, &mut t.a[..], &mut t.b[..]).map_err(fail)?;
        layer.init_adapter(&mut Rng::new(c.seed));
        let base_w = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let base_w = match &t.bias {
            Some(b) => base_w.with_bias(b).map_err(fail)?,
            None => base_w,
        };
        prop_assert!(layer.lora_b().iter().all(|v| v.to_f64() == 0.0), "B is not zero at init");
        prop_assert!(
            layer.lora_a().iter().any(|v| v.to_f64() != 0.0),
            "A is all zero at init (no gradient would flow to B)"
        );
        let y = forward(backend, &layer, &base_w, &c, &x).map_err(fail)?;
        // Exactly the base output: x W^T (+ b), whatever the backend's
        // rounding, because adding s * 0 changes nothing (-0 aside).
        for (i, (got, want)) in y.iter().zip(&base).enumerate() {
            if c.bias.is_none() {
                prop_assert!(got.to_f64() == want.to_f64(), "y[{}] = {:?}, base {:?}", i, got, want);
            } else {
                let tol = crate::bound::<E>(c.n_in + 2, want.to_f64().abs() + 1.0);
                prop_assert!((got.to_f64() - want.to_f64()).abs() <= tol, "y[{}] = {:?}, base {:?}", i, got, want);
            }
        }
        Ok(())
    });

    run(report, config, "lora_matches_oracle", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (want, mag) = oracle_y(&c, &t);
        let x = t.x.clone();
        let (layer, base) = (t.lora(&c)?, t.base(&c)?);
        prop_assert!(
            (layer.scale() - c.scale()).abs() <= 1e-12 * c.scale(),
            "scale {} != {}",
            layer.scale(),
            c.scale()
        );
        let y = forward(backend, &layer, &base, &c, &x).map_err(fail)?;
        close::<E>("y", &wide(&y), &want, &mag, c.n_in + c.r + 2)
    });

    run(report, config, "backends_agree", name, case_in(dims), |c| {
        let t = Tensors::<E>::of(&c);
        let (_, mag) = oracle_y(&c, &t);
        let x = t.x.clone();
        let (layer, base) = (t.lora(&c)?, t.base(&c)?);
        let mine = forward(backend, &layer, &base, &c, &x).map_err(fail)?;
        let reference = forward(&Reference, &layer, &base, &c, &x).map_err(fail)?;
        let twice: Vec<f64> = mag.iter().map(|m| 2.0 * m).collect();
        close::<E>("y vs Reference", &wide(&mine), &wide(&reference), &twice, c.n_in + c.r + 2)
    });

    run(report, config, "lora_merged_equals_unmerged", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let (_, mag) = oracle_y(&c, &t);
        let x = t.x.clone();
        let layer = Lora::new(&c.config(), c.n_in, c.n_out, &t.a[..], &t.b[..]).map_err(fail)?;
        let unmerged = forward(backend, &layer, &t.base(&c)?, &c, &x).map_err(fail)?;
        let guard = layer.merge_into(backend, MergeTarget::new(&mut t.w), &mut []).map_err(fail)?;
        let merged_base = match &t.bias {
            Some(b) => guard.base().with_bias(b).map_err(fail)?,
            None => guard.base(),
        };
        // The merged layer's forward is the base's alone: one matmul.
        let merged = base_forward(backend, &merged_base, &c, &x).map_err(fail)?;
        // Both are within the bound of the oracle; merging adds one
        // rounding of W + s B A per weight, seen through x.
        let twice: Vec<f64> = mag.iter().map(|m| 3.0 * m).collect();
        close::<E>("merged y", &wide(&merged), &wide(&unmerged), &twice, c.n_in + c.r + 3)
    });

    run(report, config, "lora_unmerge_restores", name, case_in(dims), |c| {
        let mut t = Tensors::<E>::of(&c);
        let w0 = t.w.clone();
        let cfg = c.config();
        {
            let mut backup = vec![E::ZERO; c.n_out * c.n_in];
            let layer = Lora::new(&cfg, c.n_in, c.n_out, &t.a[..], &t.b[..]).map_err(fail)?;
            layer
                .merge_into(backend, MergeTarget::new(&mut t.w).with_backup(&mut backup), &mut [])
                .map_err(fail)?
                .unmerge()
                .map_err(fail)?;
        }
        prop_assert!(
            t.w.iter().zip(&w0).all(|(a, b)| a.to_bits64() == b.to_bits64()),
            "backup restore is not bit-exact"
        );
        // Without a backup: u (2|W| + |p|)(1 + u) per weight, p = s (B A),
        // plus the product's own rounding (computed twice).
        {
            let layer = Lora::new(&cfg, c.n_in, c.n_out, &t.a[..], &t.b[..]).map_err(fail)?;
            layer.merge_into(backend, MergeTarget::new(&mut t.w), &mut []).map_err(fail)?.unmerge().map_err(fail)?;
        }
        let (a, b) = (M::new(c.r, c.n_in, wide(&t.a)), M::new(c.n_out, c.r, wide(&t.b)));
        let p = b.abs().mul(&a.abs()).scale(c.scale());
        for (i, (got, want)) in t.w.iter().zip(&w0).enumerate() {
            let (w, pm) = (want.to_f64().abs(), p.d[i]);
            let tol = E::U * (2.0 * w + pm) * (1.0 + E::U) + 2.0 * crate::bound::<E>(c.r, pm);
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

    run(report, config, "lora_merge_guard_restores_on_drop", name, case_in(dims), |c| {
        // Merging twice, or changing a merged adapter, does not compile
        // (`Merged` owns the weight); what remains to check at run time is
        // that a dropped guard restores W and that `keep` leaves it merged.
        let mut t = Tensors::<E>::of(&c);
        let w0 = t.w.clone();
        let layer = Lora::new(&c.config(), c.n_in, c.n_out, &t.a[..], &t.b[..]).map_err(fail)?;
        let mut backup = vec![E::ZERO; c.n_out * c.n_in];
        let merged_once = {
            let guard = layer
                .merge_into(backend, MergeTarget::new(&mut t.w).with_backup(&mut backup), &mut [])
                .map_err(fail)?;
            guard.weight().to_vec()
        };
        prop_assert!(
            t.w.iter().zip(&w0).all(|(a, b)| a.to_bits64() == b.to_bits64()),
            "dropping the merge guard did not restore W"
        );
        let kept = layer.merge_into(backend, MergeTarget::new(&mut t.w), &mut []).map_err(fail)?.keep().to_vec();
        prop_assert!(
            kept.iter().zip(&merged_once).all(|(a, b)| a.to_bits64() == b.to_bits64()),
            "keep() did not leave W merged"
        );
        Ok(())
    });

    run(report, config, "lora_gradients_match_fd", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let x = t.x.clone();
        let g = t.g.clone();
        let cfg = c.config();
        let layer = Lora::new(&cfg, c.n_in, c.n_out, &t.a[..], &t.b[..]).map_err(fail)?;
        let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
        let (mut ga, mut gb, mut gx) =
            (vec![E::ZERO; c.r * c.n_in], vec![E::ZERO; c.n_out * c.r], vec![E::ZERO; c.t * c.n_in]);
        let mut scratch = vec![E::ZERO; layer.backward_scratch_len(c.t)];
        layer
            .backward(
                backend,
                &base,
                MatRef::new(&x, c.t, c.n_in).map_err(fail)?,
                MatRef::new(&g, c.t, c.n_out).map_err(fail)?,
                Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?),
                LoraGrads::new(&mut ga, &mut gb),
                &mut scratch,
            )
            .map_err(fail)?;
        let (w, a, b, xw, gw) = (wide(base.weight()), wide(layer.lora_a()), wide(layer.lora_b()), wide(&x), wide(&g));
        let gm = M::new(c.t, c.n_out, gw.clone());
        let s = c.scale();
        let loss = |x: &[f64], a: &[f64], b: &[f64]| {
            let y = oracle::lora(
                &M::new(c.t, c.n_in, x.to_vec()),
                &M::new(c.n_out, c.n_in, w.clone()),
                None,
                &M::new(c.r, c.n_in, a.to_vec()),
                &M::new(c.n_out, c.r, b.to_vec()),
                s,
            );
            oracle::dot(&gm, &y)
        };
        let fa = oracle::grad_fd(&a, 1e-6, |p| loss(&xw, p, &b));
        let fb = oracle::grad_fd(&b, 1e-6, |p| loss(&xw, &a, p));
        let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &a, &b));
        // Scale of the terms summed: |G| |x| |B| s etc., bounded by s + 1
        // times the sizes (entries are in [-1, 1]).
        let scale = (s + 1.0) * (c.t * c.n_out * c.r.max(1)) as f64;
        let k = c.t + c.n_out + c.r;
        close_norm::<E>("dA", &wide(&ga), &fa, scale, k)?;
        close_norm::<E>("dB", &wide(&gb), &fb, scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &fx, scale, k)
    });

    run(report, config, "lora_backward_is_adapter_sized", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let layer = t.lora(&c)?;
        prop_assert!(
            layer.backward_scratch_len(c.t) <= 2 * c.t * c.r,
            "backward needs {} scratch",
            layer.backward_scratch_len(c.t)
        );
        prop_assert!(layer.forward_scratch_len(c.t) <= c.t * c.r);
        Ok(())
    });

    if E::NAME == "f32" {
        let names = (
            proptest::sample::select(vec!["q_proj", "v_proj", "k_proj", "o_proj", "q_proj_extra", "xq_proj"]),
            0usize..4,
        );
        run(report, config, "lora_targets_follow_peft", "-", names, |(leaf, depth)| {
            let name = (0..depth).map(|i| format!("m{i}.")).collect::<String>() + leaf;
            let cfg = LoraConfig::new(1, 1.0);
            let want = ["q_proj", "v_proj"].iter().any(|t| name == *t || name.ends_with(&format!(".{t}")));
            prop_assert_eq!(cfg.targets(&name), want, "{}", name);
            Ok(())
        });
        run(
            report,
            config,
            "lora_param_report_flags_high_rank",
            "-",
            (1usize..64, 1usize..64, 1usize..64),
            |(i, o, r)| {
                let rep = ParamReport::for_layer(i, o, r, false).map_err(fail)?;
                prop_assert_eq!(rep.trainable, r * (i + o));
                prop_assert_eq!(rep.low_savings(), 4 * r * (i + o) >= i * o);
                Ok(())
            },
        );
    }
}
