//! Training PEFT adapters on the [`Llama`] model: each method's fresh
//! adapter with PEFT's initialization ([`init_adapter`]), a random model
//! from a seed ([`Llama::random`]), the built-in distillation task
//! ([`Distill`]), and one AdamW step over the adapter's tensors only
//! ([`Trainer`]).
//!
//! The adapter is an [`HfAdapter`]: the same value PEFT's folders load into,
//! so a trained adapter is written with [`HfAdapter::write_dir`] and loaded
//! back by PEFT or by `peft forward`.

use std::collections::BTreeMap;

use peft_core::lokr::{Factor, Layout, Lokr};
use peft_core::lora::{Lora, LoraConfig};
use peft_core::optim::{AdamW, Slot};
use peft_core::prefix::{PrefixConfig, PrefixTuning};
use peft_core::prompt::PromptTuning;
use peft_core::vera::VeraProjection;
use peft_core::{Backend, MatRef, Rng};
use safetensors::Dtype;

use peft_core::storage::{Format, Owned, OwnedWeight};

use super::norms::locate_norm;
use super::weights::Matrix;
use super::{
    Bottleneck, LAYER_NORMS, Layer, Linear, Llama, LlamaAdapter, LlamaConfig, LlamaGrads, PROJECTIONS, Projection,
    Trace,
};
use crate::hf::{
    AdaLoraModule, BoftModule, C3aModule, FourierFtModule, HfAdapter, HfError, HfTensor, HraModule, Ia3Module,
    LnTuningModule, LohaModule, LokrModule, LoraModule, MissModule, OftModule, PeftConfig, RandLoraModule,
    RandLoraShared, RoadModule, ShiraModule, TrainableTokensModule, VbLoraBank, VbLoraModule, VbLoraStored, VeraModule,
    VeraProjections,
};

/// A method and its configuration on the Llama model's projections
/// (`targets`: short names from [`PROJECTIONS`], e.g. `"q_proj"`).
#[derive(Clone, Debug, PartialEq)]
pub enum MethodSetup {
    /// LoRA (`dora`: DoRA) with rank `r` and `alpha`.
    Lora {
        /// Rank.
        r: usize,
        /// `lora_alpha`.
        alpha: f64,
        /// DoRA.
        dora: bool,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// (IA)^3; `feedforward` among `targets` scale their input.
    Ia3 {
        /// Adapted projections.
        targets: Vec<String>,
        /// Those scaling their input.
        feedforward: Vec<String>,
    },
    /// LoHa with rank `r` and `alpha`.
    Loha {
        /// Rank.
        r: usize,
        /// `alpha`.
        alpha: f64,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// LoKr with rank `r` and `alpha` (PEFT's layout, no `decompose_both`).
    Lokr {
        /// Rank.
        r: usize,
        /// `alpha`.
        alpha: f64,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// VeRA with shared projections of rank `r`.
    Vera {
        /// Rank.
        r: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// AdaLoRA at rank `init_r` with `lora_alpha`: `A`, `E` and `B` train
    /// on the task loss alone (PEFT's orthogonality penalty and budget
    /// allocation are not applied; the folder is an AdaLoRA without a
    /// `rank_pattern`, which PEFT loads and runs as written).
    AdaLora {
        /// `init_r`.
        init_r: usize,
        /// `lora_alpha`.
        alpha: f64,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// MiSS (balance) with shard size `r`.
    Miss {
        /// `r`.
        r: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// HRA with `r` reflections (even: PEFT's identity init), without
    /// Gram-Schmidt.
    Hra {
        /// `r`.
        r: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// OFT with PEFT's `r` blocks per projection (the block size `in /
    /// r`, adjusted as PEFT adjusts it), the Cayley-Neumann series of 5
    /// terms, from the identity (`oft_R = 0`).
    Oft {
        /// PEFT's `r`.
        r: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// BOFT with one factor (what PEFT trains on a CPU) in blocks of
    /// `block`, from the identity (`boft_R = 0`, `boft_s = 1`).
    Boft {
        /// `boft_block_size`.
        block: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// VB-LoRA at rank `r` with PEFT's 256 bank vectors of length `len`
    /// and top-2 mixes, its init (bank `U(-0.02, 0.02)`, logits `N(0,
    /// 0.1^2)`: not the identity); the logits train, the bank is held
    /// frozen (PEFT trains it too: its gradient is shared by every module,
    /// which this trainer's per-module buffers do not sum yet).
    VbLora {
        /// `r`.
        r: usize,
        /// `vector_length`.
        len: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// RandLoRA with bases of rank `r` (PEFT's `randlora_alpha = 20 r`,
    /// its default ratio 640 / 32), `lambda = 0`, `gamma = 1 / max(in,
    /// out)`; the bases drawn here with unit variance (PEFT's are
    /// Kaiming-uniform divided by their standard deviation, from torch's
    /// generator).
    RandLora {
        /// `r`.
        r: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// FourierFT with `n` frequencies per projection (PEFT's
    /// `random_loc_seed` 777 and `scaling` 150), the spectrum zero (PEFT's
    /// `init_weights = True`; its default draws it at random, which would
    /// change the model before the first step).
    FourierFt {
        /// `n_frequency`.
        n: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// RoAd (road_1) with groups of `group` outputs.
    Road {
        /// `group_size`.
        group: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// C3A with blocks of `block`, the kernel zero (PEFT's `init_weights =
    /// true`; PEFT's default draws it at random, which would change the
    /// model before the first step).
    C3a {
        /// `block_size`.
        block: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// SHiRA with `r (in + out)` random positions per module, zero values.
    Shira {
        /// `r`.
        r: usize,
        /// Adapted projections.
        targets: Vec<String>,
    },
    /// LN tuning of the norms `targets` names (`input_layernorm`,
    /// `post_attention_layernorm`, `norm`: PEFT's defaults for Llama), from
    /// copies of the model's weights (PEFT's init: the model unchanged).
    LnTuning {
        /// Tuned norms.
        targets: Vec<String>,
    },
    /// Trainable tokens: the rows of `tokens` in `model.embed_tokens` (and
    /// a tied `lm_head`), from copies of the model's (PEFT's
    /// `init_weights = True`: the model unchanged).
    TrainableTokens {
        /// The trained tokens, in the rows' order.
        tokens: Vec<u32>,
    },
    /// Prompt tuning with `n` virtual tokens.
    Prompt {
        /// Virtual tokens.
        n: usize,
    },
    /// Prefix tuning with `n` virtual tokens.
    Prefix {
        /// Virtual tokens.
        n: usize,
    },
}

impl MethodSetup {
    /// The rank of the methods that have one.
    fn rank(&self) -> Option<usize> {
        match self {
            MethodSetup::Lora { r, .. }
            | MethodSetup::Loha { r, .. }
            | MethodSetup::Lokr { r, .. }
            | MethodSetup::Vera { r, .. }
            | MethodSetup::AdaLora { init_r: r, .. }
            | MethodSetup::Miss { r, .. }
            | MethodSetup::Hra { r, .. }
            | MethodSetup::Oft { r, .. }
            | MethodSetup::RandLora { r, .. }
            | MethodSetup::VbLora { r, .. }
            | MethodSetup::Shira { r, .. } => Some(*r),
            MethodSetup::Ia3 { .. }
            | MethodSetup::Road { .. }
            | MethodSetup::Boft { .. }
            | MethodSetup::FourierFt { .. }
            | MethodSetup::C3a { .. }
            | MethodSetup::LnTuning { .. }
            | MethodSetup::TrainableTokens { .. }
            | MethodSetup::Prompt { .. }
            | MethodSetup::Prefix { .. } => None,
        }
    }

    fn targets(&self) -> &[String] {
        match self {
            MethodSetup::Lora { targets, .. }
            | MethodSetup::Ia3 { targets, .. }
            | MethodSetup::Loha { targets, .. }
            | MethodSetup::Lokr { targets, .. }
            | MethodSetup::Vera { targets, .. }
            | MethodSetup::AdaLora { targets, .. }
            | MethodSetup::Miss { targets, .. }
            | MethodSetup::Hra { targets, .. }
            | MethodSetup::Oft { targets, .. }
            | MethodSetup::Boft { targets, .. }
            | MethodSetup::FourierFt { targets, .. }
            | MethodSetup::RandLora { targets, .. }
            | MethodSetup::VbLora { targets, .. }
            | MethodSetup::Road { targets, .. }
            | MethodSetup::C3a { targets, .. }
            | MethodSetup::Shira { targets, .. } => targets,
            // Norms, not projections: placed by `init_ln_tuning`.
            MethodSetup::LnTuning { .. }
            | MethodSetup::TrainableTokens { .. }
            | MethodSetup::Prompt { .. }
            | MethodSetup::Prefix { .. } => &[],
        }
    }

    /// The `adapter_config.json` PEFT writes for this method on `c`.
    fn config(&self, c: &LlamaConfig) -> serde_json::Value {
        use serde_json::json;
        match self {
            MethodSetup::Lora { r, alpha, dora, targets } => json!({"peft_type": "LORA", "task_type": "CAUSAL_LM",
                "r": r, "lora_alpha": alpha, "target_modules": targets, "use_dora": dora, "use_rslora": false,
                "fan_in_fan_out": false, "bias": "none", "lora_dropout": 0.0}),
            MethodSetup::Ia3 { targets, feedforward } => json!({"peft_type": "IA3", "task_type": "CAUSAL_LM",
                "target_modules": targets, "feedforward_modules": feedforward, "fan_in_fan_out": false}),
            MethodSetup::Loha { r, alpha, targets } => json!({"peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": r,
                "alpha": alpha, "target_modules": targets, "rank_dropout": 0.0, "module_dropout": 0.0,
                "use_effective_conv2d": false, "init_weights": true}),
            MethodSetup::Lokr { r, alpha, targets } => json!({"peft_type": "LOKR", "task_type": "CAUSAL_LM", "r": r,
                "alpha": alpha, "target_modules": targets, "rank_dropout": 0.0, "module_dropout": 0.0,
                "decompose_both": false, "decompose_factor": -1, "use_effective_conv2d": false, "init_weights": true}),
            MethodSetup::Vera { r, targets } => json!({"peft_type": "VERA", "task_type": "CAUSAL_LM", "r": r,
                "target_modules": targets, "save_projection": true, "projection_prng_key": 0, "d_initial": 0.1,
                "fan_in_fan_out": false, "bias": "none"}),
            // PEFT's config refuses `total_step` unset; it only drives PEFT's allocation schedule.
            MethodSetup::AdaLora { init_r, alpha, targets } => json!({"peft_type": "ADALORA",
                "task_type": "CAUSAL_LM", "r": 8, "init_r": init_r, "target_r": init_r, "lora_alpha": alpha,
                "target_modules": targets, "fan_in_fan_out": false, "bias": "none", "lora_dropout": 0.0,
                "rank_pattern": null, "total_step": 1, "tinit": 0, "tfinal": 0, "deltaT": 1}),
            MethodSetup::Miss { r, targets } => json!({"peft_type": "MISS", "task_type": "CAUSAL_LM", "r": r,
                "mini_r": 1, "miss_dropout": 0.0, "target_modules": targets, "init_weights": true, "bias": "none"}),
            MethodSetup::Hra { r, targets } => json!({"peft_type": "HRA", "task_type": "CAUSAL_LM", "r": r,
                "apply_GS": false, "target_modules": targets, "init_weights": true, "bias": "none"}),
            MethodSetup::Oft { r, targets } => json!({"peft_type": "OFT", "task_type": "CAUSAL_LM", "r": r,
                "oft_block_size": 0, "use_cayley_neumann": true, "num_cayley_neumann_terms": 5, "coft": false,
                "eps": 6e-5, "block_share": false, "module_dropout": 0.0, "target_modules": targets,
                "init_weights": true, "fan_in_fan_out": false, "bias": "none"}),
            MethodSetup::VbLora { r, len, targets } => json!({"peft_type": "VBLORA", "task_type": "CAUSAL_LM",
                "r": r, "num_vectors": 256, "vector_length": len, "topk": 2, "save_only_topk_weights": false,
                "target_modules": targets, "fan_in_fan_out": false, "bias": "none"}),
            MethodSetup::RandLora { r, targets } => json!({"peft_type": "RANDLORA", "task_type": "CAUSAL_LM",
                "r": r, "randlora_alpha": 20 * r, "save_projection": true, "projection_prng_key": 0,
                "target_modules": targets, "init_weights": true, "fan_in_fan_out": false, "bias": "none"}),
            MethodSetup::FourierFt { n, targets } => json!({"peft_type": "FOURIERFT", "task_type": "CAUSAL_LM",
                "n_frequency": n, "n_frequency_pattern": {}, "scaling": 150.0, "random_loc_seed": 777,
                "target_modules": targets, "init_weights": true, "fan_in_fan_out": false, "bias": "none"}),
            MethodSetup::Boft { block, targets } => json!({"peft_type": "BOFT", "task_type": "CAUSAL_LM",
                "boft_block_size": block, "boft_block_num": 0, "boft_n_butterfly_factor": 1, "boft_dropout": 0.0,
                "target_modules": targets, "init_weights": true, "fan_in_fan_out": false, "bias": "none"}),
            MethodSetup::Road { group, targets } => json!({"peft_type": "ROAD", "task_type": "CAUSAL_LM",
                "variant": "road_1", "group_size": group, "target_modules": targets, "init_weights": true}),
            MethodSetup::C3a { block, targets } => json!({"peft_type": "C3A", "task_type": "CAUSAL_LM",
                "block_size": block, "block_size_pattern": {}, "target_modules": targets, "init_weights": true,
                "bias": "none"}),
            MethodSetup::Shira { r, targets } => json!({"peft_type": "SHIRA", "task_type": "CAUSAL_LM", "r": r,
                "mask_type": "random", "random_seed": null, "target_modules": targets, "init_weights": true,
                "fan_in_fan_out": false}),
            MethodSetup::LnTuning { targets } => json!({"peft_type": "LN_TUNING", "task_type": "CAUSAL_LM",
                "target_modules": targets, "exclude_modules": null, "modules_to_save": null}),
            MethodSetup::TrainableTokens { tokens } => json!({"peft_type": "TRAINABLE_TOKENS",
                "task_type": "CAUSAL_LM", "token_indices": tokens, "target_modules": ["embed_tokens"],
                "init_weights": true}),
            MethodSetup::Prompt { n } => json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                "num_virtual_tokens": n, "token_dim": c.hidden_size, "num_layers": c.num_layers,
                "num_attention_heads": c.num_heads, "num_transformer_submodules": 1,
                "prompt_tuning_init": "SAMPLE_VOCAB"}),
            MethodSetup::Prefix { n } => json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                "num_virtual_tokens": n, "token_dim": c.kv_width(), "num_layers": c.num_layers,
                "num_attention_heads": c.num_kv_heads, "num_transformer_submodules": 1,
                "prefix_projection": false, "encoder_hidden_size": c.kv_width()}),
        }
    }
}

/// A normal matrix as an f32 [`Matrix`].
fn random_matrix(rng: &mut Rng, name: String, rows: usize, cols: usize, std: f64) -> Matrix {
    let mut v = vec![0.0f32; rows * cols];
    rng.fill_normal(&mut v, std);
    Matrix { name, rows, cols, data: Owned::F32(v) }
}

impl Llama {
    /// A model with random f32 weights from `seed`: embeddings `N(0, 1)`,
    /// each projection and `lm_head` `N(0, 1 / in)` (unit-variance outputs),
    /// norms 1, no biases (whatever `config` says of them).
    pub fn random(config: LlamaConfig, seed: u64) -> Self {
        let mut config = config;
        config.attention_bias = false;
        config.mlp_bias = false;
        let c = &config;
        let mut rng = Rng::new(seed);
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let embed = random_matrix(&mut rng, "model.embed_tokens.weight".into(), c.vocab_size, d, 1.0);
        let shapes = [(c.q_width(), d), (c.kv_width(), d), (c.kv_width(), d), (d, c.q_width()), (f, d), (f, d), (d, f)];
        let layers = (0..c.num_layers)
            .map(|l| {
                let proj = core::array::from_fn(|i| {
                    let (rows, cols) = shapes[i];
                    let name = format!("model.layers.{l}.{}.weight", PROJECTIONS[i]);
                    Linear { weight: random_matrix(&mut rng, name, rows, cols, 1.0 / (cols as f64).sqrt()), bias: None }
                });
                Layer { input_norm: vec![1.0; d], proj, post_norm: vec![1.0; d] }
            })
            .collect();
        let lm_head = (!c.tie_word_embeddings)
            .then(|| random_matrix(&mut rng, "lm_head.weight".into(), c.vocab_size, d, 1.0 / (d as f64).sqrt()));
        let inv_freq = Self::inv_freq(c);
        Self { config, embed, layers, norm: vec![1.0; d], lm_head, inv_freq }
    }

    /// A copy with every projection, the embeddings and `lm_head` stored
    /// in `format` (the norms stay f32), quantized as `peft quantize`
    /// quantizes them: a model at real shapes in any storage without a
    /// file (the model-level benchmarks).
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for a matrix not stored as f32;
    /// `peft-core`'s refusals (a block format over rows not a multiple of
    /// its block, a format without a quantizer), naming the matrix.
    pub fn quantized(&self, format: Format) -> Result<Self, HfError> {
        let q = |m: &Matrix| -> Result<Matrix, HfError> {
            let Owned::F32(v) = &m.data else {
                return Err(HfError::Unsupported(format!("{}: quantizing a matrix not stored as f32", m.name)));
            };
            let w = OwnedWeight::quantize(format, v, m.rows, m.cols)
                .map_err(|error| HfError::InModule { module: m.name.clone(), error })?;
            Ok(Matrix { name: m.name.clone(), rows: m.rows, cols: m.cols, data: w.data().clone() })
        };
        let mut out = self.clone();
        out.embed = q(&self.embed)?;
        out.lm_head = self.lm_head.as_ref().map(q).transpose()?;
        for (dst, src) in out.layers.iter_mut().zip(&self.layers) {
            for (d, s) in dst.proj.iter_mut().zip(&src.proj) {
                d.weight = q(&s.weight)?;
            }
        }
        Ok(out)
    }

    /// A copy with `W += U V` on the projections `projs` of every layer, `U [out, rank]` and `V [rank, in]`
    /// `N(0, std^2)` from `seed` (the teacher of [`Distill`]).
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for a projection not stored as f32.
    pub fn with_hidden_change(&self, projs: &[Projection], rank: usize, std: f64, seed: u64) -> Result<Self, HfError> {
        let mut t = self.clone();
        let mut rng = Rng::new(seed);
        for layer in &mut t.layers {
            for &p in projs {
                let w = &mut layer.proj[p.index()].weight;
                let (rows, cols) = (w.rows, w.cols);
                let Owned::F32(v) = &mut w.data else {
                    return Err(HfError::Unsupported(format!("{}: a hidden change of a stored base", w.name)));
                };
                let mut u = vec![0.0f32; rows * rank];
                let mut vv = vec![0.0f32; rank * cols];
                rng.fill_normal(&mut u, std);
                rng.fill_normal(&mut vv, std);
                for i in 0..rows {
                    for j in 0..cols {
                        v[i * cols + j] += (0..rank).map(|k| u[i * rank + k] * vv[k * cols + j]).sum::<f32>();
                    }
                }
            }
        }
        Ok(t)
    }
}

/// A fresh adapter of `method` for `model`, initialized from `seed` as PEFT
/// initializes it: LoRA `A` Kaiming-uniform, `B = 0`; DoRA also `m =
/// ||W||_row`; (IA)^3 `l = 1`; LoHa and LoKr `peft-core`'s (PEFT's) inits
/// (the update is zero); VeRA shared projections Kaiming-uniform, `lambda_d
/// = 0.1`, `lambda_b = 0`; prompt tuning rows of the embedding table
/// sampled at random (`SAMPLE_VOCAB`); prefix tuning `N(0, 1)`. Every
/// method but prompt and prefix tuning starts as the identity.
///
/// # Errors
/// [`HfError::Config`] for a target that is not one of [`PROJECTIONS`];
/// `peft-core`'s validation errors (a rank above a projection's size).
pub fn init_adapter(model: &Llama, method: &MethodSetup, seed: u64) -> Result<HfAdapter, HfError> {
    let c = &model.config;
    let config = PeftConfig::parse(&method.config(c).to_string())?;
    let mut ad = HfAdapter::empty(config, Dtype::F32, BTreeMap::new());
    let mut rng = Rng::new(seed);
    let sites = sites(model, method)?;
    check_rank(method, &sites)?;
    match method {
        MethodSetup::Lora { r, alpha, dora, .. } => {
            for s in sites {
                ad.modules.push(init_lora(s, *r, *alpha, *dora, &mut rng)?);
            }
        }
        MethodSetup::Ia3 { feedforward, .. } => {
            for s in sites {
                let ff = feedforward.iter().any(|t| t == s.short());
                let n = if ff { s.weight.cols } else { s.weight.rows };
                ad.ia3.push(Ia3Module { name: s.name, l: vec![1.0; n], feedforward: ff, dtype: Dtype::F32 });
            }
        }
        MethodSetup::Loha { r, alpha, .. } => {
            for s in sites {
                ad.loha.push(init_loha(s, *r, *alpha, &mut rng)?);
            }
        }
        MethodSetup::Lokr { r, alpha, .. } => {
            for s in sites {
                ad.lokr.push(init_lokr(s, *r, *alpha, &mut rng)?);
            }
        }
        MethodSetup::Vera { r, .. } => init_vera(&mut ad, sites, *r, &mut rng)?,
        MethodSetup::Shira { r, .. } => init_shira(&mut ad, sites, *r, &mut rng)?,
        MethodSetup::C3a { block, .. } => {
            for s in sites {
                let (n_out, n_in, block) = (s.weight.rows, s.weight.cols, *block);
                let kernel = vec![0.0f32; n_out / block.max(1) * n_in];
                ad.c3a.push(C3aModule { name: s.name, kernel, block, n_in, n_out, dtype: Dtype::F32 });
            }
        }
        MethodSetup::Road { group, .. } => {
            // PEFT's init: theta = 0, alpha = 1 (the identity).
            for s in sites {
                let (n_out, variant) = (s.weight.rows, peft_core::road::RoadVariant::Road1);
                let (theta, alpha) = (vec![0.0f32; n_out / 2], vec![1.0f32; n_out / 2]);
                let (dtypes, group) = ([Dtype::F32; 2], *group);
                ad.road.push(RoadModule { name: s.name, theta, alpha, variant, group, n_out, dtypes });
            }
        }
        MethodSetup::RandLora { r, .. } => init_randlora(&mut ad, sites, *r, &mut rng)?,
        MethodSetup::VbLora { r, len, .. } => init_vblora(&mut ad, sites, *r, *len, &mut rng)?,
        MethodSetup::FourierFt { n, .. } => {
            for s in sites {
                let m = FourierFtModule::new(s.name, vec![0.0f32; *n], 150.0, 777, Dtype::F32);
                m.layer(s.weight.cols, s.weight.rows)?;
                ad.fourierft.push(m);
            }
        }
        MethodSetup::Boft { block, .. } => {
            for s in sites {
                ad.boft.push(init_boft(s, *block)?);
            }
        }
        MethodSetup::Oft { r, .. } => {
            for s in sites {
                ad.oft.push(init_oft(s, *r)?);
            }
        }
        MethodSetup::Hra { r, .. } => {
            for s in sites {
                ad.hra.push(init_hra(s, *r, &mut rng)?);
            }
        }
        MethodSetup::Miss { r, .. } => {
            // PEFT's init: D = 0 [r, out] (balance).
            for s in sites {
                let (n_out, name) = (s.weight.rows, s.name);
                let (variant, dtype) = (peft_core::miss::MissVariant::Balance, Dtype::F32);
                let (d, shape) = (vec![0.0f32; *r * n_out], vec![*r, n_out]);
                ad.miss.push(MissModule { name, d, shape, variant, r: *r, dtype });
            }
        }
        MethodSetup::AdaLora { init_r, alpha, .. } => {
            for s in sites {
                ad.adalora.push(init_adalora(s, *init_r, *alpha, &mut rng)?);
            }
        }
        MethodSetup::LnTuning { targets } => init_ln_tuning(model, &mut ad, targets)?,
        MethodSetup::TrainableTokens { tokens } => ad.trainable_tokens.push(init_tokens(model, tokens)?),
        MethodSetup::Prompt { n } => ad.prompt = Some(init_prompt(model, *n, &mut rng)?),
        MethodSetup::Prefix { n } => {
            let shape = peft_core::attention::AttentionShape::new(c.num_heads, c.num_kv_heads, c.head_dim)?;
            let pc = PrefixConfig::new(*n, c.num_layers, &shape)?;
            let mut kv = vec![0.0f32; pc.len()];
            PrefixTuning::new(pc, &mut kv)?.init_normal(&mut rng);
            let shape = vec![*n, pc.row_width()];
            ad.prompt = Some(HfTensor { name: "prompt_embeddings".into(), dtype: Dtype::F32, shape, data: kv });
        }
    }
    Ok(ad)
}

/// LN tuning of every norm `targets` names, each a copy of the model's
/// weight (PEFT's deep copy).
///
/// # Errors
/// [`HfError::Config`] (`target_modules`) for a target that is not one of
/// the model's norms.
fn init_ln_tuning(model: &Llama, ad: &mut HfAdapter, targets: &[String]) -> Result<(), HfError> {
    let known = [LAYER_NORMS[0], LAYER_NORMS[1], "norm"];
    if let Some(t) = targets.iter().find(|t| !known.contains(&t.as_str())) {
        let reason = format!("{t:?} is not a norm of the model ({})", known.join(", "));
        return Err(HfError::Config { field: "target_modules".into(), reason });
    }
    let wanted = |t: &str| targets.iter().any(|x| x == t);
    let mut norms: Vec<(String, &Vec<f32>)> = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for (name, w) in LAYER_NORMS.iter().zip([&layer.input_norm, &layer.post_norm]) {
            if wanted(name) {
                norms.push((format!("model.layers.{l}.{name}"), w));
            }
        }
    }
    if wanted("norm") {
        norms.push(("model.norm".into(), &model.norm));
    }
    for (name, w) in norms {
        let weight =
            HfTensor { name: format!("{name}.weight"), dtype: Dtype::F32, shape: vec![w.len()], data: w.clone() };
        ad.ln_tuning.push(LnTuningModule { name, params: vec![weight] });
    }
    Ok(())
}

/// Trainable tokens on `model.embed_tokens` as PEFT initializes them: each
/// row a copy of the model's.
///
/// # Errors
/// [`HfError::Config`] (`token_indices`) for a token outside the
/// vocabulary, before anything is allocated from the list.
fn init_tokens(model: &Llama, tokens: &[u32]) -> Result<TrainableTokensModule, HfError> {
    let (vocab, d) = (model.config.vocab_size, model.config.hidden_size);
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        let reason = format!("token {t} is outside the vocabulary (vocab_size {vocab})");
        return Err(HfError::Config { field: "token_indices".into(), reason });
    }
    let embed = model.embed.view()?;
    let mut rows = vec![0.0f32; tokens.len() * d];
    for (&t, row) in tokens.iter().zip(rows.chunks_exact_mut(d.max(1))) {
        embed.row(t as usize).ok_or(HfError::Core(peft_core::Error::Overflow))?.dequantize(row);
    }
    let (name, indices, dtype) = (super::tokens::EMBED.to_string(), tokens.to_vec(), Dtype::F32);
    let m = TrainableTokensModule { name, indices, rows, dim: d, dtype, wrapped: false };
    m.layer(vocab)?;
    Ok(m)
}

/// A rank is checked before any factor is allocated from it (a rank of
/// 1e8 asked for gigabytes before the layers' own checks).
///
/// # Errors
/// [`HfError::Config`] (`rank`) above the larger side of the smallest site.
fn check_rank(method: &MethodSetup, sites: &[Site<'_>]) -> Result<(), HfError> {
    if let (Some(r), Some(s)) = (method.rank(), sites.iter().min_by_key(|s| s.weight.rows.max(s.weight.cols))) {
        let side = s.weight.rows.max(s.weight.cols);
        if r > side {
            return Err(HfError::Config {
                field: "rank".into(),
                reason: format!("{r} is above {side}, the larger side of {}", s.name),
            });
        }
    }
    Ok(())
}

/// HRA on a site as PEFT initializes it: `r` reflections in equal pairs.
fn init_hra(s: Site<'_>, r: usize, rng: &mut Rng) -> Result<HraModule, HfError> {
    let n_in = s.weight.cols;
    let mut layer = peft_core::hra::Hra::new(r, n_in, s.weight.rows, false, vec![0.0f32; n_in * r])?;
    layer.init_adapter(rng);
    let u = layer.vectors().to_vec();
    Ok(HraModule { name: s.name, u, r, n_in, gram_schmidt: false, dtype: Dtype::F32 })
}

/// BOFT on a site as PEFT initializes it (`boft_R = 0`, `boft_s = 1`, the
/// identity), one factor in blocks of `b`.
fn init_boft(s: Site<'_>, b: usize) -> Result<BoftModule, HfError> {
    let (n_in, n_out) = (s.weight.cols, s.weight.rows);
    let shape = [1, n_in / b.max(1), b, b];
    let (r, sv) = (vec![0.0f32; n_in * b], vec![1.0f32; n_out]);
    let m = BoftModule { name: s.name, r, s: sv, shape, dtypes: [Dtype::F32; 2] };
    m.layer(n_in, n_out)?;
    Ok(m)
}

/// OFT on a site as PEFT initializes it (`oft_R = 0`, the identity) with
/// PEFT's `r` blocks, adjusted as PEFT adjusts a count that does not
/// divide the input; the series of 5 terms.
fn init_oft(s: Site<'_>, r: usize) -> Result<OftModule, HfError> {
    use peft_core::oft::{Cayley, OftSpec};
    let n_in = s.weight.cols;
    let block = n_in / crate::hf::adjust_oft_parameters(n_in, r).max(1);
    let spec = OftSpec { block, shared: false, cayley: Cayley::Neumann { terms: 5 }, coft_eps: None };
    let rows = n_in / block.max(1);
    let v = vec![0.0f32; rows * (block * block.saturating_sub(1) / 2)];
    let m = OftModule { name: s.name, v, rows, spec, requested: (r, 0), embedding: false, dtype: Dtype::F32 };
    m.layer(n_in, s.weight.rows)?;
    Ok(m)
}

/// A projection of the model that a method targets.
struct Site<'m> {
    proj: Projection,
    /// `model.layers.N.<projection>`.
    name: String,
    weight: &'m Matrix,
}

impl Site<'_> {
    /// The projection's short name (`"q_proj"`), what `target_modules`
    /// lists.
    fn short(&self) -> &'static str {
        self.proj.name().rsplit('.').next().unwrap_or("")
    }
}

/// Every projection of every layer that `method` targets.
///
/// # Errors
/// [`HfError::Config`] (`target_modules`) for a target that is not a
/// projection.
fn sites<'m>(model: &'m Llama, method: &MethodSetup) -> Result<Vec<Site<'m>>, HfError> {
    for t in method.targets() {
        if !PROJECTIONS.iter().any(|p| p.ends_with(&format!(".{t}"))) {
            return Err(HfError::Config {
                field: "target_modules".into(),
                reason: format!("{t:?} is not a projection"),
            });
        }
    }
    let mut sites = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for proj in Projection::ALL {
            let name = format!("model.layers.{l}.{}", proj.name());
            let site = Site { proj, name, weight: &layer.linear(proj).weight };
            if method.targets().iter().any(|t| t == site.short()) {
                sites.push(site);
            }
        }
    }
    Ok(sites)
}

/// LoRA (DoRA: `m = ||W||_row`, in f64) as PEFT initializes it.
fn init_lora(s: Site<'_>, r: usize, alpha: f64, dora: bool, rng: &mut Rng) -> Result<LoraModule, HfError> {
    let (n_out, n_in) = (s.weight.rows, s.weight.cols);
    let cfg = LoraConfig::new(r, alpha);
    let mut layer = Lora::new(&cfg, n_in, n_out, vec![0.0f32; r * n_in], vec![0.0f32; n_out * r])?;
    layer.init_adapter(rng);
    let (a, b) = layer.into_parts();
    let magnitude = if dora {
        let mut row = vec![0.0f32; n_in];
        let view = s.weight.view()?;
        let mut m = vec![0.0f32; n_out];
        for (j, mj) in m.iter_mut().enumerate() {
            view.dequantize_row(j, &mut row)?;
            *mj = row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt() as f32;
        }
        Some(m)
    } else {
        None
    };
    let scale = cfg.scale()?;
    let (lora_bias, embedding, dtypes) = (None, false, [Dtype::F32; 4]);
    Ok(LoraModule { name: s.name, a, b, lora_bias, r, n_in, n_out, alpha, scale, magnitude, embedding, dtypes })
}

/// LoHa as PEFT initializes it (`peft-core`'s init).
fn init_loha(s: Site<'_>, r: usize, alpha: f64, rng: &mut Rng) -> Result<LohaModule, HfError> {
    let (n_out, n_in) = (s.weight.rows, s.weight.cols);
    let (fa, fb) = (vec![0.0f32; n_out * r], vec![0.0f32; r * n_in]);
    let cfg = LoraConfig::new(r, alpha);
    let mut layer = peft_core::loha::Loha::new(&cfg, n_in, n_out, [fa.clone(), fb.clone(), fa, fb])?;
    layer.init_adapter(rng);
    let factors = layer.factors_mut().map(|f| f.to_vec());
    Ok(LohaModule { name: s.name, factors, r, n_in, n_out, alpha, dtypes: [Dtype::F32; 4] })
}

/// LoKr in PEFT's layout, as PEFT initializes it (`peft-core`'s init).
fn init_lokr(s: Site<'_>, r: usize, alpha: f64, rng: &mut Rng) -> Result<LokrModule, HfError> {
    fn factor(t: &mut [Vec<f32>]) -> Factor<&mut [f32]> {
        match t {
            [a, b] => Factor::LowRank(&mut a[..], &mut b[..]),
            [full, ..] => Factor::Full(&mut full[..]),
            [] => Factor::Full(&mut [][..]),
        }
    }
    let layout = Layout::of(s.weight.cols, s.weight.rows, r, false, -1);
    let mut w1: Vec<Vec<f32>> = layout.tensors(r).map(|(_, s)| vec![0.0f32; s[0] * s[1]]).collect();
    let mut w2 = w1.split_off(if layout.w1_low_rank { 2 } else { 1 });
    Lokr::new(&LoraConfig::new(r, alpha), layout.d1, layout.d2, factor(&mut w1), factor(&mut w2))?.init_adapter(rng);
    let dtypes = vec![Dtype::F32; layout.tensors(r).count()];
    Ok(LokrModule { name: s.name, w1, w2, d1: layout.d1, d2: layout.d2, r, alpha, dtypes })
}

/// AdaLoRA as PEFT initializes it (`peft-core`'s init: `E = 0`).
fn init_adalora(s: Site<'_>, r: usize, alpha: f64, rng: &mut Rng) -> Result<AdaLoraModule, HfError> {
    let (n_out, n_in) = (s.weight.rows, s.weight.cols);
    let scale = peft_core::adalora::scale(alpha, r)?;
    let (a, e, b) = (vec![0.0f32; r * n_in], vec![0.0f32; r], vec![0.0f32; n_out * r]);
    let mut layer = peft_core::adalora::AdaLora::new(r, n_in, n_out, scale, a, e, b)?;
    layer.init_adapter(rng);
    let [a, e, b] = layer.tensors_mut().map(|t| t.to_vec());
    Ok(AdaLoraModule { name: s.name, a, e, b, r, n_in, n_out, scale, dtypes: [Dtype::F32; 3] })
}

/// SHiRA: `min(r (in + out), out in)` random positions per site
/// (`peft-core`'s mask, not torch's `randperm`), zero values.
fn init_shira(ad: &mut HfAdapter, sites: Vec<Site<'_>>, r: usize, rng: &mut Rng) -> Result<(), HfError> {
    for s in sites {
        let (n_out, n_in) = (s.weight.rows, s.weight.cols);
        let n = (r * (n_in + n_out)).min(n_in * n_out);
        let mut layer = peft_core::shira::Shira::new(n_in, n_out, 1.0, vec![0.0f32; n], vec![0u32; n], vec![0u32; n])?;
        layer.init_adapter(rng)?;
        let (rows, cols) = (layer.rows().to_vec(), layer.cols().to_vec());
        ad.shira.push(ShiraModule::new(s.name, vec![0.0; n], rows, cols));
    }
    Ok(())
}

/// VeRA: the shared projections sized for the largest site, Kaiming-
/// uniform; per site `lambda_d = 0.1`, `lambda_b = 0`.
fn init_vera(ad: &mut HfAdapter, sites: Vec<Site<'_>>, r: usize, rng: &mut Rng) -> Result<(), HfError> {
    let max_in = sites.iter().map(|s| s.weight.cols).max().unwrap_or(0);
    let max_out = sites.iter().map(|s| s.weight.rows).max().unwrap_or(0);
    let mut proj = VeraProjection::new(r, max_in, max_out, vec![0.0f32; r * max_in], vec![0.0f32; max_out * r])?;
    proj.init(rng);
    let (a, b, dtypes) = (proj.a().to_vec(), proj.b().to_vec(), [Dtype::F32; 2]);
    ad.vera_projections = Some(VeraProjections { a, b, r, max_in, max_out, dtypes });
    for s in sites {
        let (n_out, lambda_d) = (s.weight.rows, vec![peft_core::vera::D_INITIAL as f32; r]);
        ad.vera.push(VeraModule { name: s.name, lambda_d, lambda_b: vec![0.0; n_out], r, n_out, dtypes });
    }
    Ok(())
}

/// VB-LoRA as PEFT initializes it: a bank of 256 vectors `U(-0.02,
/// 0.02)`, every module's logits `N(0, 0.1^2)`, top 2.
fn init_vblora(ad: &mut HfAdapter, sites: Vec<Site<'_>>, r: usize, len: usize, rng: &mut Rng) -> Result<(), HfError> {
    let nv = 256;
    let v: Vec<f32> = (0..nv * len).map(|_| rng.uniform_range(-0.02, 0.02) as f32).collect();
    let bank = VbLoraBank { v, shape: [nv, len], dtype: Dtype::F32 };
    for s in sites {
        let (n_out, n_in) = (s.weight.rows, s.weight.cols);
        let shapes = [[r, n_in / len.max(1), nv], [n_out / len.max(1), r, nv]];
        let mut logits = |shape: [usize; 3]| {
            let mut v = vec![0.0f32; shape.iter().product()];
            rng.fill_normal(&mut v, 0.1);
            v
        };
        let (logits_a, logits_b) = (logits(shapes[0]), logits(shapes[1]));
        let (stored, dtypes) = (VbLoraStored::Logits, [Dtype::F32; 2]);
        let m = VbLoraModule { name: s.name, logits_a, logits_b, shapes, topk: 2, stored, dtypes };
        m.layer(&bank, n_in, n_out)?;
        ad.vblora.push(m);
    }
    ad.vblora_bank = Some(bank);
    Ok(())
}

/// RandLoRA's shared bases over `sites` (PEFT's `_find_dim`: the
/// element-wise largest `[out, in]`), unit-variance uniform values, and
/// each site's `lambda = 0`, `gamma = 1 / max(in, out)`, the bases'
/// copies saved with each module as PEFT saves them.
fn init_randlora(ad: &mut HfAdapter, sites: Vec<Site<'_>>, r: usize, rng: &mut Rng) -> Result<(), HfError> {
    let (o, i) = sites.iter().fold((0, 0), |(o, i), s| (o.max(s.weight.rows), i.max(s.weight.cols)));
    let (min_dim, max_dim) = (o.min(i), o.max(i));
    let n_b = min_dim.div_ceil(r.max(1));
    let bound = 3f64.sqrt();
    let mut draw = |n: usize| (0..n).map(|_| rng.uniform_range(-bound, bound) as f32).collect::<Vec<f32>>();
    let (a, b) = (draw(r * min_dim), draw(max_dim * n_b * r));
    let shared = RandLoraShared { a, b, a_shape: [r, 1, min_dim], b_shape: [max_dim, n_b, r], dtypes: [Dtype::F32; 2] };
    let bases = shared.bases()?;
    for s in sites {
        let (n_out, n_in) = (s.weight.rows, s.weight.cols);
        let mn = n_in.min(n_out);
        let nb = mn.div_ceil(r.max(1));
        let (lambda, gamma) = (vec![0.0f32; r * nb], vec![1.0 / n_in.max(n_out) as f32; nb * mn]);
        let (lambda_shape, gamma_shape, dtypes) = ([r, nb], [nb, mn], [Dtype::F32; 2]);
        let scaling = 20.0;
        let m =
            RandLoraModule { name: s.name, lambda, gamma, lambda_shape, gamma_shape, scaling, copies: true, dtypes };
        m.layer(&bases, n_in, n_out)?;
        ad.randlora.push(m);
    }
    ad.randlora_bases = Some(shared);
    Ok(())
}

/// Prompt tuning: `n` rows of the embedding table sampled at random
/// (`SAMPLE_VOCAB`).
fn init_prompt(model: &Llama, n: usize, rng: &mut Rng) -> Result<HfTensor, HfError> {
    let c = &model.config;
    let d = c.hidden_size;
    let mut table = vec![0.0f32; c.vocab_size * d];
    peft_core::storage::dequantize(&model.embed.view()?, &mut table)?;
    let mut p = vec![0.0f32; n * d];
    PromptTuning::new(&mut p, n, d)?.init_sample_vocab(MatRef::new(&table, c.vocab_size, d)?, rng)?;
    Ok(HfTensor { name: "prompt_embeddings".into(), dtype: Dtype::F32, shape: vec![n, d], data: p })
}

/// An adapter being trained: a PEFT one, or bottleneck adapters.
#[derive(Clone, Debug)]
pub enum Trainable {
    /// A PEFT method (the tensors PEFT's folders hold).
    Peft(Box<HfAdapter>),
    /// Bottleneck adapters.
    Bottleneck(Bottleneck),
}

impl Trainable {
    /// The adapter placed on `model`.
    ///
    /// # Errors
    /// As [`LlamaAdapter::new`] and [`LlamaAdapter::bottleneck`].
    pub fn hosted<'a>(&'a self, model: &Llama) -> Result<LlamaAdapter<'a>, HfError> {
        match self {
            Trainable::Peft(a) => LlamaAdapter::new(model, a),
            Trainable::Bottleneck(b) => LlamaAdapter::bottleneck(model, b),
        }
    }

    /// Every trainable tensor, in [`LlamaGrads::flatten`]'s order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        match self {
            Trainable::Peft(a) => tensors_mut(a),
            Trainable::Bottleneck(b) => b
                .sites
                .iter_mut()
                .flat_map(|s| s.iter_mut())
                .flat_map(|t| [&mut t.w_down, &mut t.b_down, &mut t.w_up, &mut t.b_up])
                .collect(),
        }
    }

    /// Trainable parameters.
    pub fn num_params(&mut self) -> usize {
        self.tensors_mut().iter().map(|t| t.len()).sum()
    }
}

/// Every trainable tensor of `ad` in [`LlamaGrads::flatten`]'s order
/// (VeRA's shared projections are frozen, not listed).
pub fn tensors_mut(ad: &mut HfAdapter) -> Vec<&mut Vec<f32>> {
    if let Some(p) = ad.prompt.as_mut() {
        return vec![&mut p.data];
    }
    if let (PeftConfig::TrainableTokens(_), [m]) = (&ad.config, &mut ad.trainable_tokens[..]) {
        return vec![&mut m.rows];
    }
    if !ad.ln_tuning.is_empty() {
        // Per layer, input then post-attention norm; `model.norm` last.
        let order = |name: &str| locate_norm(name, usize::MAX).unwrap_or((usize::MAX, usize::MAX));
        let mut norms: Vec<_> = ad.ln_tuning.iter_mut().collect();
        norms.sort_by_key(|m| order(&m.name));
        return norms.into_iter().flat_map(|m| m.params.iter_mut().map(|t| &mut t.data)).collect();
    }
    // By module name, in (layer, projection) order.
    let mut named: Vec<(String, Vec<&mut Vec<f32>>)> = Vec::new();
    for m in &mut ad.modules {
        let mut v = vec![&mut m.a, &mut m.b];
        if let Some(mag) = m.magnitude.as_mut() {
            v.push(mag);
        }
        named.push((m.name.clone(), v));
    }
    for m in &mut ad.ia3 {
        named.push((m.name.clone(), vec![&mut m.l]));
    }
    for m in &mut ad.loha {
        named.push((m.name.clone(), m.factors.iter_mut().collect()));
    }
    for m in &mut ad.lokr {
        named.push((m.name.clone(), m.w1.iter_mut().chain(m.w2.iter_mut()).collect()));
    }
    for m in &mut ad.vera {
        named.push((m.name.clone(), vec![&mut m.lambda_d, &mut m.lambda_b]));
    }
    for m in &mut ad.adalora {
        named.push((m.name.clone(), vec![&mut m.a, &mut m.e, &mut m.b]));
    }
    for m in &mut ad.miss {
        named.push((m.name.clone(), vec![&mut m.d]));
    }
    for m in &mut ad.hra {
        named.push((m.name.clone(), vec![&mut m.u]));
    }
    for m in &mut ad.oft {
        named.push((m.name.clone(), vec![&mut m.v]));
    }
    for m in &mut ad.vblora {
        named.push((m.name.clone(), vec![&mut m.logits_a, &mut m.logits_b]));
    }
    for m in &mut ad.randlora {
        named.push((m.name.clone(), vec![&mut m.lambda, &mut m.gamma]));
    }
    for m in &mut ad.fourierft {
        named.push((m.name.clone(), vec![&mut m.spectrum]));
    }
    for m in &mut ad.boft {
        named.push((m.name.clone(), vec![&mut m.r, &mut m.s]));
    }
    for m in &mut ad.shira {
        named.push((m.name.clone(), vec![&mut m.weight]));
    }
    for m in &mut ad.c3a {
        named.push((m.name.clone(), vec![&mut m.kernel]));
    }
    for m in &mut ad.road {
        named.push((m.name.clone(), vec![&mut m.theta, &mut m.alpha]));
    }
    let key = |name: &str| {
        let rest = name.strip_prefix("model.layers.").unwrap_or(name);
        let (l, proj) = rest.split_once('.').unwrap_or((rest, ""));
        (l.parse::<usize>().unwrap_or(usize::MAX), PROJECTIONS.iter().position(|p| *p == proj).unwrap_or(usize::MAX))
    };
    named.sort_by_key(|(n, _)| key(n));
    named.into_iter().flat_map(|(_, v)| v).collect()
}

impl LlamaGrads {
    /// Every buffer, in order: the prompt or prefix table; or per layer,
    /// per projection, the module's tensors; or per layer, per site, the
    /// bottleneck adapter's four.
    pub fn flatten(&self) -> Vec<&Vec<f32>> {
        match self {
            LlamaGrads::Prompt(g) | LlamaGrads::Prefix(g) | LlamaGrads::Tokens(g) => vec![g],
            LlamaGrads::Modules(layers) => layers.iter().flat_map(|p| p.iter().flatten().flatten()).collect(),
            LlamaGrads::Bottleneck(layers) => layers.iter().flat_map(|s| s.iter().flatten()).collect(),
            LlamaGrads::Norms { layers, last } => layers.iter().flatten().chain(Some(last)).flatten().collect(),
        }
    }

    /// Sets every buffer to zero.
    pub fn zero(&mut self) {
        match self {
            LlamaGrads::Prompt(g) | LlamaGrads::Prefix(g) | LlamaGrads::Tokens(g) => g.fill(0.0),
            LlamaGrads::Modules(layers) => {
                layers.iter_mut().flat_map(|p| p.iter_mut().flatten().flatten()).for_each(|g| g.fill(0.0))
            }
            LlamaGrads::Bottleneck(layers) => {
                layers.iter_mut().flat_map(|s| s.iter_mut().flatten()).for_each(|g| g.fill(0.0))
            }
            LlamaGrads::Norms { layers, last } => {
                layers.iter_mut().flatten().chain(Some(last)).flatten().for_each(|g| g.fill(0.0))
            }
        }
    }
}

/// One sequence of the task.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// The teacher's next-token probabilities `[len, vocab]`.
    pub probs: Vec<f32>,
}

/// The built-in task: match a teacher's next-token distributions on
/// random token sequences (train and held-out sets from different seeds).
/// The teacher reads a hidden `context` before every sequence (its rows
/// are the sequence's); with the frozen model as the teacher, the frozen
/// model has something to learn (the context's effect), prompt and prefix
/// tuning can represent it exactly, and the weight-adapting methods
/// approximate it. The loss of a row is `KL(teacher || student)`; the
/// task's loss is the mean over rows (prompt tuning's virtual rows
/// excluded).
#[derive(Clone, Debug)]
pub struct Distill {
    /// The training sequences and the teacher's probabilities.
    pub train: Vec<Example>,
    /// The same for the held-out sequences.
    pub held_out: Vec<Example>,
}

/// `softmax` of each row of `logits` (`vocab` wide), in f64, rounded once.
fn softmax_rows(logits: &[f32], vocab: usize) -> Vec<f32> {
    let (mut out, mut e) = (vec![0.0f32; logits.len()], Vec::new());
    for (z, p) in logits.chunks_exact(vocab).zip(out.chunks_exact_mut(vocab)) {
        let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum = super::exp::exp_shifted(z, max, &mut e);
        p.iter_mut().zip(&e).for_each(|(p, e)| *p = (e / sum) as f32);
    }
    out
}

/// `mean_rows KL(p || softmax(z))` over the rows of `logits` after `skip`,
/// `p` the teacher's rows; with `grad` (`[rows, vocab]`), `dL/dz = (softmax(z)
/// - p) / rows` there (zero on the skipped rows).
pub fn kl_loss(logits: &[f32], teacher: &[f32], vocab: usize, skip: usize, mut grad: Option<&mut [f32]>) -> f64 {
    if let Some(g) = grad.as_deref_mut() {
        g.fill(0.0);
    }
    let rows = teacher.len() / vocab.max(1);
    let (mut total, mut e) = (0.0f64, Vec::new());
    for (i, p) in teacher.chunks_exact(vocab).enumerate() {
        let r = skip + i;
        let Some(z) = logits.get(r * vocab..(r + 1) * vocab) else { continue };
        let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum = super::exp::exp_shifted(z, max, &mut e);
        let log_sum = f64::from(max) + sum.ln();
        for (&pk, &zk) in p.iter().zip(z) {
            if pk > 0.0 {
                total += f64::from(pk) * (f64::from(pk).ln() - (f64::from(zk) - log_sum));
            }
        }
        if let Some(g) = grad.as_deref_mut().and_then(|g| g.get_mut(r * vocab..(r + 1) * vocab)) {
            for ((gk, ek), &pk) in g.iter_mut().zip(&e).zip(p) {
                *gk = ((ek / sum - f64::from(pk)) / rows as f64) as f32;
            }
        }
    }
    total / rows.max(1) as f64
}

impl Distill {
    /// `n_train` and `n_held_out` sequences of `len` random tokens (seeds
    /// `seed` and `seed + 1`) and the teacher's distributions on them,
    /// each read after `context`.
    ///
    /// # Errors
    /// The teacher's forward errors.
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: Backend<f32> + ?Sized>(
        backend: &B,
        teacher: &Llama,
        context: &[u32],
        len: usize,
        n_train: usize,
        n_held_out: usize,
        seed: u64,
    ) -> Result<Self, HfError> {
        let vocab = teacher.config.vocab_size;
        let set = |n: usize, seed: u64| -> Result<Vec<Example>, HfError> {
            let mut rng = Rng::new(seed);
            (0..n)
                .map(|_| {
                    let ids: Vec<u32> = (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
                    let full: Vec<u32> = context.iter().chain(&ids).copied().collect();
                    let logits = teacher.forward(backend, &full, None, &mut super::KvCache::new())?;
                    Ok(Example { ids, probs: softmax_rows(&logits[context.len() * vocab..], vocab) })
                })
                .collect()
        };
        Ok(Self { train: set(n_train, seed)?, held_out: set(n_held_out, seed.wrapping_add(1))? })
    }

    /// The mean loss of `model` with `adapter` over the held-out set.
    ///
    /// # Errors
    /// The forward's errors.
    pub fn held_out_loss<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        model: &Llama,
        adapter: Option<&Trainable>,
    ) -> Result<f64, HfError> {
        let hosted = adapter.map(|a| a.hosted(model)).transpose()?;
        let vocab = model.config.vocab_size;
        let mut total = 0.0;
        for Example { ids, probs: p } in &self.held_out {
            let logits = model.forward(backend, ids, hosted.as_ref(), &mut super::KvCache::new())?;
            total += kl_loss(&logits, p, vocab, logits.len() / vocab - ids.len(), None);
        }
        Ok(total / self.held_out.len().max(1) as f64)
    }
}

/// AdamW over an adapter's tensors, with their optimizer state.
#[derive(Debug)]
pub struct Trainer {
    /// The optimizer (its step count).
    pub opt: AdamW,
    state: Vec<Vec<f32>>,
}

impl Trainer {
    /// A trainer with learning rate `lr` (AdamW's other defaults).
    pub fn new(lr: f64) -> Self {
        Self::with_optimizer(AdamW::new(lr))
    }

    /// A trainer with this optimizer.
    pub fn with_optimizer(opt: AdamW) -> Self {
        Self { opt, state: Vec::new() }
    }

    /// Bytes of optimizer state (f32), once a step has run.
    pub fn state_bytes(&self) -> usize {
        self.state.iter().map(|s| 4 * s.len()).sum()
    }

    /// One step over a batch of `task.train` (indices `batch`): the mean
    /// loss's gradient through the adapter's tensors, then AdamW. Returns
    /// the batch's mean loss.
    ///
    /// # Errors
    /// The forward and backward passes' errors, AdamW's.
    pub fn step<B: Backend<f32> + ?Sized>(
        &mut self,
        backend: &B,
        model: &Llama,
        adapter: &mut Trainable,
        task: &Distill,
        batch: &[usize],
    ) -> Result<f64, HfError> {
        let vocab = model.config.vocab_size;
        let (loss, grads) = {
            let hosted = adapter.hosted(model)?;
            let mut grads = LlamaGrads::zeros(&hosted);
            let mut trace = Trace::default();
            let mut loss = 0.0;
            for &i in batch {
                let Example { ids, probs: p } = &task.train[i % task.train.len().max(1)];
                let logits = model.forward_traced(backend, ids, Some(&hosted), &mut trace)?;
                let mut dl = vec![0.0f32; logits.len()];
                loss += kl_loss(&logits, p, vocab, trace.virtual_rows(), Some(&mut dl));
                let w = 1.0 / batch.len().max(1) as f32;
                dl.iter_mut().for_each(|g| *g *= w);
                model.backward(backend, Some(&hosted), &trace, &dl, Some(&mut grads))?;
            }
            (loss / batch.len().max(1) as f64, grads)
        };
        self.apply(adapter, &grads, loss)?;
        Ok(loss)
    }

    /// AdamW over `adapter`'s tensors with gradients `grads` (of the same
    /// adapter, [`LlamaGrads::zeros`] then accumulated); `loss` is the
    /// step's loss, refused when not finite.
    ///
    /// # Errors
    /// [`HfError::Config`] (`adapter`) when the tensors and gradients
    /// disagree; AdamW's errors (nothing is written then).
    pub fn apply(&mut self, adapter: &mut Trainable, grads: &LlamaGrads, loss: f64) -> Result<(), HfError> {
        let flat = grads.flatten();
        let mut params = adapter.tensors_mut();
        if params.len() != flat.len() {
            return Err(HfError::Config { field: "adapter".into(), reason: "tensors and gradients disagree".into() });
        }
        if self.state.len() != params.len() {
            self.state = params.iter().map(|p| vec![0.0f32; self.opt.state_len(p.len())]).collect();
        }
        let mut slots: Vec<Slot<'_, f32>> = params
            .iter_mut()
            .zip(&flat)
            .zip(self.state.iter_mut())
            .map(|((p, g), s)| Slot { param: &mut p[..], grad: &g[..], state: &mut s[..], decay: false })
            .collect();
        self.opt.step(&mut slots, Some(loss))?;
        Ok(())
    }

    /// The optimizer state, one vector per adapter tensor (empty before
    /// the first step): what a checkpoint saves.
    pub fn state(&self) -> &[Vec<f32>] {
        &self.state
    }

    /// Restores a checkpoint's state and step count.
    pub fn restore(&mut self, state: Vec<Vec<f32>>, steps: u64) {
        self.state = state;
        self.opt.set_steps(steps);
    }
}
