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
pub mod config;
pub mod convert;
pub mod merge;
pub mod st;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use peft_core::lora::config::module_matches;
use safetensors::Dtype;

pub use config::{BiasMode, HfLoraConfig, PeftConfig, PromptConfig, Targets};
use st::{OutEntry, StFile};

use crate::io::{rename_durably, temp_sibling};

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
}

impl HfError {
    fn config(field: &str, reason: &str) -> Self {
        HfError::Config { field: field.into(), reason: reason.into() }
    }

    fn backend<E: peft_core::BackendError>(e: E) -> Self {
        HfError::Backend(e.to_string(), e.kind())
    }

    fn json(e: serde_json::Error) -> Self {
        HfError::Json(e.to_string())
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
            HfError::OutputExists(p) => write!(f, "{} already exists", p.display()),
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
}

/// A base tensor the adapter replaces whole (a trained bias under
/// `bias = "all" | "lora_only"`, or a `modules_to_save` weight).
#[derive(Clone, Debug, PartialEq)]
pub struct Replacement {
    /// The base tensor's name.
    pub name: String,
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
    /// Whole-tensor replacements.
    pub replacements: Vec<Replacement>,
    /// Prompt or prefix tuning: `prompt_embeddings` and its shape.
    pub prompt: Option<(Vec<usize>, Vec<f32>)>,
    /// The element type of the adapter's tensors.
    pub dtype: Dtype,
    /// The safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// The file names PEFT uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file PEFT writes.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Adapter files larger than this are refused before reading (a LoRA
/// adapter of a 70B model at rank 64 is about 1.6 GB in f32).
pub const MAX_ADAPTER_BYTES: u64 = 8 << 30;

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
    let bytes = std::fs::read(&path).map_err(|e| HfError::Io(path.clone(), e))?;
    let text = String::from_utf8(bytes).map_err(|_| HfError::config(CONFIG_FILE, "is not UTF-8"))?;
    PeftConfig::parse(&text)
}

impl HfAdapter {
    /// Reads and checks a PEFT adapter directory: the config, every tensor
    /// key, shapes, ranks against `r` / `rank_pattern`, and that the config
    /// targets every adapted module.
    ///
    /// # Errors
    /// [`HfError`] naming what is wrong; nothing is returned half-read.
    pub fn read_dir(dir: &Path) -> Result<Self, HfError> {
        let config = read_config(dir)?;
        let path = dir.join(WEIGHTS_FILE);
        let len = std::fs::metadata(&path).map_err(|e| HfError::Io(path.clone(), e))?.len();
        if len > MAX_ADAPTER_BYTES {
            return Err(HfError::Safetensors(path, format!("{len} bytes exceeds the adapter limit")));
        }
        let file = StFile::open(&path)?;
        let dtype = file.entries.first().map_or(Dtype::F32, |e| e.dtype);
        let mut out = HfAdapter {
            config: config.clone(),
            modules: Vec::new(),
            replacements: Vec::new(),
            prompt: None,
            dtype,
            metadata: file.metadata.clone(),
        };
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
                out.prompt = Some((e.shape.clone(), file.read_f32(e)?));
            }
            PeftConfig::Lora(lc) => out.read_lora(lc, &file)?,
        }
        Ok(out)
    }

    fn read_lora(&mut self, lc: &HfLoraConfig, file: &StFile) -> Result<(), HfError> {
        let mut a_b: BTreeMap<String, [Option<&st::Entry>; 3]> = BTreeMap::new();
        let mut order = Vec::new();
        for e in &file.entries {
            let key = normalize_key(&e.name);
            if key.contains("lora_magnitude_vector") {
                return Err(HfError::Unsupported(format!("`{}`: DoRA magnitude vectors (use_dora)", e.name)));
            }
            if key.contains("lora_embedding_") {
                return Err(HfError::Unsupported(format!("`{}`: LoRA on embedding layers", e.name)));
            }
            let slot = [(".lora_A.weight", 0), (".lora_B.weight", 1), (".lora_B.bias", 2)]
                .into_iter()
                .find_map(|(suffix, i)| key.strip_suffix(suffix).map(|m| (m.to_string(), i)));
            match slot {
                Some((module, i)) => {
                    if i == 2 && !lc.lora_bias {
                        return Err(HfError::Tensor(format!("`{}` present but lora_bias is false", e.name)));
                    }
                    let s = a_b.entry(module.clone()).or_insert_with(|| {
                        order.push(module.clone());
                        [None; 3]
                    });
                    if s[i].replace(e).is_some() {
                        return Err(HfError::Tensor(format!("two tensors map to {key}")));
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
                    self.replacements.push(Replacement { name: key, shape: e.shape.clone(), data: file.read_f32(e)? });
                }
            }
        }
        for name in order {
            let [a, b, bias] = a_b[&name];
            let (Some(a), Some(b)) = (a, b) else {
                return Err(HfError::Tensor(format!("{name}: lora_A and lora_B must both be present")));
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
            let lora_bias = bias.map(|e| file.read_f32(e)).transpose()?;
            if lora_bias.as_ref().is_some_and(|v| v.len() != n_out) {
                return Err(HfError::Tensor(format!("{name}: lora_B.bias does not have {n_out} entries")));
            }
            self.modules.push(LoraModule {
                alpha: lc.alpha_for(&name),
                scale: lc.scale_for(&name)?,
                a: file.read_f32(a)?,
                b: file.read_f32(b)?,
                lora_bias,
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

    /// Prompt tuning as `peft-core`'s type, over this adapter's
    /// `prompt_embeddings` (`[num_virtual_tokens, token_dim]`).
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for another method or an encoder-decoder
    /// prompt (`num_transformer_submodules` = 2); `peft-core`'s errors.
    pub fn prompt_tuning(&mut self) -> Result<peft_core::prompt::PromptTuning<f32, &mut [f32]>, HfError> {
        let (PeftConfig::Prompt(c), Some((_, data))) = (&self.config, self.prompt.as_mut()) else {
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
        let (PeftConfig::Prompt(c), Some((_, data))) = (&self.config, self.prompt.as_mut()) else {
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

    /// The config as PEFT 0.21 writes it.
    pub fn config_json(&self) -> serde_json::Value {
        match &self.config {
            PeftConfig::Lora(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Prompt(c) => serde_json::Value::Object(c.raw.clone()),
        }
    }

    /// Writes the directory PEFT's `PeftModel.from_pretrained` loads, in the
    /// adapter's element type, atomically (both files are written to a
    /// temporary folder beside `dir`, which is then renamed to `dir`).
    ///
    /// # Errors
    /// [`HfError::OutputExists`] if `dir` exists; I/O errors.
    pub fn write_dir(&self, dir: &Path) -> Result<(), HfError> {
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for m in &self.modules {
            let key = format!("base_model.model.{}", m.name);
            tensors.push((format!("{key}.lora_A.weight"), vec![m.r, m.n_in], &m.a));
            tensors.push((format!("{key}.lora_B.weight"), vec![m.n_out, m.r], &m.b));
            if let Some(bias) = &m.lora_bias {
                tensors.push((format!("{key}.lora_B.bias"), vec![m.n_out], bias));
            }
        }
        for r in &self.replacements {
            tensors.push((format!("base_model.model.{}", r.name), r.shape.clone(), &r.data));
        }
        if let Some((shape, data)) = &self.prompt {
            tensors.push(("prompt_embeddings".into(), shape.clone(), data));
        }
        let mut metadata = self.metadata.clone();
        metadata.insert("format".into(), "pt".into());
        let entries: Vec<OutEntry> =
            tensors.iter().map(|(n, s, _)| OutEntry { name: n.clone(), dtype: self.dtype, shape: s.clone() }).collect();
        let mut bytes = st::header(&entries, &metadata)?;
        for (_, _, data) in &tensors {
            st::from_f32(self.dtype, data, &mut bytes)?;
        }
        let config = serde_json::to_vec_pretty(&self.config_json()).map_err(HfError::json)?;
        write_dir_atomic(dir, &[(CONFIG_FILE, &config), (WEIGHTS_FILE, &bytes)])
    }
}

/// Writes `files` into a new folder `dir`, atomically: a temporary folder
/// beside it is filled, each file synced, then renamed to `dir`.
///
/// # Errors
/// [`HfError::OutputExists`] if `dir` exists; I/O errors (the temporary
/// folder is removed).
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> Result<(), HfError> {
    if dir.exists() {
        return Err(HfError::OutputExists(dir.to_path_buf()));
    }
    let tmp = temp_sibling(dir);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| HfError::Io(p, e)
    };
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        for (name, data) in files {
            let path = tmp.join(name);
            let mut f = std::fs::File::create(&path).map_err(io(&path))?;
            std::io::Write::write_all(&mut f, data).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
        }
        rename_durably(&tmp, dir).map_err(io(dir))
    })();
    if result.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    result
}
