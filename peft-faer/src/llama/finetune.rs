//! `peft finetune`'s task, as a library: every method of
//! [`METHODS`] trained on a frozen Llama with
//! PEFT's initialization and defaults, saved, read back, merged through
//! `peft merge`, and measured. The command only parses its arguments and
//! prints a [`FinetuneReport`].
//!
//! The task is [`Distill`]: the teacher is the frozen model reading a
//! hidden context of [`CONTEXT`] random tokens before every sequence, and
//! the student (the model with the adapter) must match its next-token
//! distributions without that context. The loss is the mean KL divergence
//! per token over [`HELD_OUT`] held-out sequences of [`SEQ`] tokens.

use std::path::{Path, PathBuf};
use std::time::Instant;

use peft_core::activation::Activation;
use peft_core::adapter::AdapterConfig;
use peft_core::method::{METHODS, MethodSpec};
use peft_core::optim::AdamW;

use super::train::{Distill, MethodSetup, Trainable, Trainer, init_adapter};
use super::{Bottleneck, KvCache, Llama, LlamaConfig};
use crate::Faer;
use crate::hf::base::Base;
use crate::hf::merge::{MergeOptions, merge_many};
use crate::hf::{HfAdapter, HfError, PeftConfig};

/// Sequences per optimizer step.
pub const BATCH: usize = 8;
/// Tokens per training sequence.
pub const SEQ: usize = 16;
/// Tokens of the hidden context the teacher reads.
pub const CONTEXT: usize = 8;
/// Training sequences.
pub const TRAIN: usize = 64;
/// Held-out sequences.
pub const HELD_OUT: usize = 32;

/// What `peft finetune` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The methods, in order (default: every one of
    /// [`METHODS`]).
    pub methods: Vec<&'static MethodSpec>,
    /// Optimizer steps per method (batches of [`BATCH`] sequences).
    pub steps: usize,
    /// Rank of LoRA, DoRA, LoHa and LoKr (alpha = 2 r); VeRA's shared
    /// projections get `8 r`.
    pub rank: usize,
    /// Seed of the frozen model, the task and the adapters.
    pub seed: u64,
    /// Threads per matrix product.
    pub threads: usize,
    /// One learning rate for every method (default: each method's own).
    pub lr: Option<f64>,
    /// Output folder: `model/` (unless `model`), `<method>/` (PEFT
    /// folders), `adapter.safetensors`.
    pub out: PathBuf,
    /// A Hugging Face `LlamaForCausalLM` folder to train on (default: a
    /// small Llama from `seed`, saved to `out/model`).
    pub model: Option<PathBuf>,
    /// Replace outputs that exist; without it, [`setup`] refuses them
    /// before anything is trained.
    pub force: bool,
}

/// One method's results.
#[derive(Clone, Debug)]
pub struct MethodRun {
    /// The method.
    pub method: &'static MethodSpec,
    /// Trainable parameters.
    pub params: usize,
    /// The frozen model's parameters.
    pub base_params: usize,
    /// Optimizer state (bytes).
    pub state_bytes: usize,
    /// Learning rate.
    pub lr: f64,
    /// Held-out loss before training.
    pub initial: f64,
    /// Held-out loss after training.
    pub final_loss: f64,
    /// Training time.
    pub seconds: f64,
    /// Largest logit difference between the adapter and the model merged
    /// by `peft merge` (methods that merge).
    pub merge_diff: Option<f32>,
    /// The saved adapter (folder or file).
    pub file: PathBuf,
    /// Its bytes.
    pub file_bytes: u64,
    /// Whether the saved adapter, read back, gives the same logits bit for
    /// bit.
    pub reload_identical: bool,
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct FinetuneReport {
    /// The frozen model's configuration.
    pub config: LlamaConfig,
    /// Its parameters.
    pub frozen_params: usize,
    /// Its folder (what `peft merge` and `peft forward` read).
    pub model_dir: PathBuf,
    /// The frozen model's held-out loss (no adapter).
    pub base_loss: f64,
    /// One entry per method.
    pub runs: Vec<MethodRun>,
    /// Whether the frozen model is bit-identical after all the training.
    pub base_identical: bool,
}

impl FinetuneReport {
    /// Every check passed: the base unchanged, every reload exact and
    /// every method below its starting loss.
    pub fn ok(&self) -> bool {
        self.base_identical && self.runs.iter().all(|r| r.reload_identical && r.final_loss < r.initial)
    }
}

/// The default model of `peft finetune`: a small Llama with grouped-query
/// attention (hidden 64, 2 layers, 4 heads sharing 2 key/value heads,
/// SwiGLU width 128, vocabulary 64).
///
/// # Errors
/// None in practice (the configuration is fixed); [`HfError::Config`] if
/// its parse ever fails.
pub fn default_llama() -> Result<LlamaConfig, HfError> {
    LlamaConfig::parse(
        r#"{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}"#,
    )
}

/// The greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Each method's trainable for `peft finetune`, PEFT's defaults for Llama
/// models where PEFT has them: LoRA, DoRA, LoHa, LoKr and AdaLoRA (`init_r = r`) on `q_proj` and
/// `v_proj` with `alpha = 2 r`; (IA)^3 on `k_proj`, `v_proj` and the input
/// of `down_proj` (PEFT's Llama targets); VeRA on `q_proj`, `v_proj` at
/// rank `8 r`; MiSS (balance) on `q_proj`, `v_proj` with shard size `r`;
/// HRA on `q_proj`, `v_proj` with `r` reflections (rounded up to even, for
/// PEFT's identity init); RoAd (road_1) on `q_proj`, `v_proj` in groups of
/// 64 or the largest divisor of both outputs below it; C3A on `q_proj`,
/// `v_proj` in blocks of 256 or the largest divisor of their shapes below
/// it, starting from zero; SHiRA on `q_proj`, `v_proj` at `r (in + out)`
/// random positions; OFT on `q_proj`, `v_proj` with PEFT's `r` = `rank`
/// blocks (Cayley-Neumann, 5 terms); BOFT on `q_proj`, `v_proj` in blocks
/// of `rank` (one factor, as PEFT trains on a CPU); FourierFT on `q_proj`,
/// `v_proj` with PEFT's 1000 frequencies (at most a quarter of a
/// projection's weights), a zero spectrum; RandLoRA on `q_proj`, `v_proj`
/// with bases of rank `rank` (`alpha = 20 r`); VB-LoRA on `q_proj`,
/// `v_proj` at rank `rank` over 256 vectors (of length 256 or the largest
/// divisor of the projections' shapes below it), top 2, the bank frozen;
/// bottleneck adapters of width 16 (GELU); prompt and prefix
/// tuning with [`CONTEXT`] virtual tokens. `None` for a method this
/// function does not know (the registry test catches that).
///
/// # Errors
/// As [`init_adapter`] and [`Bottleneck::new`].
pub fn trainable(model: &Llama, method: &MethodSpec, rank: usize, seed: u64) -> Result<Option<Trainable>, HfError> {
    let qv = || vec!["q_proj".to_string(), "v_proj".to_string()];
    let (r, alpha) = (rank, 2.0 * rank as f64);
    let m = match method.name {
        "lora" => MethodSetup::Lora { r, alpha, dora: false, targets: qv() },
        "dora" => MethodSetup::Lora { r, alpha, dora: true, targets: qv() },
        "ia3" => MethodSetup::Ia3 {
            targets: vec!["k_proj".into(), "v_proj".into(), "down_proj".into()],
            feedforward: vec!["down_proj".into()],
        },
        "loha" => MethodSetup::Loha { r, alpha, targets: qv() },
        "lokr" => MethodSetup::Lokr { r, alpha, targets: qv() },
        "vera" => MethodSetup::Vera { r: 8 * r, targets: qv() },
        "adalora" => MethodSetup::AdaLora { init_r: r, alpha, targets: qv() },
        "miss" => MethodSetup::Miss { r, targets: qv() },
        "hra" => MethodSetup::Hra { r: 2 * r.div_ceil(2), targets: qv() },
        "shira" => MethodSetup::Shira { r, targets: qv() },
        "oft" => MethodSetup::Oft { r, targets: qv() },
        "randlora" => MethodSetup::RandLora { r, targets: qv() },
        "vblora" => {
            // PEFT's vectors of 256, cut to a length that divides q_proj's and v_proj's shapes.
            let c = &model.config;
            let len = [c.num_heads * c.head_dim, c.kv_width(), c.hidden_size].into_iter().fold(256, gcd);
            MethodSetup::VbLora { r, len, targets: qv() }
        }
        // PEFT's default 1000 frequencies, cut to a quarter of the smaller projection's weights.
        "fourierft" => {
            let c = &model.config;
            MethodSetup::FourierFt { n: 1000.min(c.hidden_size * c.kv_width() / 4), targets: qv() }
        }
        // One factor in blocks of `rank` (cut to divide the hidden size).
        "boft" => MethodSetup::Boft { block: gcd(r, model.config.hidden_size), targets: qv() },
        "c3a" => {
            // PEFT's default blocks of 256, cut to a size that divides q_proj's and v_proj's shapes.
            let c = &model.config;
            let block = [c.num_heads * c.head_dim, c.kv_width(), c.hidden_size].into_iter().fold(256, gcd);
            MethodSetup::C3a { block, targets: qv() }
        }
        "road" => {
            // PEFT's default groups of 64, cut to a size that divides q_proj's and v_proj's outputs.
            let c = &model.config;
            MethodSetup::Road { group: gcd(gcd(64, c.num_heads * c.head_dim), c.kv_width()), targets: qv() }
        }
        "adapter" => {
            let config = AdapterConfig::width(16).with_activation(Activation::GeluErf);
            return Ok(Some(Trainable::Bottleneck(Bottleneck::new(model, config, seed)?)));
        }
        // PEFT's default LN tuning targets for Llama: every norm.
        "ln_tuning" => MethodSetup::LnTuning {
            targets: ["input_layernorm", "post_attention_layernorm", "norm"].map(String::from).to_vec(),
        },
        // Rows of the first 16 r tokens of the vocabulary (the task's
        // sequences draw every token alike).
        "trainable_tokens" => {
            MethodSetup::TrainableTokens { tokens: (0..(16 * rank).min(model.config.vocab_size) as u32).collect() }
        }
        "prompt" => MethodSetup::Prompt { n: CONTEXT },
        "prefix" => MethodSetup::Prefix { n: CONTEXT },
        _ => return Ok(None),
    };
    Ok(Some(Trainable::Peft(Box::new(init_adapter(model, &m, seed)?))))
}

/// The logits of every held-out sequence, concatenated.
fn held_out_logits(
    model: &Llama,
    adapter: Option<&Trainable>,
    task: &Distill,
    backend: &Faer,
) -> Result<Vec<f32>, HfError> {
    let hosted = adapter.map(|a| a.hosted(model)).transpose()?;
    let mut all = Vec::new();
    for ex in &task.held_out {
        all.extend(model.forward(backend, &ex.ids, hosted.as_ref(), &mut KvCache::new())?);
    }
    Ok(all)
}

/// Bytes of a file, or of the files of a folder.
fn bytes_of(path: &Path) -> u64 {
    match std::fs::read_dir(path) {
        Ok(dir) => dir.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum(),
        Err(_) => std::fs::metadata(path).map_or(0, |m| m.len()),
    }
}

/// Where `method`'s trained adapter is written under `out`: a PEFT folder
/// `out/<name>`, or, for a method PEFT does not have (the bottleneck
/// adapters), this crate's file `out/<name>.safetensors`.
fn adapter_path(out: &Path, method: &MethodSpec) -> PathBuf {
    match method.peft_type {
        Some(_) => out.join(method.name),
        None => out.join(format!("{}.safetensors", method.name)),
    }
}

/// Saves the trained adapter (a PEFT folder, or this crate's bottleneck
/// file) at [`adapter_path`] and reads it back.
fn save_and_reload(
    adapter: &Trainable,
    method: &MethodSpec,
    options: &Options,
) -> Result<(PathBuf, Trainable), HfError> {
    let path = adapter_path(&options.out, method);
    let reloaded = match adapter {
        Trainable::Peft(ad) => {
            ad.write_dir(&path, options.force)?;
            Trainable::Peft(Box::new(HfAdapter::read_dir(&path)?))
        }
        Trainable::Bottleneck(b) => {
            b.save(&path, options.force)?;
            Trainable::Bottleneck(Bottleneck::load(&path)?)
        }
    };
    Ok((path, reloaded))
}

/// `peft merge` of the saved folder into the saved model, and the largest
/// logit difference from `unmerged` (the methods that merge).
fn merge_diff(
    adapter: &Trainable,
    file: &Path,
    base_dir: &Path,
    unmerged: &[f32],
    task: &Distill,
    backend: &Faer,
) -> Result<Option<f32>, HfError> {
    let Trainable::Peft(ad) = adapter else { return Ok(None) };
    // A GGUF base is not merged here: `peft merge` writes safetensors
    // checkpoints (the adapter itself runs over the GGUF unmerged).
    if matches!(ad.config, PeftConfig::Prompt(_)) || crate::llama::gguf::is_gguf(base_dir) {
        return Ok(None);
    }
    let name = file.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    // The merged model lives in a temporary folder that is never committed:
    // removed when this returns, by the signal handler on SIGINT/SIGTERM,
    // and (if the process was killed) by the next run's outputs in `out`.
    let scratch = crate::files::Staging::dir(&file.with_file_name(format!("{name}-merge-check")))?;
    // A single-file base merges into a file; a sharded one into a folder of
    // shards and its index (`merge_many`), which `Llama::load` opens alike.
    let merged_out = scratch.path().join("model.safetensors");
    let base = Base::open(base_dir)?;
    let saved = HfAdapter::read_dir(file)?;
    let options = MergeOptions { force: true, ..Default::default() };
    merge_many(&base, &[(&saved, 1.0)], &merged_out, &options, backend, |_| {})?;
    let merged = Llama::load(&base_dir.join("config.json"), &merged_out)?;
    drop(scratch);
    let merged = held_out_logits(&merged, None, task, backend)?;
    Ok(Some(unmerged.iter().zip(&merged).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max)))
}

/// Trains one method for `options.steps` steps; `progress(step, loss)`
/// after each.
///
/// # Errors
/// As the trainer, the writers and the merge; [`HfError::Config`]
/// (`method`) for a method [`trainable`] does not know.
pub fn run_method(
    model: &Llama,
    base_dir: &Path,
    task: &Distill,
    method: &'static MethodSpec,
    options: &Options,
    backend: &Faer,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<MethodRun, HfError> {
    let unknown = || HfError::Config { field: "method".into(), reason: format!("{} has no trainer", method.name) };
    let mut adapter = trainable(model, method, options.rank, options.seed ^ 0xada)?.ok_or_else(unknown)?;
    let lr = options.lr.unwrap_or(method.default_lr());
    let mut trainer = Trainer::with_optimizer(AdamW::new(lr).with_weight_decay(0.0).with_max_grad_norm(Some(1.0)));
    let initial = task.held_out_loss(backend, model, Some(&adapter))?;
    let start = Instant::now();
    for step in 0..options.steps {
        let batch: Vec<usize> = (0..BATCH).map(|i| step * BATCH + i).collect();
        let loss = trainer.step(backend, model, &mut adapter, task, &batch)?;
        progress(step, loss);
    }
    let seconds = start.elapsed().as_secs_f64();
    let final_loss = task.held_out_loss(backend, model, Some(&adapter))?;
    let unmerged = held_out_logits(model, Some(&adapter), task, backend)?;
    let (file, reloaded) = save_and_reload(&adapter, method, options)?;
    let again = held_out_logits(model, Some(&reloaded), task, backend)?;
    let reload_identical =
        again.len() == unmerged.len() && again.iter().zip(&unmerged).all(|(a, b)| a.to_bits() == b.to_bits());
    let merge_diff = merge_diff(&adapter, &file, base_dir, &unmerged, task, backend)?;
    Ok(MethodRun {
        method,
        params: adapter.num_params(),
        base_params: model.num_params(),
        state_bytes: trainer.state_bytes(),
        lr,
        initial,
        final_loss,
        seconds,
        merge_diff,
        file_bytes: bytes_of(&file),
        file,
        reload_identical,
    })
}

/// The frozen model (`options.model`, a Hugging Face folder or a `.gguf`
/// file, or the default small Llama saved to `out/model`) and its path,
/// and the task from `options.seed`. A GGUF model trains in its stored
/// blocks (QLoRA's setting: the adapter's gradients flow through the
/// quantized base, which is never dequantized whole or written).
///
/// # Errors
/// As [`Llama::open`], [`Llama::save_dir`] and [`Distill::new`].
pub fn setup(options: &Options, backend: &Faer) -> Result<(Llama, PathBuf, Distill), HfError> {
    if !options.force {
        // Every output the run will write, refused before any training.
        let model = options.model.is_none().then(|| options.out.join("model"));
        let adapters = options.methods.iter().map(|m| adapter_path(&options.out, m));
        if let Some(p) = model.into_iter().chain(adapters).find(|p| p.symlink_metadata().is_ok()) {
            return Err(HfError::OutputExists(p));
        }
    }
    std::fs::create_dir_all(&options.out).map_err(|e| HfError::Io(options.out.clone(), e))?;
    let (model, base_dir) = match &options.model {
        Some(path) => (Llama::open(path)?, path.clone()),
        None => {
            let model = Llama::random(default_llama()?, options.seed);
            let dir = options.out.join("model");
            model.save_dir(&dir, options.force)?;
            (model, dir)
        }
    };
    let vocab = model.config.vocab_size as u64;
    let mut rng = peft_core::Rng::new(options.seed ^ 0xc0de);
    let context: Vec<u32> = (0..CONTEXT).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let task = Distill::new(backend, &model, &context, SEQ, TRAIN, HELD_OUT, options.seed)?;
    Ok((model, base_dir, task))
}

/// Trains every method of `options` on `task` over `model` (whose folder
/// is `model_dir`); `progress(method, step, loss)` after each step.
///
/// # Errors
/// As [`run_method`].
pub fn train_all(
    model: &Llama,
    model_dir: &Path,
    task: &Distill,
    options: &Options,
    backend: &Faer,
    progress: &mut dyn FnMut(&MethodSpec, usize, f64),
) -> Result<FinetuneReport, HfError> {
    let frozen = model.clone();
    let base_loss = task.held_out_loss(backend, model, None)?;
    let mut runs = Vec::new();
    for &method in &options.methods {
        let mut each = |step: usize, loss: f64| progress(method, step, loss);
        runs.push(run_method(model, model_dir, task, method, options, backend, &mut each)?);
    }
    Ok(FinetuneReport {
        config: model.config.clone(),
        frozen_params: model.num_params(),
        model_dir: model_dir.to_path_buf(),
        base_loss,
        runs,
        // Bit for bit: a NaN weight is not a change (`==` would say so).
        base_identical: model.bit_identical(&frozen),
    })
}

/// [`setup`], then [`train_all`].
///
/// # Errors
/// As those.
pub fn finetune(
    options: &Options,
    progress: &mut dyn FnMut(&MethodSpec, usize, f64),
) -> Result<FinetuneReport, HfError> {
    let backend = Faer::with_threads(options.threads);
    let (model, model_dir, task) = setup(options, &backend)?;
    train_all(&model, &model_dir, &task, options, &backend, progress)
}

/// Every method `peft finetune` trains: [`METHODS`], in order.
pub fn all_methods() -> Vec<&'static MethodSpec> {
    METHODS.iter().collect()
}
