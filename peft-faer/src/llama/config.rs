//! A Hugging Face `LlamaForCausalLM` `config.json`, checked.

use serde_json::{Map, Value};

use crate::hf::HfError;

/// The architecture numbers of a Llama model (transformers' `LlamaConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size` (the residual width `d`).
    pub hidden_size: usize,
    /// `intermediate_size` (the MLP's width).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads` (query heads).
    pub num_heads: usize,
    /// `num_key_value_heads` (GQA; defaults to `num_attention_heads`).
    pub num_kv_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// RoPE's base: `rope_theta` at the top level (transformers 4.x) or in
    /// `rope_parameters` (5.x).
    pub rope_theta: f64,
    /// `tie_word_embeddings`: `lm_head` is `embed_tokens`.
    pub tie_word_embeddings: bool,
    /// `attention_bias`: q, k, v and o projections have biases.
    pub attention_bias: bool,
    /// `mlp_bias`: gate, up and down projections have biases.
    pub mlp_bias: bool,
}

impl LlamaConfig {
    /// Width of the keys and values: `head_dim * num_key_value_heads`.
    pub fn kv_width(&self) -> usize {
        self.head_dim * self.num_kv_heads
    }

    /// Width of the queries: `head_dim * num_attention_heads`.
    pub fn q_width(&self) -> usize {
        self.head_dim * self.num_heads
    }

    /// Parses `config.json`'s text.
    ///
    /// # Errors
    /// [`HfError::Json`]; [`HfError::Config`] naming the field: a missing
    /// or non-positive size, a size above [`MAX_DIM`] ([`MAX_LAYERS`] for
    /// `num_hidden_layers`) or a matrix above [`MAX_ELEMENTS`] values, `model_type` other than `llama` (when given),
    /// `hidden_act` other than `silu`, heads that do not divide, an odd
    /// `head_dim`, a non-finite or non-positive `rms_norm_eps` or
    /// `rope_theta`; [`HfError::Unsupported`] for RoPE scaling (`rope_type`
    /// other than `default`, or a `rope_scaling` object), which this model
    /// does not implement.
    pub fn parse(text: &str) -> Result<Self, HfError> {
        let v: Value = serde_json::from_str(text).map_err(HfError::json)?;
        let obj = v.as_object().ok_or_else(|| bad("config.json", "must be a JSON object"))?;
        let size = |f: &str| -> Result<usize, HfError> {
            let max = if f == "num_hidden_layers" { MAX_LAYERS } else { MAX_DIM };
            match obj.get(f).and_then(Value::as_u64) {
                Some(n) if n > 0 && n <= max as u64 => Ok(n as usize),
                Some(n) if n > 0 => Err(bad(f, &format!("{n} is above this reader's limit of {max}"))),
                _ => Err(bad(f, "must be a positive integer")),
            }
        };
        let opt_size = |f: &str| -> Result<Option<usize>, HfError> {
            match obj.get(f) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => size(f).map(Some),
            }
        };
        let flag = |f: &str, default: bool| -> Result<bool, HfError> {
            match obj.get(f) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(bad(f, "must be true or false")),
            }
        };
        if let Some(t) = obj.get("model_type").and_then(Value::as_str)
            && t != "llama"
        {
            return Err(bad("model_type", &format!("{t:?}: this model reads \"llama\"")));
        }
        match obj.get("hidden_act").and_then(Value::as_str) {
            None | Some("silu") => {}
            Some(other) => return Err(bad("hidden_act", &format!("{other:?}: Llama's MLP is SwiGLU (\"silu\")"))),
        }
        let hidden_size = size("hidden_size")?;
        let num_heads = size("num_attention_heads")?;
        let num_kv_heads = opt_size("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(bad("num_key_value_heads", "must divide num_attention_heads"));
        }
        let head_dim = match opt_size("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(bad("head_dim", "absent, and num_attention_heads does not divide hidden_size")),
        };
        if head_dim % 2 != 0 {
            return Err(bad("head_dim", "must be even (RoPE rotates pairs)"));
        }
        let positive = |f: &str, x: Option<f64>| match x {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            _ => Err(bad(f, "must be a positive number")),
        };
        // transformers' `LlamaConfig` default when the field is absent.
        let rms_norm_eps = match obj.get("rms_norm_eps") {
            None | Some(Value::Null) => 1e-6,
            Some(v) => positive("rms_norm_eps", v.as_f64())?,
        };
        let rope_theta = rope_theta(obj)?;
        // Every matrix's element count fits in memory's address range, so
        // no later product of sizes overflows.
        let intermediate_size = size("intermediate_size")?;
        let vocab_size = size("vocab_size")?;
        for (field, a, b) in [
            ("head_dim", head_dim, num_heads),
            ("vocab_size", vocab_size, hidden_size),
            ("intermediate_size", intermediate_size, hidden_size),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > MAX_ELEMENTS) {
                return Err(bad(
                    field,
                    &format!("a {a} x {b} matrix is above this reader's limit of {MAX_ELEMENTS} values"),
                ));
            }
        }
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers: size("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings: flag("tie_word_embeddings", false)?,
            attention_bias: flag("attention_bias", false)?,
            mlp_bias: flag("mlp_bias", false)?,
        })
    }
}

/// The largest size any one dimension (hidden, heads, vocabulary, ...) may
/// have: `2^24` (the largest real models are below `2^18`).
pub const MAX_DIM: usize = 1 << 24;
/// The most layers a config may have: `2^16`.
pub const MAX_LAYERS: usize = 1 << 16;
/// The most values one matrix may hold: `2^34` (64 GiB of f32).
pub const MAX_ELEMENTS: usize = 1 << 34;

/// `rope_theta` from the top level or `rope_parameters`; RoPE scaling refused.
fn rope_theta(obj: &Map<String, Value>) -> Result<f64, HfError> {
    // transformers reads `rope_type` (or the older `type`); "default" is
    // plain RoPE, whatever else the object holds.
    if let Some(scaling) = obj.get("rope_scaling").filter(|v| !v.is_null()) {
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str);
        if kind != Some("default") {
            return Err(HfError::Unsupported(
                "config.json: rope_scaling (scaled RoPE: llama3, yarn, linear, ...)".into(),
            ));
        }
    }
    let params = obj.get("rope_parameters").and_then(Value::as_object);
    if let Some(t) = params.and_then(|p| p.get("rope_type")).and_then(Value::as_str)
        && t != "default"
    {
        return Err(HfError::Unsupported(format!("config.json: rope_parameters.rope_type {t:?} (only \"default\")")));
    }
    let (field, value) = match (obj.get("rope_theta"), params.and_then(|p| p.get("rope_theta"))) {
        (_, Some(v)) => ("rope_parameters.rope_theta", v),
        (Some(v), None) => ("rope_theta", v),
        // transformers' default.
        (None, None) => return Ok(10_000.0),
    };
    match value.as_f64() {
        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(bad(field, "must be a positive number")),
    }
}

fn bad(field: &str, reason: &str) -> HfError {
    HfError::Config { field: field.to_string(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6"#;

    fn with(extra: &str) -> Result<LlamaConfig, HfError> {
        LlamaConfig::parse(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn rope_theta_from_either_place_and_defaults() {
        assert_eq!(with("").unwrap().rope_theta, 10_000.0);
        assert_eq!(with(r#", "rope_theta": 500000.0"#).unwrap().rope_theta, 500_000.0);
        let v5 = with(r#", "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}"#).unwrap();
        assert_eq!(v5.rope_theta, 1_000_000.0);
        let c = with("").unwrap();
        assert_eq!((c.head_dim, c.kv_width(), c.q_width()), (16, 32, 64));
    }

    #[test]
    fn refusals_name_the_field() {
        let field = |r: Result<LlamaConfig, HfError>| match r {
            Err(HfError::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(with(r#", "hidden_act": "gelu""#)), "hidden_act");
        assert_eq!(field(with(r#", "head_dim": 15"#)), "head_dim");
        assert_eq!(field(with(r#", "rope_theta": -1"#)), "rope_theta");
        assert_eq!(field(LlamaConfig::parse(r#"{"hidden_size": 64}"#)), "num_attention_heads");
        assert_eq!(field(with(r#", "model_type": "mistral""#)), "model_type");
        let scaled = with(r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#);
        assert!(matches!(scaled, Err(HfError::Unsupported(_))), "{scaled:?}");
        let yarn = with(r#", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}"#);
        assert!(matches!(yarn, Err(HfError::Unsupported(_))), "{yarn:?}");
        assert_eq!(field(with(r#", "rms_norm_eps": 0"#)), "rms_norm_eps");
        // Sizes are bounded before anything is allocated from them (issue
        // 27, class 3: 2^62 layers panicked, 1e9 asked for 832 GB).
        let layers = BASE.replace(r#""num_hidden_layers": 2"#, r#""num_hidden_layers": 4611686018427387904"#);
        assert_eq!(field(LlamaConfig::parse(&format!("{layers}}}"))), "num_hidden_layers");
        let layers = BASE.replace(r#""num_hidden_layers": 2"#, r#""num_hidden_layers": 1000000000"#);
        assert_eq!(field(LlamaConfig::parse(&format!("{layers}}}"))), "num_hidden_layers");
        // head_dim x heads wrapped to 0 and panicked in inv_freq.
        assert_eq!(field(with(r#", "head_dim": 4611686018427387904"#)), "head_dim");
        let wide = BASE
            .replace(r#""hidden_size": 64"#, r#""hidden_size": 16777216"#)
            .replace(r#""vocab_size": 100"#, r#""vocab_size": 16777216"#);
        assert_eq!(field(LlamaConfig::parse(&format!("{wide}, \"head_dim\": 16}}"))), "vocab_size");
    }

    /// What transformers loads, read as transformers reads it: an absent
    /// `rms_norm_eps` is `LlamaConfig`'s default 1e-6, and `rope_scaling`
    /// of type "default" is plain RoPE.
    #[test]
    fn transformers_defaults() {
        let no_eps = LlamaConfig::parse(&BASE.replace(r#", "rms_norm_eps": 1e-6"#, "}")).unwrap();
        assert_eq!(no_eps.rms_norm_eps, 1e-6);
        let plain = with(r#", "rope_scaling": {"rope_type": "default"}, "rope_theta": 5e5"#).unwrap();
        assert_eq!(plain.rope_theta, 5e5);
        assert!(with(r#", "rope_scaling": {"type": "default"}"#).is_ok());
        assert!(matches!(with(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#), Err(HfError::Unsupported(_))));
    }
}
