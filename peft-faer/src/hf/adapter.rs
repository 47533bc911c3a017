//! [`HfAdapter`]: a PEFT adapter folder read whole (every method's
//! modules, the tensors it replaces, prompt learning's embeddings), and
//! written back as PEFT writes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::keys::{Reader, normalize_key};
use super::st::{self, OutEntry, StFile};
use super::{
    AdaLoraModule, BoftModule, C3aModule, CONFIG_FILE, FourierFtModule, HfError, HraModule, Ia3Module, LOHA_KEYS,
    LnTuningModule, LohaModule, LokrModule, LoraModule, MAX_ADAPTER_BYTES, MAX_CONFIG_BYTES, MissModule, OftModule,
    PeftConfig, RANDLORA_A_KEY, RANDLORA_B_KEY, RandLoraModule, RandLoraShared, RoadModule, ShiraModule,
    TrainableTokensModule, VBLORA_BANK_KEY, VERA_A_KEY, VERA_B_KEY, VbLoraBank, VbLoraModule, VbLoraStored, VeraModule,
    VeraProjections, WEIGHTS_FILE,
};

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
    /// AdaLoRA modules, in the order of their keys.
    pub adalora: Vec<AdaLoraModule>,
    /// MiSS modules, in the order of their keys.
    pub miss: Vec<MissModule>,
    /// HRA modules, in the order of their keys.
    pub hra: Vec<HraModule>,
    /// OFT modules, in the order of their keys.
    pub oft: Vec<OftModule>,
    /// BOFT modules, in the order of their keys.
    pub boft: Vec<BoftModule>,
    /// FourierFT modules, in the order of their keys.
    pub fourierft: Vec<FourierFtModule>,
    /// RandLoRA modules, in the order of their keys.
    pub randlora: Vec<RandLoraModule>,
    /// VB-LoRA modules, in the order of their keys.
    pub vblora: Vec<VbLoraModule>,
    /// VB-LoRA's shared vector bank.
    pub vblora_bank: Option<VbLoraBank>,
    /// RandLoRA's shared bases.
    pub randlora_bases: Option<RandLoraShared>,
    /// RoAd modules, in the order of their keys.
    pub road: Vec<RoadModule>,
    /// C3A modules, in the order of their keys.
    pub c3a: Vec<C3aModule>,
    /// SHiRA modules, in the order of their keys.
    pub shira: Vec<ShiraModule>,
    /// LN tuning modules, in the order of their keys.
    pub ln_tuning: Vec<LnTuningModule>,
    /// Embeddings with trainable tokens (a `TRAINABLE_TOKENS` adapter's, or
    /// a LoRA's `trainable_token_indices`), in the order of their keys.
    pub trainable_tokens: Vec<TrainableTokensModule>,
    /// Whole-tensor replacements.
    pub replacements: Vec<HfTensor>,
    /// Tensors PEFT saves that act in its training only (VeLoRA's
    /// `lora_velora_embed`, MonteCLoRA's `lora_monteclora_sampler.*`),
    /// named without `base_model.model.`: written back unchanged, never
    /// read by a forward or a merge.
    pub training_state: Vec<HfTensor>,
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

    pub(super) fn read_dir_with(dir: &Path, read: Reader<'_>) -> Result<Self, HfError> {
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
                let e = e.ok_or_else(|| HfError::missing("prompt_embeddings"))?;
                if file.entries.len() != 1 {
                    return Err(HfError::TensorCount {
                        found: file.entries.len(),
                        expected: "prompt learning saves one",
                    });
                }
                let rows = pc.num_virtual_tokens * pc.num_transformer_submodules.max(1);
                let cols = if pc.prefix { pc.num_layers * 2 * pc.token_dim } else { pc.token_dim };
                if e.shape != [rows, cols] {
                    return Err(HfError::shape(&e.name, &e.shape, format!("[{rows}, {cols}] (from the config)")));
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
            PeftConfig::AdaLora(c) => out.read_adalora(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Miss(c) => out.read_miss(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Hra(c) => out.read_hra(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Oft(c) => out.read_oft(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Boft(c) => out.read_boft(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::FourierFt(c) => out.read_fourierft(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::RandLora(c) => out.read_randlora(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::VbLora(c) => out.read_vblora(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Road(c) => out.read_road(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::C3a(c) => out.read_c3a(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::Shira(c) => out.read_shira(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::LnTuning(c) => out.read_ln_tuning(c, &file, read).map_err(|e| e.in_file(&path))?,
            PeftConfig::TrainableTokens(c) => {
                out.read_trainable_tokens(c, &file, read).map_err(|e| e.in_file(&path))?
            }
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
            adalora: Vec::new(),
            miss: Vec::new(),
            hra: Vec::new(),
            oft: Vec::new(),
            boft: Vec::new(),
            fourierft: Vec::new(),
            randlora: Vec::new(),
            vblora: Vec::new(),
            vblora_bank: None,
            randlora_bases: None,
            road: Vec::new(),
            c3a: Vec::new(),
            shira: Vec::new(),
            ln_tuning: Vec::new(),
            trainable_tokens: Vec::new(),
            replacements: Vec::new(),
            training_state: Vec::new(),
            prompt: None,
            dtype,
            metadata,
            source: None,
        }
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
            PeftConfig::AdaLora(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Miss(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Hra(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Oft(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Boft(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::FourierFt(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::RandLora(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::VbLora(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Road(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::C3a(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::Shira(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::LnTuning(c) => serde_json::Value::Object(c.raw.clone()),
            PeftConfig::TrainableTokens(c) => serde_json::Value::Object(c.raw.clone()),
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
        for m in &self.adalora {
            for ((key, shape, data), dtype) in m.stored().into_iter().zip(&m.dtypes) {
                tensors.push((format!("base_model.model.{}.{key}", m.name), *dtype, shape, data));
            }
        }
        for m in &self.shira {
            let (key, n) = (format!("base_model.model.{}", m.name), m.weight.len());
            tensors.push((format!("{key}.shira_weight"), m.dtype, vec![n], &m.weight));
            tensors.push((format!("{key}.shira_indices"), Dtype::I32, vec![2, n], &m.indices));
        }
        for m in &self.c3a {
            let shape = vec![m.n_out / m.block, m.n_in / m.block, m.block];
            tensors.push((format!("base_model.model.{}.c3a_kernel", m.name), m.dtype, shape, &m.kernel));
        }
        for m in &self.road {
            let (key, len) = (format!("base_model.model.{}", m.name), m.theta.len());
            tensors.push((format!("{key}.road_theta"), m.dtypes[0], vec![len], &m.theta));
            tensors.push((format!("{key}.road_alpha"), m.dtypes[1], vec![len], &m.alpha));
        }
        self.newer_tensors(&mut tensors);
        for m in &self.boft {
            let key = |k: &str| format!("base_model.model.{}.{k}", m.name);
            tensors.push((key("boft_R"), m.dtypes[0], m.shape.to_vec(), &m.r));
            tensors.push((key("boft_s"), m.dtypes[1], vec![m.s.len(), 1], &m.s));
        }
        for m in &self.oft {
            let shape = vec![m.rows, m.spec.block * (m.spec.block - 1) / 2];
            tensors.push((format!("base_model.model.{}.{}", m.name, m.key()), m.dtype, shape, &m.v));
        }
        for m in &self.hra {
            tensors.push((format!("base_model.model.{}.hra_u", m.name), m.dtype, vec![m.n_in, m.r], &m.u));
        }
        for m in &self.miss {
            tensors.push((format!("base_model.model.{}.miss_block", m.name), m.dtype, m.shape.clone(), &m.d));
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
        for m in &self.ln_tuning {
            for t in &m.params {
                let param = t.name.strip_prefix(m.name.as_str()).unwrap_or(&t.name);
                let key = format!("base_model.model.{}.ln_tuning_layers{param}", m.name);
                tensors.push((key, t.dtype, t.shape.clone(), &t.data));
            }
        }
        for m in &self.trainable_tokens {
            tensors.push((m.key(), m.dtype, vec![m.indices.len(), m.dim], &m.rows));
        }
        for r in self.replacements.iter().chain(&self.training_state) {
            tensors.push((format!("base_model.model.{}", r.name), r.dtype, r.shape.clone(), &r.data));
        }
        if let Some(p) = &self.prompt {
            tensors.push((p.name.clone(), p.dtype, p.shape.clone(), &p.data));
        }
        tensors
    }

    /// RandLoRA's and FourierFT's tensors, in [`tensors`](Self::tensors)'
    /// order.
    fn newer_tensors<'s>(&'s self, tensors: &mut Vec<(String, Dtype, Vec<usize>, &'s [f32])>) {
        for m in &self.vblora {
            let key = |k: &str| format!("base_model.model.{}.{k}", m.name);
            match &m.stored {
                VbLoraStored::Logits => {
                    tensors.push((key("vblora_logits_A"), m.dtypes[0], m.shapes[0].to_vec(), &m.logits_a));
                    tensors.push((key("vblora_logits_B"), m.dtypes[1], m.shapes[1].to_vec(), &m.logits_b));
                }
                VbLoraStored::TopK(parts) => {
                    for (which, [ix, w]) in ["A", "B"].iter().zip(parts.iter()) {
                        tensors.push((
                            key(&format!("vblora_logits_{which}_topk_indices")),
                            ix.dtype,
                            ix.shape.clone(),
                            &ix.data,
                        ));
                        tensors.push((
                            key(&format!("vblora_logits_{which}_topk_weights")),
                            w.dtype,
                            w.shape.clone(),
                            &w.data,
                        ));
                    }
                }
            }
        }
        if let Some(b) = &self.vblora_bank {
            tensors.push((VBLORA_BANK_KEY.into(), b.dtype, b.shape.to_vec(), &b.v));
        }
        for m in &self.randlora {
            let key = |k: &str| format!("base_model.model.{}.{k}", m.name);
            tensors.push((key("randlora_lambda"), m.dtypes[0], m.lambda_shape.to_vec(), &m.lambda));
            tensors.push((key("randlora_gamma"), m.dtypes[1], m.gamma_shape.to_vec(), &m.gamma));
            if let (true, Some(p)) = (m.copies, &self.randlora_bases) {
                tensors.push((key("randlora_A"), p.dtypes[0], p.a_shape.to_vec(), &p.a));
                tensors.push((key("randlora_B"), p.dtypes[1], p.b_shape.to_vec(), &p.b));
            }
        }
        if let Some(p) = &self.randlora_bases {
            tensors.push((RANDLORA_A_KEY.into(), p.dtypes[0], p.a_shape.to_vec(), &p.a));
            tensors.push((RANDLORA_B_KEY.into(), p.dtypes[1], p.b_shape.to_vec(), &p.b));
        }
        for m in &self.fourierft {
            let key = format!("base_model.model.{}.fourierft_spectrum", m.name);
            tensors.push((key, m.dtype, vec![m.spectrum.len()], &m.spectrum));
        }
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
/// [`HfError::TensorShape`] for bytes that do not fill the shape; the reader's
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
            return Err(HfError::shape(*name, &e.shape, format!("{} bytes of data", data.len())));
        }
        bytes.extend_from_slice(data);
    }
    let config = serde_json::to_vec_pretty(config).map_err(HfError::json)?;
    crate::files::write_dir(dir, &[(CONFIG_FILE, &config), (WEIGHTS_FILE, &bytes)], force, |tmp| {
        HfAdapter::read_dir(tmp).map(|_| ())
    })
}
