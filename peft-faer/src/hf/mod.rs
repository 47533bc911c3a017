//! Hugging Face PEFT interoperability: adapter directories
//! (`adapter_config.json` + `adapter_model.safetensors`) read and written
//! exactly, base checkpoints (one `.safetensors` file or a sharded folder
//! with `model.safetensors.index.json`), a streaming merge, and conversion
//! to and from this crate's own adapter format.
//!
//! Tensor keys are accepted with or without the `base_model.model.` prefix
//! and with or without an adapter name (`lora_A.default.weight`); they are
//! written as PEFT 0.21 writes them (`base_model.model.<module>.lora_A.weight`,
//! `A [r, in]`, `B [out, r]`, safetensors metadata `{"format": "pt"}`).

pub mod base;
pub mod combine;
pub mod config;
pub mod convert;
pub mod merge;
pub mod st;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use peft_core::lora::config::module_matches;
use safetensors::Dtype;

pub use config::{
    BiasMode, HfLoraConfig, Ia3Config, LohaConfig, LokrConfig, PeftConfig, PromptConfig, Targets, VeraConfig,
};
use st::{OutEntry, StFile};

use crate::files::OutputError;

/// Everything that can be wrong with PEFT files and checkpoints.
#[derive(Debug)]
pub enum HfError {
    /// A file-system error on a path.
    Io(PathBuf, std::io::Error),
    /// Invalid JSON (config or index).
    Json(String),
    /// A config field is missing or has the wrong type or value.
    Config {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A feature whose math this crate does not implement; the message
    /// names the field or tensor.
    Unsupported(String),
    /// A malformed safetensors file.
    Safetensors(PathBuf, String),
    /// A safetensors header names a tensor twice.
    DuplicateKey(PathBuf, String),
    /// A tensor the adapter or config needs is absent, or one is
    /// unexpected.
    Tensor(String),
    /// The rank in the tensors differs from the config's.
    RankMismatch {
        /// Module name.
        module: String,
        /// Rank from `r` / `rank_pattern`.
        config: usize,
        /// Rank of the tensors.
        tensors: usize,
    },
    /// An adapted module's base weight is missing or has another shape.
    Base(String),
    /// The index names a shard that is not there.
    MissingShard(PathBuf),
    /// The output already exists (a sharded output is a new folder).
    OutputExists(PathBuf),
    /// `peft-core` rejected a value.
    Core(peft_core::Error),
    /// The compute backend failed (its own error, printed, and its kind).
    Backend(String, peft_core::ErrorKind),
    /// Writing the output would replace or delete an input.
    OutputIsInput {
        /// The output.
        output: PathBuf,
        /// The input.
        input: PathBuf,
    },
    /// A merged value is NaN or infinite (refused unless allowed).
    NonFinite {
        /// The tensor.
        tensor: String,
        /// The first bad element (row-major index).
        index: usize,
        /// Its value.
        value: f32,
        /// Where it comes from.
        cause: &'static str,
    },
    /// An error in the file `.0`.
    At(PathBuf, Box<HfError>),
}

impl HfError {
    fn config(field: &str, reason: &str) -> Self {
        HfError::Config { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn backend<E: peft_core::BackendError>(e: E) -> Self {
        HfError::Backend(e.to_string(), e.kind())
    }

    pub(crate) fn json(e: serde_json::Error) -> Self {
        HfError::Json(e.to_string())
    }

    /// The error itself, without the file an [`HfError::At`] names.
    pub fn into_root(self) -> Self {
        match self {
            HfError::At(_, e) => e.into_root(),
            e => e,
        }
    }

    /// This error, naming the file it is about (unless it already names one).
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (HfError::Io(..)
            | HfError::Safetensors(..)
            | HfError::DuplicateKey(..)
            | HfError::MissingShard(_)
            | HfError::OutputExists(_)
            | HfError::OutputIsInput { .. }
            | HfError::At(..)) => e,
            e => HfError::At(path.to_path_buf(), Box::new(e)),
        }
    }
}

impl From<OutputError> for HfError {
    fn from(e: OutputError) -> Self {
        match e {
            OutputError::Exists(p) => HfError::OutputExists(p),
            OutputError::IsInput { output, input } => HfError::OutputIsInput { output, input },
            OutputError::Io(p, e) => HfError::Io(p, e),
        }
    }
}

impl fmt::Display for HfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HfError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            HfError::Json(e) => write!(f, "invalid JSON: {e}"),
            HfError::Config { field, reason } => write!(f, "adapter_config.json: `{field}`: {reason}"),
            HfError::Unsupported(what) => write!(f, "unsupported: {what}"),
            HfError::Safetensors(p, e) => write!(f, "{}: not a valid safetensors file: {e}", p.display()),
            HfError::DuplicateKey(p, k) => write!(f, "{}: tensor {k:?} appears twice in the header", p.display()),
            HfError::Tensor(msg) => write!(f, "adapter tensors: {msg}"),
            HfError::RankMismatch { module, config, tensors } => {
                write!(f, "{module}: the config says rank {config}, the tensors have rank {tensors}")
            }
            HfError::Base(msg) => write!(f, "base checkpoint: {msg}"),
            HfError::MissingShard(p) => write!(f, "the index names shard {}, which does not exist", p.display()),
            HfError::OutputExists(p) => write!(f, "{} already exists (pass --force to replace it)", p.display()),
            HfError::OutputIsInput { output, input } => {
                write!(f, "refusing to write {}: it would overwrite the input {}", output.display(), input.display())
            }
            HfError::NonFinite { tensor, index, value, cause } => write!(
                f,
                "{tensor}: merged element {index} is {value} ({cause}); refused (--allow-nonfinite writes it anyway)"
            ),
            HfError::At(p, e) => write!(f, "{}: {e}", p.display()),
            HfError::Core(e) => write!(f, "{e}"),
            HfError::Backend(e, kind) => write!(f, "compute backend ({kind:?}): {e}"),
        }
    }
}

impl std::error::Error for HfError {}

impl From<peft_core::Error> for HfError {
    fn from(e: peft_core::Error) -> Self {
        HfError::Core(e)
    }
}

impl From<peft_core::format::FormatError> for HfError {
    fn from(e: peft_core::format::FormatError) -> Self {
        HfError::Core(e.into())
    }
}

/// One LoRA-adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// Module name without `base_model.model.` (`layers.0.q_proj`); its
    /// base weight is `<name>.weight`.
    pub name: String,
    /// `A [r, in]`, widened to f32 (exactly).
    pub a: Vec<f32>,
    /// `B [out, r]`.
    pub b: Vec<f32>,
    /// `lora_B.bias [out]` when `lora_bias`.
    pub lora_bias: Option<Vec<f32>>,
    /// Rank.
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Alpha (from `alpha_pattern` or `lora_alpha`).
    pub alpha: f64,
    /// The scale applied to `B A`.
    pub scale: f64,
    /// DoRA's `lora_magnitude_vector [out]` (`use_dora`).
    pub magnitude: Option<Vec<f32>>,
    /// LoRA on an `nn.Embedding` (`lora_embedding_A [r, vocab]`,
    /// `lora_embedding_B [dim, r]`): `in` is the vocabulary, `out` the
    /// embedding width, the weight is `[vocab, dim]` and its update
    /// `s (B A)^T`.
    pub embedding: bool,
    /// The element types `A`, `B`, the `lora_B` bias and the magnitude are
    /// stored in (an absent tensor's slot repeats `B`'s): each tensor is
    /// written back in its own type.
    pub dtypes: [Dtype; 4],
}

/// One LoHa-adapted module: `hada_w1_a`, `hada_w2_a` `[out, r]`,
/// `hada_w1_b`, `hada_w2_b` `[r, in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LohaModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `[w1_a, w1_b, w2_a, w2_b]`, widened to f32.
    pub factors: [Vec<f32>; 4],
    /// Rank.
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Alpha (`s = alpha / r`).
    pub alpha: f64,
    /// Each factor's element type.
    pub dtypes: [Dtype; 4],
}

/// One LoKr-adapted module: `W1 [a, c]` and `W2 [b, d]`, each stored
/// full (`lokr_w1`) or low rank (`lokr_w1_a`, `lokr_w1_b`).
#[derive(Clone, Debug, PartialEq)]
pub struct LokrModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `W1`'s stored tensors (one, or `_a` and `_b`), widened to f32.
    pub w1: Vec<Vec<f32>>,
    /// `W2`'s.
    pub w2: Vec<Vec<f32>>,
    /// `(a, c)`.
    pub d1: (usize, usize),
    /// `(b, d)`.
    pub d2: (usize, usize),
    /// The module's rank (`rank_pattern` or `r`; `s = alpha / r`).
    pub r: usize,
    /// Its alpha.
    pub alpha: f64,
    /// Each stored tensor's element type, `W1`'s then `W2`'s.
    pub dtypes: Vec<Dtype>,
}

impl LokrModule {
    /// `(out, in) = (a b, c d)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d1.0 * self.d2.0, self.d1.1 * self.d2.1)
    }

    /// The stored tensors: PEFT's key suffix, shape, values.
    pub fn stored(&self) -> Vec<(&'static str, Vec<usize>, &[f32])> {
        let mut out = Vec::new();
        for (which, f, (rows, cols)) in [("w1", &self.w1, self.d1), ("w2", &self.w2, self.d2)] {
            match f.as_slice() {
                [m] => out.push((if which == "w1" { "lokr_w1" } else { "lokr_w2" }, vec![rows, cols], &m[..])),
                [a, b] => {
                    let (ka, kb) = if which == "w1" { ("lokr_w1_a", "lokr_w1_b") } else { ("lokr_w2_a", "lokr_w2_b") };
                    out.push((ka, vec![rows, self.r], &a[..]));
                    out.push((kb, vec![self.r, cols], &b[..]));
                }
                _ => {}
            }
        }
        out
    }
}

/// LoHa's tensor names, in [`LohaModule::factors`]' order.
pub const LOHA_KEYS: [&str; 4] = peft_core::loha::KEYS;

/// One (IA)^3-adapted module: its vector `ia3_l`, `[out, 1]` (the output
/// is scaled) or `[1, in]` (feedforward: the input is).
#[derive(Clone, Debug, PartialEq)]
pub struct Ia3Module {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// The vector's values, widened to f32.
    pub l: Vec<f32>,
    /// Whether it scales the input (PEFT's `feedforward_modules`).
    pub feedforward: bool,
    /// The element type it is stored in.
    pub dtype: Dtype,
}

impl Ia3Module {
    /// The shape PEFT stores: `[1, in]` or `[out, 1]`.
    pub fn shape(&self) -> [usize; 2] {
        if self.feedforward { [1, self.l.len()] } else { [self.l.len(), 1] }
    }
}

/// VeRA's shared frozen projections, stored once per adapter under
/// `base_model.vera_A` `[r, max_in]` and `base_model.vera_B` `[max_out, r]`
/// (PEFT's `save_projection = true`).
#[derive(Clone, Debug, PartialEq)]
pub struct VeraProjections {
    /// `vera_A`, widened to f32.
    pub a: Vec<f32>,
    /// `vera_B`.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `vera_A`'s columns: the widest input served.
    pub max_in: usize,
    /// `vera_B`'s rows: the widest output served.
    pub max_out: usize,
    /// `vera_A`'s and `vera_B`'s element types.
    pub dtypes: [Dtype; 2],
}

/// VeRA's key for `vera_A` (not under `base_model.model.`).
pub const VERA_A_KEY: &str = "base_model.vera_A";
/// VeRA's key for `vera_B`.
pub const VERA_B_KEY: &str = "base_model.vera_B";

/// One VeRA-adapted module: `vera_lambda_d [r]`, `vera_lambda_b [out]`. Its
/// input width is the base weight's (the adapter does not store it).
#[derive(Clone, Debug, PartialEq)]
pub struct VeraModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `lambda_d`, widened to f32.
    pub lambda_d: Vec<f32>,
    /// `lambda_b`.
    pub lambda_b: Vec<f32>,
    /// Rank (`lambda_d`'s length).
    pub r: usize,
    /// Output features (`lambda_b`'s length).
    pub n_out: usize,
    /// `lambda_d`'s and `lambda_b`'s element types.
    pub dtypes: [Dtype; 2],
}

/// A whole tensor of an adapter: a base tensor it replaces (a trained bias
/// under `bias = "all" | "lora_only"`, or a `modules_to_save` weight), or
/// prompt learning's `prompt_embeddings`.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    /// The tensor's name (for a replacement, the base tensor's).
    pub name: String,
    /// The element type it is stored in.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, widened to f32.
    pub data: Vec<f32>,
}

/// A PEFT adapter directory, read.
#[derive(Clone, Debug)]
pub struct HfAdapter {
    /// The configuration.
    pub config: PeftConfig,
    /// LoRA modules, in the order of their keys.
    pub modules: Vec<LoraModule>,
    /// (IA)^3 modules, in the order of their keys.
    pub ia3: Vec<Ia3Module>,
    /// LoHa modules, in the order of their keys.
    pub loha: Vec<LohaModule>,
    /// LoKr modules, in the order of their keys.
    pub lokr: Vec<LokrModule>,
    /// VeRA modules, in the order of their keys.
    pub vera: Vec<VeraModule>,
    /// VeRA's shared projections.
    pub vera_projections: Option<VeraProjections>,
    /// Whole-tensor replacements.
    pub replacements: Vec<HfTensor>,
    /// Prompt or prefix tuning: `prompt_embeddings`.
    pub prompt: Option<HfTensor>,
    /// The element type of the adapter's first tensor, for display; every
    /// tensor keeps its own (`LoraModule::dtypes`, `HfTensor::dtype`).
    pub dtype: Dtype,
    /// The safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// The folder it was read from (`None` when built in memory): its
    /// files are inputs that no output may overwrite.
    pub source: Option<PathBuf>,
}

/// How the reader gets a tensor's values (or stands in for them).
type Reader<'a> = &'a mut dyn FnMut(&StFile, &st::Entry) -> Result<Vec<f32>, HfError>;

/// One LoRA module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSummary {
    /// Module name (`layers.0.q_proj`).
    pub name: String,
    /// Rank.
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Alpha.
    pub alpha: f64,
    /// The scale applied to `B A`.
    pub scale: f64,
    /// Whether `lora_B` has a bias.
    pub lora_bias: bool,
    /// Whether it is DoRA (has a magnitude vector).
    pub dora: bool,
}

impl ModuleSummary {
    /// Trainable parameters of the factors: `r (in + out)`, plus `out` for
    /// DoRA's magnitude (a `lora_B` bias is not counted, as before).
    pub fn params(&self) -> usize {
        self.r * (self.n_in + self.n_out) + if self.dora { self.n_out } else { 0 }
    }
}

/// One LoKr module of an [`AdapterSummary`]: name, in, out, r, alpha,
/// `[a, c, b, d]` (`W1 [a, c]`, `W2 [b, d]`), stored parameters.
pub type LokrSummary = (String, usize, usize, usize, f64, [usize; 4], usize);

/// A PEFT adapter directory, checked, without its tensor values
/// ([`HfAdapter::summarize`]).
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// The configuration.
    pub config: PeftConfig,
    /// The element type of the first tensor.
    pub dtype: Dtype,
    /// LoRA modules, in the order of their keys.
    pub modules: Vec<ModuleSummary>,
    /// Tensors replaced whole: name and shape.
    pub replacements: Vec<(String, Vec<usize>)>,
    /// Prompt learning: the shape of `prompt_embeddings`.
    pub prompt_shape: Option<Vec<usize>>,
    /// (IA)^3 modules: name, feedforward, the vector's length.
    pub ia3: Vec<(String, bool, usize)>,
    /// LoHa modules: name, in, out, r, alpha.
    pub loha: Vec<(String, usize, usize, usize, f64)>,
    /// LoKr modules (see [`LokrSummary`]).
    pub lokr: Vec<LokrSummary>,
    /// VeRA modules: name, r, out.
    pub vera: Vec<(String, usize, usize)>,
    /// VeRA's shared projections: `(r, max_in, max_out)`.
    pub vera_projections: Option<(usize, usize, usize)>,
    /// Every tensor holding a NaN or infinity: its name as stored, the
    /// first such element's index and value.
    pub nonfinite: Vec<(String, usize, f32)>,
}

/// The file names PEFT uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file PEFT writes.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Adapter files larger than this are refused before reading (a LoRA
/// adapter of a 70B model at rank 64 is about 1.6 GB in f32).
pub const MAX_ADAPTER_BYTES: u64 = 8 << 30;

/// `adapter_config.json` and `model.safetensors.index.json` files larger
/// than this are refused before reading (the largest real ones are a few
/// MB: an index of 100k tensors, a config listing every module).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// A tensor key without `base_model.model.` and without an adapter name
/// after `lora_A`/`lora_B`/`modules_to_save`.
pub fn normalize_key(key: &str) -> String {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = key.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        if p == "modules_to_save" {
            // `<module>.modules_to_save[.<adapter>].<param>` -> `<module>.<param>`.
            if i + 2 < parts.len() {
                i += 1;
            }
            i += 1;
            continue;
        }
        out.push(p);
        let is_lora =
            matches!(p, "lora_A" | "lora_B" | "lora_embedding_A" | "lora_embedding_B" | "lora_magnitude_vector");
        if is_lora && i + 2 < parts.len() && !matches!(parts[i + 1], "weight" | "bias") {
            i += 1; // the adapter name
        }
        i += 1;
    }
    out.join(".")
}

fn read_config(dir: &Path) -> Result<PeftConfig, HfError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = crate::files::read_bounded(&path, MAX_CONFIG_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| HfError::config(CONFIG_FILE, "is not UTF-8"))?;
    PeftConfig::parse(&text).map_err(|e| e.in_file(&path))
}

impl HfAdapter {
    /// Reads and checks a PEFT adapter directory: the config, every tensor
    /// key, shapes, ranks against `r` / `rank_pattern`, and that the config
    /// targets every adapted module.
    ///
    /// # Errors
    /// [`HfError`] naming what is wrong; nothing is returned half-read.
    pub fn read_dir(dir: &Path) -> Result<Self, HfError> {
        Self::read_dir_with(dir, &mut |f, e| f.read_f32(e))
    }

    /// Checks a PEFT adapter directory as [`HfAdapter::read_dir`] does, but
    /// holds no tensor values: each tensor is scanned in bounded chunks for
    /// NaN and infinities instead, so memory does not grow with the
    /// adapter (what `peft inspect` uses).
    ///
    /// # Errors
    /// As [`HfAdapter::read_dir`].
    pub fn summarize(dir: &Path) -> Result<AdapterSummary, HfError> {
        let mut nonfinite = Vec::new();
        let ad = Self::read_dir_with(dir, &mut |f, e| {
            if let Some((i, v)) = f.first_nonfinite(e)? {
                nonfinite.push((e.name.clone(), i, v));
            }
            Ok(Vec::new())
        })?;
        Ok(AdapterSummary {
            modules: ad
                .modules
                .iter()
                .map(|m| ModuleSummary {
                    name: m.name.clone(),
                    r: m.r,
                    n_in: m.n_in,
                    n_out: m.n_out,
                    alpha: m.alpha,
                    scale: m.scale,
                    lora_bias: m.lora_bias.is_some(),
                    dora: m.magnitude.is_some(),
                })
                .collect(),
            replacements: ad.replacements.iter().map(|r| (r.name.clone(), r.shape.clone())).collect(),
            prompt_shape: ad.prompt.as_ref().map(|p| p.shape.clone()),
            ia3: ad.ia3.iter().map(|m| (m.name.clone(), m.feedforward, m.shape()[0].max(m.shape()[1]))).collect(),
            loha: ad.loha.iter().map(|m| (m.name.clone(), m.n_in, m.n_out, m.r, m.alpha)).collect(),
            lokr: ad
                .lokr
                .iter()
                .map(|m| {
                    let (o, i) = m.dims();
                    let params = m.stored().iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
                    (m.name.clone(), i, o, m.r, m.alpha, [m.d1.0, m.d1.1, m.d2.0, m.d2.1], params)
                })
                .collect(),
            vera: ad.vera.iter().map(|m| (m.name.clone(), m.r, m.n_out)).collect(),
            vera_projections: ad.vera_projections.as_ref().map(|p| (p.r, p.max_in, p.max_out)),
            dtype: ad.dtype,
            config: ad.config,
            nonfinite,
        })
    }

    fn read_dir_with(dir: &Path, read: Reader<'_>) -> Result<Self, HfError> {
        let config = read_config(dir)?;
        let path = dir.join(WEIGHTS_FILE);
        let len = crate::files::regular_file(&path)?;
        if len > MAX_ADAPTER_BYTES {
            return Err(HfError::Safetensors(path, format!("{len} bytes exceeds the adapter limit")));
        }
        let file = StFile::open(&path)?;
        let dtype = file.entries.first().map_or(Dtype::F32, |e| e.dtype);
        let mut out = HfAdapter::empty(config.clone(), dtype, file.metadata.clone());
        out.source = Some(dir.to_path_buf());
        match &config {
            PeftConfig::Prompt(pc) => {
                let e = file.entries.iter().find(|e| normalize_key(&e.name) == "prompt_embeddings");
                let e = e.ok_or_else(|| HfError::Tensor("`prompt_embeddings` is missing".into()))?;
                if file.entries.len() != 1 {
                    return Err(HfError::Tensor(format!(
                        "{} tensors where prompt learning saves one",
                        file.entries.len()
                    )));
                }
                let rows = pc.num_virtual_tokens * pc.num_transformer_submodules.max(1);
                let cols = if pc.prefix { pc.num_layers * 2 * pc.token_dim } else { pc.token_dim };
                if e.shape != [rows, cols] {
                    return Err(HfError::Tensor(format!(
                        "prompt_embeddings has shape {:?}, the config implies [{rows}, {cols}]",
                        e.shape
                    )));
                }
                out.prompt = Some(HfTensor {
                    name: e.name.clone(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    data: read(&file, e)?,
                });
            }
            PeftConfig::Lora(lc) => out.read_lora(lc, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Ia3(ic) => out.read_ia3(ic, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Loha(lc) => out.read_loha(lc, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Lokr(kc) => out.read_lokr(kc, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Vera(vc) => out.read_vera(vc, &file, read).map_err(|e| e.in_file(&path))?,
        }
        Ok(out)
    }

    /// An adapter of `config` with no tensors yet, not read from a folder.
    pub fn empty(config: PeftConfig, dtype: Dtype, metadata: BTreeMap<String, String>) -> Self {
        HfAdapter {
            config,
            modules: Vec::new(),
            ia3: Vec::new(),
            loha: Vec::new(),
            lokr: Vec::new(),
            vera: Vec::new(),
            vera_projections: None,
            replacements: Vec::new(),
            prompt: None,
            dtype,
            metadata,
            source: None,
        }
    }

    /// VeRA: the shared `base_model.vera_A` / `vera_B` (rank `r` from the
    /// config), then per module `vera_lambda_d [r]` and `vera_lambda_b
    /// [out]` with `out <= max_out` (a module's input width is checked
    /// against `max_in` at merge, where the base gives it).
    fn read_vera(&mut self, vc: &VeraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        const KEYS: [&str; 2] = ["vera_lambda_d", "vera_lambda_b"];
        let find = |k: &str| file.entries.iter().find(|e| e.name == k);
        let (Some(a), Some(b)) = (find(VERA_A_KEY), find(VERA_B_KEY)) else {
            return Err(HfError::Tensor(format!(
                "`{VERA_A_KEY}` and `{VERA_B_KEY}` are required (PEFT writes them with save_projection=True)"
            )));
        };
        let r = vc.r;
        let (&[ra, max_in], &[max_out, rb]) = (a.shape.as_slice(), b.shape.as_slice()) else {
            return Err(HfError::Tensor("vera_A and vera_B must be matrices".into()));
        };
        if ra != r || rb != r {
            return Err(HfError::RankMismatch { module: "vera_A / vera_B".into(), config: r, tensors: ra });
        }
        let mut by_module: BTreeMap<String, [Option<&st::Entry>; 2]> = BTreeMap::new();
        let mut order = Vec::new();
        for e in &file.entries {
            if e.name == VERA_A_KEY || e.name == VERA_B_KEY {
                continue;
            }
            let key = normalize_key(&e.name);
            let slot = KEYS.iter().enumerate().find_map(|(i, k)| key.strip_suffix(&format!(".{k}")).map(|m| (m, i)));
            match slot {
                Some((module, i)) => {
                    let s = by_module.entry(module.to_string()).or_insert_with(|| {
                        order.push(module.to_string());
                        [None; 2]
                    });
                    if s[i].replace(e).is_some() {
                        return Err(HfError::Tensor(format!("{module}: {} appears twice", KEYS[i])));
                    }
                }
                None => {
                    let owner = key.rsplit_once('.').map_or("", |(m, _)| m);
                    if !vc.modules_to_save.iter().any(|m| module_matches(owner, m)) {
                        return Err(HfError::Tensor(format!(
                            "unexpected key `{}` (not VeRA or modules_to_save)",
                            e.name
                        )));
                    }
                    self.replacements.push(HfTensor {
                        name: key,
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                        data: read(file, e)?,
                    });
                }
            }
        }
        for name in order {
            let [Some(d), Some(bv)] = by_module[&name] else {
                return Err(HfError::Tensor(format!("{name}: vera_lambda_d and vera_lambda_b are both required")));
            };
            if !vc.target_modules.matches(&name) {
                return Err(HfError::Tensor(format!("{name}: has VeRA tensors but the config does not target it")));
            }
            if d.shape != [r] {
                return Err(HfError::RankMismatch {
                    module: name,
                    config: r,
                    tensors: d.shape.first().copied().unwrap_or(0),
                });
            }
            let n_out = match bv.shape.as_slice() {
                &[n_out] if n_out > 0 && n_out <= max_out => n_out,
                s => {
                    return Err(HfError::Tensor(format!(
                        "{name}: vera_lambda_b has shape {s:?}, expected [out] with out <= vera_B's {max_out} rows"
                    )));
                }
            };
            self.vera.push(VeraModule {
                lambda_d: read(file, d)?,
                lambda_b: read(file, bv)?,
                r,
                n_out,
                dtypes: [d.dtype, bv.dtype],
                name,
            });
        }
        if self.vera.is_empty() {
            return Err(HfError::Tensor("no vera_lambda_d / vera_lambda_b tensors".into()));
        }
        self.vera_projections = Some(VeraProjections {
            a: read(file, a)?,
            b: read(file, b)?,
            r,
            max_in,
            max_out,
            dtypes: [a.dtype, b.dtype],
        });
        Ok(())
    }

    fn read_lora(&mut self, lc: &HfLoraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let mut a_b: BTreeMap<String, [Option<&st::Entry>; 6]> = BTreeMap::new();
        let mut order = Vec::new();
        for e in &file.entries {
            let key = normalize_key(&e.name);
            // PEFT saves the magnitude without `.weight`; accept both.
            let slot = [
                (".lora_A.weight", 0),
                (".lora_B.weight", 1),
                (".lora_B.bias", 2),
                (".lora_magnitude_vector", 3),
                (".lora_magnitude_vector.weight", 3),
                (".lora_embedding_A", 4),
                (".lora_embedding_B", 5),
            ]
            .into_iter()
            .find_map(|(suffix, i)| key.strip_suffix(suffix).map(|m| (m.to_string(), i)));
            match slot {
                Some((module, i)) => {
                    if i == 2 && !lc.lora_bias {
                        return Err(HfError::Tensor(format!("`{}` present but lora_bias is false", e.name)));
                    }
                    if i == 3 && !lc.use_dora {
                        return Err(HfError::Tensor(format!("`{}` present but use_dora is false", e.name)));
                    }
                    let s = a_b.entry(module.clone()).or_insert_with(|| {
                        order.push(module.clone());
                        [None; 6]
                    });
                    if let Some(first) = s[i].replace(e) {
                        return Err(HfError::Tensor(format!("`{}` and `{}` both map to {key}", first.name, e.name)));
                    }
                }
                None => {
                    let module = key.rsplit_once('.').map_or("", |(m, _)| m);
                    let saved = lc.modules_to_save.iter().any(|m| module_matches(module, m));
                    let bias = key.ends_with(".bias") && lc.bias != BiasMode::None;
                    if !(saved || bias) {
                        return Err(HfError::Tensor(format!(
                            "unexpected key `{}` (not LoRA, a trained bias or modules_to_save)",
                            e.name
                        )));
                    }
                    self.replacements.push(HfTensor {
                        name: key,
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                        data: read(file, e)?,
                    });
                }
            }
        }
        if lc.use_dora && (lc.fan_in_fan_out || lc.lora_bias) {
            let field = if lc.fan_in_fan_out { "fan_in_fan_out" } else { "lora_bias" };
            return Err(HfError::Unsupported(format!("`use_dora` with `{field}`")));
        }
        for name in order {
            let [a, b, bias, magnitude, ea, eb] = a_b[&name];
            // LoRA on an nn.Embedding: `lora_embedding_A [r, vocab]`,
            // `lora_embedding_B [dim, r]`, the same layout as A and B with
            // in = vocab and out = dim (its weight is `[vocab, dim]`).
            let embedding = ea.is_some() || eb.is_some();
            if embedding && (a.is_some() || b.is_some()) {
                return Err(HfError::Tensor(format!("{name}: both lora_A/lora_B and lora_embedding_A/_B")));
            }
            if embedding && (lc.use_dora || bias.is_some()) {
                return Err(HfError::Unsupported(format!("{name}: DoRA or lora_bias on an embedding")));
            }
            let (a, b) = if embedding { (ea, eb) } else { (a, b) };
            let (Some(a), Some(b)) = (a, b) else {
                let missing = match (embedding, a.is_none()) {
                    (false, true) => "lora_A.weight",
                    (false, false) => "lora_B.weight",
                    (true, true) => "lora_embedding_A",
                    (true, false) => "lora_embedding_B",
                };
                return Err(HfError::Tensor(format!(
                    "{name}: `{name}.{missing}` is missing (LoRA needs both factors)"
                )));
            };
            let (&[r, n_in], &[n_out, r2]) = (a.shape.as_slice(), b.shape.as_slice()) else {
                return Err(HfError::Tensor(format!(
                    "{name}: lora_A {:?} / lora_B {:?} are not matrices",
                    a.shape, b.shape
                )));
            };
            if r != r2 {
                return Err(HfError::Tensor(format!("{name}: lora_A has rank {r}, lora_B has rank {r2}")));
            }
            let want = lc.rank_for(&name);
            if want != r {
                return Err(HfError::RankMismatch { module: name, config: want, tensors: r });
            }
            if !lc.adapts(&name) {
                return Err(HfError::Tensor(format!("{name}: has LoRA tensors but the config does not target it")));
            }
            if lc.lora_bias && bias.is_none() {
                return Err(HfError::Tensor(format!("{name}: lora_bias is true but lora_B.bias is missing")));
            }
            if bias.is_some_and(|e| e.shape != [n_out]) {
                return Err(HfError::Tensor(format!("{name}: lora_B.bias does not have shape [{n_out}]")));
            }
            if lc.use_dora && magnitude.is_none() {
                return Err(HfError::Tensor(format!("{name}: use_dora is true but lora_magnitude_vector is missing")));
            }
            if magnitude.is_some_and(|e| e.shape != [n_out]) {
                return Err(HfError::Tensor(format!("{name}: lora_magnitude_vector does not have shape [{n_out}]")));
            }
            let lora_bias = bias.map(|e| read(file, e)).transpose()?;
            let magnitude_values = magnitude.map(|e| read(file, e)).transpose()?;
            self.modules.push(LoraModule {
                alpha: lc.alpha_for(&name),
                scale: lc.scale_for(&name)?,
                a: read(file, a)?,
                b: read(file, b)?,
                dtypes: [a.dtype, b.dtype, bias.map_or(b.dtype, |e| e.dtype), magnitude.map_or(b.dtype, |e| e.dtype)],
                lora_bias,
                magnitude: magnitude_values,
                embedding,
                r,
                n_in,
                n_out,
                name,
            });
        }
        if self.modules.is_empty() {
            return Err(HfError::Tensor("no lora_A / lora_B tensors".into()));
        }
        Ok(())
    }

    fn read_loha(&mut self, lc: &LohaConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let mut by_module: BTreeMap<String, [Option<&st::Entry>; 4]> = BTreeMap::new();
        let mut order = Vec::new();
        for e in &file.entries {
            let key = normalize_key(&e.name);
            let slot =
                LOHA_KEYS.iter().enumerate().find_map(|(i, k)| key.strip_suffix(&format!(".{k}")).map(|m| (m, i)));
            match slot {
                Some((module, i)) => {
                    let s = by_module.entry(module.to_string()).or_insert_with(|| {
                        order.push(module.to_string());
                        [None; 4]
                    });
                    if s[i].replace(e).is_some() {
                        return Err(HfError::Tensor(format!("{module}: {} appears twice", LOHA_KEYS[i])));
                    }
                }
                None => {
                    let owner = key.rsplit_once('.').map_or("", |(m, _)| m);
                    if !lc.modules_to_save.iter().any(|m| module_matches(owner, m)) {
                        return Err(HfError::Tensor(format!(
                            "unexpected key `{}` (not LoHa or modules_to_save)",
                            e.name
                        )));
                    }
                    self.replacements.push(HfTensor {
                        name: key,
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                        data: read(file, e)?,
                    });
                }
            }
        }
        for name in order {
            let slots = by_module[&name];
            let mut es = Vec::with_capacity(4);
            for (i, e) in slots.iter().enumerate() {
                es.push(e.ok_or_else(|| HfError::Tensor(format!("{name}: {} is missing", LOHA_KEYS[i])))?);
            }
            let (&[n_out, r], &[r2, n_in]) = (es[0].shape.as_slice(), es[1].shape.as_slice()) else {
                return Err(HfError::Tensor(format!("{name}: LoHa factors must be matrices")));
            };
            if r != r2 || es[2].shape != [n_out, r] || es[3].shape != [r, n_in] {
                return Err(HfError::Tensor(format!(
                    "{name}: factor shapes {:?}, {:?}, {:?}, {:?} do not agree",
                    es[0].shape, es[1].shape, es[2].shape, es[3].shape
                )));
            }
            if !lc.target_modules.matches(&name) {
                return Err(HfError::Tensor(format!("{name}: has LoHa tensors but the config does not target it")));
            }
            let want = lc.rank_for(&name);
            if want != r {
                return Err(HfError::RankMismatch { module: name, config: want, tensors: r });
            }
            self.loha.push(LohaModule {
                factors: [read(file, es[0])?, read(file, es[1])?, read(file, es[2])?, read(file, es[3])?],
                dtypes: [es[0].dtype, es[1].dtype, es[2].dtype, es[3].dtype],
                alpha: lc.alpha_for(&name),
                r,
                n_in,
                n_out,
                name,
            });
        }
        if self.loha.is_empty() {
            return Err(HfError::Tensor("no hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b tensors".into()));
        }
        Ok(())
    }

    fn read_lokr(&mut self, kc: &LokrConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        const KEYS: [&str; 6] = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"];
        let lc = &kc.common;
        let mut by_module: BTreeMap<String, [Option<&st::Entry>; 6]> = BTreeMap::new();
        let mut order = Vec::new();
        for e in &file.entries {
            let key = normalize_key(&e.name);
            let slot = KEYS.iter().enumerate().find_map(|(i, k)| key.strip_suffix(&format!(".{k}")).map(|m| (m, i)));
            match slot {
                Some((module, i)) => {
                    let s = by_module.entry(module.to_string()).or_insert_with(|| {
                        order.push(module.to_string());
                        [None; 6]
                    });
                    if s[i].replace(e).is_some() {
                        return Err(HfError::Tensor(format!("{module}: {} appears twice", KEYS[i])));
                    }
                }
                None => {
                    let owner = key.rsplit_once('.').map_or("", |(m, _)| m);
                    if !lc.modules_to_save.iter().any(|m| module_matches(owner, m)) {
                        return Err(HfError::Tensor(format!(
                            "unexpected key `{}` (not LoKr or modules_to_save)",
                            e.name
                        )));
                    }
                    self.replacements.push(HfTensor {
                        name: key,
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                        data: read(file, e)?,
                    });
                }
            }
        }
        for name in order {
            let s = by_module[&name];
            if !lc.target_modules.matches(&name) {
                return Err(HfError::Tensor(format!("{name}: has LoKr tensors but the config does not target it")));
            }
            let r = lc.rank_for(&name);
            let mut dtypes = Vec::new();
            // One factor: full, or low rank of rank r; its (rows, cols).
            let mut factor = |full: Option<&st::Entry>, a: Option<&st::Entry>, b: Option<&st::Entry>, which: &str| {
                match (full, a, b) {
                    (Some(m), None, None) => match m.shape.as_slice() {
                        &[rows, cols] => {
                            dtypes.push(m.dtype);
                            Ok((vec![read(file, m)?], (rows, cols)))
                        }
                        _ => Err(HfError::Tensor(format!("{name}: lokr_{which} is not a matrix"))),
                    },
                    (None, Some(a), Some(b)) => match (a.shape.as_slice(), b.shape.as_slice()) {
                        (&[rows, ra], &[rb, cols]) if ra == r && rb == r => {
                            dtypes.extend([a.dtype, b.dtype]);
                            Ok((vec![read(file, a)?, read(file, b)?], (rows, cols)))
                        }
                        _ => Err(HfError::RankMismatch {
                            module: name.clone(),
                            config: r,
                            tensors: a.shape.get(1).copied().unwrap_or(0),
                        }),
                    },
                    _ => Err(HfError::Tensor(format!("{name}: lokr_{which}, or lokr_{which}_a and _b, expected"))),
                }
            };
            let (w1, d1) = factor(s[0], s[1], s[2], "w1")?;
            let (w2, d2) = factor(s[3], s[4], s[5], "w2")?;
            // PEFT's factorization must give these dimensions.
            let (n_out, n_in) = (d1.0 * d2.0, d1.1 * d2.1);
            let f = kc.decompose_factor;
            let (fo, fi) = (peft_core::lokr::factorization(n_out, f), peft_core::lokr::factorization(n_in, f));
            if fo != (d1.0, d2.0) || fi != (d1.1, d2.1) {
                return Err(HfError::Tensor(format!(
                    "{name}: factors [{}, {}] and [{}, {}] are not PEFT's factorization of {n_out} x {n_in} (decompose_factor {f})",
                    d1.0, d1.1, d2.0, d2.1
                )));
            }
            self.lokr.push(LokrModule { name: name.clone(), w1, w2, d1, d2, r, alpha: lc.alpha_for(&name), dtypes });
        }
        if self.lokr.is_empty() {
            return Err(HfError::Tensor("no lokr_w1 / lokr_w2 tensors".into()));
        }
        Ok(())
    }

    fn read_ia3(&mut self, ic: &Ia3Config, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        for e in &file.entries {
            let key = normalize_key(&e.name);
            if let Some(module) = key.strip_suffix(".ia3_l") {
                if !ic.target_modules.matches(module) {
                    return Err(HfError::Tensor(format!("{module}: has ia3_l but the config does not target it")));
                }
                let feedforward = ic.is_feedforward(module);
                let ok = match (feedforward, e.shape.as_slice()) {
                    (true, &[1, n]) | (false, &[n, 1]) => n > 0,
                    _ => false,
                };
                if !ok {
                    let want = if feedforward { "[1, in] (feedforward)" } else { "[out, 1]" };
                    return Err(HfError::Tensor(format!("{module}: ia3_l has shape {:?}, expected {want}", e.shape)));
                }
                if self.ia3.iter().any(|m| m.name == module) {
                    return Err(HfError::Tensor(format!("{module}: ia3_l appears twice")));
                }
                self.ia3.push(Ia3Module { name: module.to_string(), l: read(file, e)?, feedforward, dtype: e.dtype });
            } else {
                let owner = key.rsplit_once('.').map_or("", |(m, _)| m);
                if !ic.modules_to_save.iter().any(|m| module_matches(owner, m)) {
                    return Err(HfError::Tensor(format!("unexpected key `{}` (not ia3_l or modules_to_save)", e.name)));
                }
                self.replacements.push(HfTensor {
                    name: key,
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    data: read(file, e)?,
                });
            }
        }
        if self.ia3.is_empty() {
            return Err(HfError::Tensor("no ia3_l tensors".into()));
        }
        Ok(())
    }

    /// Prompt tuning as `peft-core`'s type, over this adapter's
    /// `prompt_embeddings` (`[num_virtual_tokens, token_dim]`).
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for another method or an encoder-decoder
    /// prompt (`num_transformer_submodules` = 2); `peft-core`'s errors.
    pub fn prompt_tuning(&mut self) -> Result<peft_core::prompt::PromptTuning<f32, &mut [f32]>, HfError> {
        let (PeftConfig::Prompt(c), Some(HfTensor { data, .. })) = (&self.config, self.prompt.as_mut()) else {
            return Err(HfError::Unsupported("not a prompt-tuning adapter".into()));
        };
        if c.prefix || c.num_transformer_submodules > 1 {
            return Err(HfError::Unsupported(
                "prefix tuning or an encoder-decoder prompt as plain prompt tuning".into(),
            ));
        }
        Ok(peft_core::prompt::PromptTuning::new(&mut data[..], c.num_virtual_tokens, c.token_dim)?)
    }

    /// Prefix tuning as `peft-core`'s type, over this adapter's
    /// `prompt_embeddings` (`[num_virtual_tokens, num_layers * 2 *
    /// token_dim]`, PEFT's layout), with `num_attention_heads` heads of
    /// `token_dim / num_attention_heads` (multi-head attention; PEFT stores
    /// the same layout for every model).
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for another method; `peft-core`'s errors
    /// (e.g. `token_dim` not a multiple of the heads).
    pub fn prefix_tuning(&mut self) -> Result<peft_core::prefix::PrefixTuning<f32, &mut [f32]>, HfError> {
        let (PeftConfig::Prompt(c), Some(HfTensor { data, .. })) = (&self.config, self.prompt.as_mut()) else {
            return Err(HfError::Unsupported("not a prefix-tuning adapter".into()));
        };
        if !c.prefix || c.num_attention_heads == 0 || c.token_dim % c.num_attention_heads != 0 {
            return Err(HfError::Unsupported("not a prefix-tuning adapter with whole heads".into()));
        }
        let heads = c.num_attention_heads;
        let shape = peft_core::attention::AttentionShape::new(heads, heads, c.token_dim / heads)?;
        let cfg = peft_core::prefix::PrefixConfig::new(c.num_virtual_tokens, c.num_layers, &shape)?;
        Ok(peft_core::prefix::PrefixTuning::new(cfg, &mut data[..])?)
    }

    /// The files it was read from.
    pub fn source_files(&self) -> Vec<PathBuf> {
        self.source.iter().flat_map(|d| [d.join(CONFIG_FILE), d.join(WEIGHTS_FILE)]).collect()
    }

    /// The config as PEFT 0.21 writes it.
    pub fn config_json(&self) -> serde_json::Value {
        match &self.config {
            PeftConfig::Lora(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Prompt(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Ia3(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Loha(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Lokr(c) => serde_json::Value::Object(c.common.raw.clone()),
            PeftConfig::Vera(c) => serde_json::Value::Object(c.raw.clone()),
        }
    }

    /// The adapter's tensors as PEFT 0.21 stores them: name (with
    /// `base_model.model.`), element type, shape, values.
    pub fn tensors(&self) -> Vec<(String, Dtype, Vec<usize>, &[f32])> {
        let mut tensors: Vec<(String, Dtype, Vec<usize>, &[f32])> = Vec::new();
        for m in &self.modules {
            let key = format!("base_model.model.{}", m.name);
            let (na, nb) =
                if m.embedding { ("lora_embedding_A", "lora_embedding_B") } else { ("lora_A.weight", "lora_B.weight") };
            tensors.push((format!("{key}.{na}"), m.dtypes[0], vec![m.r, m.n_in], &m.a));
            tensors.push((format!("{key}.{nb}"), m.dtypes[1], vec![m.n_out, m.r], &m.b));
            if let Some(bias) = &m.lora_bias {
                tensors.push((format!("{key}.lora_B.bias"), m.dtypes[2], vec![m.n_out], bias));
            }
            if let Some(mag) = &m.magnitude {
                tensors.push((format!("{key}.lora_magnitude_vector"), m.dtypes[3], vec![m.n_out], mag));
            }
        }
        for m in &self.loha {
            let shapes = [[m.n_out, m.r], [m.r, m.n_in], [m.n_out, m.r], [m.r, m.n_in]];
            for (i, key) in LOHA_KEYS.iter().enumerate() {
                tensors.push((
                    format!("base_model.model.{}.{key}", m.name),
                    m.dtypes[i],
                    shapes[i].to_vec(),
                    &m.factors[i],
                ));
            }
        }
        for m in &self.lokr {
            for ((key, shape, data), dtype) in m.stored().into_iter().zip(&m.dtypes) {
                tensors.push((format!("base_model.model.{}.{key}", m.name), *dtype, shape, data));
            }
        }
        for m in &self.ia3 {
            tensors.push((format!("base_model.model.{}.ia3_l", m.name), m.dtype, m.shape().to_vec(), &m.l));
        }
        for m in &self.vera {
            let key = format!("base_model.model.{}", m.name);
            tensors.push((format!("{key}.vera_lambda_b"), m.dtypes[1], vec![m.n_out], &m.lambda_b));
            tensors.push((format!("{key}.vera_lambda_d"), m.dtypes[0], vec![m.r], &m.lambda_d));
        }
        if let Some(p) = &self.vera_projections {
            tensors.push((VERA_A_KEY.into(), p.dtypes[0], vec![p.r, p.max_in], &p.a));
            tensors.push((VERA_B_KEY.into(), p.dtypes[1], vec![p.max_out, p.r], &p.b));
        }
        for r in &self.replacements {
            tensors.push((format!("base_model.model.{}", r.name), r.dtype, r.shape.clone(), &r.data));
        }
        if let Some(p) = &self.prompt {
            tensors.push((p.name.clone(), p.dtype, p.shape.clone(), &p.data));
        }
        tensors
    }

    /// Writes the directory PEFT's `PeftModel.from_pretrained` loads, each
    /// tensor in its own element type, through [`crate::files::write_dir`]:
    /// atomically, replacing an existing `dir` only if `force`, and only
    /// after [`HfAdapter::read_dir`] (what `peft inspect` and `peft merge`
    /// use) has read the finished folder back without error.
    ///
    /// # Errors
    /// [`HfError::OutputExists`] if `dir` exists and not `force`; the
    /// reader's errors for an adapter it would refuse; I/O errors.
    pub fn write_dir(&self, dir: &Path, force: bool) -> Result<(), HfError> {
        let tensors = self.tensors();
        let mut data = Vec::with_capacity(tensors.len());
        for (_, dtype, _, values) in &tensors {
            let mut bytes = Vec::new();
            st::from_f32(*dtype, values, &mut bytes)?;
            data.push(bytes);
        }
        let raw: Vec<RawOut<'_>> =
            tensors.iter().zip(&data).map(|((n, d, s, _), b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
        write_raw_dir(dir, &self.config_json(), &self.metadata, &raw, force)
    }
}

/// One tensor to write as stored: its name, element type, shape and
/// little-endian bytes.
pub(crate) type RawOut<'a> = (&'a str, Dtype, &'a [usize], &'a [u8]);

/// Writes a PEFT directory from `config` and tensors already in their
/// stored bytes (`metadata` plus `format: pt` as safetensors'
/// `__metadata__`), through [`crate::files::write_dir`]: atomically,
/// replacing `dir` only if `force`, and only once [`HfAdapter::read_dir`]
/// has read the finished folder back without error.
///
/// # Errors
/// [`HfError::Tensor`] for bytes that do not fill the shape; the reader's
/// errors; [`HfError::OutputExists`]; I/O errors.
pub(crate) fn write_raw_dir(
    dir: &Path,
    config: &serde_json::Value,
    metadata: &BTreeMap<String, String>,
    tensors: &[RawOut<'_>],
    force: bool,
) -> Result<(), HfError> {
    let mut metadata = metadata.clone();
    metadata.insert("format".into(), "pt".into());
    let entries: Vec<OutEntry> = tensors.iter().map(|(n, d, s, _)| OutEntry::plain(*n, *d, s.to_vec())).collect();
    let mut bytes = st::header(&entries, &metadata)?;
    for (e, (name, _, _, data)) in entries.iter().zip(tensors) {
        if e.bytes() != data.len() as u64 {
            return Err(HfError::Tensor(format!("{name}: {} bytes for shape {:?}", data.len(), e.shape)));
        }
        bytes.extend_from_slice(data);
    }
    let config = serde_json::to_vec_pretty(config).map_err(HfError::json)?;
    crate::files::write_dir(dir, &[(CONFIG_FILE, &config), (WEIGHTS_FILE, &bytes)], force, |tmp| {
        HfAdapter::read_dir(tmp).map(|_| ())
    })
}
