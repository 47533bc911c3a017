//! A tiny frozen decoder built from `peft-core`'s pieces, hosting any of the
//! four methods, and the built-in synthetic task `peft finetune` trains on.
//!
//! ## The model
//!
//! Token embedding, then `layers` pre-residual blocks (no norms: the model
//! is small and its weights are scaled so activations stay O(1)):
//!
//! ```text
//! a  = Attn(x Wq^T, x Wk^T, x Wv^T) Wo^T        (causal multi-head attention)
//! x1 = x + Ad_attn(a)                           (Ad = identity without adapters)
//! m  = gelu(x1 W1^T) W2^T
//! x2 = x1 + Ad_mlp(m)
//! ```
//!
//! The output is the last block's hidden states `[seq, d]`. Every weight is
//! frozen and drawn from a fixed seed. LoRA can sit on any of `q_proj`,
//! `k_proj`, `v_proj`, `o_proj` (PEFT's module names), bottleneck adapters
//! after attention and after the MLP (Houlsby placement), prompt tuning
//! prepends virtual tokens to the embeddings (the loss reads only the real
//! positions), and prefix tuning prepends trainable keys and values in
//! every layer's attention.
//!
//! ## The task
//!
//! A "teacher" is the same frozen model with a hidden rank-`k` change added
//! to `Wq` and `Wv` of every layer; the student (frozen model plus adapter)
//! learns to reproduce the teacher's hidden states on random token
//! sequences, by mean squared error. LoRA with rank >= `k` on q and v can
//! match it exactly; the other methods approximate it. Train and held-out
//! sequences come from different seeds.

use peft_core::activation::Activation;
use peft_core::adapter::{AdapterConfig, AdapterGrads, AdapterParams, BottleneckAdapter};
use peft_core::attention::backward::{AttentionGrads, backward as attn_backward};
use peft_core::attention::forward::forward as attn_forward;
use peft_core::attention::{AttentionShape, Mask, backward_scratch_len as attn_bwd_len};
use peft_core::dora::Dora;
use peft_core::ia3::Ia3;
use peft_core::loha::Loha;
use peft_core::lokr::{Factor, Lokr};
use peft_core::lora::{Lora, LoraConfig};
use peft_core::prefix::{PrefixConfig, PrefixTuning};
use peft_core::prompt::PromptTuning;
use peft_core::vera::{Vera, VeraProjection};
use peft_core::{Accum, Backend, Dense, Error, MatMut, MatRef, Method, Op, Result, Rng};

/// PEFT's names of the attention projections, in the order LoRA targets
/// are indexed.
pub const PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// Sizes of the tiny model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TinyConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden width `d`.
    pub d: usize,
    /// Attention heads (`d` must be a multiple).
    pub heads: usize,
    /// Blocks.
    pub layers: usize,
    /// MLP width.
    pub hidden: usize,
    /// Tokens per sequence.
    pub seq: usize,
}

impl Default for TinyConfig {
    /// `vocab 64, d 64, 4 heads, 2 layers, MLP 128, 16 tokens`.
    fn default() -> Self {
        Self { vocab: 64, d: 64, heads: 4, layers: 2, hidden: 128, seq: 16 }
    }
}

/// One block's frozen weights, PyTorch layout `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    /// `[q, k, v, o]` projections, `[d, d]` each.
    pub proj: [Vec<f32>; 4],
    /// MLP up projection `[hidden, d]`.
    pub w1: Vec<f32>,
    /// MLP down projection `[d, hidden]`.
    pub w2: Vec<f32>,
}

/// The frozen model.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyModel {
    /// Sizes.
    pub cfg: TinyConfig,
    /// Token embedding `[vocab, d]`.
    pub embed: Vec<f32>,
    /// The blocks.
    pub blocks: Vec<Block>,
}

fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    rng.fill_normal(&mut v, std);
    v
}

impl TinyModel {
    /// Random frozen weights from `seed`: embedding `N(0, 1)`, projections
    /// `N(0, 1/d)`, `W1 N(0, 1/d)`, `W2 N(0, 1/hidden)` (unit-variance
    /// activations through each product).
    ///
    /// # Errors
    /// [`Error::InvalidHeads`] if `d` is not a positive multiple of `heads`;
    /// [`Error::InvalidParameter`] for a zero size.
    pub fn new(cfg: TinyConfig, seed: u64) -> Result<Self> {
        for (name, v) in [("vocab", cfg.vocab), ("layers", cfg.layers), ("hidden", cfg.hidden), ("seq", cfg.seq)] {
            if v == 0 {
                return Err(Error::InvalidParameter { name, rule: "must be positive" });
            }
        }
        shape_of(&cfg)?;
        let mut rng = Rng::new(seed);
        let d = cfg.d;
        let embed = normal(&mut rng, cfg.vocab * d, 1.0);
        let s = 1.0 / (d as f64).sqrt();
        let blocks = (0..cfg.layers)
            .map(|_| Block {
                proj: core::array::from_fn(|_| normal(&mut rng, d * d, s)),
                w1: normal(&mut rng, cfg.hidden * d, s),
                w2: normal(&mut rng, d * cfg.hidden, 1.0 / (cfg.hidden as f64).sqrt()),
            })
            .collect();
        Ok(Self { cfg, embed, blocks })
    }

    /// The teacher: a copy with `W += U V` on `q_proj` and `v_proj` of every
    /// layer, `U [d, rank]`, `V [rank, d]` with entries `N(0, std^2)`.
    pub fn with_hidden_change(&self, rank: usize, std: f64, seed: u64) -> Self {
        let mut t = self.clone();
        let mut rng = Rng::new(seed);
        let d = self.cfg.d;
        for b in &mut t.blocks {
            for p in [0, 2] {
                let u = normal(&mut rng, d * rank, std);
                let v = normal(&mut rng, rank * d, std);
                for i in 0..d {
                    for j in 0..d {
                        let dot: f32 = (0..rank).map(|r| u[i * rank + r] * v[r * d + j]).sum();
                        b.proj[p][i * d + j] += dot;
                    }
                }
            }
        }
        t
    }

    /// Every frozen tensor with its name (Hugging Face-style names).
    pub fn tensors(&self) -> Vec<(String, &[f32])> {
        let mut out = vec![("embed_tokens.weight".to_string(), self.embed.as_slice())];
        for (l, b) in self.blocks.iter().enumerate() {
            for (name, w) in PROJECTIONS.iter().zip(&b.proj) {
                out.push((format!("layers.{l}.self_attn.{name}.weight"), w.as_slice()));
            }
            out.push((format!("layers.{l}.mlp.up_proj.weight"), b.w1.as_slice()));
            out.push((format!("layers.{l}.mlp.down_proj.weight"), b.w2.as_slice()));
        }
        out
    }

    /// Number of frozen parameters.
    pub fn num_params(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.len()).sum()
    }
}

fn shape_of(cfg: &TinyConfig) -> Result<AttentionShape> {
    if cfg.heads == 0 || cfg.d % cfg.heads != 0 {
        return Err(Error::InvalidHeads { heads: cfg.heads, kv_heads: cfg.heads, head_dim: 0 });
    }
    AttentionShape::new(cfg.heads, cfg.heads, cfg.d / cfg.heads)
}

/// One trainable tensor with its gradient and optimizer state.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// Name (PEFT's key where one exists).
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values.
    pub value: Vec<f32>,
    /// Gradient, accumulated by backward, cleared by [`Peft::zero_grad`].
    pub grad: Vec<f32>,
    /// Whether weight decay applies (not for biases).
    pub decay: bool,
}

impl Param {
    fn new(name: String, shape: Vec<usize>, value: Vec<f32>, decay: bool) -> Self {
        let grad = vec![0.0; value.len()];
        Self { name, shape, value, grad, decay }
    }
}

/// A method's configuration for the tiny model.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// LoRA on the listed projections.
    Lora {
        /// Rank `r`.
        rank: usize,
        /// `alpha`; the scale is `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
        alpha: f64,
        /// rsLoRA.
        use_rslora: bool,
        /// Targeted projections, indices into [`PROJECTIONS`], ascending.
        targets: Vec<usize>,
    },
    /// Bottleneck adapters after attention and after the MLP.
    Adapter {
        /// Width, activation, init.
        config: AdapterConfig,
    },
    /// Prompt tuning with this many virtual tokens.
    Prompt {
        /// Virtual tokens.
        n_virtual: usize,
    },
    /// Prefix tuning with this many prefix positions per layer.
    Prefix {
        /// Prefix length.
        n_prefix: usize,
    },
    /// DoRA on the listed projections (LoRA's `A`, `B` and a magnitude).
    Dora {
        /// Rank `r`.
        rank: usize,
        /// `alpha`; the scale is `alpha / r`.
        alpha: f64,
        /// Targeted projections, indices into [`PROJECTIONS`], ascending.
        targets: Vec<usize>,
    },
    /// (IA)^3 on the listed projections.
    Ia3 {
        /// Targeted projections, ascending.
        targets: Vec<usize>,
        /// Those among them whose input, not output, is scaled (PEFT's
        /// `feedforward_modules`).
        feedforward: Vec<usize>,
    },
    /// LoHa on the listed projections.
    Loha {
        /// Rank `r`.
        rank: usize,
        /// `alpha`; the scale is `alpha / r`.
        alpha: f64,
        /// Targeted projections, ascending.
        targets: Vec<usize>,
    },
    /// LoKr on the listed projections, PEFT's layout
    /// ([`peft_core::lokr::Layout::of`], no `decompose_both`, no factor).
    Lokr {
        /// Rank `r` of the low-rank factors.
        rank: usize,
        /// `alpha`; the scale is `alpha / r`.
        alpha: f64,
        /// Targeted projections, ascending.
        targets: Vec<usize>,
    },
    /// VeRA on the listed projections: one pair of frozen projections
    /// (`d x d` layers: `vera_A [r, d]`, `vera_B [d, r]`) shared by all.
    Vera {
        /// Rank `r` of the shared projections.
        rank: usize,
        /// Targeted projections, ascending.
        targets: Vec<usize>,
    },
}

/// An adapter for the tiny model: its method, configuration and trainable
/// tensors. The frozen model is separate and never written.
#[derive(Clone, Debug, PartialEq)]
pub struct Peft {
    /// The method and its configuration.
    pub spec: Spec,
    /// Trainable tensors, in a fixed order per method (see [`Peft::new`]).
    pub params: Vec<Param>,
    /// Frozen tensors the adapter carries (VeRA's shared projections,
    /// `base_model.vera_A` and `base_model.vera_B`, PEFT's keys): saved with
    /// it, never given to an optimizer (their `grad` stays zero).
    pub frozen: Vec<Param>,
}

/// The error for a LoRA target list that names no projection of the model.
const LORA_TARGET: Error =
    Error::InvalidParameter { name: "LoRA target", rule: "must be one or more of q_proj, k_proj, v_proj, o_proj" };

/// The error for merging an adapter that has nothing to merge.
const NOT_MERGEABLE: Error =
    Error::InvalidParameter { name: "adapter", rule: "must adapt projections (with all its tensors) to merge" };

/// The module of each projection inside a layer, in [`PROJECTIONS`]' order.
const LORA_MODULES: [&str; 4] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"];

/// The module of the bottleneck adapter at each site of a layer (0 after
/// attention, 1 after the MLP).
const ADAPTER_MODULES: [&str; 2] = ["adapter_attn", "adapter_mlp"];

/// PEFT's module name of projection `p` of layer `l`.
fn lora_key(l: usize, p: usize) -> Option<String> {
    LORA_MODULES.get(p).map(|module| format!("layers.{l}.{module}"))
}

/// The name prefix of the bottleneck adapter at `site` of layer `l`.
fn adapter_key(l: usize, site: usize) -> String {
    format!("layers.{l}.{}", ADAPTER_MODULES.get(site).unwrap_or(&"adapter_mlp"))
}

/// Whether `name` is `layers.{l}.{module}.{leaf}`.
fn is_param(name: &str, l: usize, module: &str, leaf: &str) -> bool {
    let Some((index, rest)) = name.strip_prefix("layers.").and_then(|r| r.split_once('.')) else { return false };
    index.parse::<usize>() == Ok(l) && rest.strip_prefix(module).and_then(|r| r.strip_prefix('.')) == Some(leaf)
}

/// The name of the prompt (prompt tuning) or prefix (prefix tuning) tensor:
/// PEFT's.
const PROMPT_KEY: &str = "prompt_embeddings";

/// The module names of `VeRA`'s shared projections (PEFT's keys).
pub const VERA_KEYS: [&str; 2] = ["base_model.vera_A", "base_model.vera_B"];

/// Indices into [`PROJECTIONS`] of `names`, ascending, without repeats.
///
/// # Errors
/// [`Error::InvalidParameter`] for a name not in [`PROJECTIONS`] or an
/// empty list.
pub fn projection_indices(names: &[&str]) -> Result<Vec<usize>> {
    let mut idx = Vec::new();
    for t in names {
        idx.push(PROJECTIONS.iter().position(|p| p == t).ok_or(LORA_TARGET)?);
    }
    idx.sort_unstable();
    idx.dedup();
    if idx.is_empty() {
        return Err(LORA_TARGET);
    }
    Ok(idx)
}

impl Spec {
    /// LoRA on `targets` (names from [`PROJECTIONS`]), PEFT's defaults
    /// otherwise (no rsLoRA).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a name not in [`PROJECTIONS`] or an
    /// empty list.
    pub fn lora(rank: usize, alpha: f64, targets: &[&str]) -> Result<Self> {
        Ok(Spec::Lora { rank, alpha, use_rslora: false, targets: projection_indices(targets)? })
    }

    /// The scale's configuration of the rank-and-alpha methods (LoRA, DoRA,
    /// LoHa, LoKr).
    fn lora_config(&self) -> Option<LoraConfig<'static>> {
        match *self {
            Spec::Lora { rank, alpha, use_rslora, .. } => Some(LoraConfig::new(rank, alpha).with_rslora(use_rslora)),
            Spec::Dora { rank, alpha, .. } | Spec::Loha { rank, alpha, .. } | Spec::Lokr { rank, alpha, .. } => {
                Some(LoraConfig::new(rank, alpha))
            }
            _ => None,
        }
    }

    /// The projections the method adapts (none for adapters, prompts and
    /// prefixes).
    pub fn targets(&self) -> &[usize] {
        match self {
            Spec::Lora { targets, .. }
            | Spec::Dora { targets, .. }
            | Spec::Ia3 { targets, .. }
            | Spec::Loha { targets, .. }
            | Spec::Lokr { targets, .. }
            | Spec::Vera { targets, .. } => targets,
            Spec::Adapter { .. } | Spec::Prompt { .. } | Spec::Prefix { .. } => &[],
        }
    }

    /// LoKr's layout on a `d x d` projection.
    fn lokr_layout(&self, d: usize) -> Option<peft_core::lokr::Layout> {
        match *self {
            Spec::Lokr { rank, .. } => Some(peft_core::lokr::Layout::of(d, d, rank, false, -1)),
            _ => None,
        }
    }
}

impl Peft {
    /// A fresh adapter for `model`, initialized from `seed` as its method
    /// prescribes (LoRA: A Kaiming-uniform, B = 0; adapter: W_up = b_up = 0;
    /// prompt: rows of the frozen embedding sampled at random; prefix:
    /// `N(0, 1)`).
    ///
    /// Tensor order: LoRA `A, B` per layer and target, named
    /// `layers.{l}.self_attn.{proj}.lora_A.weight`; adapters
    /// `down.weight, down.bias, up.weight, up.bias` per layer for `attn` then
    /// `mlp`; prompt and prefix one `prompt_embeddings` tensor (PEFT's name
    /// and layout).
    ///
    /// # Errors
    /// `peft-core`'s validation errors for the method's configuration.
    pub fn new(model: &TinyModel, spec: Spec, seed: u64) -> Result<Self> {
        let cfg = model.cfg;
        let d = cfg.d;
        let mut rng = Rng::new(seed);
        let mut params = Vec::new();
        let mut frozen = Vec::new();
        match &spec {
            Spec::Lora { rank, targets, .. } => {
                let config = spec.lora_config().ok_or(LORA_TARGET)?;
                let r = *rank;
                for l in 0..cfg.layers {
                    for &t in targets {
                        let key = lora_key(l, t).ok_or(LORA_TARGET)?;
                        let mut layer = Lora::new(&config, d, d, vec![0.0; r * d], vec![0.0; d * r])?;
                        layer.init_adapter(&mut rng);
                        let (a, b) = layer.into_parts();
                        params.push(Param::new(format!("{key}.lora_A.weight"), vec![r, d], a, true));
                        params.push(Param::new(format!("{key}.lora_B.weight"), vec![d, r], b, true));
                    }
                }
            }
            Spec::Adapter { config } => {
                let m = config.bottleneck(d)?;
                for l in 0..cfg.layers {
                    for site in 0..2 {
                        let (mut wd, mut bd, mut wu, mut bu) =
                            (vec![0.0; m * d], vec![0.0; m], vec![0.0; d * m], vec![0.0; d]);
                        let p = AdapterParams { w_down: &mut wd, b_down: &mut bd, w_up: &mut wu, b_up: &mut bu };
                        BottleneckAdapter::new(config, d, p)?.init(&mut rng);
                        let key = adapter_key(l, site);
                        params.push(Param::new(format!("{key}.down.weight"), vec![m, d], wd, true));
                        params.push(Param::new(format!("{key}.down.bias"), vec![m], bd, false));
                        params.push(Param::new(format!("{key}.up.weight"), vec![d, m], wu, true));
                        params.push(Param::new(format!("{key}.up.bias"), vec![d], bu, false));
                    }
                }
            }
            Spec::Prompt { n_virtual } => {
                let mut p = vec![0.0; n_virtual * d];
                let table = MatRef::new(&model.embed, cfg.vocab, d)?;
                PromptTuning::new(&mut p, *n_virtual, d)?.init_sample_vocab(table, &mut rng)?;
                params.push(Param::new(PROMPT_KEY.into(), vec![*n_virtual, d], p, false));
            }
            Spec::Prefix { n_prefix } => {
                let pc = PrefixConfig::new(*n_prefix, cfg.layers, &shape_of(&cfg)?)?;
                let mut kv = vec![0.0; pc.len()];
                PrefixTuning::new(pc, &mut kv)?.init_normal(&mut rng);
                params.push(Param::new(PROMPT_KEY.into(), vec![*n_prefix, pc.row_width()], kv, false));
            }
            Spec::Dora { rank, targets, .. } => {
                let config = spec.lora_config().ok_or(LORA_TARGET)?;
                let r = *rank;
                for l in 0..cfg.layers {
                    for &t in targets {
                        let key = lora_key(l, t).ok_or(LORA_TARGET)?;
                        let w = model.blocks.get(l).and_then(|b| b.proj.get(t)).ok_or(LORA_TARGET)?;
                        let base = Dense::new(w, d, d)?;
                        let (a, b, m) = (vec![0.0; r * d], vec![0.0; d * r], vec![0.0; d]);
                        let mut layer = Dora::new(&config, d, d, a, b, m, vec![0.0; d])?;
                        let mut sc = vec![0.0; peft_core::dora::refresh_scratch_len(&base, d)];
                        layer.init_adapter(&peft_core::Reference, &base, &mut rng, &mut sc)?;
                        let (a, b, m) = layer.adapter_mut();
                        params.push(Param::new(format!("{key}.lora_A.weight"), vec![r, d], a.to_vec(), true));
                        params.push(Param::new(format!("{key}.lora_B.weight"), vec![d, r], b.to_vec(), true));
                        params.push(Param::new(format!("{key}.lora_magnitude_vector"), vec![d], m.to_vec(), false));
                    }
                }
            }
            Spec::Ia3 { targets, feedforward } => {
                for l in 0..cfg.layers {
                    for &t in targets {
                        let key = lora_key(l, t).ok_or(LORA_TARGET)?;
                        let ff = feedforward.contains(&t);
                        let mut layer = Ia3::new(d, d, ff, vec![0.0; d])?;
                        layer.init_adapter();
                        let shape = if ff { vec![1, d] } else { vec![d, 1] };
                        params.push(Param::new(format!("{key}.ia3_l"), shape, layer.vector().to_vec(), false));
                    }
                }
            }
            Spec::Loha { rank, targets, .. } => {
                let config = spec.lora_config().ok_or(LORA_TARGET)?;
                let r = *rank;
                for l in 0..cfg.layers {
                    for &t in targets {
                        let key = lora_key(l, t).ok_or(LORA_TARGET)?;
                        let (na, nb) = (vec![0.0; d * r], vec![0.0; r * d]);
                        let mut layer = Loha::new(&config, d, d, [na.clone(), nb.clone(), na, nb])?;
                        layer.init_adapter(&mut rng);
                        let shapes = [[d, r], [r, d], [d, r], [r, d]];
                        for ((name, f), shape) in peft_core::loha::KEYS.iter().zip(layer.factors_mut()).zip(shapes) {
                            params.push(Param::new(format!("{key}.{name}"), shape.to_vec(), f.to_vec(), true));
                        }
                    }
                }
            }
            Spec::Lokr { rank, targets, .. } => {
                let config = spec.lora_config().ok_or(LORA_TARGET)?;
                let layout = spec.lokr_layout(d).ok_or(LORA_TARGET)?;
                for l in 0..cfg.layers {
                    for &t in targets {
                        let key = lora_key(l, t).ok_or(LORA_TARGET)?;
                        let mut tensors: Vec<(&str, [usize; 2], Vec<f32>)> =
                            layout.tensors(*rank).map(|(n, s)| (n, s, vec![0.0; s[0] * s[1]])).collect();
                        {
                            let mut it = tensors.iter_mut().map(|(_, _, v)| &mut v[..]);
                            let mut factor = |low: bool| -> Result<Factor<&mut [f32]>> {
                                let first = it.next().ok_or(LORA_TARGET)?;
                                Ok(if low {
                                    Factor::LowRank(first, it.next().ok_or(LORA_TARGET)?)
                                } else {
                                    Factor::Full(first)
                                })
                            };
                            let (w1, w2) = (factor(layout.w1_low_rank)?, factor(layout.w2_low_rank)?);
                            Lokr::new(&config, layout.d1, layout.d2, w1, w2)?.init_adapter(&mut rng);
                        }
                        for (name, shape, v) in tensors {
                            params.push(Param::new(format!("{key}.{name}"), shape.to_vec(), v, true));
                        }
                    }
                }
            }
            Spec::Vera { rank, targets } => {
                let r = *rank;
                let mut proj = VeraProjection::new(r, d, d, vec![0.0; r * d], vec![0.0; d * r])?;
                proj.init(&mut rng);
                frozen.push(Param::new(VERA_KEYS[0].into(), vec![r, d], proj.a().to_vec(), false));
                frozen.push(Param::new(VERA_KEYS[1].into(), vec![d, r], proj.b().to_vec(), false));
                for l in 0..cfg.layers {
                    for &t in targets {
                        let key = lora_key(l, t).ok_or(LORA_TARGET)?;
                        let mut layer = Vera::new(r, d, d, vec![0.0; r], vec![0.0; d])?;
                        layer.init_adapter(peft_core::vera::D_INITIAL);
                        params.push(Param::new(
                            format!("{key}.vera_lambda_d"),
                            vec![r],
                            layer.lambda_d().to_vec(),
                            false,
                        ));
                        params.push(Param::new(
                            format!("{key}.vera_lambda_b"),
                            vec![d],
                            layer.lambda_b().to_vec(),
                            false,
                        ));
                    }
                }
            }
        }
        Ok(Self { spec, params, frozen })
    }

    /// The method.
    pub fn method(&self) -> Method {
        match self.spec {
            Spec::Lora { .. } => Method::Lora,
            Spec::Adapter { .. } => Method::Adapter,
            Spec::Prompt { .. } => Method::Prompt,
            Spec::Prefix { .. } => Method::Prefix,
            Spec::Dora { .. } => Method::Lora,
            Spec::Ia3 { .. } => Method::Ia3,
            Spec::Loha { .. } => Method::Loha,
            Spec::Lokr { .. } => Method::Lokr,
            Spec::Vera { .. } => Method::Vera,
        }
    }

    /// The method's name as `peft finetune` prints it (`"dora"` for DoRA,
    /// which [`Peft::method`] counts as LoRA).
    pub fn name(&self) -> &'static str {
        match self.spec {
            Spec::Dora { .. } => "dora",
            _ => self.method().name(),
        }
    }

    /// Trainable parameter count.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.value.len()).sum()
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad.fill(0.0);
        }
    }

    /// Virtual tokens prepended to the sequence (prompt tuning), else 0.
    pub fn n_virtual(&self) -> usize {
        match self.spec {
            Spec::Prompt { n_virtual } => n_virtual,
            _ => 0,
        }
    }

    /// The tensor named `name`.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The tensor named `name`, mutably.
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Param> {
        self.params.iter_mut().find(|p| p.name == name)
    }

    /// The adapter on projection `p` (`d x d`) of layer `l`, by PEFT's
    /// names, if the method targets it.
    fn site(&mut self, l: usize, p: usize, d: usize) -> Option<Site<'_>> {
        if !self.spec.targets().contains(&p) {
            return None;
        }
        let module = LORA_MODULES.get(p)?;
        let params = &mut self.params[..];
        Some(match &self.spec {
            Spec::Lora { .. } => {
                Site::Lora(self.spec.lora_config()?, find_n(params, l, module, ["lora_A.weight", "lora_B.weight"])?)
            }
            Spec::Dora { .. } => Site::Dora(
                self.spec.lora_config()?,
                find_n(params, l, module, ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"])?,
            ),
            Spec::Ia3 { feedforward, .. } => {
                let [v] = find_n(params, l, module, ["ia3_l"])?;
                Site::Ia3(feedforward.contains(&p), v)
            }
            Spec::Loha { .. } => {
                Site::Loha(self.spec.lora_config()?, find_n(params, l, module, peft_core::loha::KEYS)?)
            }
            Spec::Lokr { rank, .. } => {
                let layout = self.spec.lokr_layout(d)?;
                let names: Vec<&str> = layout.tensors(*rank).map(|(n, _)| n).collect();
                Site::Lokr(self.spec.lora_config()?, layout, find(params, l, module, &names)?)
            }
            Spec::Vera { .. } => {
                let [a, b] = &self.frozen[..] else { return None };
                Site::Vera([a, b], find_n(params, l, module, ["vera_lambda_d", "vera_lambda_b"])?)
            }
            Spec::Adapter { .. } | Spec::Prompt { .. } | Spec::Prefix { .. } => return None,
        })
    }

    /// The adapter at `site` (0 after attention, 1 after the MLP) of layer
    /// `l`, by name: its config and its four tensors `[W_down, b_down,
    /// W_up, b_up]`.
    fn adapter_site(&mut self, l: usize, site: usize) -> Option<(AdapterConfig, [&mut Param; 4])> {
        let Spec::Adapter { config } = self.spec else { return None };
        let module = ADAPTER_MODULES.get(site)?;
        let params = find_n(&mut self.params, l, module, ["down.weight", "down.bias", "up.weight", "up.bias"])?;
        Some((config, params))
    }

    /// The prompt or prefix tensor.
    fn prompt(&mut self) -> Result<&mut Param> {
        self.param_mut(PROMPT_KEY).ok_or(Error::InvalidParameter { name: PROMPT_KEY, rule: "must be present" })
    }
}

/// Activations of one sequence, kept by the forward pass for backward.
#[derive(Debug, Default)]
struct LayerCache {
    x: Vec<f32>,
    qkv: [Vec<f32>; 3],
    o: Vec<f32>,
    a: Vec<f32>,
    x1: Vec<f32>,
    hpre: Vec<f32>,
    act: Vec<f32>,
    m: Vec<f32>,
}

/// The forward pass's record of one sequence.
#[derive(Debug, Default)]
pub struct Trace {
    layers: Vec<LayerCache>,
    out: Vec<f32>,
    rows: usize,
}

impl Trace {
    /// The output hidden states of the real tokens, `[seq, d]`.
    pub fn output(&self, skip_rows: usize, d: usize) -> &[f32] {
        self.out.get(skip_rows * d..).unwrap_or(&[])
    }
}

const GELU: Activation = Activation::GeluTanh;

/// Forward and backward of the tiny model with an optional adapter.
///
/// The model is borrowed read-only: every frozen weight reaches the methods
/// as a [`Dense`] base, so one model can serve several runners (threads,
/// adapters) at once.
pub struct Runner<'m, B> {
    model: &'m TinyModel,
    backend: B,
    shape: AttentionShape,
    scratch: Vec<f32>,
}

impl<'m, B: Backend<f32, Error = Error>> Runner<'m, B> {
    /// A runner over `model`, on a backend whose errors are `peft-core`'s
    /// (the reference and faer backends).
    ///
    /// # Errors
    /// [`Error::InvalidHeads`].
    pub fn new(model: &'m TinyModel, backend: B) -> Result<Self> {
        let shape = shape_of(&model.cfg)?;
        Ok(Self { model, backend, shape, scratch: Vec::new() })
    }

    /// The model.
    pub fn model(&self) -> &TinyModel {
        self.model
    }

    fn scratch(&mut self, n: usize) -> Vec<f32> {
        let mut s = core::mem::take(&mut self.scratch);
        if s.len() < n {
            s.resize(n, 0.0);
        }
        s
    }

    /// `y = x W^T` for projection `p` of layer `l`, through the adapter if
    /// its method targets it.
    fn project(&mut self, peft: &mut Option<&mut Peft>, l: usize, p: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (d, rows) = (self.model.cfg.d, x.len() / self.model.cfg.d);
        let base = Dense::new(&self.model.blocks[l].proj[p], d, d)?;
        let mut scratch = core::mem::take(&mut self.scratch);
        let site = peft.as_deref_mut().and_then(|pf| pf.site(l, p, d));
        let res = projection::forward(
            site,
            &self.backend,
            &base,
            MatRef::new(x, rows, d)?,
            MatMut::new(y, rows, d)?,
            &mut scratch,
        );
        self.scratch = scratch;
        res
    }

    /// `gx += dL/dx` of [`project`](Self::project), accumulating the
    /// adapter's gradients.
    fn project_backward(
        &mut self,
        peft: &mut Option<&mut Peft>,
        l: usize,
        p: usize,
        x: &[f32],
        gy: &[f32],
        gx: &mut [f32],
    ) -> Result<()> {
        let (d, rows) = (self.model.cfg.d, x.len() / self.model.cfg.d);
        let base = Dense::new(&self.model.blocks[l].proj[p], d, d)?;
        let mut scratch = core::mem::take(&mut self.scratch);
        let site = peft.as_deref_mut().and_then(|pf| pf.site(l, p, d));
        let (xv, gv) = (MatRef::new(x, rows, d)?, MatRef::new(gy, rows, d)?);
        let res = projection::backward(site, &self.backend, &base, xv, gv, gx, &mut scratch);
        self.scratch = scratch;
        res
    }

    /// The adapter at `site` (0 after attention, 1 after the MLP) of layer
    /// `l`: `h = x + Ad(x)`, or a copy without adapters.
    fn adapter_forward(
        &mut self,
        peft: &mut Option<&mut Peft>,
        l: usize,
        site: usize,
        x: &[f32],
        h: &mut [f32],
    ) -> Result<()> {
        let (d, rows) = (self.model.cfg.d, x.len() / self.model.cfg.d);
        let Some((config, [wd, bd, wu, bu])) = peft.as_deref_mut().and_then(|pf| pf.adapter_site(l, site)) else {
            h.copy_from_slice(x);
            return Ok(());
        };
        let params =
            AdapterParams { w_down: &mut wd.value, b_down: &mut bd.value, w_up: &mut wu.value, b_up: &mut bu.value };
        let ad = BottleneckAdapter::new(&config, d, params)?;
        let mut scratch = self.scratch(ad.forward_scratch_len(rows));
        let res = ad.forward(&self.backend, MatRef::new(x, rows, d)?, MatMut::new(h, rows, d)?, &mut scratch);
        self.scratch = scratch;
        res
    }

    /// Backward of [`adapter_forward`](Self::adapter_forward): `gx = dL/dx`.
    fn adapter_backward(
        &mut self,
        peft: &mut Option<&mut Peft>,
        l: usize,
        site: usize,
        x: &[f32],
        gh: &[f32],
        gx: &mut [f32],
    ) -> Result<()> {
        let (d, rows) = (self.model.cfg.d, x.len() / self.model.cfg.d);
        let Some((config, [wd, bd, wu, bu])) = peft.as_deref_mut().and_then(|pf| pf.adapter_site(l, site)) else {
            gx.copy_from_slice(gh);
            return Ok(());
        };
        let params =
            AdapterParams { w_down: &mut wd.value, b_down: &mut bd.value, w_up: &mut wu.value, b_up: &mut bu.value };
        let grads = AdapterGrads { w_down: &mut wd.grad, b_down: &mut bd.grad, w_up: &mut wu.grad, b_up: &mut bu.grad };
        let ad = BottleneckAdapter::new(&config, d, params)?;
        let mut scratch = self.scratch(ad.backward_scratch_len(rows));
        let res = ad.backward(
            &self.backend,
            MatRef::new(x, rows, d)?,
            MatRef::new(gh, rows, d)?,
            Some(MatMut::new(gx, rows, d)?),
            grads,
            &mut scratch,
        );
        self.scratch = scratch;
        res
    }

    /// Runs one sequence of token ids; the output hidden states of the real
    /// tokens are `trace.output(peft.n_virtual(), d)`.
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`], [`Error::ShapeMismatch`] for a sequence
    /// of another length than `cfg.seq`, and `peft-core`'s errors.
    pub fn forward(&mut self, mut peft: Option<&mut Peft>, tokens: &[usize], trace: &mut Trace) -> Result<()> {
        let cfg = self.model.cfg;
        let d = cfg.d;
        if tokens.len() != cfg.seq {
            return Err(Error::ShapeMismatch {
                operand: peft_core::error::Operand::TokenIds,
                expected: cfg.seq,
                found: tokens.len(),
            });
        }
        let nv = peft.as_deref().map_or(0, Peft::n_virtual);
        let rows = cfg.seq + nv;
        let mut embeds = vec![0.0f32; cfg.seq * d];
        for (e, &t) in embeds.chunks_exact_mut(d).zip(tokens) {
            let row =
                self.model.embed.get(t * d..(t + 1) * d).ok_or(Error::TokenOutOfRange { id: t, vocab: cfg.vocab })?;
            e.copy_from_slice(row);
        }
        let mut x = vec![0.0f32; rows * d];
        match peft.as_deref_mut() {
            Some(pf @ Peft { spec: Spec::Prompt { .. }, .. }) => {
                let n_virtual = pf.n_virtual();
                PromptTuning::new(&mut pf.prompt()?.value, n_virtual, d)?.prepend(&embeds, 1, cfg.seq, &mut x)?
            }
            _ => x.copy_from_slice(&embeds),
        }
        trace.rows = rows;
        trace.layers.resize_with(cfg.layers, LayerCache::default);
        for l in 0..cfg.layers {
            let mut c = core::mem::take(&mut trace.layers[l]);
            c.x = x;
            for (p, buf) in c.qkv.iter_mut().enumerate() {
                buf.resize(rows * d, 0.0);
                self.project(&mut peft, l, p, &c.x, buf)?;
            }
            c.o.resize(rows * d, 0.0);
            let mut scratch = self.scratch(peft_core::attention::forward_scratch_len(rows, rows, cfg_prefix(&peft)));
            let [q, k, v] = &c.qkv;
            let (q, k, v) = (MatRef::new(q, rows, d)?, MatRef::new(k, rows, d)?, MatRef::new(v, rows, d)?);
            let out = MatMut::new(&mut c.o, rows, d)?;
            let res = match peft.as_deref_mut() {
                Some(pf @ Peft { spec: Spec::Prefix { .. }, .. }) => {
                    let pc = PrefixConfig::new(cfg_prefix(&Some(&mut *pf)), cfg.layers, &self.shape)?;
                    let pt = PrefixTuning::new(pc, &mut pf.prompt()?.value)?;
                    let prefix = pt.layer(l)?;
                    attn_forward(&self.backend, &self.shape, q, k, v, Some(&prefix), &Mask::causal(), out, &mut scratch)
                }
                _ => attn_forward(&self.backend, &self.shape, q, k, v, None, &Mask::causal(), out, &mut scratch),
            };
            self.scratch = scratch;
            res?;
            c.a.resize(rows * d, 0.0);
            let o = core::mem::take(&mut c.o);
            let mut a = core::mem::take(&mut c.a);
            self.project(&mut peft, l, 3, &o, &mut a)?;
            c.o = o;
            c.a = a;
            let mut x1 = vec![0.0f32; rows * d];
            self.adapter_forward(&mut peft, l, 0, &c.a, &mut x1)?;
            x1.iter_mut().zip(&c.x).for_each(|(h, x)| *h += x);
            c.hpre.resize(rows * cfg.hidden, 0.0);
            self.backend.gemm(
                MatMut::new(&mut c.hpre, rows, cfg.hidden)?,
                Accum::Replace,
                MatRef::new(&x1, rows, d)?,
                Op::N,
                MatRef::new(&self.model.blocks[l].w1, cfg.hidden, d)?,
                Op::T,
                1.0,
            )?;
            c.act = c.hpre.iter().map(|&z| GELU.apply(z)).collect();
            c.m.resize(rows * d, 0.0);
            self.backend.gemm(
                MatMut::new(&mut c.m, rows, d)?,
                Accum::Replace,
                MatRef::new(&c.act, rows, cfg.hidden)?,
                Op::N,
                MatRef::new(&self.model.blocks[l].w2, d, cfg.hidden)?,
                Op::T,
                1.0,
            )?;
            let mut x2 = vec![0.0f32; rows * d];
            self.adapter_forward(&mut peft, l, 1, &c.m, &mut x2)?;
            x2.iter_mut().zip(&x1).for_each(|(h, x)| *h += x);
            c.x1 = x1;
            trace.layers[l] = c;
            x = x2;
        }
        trace.out = x;
        Ok(())
    }

    /// Accumulates the adapter's gradients (into each [`Param::grad`]) for
    /// one sequence, given `grad_out = dL/d(output) [seq, d]` of the real
    /// tokens and the [`Trace`] of the forward pass of the same sequence
    /// with the same adapter. No gradient is formed for any frozen tensor.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `grad_out` or the trace do not match, and
    /// `peft-core`'s errors.
    pub fn backward(&mut self, mut peft: Option<&mut Peft>, trace: &Trace, grad_out: &[f32]) -> Result<()> {
        let cfg = self.model.cfg;
        let (d, h, rows) = (cfg.d, cfg.hidden, trace.rows);
        let nv = peft.as_deref().map_or(0, Peft::n_virtual);
        let op = peft_core::error::Operand::GradOutput;
        if grad_out.len() != cfg.seq * d || rows != cfg.seq + nv || trace.layers.len() != cfg.layers {
            return Err(Error::ShapeMismatch { operand: op, expected: cfg.seq * d, found: grad_out.len() });
        }
        let mut g = vec![0.0f32; rows * d];
        g[nv * d..].copy_from_slice(grad_out);
        for l in (0..cfg.layers).rev() {
            let c = &trace.layers[l];
            // x2 = x1 + Ad_mlp(m)
            let mut gm = vec![0.0f32; rows * d];
            self.adapter_backward(&mut peft, l, 1, &c.m, &g, &mut gm)?;
            // m = gelu(hpre) W2^T, hpre = x1 W1^T
            let mut gact = vec![0.0f32; rows * h];
            let w2 = MatRef::new(&self.model.blocks[l].w2, d, h)?;
            let gmv = MatRef::new(&gm, rows, d)?;
            self.backend.gemm(MatMut::new(&mut gact, rows, h)?, Accum::Replace, gmv, Op::N, w2, Op::N, 1.0)?;
            gact.iter_mut().zip(&c.hpre).for_each(|(ga, &z)| *ga *= GELU.derivative(z));
            let mut gx1 = g;
            let w1 = MatRef::new(&self.model.blocks[l].w1, h, d)?;
            let gav = MatRef::new(&gact, rows, h)?;
            self.backend.gemm(MatMut::new(&mut gx1, rows, d)?, Accum::Add, gav, Op::N, w1, Op::N, 1.0)?;
            // x1 = x + Ad_attn(a), a = o Wo^T
            let mut ga = vec![0.0f32; rows * d];
            self.adapter_backward(&mut peft, l, 0, &c.a, &gx1, &mut ga)?;
            let mut go = vec![0.0f32; rows * d];
            self.project_backward(&mut peft, l, 3, &c.o, &ga, &mut go)?;
            // Attention.
            let mut gqkv = [vec![0.0f32; rows * d], vec![0.0f32; rows * d], vec![0.0f32; rows * d]];
            self.attention_backward(&mut peft, l, c, &go, &mut gqkv)?;
            // q, k, v = x W^T; the residual carries gx1 to x.
            let mut gx = gx1;
            for (p, gp) in gqkv.iter().enumerate() {
                self.project_backward(&mut peft, l, p, &c.x, gp, &mut gx)?;
            }
            g = gx;
        }
        if let Some(pf @ Peft { spec: Spec::Prompt { .. }, .. }) = peft {
            let n_virtual = pf.n_virtual();
            let p0 = pf.prompt()?;
            PromptTuning::new(&mut p0.value, n_virtual, d)?.backward(&g, 1, cfg.seq, &mut p0.grad, None)?;
        }
        Ok(())
    }

    fn attention_backward(
        &mut self,
        peft: &mut Option<&mut Peft>,
        l: usize,
        c: &LayerCache,
        go: &[f32],
        gqkv: &mut [Vec<f32>; 3],
    ) -> Result<()> {
        let (d, rows) = (self.model.cfg.d, c.x.len() / self.model.cfg.d);
        let layers = self.model.cfg.layers;
        let mut scratch = self.scratch(attn_bwd_len(rows, rows, cfg_prefix(peft)));
        let [q, k, v] = &c.qkv;
        let (q, k, v) = (MatRef::new(q, rows, d)?, MatRef::new(k, rows, d)?, MatRef::new(v, rows, d)?);
        let [gq, gk, gv] = gqkv;
        let go = MatRef::new(go, rows, d)?;
        let mask = Mask::causal();
        let res = match peft.as_deref_mut() {
            Some(pf @ Peft { spec: Spec::Prefix { .. }, .. }) => {
                let pc = PrefixConfig::new(cfg_prefix(&Some(&mut *pf)), layers, &self.shape)?;
                let p0 = pf.prompt()?;
                let grads = AttentionGrads {
                    q: MatMut::new(gq, rows, d)?,
                    k: MatMut::new(gk, rows, d)?,
                    v: MatMut::new(gv, rows, d)?,
                    prefix: Some(pc.layer_grads(&mut p0.grad, l)?),
                };
                let pt = PrefixTuning::new(pc, &mut p0.value)?;
                let prefix = pt.layer(l)?;
                attn_backward(&self.backend, &self.shape, q, k, v, Some(&prefix), &mask, go, grads, &mut scratch)
            }
            _ => {
                let grads = AttentionGrads {
                    q: MatMut::new(gq, rows, d)?,
                    k: MatMut::new(gk, rows, d)?,
                    v: MatMut::new(gv, rows, d)?,
                    prefix: None,
                };
                attn_backward(&self.backend, &self.shape, q, k, v, None, &mask, go, grads, &mut scratch)
            }
        };
        self.scratch = scratch;
        res
    }
}

impl TinyModel {
    /// A copy of the model with every adapted projection of `peft` merged
    /// into its weight, as PEFT's `merge_and_unload` (LoRA `W + s B A`,
    /// DoRA, (IA)^3, LoHa, LoKr, VeRA through their `peft-core` merges).
    /// Neither the model nor `peft` is written.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a method with nothing to merge
    /// (adapters, prompts, prefixes) or a missing tensor; `peft-core`'s
    /// merge errors.
    pub fn merged<B: Backend<f32, Error = Error>>(&self, peft: &Peft, backend: &B) -> Result<TinyModel> {
        if peft.spec.targets().is_empty() {
            return Err(NOT_MERGEABLE);
        }
        let d = self.cfg.d;
        let mut merged = self.clone();
        let mut peft = peft.clone();
        for (l, block) in merged.blocks.iter_mut().enumerate() {
            for &t in &peft.spec.targets().to_vec() {
                let site = peft.site(l, t, d).ok_or(NOT_MERGEABLE)?;
                let w = block.proj.get_mut(t).ok_or(LORA_TARGET)?;
                projection::merge(site, backend, w, d, d)?;
            }
        }
        Ok(merged)
    }
}

/// Prefix length of the adapter (0 unless prefix tuning).
fn cfg_prefix(peft: &Option<&mut Peft>) -> usize {
    match peft.as_deref() {
        Some(Peft { spec: Spec::Prefix { n_prefix }, .. }) => *n_prefix,
        _ => 0,
    }
}

/// Mean squared error `L = mean((y - t)^2)`, and, if `grad` is given,
/// `dL/dy = 2 (y - t) / n` scaled by `weight` (e.g. `1 / batch`) written
/// into it.
pub fn mse(y: &[f32], t: &[f32], weight: f64, mut grad: Option<&mut [f32]>) -> f64 {
    let n = y.len().max(1) as f64;
    let mut sum = 0.0f64;
    for (i, (&a, &b)) in y.iter().zip(t).enumerate() {
        let diff = f64::from(a) - f64::from(b);
        sum += diff * diff;
        if let Some(g) = grad.as_deref_mut().and_then(|g| g.get_mut(i)) {
            *g = (2.0 * diff / n * weight) as f32;
        }
    }
    sum / n
}

mod projection;
#[cfg(test)]
mod tests;

use projection::{Site, find, find_n};
