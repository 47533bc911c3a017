//! A Llama-architecture decoder: RMSNorm, RoPE, grouped-query attention
//! and a SwiGLU MLP, loaded from a Hugging Face `LlamaForCausalLM` folder
//! (`config.json` and `model.safetensors`, or a sharded checkpoint), with
//! a PEFT adapter hosted unmerged.
//!
//! ```text
//! h_0 = embed(ids)                            (prompt tuning: [P; embed(ids)])
//! a   = h + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))    n = rms(h) w_in
//! h'  = a + down_proj(silu(gate_proj(m)) * up_proj(m))                   m = rms(a) w_post
//! logits = lm_head(rms(h_L) w_norm)
//! rms(x) = x / sqrt(mean(x^2) + eps)
//! ```
//!
//! transformers' conventions throughout: RoPE rotates the pairs `(i, i +
//! head_dim / 2)` (`rotate_half`) by `pos / theta^(2i / head_dim)`; query
//! head `h` reads key/value head `h / (heads / kv_heads)` (`repeat_kv`);
//! the attention is causal with scale `1 / sqrt(head_dim)`
//! ([`peft_core::attention`]).
//!
//! The frozen matrices stay in the checkpoint's storage (f32, f16, bf16,
//! or this crate's int8, Q8_0 and Q4_0, see [`crate::hf::st`]) and are
//! multiplied in place through [`Backend::stored_apply`]; norms are read
//! as f32.
//!
//! **Adapters** ([`LlamaAdapter`]): on any of the seven projections of
//! every layer, LoRA (and rsLoRA, per-module ranks and alphas, `lora_bias`),
//! DoRA, (IA)^3, LoHa, LoKr and VeRA ([`Module`]);
//! prompt tuning (`P [n, hidden]` before the tokens: they take positions
//! `0..n`, and their rows are part of the logits, as in PEFT's output);
//! prefix tuning (per layer, keys and values `[n, kv_heads * head_dim]`
//! read from PEFT's `prompt_embeddings [n, layers * 2 * token_dim]`,
//! `token_dim = head_dim * kv_heads` for GQA models: they enter the
//! attention as the first cache entries, without RoPE, and the tokens
//! take positions `n..`); and bottleneck adapters ([`Bottleneck`], Houlsby
//! placement: after each layer's `o_proj` and after its `down_proj`,
//! `z + up(act(down(z)))` before the residual add), which PEFT does not
//! have.
//!
//! **Decoding**: [`KvCache`] keeps each layer's keys (after RoPE) and
//! values; [`Llama::forward`] appends to it, so a prompt and then one token
//! at a time give the same logits as one pass over the whole sequence.

mod backward;
mod config;
mod exp;
pub mod finetune;
pub mod gguf;
mod norms;
mod rows;
mod save;
mod sites;
mod tokens;
pub mod train;
mod weights;

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use peft_core::attention::{AttentionShape, Mask, Prefix};
use peft_core::lora::{LoraConfig, LoraEmbedding};
use peft_core::method::LinearAdapter;
use peft_core::storage::Owned;
use peft_core::storage::StoredLinear;
use peft_core::{Accum, Backend, MatMut, MatRef, Product};

pub(crate) use backward::row_cross_entropy;
pub use backward::{LlamaGrads, SiteGrads, lm_loss};
pub use config::{LlamaConfig, MAX_DIM, MAX_ELEMENTS, MAX_LAYERS};
pub use norms::{LAYER_NORMS, NormWeights};
pub use sites::Module;
pub use weights::{Matrix, Source};

use crate::hf::base::Base;
use crate::hf::{HfAdapter, HfError, HfTensor, LoraModule, PeftConfig, PromptConfig, TrainableTokensModule};
use tokens::Head;

/// A projection of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Projection {
    /// Every projection, in a layer's order (what [`PROJECTIONS`] names).
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Its module name under `model.layers.N.` (`"self_attn.q_proj"`).
    pub const fn name(self) -> &'static str {
        PROJECTIONS[self as usize]
    }

    /// Its place in [`Projection::ALL`] (and in per-layer arrays).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The projection whose module name is `name` (`"mlp.up_proj"`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether it belongs to attention (its bias follows
    /// `attention_bias`) rather than the MLP (`mlp_bias`).
    pub const fn is_attention(self) -> bool {
        self.index() < 4
    }
}

/// The projections' module names under `model.layers.N.`, in
/// [`Projection::ALL`]'s order.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A frozen linear layer: `y = x W^T (+ b)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// `W [out, in]`.
    pub weight: Matrix,
    /// `b [out]`, when the config has biases.
    pub bias: Option<Vec<f32>>,
}

/// One decoder layer.
#[derive(Clone, Debug, PartialEq)]
struct Layer {
    input_norm: Vec<f32>,
    /// q, k, v, o, gate, up, down ([`Projection::ALL`]'s order).
    proj: [Linear; 7],
    post_norm: Vec<f32>,
}

impl Layer {
    /// The frozen layer of projection `p`.
    fn linear(&self, p: Projection) -> &Linear {
        &self.proj[p.index()]
    }
}

/// A loaded Llama model (frozen).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama {
    /// Its configuration.
    pub config: LlamaConfig,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None`: tied to `embed`.
    lm_head: Option<Matrix>,
    /// RoPE's `1 / theta^(2i / head_dim)`, `i < head_dim / 2`, in f32 as
    /// transformers computes it.
    inv_freq: Vec<f32>,
}

/// Keys (after RoPE) and values of the positions seen so far, per layer,
/// and the buffers of a pass, kept between calls: decoding one token at a
/// time reuses them instead of allocating each step.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    buffers: Buffers,
}

/// The activations of one pass (see [`KvCache`]): each resized to the
/// pass's rows, its capacity kept.
#[derive(Clone, Debug, Default)]
struct Buffers {
    norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    attention: Vec<f32>,
    sites: sites::SiteScratch,
}

impl Buffers {
    /// Every activation sized for `n` rows of a model of configuration
    /// `c` (their old contents are overwritten by the pass).
    fn sized(mut self, n: usize, c: &LlamaConfig) -> Self {
        let (d, qw, kvw, f) = (c.hidden_size, c.q_width(), c.kv_width(), c.intermediate_size);
        for (buf, width) in [(&mut self.norm, d), (&mut self.q, qw), (&mut self.k, kvw), (&mut self.v, kvw)] {
            buf.resize(n * width, 0.0);
        }
        for (buf, width) in [(&mut self.attn, qw), (&mut self.out, d), (&mut self.gate, f), (&mut self.up, f)] {
            buf.resize(n * width, 0.0);
        }
        self
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held (prompt tuning's virtual tokens included; prefix
    /// tuning's entries are the adapter's, not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` positions and forgets the rest (a chat whose
    /// new text diverges from what the cache read). Nothing happens when
    /// `len >= self.len()`.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for kv in self.k.iter_mut().chain(self.v.iter_mut()) {
            let width = kv.len() / self.len.max(1);
            kv.truncate(len * width);
        }
        self.len = len;
    }

    /// Room for `rows` more positions in every layer of a model with
    /// config `c` (the layers are created on first use).
    ///
    /// # Errors
    /// [`HfError::Config`] (`ids`) when the cache for that many positions
    /// cannot be allocated; the cache keeps what it held.
    fn reserve(&mut self, c: &LlamaConfig, rows: usize) -> Result<(), HfError> {
        if self.k.len() != c.num_layers {
            self.k = vec![Vec::new(); c.num_layers];
            self.v = vec![Vec::new(); c.num_layers];
        }
        let more = rows.saturating_mul(c.kv_width());
        for kv in self.k.iter_mut().chain(self.v.iter_mut()) {
            kv.try_reserve(more).map_err(|e| HfError::Config {
                field: "ids".into(),
                reason: format!("the key/value cache for {rows} more positions cannot be allocated ({e})"),
            })?;
        }
        Ok(())
    }
}

/// One bottleneck adapter's tensors: `W_down [m, d]`, `b_down [m]`, `W_up
/// [d, m]`, `b_up [d]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BottleneckTensors {
    /// `W_down`.
    pub w_down: Vec<f32>,
    /// `b_down`.
    pub b_down: Vec<f32>,
    /// `W_up`.
    pub w_up: Vec<f32>,
    /// `b_up`.
    pub b_up: Vec<f32>,
}

/// Bottleneck adapters for every layer: `sites[l][0]` after attention
/// (`o_proj`'s output), `sites[l][1]` after the MLP (`down_proj`'s).
#[derive(Clone, Debug, PartialEq)]
pub struct Bottleneck {
    /// Width, activation, init.
    pub config: peft_core::adapter::AdapterConfig,
    /// Per layer, the two adapters.
    pub sites: Vec<[BottleneckTensors; 2]>,
}

impl Bottleneck {
    /// Fresh adapters for `model` (`peft-core`'s init: `W_up = b_up = 0`,
    /// so the model is unchanged).
    ///
    /// # Errors
    /// `peft-core`'s validation of `config` for the model's width.
    pub fn new(model: &Llama, config: peft_core::adapter::AdapterConfig, seed: u64) -> Result<Self, HfError> {
        let d = model.config.hidden_size;
        let m = config.bottleneck(d)?;
        let mut rng = peft_core::Rng::new(seed);
        let mut one = || -> Result<BottleneckTensors, HfError> {
            let mut t = BottleneckTensors {
                w_down: vec![0.0; m * d],
                b_down: vec![0.0; m],
                w_up: vec![0.0; d * m],
                b_up: vec![0.0; d],
            };
            let p = peft_core::adapter::AdapterParams {
                w_down: &mut t.w_down[..],
                b_down: &mut t.b_down[..],
                w_up: &mut t.w_up[..],
                b_up: &mut t.b_up[..],
            };
            peft_core::adapter::BottleneckAdapter::new(&config, d, p)?.init(&mut rng);
            Ok(t)
        };
        let sites = (0..model.config.num_layers).map(|_| Ok([one()?, one()?])).collect::<Result<_, HfError>>()?;
        Ok(Self { config, sites })
    }

    /// The adapter at `site` of layer `l` as `peft-core`'s layer.
    fn layer(
        &self,
        l: usize,
        site: usize,
        d: usize,
    ) -> Result<peft_core::adapter::BottleneckAdapter<f32, &[f32]>, HfError> {
        let t = self.sites.get(l).and_then(|s| s.get(site)).ok_or_else(|| HfError::Config {
            field: "bottleneck".into(),
            reason: format!("no adapter for layer {l}"),
        })?;
        let p = peft_core::adapter::AdapterParams {
            w_down: &t.w_down[..],
            b_down: &t.b_down[..],
            w_up: &t.w_up[..],
            b_up: &t.b_up[..],
        };
        Ok(peft_core::adapter::BottleneckAdapter::new(&self.config, d, p)?)
    }
}

/// A PEFT adapter placed on a [`Llama`] (borrowing the adapter's tensors).
#[derive(Clone, Debug)]
pub enum LlamaAdapter<'a> {
    /// Prompt tuning: `P [tokens, hidden]`.
    Prompt {
        /// The virtual tokens' embeddings, row-major.
        embeddings: &'a [f32],
        /// Virtual tokens.
        tokens: usize,
    },
    /// Prefix tuning: PEFT's `[tokens, layers * 2 * kv_width]` table.
    Prefix {
        /// The table, row-major.
        table: &'a [f32],
        /// Virtual tokens.
        tokens: usize,
    },
    /// A weight-adapting method: per layer, per projection
    /// ([`PROJECTIONS`]), the module if adapted; and LoRA on the
    /// embeddings (`model.embed_tokens`, PEFT's `lora_embedding_A/_B`) and
    /// on `lm_head`, which run in the forward (training them is refused).
    Modules {
        /// Per layer, per projection.
        layers: Vec<[Option<Module<'a>>; 7]>,
        /// LoRA on `model.embed_tokens`.
        embed: Option<&'a LoraModule>,
        /// LoRA on `lm_head`.
        head: Option<&'a LoraModule>,
        /// LoRA's `trainable_token_indices` on `model.embed_tokens` (and
        /// a tied `lm_head`), which run in the forward (training them
        /// beside LoRA is refused).
        tokens: Option<&'a TrainableTokensModule>,
    },
    /// Trainable tokens on `model.embed_tokens` (and a tied `lm_head`).
    Tokens(&'a TrainableTokensModule),
    /// Bottleneck adapters (one per layer and site).
    Bottleneck(&'a Bottleneck),
    /// LN tuning: the norms' weights it replaces.
    Norms(NormWeights<'a>),
}

impl<'a> LlamaAdapter<'a> {
    /// LoRA on the embeddings and on `lm_head`, when the adapter has them.
    fn whole_model_lora(&self) -> (Option<&'a LoraModule>, Option<&'a LoraModule>) {
        match self {
            Self::Modules { embed, head, .. } => (*embed, *head),
            _ => (None, None),
        }
    }

    /// Trainable tokens, alone or beside LoRA.
    fn token_rows(&self) -> Option<&'a TrainableTokensModule> {
        match self {
            Self::Tokens(m) => Some(m),
            Self::Modules { tokens, .. } => *tokens,
            _ => None,
        }
    }

    /// Places `adapter` on `model`, checking every shape against the
    /// model's config.
    ///
    /// # Errors
    /// [`HfError::Config`] for a prompt or prefix adapter whose
    /// `token_dim`, `num_layers` or table shape disagree with the model
    /// (naming the field); [`HfError::Base`] for a LoRA module the model
    /// does not have or of another shape; [`HfError::Conflict`] for a
    /// projection adapted twice; [`HfError::Unsupported`] for DoRA or
    /// `lora_bias` on `embed_tokens` or `lm_head`, and LoRA on another
    /// embedding.
    pub fn new(model: &Llama, adapter: &'a HfAdapter) -> Result<Self, HfError> {
        match &adapter.config {
            PeftConfig::Prompt(p) => Self::prompt_learning(&model.config, p, adapter),
            PeftConfig::LnTuning(_) => Ok(Self::Norms(NormWeights::place(model, adapter)?)),
            PeftConfig::TrainableTokens(_) => {
                tokens::place(model, adapter)?;
                adapter
                    .trainable_tokens
                    .first()
                    .map(Self::Tokens)
                    .ok_or_else(|| HfError::missing("trainable_tokens_delta"))
            }
            _ => Self::modules(model, adapter),
        }
    }

    /// Prompt or prefix tuning, its table checked against the model.
    fn prompt_learning(c: &LlamaConfig, p: &PromptConfig, adapter: &'a HfAdapter) -> Result<Self, HfError> {
        let t = adapter.prompt.as_ref().ok_or_else(|| HfError::missing("prompt_embeddings"))?;
        let n = p.num_virtual_tokens;
        let bad = |field: &str, reason: String| Err(HfError::Config { field: field.into(), reason });
        if p.prefix {
            let width = c.num_layers * 2 * c.kv_width();
            if p.token_dim != c.kv_width() {
                let why = format!(
                    "{}: the model's keys are head_dim * num_key_value_heads = {} wide",
                    p.token_dim,
                    c.kv_width()
                );
                return bad("token_dim", why);
            }
            if p.num_layers != c.num_layers {
                return bad("num_layers", format!("{}: the model has {}", p.num_layers, c.num_layers));
            }
            if t.shape != [n, width] {
                return bad("prompt_embeddings", format!("shape {:?}, the model needs [{n}, {width}]", t.shape));
            }
            return Ok(Self::Prefix { table: &t.data, tokens: n });
        }
        if p.token_dim != c.hidden_size {
            return bad("token_dim", format!("{}: the model's hidden_size is {}", p.token_dim, c.hidden_size));
        }
        if t.shape != [n, c.hidden_size] {
            return bad("prompt_embeddings", format!("shape {:?}, the model needs [{n}, {}]", t.shape, c.hidden_size));
        }
        Ok(Self::Prompt { embeddings: &t.data, tokens: n })
    }

    /// A weight-adapting method: each module placed on its projection,
    /// its shape checked against the model's weight.
    fn modules(model: &Llama, adapter: &'a HfAdapter) -> Result<Self, HfError> {
        let c = &model.config;
        let (mut embed, mut head) = (None, None);
        let mut layers = vec![[None; 7]; c.num_layers];
        let mut place = |name: &str, module: Module<'a>, (out, inn): (usize, usize)| {
            let (layer, proj) = locate(name, c.num_layers).ok_or_else(|| {
                HfError::Base(format!(
                    "{name}: not a projection of this model (model.layers.N.{{{}}})",
                    PROJECTIONS.join(",")
                ))
            })?;
            let w = &model.layers[layer].linear(proj).weight;
            if let Some(adapter) = module.misfit((out, inn), (w.rows, w.cols)) {
                return Err(HfError::Base(format!(
                    "{name}: the adapter is {adapter}, the model's weight [{}, {}]",
                    w.rows, w.cols
                )));
            }
            if layers[layer][proj.index()].replace(module).is_some() {
                return Err(HfError::conflict(name, "is adapted twice"));
            }
            Ok(())
        };
        match &adapter.config {
            PeftConfig::Lora(_) => {
                for m in &adapter.modules {
                    let (d, vocab) = (c.hidden_size, c.vocab_size);
                    let whole_model = match (m.name.as_str(), m.embedding) {
                        ("model.embed_tokens", true) => Some((&mut embed, (m.n_in, m.n_out) == (vocab, d))),
                        ("lm_head", false) => Some((&mut head, (m.n_in, m.n_out) == (d, vocab))),
                        _ => None,
                    };
                    if let Some((slot, fits)) = whole_model {
                        if m.magnitude.is_some() || m.lora_bias.is_some() {
                            let why = "DoRA or lora_bias on the embeddings or lm_head";
                            return Err(HfError::Unsupported(format!("{}: {why}", m.name)));
                        }
                        if !fits {
                            return Err(HfError::Base(format!("{}: the adapter's shape is not the model's", m.name)));
                        }
                        *slot = Some(m);
                        continue;
                    }
                    if m.embedding {
                        return Err(HfError::Unsupported(format!(
                            "{}: LoRA on embeddings other than embed_tokens",
                            m.name
                        )));
                    }
                    let module = match m.magnitude {
                        Some(_) => Module::Dora(m),
                        None => Module::Lora(m),
                    };
                    place(&m.name, module, (m.n_out, m.n_in))?;
                }
            }
            PeftConfig::Ia3(_) => {
                for m in &adapter.ia3 {
                    let [o, i] = m.shape();
                    // `ia3_l` is [out, 1] or, feedforward, [1, in]: the other
                    // side is the model's, checked there.
                    let w = locate(&m.name, c.num_layers).map(|(l, p)| &model.layers[l].linear(p).weight);
                    let dims = match w {
                        Some(w) if m.feedforward => (w.rows, i),
                        Some(w) => (o, w.cols),
                        None => (o, i),
                    };
                    place(&m.name, Module::Ia3(m), dims)?;
                }
            }
            PeftConfig::Loha(_)
            | PeftConfig::Lokr(_)
            | PeftConfig::AdaLora(_)
            | PeftConfig::Miss(_)
            | PeftConfig::Hra(_)
            | PeftConfig::Oft(_)
            | PeftConfig::Boft(_)
            | PeftConfig::FourierFt(_)
            | PeftConfig::RandLora(_)
            | PeftConfig::VbLora(_)
            | PeftConfig::Vera(_)
            | PeftConfig::Road(_)
            | PeftConfig::C3a(_)
            | PeftConfig::Shira(_) => {
                for (name, module, dims) in sites::placed(adapter) {
                    place(name, module, dims)?;
                }
            }
            PeftConfig::Prompt(_) | PeftConfig::LnTuning(_) | PeftConfig::TrainableTokens(_) => {}
        }
        tokens::place(model, adapter)?;
        Ok(Self::Modules { layers, embed, head, tokens: adapter.trainable_tokens.first() })
    }

    /// Bottleneck adapters on `model`.
    ///
    /// # Errors
    /// [`HfError::Config`] unless there is one pair per layer, each of the
    /// model's width.
    pub fn bottleneck(model: &Llama, b: &'a Bottleneck) -> Result<Self, HfError> {
        let d = model.config.hidden_size;
        if b.sites.len() != model.config.num_layers {
            return Err(HfError::Config {
                field: "bottleneck".into(),
                reason: format!("{} layers of adapters for {} layers", b.sites.len(), model.config.num_layers),
            });
        }
        for l in 0..b.sites.len() {
            for site in 0..2 {
                b.layer(l, site, d)?;
            }
        }
        Ok(Self::Bottleneck(b))
    }

    /// The module on layer `l`'s projection `p`, if any.
    fn module(&self, l: usize, p: Projection) -> Option<Module<'a>> {
        match self {
            Self::Modules { layers, .. } => layers.get(l).and_then(|m| m[p.index()]),
            _ => None,
        }
    }

    /// The weight of layer `l`'s norm `site` ([`LAYER_NORMS`]) where LN
    /// tuning replaces it.
    fn layer_norm(&self, l: usize, site: usize) -> Option<&'a [f32]> {
        match self {
            Self::Norms(w) => w.layers.get(l).and_then(|n| n.get(site).copied().flatten()),
            _ => None,
        }
    }

    /// `model.norm`'s weight where LN tuning replaces it.
    fn last_norm(&self) -> Option<&'a [f32]> {
        match self {
            Self::Norms(w) => w.last,
            _ => None,
        }
    }

    /// Prefix tuning's entries ahead of every layer's keys (0 otherwise).
    fn prefix_tokens(&self) -> usize {
        match self {
            Self::Prefix { tokens, .. } => *tokens,
            _ => 0,
        }
    }

    /// Prefix tuning's keys and values of layer `l` (columns `2 l kv_width`
    /// and `(2 l + 1) kv_width` of PEFT's table); `None` for the other
    /// methods.
    fn prefix_layer(&self, c: &LlamaConfig, l: usize) -> Result<Option<Prefix<'_, f32>>, HfError> {
        let Self::Prefix { table, tokens } = self else { return Ok(None) };
        let kvw = c.kv_width();
        let t = MatRef::new(table, *tokens, c.num_layers * 2 * kvw)?;
        let cols = |j: usize| t.cols_range(j * kvw, kvw).ok_or(HfError::Core(peft_core::Error::Overflow));
        Ok(Some(Prefix { keys: cols(2 * l)?, values: cols(2 * l + 1)? }))
    }

    /// Virtual tokens (0 for the weight-adapting methods).
    pub fn virtual_tokens(&self) -> usize {
        match self {
            Self::Prompt { tokens, .. } | Self::Prefix { tokens, .. } => *tokens,
            Self::Modules { .. } | Self::Bottleneck(_) | Self::Norms(_) | Self::Tokens(_) => 0,
        }
    }
}

/// `(layer, projection)` of a module name `model.layers.N.<projection>`.
fn locate(name: &str, layers: usize) -> Option<(usize, Projection)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (n, proj) = rest.split_once('.')?;
    let layer: usize = n.parse().ok().filter(|&l| l < layers)?;
    Some((layer, Projection::from_name(proj)?))
}

impl Llama {
    /// Loads a Hugging Face `LlamaForCausalLM` folder: `config.json` and
    /// `model.safetensors` (or `model.safetensors.index.json` and its
    /// shards).
    ///
    /// # Errors
    /// As [`Llama::load`].
    pub fn load_dir(dir: &Path) -> Result<Self, HfError> {
        Self::load(&dir.join("config.json"), dir)
    }

    /// Loads the config at `config` and the weights at `weights` (a
    /// `.safetensors` file or a checkpoint folder).
    ///
    /// # Errors
    /// I/O errors; [`LlamaConfig::parse`]'s; [`HfError::Base`] for a
    /// missing tensor or one of another shape (named); unsupported element
    /// types. Every error names its file.
    pub fn load(config: &Path, weights: &Path) -> Result<Self, HfError> {
        let text = crate::files::read_bounded(config, crate::hf::MAX_CONFIG_BYTES)?;
        let text = String::from_utf8(text).map_err(|_| HfError::Json("config.json is not UTF-8".into()));
        let config_parsed = text.and_then(|t| LlamaConfig::parse(&t)).map_err(|e| e.in_file(config))?;
        let base = Base::open(weights)?;
        Self::from_base(config_parsed, &base).map_err(|e| e.in_file(weights))
    }

    /// Builds the model from an open checkpoint: a Hugging Face [`Base`]
    /// or a GGUF file ([`gguf::GgufWeights`]), its tensors asked for by their
    /// Hugging Face names.
    ///
    /// # Errors
    /// As [`Llama::load`].
    pub fn from_base(config: LlamaConfig, base: &impl Source) -> Result<Self, HfError> {
        let c = &config;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let embed = base.matrix("model.embed_tokens.weight", c.vocab_size, d)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let shapes =
                [(c.q_width(), d), (c.kv_width(), d), (c.kv_width(), d), (d, c.q_width()), (f, d), (f, d), (d, f)];
            let mut proj = Vec::with_capacity(7);
            for (pr, (rows, cols)) in Projection::ALL.into_iter().zip(shapes) {
                let name = pr.name();
                let weight = base.matrix(&p(&format!("{name}.weight")), rows, cols)?;
                let has_bias = if pr.is_attention() { c.attention_bias } else { c.mlp_bias };
                let bias = if has_bias { Some(base.vector(&p(&format!("{name}.bias")), rows)?) } else { None };
                proj.push(Linear { weight, bias });
            }
            let proj: [Linear; 7] = proj.try_into().map_err(|_| HfError::Base("projections".into()))?;
            layers.push(Layer {
                input_norm: base.vector(&p("input_layernorm.weight"), d)?,
                proj,
                post_norm: base.vector(&p("post_attention_layernorm.weight"), d)?,
            });
        }
        let norm = base.vector("model.norm.weight", d)?;
        let lm_head = if c.tie_word_embeddings && !base.contains("lm_head.weight") {
            None
        } else {
            Some(base.matrix("lm_head.weight", c.vocab_size, d)?)
        };
        let inv_freq = Self::inv_freq(c);
        Ok(Self { config, embed, layers, norm, lm_head, inv_freq })
    }

    /// Frozen parameters: every matrix's values, norms and biases.
    pub fn num_params(&self) -> usize {
        let m = |w: &Matrix| w.rows * w.cols;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.input_norm.len()
                    + l.post_norm.len()
                    + l.proj.iter().map(|p| m(&p.weight) + p.bias.as_ref().map_or(0, Vec::len)).sum::<usize>()
            })
            .sum();
        m(&self.embed) + layers + self.norm.len() + self.lm_head.as_ref().map_or(0, m)
    }

    /// The frozen matrices one decode step reads whole: every layer's
    /// seven projections, then the output layer (the embedding when tied).
    /// Their bytes are what a token must stream from memory at least once.
    pub fn decode_matrices(&self) -> Vec<&Matrix> {
        let proj = self.layers.iter().flat_map(|l| l.proj.iter().map(|p| &p.weight));
        proj.chain(core::iter::once(self.lm_head.as_ref().unwrap_or(&self.embed))).collect()
    }

    /// RoPE's `1 / theta^(2i / head_dim)`, `i < head_dim / 2`, in f32 as
    /// transformers computes it.
    fn inv_freq(c: &LlamaConfig) -> Vec<f32> {
        (0..c.head_dim / 2)
            .map(|i| {
                let e = (2 * i) as f32 / c.head_dim as f32;
                1.0 / (c.rope_theta.powf(f64::from(e)) as f32)
            })
            .collect()
    }

    /// RoPE's `(cos, sin)` of position `pos` for each pair `i < head_dim /
    /// 2`: the angle `pos * inv_freq_i` in f32 (as transformers forms it),
    /// its cosine and sine rounded once.
    pub fn rope(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|f| {
                let angle = f64::from(pos as f32 * f);
                (angle.cos() as f32, angle.sin() as f32)
            })
            .unzip()
    }

    /// Runs `ids` after what `cache` holds and returns their logits, row
    /// by row `[rows, vocab]`: with prompt tuning and an empty cache the
    /// virtual tokens come first and have rows too (`rows = tokens +
    /// ids.len()`), otherwise `rows = ids.len()`. The cache takes the new
    /// keys and values.
    ///
    /// The ids run in chunks of [`PREFILL_CHUNK`] through the cache, so the
    /// activations held at once are bounded by a chunk and only the cache
    /// and the logits grow with the prompt (with attention's blocks of
    /// queries, memory is linear in its length). A chunk's rows attend to
    /// every key before them, so chunking changes no formula; the sums are
    /// grouped differently, a rounding-level difference for prompts longer
    /// than one chunk.
    ///
    /// # Errors
    /// [`HfError::Config`] (`ids`) for an id outside the vocabulary, before
    /// anything runs; the backend's errors. Nothing to run (no ids, no
    /// virtual rows) gives no logits.
    pub fn forward<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        ids: &[u32],
        adapter: Option<&LlamaAdapter<'_>>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, HfError> {
        self.prefill(backend, ids, adapter, cache, Rows::All)
    }

    /// [`Llama::forward`], returning the last row's logits only, `[vocab]`
    /// (empty when there is nothing to run): what decoding needs, without
    /// `lm_head` over every row of the prompt or `[rows, vocab]` held.
    ///
    /// # Errors
    /// As [`Llama::forward`].
    pub fn forward_last<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        ids: &[u32],
        adapter: Option<&LlamaAdapter<'_>>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, HfError> {
        self.prefill(backend, ids, adapter, cache, Rows::Last)
    }

    /// `ids` in chunks of [`PREFILL_CHUNK`] through the cache, keeping the
    /// logits `want` asks for.
    fn prefill<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        ids: &[u32],
        adapter: Option<&LlamaAdapter<'_>>,
        cache: &mut KvCache,
        want: Rows,
    ) -> Result<Vec<f32>, HfError> {
        // Every id is checked before the first chunk runs, so a bad id changes no cache.
        self.check_ids(ids)?;
        // The cache grows once, to its final size, not by doubling as chunks arrive.
        let virtual_rows = match adapter {
            Some(a @ LlamaAdapter::Prompt { .. }) if cache.is_empty() => a.virtual_tokens(),
            _ => 0,
        };
        cache.reserve(&self.config, ids.len().saturating_add(virtual_rows))?;
        if ids.len() <= PREFILL_CHUNK {
            return self.run(backend, ids, &[ids.len()], adapter, std::slice::from_mut(cache), None, want);
        }
        let mut logits = Vec::new();
        let mut chunks = ids.chunks(PREFILL_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let rows = match want {
                Rows::Last if !last => Rows::None,
                w => w,
            };
            logits.extend(self.run(
                backend,
                chunk,
                &[chunk.len()],
                adapter,
                std::slice::from_mut(cache),
                None,
                rows,
            )?);
        }
        Ok(logits)
    }

    /// [`Llama::forward`] of a whole sequence (no cache) that keeps what
    /// [`Llama::backward`] needs in `trace`.
    ///
    /// # Errors
    /// As [`Llama::forward`].
    pub fn forward_traced<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        ids: &[u32],
        adapter: Option<&LlamaAdapter<'_>>,
        trace: &mut Trace,
    ) -> Result<Vec<f32>, HfError> {
        self.run(backend, ids, &[ids.len()], adapter, &mut [KvCache::new()], Some(trace), Rows::All)
    }

    /// [`Llama::forward_traced`] of several sequences in one pass: their
    /// rows stacked, every product over all of them (the frozen weights
    /// read once per batch, not once per sequence), each sequence its own
    /// positions and causal attention. The logits are `[sum len, vocab]`,
    /// each sequence's rows where [`Llama::forward_traced`] of it alone
    /// would put them (to rounding: the products' sums run over more
    /// rows). [`Llama::backward`] takes the trace as it takes a single
    /// sequence's.
    ///
    /// # Errors
    /// As [`Llama::forward`]; [`HfError::Config`] (`segments`) with prompt
    /// tuning, whose virtual rows belong to one sequence (run those one at
    /// a time).
    pub fn forward_traced_batch<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        seqs: &[&[u32]],
        adapter: Option<&LlamaAdapter<'_>>,
        trace: &mut Trace,
    ) -> Result<Vec<f32>, HfError> {
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let mut caches = vec![KvCache::new(); seqs.len()];
        self.run(backend, &ids, &lens, adapter, &mut caches, Some(trace), Rows::All)
    }

    /// Several sequences, each after its own cache, in one pass (every
    /// product over all their rows, each sequence its own positions and
    /// attention): the last row's logits of each, `[seqs, vocab]`. What
    /// decoding several prompts at once runs at each step. Each sequence's
    /// logits are those [`Llama::forward_last`] gives it alone, to
    /// rounding.
    ///
    /// # Errors
    /// As [`Llama::forward`]; [`HfError::Config`] (`segments`) for an
    /// empty sequence, not one cache per sequence, or prompt tuning with
    /// more than one sequence.
    pub fn forward_batch_last<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        seqs: &[&[u32]],
        adapter: Option<&LlamaAdapter<'_>>,
        caches: &mut [KvCache],
    ) -> Result<Vec<f32>, HfError> {
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        self.run(backend, &ids, &lens, adapter, caches, None, Rows::Last)
    }

    /// Whether `other` holds the same weights bit for bit (a NaN weight
    /// equals itself here, where `==` would call the models different).
    pub fn bit_identical(&self, other: &Self) -> bool {
        let bits =
            |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        let matrix = |a: &Matrix, b: &Matrix| (a.rows, a.cols) == (b.rows, b.cols) && a.data.same_bits(&b.data);
        let linear = |a: &Linear, b: &Linear| {
            matrix(&a.weight, &b.weight)
                && match (&a.bias, &b.bias) {
                    (Some(x), Some(y)) => bits(x, y),
                    (None, None) => true,
                    _ => false,
                }
        };
        let heads = match (&self.lm_head, &other.lm_head) {
            (Some(a), Some(b)) => matrix(a, b),
            (None, None) => true,
            _ => false,
        };
        self.config == other.config
            && matrix(&self.embed, &other.embed)
            && heads
            && bits(&self.norm, &other.norm)
            && self.layers.len() == other.layers.len()
            && self.layers.iter().zip(&other.layers).all(|(a, b)| {
                bits(&a.input_norm, &b.input_norm)
                    && bits(&a.post_norm, &b.post_norm)
                    && a.proj.iter().zip(&b.proj).all(|(x, y)| linear(x, y))
            })
    }

    /// Puts every tensor `adapter` replaces whole (PEFT's `modules_to_save`
    /// copies, and the biases `bias = "all" | "lora_only"` trained) in
    /// place of the checkpoint's: what PEFT runs. A tied model keeps its
    /// head on the original embeddings when only `embed_tokens` is
    /// replaced (PEFT's copy is a new module; the head still points at the
    /// original weights).
    ///
    /// # Errors
    /// [`HfError::Base`] naming a tensor the model does not have or of
    /// another shape, before anything is changed.
    pub fn apply_replacements(&mut self, adapter: &HfAdapter) -> Result<(), HfError> {
        let mut check = self.clone_shapes();
        for t in &adapter.replacements {
            check.replace(t)?;
        }
        for t in &adapter.replacements {
            self.replace(t)?;
        }
        Ok(())
    }

    /// The model with its matrices emptied (shapes and names kept): what
    /// [`apply_replacements`](Self::apply_replacements) checks against
    /// without copying the weights.
    fn clone_shapes(&self) -> Self {
        let empty =
            |m: &Matrix| Matrix { name: m.name.clone(), rows: m.rows, cols: m.cols, data: Owned::F32(Vec::new()) };
        let layers = self
            .layers
            .iter()
            .map(|l| Layer {
                input_norm: l.input_norm.clone(),
                proj: core::array::from_fn(|i| Linear {
                    weight: empty(&l.proj[i].weight),
                    bias: l.proj[i].bias.clone(),
                }),
                post_norm: l.post_norm.clone(),
            })
            .collect();
        Self {
            config: self.config.clone(),
            embed: empty(&self.embed),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.as_ref().map(empty),
            inv_freq: self.inv_freq.clone(),
        }
    }

    /// Replaces the tensor `t.name` (`model.embed_tokens.weight`,
    /// `lm_head.weight`, `model.norm.weight`, a layer's norm, projection
    /// weight or bias) by `t`'s values, stored as f32.
    fn replace(&mut self, t: &HfTensor) -> Result<(), HfError> {
        let bad = |why: &str| HfError::Base(format!("{}: {why}", t.name));
        let c = &self.config;
        let matrix = |rows: usize, cols: usize| -> Result<Matrix, HfError> {
            if t.shape != [rows, cols] {
                return Err(bad(&format!("shape {:?}, the model's is [{rows}, {cols}]", t.shape)));
            }
            Ok(Matrix { name: t.name.clone(), rows, cols, data: Owned::F32(t.data.clone()) })
        };
        let vector = |dst: &mut Vec<f32>| {
            if t.shape != [dst.len()] {
                return Err(bad(&format!("shape {:?}, the model's is [{}]", t.shape, dst.len())));
            }
            dst.copy_from_slice(&t.data);
            Ok(())
        };
        match t.name.as_str() {
            "model.embed_tokens.weight" => {
                let new = matrix(c.vocab_size, c.hidden_size)?;
                let old = std::mem::replace(&mut self.embed, new);
                self.lm_head.get_or_insert(old);
            }
            // A replaced head is the model's own, even where it was tied.
            "lm_head.weight" => self.lm_head = Some(matrix(c.vocab_size, c.hidden_size)?),
            "model.norm.weight" => vector(&mut self.norm)?,
            name => {
                let (layer, rest) = name
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split_once('.'))
                    .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
                    .filter(|(l, _)| *l < c.num_layers)
                    .ok_or_else(|| bad("not a tensor of this model"))?;
                let layer = &mut self.layers[layer];
                match rest {
                    "input_layernorm.weight" => vector(&mut layer.input_norm)?,
                    "post_attention_layernorm.weight" => vector(&mut layer.post_norm)?,
                    _ => {
                        let (proj, param) = rest.rsplit_once('.').ok_or_else(|| bad("not a tensor of this model"))?;
                        let p = Projection::from_name(proj).ok_or_else(|| bad("not a tensor of this model"))?;
                        let lin = &mut layer.proj[p.index()];
                        match (param, &mut lin.bias) {
                            ("weight", _) => lin.weight = matrix(lin.weight.rows, lin.weight.cols)?,
                            ("bias", Some(b)) => vector(b)?,
                            ("bias", None) => return Err(bad("the model's projection has no bias")),
                            _ => return Err(bad("not a tensor of this model")),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The rows entering the first layer: the prompt's virtual tokens
    /// (when given), then the embeddings of `ids`, `[n, hidden]`.
    ///
    /// # Errors
    /// [`HfError::Config`] (`ids`) for an id outside the vocabulary.
    fn embed_rows(&self, ids: &[u32], prompt: Option<(&[f32], usize)>) -> Result<Vec<f32>, HfError> {
        self.check_ids(ids)?;
        let d = self.config.hidden_size;
        let n = ids.len() + prompt.map_or(0, |(_, t)| t);
        let mut h = vec![0.0f32; n * d];
        let mut at = 0;
        if let Some((p, t)) = prompt {
            h[..t * d].copy_from_slice(p);
            at = t * d;
        }
        let embed = self.embed.view()?;
        for (&id, row) in ids.iter().zip(h[at..].chunks_exact_mut(d)) {
            embed.row(id as usize).ok_or(HfError::Core(peft_core::Error::Overflow))?.dequantize(row);
        }
        Ok(h)
    }

    /// `Ok` when every id is inside the vocabulary.
    ///
    /// # Errors
    /// [`HfError::Config`] (`ids`) naming the first id outside it.
    fn check_ids(&self, ids: &[u32]) -> Result<(), HfError> {
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(HfError::Config {
                field: "ids".into(),
                reason: format!("token {id} is outside the vocabulary (vocab_size {vocab})"),
            }),
            None => Ok(()),
        }
    }

    /// One pass of `ids` (and the virtual tokens, on an empty cache) through
    /// every layer, the cache taking their keys and values; the logits of
    /// the rows `want` names.
    #[allow(clippy::too_many_arguments)]
    fn run<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        ids: &[u32],
        lens: &[usize],
        adapter: Option<&LlamaAdapter<'_>>,
        caches: &mut [KvCache],
        mut trace: Option<&mut Trace>,
        want: Rows,
    ) -> Result<Vec<f32>, HfError> {
        let (c, d) = (&self.config, self.config.hidden_size);
        let [cache0, ..] = caches else { return Ok(Vec::new()) };
        // The rows entering the first layer.
        let prompt = match adapter {
            Some(LlamaAdapter::Prompt { embeddings, tokens }) if cache0.is_empty() => Some((*embeddings, *tokens)),
            _ => None,
        };
        let mut h = self.embed_rows(ids, prompt)?;
        let n = h.len() / d;
        if n == 0 {
            return Ok(Vec::new());
        }
        let head = self.adapt_embeddings(backend, adapter, ids, &mut h)?;
        // Several sequences in one pass: each its own cache, positions (after
        // its cache and a prefix's entries) and attention, every product over all their rows.
        let segments = batch_segments(lens, caches.len(), prompt.is_some(), n)?;
        let prefix_pos = adapter.map_or(0, LlamaAdapter::prefix_tokens);
        let firsts = caches.iter().map(|c| prefix_pos + c.len);
        let rope: Vec<(Vec<f32>, Vec<f32>)> = positions(&segments, firsts).into_iter().map(|p| self.rope(p)).collect();
        caches.iter_mut().zip(&segments).try_for_each(|(cache, &(a, b))| cache.reserve(c, b - a))?;
        let shape = AttentionShape::new(c.num_heads, c.num_kv_heads, c.head_dim).map_err(HfError::Core)?;
        let (qw, f) = (c.q_width(), c.intermediate_size);
        let buffers = caches.first_mut().map(|c| std::mem::take(&mut c.buffers)).unwrap_or_default();
        let Buffers { mut norm, mut q, mut k, mut v, mut attn, mut out, mut gate, mut up, mut attention, mut sites } =
            buffers.sized(n, c);
        let (scratch, ws) = (&mut attention, &mut sites);
        if let Some(t) = trace.as_deref_mut() {
            (t.rows, t.virtual_rows, t.segments) = (n, prompt.map_or(0, |(_, t)| t), segments.clone());
            t.ids = ids.to_vec();
            t.layers.clear();
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let h_in = trace.is_some().then(|| h.clone());
            let module = |p: Projection| adapter.and_then(|a| a.module(l, p));
            use Projection::{Down, Gate, K, O, Q, Up, V};
            let tuned = |site: usize| adapter.and_then(|a| a.layer_norm(l, site));
            rms_norm_rows(backend, &h, tuned(0).unwrap_or(&layer.input_norm), c.rms_norm_eps, &mut norm);
            let x = MatRef::new(&norm, n, d)?;
            sites::forward(backend, layer.linear(Q), module(Q), x, &mut q, ws)?;
            sites::forward(backend, layer.linear(K), module(K), x, &mut k, ws)?;
            sites::forward(backend, layer.linear(V), module(V), x, &mut v, ws)?;
            rotate_rows(backend, [&mut q, &mut k], c, &rope, 1.0);
            let prefix = adapter.map(|a| a.prefix_layer(c, l)).transpose()?.flatten();
            attend_layer(backend, &shape, &segments, (caches, l), (&q, &k, &v), prefix.as_ref(), &mut attn, scratch)?;
            sites::forward(backend, layer.linear(O), module(O), MatRef::new(&attn, n, qw)?, &mut out, ws)?;
            let attn_pre = bottleneck(backend, adapter, l, 0, &mut out, &mut ws.scratch)?;
            h.iter_mut().zip(&out).for_each(|(h, o)| *h += o);
            rms_norm_rows(backend, &h, tuned(1).unwrap_or(&layer.post_norm), c.rms_norm_eps, &mut norm);
            let x = MatRef::new(&norm, n, d)?;
            sites::forward(backend, layer.linear(Gate), module(Gate), x, &mut gate, ws)?;
            sites::forward(backend, layer.linear(Up), module(Up), x, &mut up, ws)?;
            let pre_gate = trace.is_some().then(|| gate.clone());
            silu_mul_rows(backend, &mut gate, &up, f);
            sites::forward(backend, layer.linear(Down), module(Down), MatRef::new(&gate, n, f)?, &mut out, ws)?;
            let mlp_pre = bottleneck(backend, adapter, l, 1, &mut out, &mut ws.scratch)?;
            if let Some(t) = trace.as_deref_mut() {
                t.layers.push(LayerTrace {
                    h_in: h_in.unwrap_or_default(),
                    a: h.clone(),
                    x2: norm.clone(),
                    q: q.clone(),
                    k: k.clone(),
                    v: v.clone(),
                    attn: attn.clone(),
                    gate: pre_gate.unwrap_or_default(),
                    up: up.clone(),
                    act: gate.clone(),
                    attn_pre,
                    mlp_pre,
                });
            }
            h.iter_mut().zip(&out).for_each(|(h, o)| *h += o);
        }
        caches.iter_mut().zip(&segments).for_each(|(cache, &(a, b))| cache.len += b - a);
        rms_norm_rows(
            backend,
            &h,
            adapter.and_then(LlamaAdapter::last_norm).unwrap_or(&self.norm),
            c.rms_norm_eps,
            &mut norm,
        );
        if let Some(t) = trace {
            (t.h_final, t.normed) = (h, norm.clone());
        }
        let logits = self.logits(backend, &want.of(&norm, d, &segments), head)?;
        if let Some(first) = caches.first_mut() {
            first.buffers = Buffers { norm, q, k, v, attn, out, gate, up, attention, sites };
        }
        Ok(logits)
    }

    /// `lm_head` (or the tied embeddings) over the final normed rows:
    /// `[n, vocab]`.
    fn logits<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        normed: &[f32],
        with: Head<'_>,
    ) -> Result<Vec<f32>, HfError> {
        let (d, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let n = normed.len() / d.max(1);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).view()?;
        let mut logits = vec![0.0f32; n * vocab];
        let (x, y) = (MatRef::new(normed, n, d)?, MatMut::new(&mut logits, n, vocab)?);
        match with.lora {
            None => backend
                .stored_apply(&head, Product { src: x, dst: y, accum: Accum::Replace })
                .map_err(HfError::backend)?,
            Some(m) => {
                // LoRA on lm_head: peft-core's forward over the stored head.
                let layer = m.lora()?;
                let mut sc = vec![0.0f32; layer.forward_scratch_len(n)];
                layer.forward(backend, &StoredLinear::new(head), x, y, &mut sc).map_err(HfError::backend)?;
            }
        }
        if let Some(m) = with.tokens {
            // Trainable tokens on a tied head: their columns from the trained rows.
            let (x, y) = (MatRef::new(normed, n, d)?, MatMut::new(&mut logits, n, vocab)?);
            m.layer(vocab)?.head_forward(x, y)?;
        }
        Ok(logits)
    }

    /// Greedy decoding: runs `ids`, then appends the argmax token
    /// `max_new` times, each step one token through the [`KvCache`].
    /// Returns the new tokens.
    ///
    /// # Errors
    /// As [`Llama::forward`]; [`HfError::NonFinite`] (`logits`) when the
    /// row to decode from holds a NaN or an infinity (a corrupt weight or an
    /// overflow): there is no argmax to take.
    pub fn generate<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        ids: &[u32],
        adapter: Option<&LlamaAdapter<'_>>,
        max_new: usize,
    ) -> Result<Vec<u32>, HfError> {
        let mut cache = KvCache::new();
        // Grown as tokens come: `max_new` is a bound, not a size to reserve
        // (2^40 would ask for terabytes up front).
        let mut out = Vec::with_capacity(max_new.min(1 << 12));
        let mut row = self.forward_last(backend, ids, adapter, &mut cache)?;
        for _ in 0..max_new {
            check_finite_logits(&row, cache.len().saturating_sub(1))?;
            let Some(next) = argmax(&row) else { break };
            out.push(next as u32);
            row = self.forward_last(backend, &[next as u32], adapter, &mut cache)?;
        }
        Ok(out)
    }
}

/// `Ok` when every logit of `row` (position `pos`) is finite.
///
/// # Errors
/// [`HfError::NonFinite`] naming `logits`, the position's first bad
/// element (`pos * vocab + token`) and its value.
pub fn check_finite_logits(row: &[f32], pos: usize) -> Result<(), HfError> {
    match row.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(t) => Err(HfError::NonFinite {
            tensor: format!("logits (position {pos}, token {t})"),
            index: pos * row.len() + t,
            value: row[t],
            cause: "the model's output is not finite (a NaN or infinite weight, or an overflow)",
        }),
    }
}

/// Prompt rows per pass of [`Llama::forward`]: a longer prompt runs in
/// chunks of this many through the key/value cache, which bounds the
/// activations held at once (about `PREFILL_CHUNK * (4 hidden + 3
/// intermediate)` floats, plus one chunk's logits) while keeping each
/// product large enough to run at full speed.
pub const PREFILL_CHUNK: usize = 512;

/// Which rows' logits a pass computes.
#[derive(Clone, Copy, Debug)]
enum Rows {
    /// Every row's.
    All,
    /// The last row of each sequence.
    Last,
    /// None (a chunk before the last, when only the last row is wanted).
    None,
}

impl Rows {
    /// These rows of `m`, `[n, width]`, whose sequences are `segments`.
    fn of<'m>(self, m: &'m [f32], width: usize, segments: &[(usize, usize)]) -> std::borrow::Cow<'m, [f32]> {
        match self {
            Self::All => m.into(),
            Self::Last if segments.len() <= 1 => m.get(m.len().saturating_sub(width)..).unwrap_or_default().into(),
            Self::Last => segments
                .iter()
                .filter_map(|&(_, b)| m.get((b - 1) * width..b * width))
                .flatten()
                .copied()
                .collect::<Vec<f32>>()
                .into(),
            Self::None => (&[][..]).into(),
        }
    }
}

/// `h[t] += s (B A)^T[ids[t]]`: `peft-core`'s embedding LoRA over the rows
/// the model looked up (no virtual rows: prompt tuning is another adapter).
fn embedding_lora<B: Backend<f32> + ?Sized>(
    backend: &B,
    m: &LoraModule,
    ids: &[u32],
    h: &mut [f32],
) -> Result<(), HfError> {
    let layer =
        LoraEmbedding::new(&LoraConfig::new(m.r, m.alpha), m.n_in, m.n_out, &m.a[..], &m.b[..])?.with_scale(m.scale)?;
    let idx: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    let mut sc = vec![0.0f32; layer.scratch_len(idx.len())];
    let rows = MatMut::new(h, idx.len(), m.n_out)?;
    layer.add_low_rank(backend, &idx, rows, &mut sc).map_err(HfError::backend)
}

/// A layer's attention of fewer multiply-adds than this (`2 n (p + tk)
/// heads head_dim` over its sequences) runs on the calling thread:
/// splitting a decode step's (0.15 M at SmolLM2's shapes after a
/// 128-token prompt) cost more than it saved.
pub(super) const ATTEND_PAR_MIN_MACS: usize = 1 << 20;

/// One sequence's share of a layer's attention: its queries `[n,
/// q_width]`, its cache's keys and values `[tk, kv_width]` (its new rows
/// last), and the first row of its output.
struct Sequence<'a> {
    q: MatRef<'a, f32>,
    k: MatRef<'a, f32>,
    v: MatRef<'a, f32>,
    row0: usize,
}

/// Causal attention of each sequence's queries over its keys and values
/// and a prefix, into its rows of `attn [rows, q_width]`.
///
/// Sequence by sequence and head by head, each pair a part of
/// [`Backend::for_each_part`] (so a backend with threads runs several at
/// once): [`peft_core::attention`]'s forward over the head's columns of
/// `q` and its key/value group's columns, into the part's own `[n,
/// head_dim]` block of `scratch`, then copied into the head's columns of
/// `attn`. Each part allocates its own scores (one block of queries,
/// [`peft_core::attention::forward_scratch_len`]), so their memory grows
/// with the threads, not with the heads. A head's arithmetic is what the
/// whole call does (same blocks, same products, same order), at any
/// thread count.
fn attend<B: Backend<f32> + ?Sized>(
    backend: &B,
    shape: &AttentionShape,
    seqs: &[Sequence<'_>],
    prefix: Option<&Prefix<'_, f32>>,
    attn: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let (qw, dh, heads) = (shape.q_width(), shape.head_dim(), shape.heads());
    let group = heads / shape.kv_heads().max(1);
    let p = prefix.map_or(0, |p| p.keys.rows());
    let one = AttentionShape::new(1, 1, dh).map_err(HfError::Core)?;
    // Each part's block of `scratch` is its output.
    let len = |s: &Sequence<'_>| s.q.rows() * dh;
    scratch.resize(seqs.iter().map(|s| heads * len(s)).sum(), 0.0);
    let mut cells = Vec::with_capacity(seqs.len() * heads);
    let mut rest = scratch.as_mut_slice();
    for s in seqs {
        for _ in 0..heads {
            let (mine, tail) = core::mem::take(&mut rest).split_at_mut(len(s));
            cells.push(Mutex::new((mine, Ok(()))));
            rest = tail;
        }
    }
    let mask = Mask { causal: true, key_padding: None, additive: None };
    let part = |i: usize, be: &B| {
        let (Some(cell), Some(s)) = (cells.get(i), seqs.get(i / heads.max(1))) else { return };
        let mut cell = cell.lock().unwrap_or_else(PoisonError::into_inner);
        let (buf, result): &mut (&mut [f32], Result<(), HfError>) = &mut cell;
        let (h, n) = (i % heads, s.q.rows());
        let g = h / group.max(1) * dh;
        let mut sc = vec![0.0f32; peft_core::attention::forward_scratch_len(n, s.k.rows(), p)];
        *result = (|| {
            let pre = match prefix {
                Some(pr) => Some(Prefix { keys: head_cols(&pr.keys, g, dh)?, values: head_cols(&pr.values, g, dh)? }),
                None => None,
            };
            let (q, k, v) = (head_cols(&s.q, h * dh, dh)?, head_cols(&s.k, g, dh)?, head_cols(&s.v, g, dh)?);
            let out = MatMut::new(buf, n, dh)?;
            peft_core::attention::forward(be, &one, q, k, v, pre.as_ref(), &mask, out, &mut sc)
                .map_err(HfError::backend)
        })();
    };
    // A decode step's attention (one query per sequence) is a few
    // microseconds of work: on the calling thread (its products are far
    // below the backend's own split, so the arithmetic is the same).
    let macs = seqs.iter().map(|s| s.q.rows() * (s.k.rows() + p)).sum::<usize>().saturating_mul(2 * heads * dh);
    if macs < ATTEND_PAR_MIN_MACS {
        (0..cells.len()).for_each(|i| part(i, backend));
    } else {
        backend.for_each_part(cells.len(), &part);
    }
    for (i, cell) in cells.into_iter().enumerate() {
        let (buf, result) = cell.into_inner().unwrap_or_else(PoisonError::into_inner);
        result?;
        let (Some(s), h) = (seqs.get(i / heads.max(1)), i % heads) else { continue };
        let rows = attn.get_mut(s.row0 * qw..(s.row0 + s.q.rows()) * qw).ok_or(peft_core::Error::Overflow)?;
        for (dst, src) in rows.chunks_exact_mut(qw).zip(buf.chunks_exact(dh)) {
            dst[h * dh..(h + 1) * dh].copy_from_slice(src);
        }
    }
    Ok(())
}

/// Columns `c..c + width` of `m` (a head's, or its key/value group's).
pub(super) fn head_cols<'a>(m: &MatRef<'a, f32>, c: usize, width: usize) -> Result<MatRef<'a, f32>, HfError> {
    m.cols_range(c, width).ok_or(HfError::Core(peft_core::Error::Overflow))
}

/// The row ranges of the sequences of a pass: `lens` in order, or all
/// `n` rows as one sequence with prompt tuning's virtual rows in front.
///
/// # Errors
/// [`HfError::Config`] (`segments`) when the lengths do not add up to the
/// ids, there is not one cache per sequence, or prompt tuning meets more
/// than one sequence.
fn batch_segments(lens: &[usize], caches: usize, prompt: bool, n: usize) -> Result<Vec<(usize, usize)>, HfError> {
    let bad = |reason: &str| Err(HfError::Config { field: "segments".into(), reason: reason.into() });
    if lens.len() != caches {
        return bad("a batch needs one key/value cache per sequence");
    }
    if prompt {
        return if lens.len() == 1 { Ok(vec![(0, n)]) } else { bad("prompt tuning runs one sequence at a time") };
    }
    if lens.iter().sum::<usize>() != n || lens.contains(&0) {
        return bad("the sequences' lengths must be positive and add up to the ids");
    }
    Ok(ranges(lens))
}

/// One layer's attention: each sequence's new keys and values (rows
/// `[a, b)` of `k`, `v`) join layer `l` of its own cache, and its queries
/// attend to all of that cache ([`attend`]).
#[allow(clippy::too_many_arguments)]
fn attend_layer<B: Backend<f32> + ?Sized>(
    backend: &B,
    shape: &AttentionShape,
    segments: &[(usize, usize)],
    (caches, l): (&mut [KvCache], usize),
    (q, k, v): (&[f32], &[f32], &[f32]),
    prefix: Option<&Prefix<'_, f32>>,
    attn: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
    let bad = || HfError::Config { field: "segments".into(), reason: "a segment outside the pass's rows".into() };
    let missing = || HfError::Config { field: "cache".into(), reason: "a layer the cache was not sized for".into() };
    for (cache, &(a, b)) in caches.iter_mut().zip(segments) {
        let (ck, cv) = (cache.k.get_mut(l).ok_or_else(missing)?, cache.v.get_mut(l).ok_or_else(missing)?);
        ck.extend_from_slice(k.get(a * kvw..b * kvw).ok_or_else(bad)?);
        cv.extend_from_slice(v.get(a * kvw..b * kvw).ok_or_else(bad)?);
    }
    let mut seqs = Vec::with_capacity(segments.len());
    for (cache, &(a, b)) in caches.iter().zip(segments) {
        let (ck, cv) = (cache.k.get(l).ok_or_else(missing)?, cache.v.get(l).ok_or_else(missing)?);
        let q = MatRef::new(q.get(a * qw..b * qw).ok_or_else(bad)?, b - a, qw)?;
        let tk = ck.len() / kvw.max(1);
        seqs.push(Sequence { q, k: MatRef::new(ck, tk, kvw)?, v: MatRef::new(cv, tk, kvw)?, row0: a });
    }
    attend(backend, shape, &seqs, prefix, attn, scratch)
}

/// What [`Llama::forward_traced`] keeps of one layer.
#[derive(Clone, Debug, Default)]
struct LayerTrace {
    /// The residual entering the layer `[n, d]`.
    h_in: Vec<f32>,
    /// The residual after attention `[n, d]`.
    a: Vec<f32>,
    /// `rms(a) w_post` `[n, d]`.
    x2: Vec<f32>,
    /// Queries and keys after RoPE, values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The attention's output before `o_proj` `[n, q_width]`.
    attn: Vec<f32>,
    /// `gate_proj` and `up_proj` outputs, and `silu(gate) * up` `[n, f]`.
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// With bottleneck adapters, `o_proj`'s and `down_proj`'s outputs
    /// before them.
    attn_pre: Vec<f32>,
    mlp_pre: Vec<f32>,
}

/// The activations of one traced forward pass (see [`Llama::backward`]).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    rows: usize,
    virtual_rows: usize,
    /// The row ranges `[a, b)` of the pass's sequences (one for a single
    /// sequence, prompt tuning's virtual rows included).
    segments: Vec<(usize, usize)>,
    layers: Vec<LayerTrace>,
    h_final: Vec<f32>,
    normed: Vec<f32>,
    /// The pass's token ids (trainable tokens' backward).
    ids: Vec<u32>,
}

impl Trace {
    /// Rows of the pass (virtual tokens included).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Prompt tuning's virtual rows at the front (0 otherwise).
    pub fn virtual_rows(&self) -> usize {
        self.virtual_rows
    }
}

/// `[start, end)` of each segment of these lengths, in order.
fn ranges(lens: &[usize]) -> Vec<(usize, usize)> {
    let mut start = 0;
    lens.iter()
        .map(|&n| {
            start += n;
            (start - n, start)
        })
        .collect()
}

/// The position of each row: for the sequence in rows `[a, b)` whose
/// first position is `first` (after its cache and a prefix's entries),
/// `first` plus the row's index in it.
pub(super) fn positions(segments: &[(usize, usize)], firsts: impl IntoIterator<Item = usize>) -> Vec<usize> {
    segments.iter().zip(firsts).flat_map(|(&(a, b), first)| first..first + (b - a)).collect()
}

/// The index of the largest value (the first on ties; NaN never wins).
pub fn argmax(v: &[f32]) -> Option<usize> {
    v.iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .fold(None, |best: Option<(usize, f32)>, (i, &x)| match best {
            Some((_, b)) if x <= b => best,
            _ => Some((i, x)),
        })
        .map(|(i, _)| i)
}

/// With bottleneck adapters, `z <- z + up(act(down(z)))` for the adapter
/// at `site` of layer `l`; returns the `z` it read (empty otherwise).
fn bottleneck<B: Backend<f32> + ?Sized>(
    backend: &B,
    adapter: Option<&LlamaAdapter<'_>>,
    l: usize,
    site: usize,
    z: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<Vec<f32>, HfError> {
    let Some(LlamaAdapter::Bottleneck(b)) = adapter else { return Ok(Vec::new()) };
    let d = b.sites.first().map_or(0, |s| s[0].b_up.len());
    let n = z.len() / d.max(1);
    let layer = b.layer(l, site, d)?;
    let pre = z.to_vec();
    scratch.resize(layer.forward_scratch_len(n).max(scratch.len()), 0.0);
    layer
        .forward(backend, MatRef::new(&pre, n, d)?, MatMut::new(z, n, d)?, &mut scratch[..])
        .map_err(HfError::backend)?;
    Ok(pre)
}

/// `out = x / sqrt(mean(x^2) + eps) * w`, row by row (the mean summed in
/// f64, the scale rounded to f32 once, as transformers' f32 RMSNorm).
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let d = w.len().max(1);
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / d as f64;
        let r = (1.0 / (ms + eps).sqrt()) as f32;
        o.iter_mut().zip(row).zip(w).for_each(|((o, x), w)| *o = w * (x * r));
    }
}

/// [`rms_norm`] over blocks of rows ([`rows::by_rows`]).
pub(super) fn rms_norm_rows<B: Backend<f32> + ?Sized>(backend: &B, x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let d = w.len().max(1);
    rows::by_rows(backend, [(out, d)], &|r0, [o]| rms_norm(rows::from(x, r0, d), w, eps, o));
}

/// `gate = silu(gate) * up`, rows `f` wide, over blocks of rows
/// ([`rows::by_rows`]).
fn silu_mul_rows<B: Backend<f32> + ?Sized>(backend: &B, gate: &mut [f32], up: &[f32], f: usize) {
    rows::by_rows(backend, [(gate, f)], &|r0, [g]| {
        g.iter_mut().zip(rows::from(up, r0, f)).for_each(|(g, u)| *g = silu(*g) * u);
    });
}

/// [`rotate`] of the queries `[n, q_width]` and keys `[n, kv_width]` of a
/// pass (their rows' angles `rope`) over blocks of rows ([`rows::by_rows`]).
pub(super) fn rotate_rows<B: Backend<f32> + ?Sized>(
    backend: &B,
    [q, k]: [&mut [f32]; 2],
    c: &LlamaConfig,
    rope: &[(Vec<f32>, Vec<f32>)],
    sign: f32,
) {
    let (hd, qw, kvw) = (c.head_dim, c.q_width(), c.kv_width());
    rows::by_rows(backend, [(q, qw), (k, kvw)], &|r0, [q, k]| {
        let rope = rope.get(r0..).unwrap_or_default();
        rotate(q, c.num_heads, hd, rope, sign);
        rotate(k, c.num_kv_heads, hd, rope, sign);
    });
}

/// Each pair rotated by `sign` times its angle (`-1`: the transpose, which
/// is RoPE's backward).
pub(super) fn rotate(x: &mut [f32], heads: usize, head_dim: usize, rope: &[(Vec<f32>, Vec<f32>)], sign: f32) {
    let half = head_dim / 2;
    for (row, (cos, sin)) in x.chunks_exact_mut(heads * head_dim).zip(rope) {
        for head in row.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for (((x1, x2), c), s) in a.iter_mut().zip(b).zip(cos).zip(sin) {
                let (u, v, s) = (*x1, *x2, sign * s);
                *x1 = u * c - v * s;
                *x2 = v * c + u * s;
            }
        }
    }
}

/// `x sigmoid(x)`.
pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
