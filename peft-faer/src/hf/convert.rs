//! Conversion between this crate's adapter format (`.peft`, see
//! `peft_core::format`) and PEFT directories, both ways, bit-exact.
//!
//! * PEFT -> `.peft`: the method from `peft_type`; the whole
//!   `adapter_config.json` is kept as the string entry
//!   `adapter_config_json`, beside typed copies of the fields that carry
//!   the math (`r`, `lora_alpha`, `use_rslora`, `num_virtual_tokens`, ...);
//!   tensors keep PEFT's names without `base_model.model.` and their element
//!   type (f32, f16 or bf16).
//! * `.peft` -> PEFT: the config is `adapter_config_json` when present, or
//!   built from the typed entries (for files written by `peft finetune`);
//!   every entry of the `.peft` configuration is also stored in the
//!   safetensors `__metadata__` under `peft_rs.` so that converting back
//!   restores the `.peft` file byte for byte.
//!
//! Bottleneck adapters have no PEFT equivalent and are refused.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use peft_core::format::{self, AdapterFile, Tensor, Value};
use peft_core::{Element, Method};
use safetensors::Dtype;
use serde_json::json;

use super::{HfAdapter, HfError, LoraModule, PeftConfig, Replacement};

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

/// Encodes the adapter's tensors (names, shapes, f32 data) in `dtype`.
fn encode_in(
    dtype: Dtype,
    method: Method,
    config: &[(&str, Value<'_>)],
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<Vec<u8>, HfError> {
    fn go<E: Element>(
        method: Method,
        config: &[(&str, Value<'_>)],
        tensors: &[(String, Vec<usize>, &[f32])],
    ) -> Result<Vec<u8>, HfError> {
        let data: Vec<Vec<E>> =
            tensors.iter().map(|(_, _, d)| d.iter().map(|&v| E::from_f64(f64::from(v))).collect()).collect();
        let ts: Vec<Tensor<'_, E>> =
            tensors.iter().zip(&data).map(|((n, s, _), d)| Tensor { name: n, shape: s, data: d }).collect();
        let mut out = vec![0u8; format::encoded_len(config, &ts)?];
        let n = format::encode(method, config, &ts, &mut out)?;
        out.truncate(n);
        Ok(out)
    }
    match dtype {
        Dtype::F32 => go::<f32>(method, config, tensors),
        Dtype::F16 => go::<f16>(method, config, tensors),
        Dtype::BF16 => go::<bf16>(method, config, tensors),
        d => Err(HfError::Unsupported(format!("element type {d:?}"))),
    }
}

/// A PEFT directory as `.peft` bytes.
///
/// # Errors
/// [`HfAdapter::read_dir`]'s errors; [`HfError::Unsupported`] for an
/// element type other than f32/f16/bf16.
pub fn peft_dir_to_own(src: &Path) -> Result<Vec<u8>, HfError> {
    let ad = HfAdapter::read_dir(src)?;
    let config_text = serde_json::to_string(&ad.config_json()).map_err(HfError::json)?;
    let mut config: Vec<(String, Value<'_>)> = Vec::new();
    let restored: Option<Vec<String>> = ad.metadata.get(KEYS).map(|k| k.split(',').map(String::from).collect());
    let method = match &ad.config {
        PeftConfig::Lora(_) => Method::Lora,
        PeftConfig::Prompt(p) if p.prefix => Method::Prefix,
        PeftConfig::Prompt(_) => Method::Prompt,
    };
    match restored {
        // Written by `own_to_peft_dir`: restore the original entries.
        Some(keys) => {
            for k in keys.iter().filter(|k| !k.is_empty()) {
                let raw = ad
                    .metadata
                    .get(&format!("{PREFIX}{k}"))
                    .ok_or_else(|| HfError::Tensor(format!("metadata for {k} missing")))?;
                let v = decode_value(raw).ok_or_else(|| HfError::Tensor(format!("metadata for {k} unreadable")))?;
                config.push((k.clone(), v));
            }
        }
        None => {
            config.push((CONFIG_KEY.into(), Value::Str(&config_text)));
            match &ad.config {
                PeftConfig::Lora(c) => {
                    config.push(("r".into(), Value::U64(c.r as u64)));
                    config.push(("lora_alpha".into(), Value::F64(c.lora_alpha)));
                    config.push(("use_rslora".into(), Value::Bool(c.use_rslora)));
                }
                PeftConfig::Prompt(c) => {
                    config.push(("num_virtual_tokens".into(), Value::U64(c.num_virtual_tokens as u64)));
                    config.push(("token_dim".into(), Value::U64(c.token_dim as u64)));
                    config.push(("num_layers".into(), Value::U64(c.num_layers as u64)));
                    config.push(("num_attention_heads".into(), Value::U64(c.num_attention_heads as u64)));
                }
            }
        }
    }
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for m in &ad.modules {
        tensors.push((format!("{}.lora_A.weight", m.name), vec![m.r, m.n_in], &m.a));
        tensors.push((format!("{}.lora_B.weight", m.name), vec![m.n_out, m.r], &m.b));
        if let Some(b) = &m.lora_bias {
            tensors.push((format!("{}.lora_B.bias", m.name), vec![m.n_out], b));
        }
    }
    for r in &ad.replacements {
        tensors.push((r.name.clone(), r.shape.clone(), &r.data));
    }
    if let Some((shape, data)) = &ad.prompt {
        tensors.push(("prompt_embeddings".into(), shape.clone(), data));
    }
    let config_ref: Vec<(&str, Value<'_>)> = config.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    encode_in(ad.dtype, method, &config_ref, &tensors)
}

/// `.peft` bytes as a new PEFT directory `dst` (written atomically).
///
/// # Errors
/// The format's errors; [`HfError::Unsupported`] for bottleneck adapters;
/// [`HfError::Config`] if the entries cannot make a PEFT config;
/// [`HfError::OutputExists`].
pub fn own_to_peft_dir(bytes: &[u8], dst: &Path) -> Result<(), HfError> {
    let f = AdapterFile::parse(bytes)?;
    let dtype = match f.tensors().next().map(|t| t.dtype()) {
        Some(format::Dtype::F16) => Dtype::F16,
        Some(format::Dtype::Bf16) => Dtype::BF16,
        Some(format::Dtype::F64) => {
            return Err(HfError::Unsupported("f64 adapters (PEFT files are f32, f16 or bf16)".into()));
        }
        _ => Dtype::F32,
    };
    let mut metadata = BTreeMap::new();
    let keys: Vec<&str> = f.config().map(|(k, _)| k).collect();
    metadata.insert(KEYS.to_string(), keys.join(","));
    for (k, v) in f.config() {
        metadata.insert(format!("{PREFIX}{k}"), encode_value(&v));
    }
    let config_text = match f.get_str(CONFIG_KEY) {
        Ok(t) => t.to_string(),
        Err(_) => generated_config(&f)?.to_string(),
    };
    let config = PeftConfig::parse(&config_text)?;
    let mut ad = HfAdapter {
        config: config.clone(),
        modules: Vec::new(),
        replacements: Vec::new(),
        prompt: None,
        dtype,
        metadata,
    };
    let read = |t: &format::TensorView<'_>| -> Result<Vec<f32>, HfError> {
        let mut v = vec![0.0f32; t.numel()];
        t.read_into(&mut v)?;
        Ok(v)
    };
    let tensors: Vec<_> = f.tensors().collect();
    match &config {
        PeftConfig::Prompt(_) => {
            let t = f.tensor("prompt_embeddings")?;
            ad.prompt = Some((t.shape().to_vec(), read(&t)?));
        }
        PeftConfig::Lora(lc) => {
            for t in &tensors {
                let name = t.name();
                if let Some(module) = name.strip_suffix(".lora_A.weight") {
                    let b = f.tensor(&format!("{module}.lora_B.weight"))?;
                    let (&[r, n_in], &[n_out, r2]) = (t.shape(), b.shape()) else {
                        return Err(HfError::Tensor(format!("{module}: LoRA factors must be matrices")));
                    };
                    if r != r2 {
                        return Err(HfError::Tensor(format!("{module}: lora_A rank {r}, lora_B rank {r2}")));
                    }
                    let lora_bias = f.tensor(&format!("{module}.lora_B.bias")).ok().map(|t| read(&t)).transpose()?;
                    ad.modules.push(LoraModule {
                        name: module.to_string(),
                        a: read(t)?,
                        b: read(&b)?,
                        lora_bias,
                        r,
                        n_in,
                        n_out,
                        alpha: lc.alpha_for(module),
                        scale: lc.scale_for(module)?,
                    });
                } else if !name.contains(".lora_B.") {
                    ad.replacements.push(Replacement {
                        name: name.to_string(),
                        shape: t.shape().to_vec(),
                        data: read(t)?,
                    });
                }
            }
        }
    }
    ad.write_dir(dst)
}

/// A PEFT 0.21 config from a `.peft` file's typed entries.
fn generated_config(f: &AdapterFile<'_>) -> Result<serde_json::Value, HfError> {
    let missing = |k: &str| HfError::config(k, "missing from the .peft file, needed for a PEFT config");
    let u = |k: &'static str| f.get_u64(k).map_err(|_| missing(k));
    match f.method() {
        Method::Lora => {
            let targets: Vec<String> = f
                .get_str("target_modules")
                .map_err(|_| missing("target_modules"))?
                .split(',')
                .map(|t| t.to_string())
                .collect();
            let alpha = f.get_f64("lora_alpha").map_err(|_| missing("lora_alpha"))?;
            let alpha = if alpha.fract() == 0.0 && alpha.abs() < 1e15 { json!(alpha as i64) } else { json!(alpha) };
            Ok(json!({
                "peft_type": "LORA", "task_type": null, "base_model_name_or_path": null, "revision": null,
                "inference_mode": true, "r": u("r")?, "lora_alpha": alpha,
                "use_rslora": f.get_bool("use_rslora").unwrap_or(false),
                "target_modules": targets, "lora_dropout": 0.0, "fan_in_fan_out": false, "bias": "none",
                "modules_to_save": null, "init_lora_weights": true, "layers_to_transform": null,
                "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false,
                "lora_bias": false,
            }))
        }
        Method::Prompt | Method::Prefix => {
            let prefix = f.method() == Method::Prefix;
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
        Method::Adapter => {
            Err(HfError::Unsupported("bottleneck adapters: Hugging Face PEFT has no such adapter type".into()))
        }
    }
}
