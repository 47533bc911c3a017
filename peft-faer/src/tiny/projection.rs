//! The methods that adapt an attention projection of the tiny model
//! (LoRA, DoRA, (IA)^3, LoHa, LoKr, VeRA): each projection's tensors found
//! by PEFT's names, and its forward, backward and merge through
//! `peft-core`.
//!
//! DoRA's norm cache is rebuilt from the current `A` and `B` at every pass:
//! the tiny model keeps no per-layer state between passes, and an optimizer
//! step changes `A` and `B` anyway. (`peft_core::dora` caches the norms
//! for callers that run many passes between updates.)

use peft_core::delta::DenseDelta;
use peft_core::dora::{Dora, DoraGrads};
use peft_core::ia3::Ia3;
use peft_core::loha::{Loha, LohaGrads};
use peft_core::lokr::{Factor, Layout, Lokr, LokrGrads};
use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::vera::{Vera, VeraGrads, VeraProjection};
use peft_core::{Accum, Backend, Dense, Error, FrozenLinear, MatMut, MatRef, Result};

use super::{Param, is_param};

/// One adapted projection: the method's configuration and its tensors.
pub(super) enum Site<'p> {
    /// `A`, `B`.
    Lora(LoraConfig<'static>, [&'p mut Param; 2]),
    /// `A`, `B`, the magnitude.
    Dora(LoraConfig<'static>, [&'p mut Param; 3]),
    /// Whether it scales the input (feedforward), and `l`.
    Ia3(bool, &'p mut Param),
    /// `W1a, W1b, W2a, W2b`.
    Loha(LoraConfig<'static>, [&'p mut Param; 4]),
    /// The layout and its stored tensors, `W1`'s then `W2`'s.
    Lokr(LoraConfig<'static>, Layout, Vec<&'p mut Param>),
    /// The shared frozen `vera_A`, `vera_B`, then `lambda_d`, `lambda_b`.
    Vera([&'p Param; 2], [&'p mut Param; 2]),
}

/// The tensors named `layers.{l}.{module}.{leaf}` for each of `leaves`, in
/// that order; `None` unless each is found exactly once. Names are
/// compared piece by piece, without building strings.
pub(super) fn find<'p>(params: &'p mut [Param], l: usize, module: &str, leaves: &[&str]) -> Option<Vec<&'p mut Param>> {
    let mut found: Vec<Option<&'p mut Param>> = leaves.iter().map(|_| None).collect();
    for p in params.iter_mut() {
        if let Some(i) = leaves.iter().position(|leaf| is_param(&p.name, l, module, leaf)) {
            if found[i].replace(p).is_some() {
                return None;
            }
        }
    }
    found.into_iter().collect()
}

/// [`find`] with a fixed count.
pub(super) fn find_n<'p, const N: usize>(
    params: &'p mut [Param],
    l: usize,
    module: &str,
    leaves: [&str; N],
) -> Option<[&'p mut Param; N]> {
    find(params, l, module, &leaves)?.try_into().ok()
}

/// A LoKr factor's values and its gradient buffer.
type FactorPair<'a> = (Factor<&'a [f32]>, Factor<&'a mut [f32]>);

/// LoKr's two factors (values) and their gradients, from the stored
/// tensors.
#[allow(clippy::type_complexity)] // three plain parts; a struct would only rename them
fn lokr_parts<'a>(
    ps: &'a mut [&mut Param],
    low_rank: [bool; 2],
) -> Option<(Factor<&'a [f32]>, Factor<&'a [f32]>, LokrGrads<'a, f32>)> {
    let mut parts = ps.iter_mut().map(|p| {
        let Param { value, grad, .. } = &mut **p;
        (&value[..], &mut grad[..])
    });
    let mut factor = |low: bool| -> Option<FactorPair<'a>> {
        let (v0, g0) = parts.next()?;
        if low {
            let (v1, g1) = parts.next()?;
            Some((Factor::LowRank(v0, v1), Factor::LowRank(g0, g1)))
        } else {
            Some((Factor::Full(v0), Factor::Full(g0)))
        }
    };
    let (w1, g1) = factor(low_rank[0])?;
    let (w2, g2) = factor(low_rank[1])?;
    Some((w1, w2, LokrGrads { w1: g1, w2: g2 }))
}

/// The first `n` elements of `scratch`, grown (zeros) to hold them.
fn grow(scratch: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if scratch.len() < n {
        scratch.resize(n, 0.0);
    }
    &mut scratch[..n]
}

/// [`grow`] to `head + n`, split after `head`.
fn split(scratch: &mut Vec<f32>, head: usize, n: usize) -> (&mut [f32], &mut [f32]) {
    grow(scratch, head + n).split_at_mut(head)
}

/// The error for a LoKr site whose tensors do not match its layout.
const LOKR_TENSORS: Error =
    Error::InvalidParameter { name: "LoKr tensors", rule: "must match the layout (lokr_w1 or _a/_b, then W2's)" };

/// `y = x W^T` through `site` (or the base alone), `base` being `in -> out`.
///
/// # Errors
/// `peft-core`'s.
pub(super) fn forward<B: Backend<f32, Error = Error>>(
    site: Option<Site<'_>>,
    backend: &B,
    base: &Dense<'_, f32>,
    x: MatRef<'_, f32>,
    y: MatMut<'_, f32>,
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let (rows, n_in, n_out) = (x.rows(), base.in_features(), base.out_features());
    match site {
        None => base.forward(backend, x, y),
        Some(Site::Lora(cfg, [a, b])) => {
            let layer = Lora::new(&cfg, n_in, n_out, &a.value[..], &b.value[..])?;
            layer.forward(backend, base, x, y, grow(scratch, layer.forward_scratch_len(rows)))
        }
        Some(Site::Dora(cfg, [a, b, m])) => {
            let mut layer = Dora::new(&cfg, n_in, n_out, &a.value[..], &b.value[..], &m.value[..], vec![0.0; n_out])?;
            let need = peft_core::dora::refresh_scratch_len(base, n_out)
                .max(peft_core::dora::forward_scratch_len(rows, cfg.rank));
            let s = grow(scratch, need);
            layer.refresh_norms(backend, base, s)?;
            layer.forward(backend, base, x, y, s)
        }
        Some(Site::Ia3(ff, l)) => {
            let layer = Ia3::new(n_in, n_out, ff, &l.value[..])?;
            layer.forward(backend, base, x, y, grow(scratch, layer.forward_scratch_len(rows)))
        }
        Some(Site::Loha(cfg, [f0, f1, f2, f3])) => {
            let f = [&f0.value[..], &f1.value[..], &f2.value[..], &f3.value[..]];
            let layer = Loha::new(&cfg, n_in, n_out, f)?;
            layer.forward(backend, base, x, y, grow(scratch, layer.forward_scratch_len()))
        }
        Some(Site::Lokr(cfg, layout, mut ps)) => {
            let (w1, w2, _) = lokr_parts(&mut ps, [layout.w1_low_rank, layout.w2_low_rank]).ok_or(LOKR_TENSORS)?;
            let layer = Lokr::new(&cfg, layout.d1, layout.d2, w1, w2)?;
            layer.forward(backend, base, x, y, grow(scratch, layer.forward_scratch_len()))
        }
        Some(Site::Vera([pa, pb], [ld, lb])) => {
            let r = ld.value.len();
            let proj = VeraProjection::new(r, n_in, n_out, &pa.value[..], &pb.value[..])?;
            let layer = Vera::new(r, n_in, n_out, &ld.value[..], &lb.value[..])?;
            layer.forward(backend, base, &proj, x, y, grow(scratch, layer.forward_scratch_len(rows)))
        }
    }
}

/// `gx += dL/dx` of [`forward`], accumulating the site's gradients into
/// each [`Param::grad`].
///
/// # Errors
/// `peft-core`'s.
pub(super) fn backward<B: Backend<f32, Error = Error>>(
    site: Option<Site<'_>>,
    backend: &B,
    base: &Dense<'_, f32>,
    x: MatRef<'_, f32>,
    gy: MatRef<'_, f32>,
    gx: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let (rows, n_in, n_out) = (x.rows(), base.in_features(), base.out_features());
    let Some(site) = site else {
        return base.apply_transpose(backend, gy, MatMut::new(gx, rows, n_in)?, Accum::Add);
    };
    // The site's dL/dx goes to `tmp` (the head of the scratch), then is
    // added to `gx`; the method's own scratch follows it.
    let head = rows * n_in;
    let tmp: &mut [f32] = match site {
        Site::Lora(cfg, [a, b]) => {
            let layer = Lora::new(&cfg, n_in, n_out, &a.value[..], &b.value[..])?;
            let (tmp, s) = split(scratch, head, layer.backward_scratch_len(rows));
            let grads = LoraGrads { a: &mut a.grad, b: &mut b.grad };
            layer.backward(backend, base, x, gy, Some(MatMut::new(&mut *tmp, rows, n_in)?), grads, s)?;
            tmp
        }
        Site::Dora(cfg, [a, b, m]) => {
            let mut layer = Dora::new(&cfg, n_in, n_out, &a.value[..], &b.value[..], &m.value[..], vec![0.0; n_out])?;
            let need = peft_core::dora::refresh_scratch_len(base, n_out)
                .max(peft_core::dora::backward_scratch_len(rows, n_out, cfg.rank));
            let (tmp, s) = split(scratch, head, need);
            layer.refresh_norms(backend, base, s)?;
            let grads = DoraGrads { a: &mut a.grad, b: &mut b.grad, magnitude: &mut m.grad };
            layer.backward(backend, base, x, gy, Some(MatMut::new(&mut *tmp, rows, n_in)?), grads, s)?;
            tmp
        }
        Site::Ia3(ff, l) => {
            let layer = Ia3::new(n_in, n_out, ff, &l.value[..])?;
            let (tmp, s) = split(scratch, head, layer.backward_scratch_len(rows));
            layer.backward(backend, base, x, gy, Some(MatMut::new(&mut *tmp, rows, n_in)?), &mut l.grad, s)?;
            tmp
        }
        Site::Loha(cfg, [f0, f1, f2, f3]) => {
            let f = [&f0.value[..], &f1.value[..], &f2.value[..], &f3.value[..]];
            let layer = Loha::new(&cfg, n_in, n_out, f)?;
            let (tmp, s) = split(scratch, head, layer.backward_scratch_len());
            let grads = LohaGrads { w1a: &mut f0.grad, w1b: &mut f1.grad, w2a: &mut f2.grad, w2b: &mut f3.grad };
            layer.backward(backend, base, x, gy, Some(MatMut::new(&mut *tmp, rows, n_in)?), grads, s)?;
            tmp
        }
        Site::Lokr(cfg, layout, mut ps) => {
            let (w1, w2, grads) = lokr_parts(&mut ps, [layout.w1_low_rank, layout.w2_low_rank]).ok_or(LOKR_TENSORS)?;
            let layer = Lokr::new(&cfg, layout.d1, layout.d2, w1, w2)?;
            let (tmp, s) = split(scratch, head, layer.backward_scratch_len());
            layer.backward(backend, base, x, gy, Some(MatMut::new(&mut *tmp, rows, n_in)?), grads, s)?;
            tmp
        }
        Site::Vera([pa, pb], [ld, lb]) => {
            let r = ld.value.len();
            let proj = VeraProjection::new(r, n_in, n_out, &pa.value[..], &pb.value[..])?;
            let layer = Vera::new(r, n_in, n_out, &ld.value[..], &lb.value[..])?;
            let (tmp, s) = split(scratch, head, layer.backward_scratch_len(rows));
            let grads = VeraGrads { lambda_d: &mut ld.grad, lambda_b: &mut lb.grad };
            layer.backward(backend, base, &proj, x, gy, Some(MatMut::new(&mut *tmp, rows, n_in)?), grads, s)?;
            tmp
        }
    };
    gx.iter_mut().zip(tmp.iter()).for_each(|(g, t)| *g += t);
    Ok(())
}

/// Merges `site` into the projection weight `w` (`[out, in]`) for good, as
/// PEFT's `merge_and_unload`.
///
/// # Errors
/// `peft-core`'s (an (IA)^3 vector with a zero entry cannot be merged
/// without a backup, and is refused).
pub(super) fn merge<B: Backend<f32, Error = Error>>(
    site: Site<'_>,
    backend: &B,
    w: &mut [f32],
    n_in: usize,
    n_out: usize,
) -> Result<()> {
    match site {
        Site::Lora(cfg, [a, b]) => {
            Lora::new(&cfg, n_in, n_out, &a.value[..], &b.value[..])?.merge_into(backend, w, None)?.keep();
        }
        Site::Dora(cfg, [a, b, m]) => {
            let mut layer = Dora::new(&cfg, n_in, n_out, &a.value[..], &b.value[..], &m.value[..], vec![0.0; n_out])?;
            let copy = w.to_vec();
            let base = Dense::new(&copy, n_out, n_in)?;
            let mut s = vec![0.0; peft_core::dora::refresh_scratch_len(&base, n_out)];
            layer.refresh_norms(backend, &base, &mut s)?;
            layer.merge_into(backend, w, None)?.keep();
        }
        Site::Ia3(ff, l) => {
            Ia3::new(n_in, n_out, ff, &l.value[..])?.merge_into(w, None, None)?.keep();
        }
        Site::Loha(cfg, [f0, f1, f2, f3]) => {
            let layer = Loha::new(&cfg, n_in, n_out, [&f0.value[..], &f1.value[..], &f2.value[..], &f3.value[..]])?;
            let mut s = vec![0.0; layer.delta_scratch_len()];
            layer.merge_into(backend, w, None, &mut s)?.keep();
        }
        Site::Lokr(cfg, layout, mut ps) => {
            let (w1, w2, _) = lokr_parts(&mut ps, [layout.w1_low_rank, layout.w2_low_rank]).ok_or(LOKR_TENSORS)?;
            let layer = Lokr::new(&cfg, layout.d1, layout.d2, w1, w2)?;
            let mut s = vec![0.0; layer.delta_scratch_len()];
            layer.merge_into(backend, w, None, &mut s)?.keep();
        }
        Site::Vera([pa, pb], [ld, lb]) => {
            let r = ld.value.len();
            let proj = VeraProjection::new(r, n_in, n_out, &pa.value[..], &pb.value[..])?;
            let layer = Vera::new(r, n_in, n_out, &ld.value[..], &lb.value[..])?;
            let bound = layer.bound(&proj);
            let mut s = vec![0.0; bound.delta_scratch_len()];
            bound.merge_into(backend, w, None, &mut s)?.keep();
        }
    }
    Ok(())
}
