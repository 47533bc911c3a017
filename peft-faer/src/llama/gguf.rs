//! Llama models in GGUF files, as llama.cpp's `convert_hf_to_gguf.py`
//! writes them: the configuration from the `llama.*` metadata, tensors
//! under their Hugging Face names, the query and key rows put back in
//! Hugging Face's order, `lm_head` tied to the embedding when there is no
//! `output.weight`. Matrices stay in their stored blocks.
//!
//! | GGUF | Hugging Face |
//! |---|---|
//! | `token_embd.weight` | `model.embed_tokens.weight` |
//! | `output_norm.weight` | `model.norm.weight` |
//! | `output.weight` | `lm_head.weight` |
//! | `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight` |
//! | `blk.N.ffn_norm.weight` | `model.layers.N.post_attention_layernorm.weight` |
//! | `blk.N.attn_q` / `attn_k` / `attn_v` / `attn_output` | `model.layers.N.self_attn.q_proj` / `k_proj` / `v_proj` / `o_proj` |
//! | `blk.N.ffn_gate` / `ffn_up` / `ffn_down` | `model.layers.N.mlp.gate_proj` / `up_proj` / `down_proj` |
//!
//! **The query/key permutation.** The converter stores `attn_q =
//! permute(q_proj, n_head)` and `attn_k = permute(k_proj, n_head_kv)` so
//! that ggml's RoPE, which rotates adjacent pairs, equals Hugging Face's,
//! which rotates `(x_i, x_{i + d/2})`: within head `h` (`d` = head_dim),
//! GGUF row `h d + 2 i + t` is Hugging Face row `h d + t d/2 + i` (`i <
//! d/2`, `t` in {0, 1}). Whole rows move, so the blocks are copied
//! unchanged. Using `n_head` for the keys as well is the classic GQA bug;
//! the tests pin both.
//!
//! **Configuration** (`{arch}` = `general.architecture`, which must be
//! `llama`): `embedding_length` (hidden), `feed_forward_length`,
//! `block_count`, `attention.head_count`, `attention.head_count_kv`
//! (default: head_count), `attention.key_length` (default: hidden /
//! heads; `value_length` must agree), `rope.dimension_count` (must be the
//! head dimension: partial rotary is refused), `rope.freq_base` (default
//! 10000), `attention.layer_norm_rms_epsilon` (an f32, read as stored:
//! 1e-5 reads 9.9999997e-6, as transformers reads it), `vocab_size`
//! (default: `token_embd`'s rows). RoPE scaling (`rope.scaling.type`
//! other than `none`) is refused. Biases are read when `blk.0.attn_q.bias`
//! / `blk.0.ffn_up.bias` exist.

use std::path::Path;

use peft_core::storage::StoredWeight;

use super::Llama;
use super::config::LlamaConfig;
use super::weights::{Matrix, Source};
use crate::gguf::{Gguf, TensorInfo, Value, permute_rows};
pub use crate::gguf::{gguf_name, hf_name, hf_row, is_permuted};
use crate::hf::HfError;

/// A GGUF file's tensors, served by Hugging Face name ([`Source`]), with
/// the query and key rows un-permuted.
pub struct GgufWeights<'a> {
    file: &'a Gguf,
    head_dim: usize,
}

impl<'a> GgufWeights<'a> {
    /// The tensors of `file`, for a model of `config`.
    pub fn new(file: &'a Gguf, config: &LlamaConfig) -> Self {
        Self { file, head_dim: config.head_dim }
    }

    fn find(&self, hf: &str) -> Result<&'a TensorInfo, HfError> {
        let name = gguf_name(hf).ok_or_else(|| HfError::Base(format!("{hf} has no GGUF name")))?;
        self.file.tensor(&name).ok_or_else(|| HfError::Base(format!("{name} ({hf}) is missing")))
    }

    /// The tensor's bytes in Hugging Face row order: rows of `unit` bytes,
    /// un-permuted for `q_proj` and `k_proj`.
    fn bytes(&self, hf: &str, t: &TensorInfo, rows: usize, unit: usize) -> Result<Vec<u8>, HfError> {
        let bytes = self.file.read(t)?;
        if !is_permuted(hf) {
            return Ok(bytes);
        }
        let hd = self.head_dim;
        let whole = bytes.len() == rows * unit;
        whole
            .then(|| permute_rows(&bytes, unit, hd, true))
            .flatten()
            .ok_or_else(|| HfError::Base(format!("{}: {rows} rows are not whole heads of {hd}", t.name)))
    }
}

impl Source for GgufWeights<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, HfError> {
        let t = self.find(name)?;
        if t.matrix() != Some((rows, cols)) || t.ne.len() != 2 {
            return Err(HfError::Base(format!(
                "{} ({name}) has ne {:?}, the config needs [{cols}, {rows}]",
                t.name, t.ne
            )));
        }
        let unit = t.format.row_bytes(cols).ok_or(HfError::Core(peft_core::Error::Overflow))?;
        let bytes = self.bytes(name, t, rows, unit)?;
        Matrix::from_bytes(name, rows, cols, t.format, bytes)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, HfError> {
        let t = self.find(name)?;
        if t.ne != [len as u64] {
            return Err(HfError::Base(format!("{} ({name}) has ne {:?}, the config needs [{len}]", t.name, t.ne)));
        }
        let (elems, size) = t.format.block();
        if elems != 1 {
            // A vector of blocks: one row of `len` values, never permuted.
            let m = Matrix::from_bytes(name, 1, len, t.format, self.file.read(t)?)?;
            let mut out = vec![0.0f32; len];
            peft_core::storage::dequantize(&m.view()?, &mut out)?;
            return Ok(out);
        }
        let bytes = self.bytes(name, t, len, size)?;
        let m = Matrix::from_bytes(name, len, 1, t.format, bytes)?;
        let w: StoredWeight<'_> = m.view()?;
        let mut out = vec![0.0f32; len];
        peft_core::storage::dequantize(&w, &mut out)?;
        Ok(out)
    }

    fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }
}

impl LlamaConfig {
    /// The configuration of the Llama in `file` (see the [module
    /// docs](self)), checked as [`LlamaConfig::parse`] checks a
    /// `config.json`.
    ///
    /// # Errors
    /// [`HfError::Gguf`] naming the key: an architecture other than
    /// `llama`, a missing or non-integer size, `rope.dimension_count` other
    /// than the head dimension, `value_length` other than `key_length`, a
    /// `vocab_size` that disagrees with `token_embd`; [`HfError::Unsupported`]
    /// for RoPE scaling; [`LlamaConfig::parse`]'s range checks.
    pub fn from_gguf(file: &Gguf) -> Result<Self, HfError> {
        let bad = |m: String| HfError::Gguf(file.path().to_path_buf(), m);
        let arch = file.get("general.architecture").and_then(Value::as_str).unwrap_or("");
        if arch != "llama" {
            return Err(bad(format!("general.architecture is {arch:?}: this host reads \"llama\"")));
        }
        let int = |key: &str| -> Result<Option<u64>, HfError> {
            match file.get(&format!("llama.{key}")) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    bad(format!("llama.{key} is a {} ({v:?}), not a non-negative integer", v.type_name()))
                }),
            }
        };
        let need = |key: &str| int(key)?.ok_or_else(|| bad(format!("llama.{key} is missing")));
        let float = |key: &str| -> Result<Option<f64>, HfError> {
            match file.get(&format!("llama.{key}")) {
                None => Ok(None),
                Some(v) => {
                    v.as_f64().map(Some).ok_or_else(|| bad(format!("llama.{key} is a {}, not a number", v.type_name())))
                }
            }
        };
        if let Some(kind) = file.get("llama.rope.scaling.type").and_then(Value::as_str)
            && kind != "none"
        {
            return Err(HfError::Unsupported(format!("llama.rope.scaling.type {kind:?} (scaled RoPE)")));
        }
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = match int("attention.key_length")? {
            Some(k) => k,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        if let Some(v) = int("attention.value_length")?
            && v != head_dim
        {
            return Err(bad(format!("llama.attention.value_length {v} differs from key_length {head_dim}")));
        }
        if let Some(r) = int("rope.dimension_count")?
            && r != head_dim
        {
            return Err(HfError::Unsupported(format!(
                "llama.rope.dimension_count {r} below the head dimension {head_dim} (partial rotary)"
            )));
        }
        let embd = file.tensor("token_embd.weight").ok_or_else(|| bad("token_embd.weight is missing".into()))?;
        let vocab = match (int("vocab_size")?, embd.ne.get(1)) {
            (Some(v), Some(&rows)) if v != rows => {
                return Err(bad(format!("llama.vocab_size {v} differs from token_embd.weight's {rows} rows")));
            }
            (_, Some(&rows)) => rows,
            (_, None) => return Err(bad("token_embd.weight is not a matrix".into())),
        };
        let json = serde_json::json!({
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| bad("llama.attention.layer_norm_rms_epsilon is missing".into()))?,
            "rope_theta": float("rope.freq_base")?.unwrap_or(10_000.0),
            "tie_word_embeddings": file.tensor("output.weight").is_none(),
            "attention_bias": file.tensor("blk.0.attn_q.bias").is_some(),
            "mlp_bias": file.tensor("blk.0.ffn_up.bias").is_some(),
        });
        LlamaConfig::parse(&json.to_string()).map_err(|e| e.in_file(file.path()))
    }
}

impl Llama {
    /// Loads the Llama in the GGUF file at `path` (see the [module
    /// docs](self)): every matrix in its stored format, multiplied in
    /// place.
    ///
    /// # Errors
    /// [`Gguf::open`]'s; [`LlamaConfig::from_gguf`]'s; [`HfError::Base`]
    /// for a missing tensor or one of another shape (named); non-finite
    /// block scales. Every error names the file.
    pub fn load_gguf(path: &Path) -> Result<Self, HfError> {
        let file = Gguf::open(path)?;
        let config = LlamaConfig::from_gguf(&file)?;
        let weights = GgufWeights::new(&file, &config);
        Self::from_base(config, &weights).map_err(|e| e.in_file(path))
    }

    /// Loads a model from `path`: a `.gguf` file ([`Llama::load_gguf`]) or
    /// a Hugging Face folder ([`Llama::load_dir`]).
    ///
    /// # Errors
    /// As those.
    pub fn open(path: &Path) -> Result<Self, HfError> {
        if is_gguf(path) { Self::load_gguf(path) } else { Self::load_dir(path) }
    }
}

/// The configuration of the model at `path`: a `.gguf` file's metadata or
/// a Hugging Face folder's `config.json` (the tensors are not read).
///
/// # Errors
/// As [`Gguf::open`] and [`LlamaConfig::from_gguf`], or reading and
/// parsing `config.json`.
pub fn config_of(path: &Path) -> Result<LlamaConfig, HfError> {
    if is_gguf(path) {
        return LlamaConfig::from_gguf(&Gguf::open(path)?);
    }
    let file = path.join("config.json");
    let text = crate::files::read_bounded(&file, crate::hf::MAX_CONFIG_BYTES)?;
    let text = String::from_utf8(text).map_err(|_| HfError::Json("config.json is not UTF-8".into()));
    text.and_then(|t| LlamaConfig::parse(&t)).map_err(|e| e.in_file(&file))
}

/// Whether `path` names a GGUF file (by its extension, `.gguf`).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
