//! RoAd, its three variants: identity at init, the forward against the
//! oracle, the merged weight (and bias) against the unmerged forward, the
//! typed merge's unmerge, gradients against finite differences.
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::road::{Road, RoadGrads, RoadVariant};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::lora::{LoraCase, Tensors, case, case_in};
use super::{adapter_forward, check_base_output};
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The case with its outputs cut to an even count (RoAd pairs them): `W`,
/// the bias and `G` lose their last output when `out` is odd. `None` for
/// one output.
fn even(c: &LoraCase) -> Option<LoraCase> {
    let o = c.n_out / 2 * 2;
    if o == 0 {
        return None;
    }
    let mut e = c.clone();
    e.n_out = o;
    e.w.truncate(o * c.n_in);
    if let Some(b) = e.bias.as_mut() {
        b.truncate(o);
    }
    e.g = c.g.chunks(c.n_out).flat_map(|row| row[..o].to_vec()).collect();
    Some(e)
}

/// The variant (from the seed) and the group: the largest of 6, 4, 2 that
/// divides `out`.
fn setup(c: &LoraCase) -> (RoadVariant, usize) {
    let v = [RoadVariant::Road1, RoadVariant::Road2, RoadVariant::Road4][(c.seed % 3) as usize];
    (v, [6, 4, 2].into_iter().find(|g| c.n_out.is_multiple_of(*g)).unwrap_or(2))
}

/// `(theta, alpha)` from the seed: theta in `[-1.5, 1.5)`, alpha in `[0.5,
/// 1.5)`.
fn params(c: &LoraCase, v: RoadVariant) -> (Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(c.seed);
    let n = v.len(c.n_out);
    let theta = (0..n).map(|_| rng.uniform_range(-1.5, 1.5)).collect();
    let alpha = (0..n).map(|_| rng.uniform_range(0.5, 1.5)).collect();
    (theta, alpha)
}

/// `R [out, out]` from PEFT's `_prepare_cols` (its reshapes done as torch
/// does them) and `_get_delta_weight`, in f64.
fn rotation(o: usize, g: usize, v: RoadVariant, theta: &[f64], alpha: &[f64]) -> M {
    let (first, second): (Vec<f64>, Vec<f64>) = match v {
        RoadVariant::Road1 => {
            // reshape(-1, g/2).repeat_interleave(2, dim=0).flatten()
            let rep = |x: &[f64]| x.chunks(g / 2).flat_map(|row| [row, row].concat()).collect::<Vec<f64>>();
            let (t, a) = (rep(theta), rep(alpha));
            (t.iter().zip(&a).map(|(t, a)| a * t.cos()).collect(), t.iter().zip(&a).map(|(t, a)| a * t.sin()).collect())
        }
        RoadVariant::Road2 => (
            theta.iter().zip(alpha).map(|(t, a)| a * t.cos()).collect(),
            theta.iter().zip(alpha).map(|(t, a)| a * t.sin()).collect(),
        ),
        RoadVariant::Road4 => {
            // reshape(-1, 2, g): [:, 0, :] for the first column, [:, 1, :] for the second.
            let part = |x: &[f64], h: usize| {
                x.chunks(2 * g).flat_map(|grp| grp[h * g..(h + 1) * g].to_vec()).collect::<Vec<f64>>()
            };
            let (t0, a0, t1, a1) = (part(theta, 0), part(alpha, 0), part(theta, 1), part(alpha, 1));
            (
                t0.iter().zip(&a0).map(|(t, a)| a * t.cos()).collect(),
                t1.iter().zip(&a1).map(|(t, a)| a * t.sin()).collect(),
            )
        }
    };
    let mut r = vec![0.0; o * o];
    let half = g / 2;
    for j in 0..o {
        r[j * o + j] = first[j];
        if j % g < half {
            r[j * o + j + half] = -second[j];
        } else {
            r[j * o + j - half] = second[j];
        }
    }
    M::new(o, o, r)
}

/// The frozen base over the case's weight and bias.
fn base_of<'t, E: Precision>(c: &LoraCase, t: &'t Tensors<E>) -> Result<Dense<'t, E>, TestCaseError> {
    let d = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
    match &t.bias {
        Some(b) => d.with_bias(b).map_err(fail),
        None => Ok(d),
    }
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    // The layer over (theta, alpha) in E, and both widened back.
    type Layer<E> = (Road<E, Vec<E>>, Vec<f64>, Vec<f64>);
    let layer = |c: &LoraCase| -> Result<Layer<E>, TestCaseError> {
        let (v, g) = setup(c);
        let (th, al) = params(c, v);
        let (th, al): (Vec<E>, Vec<E>) = (narrow(&th), narrow(&al));
        let (tw, aw) = (wide(&th), wide(&al));
        Ok((Road::new(v, g, c.n_in, c.n_out, th, al).map_err(fail)?, tw, aw))
    };
    // x W^T + b in f64, and its magnitude.
    let h_of = |c: &LoraCase, t: &Tensors<E>| -> (M, M) {
        let (x, w) = (M::new(c.t, c.n_in, wide(&t.x)), M::new(c.n_out, c.n_in, wide(&t.w)));
        let (mut h, mut hm) = (x.mul_t(&w), x.abs().mul_t(&w.abs()));
        if let Some(b) = &t.bias {
            for (i, v) in h.d.iter_mut().enumerate() {
                *v += b[i % c.n_out].to_f64();
            }
            for (i, v) in hm.d.iter_mut().enumerate() {
                *v += b[i % c.n_out].to_f64().abs();
            }
        }
        (h, hm)
    };

    run(report, config, "road_identity_at_init", name, case_in(dims), |c| {
        let Some(c) = even(&c) else { return Ok(()) };
        let t = Tensors::<E>::of(&c);
        let (mut l, _, _) = layer(&c)?;
        l.init_adapter();
        let base = base_of(&c, &t)?;
        // c = 1, s = 0: y = 1 h - 0 h' is h, exactly.
        check_base_output(backend, &l, &base, &t.x, c.t)
    });

    run(report, config, "road_matches_oracle", name, case_in(dims), |c| {
        let Some(c) = even(&c) else { return Ok(()) };
        let t = Tensors::<E>::of(&c);
        let (l, th, al) = layer(&c)?;
        let y = adapter_forward(backend, &l, &base_of(&c, &t)?, &t.x, c.t)?;
        let (v, g) = setup(&c);
        let r = rotation(c.n_out, g, v, &th, &al);
        let (h, hm) = h_of(&c, &t);
        // y = h R^T (rows of h are outputs' values).
        let want = h.mul_t(&r);
        let mag = hm.mul_t(&r.abs()).scale(2.0);
        close::<E>("y", &wide(&y), &want.d, &mag.d, c.n_in + 8)
    });

    run(report, config, "road_merged_equals_unmerged", name, case_in(dims), |c| {
        let Some(c) = even(&c) else { return Ok(()) };
        let t = Tensors::<E>::of(&c);
        let (l, th, al) = layer(&c)?;
        let y = adapter_forward(backend, &l, &base_of(&c, &t)?, &t.x, c.t)?;
        let (mut w, mut bias) = (t.w.clone(), t.bias.clone());
        // The backup holds the bias too (RoAd rotates it).
        let mut backup = vec![E::ZERO; w.len() + bias.as_ref().map_or(0, Vec::len)];
        let mut target = MergeTarget::new(&mut w).with_backup(&mut backup);
        if let Some(b) = bias.as_mut() {
            target = target.with_bias(b);
        }
        let guard = l.merge_into(backend, target, &mut []).map_err(fail)?;
        let mut ym = vec![E::ZERO; c.t * c.n_out];
        let (xv, yv) =
            (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatMut::new(&mut ym, c.t, c.n_out).map_err(fail)?);
        guard.forward(xv, yv).map_err(fail)?;
        drop(guard);
        let (v, g) = setup(&c);
        let (_, hm) = h_of(&c, &t);
        let mag = hm.mul_t(&rotation(c.n_out, g, v, &th, &al).abs()).scale(3.0);
        close::<E>("merged y", &wide(&ym), &wide(&y), &mag.d, c.n_in + 8)
    });

    run(report, config, "road_unmerge_restores", name, case_in(dims), |c| {
        let Some(c) = even(&c) else { return Ok(()) };
        let t = Tensors::<E>::of(&c);
        let (l, _, _) = layer(&c)?;
        let bits = |v: &[E]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        let (mut w, mut backup) = (t.w.clone(), vec![E::ZERO; t.w.len()]);
        l.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut [])
            .map_err(fail)?
            .unmerge()
            .map_err(fail)?;
        prop_assert!(bits(&w) == bits(&t.w), "not restored bit for bit from the backup");
        // Without one: each pair's block inverted; the merge's roundings grow by the block's
        // condition, max |entry|^2 / |det| (alpha >= 0.5 keeps det away from 0 in most cases).
        l.merge_into(backend, MergeTarget::new(&mut w), &mut []).map_err(fail)?.unmerge().map_err(fail)?;
        let (v, g) = setup(&c);
        let (th, al) = (wide(l.theta()), wide(l.alpha()));
        let rot = rotation(c.n_out, g, v, &th, &al);
        let mag: Vec<f64> = (0..c.n_out * c.n_in)
            .map(|i| {
                let (o, k) = (i / c.n_in, i % c.n_in);
                let (a, b) = if o % g < g / 2 { (o, o + g / 2) } else { (o - g / 2, o) };
                let block = [rot.at(a, a), rot.at(a, b), rot.at(b, a), rot.at(b, b)];
                let det = (block[0] * block[3] - block[1] * block[2]).abs();
                let big = block.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let cond = if det > 0.0 { big * big / det } else { f64::INFINITY };
                4.0 * (1.0 + cond) * (t.w[a * c.n_in + k].to_f64().abs() + t.w[b * c.n_in + k].to_f64().abs())
            })
            .collect();
        close::<E>("unmerged W", &wide(&w), &wide(&t.w), &mag, 8)
    });

    run(report, config, "road_gradients_match_fd", name, case(), |c| {
        let Some(c) = even(&c) else { return Ok(()) };
        let t = Tensors::<E>::of(&c);
        let (l, th, al) = layer(&c)?;
        let base = base_of(&c, &t)?;
        let (mut gt, mut ga) = (vec![E::ZERO; th.len()], vec![E::ZERO; al.len()]);
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        let mut sc = vec![E::ZERO; l.backward_scratch_len(c.t)];
        let (xv, gv) = (MatRef::new(&t.x, c.t, c.n_in).map_err(fail)?, MatRef::new(&t.g, c.t, c.n_out).map_err(fail)?);
        let grads = RoadGrads { theta: &mut gt, alpha: &mut ga };
        l.backward(backend, &base, xv, gv, Some(MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?), grads, &mut sc)
            .map_err(fail)?;
        let (v, g) = setup(&c);
        let (w, gm) = (M::new(c.n_out, c.n_in, wide(&t.w)), M::new(c.t, c.n_out, wide(&t.g)));
        let bias: Option<Vec<f64>> = t.bias.as_ref().map(|b| wide(b));
        let loss = |x: &[f64], th: &[f64], al: &[f64]| {
            let mut h = M::new(c.t, c.n_in, x.to_vec()).mul_t(&w);
            if let Some(b) = &bias {
                h.d.iter_mut().enumerate().for_each(|(i, v)| *v += b[i % c.n_out]);
            }
            oracle::dot(&gm, &h.mul_t(&rotation(c.n_out, g, v, th, al)))
        };
        let xw = wide(&t.x);
        let scale = 4.0 * (c.t * c.n_out * (c.n_in + 1)) as f64;
        let k = c.t + c.n_out + c.n_in + 8;
        close_norm::<E>("dtheta", &wide(&gt), &oracle::grad_fd(&th, 1e-6, |p| loss(&xw, p, &al)), scale, k)?;
        close_norm::<E>("dalpha", &wide(&ga), &oracle::grad_fd(&al, 1e-6, |p| loss(&xw, &th, p)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(p, &th, &al)), scale, k)
    });
}
