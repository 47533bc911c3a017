//! Writing a model (a Hugging Face folder) and bottleneck adapters (one
//! safetensors file) to disk, atomically (see [`crate::files`]).
//!
//! Bottleneck adapters are not a PEFT method, so their file is this
//! crate's: tensors `model.layers.{l}.adapter_{attn,mlp}.{down,up}.{weight,bias}`
//! (`W_down [m, d]`, `b_down [m]`, `W_up [d, m]`, `b_up [d]`) and the
//! activation in the metadata under `peft.bottleneck.activation`.

use std::collections::BTreeMap;
use std::path::Path;

use peft_core::activation::Activation;
use peft_core::adapter::AdapterConfig;
use safetensors::Dtype;

use super::{Bottleneck, BottleneckTensors, Llama, PROJECTIONS};
use crate::files::{write_dir, write_file};
use crate::hf::HfError;
use crate::hf::st::{OutEntry, StFile, header};
use peft_core::storage::Owned;

/// The activation's name in a bottleneck file.
fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "relu",
        Activation::GeluErf => "gelu",
        Activation::GeluTanh => "gelu_tanh",
        Activation::Silu => "silu",
    }
}

/// A safetensors file of f32 tensors.
fn safetensors(
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, HfError> {
    let entries: Vec<OutEntry> =
        tensors.iter().map(|(n, s, _)| OutEntry::plain(n.clone(), Dtype::F32, s.clone())).collect();
    let mut bytes = header(&entries, metadata)?;
    for (_, _, v) in tensors {
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    Ok(bytes)
}

impl Llama {
    /// Writes the model as a Hugging Face `LlamaForCausalLM` folder:
    /// `config.json` and `model.safetensors` (f32), read back before the
    /// folder is committed. The parent folder must exist.
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for a matrix not stored as f32; output
    /// errors (an existing `dir` without `force`).
    pub fn save_dir(&self, dir: &Path, force: bool) -> Result<(), HfError> {
        let c = &self.config;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": self.lm_head.is_none(),
            "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias, "torch_dtype": "float32",
        });
        fn f32s(m: &super::Matrix) -> Result<&[f32], HfError> {
            match &m.data {
                Owned::F32(v) => Ok(v.as_slice()),
                _ => Err(HfError::Unsupported(format!("{}: saving a matrix not stored as f32", m.name))),
            }
        }
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        tensors.push((self.embed.name.clone(), vec![self.embed.rows, self.embed.cols], f32s(&self.embed)?));
        for (l, layer) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            tensors.push((p("input_layernorm.weight"), vec![layer.input_norm.len()], &layer.input_norm));
            for (name, lin) in PROJECTIONS.iter().zip(&layer.proj) {
                let w = &lin.weight;
                tensors.push((p(&format!("{name}.weight")), vec![w.rows, w.cols], f32s(w)?));
                if let Some(b) = &lin.bias {
                    tensors.push((p(&format!("{name}.bias")), vec![b.len()], b));
                }
            }
            tensors.push((p("post_attention_layernorm.weight"), vec![layer.post_norm.len()], &layer.post_norm));
        }
        tensors.push(("model.norm.weight".into(), vec![self.norm.len()], &self.norm));
        if let Some(h) = &self.lm_head {
            tensors.push((h.name.clone(), vec![h.rows, h.cols], f32s(h)?));
        }
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let weights = safetensors(&tensors, &meta)?;
        let config = serde_json::to_vec_pretty(&config).map_err(HfError::json)?;
        write_dir(dir, &[("config.json", &config), ("model.safetensors", &weights)], force, |d: &Path| {
            Llama::load_dir(d).map(|_| ())
        })
    }
}

const SITES: [&str; 2] = ["adapter_attn", "adapter_mlp"];
const ACTIVATION_KEY: &str = "peft.bottleneck.activation";

impl Bottleneck {
    /// Writes the adapters to the safetensors file `path` (see the module
    /// docs).
    ///
    /// # Errors
    /// Output errors (an existing file without `force`).
    pub fn save(&self, path: &Path, force: bool) -> Result<(), HfError> {
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (l, sites) in self.sites.iter().enumerate() {
            for (site, t) in SITES.iter().zip(sites) {
                let (m, d) = (t.b_down.len(), t.b_up.len());
                let p = |s: &str| format!("model.layers.{l}.{site}.{s}");
                tensors.push((p("down.weight"), vec![m, d], &t.w_down));
                tensors.push((p("down.bias"), vec![m], &t.b_down));
                tensors.push((p("up.weight"), vec![d, m], &t.w_up));
                tensors.push((p("up.bias"), vec![d], &t.b_up));
            }
        }
        let meta = BTreeMap::from([(ACTIVATION_KEY.to_string(), activation_name(self.config.activation).to_string())]);
        Ok(write_file(path, &safetensors(&tensors, &meta)?, force)?)
    }

    /// Reads adapters written by [`Bottleneck::save`].
    ///
    /// # Errors
    /// The file's errors; [`HfError::MissingTensor`] for a missing tensor, [`HfError::TensorShape`] for one
    /// of another shape; [`HfError::Config`] (`peft.bottleneck.activation`)
    /// for an unknown activation.
    pub fn load(path: &Path) -> Result<Self, HfError> {
        let st = StFile::open(path)?;
        let activation = match st.metadata.get(ACTIVATION_KEY).map(String::as_str) {
            Some("relu") => Activation::Relu,
            Some("gelu") => Activation::GeluErf,
            Some("gelu_tanh") => Activation::GeluTanh,
            Some("silu") => Activation::Silu,
            other => {
                return Err(HfError::Config {
                    field: ACTIVATION_KEY.into(),
                    reason: format!("{other:?}: relu, gelu, gelu_tanh or silu"),
                });
            }
        };
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, HfError> {
            let e = st.entry(name).ok_or_else(|| HfError::missing(name))?;
            if e.shape != shape {
                return Err(HfError::shape(name, &e.shape, format!("{shape:?}")));
            }
            st.read_f32(e)
        };
        let first = st
            .entry("model.layers.0.adapter_attn.down.weight")
            .ok_or_else(|| HfError::missing("model.layers.0.adapter_attn.down.weight"))?;
        let &[m, d] = first.shape.as_slice() else {
            return Err(HfError::shape("model.layers.0.adapter_attn.down.weight", &first.shape, "a matrix"));
        };
        let layers = st.entries.len() / 8;
        let mut sites = Vec::with_capacity(layers);
        for l in 0..layers {
            let one = |site: &str| -> Result<BottleneckTensors, HfError> {
                let p = |s: &str| format!("model.layers.{l}.{site}.{s}");
                Ok(BottleneckTensors {
                    w_down: read(&p("down.weight"), &[m, d])?,
                    b_down: read(&p("down.bias"), &[m])?,
                    w_up: read(&p("up.weight"), &[d, m])?,
                    b_up: read(&p("up.bias"), &[d])?,
                })
            };
            sites.push([one(SITES[0])?, one(SITES[1])?]);
        }
        if sites.len() * 8 != st.entries.len() {
            return Err(HfError::TensorCount {
                found: st.entries.len(),
                expected: "a bottleneck adapter saves 8 per layer",
            });
        }
        Ok(Self { config: AdapterConfig::width(m).with_activation(activation), sites })
    }
}
