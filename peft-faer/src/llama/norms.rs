//! LN tuning hosted on the model: the RMSNorm weights it replaces, and
//! their backward.
//!
//! PEFT runs the trained copy of each targeted norm in place of the
//! original (`LNTuningLayer.forward`), so the hosted forward is the
//! model's own [`rms_norm`](super::rms_norm) over the adapter's weight:
//! the same arithmetic as the merged model, bit for bit. The backward goes
//! through `peft-core`'s [`LnTuning::backward`] (`dL/dw'` and `dL/dx`).
//! Llama's norms are `model.layers.N.input_layernorm`,
//! `model.layers.N.post_attention_layernorm` and `model.norm` (PEFT's
//! default LN tuning targets for Llama); they have a weight and no bias.

use peft_core::ln_tuning::{LnTuning, LnTuningGrads, Norm};
use peft_core::{Backend, MatMut, MatRef};

use super::backward::rms_norm_backward;
use super::{Layer, Llama, LlamaAdapter, rows};
use crate::hf::{HfAdapter, HfError};

/// The two norms of a layer, in [`NormWeights::layers`]' order.
pub const LAYER_NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// LN tuning's weights on a model: per layer `[input_layernorm,
/// post_attention_layernorm]`, and the final `model.norm`; `None` where
/// the model keeps its own.
#[derive(Clone, Debug, Default)]
pub struct NormWeights<'a> {
    /// Per layer, the two norms' weights `[hidden]`.
    pub layers: Vec<[Option<&'a [f32]>; 2]>,
    /// `model.norm`'s weight `[hidden]`.
    pub last: Option<&'a [f32]>,
}

/// `(layer, site)` of a norm's module name: `site` indexes
/// [`LAYER_NORMS`]; `model.norm` is `(layers, 0)`.
pub(super) fn locate_norm(name: &str, layers: usize) -> Option<(usize, usize)> {
    if name == "model.norm" {
        return Some((layers, 0));
    }
    let (l, norm) = name.strip_prefix("model.layers.")?.split_once('.')?;
    let l: usize = l.parse().ok().filter(|&l| l < layers)?;
    Some((l, LAYER_NORMS.iter().position(|n| *n == norm)?))
}

impl<'a> NormWeights<'a> {
    /// Places LN tuning's modules on `model`: each must be one of its
    /// norms, saving a `weight [hidden]` alone.
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for a module that is not one of the
    /// model's norms (LN tuning of a projection runs through `peft merge`,
    /// not hosted) or that saves a bias (Llama's norms have none);
    /// [`HfError::Base`] for a weight of another width;
    /// [`HfError::Conflict`] for a norm tuned twice.
    pub fn place(model: &Llama, adapter: &'a HfAdapter) -> Result<Self, HfError> {
        let c = &model.config;
        let mut out = NormWeights { layers: vec![[None; 2]; c.num_layers], last: None };
        for m in &adapter.ln_tuning {
            let (l, site) = locate_norm(&m.name, c.num_layers).ok_or_else(|| {
                HfError::Unsupported(format!(
                    "{}: LN tuning of a module other than the model's norms (model.layers.N.{{{}}}, model.norm)",
                    m.name,
                    LAYER_NORMS.join(",")
                ))
            })?;
            if m.param("bias").is_some() || m.params.len() != 1 {
                return Err(HfError::Unsupported(format!("{}: LN tuning of a norm with a bias", m.name)));
            }
            // A norm's vectors (checked by peft-core), of the model's width.
            m.layer(Norm::Rms, c.rms_norm_eps)?;
            let w = m.param("weight").map_or(&[][..], |t| &t.data[..]);
            if w.len() != c.hidden_size {
                let why = format!("the adapter's weight has {} values, the model's norm {}", w.len(), c.hidden_size);
                return Err(HfError::Base(format!("{}: {why}", m.name)));
            }
            let slot = match out.layers.get_mut(l) {
                Some(norms) => &mut norms[site],
                None => &mut out.last,
            };
            if slot.replace(w).is_some() {
                return Err(HfError::conflict(&m.name, "is adapted twice"));
            }
        }
        Ok(out)
    }
}

/// Layer `l`'s `[input, post-attention]` norm weights (LN tuning's where
/// it tunes them, else the layer's own) and, from LN tuning's gradients
/// `grads`, their buffers.
pub(super) type LayerNorms<'w, 'g> = ([&'w [f32]; 2], [Option<&'g mut [f32]>; 2]);

/// [`LayerNorms`] of layer `l`.
pub(super) fn layer_norms<'w, 'g>(
    adapter: Option<&LlamaAdapter<'w>>,
    layer: &'w Layer,
    grads: Option<&'g mut [[Option<Vec<f32>>; 2]]>,
    l: usize,
) -> LayerNorms<'w, 'g> {
    let tuned = |site: usize| adapter.and_then(|a| a.layer_norm(l, site));
    let weights = [tuned(0).unwrap_or(&layer.input_norm), tuned(1).unwrap_or(&layer.post_norm)];
    match grads.and_then(|g| g.get_mut(l)) {
        Some([i, p]) => (weights, [i.as_deref_mut(), p.as_deref_mut()]),
        None => (weights, [None, None]),
    }
}

/// `dx += dL/dx` of `out = rms(x) w` over rows of `w.len()`: with the
/// weight frozen, row by row in blocks of rows ([`rows::by_rows`]); with
/// `grad` (LN tuning's weight, trained, summed over all rows), `dL/dw`
/// accumulated into it, both through `peft-core`'s [`LnTuning::backward`]
/// on the calling thread.
///
/// # Errors
/// `peft-core`'s shape checks.
pub(super) fn norm_backward<B: Backend<f32> + ?Sized>(
    backend: &B,
    x: &[f32],
    w: &[f32],
    eps: f64,
    dy: &[f32],
    dx: &mut [f32],
    grad: Option<&mut [f32]>,
) -> Result<(), HfError> {
    let Some(g) = grad else {
        let d = w.len().max(1);
        rows::by_rows(backend, [(dx, d)], &|r0, [dx]| {
            rms_norm_backward(rows::from(x, r0, d), w, eps, rows::from(dy, r0, d), dx);
        });
        return Ok(());
    };
    let d = w.len();
    let n = x.len() / d.max(1);
    let layer = LnTuning::new(Norm::Rms, d, eps, w, None)?;
    let mut gx = vec![0.0f32; x.len()];
    let grads = LnTuningGrads { weight: g, bias: None };
    layer.backward(MatRef::new(x, n, d)?, MatRef::new(dy, n, d)?, Some(MatMut::new(&mut gx, n, d)?), grads)?;
    dx.iter_mut().zip(&gx).for_each(|(a, b)| *a += b);
    Ok(())
}
