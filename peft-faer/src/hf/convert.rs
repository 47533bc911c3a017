//! Conversion between this crate's adapter format (`.peft`, see
//! `peft_core::format`) and PEFT directories, both ways, bit-exact, each
//! tensor in its own element type.
//!
//! * PEFT -> `.peft`: the method from `peft_type`; the whole
//!   `adapter_config.json` is kept as string entries (`adapter_config_json`,
//!   then `adapter_config_json.1`, `.2`, ... for a config longer than the
//!   format's 65535-byte strings), beside typed copies of the fields that
//!   carry the math (`r`, `lora_alpha`, `use_rslora`, `num_virtual_tokens`,
//!   ...); tensors keep PEFT's names without `base_model.model.` and their
//!   element type (f32, f16 or bf16).
//! * `.peft` -> PEFT: the config is `adapter_config_json` when present, or
//!   built from the typed entries (for files written by `peft finetune`);
//!   every entry of the `.peft` configuration is also stored in the
//!   safetensors `__metadata__` under `peft_rs.` so that converting back
//!   restores the `.peft` file byte for byte. The folder is read back with
//!   [`HfAdapter::read_dir`] (what `inspect` and `merge` use) before it is
//!   committed, so a `.peft` file PEFT could not load is refused.
//!
//! **The config file is the source of truth.** The `peft_rs.` metadata is
//! used only if the config it implies equals `adapter_config.json` as it is
//! now; after an edit (`lora_alpha`, `use_rslora`, ...) it is ignored and
//! the `.peft` file is built from the config, as for a folder PEFT wrote.
//!
//! Bottleneck adapters have no PEFT equivalent and are refused.

use std::collections::BTreeMap;
use std::path::Path;

use peft_core::format::{self, AdapterFile, Value};
use peft_core::optim::Method;
use safetensors::Dtype;
use serde_json::json;

use super::{HfAdapter, HfError, HfTensor, LoraModule, PeftConfig, st};

const KEYS: &str = "peft_rs.keys";
const PREFIX: &str = "peft_rs.";
const CONFIG_KEY: &str = "adapter_config_json";

fn encode_value(v: &Value<'_>) -> String {
    match v {
        Value::U64(x) => format!("u64:{x}"),
        Value::F64(x) => format!("f64:{:016x}", x.to_bits()),
        Value::Bool(b) => format!("bool:{b}"),
        Value::Str(s) => format!("str:{s}"),
    }
}

fn decode_value(s: &str) -> Option<Value<'_>> {
    let (tag, rest) = s.split_once(':')?;
    Some(match tag {
        "u64" => Value::U64(rest.parse().ok()?),
        "f64" => Value::F64(f64::from_bits(u64::from_str_radix(rest, 16).ok()?)),
        "bool" => Value::Bool(rest.parse().ok()?),
        "str" => Value::Str(rest),
        _ => return None,
    })
}

/// Longest string a `.peft` configuration entry holds.
const MAX_STR: usize = u16::MAX as usize;

/// `text` in pieces of at most [`MAX_STR`] bytes, cut at character
/// boundaries, under the keys `adapter_config_json`,
/// `adapter_config_json.1`, ...
fn config_chunks(text: &str) -> Vec<(String, &str)> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() || out.is_empty() {
        let mut cut = rest.len().min(MAX_STR);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        let key = if out.is_empty() { CONFIG_KEY.to_string() } else { format!("{CONFIG_KEY}.{}", out.len()) };
        out.push((key, piece));
        rest = tail;
    }
    out
}

/// A lookup of `.peft` configuration entries by key.
type Get<'g, 'a> = &'g dyn Fn(&str) -> Option<Value<'a>>;

/// The config text stored in `get`'s entries (joined chunks), if any.
fn stored_config(get: Get<'_, '_>) -> Option<String> {
    let Some(Value::Str(first)) = get(CONFIG_KEY) else { return None };
    let mut text = first.to_string();
    for i in 1.. {
        match get(&format!("{CONFIG_KEY}.{i}")) {
            Some(Value::Str(piece)) => text.push_str(piece),
            _ => break,
        }
    }
    Some(text)
}

/// The PEFT config a `.peft` configuration implies: its stored
/// `adapter_config.json`, or one built from its typed entries.
fn implied_config(method: Method, get: Get<'_, '_>) -> Result<serde_json::Value, HfError> {
    match stored_config(get) {
        Some(text) => serde_json::from_str(&text).map_err(HfError::json),
        None => generated_config(method, get),
    }
}

fn format_dtype(d: Dtype) -> Result<format::Dtype, HfError> {
    match d {
        Dtype::F32 => Ok(format::Dtype::F32),
        Dtype::F16 => Ok(format::Dtype::F16),
        Dtype::BF16 => Ok(format::Dtype::Bf16),
        d => Err(HfError::Unsupported(format!("element type {d:?}"))),
    }
}

fn hf_dtype(d: format::Dtype) -> Result<Dtype, HfError> {
    match d {
        format::Dtype::F32 => Ok(Dtype::F32),
        format::Dtype::F16 => Ok(Dtype::F16),
        format::Dtype::Bf16 => Ok(Dtype::BF16),
        _ => Err(HfError::Unsupported("f64 tensors (PEFT files are f32, f16 or bf16)".into())),
    }
}

/// The `.peft` entries that type a PEFT config's numbers (the config's
/// text travels beside them).
fn typed_entries(config: &PeftConfig) -> Vec<(String, Value<'static>)> {
    let mut out: Vec<(String, Value<'static>)> = Vec::new();
    match config {
        PeftConfig::Lora(c) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            out.push(("lora_alpha".into(), Value::F64(c.lora_alpha)));
            out.push(("use_rslora".into(), Value::Bool(c.use_rslora)));
        }
        PeftConfig::Prompt(c) => {
            out.push(("num_virtual_tokens".into(), Value::U64(c.num_virtual_tokens as u64)));
            out.push(("token_dim".into(), Value::U64(c.token_dim as u64)));
            out.push(("num_layers".into(), Value::U64(c.num_layers as u64)));
            out.push(("num_attention_heads".into(), Value::U64(c.num_attention_heads as u64)));
        }
        PeftConfig::Loha(c) | PeftConfig::Lokr(super::LokrConfig { common: c, .. }) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            out.push(("alpha".into(), Value::F64(c.alpha)));
        }
        PeftConfig::Vera(c) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            out.push(("d_initial".into(), Value::F64(c.d_initial)));
        }
        PeftConfig::AdaLora(c) => {
            out.push(("init_r".into(), Value::U64(c.init_r as u64)));
            out.push(("lora_alpha".into(), Value::F64(c.lora_alpha)));
            let total_step = c.raw.get("total_step").and_then(serde_json::Value::as_u64).unwrap_or(1);
            out.push(("total_step".into(), Value::U64(total_step)));
        }
        PeftConfig::Miss(c) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            let (variant, mini_r) = match c.variant {
                peft_core::miss::MissVariant::Balance => ("balance", 1),
                peft_core::miss::MissVariant::Mini { mini_r } => ("mini", mini_r),
                peft_core::miss::MissVariant::Bat => ("bat", 1),
            };
            out.push(("variant".into(), Value::Str(variant)));
            out.push(("mini_r".into(), Value::U64(mini_r as u64)));
        }
        PeftConfig::Hra(c) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            out.push(("apply_GS".into(), Value::Bool(c.apply_gs)));
        }
        PeftConfig::Road(c) => {
            let variant = match c.variant {
                peft_core::road::RoadVariant::Road1 => "road_1",
                peft_core::road::RoadVariant::Road2 => "road_2",
                peft_core::road::RoadVariant::Road4 => "road_4",
            };
            out.push(("variant".into(), Value::Str(variant)));
            out.push(("group_size".into(), Value::U64(c.group_size as u64)));
        }
        PeftConfig::C3a(c) => out.push(("block_size".into(), Value::U64(c.block_size as u64))),
        PeftConfig::VbLora(c) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            out.push(("num_vectors".into(), Value::U64(c.num_vectors as u64)));
            out.push(("vector_length".into(), Value::U64(c.vector_length as u64)));
            out.push(("topk".into(), Value::U64(c.topk as u64)));
        }
        PeftConfig::RandLora(c) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            out.push(("randlora_alpha".into(), Value::F64(c.randlora_alpha)));
        }
        PeftConfig::FourierFt(c) => {
            out.push(("n_frequency".into(), Value::U64(c.n_frequency as u64)));
            out.push(("scaling".into(), Value::F64(c.scaling)));
            out.push(("random_loc_seed".into(), Value::U64(c.random_loc_seed)));
        }
        PeftConfig::Boft(c) => {
            out.push(("boft_block_size".into(), Value::U64(c.boft_block_size as u64)));
            out.push(("boft_block_num".into(), Value::U64(c.boft_block_num as u64)));
            out.push(("boft_n_butterfly_factor".into(), Value::U64(c.boft_n_butterfly_factor as u64)));
        }
        PeftConfig::Oft(c) => {
            out.push(("r".into(), Value::U64(c.r as u64)));
            out.push(("oft_block_size".into(), Value::U64(c.oft_block_size as u64)));
            out.push(("use_cayley_neumann".into(), Value::Bool(c.use_cayley_neumann)));
            out.push(("num_cayley_neumann_terms".into(), Value::U64(c.num_cayley_neumann_terms as u64)));
            out.push(("coft".into(), Value::Bool(c.coft)));
            out.push(("eps".into(), Value::F64(c.eps)));
            out.push(("block_share".into(), Value::Bool(c.block_share)));
        }
        // Trainable tokens' indices travel in the config's text.
        PeftConfig::Ia3(_) | PeftConfig::Shira(_) | PeftConfig::LnTuning(_) | PeftConfig::TrainableTokens(_) => {}
    }
    out
}

/// A PEFT directory as `.peft` bytes.
///
/// # Errors
/// [`HfAdapter::read_dir`]'s errors; [`HfError::Unsupported`] for an
/// element type other than f32/f16/bf16.
pub fn peft_dir_to_own(src: &Path) -> Result<Vec<u8>, HfError> {
    let ad = HfAdapter::read_dir(src)?;
    let config_json = ad.config_json();
    let config_text = serde_json::to_string(&config_json).map_err(HfError::json)?;
    let method = match &ad.config {
        PeftConfig::Lora(_) => Method::Lora,
        PeftConfig::Prompt(p) if p.prefix => Method::Prefix,
        PeftConfig::Prompt(_) => Method::Prompt,
        PeftConfig::Ia3(_) => Method::Ia3,
        PeftConfig::Loha(_) => Method::Loha,
        PeftConfig::Lokr(_) => Method::Lokr,
        PeftConfig::Vera(_) => Method::Vera,
        PeftConfig::AdaLora(_) => Method::AdaLora,
        PeftConfig::Miss(_) => Method::Miss,
        PeftConfig::Hra(_) => Method::Hra,
        PeftConfig::Oft(_) => Method::Oft,
        PeftConfig::Boft(_) => Method::Boft,
        PeftConfig::FourierFt(_) => Method::FourierFt,
        PeftConfig::RandLora(_) => Method::RandLora,
        PeftConfig::VbLora(c) if c.save_only_topk_weights => {
            return Err(HfError::Unsupported(
                "VB-LoRA's top-k form in .peft files (its integer indices have no .peft element type)".into(),
            ));
        }
        PeftConfig::VbLora(_) => Method::VbLora,
        PeftConfig::Road(_) => Method::Road,
        PeftConfig::C3a(_) => Method::C3a,
        PeftConfig::LnTuning(_) => Method::LnTuning,
        PeftConfig::TrainableTokens(_) => Method::TrainableTokens,
        PeftConfig::Shira(_) => {
            return Err(HfError::Unsupported(
                "SHiRA in .peft files (its I32 indices have no .peft element type)".into(),
            ));
        }
    };
    let restored = restored_entries(&ad, method, &config_json);
    let mut config: Vec<(String, Value<'_>)> = Vec::new();
    match &restored {
        // Written by `own_to_peft_dir` from this very config: the original entries.
        Some(entries) => config.extend(entries.iter().map(|(k, v)| (k.clone(), v.as_value()))),
        None => {
            config.extend(config_chunks(&config_text).into_iter().map(|(k, v)| (k, Value::Str(v))));
            config.extend(typed_entries(&ad.config));
        }
    }
    let tensors = ad.tensors();
    let mut stored: Vec<(String, format::Dtype, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, dtype, _, data) in &tensors {
        let mut bytes = Vec::new();
        st::from_f32(*dtype, data, &mut bytes)?;
        let name = name.strip_prefix("base_model.model.").unwrap_or(name).to_string();
        stored.push((name, format_dtype(*dtype)?, bytes));
    }
    let raw: Vec<format::RawTensor<'_>> = stored
        .iter()
        .zip(&tensors)
        .map(|((name, dtype, bytes), (_, _, shape, _))| format::RawTensor { name, dtype: *dtype, shape, data: bytes })
        .collect();
    let config_ref: Vec<(&str, Value<'_>)> = config.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let mut out = vec![0u8; format::encoded_len_raw(&config_ref, &raw)?];
    let n = format::encode_raw(method, &config_ref, &raw, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// A configuration value, owned (decoded from the metadata).
enum Owned {
    U64(u64),
    F64(f64),
    Bool(bool),
    Str(String),
}

impl Owned {
    fn as_value(&self) -> Value<'_> {
        match self {
            Owned::U64(x) => Value::U64(*x),
            Owned::F64(x) => Value::F64(*x),
            Owned::Bool(b) => Value::Bool(*b),
            Owned::Str(s) => Value::Str(s),
        }
    }
}

/// The `.peft` entries stored in the metadata by [`own_to_peft_dir`], if
/// they are complete, readable, and imply exactly `config` (the config
/// file wins: metadata that disagrees with it is ignored).
fn restored_entries(ad: &HfAdapter, method: Method, config: &serde_json::Value) -> Option<Vec<(String, Owned)>> {
    let keys = ad.metadata.get(KEYS)?;
    let mut entries = Vec::new();
    for k in keys.split(',').filter(|k| !k.is_empty()) {
        let v = match decode_value(ad.metadata.get(&format!("{PREFIX}{k}"))?)? {
            Value::U64(x) => Owned::U64(x),
            Value::F64(x) => Owned::F64(x),
            Value::Bool(b) => Owned::Bool(b),
            Value::Str(s) => Owned::Str(s.to_string()),
        };
        entries.push((k.to_string(), v));
    }
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_value());
    (implied_config(method, &get).ok()? == *config).then_some(entries)
}

/// `.peft` bytes as a new PEFT directory `dst`, replacing an existing one
/// only if `force` (see [`HfAdapter::write_dir`]: written atomically, and
/// read back before it is committed).
///
/// # Errors
/// The format's errors; [`HfError::Unsupported`] for bottleneck adapters
/// and f64 tensors; [`HfError::Config`] if the entries cannot make a PEFT
/// config; [`HfError::MissingTensor`] for a `lora_B` or bias without its
/// `lora_A`; [`HfError::TensorShape`] for factors that are not matrices of
/// one rank; the reader's
/// errors for anything else PEFT could not load; [`HfError::OutputExists`].
pub fn own_to_peft_dir(bytes: &[u8], dst: &Path, force: bool) -> Result<(), HfError> {
    let f = AdapterFile::parse(bytes)?;
    let mut metadata = BTreeMap::new();
    let keys: Vec<&str> = f.config().map(|(k, _)| k).collect();
    metadata.insert(KEYS.to_string(), keys.join(","));
    for (k, v) in f.config() {
        metadata.insert(format!("{PREFIX}{k}"), encode_value(&v));
    }
    let get = |k: &str| f.get(k);
    let config_text = implied_config(f.method(), &get)?.to_string();
    let config = PeftConfig::parse(&config_text)?;
    let first = f.tensors().next().map_or(Ok(Dtype::F32), |t| hf_dtype(t.dtype()))?;
    let mut ad = HfAdapter::empty(config.clone(), first, metadata);
    let read = |t: &format::TensorView<'_>| -> Result<HfTensor, HfError> {
        let mut data = vec![0.0f32; t.numel()];
        t.read_into(&mut data)?;
        Ok(HfTensor { name: t.name().to_string(), dtype: hf_dtype(t.dtype())?, shape: t.shape().to_vec(), data })
    };
    match &config {
        PeftConfig::Ia3(_)
        | PeftConfig::Loha(_)
        | PeftConfig::Lokr(_)
        | PeftConfig::Vera(_)
        | PeftConfig::AdaLora(_)
        | PeftConfig::Miss(_)
        | PeftConfig::Hra(_)
        | PeftConfig::Oft(_)
        | PeftConfig::Boft(_)
        | PeftConfig::FourierFt(_)
        | PeftConfig::RandLora(_)
        | PeftConfig::VbLora(_)
        | PeftConfig::Road(_)
        | PeftConfig::C3a(_)
        | PeftConfig::LnTuning(_)
        | PeftConfig::TrainableTokens(_)
        | PeftConfig::Shira(_) => {
            // Tensors as stored, under PEFT's keys; the reader checks them
            // against the config before the folder is committed.
            let names: Vec<String> = f
                .tensors()
                .map(|t| {
                    let n = t.name();
                    if n.starts_with("base_model.") { n.to_string() } else { format!("base_model.model.{n}") }
                })
                .collect();
            let views: Vec<format::TensorView<'_>> = f.tensors().collect();
            let mut raw = Vec::with_capacity(views.len());
            for (name, t) in names.iter().zip(&views) {
                raw.push((name.as_str(), hf_dtype(t.dtype())?, t.shape(), t.bytes()));
            }
            let config_json: serde_json::Value = serde_json::from_str(&config_text).map_err(HfError::json)?;
            return super::write_raw_dir(dst, &config_json, &ad.metadata, &raw, force);
        }
        PeftConfig::Prompt(_) => ad.prompt = Some(read(&f.tensor("prompt_embeddings")?)?),
        PeftConfig::Lora(lc) => lora_modules(&f, lc, &mut ad, &read)?,
    }
    ad.write_dir(dst, force)
}

/// The LoRA modules (and the tensors they do not own: training-only state,
/// replacements) of a `.peft` file's tensors, into `ad`.
///
/// # Errors
/// [`HfError::MissingTensor`] for a `lora_B` or bias without its `lora_A`
/// (or the reverse); [`HfError::TensorShape`] for factors that are not
/// matrices of one rank; `read`'s errors.
fn lora_modules(
    f: &AdapterFile<'_>,
    lc: &super::HfLoraConfig,
    ad: &mut HfAdapter,
    read: &dyn Fn(&format::TensorView<'_>) -> Result<HfTensor, HfError>,
) -> Result<(), HfError> {
    for t in f.tensors() {
        let name = t.name();
        let linear = name.strip_suffix(".lora_A.weight").map(|m| (m, false));
        if let Some((module, embedding)) = linear.or(name.strip_suffix(".lora_embedding_A").map(|m| (m, true))) {
            let b_name = if embedding { "lora_embedding_B" } else { "lora_B.weight" };
            let b = f
                .tensor(&format!("{module}.{b_name}"))
                .map_err(|_| HfError::MissingTensor { module: module.into(), tensor: b_name.into() })?;
            let (&[r, n_in], &[n_out, r2]) = (t.shape(), b.shape()) else {
                let bad = if t.shape().len() == 2 { &b } else { &t };
                return Err(HfError::shape(bad.name(), bad.shape(), "a matrix"));
            };
            if r != r2 {
                return Err(HfError::shape(b.name(), b.shape(), format!("[{n_out}, {r}]: lora_A has rank {r}")));
            }
            let bias = f.tensor(&format!("{module}.lora_B.bias")).ok().map(|t| read(&t)).transpose()?;
            let (a, b) = (read(&t)?, read(&b)?);
            let magnitude = f.tensor(&format!("{module}.lora_magnitude_vector")).ok().map(|t| read(&t)).transpose()?;
            ad.modules.push(LoraModule {
                name: module.to_string(),
                dtypes: [
                    a.dtype,
                    b.dtype,
                    bias.as_ref().map_or(b.dtype, |t| t.dtype),
                    magnitude.as_ref().map_or(b.dtype, |t| t.dtype),
                ],
                a: a.data,
                b: b.data,
                lora_bias: bias.map(|t| t.data),
                magnitude: magnitude.map(|t| t.data),
                embedding,
                r,
                n_in,
                n_out,
                alpha: lc.alpha_for(module),
                scale: lc.scale_for(module)?,
            });
        } else if let Some(module) = name
            .strip_suffix(".lora_B.weight")
            .or(name.strip_suffix(".lora_B.bias"))
            .or(name.strip_suffix(".lora_magnitude_vector"))
            .or(name.strip_suffix(".lora_embedding_B"))
        {
            let has_a = |n: &str| f.tensor(&format!("{module}.{n}")).is_ok();
            if !has_a("lora_A.weight") && !has_a("lora_embedding_A") {
                return Err(HfError::MissingTensor { module: module.into(), tensor: "lora_A.weight".into() });
            }
        } else if let Some(module) = name.strip_suffix(super::trainable_tokens::WRAPPED_DELTA) {
            // LoRA's `trainable_token_indices`: the rows of the tokens the config lists.
            let tokens = lc.trainable_token_indices.as_ref().and_then(|t| t.of(module));
            let field =
                || HfError::FieldTensor { field: "trainable_token_indices", tensor: name.into(), present: true };
            let (indices, rows) = (tokens.ok_or_else(field)?.to_vec(), read(&t)?);
            let (&[k, dim], dtype) = (rows.shape.as_slice(), rows.dtype) else {
                return Err(HfError::shape(name, &rows.shape, "a matrix [k, dim]"));
            };
            if k != indices.len() {
                return Err(HfError::shape(name, &rows.shape, format!("[{}, dim]", indices.len())));
            }
            let (name, rows) = (module.to_string(), rows.data);
            ad.trainable_tokens.push(super::TrainableTokensModule { name, indices, rows, dim, dtype, wrapped: true });
        } else if super::lora::training_state(lc, name).is_some() {
            ad.training_state.push(read(&t)?);
        } else {
            ad.replacements.push(read(&t)?);
        }
    }
    Ok(())
}

/// AdaLoRA's PEFT config at rank `init_r` without a rank pattern. PEFT's
/// config refuses `total_step` unset; `target_r` only drives training.
fn adalora_config(init_r: u64, alpha: serde_json::Value, targets: Vec<String>, total_step: u64) -> serde_json::Value {
    json!({
        "peft_type": "ADALORA", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "r": 8, "init_r": init_r, "target_r": init_r,
        "lora_alpha": alpha, "target_modules": targets,
        "lora_dropout": 0.0, "fan_in_fan_out": false, "bias": "none", "modules_to_save": null,
        "init_lora_weights": true, "layers_to_transform": null, "layers_pattern": null,
        "rank_pattern": null, "alpha_pattern": {}, "use_dora": false, "lora_bias": false,
        "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5,
        "total_step": total_step,
    })
}

/// MiSS's PEFT config; `variant` is the `.peft` entry (`"balance"`,
/// `"mini"`, `"bat"`), PEFT's `init_weights` (`true`, `"mini"`, `"bat"`).
fn miss_config(r: u64, mini_r: u64, variant: Option<Value<'_>>, targets: Vec<String>) -> serde_json::Value {
    let init = match variant {
        Some(Value::Str("bat")) => json!("bat"),
        Some(Value::Str("mini")) => json!("mini"),
        _ => json!(true),
    };
    json!({
        "peft_type": "MISS", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "r": r, "mini_r": mini_r, "miss_dropout": 0.0,
        "target_modules": targets, "init_weights": init, "layers_to_transform": null,
        "layers_pattern": null, "bias": "none", "modules_to_save": null,
    })
}

/// (IA)^3's PEFT config.
fn ia3_config(targets: Vec<String>, feedforward: Vec<String>) -> serde_json::Value {
    json!({
        "peft_type": "IA3", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "target_modules": targets, "feedforward_modules": feedforward,
        "fan_in_fan_out": false, "modules_to_save": null, "init_ia3_weights": true,
    })
}

/// C3A's PEFT config (one block size for every module).
fn c3a_config(block_size: u64, targets: Vec<String>) -> serde_json::Value {
    json!({
        "peft_type": "C3A", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "block_size": block_size, "block_size_pattern": {}, "init_weights": true,
        "target_modules": targets, "bias": "none", "modules_to_save": null, "layers_to_transform": null,
        "layers_pattern": null,
    })
}

/// LN tuning's PEFT config: the targets alone.
fn ln_tuning_config(targets: Vec<String>) -> serde_json::Value {
    json!({
        "peft_type": "LN_TUNING", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "target_modules": targets, "exclude_modules": null, "modules_to_save": null,
    })
}

/// RoAd's PEFT config (`variant` road_1 unless the entry says otherwise).
fn road_config(variant: Option<Value<'_>>, group_size: u64, targets: Vec<String>) -> serde_json::Value {
    let variant = match variant {
        Some(Value::Str(v @ ("road_2" | "road_4"))) => v,
        _ => "road_1",
    };
    json!({
        "peft_type": "ROAD", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "variant": variant, "group_size": group_size, "init_weights": true,
        "target_modules": targets, "modules_to_save": null,
    })
}

/// OFT's PEFT config from a `.peft` file's entries (PEFT's defaults for
/// those absent).
fn oft_config(get: Get<'_, '_>, targets: Vec<String>) -> serde_json::Value {
    let u = |k: &str, d: u64| match get(k) {
        Some(Value::U64(x)) => x,
        _ => d,
    };
    let flag = |k: &str, d: bool| match get(k) {
        Some(Value::Bool(x)) => x,
        _ => d,
    };
    let eps = match get("eps") {
        Some(Value::F64(x)) => x,
        _ => 6e-5,
    };
    json!({
        "peft_type": "OFT", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "r": u("r", 0), "oft_block_size": u("oft_block_size", 32),
        "use_cayley_neumann": flag("use_cayley_neumann", true),
        "num_cayley_neumann_terms": u("num_cayley_neumann_terms", 5), "coft": flag("coft", false), "eps": eps,
        "block_share": flag("block_share", false), "module_dropout": 0.0, "fan_in_fan_out": false,
        "bias": "none", "init_weights": true, "target_modules": targets, "modules_to_save": null,
        "layers_to_transform": null, "layers_pattern": null,
    })
}

/// VB-LoRA's PEFT config (the logits whole: `save_only_topk_weights`
/// false).
fn vblora_config(
    u: &dyn Fn(&'static str) -> Result<u64, HfError>,
    targets: Vec<String>,
) -> Result<serde_json::Value, HfError> {
    Ok(json!({
        "peft_type": "VBLORA", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "r": u("r")?, "num_vectors": u("num_vectors")?, "vector_length": u("vector_length")?,
        "topk": u("topk")?, "save_only_topk_weights": false, "vblora_dropout": 0.0, "fan_in_fan_out": false,
        "bias": "none", "init_vector_bank_bound": 0.02, "init_logits_std": 0.1, "target_modules": targets,
        "modules_to_save": null, "layers_to_transform": null, "layers_pattern": null,
    }))
}

/// RandLoRA's PEFT config (the bases travel in the file).
fn randlora_config(r: u64, alpha: serde_json::Value, targets: Vec<String>) -> serde_json::Value {
    json!({
        "peft_type": "RANDLORA", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "r": r, "randlora_alpha": alpha, "save_projection": true, "sparse": false,
        "very_sparse": false, "projection_prng_key": 0, "randlora_dropout": 0.0, "fan_in_fan_out": false,
        "bias": "none", "init_weights": true, "target_modules": targets, "modules_to_save": null,
        "layers_to_transform": null, "layers_pattern": null,
    })
}

/// FourierFT's PEFT config from a `.peft` file's entries (no
/// `n_frequency_pattern`: the entries carry one count).
fn fourierft_config(get: Get<'_, '_>, targets: Vec<String>) -> serde_json::Value {
    let n = match get("n_frequency") {
        Some(Value::U64(x)) => x,
        _ => 1000,
    };
    let seed = match get("random_loc_seed") {
        Some(Value::U64(x)) => x,
        _ => 777,
    };
    let scaling = match get("scaling") {
        Some(Value::F64(x)) => x,
        _ => 150.0,
    };
    json!({
        "peft_type": "FOURIERFT", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "n_frequency": n, "n_frequency_pattern": {}, "scaling": scaling,
        "random_loc_seed": seed, "fan_in_fan_out": false, "bias": "none", "init_weights": false,
        "target_modules": targets, "modules_to_save": null, "layers_to_transform": null, "layers_pattern": null,
    })
}

/// BOFT's PEFT config from a `.peft` file's entries.
fn boft_config(get: Get<'_, '_>, targets: Vec<String>) -> serde_json::Value {
    let u = |k: &str, d: u64| match get(k) {
        Some(Value::U64(x)) => x,
        _ => d,
    };
    json!({
        "peft_type": "BOFT", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "boft_block_size": u("boft_block_size", 4),
        "boft_block_num": u("boft_block_num", 0), "boft_n_butterfly_factor": u("boft_n_butterfly_factor", 1),
        "boft_dropout": 0.0, "fan_in_fan_out": false, "bias": "none", "init_weights": true,
        "target_modules": targets, "modules_to_save": null, "layers_to_transform": null, "layers_pattern": null,
    })
}

/// HRA's PEFT config.
fn hra_config(r: u64, apply_gs: bool, targets: Vec<String>) -> serde_json::Value {
    json!({
        "peft_type": "HRA", "task_type": null, "base_model_name_or_path": null, "revision": null,
        "inference_mode": true, "r": r, "apply_GS": apply_gs,
        "target_modules": targets, "init_weights": true, "layers_to_transform": null,
        "layers_pattern": null, "bias": "none", "modules_to_save": null,
    })
}

/// Prompt or prefix tuning's PEFT config, `u` reading an integer entry.
fn prompt_config(prefix: bool, u: &dyn Fn(&'static str) -> Result<u64, HfError>) -> Result<serde_json::Value, HfError> {
    let d = u("d_model").or_else(|_| u("token_dim"))?;
    let mut cfg = json!({
        "peft_type": if prefix { "PREFIX_TUNING" } else { "PROMPT_TUNING" },
        "task_type": "CAUSAL_LM", "base_model_name_or_path": null, "revision": null, "inference_mode": true,
        "num_virtual_tokens": u("num_virtual_tokens")?, "token_dim": d, "num_transformer_submodules": 1,
        "num_attention_heads": u("num_attention_heads")?, "num_layers": u("num_layers")?,
    });
    if let Some(obj) = cfg.as_object_mut() {
        if prefix {
            obj.insert("encoder_hidden_size".into(), json!(d));
            obj.insert("prefix_projection".into(), json!(false));
        } else {
            obj.insert("prompt_tuning_init".into(), json!("RANDOM"));
        }
    }
    Ok(cfg)
}

/// A PEFT 0.21 config from a `.peft` file's typed entries.
fn generated_config(method: Method, get: Get<'_, '_>) -> Result<serde_json::Value, HfError> {
    let missing = |k: &str| HfError::config(k, "missing from the .peft file, needed for a PEFT config");
    let u = |k: &'static str| match get(k) {
        Some(Value::U64(x)) => Ok(x),
        _ => Err(missing(k)),
    };
    // A comma-separated list ("" is empty).
    let list = |k: &'static str| match get(k) {
        Some(Value::Str(s)) => Ok(s.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect::<Vec<_>>()),
        _ => Err(missing(k)),
    };
    // An f64, written as an integer when it is one (as Python writes `8`).
    let number = |k: &'static str| match get(k) {
        Some(Value::F64(x)) if x.fract() == 0.0 && x.abs() < 1e15 => Ok(json!(x as i64)),
        Some(Value::F64(x)) => Ok(json!(x)),
        _ => Err(missing(k)),
    };
    match method {
        Method::Lora => {
            let targets = list("target_modules")?;
            let alpha = number("lora_alpha")?;
            let rslora = matches!(get("use_rslora"), Some(Value::Bool(true)));
            let dora = matches!(get("use_dora"), Some(Value::Bool(true)));
            Ok(json!({
                "peft_type": "LORA", "task_type": null, "base_model_name_or_path": null, "revision": null,
                "inference_mode": true, "r": u("r")?, "lora_alpha": alpha,
                "use_rslora": rslora,
                "target_modules": targets, "lora_dropout": 0.0, "fan_in_fan_out": false, "bias": "none",
                "modules_to_save": null, "init_lora_weights": true, "layers_to_transform": null,
                "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": dora,
                "lora_bias": false,
            }))
        }
        Method::Ia3 => Ok(ia3_config(list("target_modules")?, list("feedforward_modules")?)),
        Method::Loha | Method::Lokr => {
            let mut cfg = json!({
                "peft_type": if method == Method::Loha { "LOHA" } else { "LOKR" }, "task_type": null,
                "base_model_name_or_path": null, "revision": null, "inference_mode": true,
                "r": u("r")?, "alpha": number("alpha")?, "rank_dropout": 0.0, "module_dropout": 0.0,
                "target_modules": list("target_modules")?, "init_weights": true, "layers_to_transform": null,
                "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null,
            });
            if let Some(obj) = cfg.as_object_mut() {
                if method == Method::Lokr {
                    obj.insert("decompose_both".into(), json!(false));
                    obj.insert("decompose_factor".into(), json!(-1));
                } else {
                    obj.insert("use_effective_conv2d".into(), json!(false));
                }
            }
            Ok(cfg)
        }
        Method::Vera => Ok(json!({
            "peft_type": "VERA", "task_type": null, "base_model_name_or_path": null, "revision": null,
            "inference_mode": true, "r": u("r")?, "target_modules": list("target_modules")?,
            "projection_prng_key": 0, "save_projection": true, "vera_dropout": 0.0, "d_initial": 0.1,
            "fan_in_fan_out": false, "bias": "none", "modules_to_save": null, "init_weights": true,
            "layers_to_transform": null, "layers_pattern": null,
        })),
        // PEFT's config refuses `total_step` unset; without a rank pattern
        // every module has rank init_r, and target_r only drives training.
        Method::AdaLora => {
            let (targets, total_step) = (list("target_modules")?, u("total_step").unwrap_or(1));
            Ok(adalora_config(u("init_r")?, number("lora_alpha")?, targets, total_step))
        }
        Method::Miss => Ok(miss_config(u("r")?, u("mini_r").unwrap_or(1), get("variant"), list("target_modules")?)),
        Method::Shira => {
            Err(HfError::Unsupported("SHiRA in .peft files (its I32 indices have no .peft element type)".into()))
        }
        Method::C3a => Ok(c3a_config(u("block_size")?, list("target_modules")?)),
        Method::LnTuning => Ok(ln_tuning_config(list("target_modules")?)),
        Method::TrainableTokens => {
            let ids: Result<Vec<u32>, _> = list("token_indices")?.iter().map(|s| s.parse::<u32>()).collect();
            let ids = ids.map_err(|_| HfError::config("token_indices", "not a list of token ids"))?;
            Ok(json!({
                "peft_type": "TRAINABLE_TOKENS", "task_type": null, "base_model_name_or_path": null,
                "revision": null, "inference_mode": true, "token_indices": ids,
                "target_modules": list("target_modules")?, "init_weights": true,
            }))
        }
        Method::Road => Ok(road_config(get("variant"), u("group_size")?, list("target_modules")?)),
        Method::Oft => Ok(oft_config(get, list("target_modules")?)),
        Method::Boft => Ok(boft_config(get, list("target_modules")?)),
        Method::FourierFt => Ok(fourierft_config(get, list("target_modules")?)),
        Method::VbLora => vblora_config(&u, list("target_modules")?),
        Method::RandLora => Ok(randlora_config(u("r")?, number("randlora_alpha")?, list("target_modules")?)),
        Method::Hra => {
            Ok(hra_config(u("r")?, matches!(get("apply_GS"), Some(Value::Bool(true))), list("target_modules")?))
        }
        Method::Prompt | Method::Prefix => prompt_config(method == Method::Prefix, &u),
        Method::Adapter => {
            Err(HfError::Unsupported("bottleneck adapters: Hugging Face PEFT has no such adapter type".into()))
        }
    }
}
