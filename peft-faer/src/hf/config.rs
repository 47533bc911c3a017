//! `adapter_config.json`: every field that changes the math, read exactly;
//! fields this crate cannot honour are errors naming the field.

use peft_core::lora::module_matches;
use regex::Regex;
use serde::Deserialize;
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

/// A JSON object's entries in file order (Python's `dict` keeps them; a
/// `serde_json::Map` would sort them, and PEFT's first match depends on
/// the order). A key written twice is refused.
#[derive(Clone, Debug)]
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    if out.iter().any(|(j, _)| *j == k) {
                        return Err(serde::de::Error::custom(format!("key {k:?} appears twice")));
                    }
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

fn patterns<T>(field: &'static str, entries: Option<Ordered<T>>) -> Result<Vec<Pattern<T>>, HfError> {
    entries
        .map_or_else(Vec::new, |o| o.0)
        .into_iter()
        .map(|(k, value)| {
            let re = Regex::new(&format!(r"^(.*\.)?({k})$"))
                .map_err(|e| HfError::config(field, &format!("key {k:?} is not a supported regex: {e}")))?;
            Ok(Pattern { key: k, re, value })
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
    /// DoRA: each module also holds `lora_magnitude_vector [out]`, and its
    /// update is `(m / ||W + s B A||_row) (W + s B A)` (`peft_core::dora`).
    pub use_dora: bool,
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
    /// VeLoRA (`velora_config`): each module also saves
    /// `lora_velora_embed`, which compresses activations for the backward
    /// pass in PEFT's training; inference and merge are plain LoRA, so the
    /// tensor is kept only to be written back.
    pub velora: bool,
    /// MonteCLoRA (`monteclora_config`): each module also saves its
    /// `lora_monteclora_sampler.*` state, which perturbs `A` in PEFT's
    /// training only; kept only to be written back.
    pub monteclora: bool,
    /// `trainable_token_indices`: embeddings whose chosen rows train
    /// beside the LoRA (PEFT's trainable tokens).
    pub trainable_token_indices: Option<TokenIndices>,
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

/// An (IA)^3 adapter's configuration.
#[derive(Clone, Debug)]
pub struct Ia3Config {
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose input, not output, is scaled: a list (PEFT's rule: the
    /// module name ends with an entry, a plain suffix) or a regex (full
    /// match).
    pub feedforward_modules: Targets,
    /// Weights stored `[in, out]`.
    pub fan_in_fan_out: bool,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

impl Ia3Config {
    /// Whether PEFT treats `module` as feedforward (its vector scales the
    /// input).
    pub fn is_feedforward(&self, module: &str) -> bool {
        match &self.feedforward_modules {
            Targets::List(l) => l.iter().any(|t| module.ends_with(t.as_str())),
            Targets::Regex(_, re) => re.is_match(module),
        }
    }
}

/// A LoHa adapter's configuration (`peft_type: "LOHA"`).
#[derive(Clone, Debug)]
pub struct LohaConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha (`s = alpha / r`).
    pub alpha: f64,
    /// Per-module ranks (PEFT's first-match rule).
    pub rank_pattern: Vec<Pattern<usize>>,
    /// Per-module alphas.
    pub alpha_pattern: Vec<Pattern<f64>>,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

impl LohaConfig {
    /// The rank PEFT gives `module`.
    pub fn rank_for(&self, module: &str) -> usize {
        first(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    /// The alpha PEFT gives `module`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        first(&self.alpha_pattern, module).copied().unwrap_or(self.alpha)
    }
}

/// A LoKr adapter's configuration (`peft_type: "LOKR"`): LoHa's fields
/// and the factorization's.
#[derive(Clone, Debug)]
pub struct LokrConfig {
    /// `r`, `alpha` (`s = alpha / r` always), the patterns and targets.
    pub common: LohaConfig,
    /// Whether `W1` may be low rank too.
    pub decompose_both: bool,
    /// `factorization`'s `f` (`-1`: none).
    pub decompose_factor: i64,
}

/// A VeRA adapter's configuration (`peft_type: "VERA"`).
#[derive(Clone, Debug)]
pub struct VeraConfig {
    /// The rank of the shared projections.
    pub r: usize,
    /// The starting value of every `lambda_d`.
    pub d_initial: f64,
    /// The seed PEFT draws the projections from (informational: this crate
    /// reads them from the file).
    pub projection_prng_key: u64,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// An AdaLoRA adapter's configuration (`peft_type: "ADALORA"`).
/// `target_r`, `tinit`, `tfinal`, `deltaT`, `beta1`, `beta2`,
/// `orth_reg_weight` and `total_step` drive PEFT's training and rank
/// allocation only; the field `r` is ignored by PEFT (`init_r` is the
/// rank).
#[derive(Clone, Debug)]
pub struct AdaLoraConfig {
    /// The rank every module starts at, and `ranknum` in `s = lora_alpha /
    /// (ranknum + 1e-5)` for every module, before and after the allocation.
    pub init_r: usize,
    /// `lora_alpha` (`init_r` when not positive, as PEFT).
    pub lora_alpha: f64,
    /// After PEFT's allocation: per module (`<module>.lora_E`, in file
    /// order), which of the `init_r` triplets were kept (and saved).
    pub rank_pattern: Vec<(String, Vec<bool>)>,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

impl AdaLoraConfig {
    /// The saved rank of `module`: the `true` entries of its
    /// `rank_pattern` mask, or `init_r` without one.
    pub fn rank_for(&self, module: &str) -> usize {
        let key = format!("{module}.lora_E");
        self.rank_pattern.iter().find(|(k, _)| *k == key).map_or(self.init_r, |(_, m)| m.iter().filter(|&&b| b).count())
    }

    /// PEFT's factor `s` (`peft_core::adalora::scale`).
    ///
    /// # Errors
    /// `peft-core`'s refusals (a non-finite `lora_alpha`).
    pub fn scale(&self) -> Result<f64, HfError> {
        Ok(peft_core::adalora::scale(self.lora_alpha, self.init_r)?)
    }
}

/// A MiSS adapter's configuration (`peft_type: "MISS"`).
#[derive(Clone, Debug)]
pub struct MissConfig {
    /// The shard size `r`.
    pub r: usize,
    /// The variant: `init_weights` `true` (balance), `"mini"` (with
    /// `mini_r`) or `"bat"`.
    pub variant: peft_core::miss::MissVariant,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// An HRA adapter's configuration (`peft_type: "HRA"`).
#[derive(Clone, Debug)]
pub struct HraConfig {
    /// The number of reflections `r`.
    pub r: usize,
    /// PEFT's `apply_GS`: orthonormalize the columns first.
    pub apply_gs: bool,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// A RoAd adapter's configuration (`peft_type: "ROAD"`).
#[derive(Clone, Debug)]
pub struct RoadConfig {
    /// `"road_1"`, `"road_2"` or `"road_4"`.
    pub variant: peft_core::road::RoadVariant,
    /// The group size `g` (even).
    pub group_size: usize,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// A C3A adapter's configuration (`peft_type: "C3A"`).
#[derive(Clone, Debug)]
pub struct C3aConfig {
    /// The default block size `b`.
    pub block_size: usize,
    /// Per-module block sizes: PEFT's rule is `re.match(rf".*\.{key}$",
    /// module)`, the first key in file order that matches, else the
    /// module's full name as a key.
    pub block_size_pattern: Vec<(String, Regex, usize)>,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

impl C3aConfig {
    /// The block size PEFT gives `module`.
    pub fn block_size_for(&self, module: &str) -> usize {
        let hit = self.block_size_pattern.iter().find(|(_, re, _)| re.is_match(module));
        let exact = || self.block_size_pattern.iter().find(|(k, _, _)| k == module);
        hit.or_else(exact).map_or(self.block_size, |(_, _, b)| *b)
    }
}

/// A SHiRA adapter's configuration (`peft_type: "SHIRA"`). `r`,
/// `mask_type` and `random_seed` only drew the mask PEFT saved with the
/// adapter.
#[derive(Clone, Debug)]
pub struct ShiraConfig {
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// LoRA's `trainable_token_indices`: one list, for the model's input
/// embedding (the module the saved key names), or lists by module name
/// (PEFT's rule for the names: a plain suffix of the module's).
#[derive(Clone, Debug, PartialEq)]
pub enum TokenIndices {
    /// `[i, ...]`: the input embedding's tokens.
    List(Vec<u32>),
    /// `{"<module>": [i, ...], ...}`.
    Map(Vec<(String, Vec<u32>)>),
}

impl TokenIndices {
    /// The field's value (`None` or JSON `null`: no trainable tokens).
    ///
    /// # Errors
    /// [`HfError::Config`] (`trainable_token_indices`) for anything but a
    /// list of token ids or an object of such lists.
    fn parse(v: Option<&Value>) -> Result<Option<Self>, HfError> {
        let bad = || HfError::config("trainable_token_indices", "must be a list of token ids or an object of lists");
        let ids = |v: &Value| -> Result<Vec<u32>, HfError> {
            let list = v.as_array().ok_or_else(bad)?;
            let ids: Vec<u32> = list
                .iter()
                .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            // PEFT's index_copy leaves the winner of a repeated token unspecified.
            let mut seen = std::collections::BTreeSet::new();
            match ids.iter().find(|&&i| !seen.insert(i)) {
                Some(i) => Err(HfError::config(
                    "trainable_token_indices",
                    &format!("token {i} is listed twice: each token once"),
                )),
                None => Ok(ids),
            }
        };
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => {
                Ok(Some(Self::Map(m.iter().map(|(k, v)| Ok((k.clone(), ids(v)?))).collect::<Result<_, HfError>>()?)))
            }
            Some(v) => Ok(Some(Self::List(ids(v)?))),
        }
    }

    /// The tokens of `module`: the list, or the entry whose name is a
    /// suffix of `module`'s.
    pub fn of(&self, module: &str) -> Option<&[u32]> {
        match self {
            Self::List(l) => Some(l),
            Self::Map(m) => m.iter().find(|(k, _)| module.ends_with(k.as_str())).map(|(_, v)| &v[..]),
        }
    }
}

/// A trainable-tokens adapter's configuration (`peft_type:
/// "TRAINABLE_TOKENS"`).
#[derive(Clone, Debug)]
pub struct TrainableTokensConfig {
    /// The trained tokens, in the rows' order (as given, unsorted).
    pub token_indices: Vec<u32>,
    /// Targeted embeddings.
    pub target_modules: Targets,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// An LN tuning adapter's configuration (`peft_type: "LN_TUNING"`): PEFT
/// copies each targeted module whole and trains the copy, so every
/// parameter the file holds for a module replaces the base's.
#[derive(Clone, Debug)]
pub struct LnTuningConfig {
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// A VB-LoRA adapter's configuration (`peft_type: "VBLORA"`).
#[derive(Clone, Debug)]
pub struct VbLoraConfig {
    /// The rank `r`.
    pub r: usize,
    /// The bank's vectors `nv`.
    pub num_vectors: usize,
    /// Their length `L`.
    pub vector_length: usize,
    /// The top-k mixed per sub-vector.
    pub topk: usize,
    /// Whether the logits are saved in their top-k form.
    pub save_only_topk_weights: bool,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// A RandLoRA adapter's configuration (`peft_type: "RANDLORA"`).
/// `sparse`, `very_sparse` and `projection_prng_key` only drew the bases,
/// which the file holds (`save_projection = true`).
#[derive(Clone, Debug)]
pub struct RandLoraConfig {
    /// The bases' rank `r`.
    pub r: usize,
    /// `randlora_alpha` (the scale is `randlora_alpha / r`).
    pub randlora_alpha: f64,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// A FourierFT adapter's configuration (`peft_type: "FOURIERFT"`).
#[derive(Clone, Debug)]
pub struct FourierFtConfig {
    /// Frequencies per module (default 1000).
    pub n_frequency: usize,
    /// Per-module counts, in the file's order: `(key, PEFT's
    /// re.match(".*\.key$"), n)`; an exact full path matches too.
    pub n_frequency_pattern: Vec<(String, Regex, usize)>,
    /// `dW`'s scale (default 150).
    pub scaling: f64,
    /// The seed the frequencies are drawn from (default 777).
    pub random_loc_seed: u64,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

impl FourierFtConfig {
    /// The frequency count PEFT gives `module` (the first pattern key that
    /// matches, in the file's order; else `n_frequency`).
    pub fn n_frequency_for(&self, module: &str) -> usize {
        let hit = self.n_frequency_pattern.iter().find(|(_, re, _)| re.is_match(module));
        let exact = || self.n_frequency_pattern.iter().find(|(k, _, _)| k == module);
        hit.or_else(exact).map_or(self.n_frequency, |(_, _, n)| *n)
    }
}

/// A BOFT adapter's configuration (`peft_type: "BOFT"`).
#[derive(Clone, Debug)]
pub struct BoftConfig {
    /// PEFT's `boft_block_size` (0 when `boft_block_num` is set).
    pub boft_block_size: usize,
    /// PEFT's `boft_block_num` (0 when `boft_block_size` is set).
    pub boft_block_num: usize,
    /// PEFT's `boft_n_butterfly_factor` as configured (the tensors hold the
    /// factors PEFT kept: one on a CPU).
    pub boft_n_butterfly_factor: usize,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// An OFT adapter's configuration (`peft_type: "OFT"`).
#[derive(Clone, Debug)]
pub struct OftConfig {
    /// PEFT's `r`: the number of blocks (0 when `oft_block_size` is set).
    pub r: usize,
    /// PEFT's `oft_block_size` (0 when `r` is set).
    pub oft_block_size: usize,
    /// The Cayley-Neumann series (default) or the exact transform.
    pub use_cayley_neumann: bool,
    /// The series' terms (default 5).
    pub num_cayley_neumann_terms: usize,
    /// COFT: project each block onto `||Q|| <= eps / sqrt(r_s)`.
    pub coft: bool,
    /// COFT's `eps` (default 6e-5).
    pub eps: f64,
    /// One block for all.
    pub block_share: bool,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Modules whose whole weights are trained and saved.
    pub modules_to_save: Vec<String>,
    /// The JSON object as read.
    pub raw: Map<String, Value>,
}

/// A parsed `adapter_config.json`.
#[derive(Clone, Debug)]
pub enum PeftConfig {
    /// `peft_type: "TRAINABLE_TOKENS"`.
    TrainableTokens(TrainableTokensConfig),
    /// `peft_type: "LN_TUNING"`.
    LnTuning(LnTuningConfig),
    /// `peft_type: "VBLORA"`.
    VbLora(VbLoraConfig),
    /// `peft_type: "RANDLORA"`.
    RandLora(RandLoraConfig),
    /// `peft_type: "FOURIERFT"`.
    FourierFt(FourierFtConfig),
    /// `peft_type: "BOFT"`.
    Boft(BoftConfig),
    /// `peft_type: "OFT"`.
    Oft(OftConfig),
    /// `peft_type: "SHIRA"`.
    Shira(ShiraConfig),
    /// `peft_type: "C3A"`.
    C3a(C3aConfig),
    /// `peft_type: "ROAD"`.
    Road(RoadConfig),
    /// `peft_type: "HRA"`.
    Hra(HraConfig),
    /// `peft_type: "MISS"`.
    Miss(MissConfig),
    /// `peft_type: "ADALORA"`.
    AdaLora(AdaLoraConfig),
    /// `peft_type: "LOHA"`.
    Loha(LohaConfig),
    /// `peft_type: "LOKR"`.
    Lokr(LokrConfig),
    /// `peft_type: "LORA"`.
    Lora(HfLoraConfig),
    /// `PROMPT_TUNING` or `PREFIX_TUNING`.
    Prompt(PromptConfig),
    /// `peft_type: "IA3"`.
    Ia3(Ia3Config),
    /// `peft_type: "VERA"`.
    Vera(VeraConfig),
}

impl PeftConfig {
    /// The method's name as PEFT's `peft_type` spells it (`"LORA"`,
    /// `"PROMPT_TUNING"`, `"PREFIX_TUNING"`, ...).
    pub fn method_name(&self) -> &'static str {
        match self {
            PeftConfig::Loha(_) => "LOHA",
            PeftConfig::Lokr(_) => "LOKR",
            PeftConfig::Lora(_) => "LORA",
            PeftConfig::Prompt(p) if p.prefix => "PREFIX_TUNING",
            PeftConfig::Prompt(_) => "PROMPT_TUNING",
            PeftConfig::Ia3(_) => "IA3",
            PeftConfig::Vera(_) => "VERA",
            PeftConfig::AdaLora(_) => "ADALORA",
            PeftConfig::Miss(_) => "MISS",
            PeftConfig::Hra(_) => "HRA",
            PeftConfig::Road(_) => "ROAD",
            PeftConfig::C3a(_) => "C3A",
            PeftConfig::Shira(_) => "SHIRA",
            PeftConfig::Oft(_) => "OFT",
            PeftConfig::Boft(_) => "BOFT",
            PeftConfig::FourierFt(_) => "FOURIERFT",
            PeftConfig::RandLora(_) => "RANDLORA",
            PeftConfig::VbLora(_) => "VBLORA",
            PeftConfig::LnTuning(_) => "LN_TUNING",
            PeftConfig::TrainableTokens(_) => "TRAINABLE_TOKENS",
        }
    }
}

/// One string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `target_modules`: a list, or one regex string.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawTargets {
    Regex(String),
    List(Vec<String>),
}

/// The fields of a LoRA `adapter_config.json` that change the math, typed;
/// every other field lands in `rest`, where the unsupported pass looks.
/// `null` is the same as absent (PEFT writes `null` for unset options).
#[derive(Deserialize)]
struct RawLora {
    r: usize,
    /// An integer or a float in the file.
    lora_alpha: f64,
    use_rslora: Option<bool>,
    use_dora: Option<bool>,
    rank_pattern: Option<Ordered<usize>>,
    alpha_pattern: Option<Ordered<f64>>,
    target_modules: Option<RawTargets>,
    fan_in_fan_out: Option<bool>,
    bias: Option<String>,
    lora_bias: Option<bool>,
    modules_to_save: Option<OneOrMany<String>>,
    layers_to_transform: Option<OneOrMany<usize>>,
    layers_pattern: Option<OneOrMany<String>>,
    /// A flag, or the name of an initialization.
    init_lora_weights: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a LoHa config.
#[derive(Deserialize)]
struct RawLoha {
    r: usize,
    alpha: f64,
    rank_pattern: Option<Ordered<usize>>,
    alpha_pattern: Option<Ordered<f64>>,
    target_modules: Option<RawTargets>,
    modules_to_save: Option<OneOrMany<String>>,
    use_effective_conv2d: Option<bool>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a VeRA config.
#[derive(Deserialize)]
struct RawVera {
    r: usize,
    d_initial: Option<f64>,
    projection_prng_key: Option<u64>,
    save_projection: Option<bool>,
    target_modules: Option<RawTargets>,
    fan_in_fan_out: Option<bool>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of an AdaLoRA config that change the math.
#[derive(Deserialize)]
struct RawAdaLora {
    init_r: usize,
    /// An integer or a float in the file.
    lora_alpha: f64,
    rank_pattern: Option<Ordered<Vec<bool>>>,
    target_modules: Option<RawTargets>,
    fan_in_fan_out: Option<bool>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a MiSS config that change the math.
#[derive(Deserialize)]
struct RawMiss {
    r: usize,
    /// `true`, `false`, `"bat"` or `"mini"`.
    init_weights: Option<Value>,
    mini_r: Option<usize>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a VB-LoRA config that change the math (PEFT's defaults
/// where absent).
#[derive(Deserialize)]
struct RawVbLora {
    r: Option<usize>,
    num_vectors: Option<usize>,
    vector_length: Option<usize>,
    topk: Option<usize>,
    save_only_topk_weights: Option<bool>,
    fan_in_fan_out: Option<bool>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a RandLoRA config that change the math (PEFT's defaults
/// where absent).
#[derive(Deserialize)]
struct RawRandLora {
    r: Option<usize>,
    randlora_alpha: Option<f64>,
    save_projection: Option<bool>,
    fan_in_fan_out: Option<bool>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a FourierFT config that change the math (PEFT's defaults
/// where absent).
#[derive(Deserialize)]
struct RawFourierFt {
    n_frequency: Option<usize>,
    n_frequency_pattern: Option<Ordered<usize>>,
    scaling: Option<f64>,
    random_loc_seed: Option<u64>,
    fan_in_fan_out: Option<bool>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a BOFT config that change the math (PEFT's defaults
/// where absent).
#[derive(Deserialize)]
struct RawBoft {
    boft_block_size: Option<usize>,
    boft_block_num: Option<usize>,
    boft_n_butterfly_factor: Option<usize>,
    fan_in_fan_out: Option<bool>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of an OFT config that change the math (PEFT's defaults
/// where absent).
#[derive(Deserialize)]
struct RawOft {
    r: Option<usize>,
    oft_block_size: Option<usize>,
    use_cayley_neumann: Option<bool>,
    num_cayley_neumann_terms: Option<usize>,
    coft: Option<bool>,
    eps: Option<f64>,
    block_share: Option<bool>,
    fan_in_fan_out: Option<bool>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of an HRA config that change the math.
#[derive(Deserialize)]
struct RawHra {
    r: usize,
    #[serde(rename = "apply_GS")]
    apply_gs: Option<bool>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a RoAd config that change the math.
#[derive(Deserialize)]
struct RawRoad {
    variant: Option<String>,
    group_size: Option<usize>,
    target_modules: Option<RawTargets>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of a C3A config that change the math.
#[derive(Deserialize)]
struct RawC3a {
    block_size: Option<usize>,
    block_size_pattern: Option<Ordered<usize>>,
    target_modules: Option<RawTargets>,
    bias: Option<String>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of an LN tuning config.
#[derive(Deserialize)]
struct RawLnTuning {
    target_modules: Option<RawTargets>,
    modules_to_save: Option<OneOrMany<String>>,
}

/// The fields of a SHiRA config that change the math.
#[derive(Deserialize)]
struct RawShira {
    fan_in_fan_out: Option<bool>,
    target_modules: Option<RawTargets>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The fields of an IA3 config.
#[derive(Deserialize)]
struct RawIa3 {
    target_modules: Option<RawTargets>,
    feedforward_modules: Option<RawTargets>,
    fan_in_fan_out: Option<bool>,
    modules_to_save: Option<OneOrMany<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `target_modules`-like field: a list, or a regex matched in full.
fn targets(field: &str, raw: Option<RawTargets>) -> Result<Targets, HfError> {
    match raw {
        Some(RawTargets::Regex(s)) => {
            let re = Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| HfError::config(field, &format!("not a supported regex: {e}")))?;
            Ok(Targets::Regex(s, re))
        }
        Some(RawTargets::List(l)) => Ok(Targets::List(l)),
        None => Err(HfError::config(field, "missing: must be a list or a regex string")),
    }
}

/// The fields of a prompt- or prefix-tuning config (the others, kept in
/// `PromptConfig::raw`, do not change what runs).
#[derive(Deserialize)]
struct RawPrompt {
    num_virtual_tokens: usize,
    token_dim: usize,
    num_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_transformer_submodules: Option<usize>,
}

/// Deserializes `T` from the text (not from a `Value`, whose maps have
/// lost the file's order), naming the field at fault in the error.
fn typed<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, HfError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        // A missing field is reported at the root: take its name from serde's message.
        let missing = reason.strip_prefix("missing field `").and_then(|r| r.split('`').next());
        let field = match (path.as_str(), missing) {
            (".", Some(f)) => f.to_string(),
            (".", None) => "adapter_config.json".to_string(),
            (p, _) => p.to_string(),
        };
        HfError::Config { field, reason }
    })
}

/// Whether `field` is set: present and not null, false or empty.
fn is_set(obj: &Map<String, Value>, field: &str) -> bool {
    match obj.get(field) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// A field that must be absent, null, false or empty.
fn unsupported_if_set(obj: &Map<String, Value>, field: &'static str, why: &str) -> Result<(), HfError> {
    if is_set(obj, field) { Err(HfError::Unsupported(format!("`{field}`: {why}"))) } else { Ok(()) }
}

/// Refuses `fan_in_fan_out` (GPT-2's `Conv1D` bases) and a trained `bias`
/// other than `"none"`, for a method implemented on `nn.Linear` alone.
fn linear_without_bias(method: &str, fan_in_fan_out: Option<bool>, bias: Option<&str>) -> Result<(), HfError> {
    if fan_in_fan_out.unwrap_or(false) {
        return Err(HfError::Unsupported(format!("`fan_in_fan_out` (Conv1D bases) with {method}")));
    }
    if !matches!(bias, None | Some("none")) {
        return Err(HfError::Unsupported(format!("`bias` other than \"none\" with {method}")));
    }
    Ok(())
}

impl PeftConfig {
    /// Parses the text of `adapter_config.json`: the fields that change
    /// the math into typed values (serde), then a pass over every other
    /// field for those this crate cannot honour.
    ///
    /// # Errors
    /// [`HfError::Json`] for invalid JSON, [`HfError::Config`] naming a
    /// missing or mistyped field, [`HfError::Unsupported`] for an unknown
    /// `peft_type` or a field whose math this crate does not implement
    /// (DoRA, LoftQ, EVA, QALoRA, ...).
    pub fn parse(text: &str) -> Result<Self, HfError> {
        let v: Value = serde_json::from_str(text).map_err(HfError::json)?;
        let obj = v.as_object().ok_or_else(|| HfError::config("adapter_config.json", "must be a JSON object"))?;
        let peft_type =
            obj.get("peft_type").and_then(Value::as_str).ok_or_else(|| HfError::config("peft_type", "missing"))?;
        match peft_type {
            "LORA" => Self::lora(text, &v),
            "PROMPT_TUNING" | "PREFIX_TUNING" => Self::prompt(text, &v, peft_type == "PREFIX_TUNING"),
            "IA3" => Self::ia3(text, &v),
            "LOHA" => Self::loha(text, &v),
            "VERA" => Self::vera(text, &v),
            "ADALORA" => Self::adalora(text, &v),
            "MISS" => Self::miss(text, &v),
            "HRA" => Self::hra(text, &v),
            "ROAD" => Self::road(text, &v),
            "C3A" => Self::c3a(text, &v),
            "SHIRA" => Self::shira(text, &v),
            "OFT" => Self::oft(text, &v),
            "BOFT" => Self::boft(text, &v),
            "FOURIERFT" => Self::fourierft(text, &v),
            "RANDLORA" => Self::randlora(text, &v),
            "VBLORA" => Self::vblora(text, &v),
            "LN_TUNING" => Self::ln_tuning(text, &v),
            "TRAINABLE_TOKENS" => Self::trainable_tokens(&v),
            "LOKR" => {
                let PeftConfig::Loha(common) = Self::loha(text, &v)? else {
                    return Err(HfError::config("peft_type", "LOKR"));
                };
                let decompose_both = common.raw.get("decompose_both").and_then(Value::as_bool).unwrap_or(false);
                let decompose_factor = match common.raw.get("decompose_factor") {
                    None | Some(Value::Null) => -1,
                    Some(v) => v.as_i64().ok_or_else(|| HfError::config("decompose_factor", "must be an integer"))?,
                };
                Ok(PeftConfig::Lokr(LokrConfig { common, decompose_both, decompose_factor }))
            }
            other => Err(HfError::Unsupported(format!(
                "`peft_type` {other:?} (supported: LORA, ADALORA, LOHA, LOKR, IA3, VERA, MISS, HRA, ROAD, C3A, SHIRA, OFT, BOFT, FOURIERFT, RANDLORA, VBLORA, LN_TUNING, TRAINABLE_TOKENS, PROMPT_TUNING, PREFIX_TUNING)"
            ))),
        }
    }

    fn lora(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawLora = typed(text)?;
        let rest = &raw.rest;
        unsupported_if_set(rest, "use_qalora", "QALoRA pools the input; not supported")?;
        unsupported_if_set(rest, "eva_config", "EVA-initialized adapters carry data this reader does not interpret")?;
        unsupported_if_set(rest, "layer_replication", "replicated layers are not supported")?;
        unsupported_if_set(rest, "target_parameters", "LoRA on nn.Parameter targets is not supported")?;
        unsupported_if_set(rest, "alora_invocation_tokens", "activated LoRA is not supported")?;
        unsupported_if_set(rest, "kasa_config", "KaSA adapters are not supported")?;
        unsupported_if_set(rest, "arrow_config", "Arrow routing over LoRA experts is not supported")?;
        unsupported_if_set(rest, "use_bdlora", "block-diagonal LoRA is not supported")?;
        if let Some(Value::String(init)) = &raw.init_lora_weights {
            // PEFT's own tests of the string (`LoraLayer.update_layer`):
            // `startswith` for pissa, corda, lora_ga and lora_ns, a
            // case-insensitive equality for olora, `==` for loftq and eva.
            let modifies_base = ["pissa", "corda", "lora_ga", "lora_ns"].iter().any(|p| init.starts_with(p))
                || init.eq_ignore_ascii_case("olora")
                || init == "loftq"
                || init == "eva";
            if modifies_base {
                // These change the base weights at init: merging into the
                // original base would be wrong.
                return Err(HfError::Unsupported(format!(
                    "`init_lora_weights` = {init:?}: the adapter was trained against a modified base"
                )));
            }
        }
        if raw.r == 0 {
            return Err(HfError::config("r", "must be at least 1 (the scale alpha / r would be infinite)"));
        }
        let target_modules = match raw.target_modules {
            Some(RawTargets::Regex(s)) => {
                let re = Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| HfError::config("target_modules", &format!("not a supported regex: {e}")))?;
                Targets::Regex(s, re)
            }
            Some(RawTargets::List(l)) => Targets::List(l),
            None => return Err(HfError::config("target_modules", "missing: must be a list or a regex string")),
        };
        let bias = match raw.bias.as_deref().unwrap_or("none") {
            "none" => BiasMode::None,
            "all" => BiasMode::All,
            "lora_only" => BiasMode::LoraOnly,
            other => return Err(HfError::config("bias", &format!("{other:?} is not none, all or lora_only"))),
        };
        let rank_pattern = patterns("rank_pattern", raw.rank_pattern)?;
        if let Some(p) = rank_pattern.iter().find(|p| p.value == 0) {
            return Err(HfError::config("rank_pattern", &format!("rank 0 for {:?}", p.key)));
        }
        let mut layers_pattern = raw.layers_pattern.map_or_else(Vec::new, OneOrMany::into_vec);
        if layers_pattern.is_empty() {
            // PEFT's COMMON_LAYERS_PATTERN.
            layers_pattern = ["layers", "h", "block", "blocks", "layer"].map(String::from).to_vec();
        }
        Ok(PeftConfig::Lora(HfLoraConfig {
            r: raw.r,
            lora_alpha: raw.lora_alpha,
            use_rslora: raw.use_rslora.unwrap_or(false),
            use_dora: raw.use_dora.unwrap_or(false),
            rank_pattern,
            alpha_pattern: patterns("alpha_pattern", raw.alpha_pattern)?,
            target_modules,
            fan_in_fan_out: raw.fan_in_fan_out.unwrap_or(false),
            bias,
            lora_bias: raw.lora_bias.unwrap_or(false),
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            layers_to_transform: raw.layers_to_transform.map(OneOrMany::into_vec),
            layers_pattern,
            // Training-only variants: an eval forward and the merge are
            // plain LoRA (PEFT's `VeloraLinearVariant` and
            // `MontecloraLinearVariant` act only with grad enabled in
            // training mode).
            velora: is_set(rest, "velora_config"),
            monteclora: is_set(rest, "monteclora_config"),
            trainable_token_indices: TokenIndices::parse(rest.get("trainable_token_indices"))?,
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn loha(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawLoha = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "LoHa on a subset of layers is not supported")?;
        let _ = raw.use_effective_conv2d; // convolutions only: linear layers ignore it
        if raw.r == 0 {
            return Err(HfError::config("r", "must be at least 1"));
        }
        let rank_pattern = patterns("rank_pattern", raw.rank_pattern)?;
        if let Some(p) = rank_pattern.iter().find(|p| p.value == 0) {
            return Err(HfError::config("rank_pattern", &format!("rank 0 for {:?}", p.key)));
        }
        Ok(PeftConfig::Loha(LohaConfig {
            r: raw.r,
            alpha: raw.alpha,
            rank_pattern,
            alpha_pattern: patterns("alpha_pattern", raw.alpha_pattern)?,
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn vera(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawVera = typed(text)?;
        if raw.save_projection == Some(false) {
            return Err(HfError::Unsupported(
                "`save_projection` = false: the file does not hold vera_A / vera_B, and PEFT regenerates them \
                 from torch's random generator, which this crate does not reproduce; re-save with \
                 save_projection=True"
                    .into(),
            ));
        }
        unsupported_if_set(&raw.rest, "layers_to_transform", "VeRA on a subset of layers is not supported")?;
        linear_without_bias("VeRA", raw.fan_in_fan_out, raw.bias.as_deref())?;
        if raw.r == 0 {
            return Err(HfError::config("r", "must be at least 1"));
        }
        let d_initial = raw.d_initial.unwrap_or(peft_core::vera::D_INITIAL);
        Ok(PeftConfig::Vera(VeraConfig {
            r: raw.r,
            d_initial,
            projection_prng_key: raw.projection_prng_key.unwrap_or(0),
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn adalora(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawAdaLora = typed(text)?;
        let rest = &raw.rest;
        unsupported_if_set(rest, "layers_to_transform", "AdaLoRA on a subset of layers is not supported")?;
        // PEFT refuses these itself (`AdaLoraConfig.__post_init__`).
        unsupported_if_set(rest, "use_dora", "AdaLoRA does not support DoRA")?;
        unsupported_if_set(rest, "lora_bias", "AdaLoRA has no lora_bias")?;
        linear_without_bias("AdaLoRA", raw.fan_in_fan_out, raw.bias.as_deref())?;
        if raw.init_r == 0 {
            return Err(HfError::config("init_r", "must be at least 1"));
        }
        let rank_pattern = raw.rank_pattern.map_or_else(Vec::new, |o| o.0);
        if let Some((k, m)) = rank_pattern.iter().find(|(_, m)| m.len() != raw.init_r) {
            let reason = format!("{k:?} has {} entries, init_r is {}", m.len(), raw.init_r);
            return Err(HfError::config("rank_pattern", &reason));
        }
        let config = AdaLoraConfig {
            init_r: raw.init_r,
            lora_alpha: raw.lora_alpha,
            rank_pattern,
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        };
        config.scale()?;
        Ok(PeftConfig::AdaLora(config))
    }

    fn miss(text: &str, v: &Value) -> Result<Self, HfError> {
        use peft_core::miss::MissVariant;
        let raw: RawMiss = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "MiSS on a subset of layers is not supported")?;
        linear_without_bias("MiSS", None, raw.bias.as_deref())?;
        if raw.r == 0 {
            return Err(HfError::config("r", "must be at least 1"));
        }
        // PEFT's `update_layer`: `init_weights` picks the variant; `false`
        // (a random init) is the balance layout too.
        let variant = match &raw.init_weights {
            None | Some(Value::Bool(_)) => MissVariant::Balance,
            Some(Value::String(s)) if s == "bat" => MissVariant::Bat,
            Some(Value::String(s)) if s == "mini" => {
                let mini_r = raw.mini_r.unwrap_or(1);
                if mini_r == 0 {
                    return Err(HfError::config("mini_r", "must be at least 1"));
                }
                MissVariant::Mini { mini_r }
            }
            Some(other) => {
                return Err(HfError::config(
                    "init_weights",
                    &format!("{other} is not true, false, \"bat\" or \"mini\""),
                ));
            }
        };
        Ok(PeftConfig::Miss(MissConfig {
            r: raw.r,
            variant,
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn vblora(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawVbLora = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "VB-LoRA on a subset of layers is not supported")?;
        linear_without_bias("VB-LoRA", raw.fan_in_fan_out, raw.bias.as_deref())?;
        let (r, nv, l, k) = (
            raw.r.unwrap_or(4),
            raw.num_vectors.unwrap_or(256),
            raw.vector_length.unwrap_or(256),
            raw.topk.unwrap_or(2),
        );
        for (field, v) in [("r", r), ("num_vectors", nv), ("vector_length", l), ("topk", k)] {
            if v == 0 {
                return Err(HfError::config(field, "must be at least 1"));
            }
        }
        if k > nv.min(peft_core::vblora::MAX_TOPK) {
            return Err(HfError::config("topk", "must be at most num_vectors and at most 64"));
        }
        Ok(PeftConfig::VbLora(VbLoraConfig {
            r,
            num_vectors: nv,
            vector_length: l,
            topk: k,
            save_only_topk_weights: raw.save_only_topk_weights.unwrap_or(false),
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn randlora(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawRandLora = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "RandLoRA on a subset of layers is not supported")?;
        linear_without_bias("RandLoRA", raw.fan_in_fan_out, raw.bias.as_deref())?;
        if raw.save_projection == Some(false) {
            return Err(HfError::Unsupported(
                "`save_projection`: false (the bases are drawn again from projection_prng_key with torch's generator on bf16, not reproduced here)".into(),
            ));
        }
        let (r, alpha) = (raw.r.unwrap_or(32), raw.randlora_alpha.unwrap_or(640.0));
        if r == 0 {
            return Err(HfError::config("r", "must be at least 1"));
        }
        if !alpha.is_finite() {
            return Err(HfError::config("randlora_alpha", "must be finite"));
        }
        Ok(PeftConfig::RandLora(RandLoraConfig {
            r,
            randlora_alpha: alpha,
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn fourierft(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawFourierFt = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "FourierFT on a subset of layers is not supported")?;
        linear_without_bias("FourierFT", raw.fan_in_fan_out, raw.bias.as_deref())?;
        let mut n_frequency_pattern = Vec::new();
        for (key, n) in raw.n_frequency_pattern.map_or_else(Vec::new, |o| o.0) {
            // Python's re.match: anchored at the start only, the key inserted as written.
            let re = Regex::new(&format!(r"^(?:.*\.{key}$)"))
                .map_err(|e| HfError::config("n_frequency_pattern", &format!("key {key:?}: {e}")))?;
            n_frequency_pattern.push((key, re, n));
        }
        let n_frequency = raw.n_frequency.unwrap_or(1000);
        if n_frequency == 0 || n_frequency_pattern.iter().any(|p| p.2 == 0) {
            return Err(HfError::config("n_frequency", "must be at least 1"));
        }
        let scaling = raw.scaling.unwrap_or(150.0);
        if !scaling.is_finite() {
            return Err(HfError::config("scaling", "must be finite"));
        }
        Ok(PeftConfig::FourierFt(FourierFtConfig {
            n_frequency,
            n_frequency_pattern,
            scaling,
            random_loc_seed: raw.random_loc_seed.unwrap_or(777),
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn boft(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawBoft = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "BOFT on a subset of layers is not supported")?;
        linear_without_bias("BOFT", raw.fan_in_fan_out, raw.bias.as_deref())?;
        let (size, num) = (raw.boft_block_size.unwrap_or(4), raw.boft_block_num.unwrap_or(0));
        if (size == 0) == (num == 0) {
            return Err(HfError::config(
                "boft_block_size",
                "exactly one of `boft_block_size` and `boft_block_num` must be non-zero",
            ));
        }
        let factor = raw.boft_n_butterfly_factor.unwrap_or(1);
        if factor == 0 {
            return Err(HfError::config("boft_n_butterfly_factor", "must be at least 1"));
        }
        Ok(PeftConfig::Boft(BoftConfig {
            boft_block_size: size,
            boft_block_num: num,
            boft_n_butterfly_factor: factor,
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn oft(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawOft = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "OFT on a subset of layers is not supported")?;
        linear_without_bias("OFT", raw.fan_in_fan_out, raw.bias.as_deref())?;
        let (r, oft_block_size) = (raw.r.unwrap_or(0), raw.oft_block_size.unwrap_or(32));
        if (r == 0) == (oft_block_size == 0) {
            return Err(HfError::config("r", "exactly one of `r` and `oft_block_size` must be non-zero"));
        }
        let terms = raw.num_cayley_neumann_terms.unwrap_or(5);
        if terms == 0 {
            return Err(HfError::config("num_cayley_neumann_terms", "must be at least 1"));
        }
        let eps = raw.eps.unwrap_or(6e-5);
        let coft = raw.coft.unwrap_or(false);
        if coft && !(eps > 0.0 && eps.is_finite()) {
            return Err(HfError::config("eps", "must be positive and finite with `coft`"));
        }
        Ok(PeftConfig::Oft(OftConfig {
            r,
            oft_block_size,
            use_cayley_neumann: raw.use_cayley_neumann.unwrap_or(true),
            num_cayley_neumann_terms: terms,
            coft,
            eps,
            block_share: raw.block_share.unwrap_or(false),
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn hra(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawHra = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "HRA on a subset of layers is not supported")?;
        linear_without_bias("HRA", None, raw.bias.as_deref())?;
        if raw.r == 0 {
            return Err(HfError::config("r", "must be at least 1"));
        }
        Ok(PeftConfig::Hra(HraConfig {
            r: raw.r,
            apply_gs: raw.apply_gs.unwrap_or(false),
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn road(text: &str, v: &Value) -> Result<Self, HfError> {
        use peft_core::road::RoadVariant;
        let raw: RawRoad = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "RoAd on a subset of layers is not supported")?;
        // PEFT's defaults (`RoadConfig`): road_1, groups of 64.
        let variant = match raw.variant.as_deref().unwrap_or("road_1") {
            "road_1" => RoadVariant::Road1,
            "road_2" => RoadVariant::Road2,
            "road_4" => RoadVariant::Road4,
            other => return Err(HfError::config("variant", &format!("{other:?} is not road_1, road_2 or road_4"))),
        };
        let group_size = raw.group_size.unwrap_or(64);
        if group_size == 0 || !group_size.is_multiple_of(2) {
            return Err(HfError::config("group_size", "must be even and at least 2"));
        }
        Ok(PeftConfig::Road(RoadConfig {
            variant,
            group_size,
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn c3a(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawC3a = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "C3A on a subset of layers is not supported")?;
        linear_without_bias("C3A", None, raw.bias.as_deref())?;
        let mut block_size_pattern = Vec::new();
        for (key, b) in raw.block_size_pattern.map_or_else(Vec::new, |o| o.0) {
            // Python's re.match: anchored at the start only, the key inserted as written.
            let re = Regex::new(&format!(r"^(?:.*\.{key}$)"))
                .map_err(|e| HfError::config("block_size_pattern", &format!("key {key:?}: {e}")))?;
            block_size_pattern.push((key, re, b));
        }
        // PEFT's default block size.
        let block_size = raw.block_size.unwrap_or(256);
        if block_size == 0 || block_size_pattern.iter().any(|p| p.2 == 0) {
            return Err(HfError::config("block_size", "must be at least 1"));
        }
        Ok(PeftConfig::C3a(C3aConfig {
            block_size,
            block_size_pattern,
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn trainable_tokens(v: &Value) -> Result<Self, HfError> {
        let obj = v.as_object().cloned().unwrap_or_default();
        let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let renamed = |e: HfError| match e {
            HfError::Config { reason, .. } => HfError::Config { field: "token_indices".into(), reason },
            other => other,
        };
        let token_indices = match TokenIndices::parse(field("token_indices")).map_err(renamed)? {
            Some(TokenIndices::List(l)) => l,
            _ => return Err(HfError::config("token_indices", "must be a list of token ids")),
        };
        if token_indices.is_empty() {
            return Err(HfError::config("token_indices", "is empty: no token to train"));
        }
        let raw_targets = match field("target_modules") {
            Some(t) => {
                Some(serde_json::from_value(t.clone()).map_err(|e| HfError::config("target_modules", &e.to_string()))?)
            }
            None => Some(RawTargets::List(vec!["embed_tokens".into()])),
        };
        Ok(PeftConfig::TrainableTokens(TrainableTokensConfig {
            token_indices,
            target_modules: targets("target_modules", raw_targets)?,
            raw: obj,
        }))
    }

    fn ln_tuning(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawLnTuning = typed(text)?;
        Ok(PeftConfig::LnTuning(LnTuningConfig {
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn shira(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawShira = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "SHiRA on a subset of layers is not supported")?;
        linear_without_bias("SHiRA", raw.fan_in_fan_out, None)?;
        Ok(PeftConfig::Shira(ShiraConfig {
            target_modules: targets("target_modules", raw.target_modules)?,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn ia3(text: &str, v: &Value) -> Result<Self, HfError> {
        let raw: RawIa3 = typed(text)?;
        unsupported_if_set(&raw.rest, "layers_to_transform", "IA3 on a subset of layers is not supported")?;
        let fan_in_fan_out = raw.fan_in_fan_out.unwrap_or(false);
        Ok(PeftConfig::Ia3(Ia3Config {
            target_modules: targets("target_modules", raw.target_modules)?,
            feedforward_modules: match raw.feedforward_modules {
                None => Targets::List(Vec::new()),
                some => targets("feedforward_modules", some)?,
            },
            fan_in_fan_out,
            modules_to_save: raw.modules_to_save.map_or_else(Vec::new, OneOrMany::into_vec),
            raw: v.as_object().cloned().unwrap_or_default(),
        }))
    }

    fn prompt(text: &str, v: &Value, prefix: bool) -> Result<Self, HfError> {
        // `prefix_projection = true` is read as it is saved: PEFT saves the
        // projected prefix (`get_prompt_embedding_to_save` runs the MLP; in
        // `inference_mode` the table is already projected) and loads a
        // folder for inference in `inference_mode`, where that table is
        // what runs. The MLP's weights are never saved and are not needed.
        let raw: RawPrompt = typed(text)?;
        let need =
            |x: Option<usize>, field| x.ok_or_else(|| HfError::config(field, "missing (prefix tuning needs it)"));
        Ok(PeftConfig::Prompt(PromptConfig {
            prefix,
            num_virtual_tokens: raw.num_virtual_tokens,
            token_dim: raw.token_dim,
            num_layers: if prefix { need(raw.num_layers, "num_layers")? } else { raw.num_layers.unwrap_or(0) },
            num_attention_heads: if prefix {
                need(raw.num_attention_heads, "num_attention_heads")?
            } else {
                raw.num_attention_heads.unwrap_or(0)
            },
            num_transformer_submodules: raw.num_transformer_submodules.unwrap_or(1),
            raw: v.as_object().cloned().unwrap_or_default(),
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
