//! `adapter_config.json`: every field that changes the math, read exactly;
//! fields this crate cannot honour are errors naming the field.

use peft_core::lora::config::module_matches;
use regex::Regex;
use serde_json::{Map, Value};

use super::HfError;

/// Which modules a LoRA config targets.
#[derive(Clone, Debug)]
pub enum Targets {
    /// A list: a module matches if its name equals an entry or ends with
    /// `"." + entry` (PEFT's rule).
    List(Vec<String>),
    /// A regular expression the whole module name must match, as PEFT's
    /// Python `re.fullmatch`: the text as written, and the compiled
    /// `^(?:text)$` (anchoring the leftmost match is not enough: `a|ab`
    /// finds `a` in `ab`, where fullmatch matches `ab`).
    Regex(String, Regex),
}

impl Targets {
    /// Whether module `name` is targeted.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Targets::List(list) => list.iter().any(|t| module_matches(name, t)),
            Targets::Regex(_, re) => re.is_match(name),
        }
    }

    /// The JSON value PEFT writes.
    pub fn to_json(&self) -> Value {
        match self {
            Targets::List(l) => Value::from(l.clone()),
            Targets::Regex(s, _) => Value::from(s.clone()),
        }
    }
}

/// A `rank_pattern` / `alpha_pattern` entry: PEFT's key-matching rule is
/// `re.match(rf"(.*\.)?({key})$", module)`, the first key in file order that
/// matches wins.
#[derive(Clone, Debug)]
pub struct Pattern<T> {
    /// The key as written.
    pub key: String,
    re: Regex,
    /// Its value.
    pub value: T,
}

fn patterns<T>(
    obj: &Map<String, Value>,
    field: &'static str,
    get: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<Pattern<T>>, HfError> {
    let Some(v) = obj.get(field).filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let map = v.as_object().ok_or_else(|| HfError::config(field, "must be an object"))?;
    map.iter()
        .map(|(k, v)| {
            let value =
                get(v).ok_or_else(|| HfError::config(field, &format!("value for {k:?} has the wrong type or is 0")))?;
            let re = Regex::new(&format!(r"^(.*\.)?({k})$"))
                .map_err(|e| HfError::config(field, &format!("key {k:?} is not a supported regex: {e}")))?;
            Ok(Pattern { key: k.clone(), re, value })
        })
        .collect()
}

fn first<'a, T>(pats: &'a [Pattern<T>], module: &str) -> Option<&'a T> {
    pats.iter().find(|p| p.re.is_match(module)).map(|p| &p.value)
}

/// What `bias` says is trained besides the LoRA factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasMode {
    /// No bias is trained.
    None,
    /// Every bias of the model is trained and saved.
    All,
    /// Biases of LoRA-adapted modules are trained and saved.
    LoraOnly,
}

/// A LoRA adapter's configuration.
#[derive(Clone, Debug)]
pub struct HfLoraConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha (integer or float in the file).
    pub lora_alpha: f64,
    /// rsLoRA: scale `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Per-module ranks.
    pub rank_pattern: Vec<Pattern<usize>>,
    /// Per-module alphas.
    pub alpha_pattern: Vec<Pattern<f64>>,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Weights stored `[in, out]` (GPT-2's `Conv1D`): the update is
    /// `(B A)^T`.
    pub fan_in_fan_out: bool,
    /// Trained biases.
    pub bias: BiasMode,
    /// `lora_B` has a bias, added (scaled) to the base bias on merge.
    pub lora_bias: bool,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// Layer indices that were adapted (None: all).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Names of the layer containers for `layers_to_transform`.
    pub layers_pattern: Vec<String>,
    /// The JSON object as read, written back unchanged by `convert`.
    pub raw: Map<String, Value>,
}

/// A prompt- or prefix-tuning adapter's configuration.
#[derive(Clone, Debug)]
pub struct PromptConfig {
    /// `PROMPT_TUNING` or `PREFIX_TUNING`.
    pub prefix: bool,
    /// Virtual tokens.
    pub num_virtual_tokens: usize,
    /// Model width.
    pub token_dim: usize,
    /// Transformer layers (prefix tuning).
    pub num_layers: usize,
    /// Attention heads (prefix tuning).
    pub num_attention_heads: usize,
    /// Encoder and decoder (2) or one stack (1).
    pub num_transformer_submodules: usize,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// A parsed `adapter_config.json`.
#[derive(Clone, Debug)]
pub enum PeftConfig {
    /// `peft_type: "LORA"`.
    Lora(HfLoraConfig),
    /// `PROMPT_TUNING` or `PREFIX_TUNING`.
    Prompt(PromptConfig),
}

fn get_usize(obj: &Map<String, Value>, field: &'static str) -> Result<usize, HfError> {
    obj.get(field)
        .and_then(Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| HfError::config(field, "missing or not a non-negative integer"))
}

fn get_bool(obj: &Map<String, Value>, field: &'static str) -> Result<bool, HfError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(HfError::config(field, "must be true or false")),
    }
}

/// A field that must be absent, null, false, empty or equal to `ok`.
fn unsupported_if_set(obj: &Map<String, Value>, field: &'static str, why: &str) -> Result<(), HfError> {
    let set = match obj.get(field) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    if set { Err(HfError::Unsupported(format!("`{field}`: {why}"))) } else { Ok(()) }
}

impl PeftConfig {
    /// Parses the text of `adapter_config.json`.
    ///
    /// # Errors
    /// [`HfError::Json`] for invalid JSON, [`HfError::Config`] for a
    /// missing or mistyped field, [`HfError::Unsupported`] for an unknown
    /// `peft_type` or a field whose math this crate does not implement
    /// (DoRA, LoftQ, EVA, QALoRA, ...).
    pub fn parse(text: &str) -> Result<Self, HfError> {
        let v: Value = serde_json::from_str(text).map_err(HfError::json)?;
        let obj = v.as_object().ok_or_else(|| HfError::config("adapter_config.json", "must be a JSON object"))?.clone();
        let peft_type = obj
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or_else(|| HfError::config("peft_type", "missing"))?
            .to_string();
        match peft_type.as_str() {
            "LORA" => Self::lora(obj),
            "PROMPT_TUNING" | "PREFIX_TUNING" => Self::prompt(obj, peft_type == "PREFIX_TUNING"),
            other => Err(HfError::Unsupported(format!(
                "`peft_type` {other:?} (supported: LORA, PROMPT_TUNING, PREFIX_TUNING)"
            ))),
        }
    }

    fn lora(obj: Map<String, Value>) -> Result<Self, HfError> {
        unsupported_if_set(
            &obj,
            "use_dora",
            "DoRA adapters are not supported yet; merging one as LoRA would be wrong",
        )?;
        unsupported_if_set(&obj, "use_qalora", "QALoRA pools the input; not supported")?;
        unsupported_if_set(&obj, "eva_config", "EVA-initialized adapters carry data this reader does not interpret")?;
        unsupported_if_set(&obj, "layer_replication", "replicated layers are not supported")?;
        unsupported_if_set(&obj, "target_parameters", "LoRA on nn.Parameter targets is not supported")?;
        unsupported_if_set(&obj, "trainable_token_indices", "trainable tokens are not supported")?;
        unsupported_if_set(&obj, "alora_invocation_tokens", "activated LoRA is not supported")?;
        if let Some(init) = obj.get("init_lora_weights").and_then(Value::as_str) {
            if init.starts_with("loftq")
                || init == "eva"
                || init == "corda"
                || init.starts_with("pissa")
                || init.starts_with("olora")
            {
                // These change the base weights at init: merging into the
                // original base would be wrong.
                return Err(HfError::Unsupported(format!(
                    "`init_lora_weights` = {init:?}: the adapter was trained against a modified base"
                )));
            }
        }
        let r = get_usize(&obj, "r")?;
        if r == 0 {
            return Err(HfError::config("r", "must be at least 1 (the scale alpha / r would be infinite)"));
        }
        let lora_alpha = obj
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| HfError::config("lora_alpha", "missing or not a number"))?;
        let target_modules = match obj.get("target_modules") {
            Some(Value::String(s)) => {
                let re = Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| HfError::config("target_modules", &format!("not a supported regex: {e}")))?;
                Targets::Regex(s.clone(), re)
            }
            Some(Value::Array(a)) => Targets::List(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .ok_or_else(|| HfError::config("target_modules", "entries must be strings"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(HfError::config("target_modules", "missing: must be a list or a regex string")),
        };
        let bias = match obj.get("bias").and_then(Value::as_str).unwrap_or("none") {
            "none" => BiasMode::None,
            "all" => BiasMode::All,
            "lora_only" => BiasMode::LoraOnly,
            other => return Err(HfError::config("bias", &format!("{other:?} is not none, all or lora_only"))),
        };
        let strings = |field: &'static str| -> Result<Vec<String>, HfError> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::String(s)) => Ok(vec![s.clone()]),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str().map(String::from).ok_or_else(|| HfError::config(field, "entries must be strings"))
                    })
                    .collect(),
                Some(_) => Err(HfError::config(field, "must be a string or a list of strings")),
            }
        };
        let layers_to_transform = match obj.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                Some(vec![n.as_u64().ok_or_else(|| HfError::config("layers_to_transform", "not an index"))? as usize])
            }
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|v| v as usize)
                            .ok_or_else(|| HfError::config("layers_to_transform", "not an index"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(HfError::config("layers_to_transform", "must be an index or a list of indices")),
        };
        let mut layers_pattern = strings("layers_pattern")?;
        if layers_pattern.is_empty() {
            // PEFT's COMMON_LAYERS_PATTERN.
            layers_pattern = ["layers", "h", "block", "blocks", "layer"].map(String::from).to_vec();
        }
        Ok(PeftConfig::Lora(HfLoraConfig {
            r,
            lora_alpha,
            use_rslora: get_bool(&obj, "use_rslora")?,
            rank_pattern: patterns(&obj, "rank_pattern", |v| v.as_u64().filter(|&x| x > 0).map(|x| x as usize))?,
            alpha_pattern: patterns(&obj, "alpha_pattern", Value::as_f64)?,
            target_modules,
            fan_in_fan_out: get_bool(&obj, "fan_in_fan_out")?,
            bias,
            lora_bias: get_bool(&obj, "lora_bias")?,
            modules_to_save: strings("modules_to_save")?,
            layers_to_transform,
            layers_pattern,
            raw: obj,
        }))
    }

    fn prompt(obj: Map<String, Value>, prefix: bool) -> Result<Self, HfError> {
        if prefix {
            unsupported_if_set(
                &obj,
                "prefix_projection",
                "saved adapters hold the projected prefix only when inference_mode; re-save with prefix_projection=false",
            )?;
        }
        let opt = |f: &'static str, default: usize| obj.get(f).and_then(Value::as_u64).map_or(default, |v| v as usize);
        Ok(PeftConfig::Prompt(PromptConfig {
            prefix,
            num_virtual_tokens: get_usize(&obj, "num_virtual_tokens")?,
            token_dim: get_usize(&obj, "token_dim")?,
            num_layers: if prefix { get_usize(&obj, "num_layers")? } else { opt("num_layers", 0) },
            num_attention_heads: if prefix {
                get_usize(&obj, "num_attention_heads")?
            } else {
                opt("num_attention_heads", 0)
            },
            num_transformer_submodules: opt("num_transformer_submodules", 1),
            raw: obj,
        }))
    }
}

impl HfLoraConfig {
    /// The rank PEFT gives `module`: `rank_pattern`'s first match, else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        first(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    /// The alpha PEFT gives `module`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        first(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha)
    }

    /// `peft-core`'s configuration of `module`: its rank and alpha (after
    /// the patterns) and the scaling rule. `peft-core` owns the scale.
    pub fn core_config_for(&self, module: &str) -> peft_core::lora::LoraConfig<'static> {
        peft_core::lora::LoraConfig::new(self.rank_for(module), self.alpha_for(module)).with_rslora(self.use_rslora)
    }

    /// The scale of `module`: `alpha / r`, or `alpha / sqrt(r)` with
    /// rsLoRA, from [`peft_core::lora::LoraConfig::scale`].
    ///
    /// # Errors
    /// [`peft_core::Error::InvalidRank`] for `r = 0`,
    /// [`peft_core::Error::InvalidAlpha`] for a zero or non-finite alpha.
    pub fn scale_for(&self, module: &str) -> peft_core::Result<f64> {
        self.core_config_for(module).scale()
    }

    /// Whether PEFT would have adapted `module`: targeted, and in
    /// `layers_to_transform` if that is set (PEFT's rule: the index after a
    /// `layers_pattern` component).
    pub fn adapts(&self, module: &str) -> bool {
        if !self.target_modules.matches(module) {
            return false;
        }
        let (Some(layers), Targets::List(_)) = (&self.layers_to_transform, &self.target_modules) else {
            return true;
        };
        let parts: Vec<&str> = module.split('.').collect();
        parts.windows(2).any(|w| {
            self.layers_pattern.iter().any(|p| p == w[0]) && w[1].parse::<usize>().is_ok_and(|i| layers.contains(&i))
        })
    }
}
