//! llama.cpp LoRA adapters: the GGUF layout `convert_lora_to_gguf.py`
//! writes and `llama-cli --lora` / ollama read, to and from PEFT's.
//!
//! The file is a GGUF with `general.architecture` of the base (`llama`),
//! `general.type = "adapter"`, `adapter.type = "lora"`,
//! `adapter.lora.alpha` (f32), no hyperparameters and no vocabulary. For
//! each adapted base tensor `<base>` (GGUF name, `blk.0.attn_q.weight`) it
//! holds `<base>.lora_a` with `ne = [in, r]` (PEFT's `A [r, in]`, the same
//! bytes) and `<base>.lora_b` with `ne = [r, out]` (PEFT's `B [out, r]`),
//! in F32 or F16. For `attn_q` and `attn_k`, `lora_b`'s rows are permuted
//! as the base weight's are (`permute(B A) = permute(B) A`; see
//! [`crate::llama::gguf`]), so reading and writing need the model's head
//! dimension. llama.cpp computes `y = W x + (alpha / r) B (A x)` with `r`
//! from `lora_b`'s shape; an alpha of 0 or none means a scale of 1.
//!
//! What the layout cannot say is refused by name when writing: rsLoRA
//! (`alpha / sqrt(r)`; llama.cpp would scale by `alpha / r`), DoRA,
//! `lora_bias`, LoRA on embeddings, `alpha_pattern` entries that differ
//! from `lora_alpha` (one alpha per file), `modules_to_save`, and modules
//! outside the seven Llama projections. Training-only tensors (VeLoRA,
//! MonteCLoRA) are left out: they do not act at inference.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use super::read::{Gguf, Value};
use super::write::{TensorOut, to_bytes};
use super::{gguf_name, hf_name, is_permuted, permute_rows};
use crate::hf::PeftConfig;
use crate::hf::{HfAdapter, HfError};
use crate::hf::{HfLoraConfig, LoraModule};

/// The element type the adapter's tensors are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraDtype {
    /// f32 (exact).
    F32,
    /// f16, rounded to nearest even (as `convert_lora_to_gguf.py
    /// --outtype f16`).
    F16,
}

fn unsupported(what: &str) -> HfError {
    HfError::Unsupported(format!("{what}: llama.cpp's LoRA layout cannot hold it"))
}

/// `adapter`'s LoRA config when it is plain LoRA on Llama projections,
/// what both llama.cpp's layout and the GGUF merge take: no DoRA, no
/// `lora_bias`, no `modules_to_save`, no LoRA on embeddings, every module
/// one of the seven projections.
///
/// # Errors
/// [`HfError::Unsupported`] naming the method, field or module, as
/// `refuse` words it.
pub(crate) fn plain_lora(adapter: &HfAdapter, refuse: impl Fn(&str) -> HfError) -> Result<&HfLoraConfig, HfError> {
    let PeftConfig::Lora(lc) = &adapter.config else {
        return Err(refuse(&format!("peft_type {} (LoRA only)", adapter.config.method_name())));
    };
    for (flag, field) in [(lc.use_dora, "use_dora"), (lc.lora_bias, "lora_bias")] {
        if flag {
            return Err(refuse(field));
        }
    }
    if let Some(r) = adapter.replacements.first() {
        return Err(refuse(&format!("modules_to_save ({})", r.name)));
    }
    for m in &adapter.modules {
        if m.embedding {
            return Err(refuse(&format!("{}: LoRA on an embedding", m.name)));
        }
        if gguf_name(&format!("{}.weight", m.name)).is_none() {
            return Err(refuse(&format!("{}: not a Llama projection", m.name)));
        }
    }
    Ok(lc)
}

fn encode(vals: &[f32], dtype: LoraDtype) -> Vec<u8> {
    match dtype {
        LoraDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        LoraDtype::F16 => vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
    }
}

/// The bytes of the llama.cpp LoRA GGUF of a PEFT LoRA `adapter` over a
/// Llama whose heads are `head_dim` wide (see the [module docs](self)),
/// tensors in the order of PEFT's keys, named `name` in
/// `general.name`.
///
/// # Errors
/// [`HfError::Unsupported`] naming the field or module the layout cannot
/// hold (see the module docs), or for another method; [`HfError::Base`]
/// for a `q_proj` / `k_proj` whose rows are not whole heads.
pub fn to_gguf(adapter: &HfAdapter, head_dim: usize, dtype: LoraDtype, name: &str) -> Result<Vec<u8>, HfError> {
    let lc = plain_lora(adapter, unsupported)?;
    if lc.use_rslora {
        return Err(unsupported("use_rslora"));
    }
    let mut modules: Vec<&LoraModule> = adapter.modules.iter().collect();
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    let alpha = lc.lora_alpha;
    let mut tensors = Vec::with_capacity(2 * modules.len());
    for m in &modules {
        if m.alpha != alpha {
            return Err(unsupported(&format!("{}: alpha_pattern {} differs from lora_alpha {alpha}", m.name, m.alpha)));
        }
        let weight = format!("{}.weight", m.name);
        let base = gguf_name(&weight).ok_or_else(|| unsupported(&format!("{}: not a Llama projection", m.name)))?;
        let b = if is_permuted(&weight) {
            permute_rows(&m.b, m.r, head_dim, false).ok_or_else(|| {
                HfError::Base(format!("{}: {} rows are not whole heads of {head_dim}", m.name, m.n_out))
            })?
        } else {
            m.b.clone()
        };
        tensors.push((format!("{base}.lora_a"), vec![m.n_in as u64, m.r as u64], encode(&m.a, dtype)));
        tensors.push((format!("{base}.lora_b"), vec![m.r as u64, m.n_out as u64], encode(&b, dtype)));
    }
    let ty = match dtype {
        LoraDtype::F32 => 0,
        LoraDtype::F16 => 1,
    };
    let out: Vec<TensorOut<'_>> = tensors
        .iter()
        .map(|(n, ne, bytes)| TensorOut { name: n.clone(), ne: ne.clone(), ggml_type: ty, bytes })
        .collect();
    let metadata = vec![
        ("general.architecture".to_string(), Value::Str("llama".into())),
        ("general.type".to_string(), Value::Str("adapter".into())),
        ("adapter.type".to_string(), Value::Str("lora".into())),
        ("general.name".to_string(), Value::Str(name.into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
        ("general.quantization_version".to_string(), Value::U32(2)),
    ];
    Ok(to_bytes(&metadata, &out))
}

/// The `adapter_config.json` of modules read from a llama.cpp file: `r`
/// the largest rank, the others in `rank_pattern`; `lora_alpha` the file's
/// alpha, or (none) each module's rank through `alpha_pattern`.
fn config_json(modules: &[LoraModule], ranks: &BTreeMap<String, usize>, alpha: Option<f64>) -> serde_json::Value {
    let r0 = ranks.values().copied().max().unwrap_or(1);
    let targets: std::collections::BTreeSet<&str> = modules.iter().filter_map(|m| m.name.rsplit('.').next()).collect();
    let rank_pattern: serde_json::Map<String, serde_json::Value> =
        ranks.iter().filter(|(_, r)| **r != r0).map(|(n, r)| (n.clone(), (*r).into())).collect();
    let alpha_pattern: serde_json::Map<String, serde_json::Value> = match alpha {
        Some(_) => serde_json::Map::new(),
        None => ranks.iter().filter(|(_, r)| **r != r0).map(|(n, r)| (n.clone(), (*r as f64).into())).collect(),
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r0,
        "lora_alpha": alpha.unwrap_or(r0 as f64),
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
    })
}

/// A LoRA factor's values, widened to f32.
///
/// # Errors
/// I/O errors; [`HfError::Gguf`] for a type other than F32, F16 or BF16.
fn factor(g: &Gguf, t: &super::TensorInfo) -> Result<Vec<f32>, HfError> {
    let bytes = g.read(t)?;
    Ok(match t.format {
        peft_core::storage::Format::F32 => {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        peft_core::storage::Format::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        peft_core::storage::Format::Bf16 => {
            bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        f => {
            let why = format!("`{}` is {}: LoRA factors are F32, F16 or BF16", t.name, f.name());
            return Err(HfError::Gguf(g.path().to_path_buf(), why));
        }
    })
}

/// Reads a llama.cpp LoRA GGUF as a PEFT LoRA adapter over a Llama whose
/// heads are `head_dim` wide: modules named as PEFT names them
/// (`model.layers.0.self_attn.q_proj`), `lora_b` rows of `attn_q` and
/// `attn_k` put back in PEFT's order, `lora_alpha` from
/// `adapter.lora.alpha` (absent or 0: each module's alpha is its rank,
/// llama.cpp's scale of 1), ranks differing between modules kept in
/// `rank_pattern`.
///
/// # Errors
/// [`Gguf::open`]'s; [`HfError::Gguf`] naming the key or tensor: not an
/// adapter, not LoRA, an architecture other than `llama`, a tensor that is
/// not `<llama projection>.lora_a|lora_b`, an `a` without its `b`, shapes
/// that disagree (`lora_a.ne[1]` and `lora_b.ne[0]` are the rank), a type
/// other than F32, F16 or BF16.
pub fn read(path: &Path, head_dim: usize) -> Result<HfAdapter, HfError> {
    let g = Gguf::open(path)?;
    let bad = |m: String| HfError::Gguf(path.to_path_buf(), m);
    for (key, want) in [("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", "llama")] {
        let got = g.get(key).and_then(Value::as_str);
        if got != Some(want) {
            return Err(bad(format!("{key} is {got:?}: a llama.cpp LoRA adapter has {want:?}")));
        }
    }
    let alpha = match g.get("adapter.lora.alpha") {
        None => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| bad(format!("adapter.lora.alpha is a {}", v.type_name())))?),
    }
    .filter(|a| *a != 0.0);
    let mut pairs: BTreeMap<String, [Option<usize>; 2]> = BTreeMap::new();
    for (i, t) in g.tensors.iter().enumerate() {
        let (base, part) = match (t.name.strip_suffix(".lora_a"), t.name.strip_suffix(".lora_b")) {
            (Some(b), _) => (b, 0),
            (_, Some(b)) => (b, 1),
            _ => return Err(bad(format!("tensor `{}` is not a .lora_a or .lora_b", t.name))),
        };
        let hf = hf_name(base).filter(|n| n.ends_with(".weight") && !n.contains("norm"));
        let hf = hf.ok_or_else(|| bad(format!("tensor `{}`: `{base}` is not a Llama projection", t.name)))?;
        pairs.entry(hf).or_default()[part] = Some(i);
    }
    let mut modules = Vec::with_capacity(pairs.len());
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    let mut dtype = Dtype::F32;
    for (weight, [a, b]) in pairs {
        let name = weight.trim_end_matches(".weight").to_string();
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!(
                "`{}`: lora_a and lora_b must both be present",
                gguf_name(&weight).unwrap_or_default()
            )));
        };
        let (ta, tb) = (&g.tensors[a], &g.tensors[b]);
        let (&[n_in, r], &[rb, n_out]) = (ta.ne.as_slice(), tb.ne.as_slice()) else {
            return Err(bad(format!("`{}` / `{}` are not matrices", ta.name, tb.name)));
        };
        if r != rb || r == 0 {
            return Err(bad(format!("`{}` has rank {r} but `{}` has {rb}", ta.name, tb.name)));
        }
        let to_usize = |v: u64| usize::try_from(v).map_err(|_| bad(format!("`{}`: too large", ta.name)));
        let (n_in, r, n_out) = (to_usize(n_in)?, to_usize(r)?, to_usize(n_out)?);
        let read_f32 = |t: &super::TensorInfo| factor(&g, t);
        let mut b = read_f32(tb)?;
        if is_permuted(&weight) {
            b = permute_rows(&b, r, head_dim, true)
                .ok_or_else(|| bad(format!("`{}`: {n_out} rows are not whole heads of {head_dim}", tb.name)))?;
        }
        dtype = match ta.format {
            peft_core::storage::Format::F16 => Dtype::F16,
            peft_core::storage::Format::Bf16 => Dtype::BF16,
            _ => Dtype::F32,
        };
        let alpha_m = alpha.unwrap_or(r as f64);
        ranks.insert(name.clone(), r);
        modules.push(LoraModule {
            name,
            a: read_f32(ta)?,
            b,
            lora_bias: None,
            r,
            n_in,
            n_out,
            alpha: alpha_m,
            scale: alpha_m / r as f64,
            magnitude: None,
            embedding: false,
            dtypes: [dtype; 4],
        });
    }
    let config = config_json(&modules, &ranks, alpha);
    let config = PeftConfig::parse(&config.to_string()).map_err(|e| e.in_file(path))?;
    let mut out = HfAdapter::empty(config, dtype, BTreeMap::new());
    out.modules = modules;
    out.source = Some(path.to_path_buf());
    Ok(out)
}
