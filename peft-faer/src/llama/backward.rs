//! The Llama model's backward pass over the adapter's tensors only, and the
//! language-model loss.
//!
//! Given `dL/dlogits` and the [`Trace`] of the same forward pass, the
//! gradient flows back through `lm_head`, the final RMSNorm and each layer
//! (SwiGLU, RMSNorm, `o_proj`, attention with its prefix, RoPE's
//! transpose, q/k/v, RMSNorm, the residuals) to the embeddings. The frozen
//! matrices only ever meet `stored_apply_transpose` (`dL/dx = dL/dy W`);
//! no gradient is formed for them. The adapter's gradients accumulate in
//! [`LlamaGrads`]:
//!
//! ```text
//! LoRA (y = x W^T + s (x A^T) B^T):  dA += s (dy B)^T x    dB += s dy^T (x A^T)    dx += dy W + s (dy B) A
//! DoRA, (IA)^3, LoHa, LoKr, VeRA:    peft-core's backward of each layer
//! prompt tuning:                    dP  += dL/d(rows 0..n of the first layer's input)
//! prefix tuning:                    d[PK | PV] of layer l += the attention's prefix gradients
//! RMSNorm (y = w x r, r = (mean x^2 + eps)^-1/2):  dx = r g - (r^3 / d) x (g . x),  g = w dy
//! ```
//!
//! A LoRA module's `lora_bias`, when present, is held fixed (it receives no
//! gradient); so are VeRA's shared projections (frozen by the method).

use peft_core::attention::{AttentionGrads, PrefixGrads, backward as attn_backward};
use std::sync::{Mutex, PoisonError};

use peft_core::attention::{AttentionShape, Mask, Prefix};
use peft_core::prefix::PrefixConfig;
use peft_core::{Accum, Backend, MatMut, MatRef, Product};

use super::Projection::{Down, Gate, K, O, Q, Up, V};
use super::norms::{layer_norms, norm_backward};
use super::sites::{self, Module};
use super::tokens;
use super::{LayerTrace, Llama, LlamaAdapter, Trace, head_cols, rms_norm_rows, rotate_rows, rows};
use crate::hf::{HfError, TrainableTokensModule};

/// An adapted projection's module and its gradient buffers.
type Slot<'a, 'g> = Option<(Module<'a>, &'g mut [Vec<f32>])>;

/// One adapted projection's gradient buffers, in
/// [`Module::tensor_lens`]' order.
pub type SiteGrads = Vec<Vec<f32>>;

/// Gradient buffers shaped like a [`LlamaAdapter`]'s tensors.
#[derive(Clone, Debug, PartialEq)]
pub enum LlamaGrads {
    /// `dP`, `[tokens, hidden]`.
    Prompt(Vec<f32>),
    /// The prefix table's gradient, `[tokens, layers * 2 * kv_width]`.
    Prefix(Vec<f32>),
    /// Per layer and projection, the adapted ones' buffers.
    Modules(Vec<[Option<SiteGrads>; 7]>),
    /// Per layer, the two bottleneck adapters' `[dW_down, db_down, dW_up,
    /// db_up]`.
    Bottleneck(Vec<[[Vec<f32>; 4]; 2]>),
    /// Trainable tokens: `dL/drows`, `[k, hidden]`.
    Tokens(Vec<f32>),
    /// LN tuning: per layer the two norms' `dL/dw'` where tuned
    /// ([`LAYER_NORMS`](super::LAYER_NORMS)' order), and `model.norm`'s.
    Norms {
        /// Per layer.
        layers: Vec<[Option<Vec<f32>>; 2]>,
        /// `model.norm`.
        last: Option<Vec<f32>>,
    },
}

impl LlamaGrads {
    /// Zeros for every tensor of `adapter`.
    pub fn zeros(adapter: &LlamaAdapter<'_>) -> Self {
        match adapter {
            LlamaAdapter::Prompt { embeddings, .. } => Self::Prompt(vec![0.0; embeddings.len()]),
            LlamaAdapter::Prefix { table, .. } => Self::Prefix(vec![0.0; table.len()]),
            LlamaAdapter::Bottleneck(b) => Self::Bottleneck(
                b.sites
                    .iter()
                    .map(|s| s.clone().map(|t| [t.w_down, t.b_down, t.w_up, t.b_up].map(|v| vec![0.0f32; v.len()])))
                    .collect(),
            ),
            LlamaAdapter::Tokens(m) => Self::Tokens(vec![0.0; m.rows.len()]),
            LlamaAdapter::Norms(w) => Self::Norms {
                layers: w.layers.iter().map(|n| n.map(|w| w.map(|w| vec![0.0; w.len()]))).collect(),
                last: w.last.map(|w| vec![0.0; w.len()]),
            },
            LlamaAdapter::Modules { layers, .. } => Self::Modules(
                layers
                    .iter()
                    .map(|projs| projs.map(|m| m.map(|m| m.tensor_lens().into_iter().map(|n| vec![0.0; n]).collect())))
                    .collect(),
            ),
        }
    }
}

/// The mean next-token cross-entropy of a forward pass over `ids`: row
/// `skip + j` (after `skip` virtual rows) predicts `ids[j + 1]`, `j <
/// len - 1`:
///
/// ```text
/// L = -(1 / (len - 1)) sum_j log softmax(logits[skip + j])[ids[j + 1]]
/// ```
///
/// With `grad` (`[rows, vocab]`), writes `dL/dlogits` there (zero on the
/// rows that predict nothing). Sums in f64.
pub fn lm_loss(logits: &[f32], vocab: usize, skip: usize, ids: &[u32], mut grad: Option<&mut [f32]>) -> f64 {
    if let Some(g) = grad.as_deref_mut() {
        g.fill(0.0);
    }
    let count = ids.len().saturating_sub(1);
    if count == 0 || vocab == 0 {
        return 0.0;
    }
    let (mut total, mut scratch) = (0.0f64, Vec::new());
    for (j, next) in ids.iter().skip(1).enumerate() {
        let row = skip + j;
        let Some(z) = logits.get(row * vocab..(row + 1) * vocab) else { continue };
        let g = grad.as_deref_mut().and_then(|g| g.get_mut(row * vocab..(row + 1) * vocab));
        total += row_cross_entropy(z, *next as usize, count as f64, g, &mut scratch);
    }
    total / count as f64
}

/// `-log softmax(z)[target]` of one row of logits (the target clamped to
/// the row), in f64; with `grad`, `(softmax(z) - onehot(target)) / denom`
/// written there, each value rounded once to f32 and a subnormal one
/// (a probability below `2^-126 denom`, common over a 49152-token
/// vocabulary) written as 0: a subnormal operand slows every product it
/// enters by 10x or more on x86 (the head's backward took 1.4 s instead of
/// 0.06 s at SmolLM2's shapes), and it is below the resolution of any f32
/// gradient it is summed into that is not itself subnormal. `scratch`
/// holds the row's exponentials in f64 (one buffer for all the rows of a
/// loss: a vocabulary's row is 393 KB, too large to allocate per row).
pub(crate) fn row_cross_entropy(
    z: &[f32],
    target: usize,
    denom: f64,
    grad: Option<&mut [f32]>,
    scratch: &mut Vec<f64>,
) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let t = target.min(z.len().saturating_sub(1));
    // `e^(z_k - max)` once, kept in f64 until the division.
    let sum = super::exp::exp_shifted(z, max, scratch);
    if let Some(g) = grad {
        for (gk, ek) in g.iter_mut().zip(scratch.iter()) {
            let v = (ek / sum / denom) as f32;
            *gk = if v.is_subnormal() { 0.0 } else { v };
        }
        if let (Some(gt), Some(et)) = (g.get_mut(t), scratch.get(t)) {
            let v = ((et / sum - 1.0) / denom) as f32;
            *gt = if v.is_subnormal() { 0.0 } else { v };
        }
    }
    f64::from(max) + sum.ln() - f64::from(z.get(t).copied().unwrap_or(0.0))
}

/// `dx` of `out = rms(x) w` for each row, accumulated into `dx`.
pub(super) fn rms_norm_backward(x: &[f32], w: &[f32], eps: f64, dy: &[f32], dx: &mut [f32]) {
    let d = w.len().max(1);
    for ((row, g), o) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
        let ms = row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / d as f64;
        let r = 1.0 / (ms + eps).sqrt();
        let dot: f64 = row.iter().zip(g).zip(w).map(|((x, g), w)| f64::from(*x) * f64::from(g * w)).sum();
        let c = r * r * r * dot / d as f64;
        for (((o, x), g), w) in o.iter_mut().zip(row).zip(g).zip(w) {
            *o += (r * f64::from(g * w) - c * f64::from(*x)) as f32;
        }
    }
}

/// With bottleneck adapters, `dL/dz` of `z + up(act(down(z)))` (the
/// adapter at `site` of layer `l`, `z` its input) from `dL/d(output)` into
/// `dz` (overwritten), accumulating the adapter's gradients; `false`
/// (nothing written) without them.
#[allow(clippy::too_many_arguments)]
fn bottleneck_backward<B: Backend<f32> + ?Sized>(
    backend: &B,
    adapter: Option<&LlamaAdapter<'_>>,
    grads: Option<&mut Vec<[[Vec<f32>; 4]; 2]>>,
    (l, site): (usize, usize),
    z: &[f32],
    dout: &[f32],
    dz: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<bool, HfError> {
    let Some(LlamaAdapter::Bottleneck(b)) = adapter else { return Ok(false) };
    let d = b.sites.first().map_or(0, |s| s[0].b_up.len());
    let n = z.len() / d.max(1);
    let layer = b.layer(l, site, d)?;
    scratch.resize(layer.backward_scratch_len(n), 0.0);
    // Without gradient buffers (a pass for `dL/dx` alone), the adapter's
    // gradients go to a spare set.
    let t = &b.sites[l][site];
    let mut spare_set;
    let g = match grads.and_then(|g| g.get_mut(l)).and_then(|s| s.get_mut(site)) {
        Some(g) => g,
        None => {
            spare_set = [&t.w_down, &t.b_down, &t.w_up, &t.b_up].map(|v| vec![0.0f32; v.len()]);
            &mut spare_set
        }
    };
    let [gwd, gbd, gwu, gbu] = g;
    let grads = peft_core::adapter::AdapterGrads { w_down: gwd, b_down: gbd, w_up: gwu, b_up: gbu };
    let (zv, dv) = (MatRef::new(z, n, d)?, MatRef::new(dout, n, d)?);
    layer.backward(backend, zv, dv, Some(MatMut::new(dz, n, d)?), grads, scratch).map_err(HfError::backend)?;
    Ok(true)
}

/// Layer `l`'s adapted projections, each with its gradient buffers.
fn layer_slots<'a, 'g>(
    adapter: Option<&LlamaAdapter<'a>>,
    grads: Option<&'g mut Vec<[Option<SiteGrads>; 7]>>,
    l: usize,
) -> [Slot<'a, 'g>; 7] {
    let mut slots: [Slot<'a, 'g>; 7] = Default::default();
    if let (Some(LlamaAdapter::Modules { layers, .. }), Some(gl)) = (adapter, grads) {
        for ((slot, m), g) in slots.iter_mut().zip(&layers[l]).zip(gl[l].iter_mut()) {
            if let (Some(m), Some(g)) = (m, g.as_mut()) {
                *slot = Some((*m, &mut g[..]));
            }
        }
    }
    slots
}

/// The backward's buffers, allocated once per call and reused by every
/// layer (each is fully written, or zeroed, before a layer reads it).
struct Buffers {
    /// `dL/d act [n, f]`, `dL/d gate`, `dL/d up`.
    dact: Vec<f32>,
    dg: Vec<f32>,
    du: Vec<f32>,
    /// `dL/dx` of the MLP's and the attention's normed inputs `[n, d]`.
    dx2: Vec<f32>,
    dx1: Vec<f32>,
    /// The attention's normed input `[n, d]`, recomputed.
    x1: Vec<f32>,
    /// `dL/d attn [n, q_width]`, `dL/dq`, `dL/dk`, `dL/dv`.
    dattn: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// A bottleneck adapter's `dL/dz [n, d]`.
    dz: Vec<f32>,
    /// The attention's and the adapters' scratch.
    attn_scratch: Vec<f32>,
    adapter_scratch: Vec<f32>,
}

impl Buffers {
    fn new(c: &super::LlamaConfig, n: usize) -> Self {
        let (d, f, qw, kvw) = (c.hidden_size, c.intermediate_size, c.q_width(), c.kv_width());
        let z = |len: usize| vec![0.0f32; n * len];
        Buffers {
            dact: z(f),
            dg: z(f),
            du: z(f),
            dx2: z(d),
            dx1: z(d),
            x1: z(d),
            dattn: z(qw),
            dq: z(qw),
            dk: z(kvw),
            dv: z(kvw),
            dz: z(d),
            attn_scratch: Vec::new(),
            adapter_scratch: Vec::new(),
        }
    }
}

impl Llama {
    /// `dL/dh` of the last layer's output `[rows, d]` from `dlogits`,
    /// through `lm_head` (or the tied embeddings) and the final norm (its
    /// weight `norm`: the model's, or LN tuning's, whose gradient `grad`
    /// accumulates); trainable tokens' rows on a tied head take their
    /// gradient into `tokens`' buffer.
    fn head_backward<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        trace: &Trace,
        dlogits: &[f32],
        (norm, grad): (&[f32], Option<&mut [f32]>),
        tokens: Option<(&TrainableTokensModule, &mut [f32])>,
    ) -> Result<Vec<f32>, HfError> {
        let (n, d, c) = (trace.rows, self.config.hidden_size, &self.config);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).view()?;
        let mut dnormed = vec![0.0f32; n * d];
        let dl = MatRef::new(dlogits, n, c.vocab_size)?;
        let p = Product { src: dl, dst: MatMut::new(&mut dnormed, n, d)?, accum: Accum::Replace };
        backend.stored_apply_transpose(&head, p).map_err(HfError::backend)?;
        if let (Some((m, g)), None) = (tokens, &self.lm_head) {
            self.head_tokens_backward(m, &trace.normed, dlogits, &mut dnormed, g)?;
        }
        let mut dh = vec![0.0f32; n * d];
        norm_backward(backend, &trace.h_final, norm, c.rms_norm_eps, &dnormed, &mut dh, grad)?;
        Ok(dh)
    }

    /// Accumulates the adapter's gradients into `grads`, given `dlogits =
    /// dL/dlogits [rows, vocab]` and the [`Trace`] of the forward pass that
    /// produced the logits, with the same adapter (see the module docs).
    /// Nothing frozen is written.
    ///
    /// # Errors
    /// [`HfError::Config`] (`dlogits`, `grads`) when the shapes do not
    /// match the trace or the adapter; the backend's errors.
    pub fn backward<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        adapter: Option<&LlamaAdapter<'_>>,
        trace: &Trace,
        dlogits: &[f32],
        grads: Option<&mut LlamaGrads>,
    ) -> Result<(), HfError> {
        let c = &self.config;
        let (n, d, f) = (trace.rows, c.hidden_size, c.intermediate_size);
        let qw = c.q_width();
        let bad = |field: &str, reason: &str| HfError::Config { field: field.into(), reason: reason.into() };
        if dlogits.len() != n * c.vocab_size || trace.layers.len() != c.num_layers {
            return Err(bad("dlogits", "must be [rows, vocab] of the traced pass"));
        }
        refuse_untrainable(adapter)?;
        if !grads_match(c, adapter, grads.as_deref()) {
            return Err(bad("grads", "must be LlamaGrads::zeros of the adapter"));
        }
        let shape = AttentionShape::new(c.num_heads, c.num_kv_heads, c.head_dim).map_err(HfError::Core)?;
        let first_pos = adapter.map_or(0, LlamaAdapter::prefix_tokens);
        let segs = &trace.segments[..];
        let rope: Vec<(Vec<f32>, Vec<f32>)> =
            super::positions(segs, std::iter::repeat(first_pos)).into_iter().map(|p| self.rope(p)).collect();

        let Split { mut lora_g, mut prefix_g, prompt_g, mut bottleneck_g, mut norm_g, last_g, mut tokens_g } =
            Split::of(grads);
        let last = adapter.and_then(|a| a.last_norm()).unwrap_or(&self.norm);
        let tokens = adapter.and_then(LlamaAdapter::token_rows).zip(tokens_g.as_deref_mut());
        let mut dh = self.head_backward(backend, trace, dlogits, (last, last_g), tokens)?;
        let mut buf = Buffers::new(c, n);
        let mut ws = sites::SiteScratch::default();
        for l in (0..c.num_layers).rev() {
            let (layer, t) = (&self.layers[l], &trace.layers[l]);
            let [gq_l, gk_l, gv_l, go_l, gg_l, gu_l, gd_l] = layer_slots(adapter, lora_g.as_deref_mut(), l);
            let Buffers { dact, dg, du, dx2, dx1, x1, dattn, dq, dk, dv, dz, attn_scratch, adapter_scratch } = &mut buf;
            // h_out = a + down(act): da = dh + (norm2 and MLP's share).
            let bg = bottleneck_g.as_deref_mut();
            let adapted = bottleneck_backward(backend, adapter, bg, (l, 1), &t.mlp_pre, &dh, dz, adapter_scratch)?;
            let dh_mlp = if adapted { &dz[..] } else { &dh[..] };
            dact.fill(0.0);
            let act = MatRef::new(&t.act, n, f)?;
            sites::backward(backend, layer.linear(Down), gd_l, act, dh_mlp, dact, &mut ws)?;
            rows::by_rows(backend, [(&mut dg[..], f), (&mut du[..], f)], &|r0, [dg, du]| {
                let (da, g, u) = (rows::from(dact, r0, f), rows::from(&t.gate, r0, f), rows::from(&t.up, r0, f));
                swiglu_backward(da, g, u, dg, du);
            });
            dx2.fill(0.0);
            let x2 = MatRef::new(&t.x2, n, d)?;
            sites::backward(backend, layer.linear(Gate), gg_l, x2, dg, dx2, &mut ws)?;
            sites::backward(backend, layer.linear(Up), gu_l, x2, du, dx2, &mut ws)?;
            let ([w_in, w_post], [g_in, g_post]) =
                layer_norms(adapter, layer, norm_g.as_deref_mut().map(Vec::as_mut_slice), l);
            let mut da = dh;
            norm_backward(backend, &t.a, w_post, c.rms_norm_eps, dx2, &mut da, g_post)?;
            // a = h_in + o(attn).
            let bg = bottleneck_g.as_deref_mut();
            let adapted = bottleneck_backward(backend, adapter, bg, (l, 0), &t.attn_pre, &da, dz, adapter_scratch)?;
            let d_o = if adapted { &dz[..] } else { &da[..] };
            dattn.fill(0.0);
            let attn = MatRef::new(&t.attn, n, qw)?;
            sites::backward(backend, layer.linear(O), go_l, attn, d_o, dattn, &mut ws)?;
            let prefix = adapter.map(|a| a.prefix_layer(c, l)).transpose()?.flatten();
            // Each sequence of a batched pass attends to itself alone.
            let prefix_g_l = prefix_g.as_deref_mut().map(|g| (g, l, c.num_layers));
            attend_backward_each(
                backend,
                &shape,
                t,
                segs,
                prefix.as_ref(),
                prefix_g_l,
                dattn,
                [dq, dk, dv],
                attn_scratch,
            )?;
            rotate_rows(backend, [dq, dk], c, &rope, -1.0);
            rms_norm_rows(backend, &t.h_in, w_in, c.rms_norm_eps, x1);
            dx1.fill(0.0);
            let x1v = MatRef::new(x1, n, d)?;
            sites::backward(backend, layer.linear(Q), gq_l, x1v, dq, dx1, &mut ws)?;
            sites::backward(backend, layer.linear(K), gk_l, x1v, dk, dx1, &mut ws)?;
            sites::backward(backend, layer.linear(V), gv_l, x1v, dv, dx1, &mut ws)?;
            let mut dh_in = da;
            norm_backward(backend, &t.h_in, w_in, c.rms_norm_eps, dx1, &mut dh_in, g_in)?;
            dh = dh_in;
        }
        if let Some(gp) = prompt_g {
            gp.iter_mut().zip(&dh[..trace.virtual_rows * d]).for_each(|(g, d)| *g += d);
        }
        if let (Some(g), Some(m)) = (tokens_g, adapter.and_then(LlamaAdapter::token_rows)) {
            tokens::embed_backward(m, c.vocab_size, &trace.ids, &dh, g)?;
        }
        Ok(())
    }
}

/// Each method's gradient buffers of a [`LlamaGrads`], apart (they are
/// never used together).
#[derive(Default)]
struct Split<'g> {
    lora_g: Option<&'g mut Vec<[Option<SiteGrads>; 7]>>,
    prefix_g: Option<&'g mut Vec<f32>>,
    prompt_g: Option<&'g mut Vec<f32>>,
    bottleneck_g: Option<&'g mut Vec<[[Vec<f32>; 4]; 2]>>,
    norm_g: Option<&'g mut Vec<[Option<Vec<f32>>; 2]>>,
    last_g: Option<&'g mut [f32]>,
    tokens_g: Option<&'g mut [f32]>,
}

impl<'g> Split<'g> {
    fn of(grads: Option<&'g mut LlamaGrads>) -> Self {
        let mut s = Self::default();
        match grads {
            Some(LlamaGrads::Tokens(g)) => s.tokens_g = Some(g),
            Some(LlamaGrads::Norms { layers, last }) => (s.norm_g, s.last_g) = (Some(layers), last.as_deref_mut()),
            Some(LlamaGrads::Bottleneck(g)) => s.bottleneck_g = Some(g),
            Some(LlamaGrads::Modules(g)) => s.lora_g = Some(g),
            Some(LlamaGrads::Prefix(g)) => s.prefix_g = Some(g),
            Some(LlamaGrads::Prompt(g)) => s.prompt_g = Some(g),
            None => {}
        }
        s
    }
}

/// Whether `grads` is [`LlamaGrads::zeros`] of `adapter` on a model of
/// configuration `c` (any buffers when there is no adapter or no grads).
fn grads_match(c: &super::LlamaConfig, adapter: Option<&LlamaAdapter<'_>>, grads: Option<&LlamaGrads>) -> bool {
    let (Some(a), Some(g)) = (adapter, grads) else { return true };
    std::mem::discriminant(&LlamaGrads::zeros(a)) == std::mem::discriminant(g)
        && match (a, g) {
            (LlamaAdapter::Prompt { embeddings: p, .. }, LlamaGrads::Prompt(gp))
            | (LlamaAdapter::Prefix { table: p, .. }, LlamaGrads::Prefix(gp)) => p.len() == gp.len(),
            (LlamaAdapter::Modules { .. }, LlamaGrads::Modules(gl)) => gl.len() == c.num_layers,
            (LlamaAdapter::Bottleneck(_), LlamaGrads::Bottleneck(gb)) => gb.len() == c.num_layers,
            (LlamaAdapter::Norms(_), LlamaGrads::Norms { layers, .. }) => layers.len() == c.num_layers,
            (LlamaAdapter::Tokens(m), LlamaGrads::Tokens(g)) => g.len() == m.rows.len(),
            _ => false,
        }
}

/// The backward of `act = silu(gate) * up`: `d gate` and `d up`
/// (overwritten) from `d act`.
fn swiglu_backward(dact: &[f32], gate: &[f32], up: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &da), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(dact).zip(gate).zip(up) {
        // One exponential for both: `silu(g) = g / (1 + e^-g)`, bit for bit.
        let e1 = 1.0 + (-g).exp();
        let sig = 1.0 / e1;
        *du = da * (g / e1);
        *dg = da * u * sig * (1.0 + g * (1.0 - sig));
    }
}

/// [`attend_backward`] for each sequence `[a, b)` of `segs`, the prefix's
/// gradients (the whole buffer, the layer and the number of layers)
/// accumulated over all of them.
#[allow(clippy::too_many_arguments)]
fn attend_backward_each<B: Backend<f32> + ?Sized>(
    backend: &B,
    shape: &AttentionShape,
    t: &LayerTrace,
    segs: &[(usize, usize)],
    prefix: Option<&Prefix<'_, f32>>,
    mut prefix_g: Option<(&mut Vec<f32>, usize, usize)>,
    dattn: &[f32],
    [dq, dk, dv]: [&mut Vec<f32>; 3],
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
    let p = prefix.map_or(0, |p| p.keys.rows());
    let bad = || HfError::Config { field: "trace".into(), reason: "a segment outside the traced rows".into() };
    let trained_prefix = prefix_g.is_some() && p > 0;
    let macs = segs.iter().map(|&(a, b)| b.saturating_sub(a) * (b.saturating_sub(a) + p)).sum::<usize>();
    let macs = macs.saturating_mul(4 * qw);
    if !trained_prefix && macs >= super::ATTEND_PAR_MIN_MACS {
        return attend_backward_split(backend, shape, t, segs, prefix, dattn, [dq, dk, dv]);
    }
    for &(a, b) in segs {
        let prefix_grads = match prefix_g.as_mut() {
            Some((gp, l, layers)) if p > 0 => Some(PrefixConfig::new(p, *layers, shape)?.layer_grads(gp, *l)?),
            _ => None,
        };
        let qkv = [
            dq.get_mut(a * qw..b * qw).ok_or_else(bad)?,
            dk.get_mut(a * kvw..b * kvw).ok_or_else(bad)?,
            dv.get_mut(a * kvw..b * kvw).ok_or_else(bad)?,
        ];
        let dattn = dattn.get(a * qw..b * qw).ok_or_else(bad)?;
        attend_backward(backend, shape, t, (a, b), prefix, prefix_grads, dattn, qkv, scratch)?;
    }
    Ok(())
}

/// [`attend_backward_each`] without prefix gradients, split by sequence
/// and key/value group, each pair a part of [`Backend::for_each_part`]
/// (so a backend with threads runs several at once): the group's query
/// heads and its key/value columns through [`attn_backward`] into the
/// part's own buffers, then copied into `dq`, `dk`, `dv`. The group's
/// arithmetic is what the whole call does (same blocks, same products,
/// its heads in the same order), at any thread count. A trained prefix's
/// gradients, summed over all groups' columns of one buffer, take the
/// whole call instead.
fn attend_backward_split<'a, B: Backend<f32> + ?Sized>(
    backend: &B,
    shape: &AttentionShape,
    t: &'a LayerTrace,
    segs: &[(usize, usize)],
    prefix: Option<&Prefix<'a, f32>>,
    dattn: &'a [f32],
    [dq, dk, dv]: [&mut Vec<f32>; 3],
) -> Result<(), HfError> {
    let (qw, kvw, dh, groups) = (shape.q_width(), shape.kv_width(), shape.head_dim(), shape.kv_heads().max(1));
    let gw = qw / groups;
    let gshape = AttentionShape::new(shape.heads() / groups, 1, dh).map_err(HfError::Core)?;
    let p = prefix.map_or(0, |p| p.keys.rows());
    type Cell = Mutex<Result<[Vec<f32>; 3], HfError>>;
    let cells: Vec<Cell> = (0..segs.len() * groups).map(|_| Mutex::new(Ok(Default::default()))).collect();
    backend.for_each_part(cells.len(), &|i, be| {
        let (Some(cell), Some(&(a, b))) = (cells.get(i), segs.get(i / groups)) else { return };
        let (g, n) = (i % groups, b.saturating_sub(a));
        let run = || -> Result<[Vec<f32>; 3], HfError> {
            let block = |v: &'a [f32], w: usize, c: usize, cw: usize| -> Result<MatRef<'a, f32>, HfError> {
                head_cols(&MatRef::new(segment(v, a, b, w)?, n, w)?, c, cw)
            };
            let q = block(&t.q, qw, g * gw, gw)?;
            let (k, v) = (block(&t.k, kvw, g * dh, dh)?, block(&t.v, kvw, g * dh, dh)?);
            let go = block(dattn, qw, g * gw, gw)?;
            let pre = match prefix {
                Some(pr) => {
                    Some(Prefix { keys: head_cols(&pr.keys, g * dh, dh)?, values: head_cols(&pr.values, g * dh, dh)? })
                }
                None => None,
            };
            let (mut gq, mut gk, mut gv) = (vec![0.0f32; n * gw], vec![0.0f32; n * dh], vec![0.0f32; n * dh]);
            let mut sc = vec![0.0f32; peft_core::attention::backward_scratch_len(n, n, p)];
            let ag = AttentionGrads {
                q: MatMut::new(&mut gq, n, gw)?,
                k: MatMut::new(&mut gk, n, dh)?,
                v: MatMut::new(&mut gv, n, dh)?,
                prefix: None,
            };
            let mask = Mask { causal: true, key_padding: None, additive: None };
            attn_backward(be, &gshape, q, k, v, pre.as_ref(), &mask, go, ag, &mut sc).map_err(HfError::backend)?;
            Ok([gq, gk, gv])
        };
        let result = run();
        *cell.lock().unwrap_or_else(PoisonError::into_inner) = result;
    });
    for (i, cell) in cells.into_iter().enumerate() {
        let [gq, gk, gv] = cell.into_inner().unwrap_or_else(PoisonError::into_inner)?;
        let (Some(&(a, b)), g) = (segs.get(i / groups), i % groups) else { continue };
        for (dst, w, c, src) in [(&mut *dq, qw, gw, &gq), (&mut *dk, kvw, dh, &gk), (&mut *dv, kvw, dh, &gv)] {
            let rows = dst.get_mut(a * w..b * w).ok_or(peft_core::Error::Overflow)?;
            for (d, s) in rows.chunks_exact_mut(w).zip(src.chunks_exact(c)) {
                d[g * c..(g + 1) * c].copy_from_slice(s);
            }
        }
    }
    Ok(())
}

/// Rows `[a, b)` of a `[rows, width]` buffer.
fn segment(v: &[f32], a: usize, b: usize, width: usize) -> Result<&[f32], HfError> {
    v.get(a * width..b * width)
        .ok_or_else(|| HfError::Config { field: "trace".into(), reason: "a segment outside the traced rows".into() })
}

/// The attention's backward for rows `[a, b)` (one sequence) of one
/// traced layer: `[dq, dk, dv]` of those rows (overwritten) from their
/// `dattn [b - a, q_width]`, the prefix's gradients accumulated into
/// `prefix_grads`.
#[allow(clippy::too_many_arguments)]
fn attend_backward<B: Backend<f32> + ?Sized>(
    backend: &B,
    shape: &AttentionShape,
    t: &LayerTrace,
    (a, b): (usize, usize),
    prefix: Option<&Prefix<'_, f32>>,
    prefix_grads: Option<PrefixGrads<'_, f32>>,
    dattn: &[f32],
    [dq, dk, dv]: [&mut [f32]; 3],
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
    let n = b - a;
    scratch.resize(peft_core::attention::backward_scratch_len(n, n, prefix.map_or(0, |p| p.keys.rows())), 0.0);
    for g in [&mut *dq, &mut *dk, &mut *dv] {
        g.fill(0.0);
    }
    let ag = AttentionGrads {
        q: MatMut::new(dq, n, qw)?,
        k: MatMut::new(dk, n, kvw)?,
        v: MatMut::new(dv, n, kvw)?,
        prefix: prefix_grads,
    };
    let (q, k, v) = (segment(&t.q, a, b, qw)?, segment(&t.k, a, b, kvw)?, segment(&t.v, a, b, kvw)?);
    let (q, k, v) = (MatRef::new(q, n, qw)?, MatRef::new(k, n, kvw)?, MatRef::new(v, n, kvw)?);
    let mask = Mask { causal: true, key_padding: None, additive: None };
    attn_backward(backend, shape, q, k, v, prefix, &mask, MatRef::new(dattn, n, qw)?, ag, scratch)
        .map_err(HfError::backend)
}

/// Refuses the adapters the backward does not train: LoRA on the
/// embeddings or on `lm_head` (they run in the forward).
fn refuse_untrainable(adapter: Option<&LlamaAdapter<'_>>) -> Result<(), HfError> {
    match adapter {
        Some(LlamaAdapter::Modules { tokens: Some(_), .. }) => {
            Err(HfError::Unsupported("training LoRA's trainable tokens (`trainable_token_indices`)".into()))
        }
        Some(LlamaAdapter::Modules { embed, head, .. }) if embed.is_some() || head.is_some() => {
            Err(HfError::Unsupported("training LoRA on embed_tokens or lm_head".into()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Faer;

    /// Random `[n, w]` values (fixed seed per call site).
    fn random(rng: &mut peft_core::Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.normal_f64() as f32).collect()
    }

    /// The split attention (forward: by sequence and head; backward: by
    /// sequence and key/value group) gives the bits of one whole
    /// [`peft_core::attention`] call per sequence, at one and two threads,
    /// with and without a prefix: a wrong column offset, a head read from
    /// the wrong group or a sequence's rows mixed up changes them. The
    /// shapes are above `ATTEND_PAR_MIN_MACS`, so the split runs.
    #[test]
    fn split_attention_gives_the_whole_calls_bits() {
        let shape = AttentionShape::new(6, 2, 16).unwrap();
        let (qw, kvw) = (shape.q_width(), shape.kv_width());
        let segs = [(0usize, 70usize), (70, 150)];
        let n = 150;
        let mut rng = peft_core::Rng::new(17);
        let t = LayerTrace {
            q: random(&mut rng, n * qw),
            k: random(&mut rng, n * kvw),
            v: random(&mut rng, n * kvw),
            ..LayerTrace::default()
        };
        let dattn = random(&mut rng, n * qw);
        let (pk, pv) = (random(&mut rng, 5 * kvw), random(&mut rng, 5 * kvw));
        let macs = segs.iter().map(|&(a, b)| (b - a) * (b - a)).sum::<usize>() * 2 * qw;
        assert!(macs >= super::super::ATTEND_PAR_MIN_MACS);
        let mask = Mask { causal: true, key_padding: None, additive: None };
        for with_prefix in [false, true] {
            let prefix = with_prefix
                .then(|| Prefix { keys: MatRef::new(&pk, 5, kvw).unwrap(), values: MatRef::new(&pv, 5, kvw).unwrap() });
            let p = if with_prefix { 5 } else { 0 };
            // The whole calls, one per sequence, on the reference backend's order of work.
            let be = Faer::new();
            let mut want_out = vec![0.0f32; n * qw];
            let mut want = [vec![0.0f32; n * qw], vec![0.0f32; n * kvw], vec![0.0f32; n * kvw]];
            for &(a, b) in &segs {
                let m = b - a;
                let (q, k, v) = (
                    MatRef::new(&t.q[a * qw..b * qw], m, qw).unwrap(),
                    MatRef::new(&t.k[a * kvw..b * kvw], m, kvw).unwrap(),
                    MatRef::new(&t.v[a * kvw..b * kvw], m, kvw).unwrap(),
                );
                let mut sc = vec![0.0f32; peft_core::attention::backward_scratch_len(m, m, p)];
                let out = MatMut::new(&mut want_out[a * qw..b * qw], m, qw).unwrap();
                peft_core::attention::forward(&be, &shape, q, k, v, prefix.as_ref(), &mask, out, &mut sc).unwrap();
                let [gq, gk, gv] = &mut want;
                let ag = AttentionGrads {
                    q: MatMut::new(&mut gq[a * qw..b * qw], m, qw).unwrap(),
                    k: MatMut::new(&mut gk[a * kvw..b * kvw], m, kvw).unwrap(),
                    v: MatMut::new(&mut gv[a * kvw..b * kvw], m, kvw).unwrap(),
                    prefix: None,
                };
                let go = MatRef::new(&dattn[a * qw..b * qw], m, qw).unwrap();
                attn_backward(&be, &shape, q, k, v, prefix.as_ref(), &mask, go, ag, &mut sc).unwrap();
            }
            for threads in [1, 2] {
                let be = Faer::with_threads(threads);
                let seqs: Vec<super::super::Sequence<'_>> = segs
                    .iter()
                    .map(|&(a, b)| super::super::Sequence {
                        q: MatRef::new(&t.q[a * qw..b * qw], b - a, qw).unwrap(),
                        k: MatRef::new(&t.k[a * kvw..b * kvw], b - a, kvw).unwrap(),
                        v: MatRef::new(&t.v[a * kvw..b * kvw], b - a, kvw).unwrap(),
                        row0: a,
                    })
                    .collect();
                let mut out = vec![f32::NAN; n * qw];
                super::super::attend(&be, &shape, &seqs, prefix.as_ref(), &mut out, &mut Vec::new()).unwrap();
                assert!(out.iter().zip(&want_out).all(|(a, b)| a.to_bits() == b.to_bits()), "forward, {threads}t");
                let [mut gq, mut gk, mut gv] =
                    [vec![f32::NAN; n * qw], vec![f32::NAN; n * kvw], vec![f32::NAN; n * kvw]];
                attend_backward_split(&be, &shape, &t, &segs, prefix.as_ref(), &dattn, [&mut gq, &mut gk, &mut gv])
                    .unwrap();
                for (got, want) in [gq, gk, gv].iter().zip(&want) {
                    assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "backward, {threads}t");
                }
            }
        }
    }
}
