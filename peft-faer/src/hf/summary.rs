//! [`AdapterSummary`]: a PEFT adapter folder checked without holding its
//! tensor values (what `peft inspect` reports).

use std::path::Path;

use safetensors::Dtype;

use super::{HfAdapter, HfError, PeftConfig};

/// One LoRA module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSummary {
    /// Module name (`layers.0.q_proj`).
    pub name: String,
    /// Rank.
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Alpha.
    pub alpha: f64,
    /// The scale applied to `B A`.
    pub scale: f64,
    /// Whether `lora_B` has a bias.
    pub lora_bias: bool,
    /// Whether it is DoRA (has a magnitude vector).
    pub dora: bool,
}

impl ModuleSummary {
    /// Trainable parameters of the factors: `r (in + out)`, plus `out` for
    /// DoRA's magnitude (a `lora_B` bias is not counted, as before).
    pub fn params(&self) -> usize {
        self.r * (self.n_in + self.n_out) + if self.dora { self.n_out } else { 0 }
    }
}

/// One (IA)^3 module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct Ia3Summary {
    /// Module name.
    pub name: String,
    /// Whether it scales the input (a feedforward module).
    pub feedforward: bool,
    /// The vector's length.
    pub len: usize,
}

/// One LoHa module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct LohaSummary {
    /// Module name.
    pub name: String,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
}

/// One AdaLoRA module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraSummary {
    /// Module name.
    pub name: String,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// The kept rank.
    pub r: usize,
    /// The factor `s`.
    pub scale: f64,
}

/// One LN tuning module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct LnTuningSummary {
    /// Module name.
    pub name: String,
    /// Each saved parameter's name (`weight`, `bias`) and shape.
    pub params: Vec<(String, Vec<usize>)>,
}

/// One embedding with trainable tokens, of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainableTokensSummary {
    /// Module name.
    pub name: String,
    /// The tokens, in the rows' order.
    pub indices: Vec<u32>,
    /// The embedding width.
    pub dim: usize,
}

/// One C3A module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct C3aSummary {
    /// Module name.
    pub name: String,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Block size.
    pub block: usize,
}

/// One RoAd module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct RoadSummary {
    /// Module name.
    pub name: String,
    /// Output features.
    pub n_out: usize,
    /// `theta`'s (and `alpha`'s) length.
    pub len: usize,
}

/// One VB-LoRA module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct VbLoraSummary {
    /// Module name.
    pub name: String,
    /// `logits_A`'s and `logits_B`'s shapes.
    pub shapes: [[usize; 3]; 2],
    /// Saved in the top-k form.
    pub topk_form: bool,
}

/// One RandLoRA module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct RandLoraSummary {
    /// Module name.
    pub name: String,
    /// `randlora_lambda`'s shape `[r, nb]`.
    pub lambda: [usize; 2],
    /// `randlora_gamma`'s shape `[nb, mn]`.
    pub gamma: [usize; 2],
}

/// One FourierFT module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct FourierFtSummary {
    /// Module name.
    pub name: String,
    /// Frequencies.
    pub n: usize,
}

/// One BOFT module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct BoftSummary {
    /// Module name.
    pub name: String,
    /// `boft_R`'s shape `[F, N, b, b]`.
    pub shape: [usize; 4],
    /// Output features (`boft_s`'s length).
    pub n_out: usize,
}

/// One OFT module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct OftSummary {
    /// Module name.
    pub name: String,
    /// Stored blocks (1 when shared).
    pub rows: usize,
    /// Block size.
    pub block: usize,
}

/// One HRA module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct HraSummary {
    /// Module name.
    pub name: String,
    /// Input features.
    pub n_in: usize,
    /// Reflections.
    pub r: usize,
}

/// One MiSS module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct MissSummary {
    /// Module name.
    pub name: String,
    /// `miss_block`'s shape.
    pub shape: Vec<usize>,
}

/// One LoKr module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct LokrSummary {
    /// Module name.
    pub name: String,
    /// Input features `c d`.
    pub n_in: usize,
    /// Output features `a b`.
    pub n_out: usize,
    /// Rank of the low-rank factors.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `W1 [a, c]`.
    pub w1: [usize; 2],
    /// `W2 [b, d]`.
    pub w2: [usize; 2],
    /// Stored parameters.
    pub params: usize,
}

/// One VeRA module of an [`AdapterSummary`].
#[derive(Clone, Debug, PartialEq)]
pub struct VeraSummary {
    /// Module name.
    pub name: String,
    /// Rank (`lambda_d`'s length).
    pub r: usize,
    /// Output features (`lambda_b`'s length).
    pub n_out: usize,
}

/// VeRA's shared projections in an [`AdapterSummary`]: `vera_A [r,
/// max_in]`, `vera_B [max_out, r]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProjectionSummary {
    /// Rank.
    pub r: usize,
    /// Columns of `vera_A`.
    pub max_in: usize,
    /// Rows of `vera_B`.
    pub max_out: usize,
}

/// A tensor the adapter replaces whole.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSummary {
    /// Its name in the base.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// A tensor holding a NaN or an infinity.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFinite {
    /// The tensor's name as stored.
    pub tensor: String,
    /// The first such element (row-major).
    pub index: usize,
    /// Its value.
    pub value: f32,
}

/// A PEFT adapter directory, checked, without its tensor values
/// ([`HfAdapter::summarize`]).
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// The configuration.
    pub config: PeftConfig,
    /// The element type of the first tensor.
    pub dtype: Dtype,
    /// LoRA modules, in the order of their keys.
    pub modules: Vec<ModuleSummary>,
    /// Tensors replaced whole.
    pub replacements: Vec<TensorSummary>,
    /// Prompt learning: the shape of `prompt_embeddings`.
    pub prompt_shape: Option<Vec<usize>>,
    /// (IA)^3 modules.
    pub ia3: Vec<Ia3Summary>,
    /// LoHa modules.
    pub loha: Vec<LohaSummary>,
    /// LoKr modules.
    pub lokr: Vec<LokrSummary>,
    /// VeRA modules.
    pub vera: Vec<VeraSummary>,
    /// VeRA's shared projections.
    pub vera_projections: Option<ProjectionSummary>,
    /// AdaLoRA modules.
    pub adalora: Vec<AdaLoraSummary>,
    /// MiSS modules.
    pub miss: Vec<MissSummary>,
    /// HRA modules.
    pub hra: Vec<HraSummary>,
    /// OFT modules.
    pub oft: Vec<OftSummary>,
    /// BOFT modules.
    pub boft: Vec<BoftSummary>,
    /// FourierFT modules.
    pub fourierft: Vec<FourierFtSummary>,
    /// RandLoRA modules.
    pub randlora: Vec<RandLoraSummary>,
    /// VB-LoRA modules.
    pub vblora: Vec<VbLoraSummary>,
    /// VB-LoRA's bank's shape `[nv, L]`.
    pub vblora_bank: Option<[usize; 2]>,
    /// RandLoRA's shared bases' shapes, `randlora_A` and `randlora_B`.
    pub randlora_bases: Option<[[usize; 3]; 2]>,
    /// RoAd modules.
    pub road: Vec<RoadSummary>,
    /// C3A modules.
    pub c3a: Vec<C3aSummary>,
    /// SHiRA modules: name and number of positions.
    pub shira: Vec<(String, usize)>,
    /// LN tuning modules.
    pub ln_tuning: Vec<LnTuningSummary>,
    /// Embeddings with trainable tokens.
    pub trainable_tokens: Vec<TrainableTokensSummary>,
    /// Every tensor holding a NaN or infinity.
    pub nonfinite: Vec<NonFinite>,
}

impl HfAdapter {
    /// Checks a PEFT adapter directory as [`HfAdapter::read_dir`] does, but
    /// holds no tensor values: each tensor is scanned in bounded chunks for
    /// NaN and infinities instead, so memory does not grow with the
    /// adapter (what `peft inspect` uses).
    ///
    /// # Errors
    /// As [`HfAdapter::read_dir`].
    pub fn summarize(dir: &Path) -> Result<AdapterSummary, HfError> {
        let mut nonfinite = Vec::new();
        // The values are not held, so lengths come from the headers.
        let mut lens = std::collections::BTreeMap::new();
        let ad = Self::read_dir_with(dir, &mut |f, e| {
            if let Some((i, v)) = f.first_nonfinite(e)? {
                nonfinite.push(NonFinite { tensor: e.name.clone(), index: i, value: v });
            }
            lens.insert(super::normalize_key(&e.name), e.numel());
            Ok(Vec::new())
        })?;
        Ok(AdapterSummary {
            modules: ad
                .modules
                .iter()
                .map(|m| ModuleSummary {
                    name: m.name.clone(),
                    r: m.r,
                    n_in: m.n_in,
                    n_out: m.n_out,
                    alpha: m.alpha,
                    scale: m.scale,
                    lora_bias: m.lora_bias.is_some(),
                    dora: m.magnitude.is_some(),
                })
                .collect(),
            replacements: ad
                .replacements
                .iter()
                .map(|r| TensorSummary { name: r.name.clone(), shape: r.shape.clone() })
                .collect(),
            prompt_shape: ad.prompt.as_ref().map(|p| p.shape.clone()),
            ia3: ad
                .ia3
                .iter()
                .map(|m| {
                    let len = lens.get(&format!("{}.ia3_l", m.name)).copied().unwrap_or(0);
                    Ia3Summary { name: m.name.clone(), feedforward: m.feedforward, len }
                })
                .collect(),
            loha: ad
                .loha
                .iter()
                .map(|m| LohaSummary { name: m.name.clone(), n_in: m.n_in, n_out: m.n_out, r: m.r, alpha: m.alpha })
                .collect(),
            lokr: ad
                .lokr
                .iter()
                .map(|m| {
                    let (o, i) = m.dims();
                    let params = m.stored().iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
                    let (w1, w2) = ([m.d1.0, m.d1.1], [m.d2.0, m.d2.1]);
                    LokrSummary { name: m.name.clone(), n_in: i, n_out: o, r: m.r, alpha: m.alpha, w1, w2, params }
                })
                .collect(),
            vera: ad.vera.iter().map(|m| VeraSummary { name: m.name.clone(), r: m.r, n_out: m.n_out }).collect(),
            vera_projections: ad.vera_projections.as_ref().map(|p| ProjectionSummary {
                r: p.r,
                max_in: p.max_in,
                max_out: p.max_out,
            }),
            adalora: ad
                .adalora
                .iter()
                .map(|m| AdaLoraSummary { name: m.name.clone(), n_in: m.n_in, n_out: m.n_out, r: m.r, scale: m.scale })
                .collect(),
            miss: ad.miss.iter().map(|m| MissSummary { name: m.name.clone(), shape: m.shape.clone() }).collect(),
            hra: ad.hra.iter().map(|m| HraSummary { name: m.name.clone(), n_in: m.n_in, r: m.r }).collect(),
            fourierft: fourierft_summaries(&ad, &lens),
            randlora: randlora_summaries(&ad),
            randlora_bases: ad.randlora_bases.as_ref().map(|p| [p.a_shape, p.b_shape]),
            vblora: vblora_summaries(&ad),
            vblora_bank: ad.vblora_bank.as_ref().map(|b| b.shape),
            boft: boft_summaries(&ad, &lens),
            oft: ad
                .oft
                .iter()
                .map(|m| OftSummary { name: m.name.clone(), rows: m.rows, block: m.spec.block })
                .collect(),
            road: ad
                .road
                .iter()
                .map(|m| RoadSummary { name: m.name.clone(), n_out: m.n_out, len: m.variant.len(m.n_out) })
                .collect(),
            c3a: ad
                .c3a
                .iter()
                .map(|m| C3aSummary { name: m.name.clone(), n_in: m.n_in, n_out: m.n_out, block: m.block })
                .collect(),
            shira: ad.shira.iter().map(|m| (m.name.clone(), m.rows.len())).collect(),
            ln_tuning: ad.ln_tuning.iter().map(ln_tuning_summary).collect(),
            trainable_tokens: ad.trainable_tokens.iter().map(tokens_summary).collect(),
            dtype: ad.dtype,
            config: ad.config,
            nonfinite,
        })
    }
}

/// FourierFT's modules, their lengths from the headers.
fn fourierft_summaries(ad: &HfAdapter, lens: &std::collections::BTreeMap<String, usize>) -> Vec<FourierFtSummary> {
    let n = |name: &str| lens.get(&format!("{name}.fourierft_spectrum")).copied().unwrap_or(0);
    ad.fourierft.iter().map(|m| FourierFtSummary { name: m.name.clone(), n: n(&m.name) }).collect()
}

/// BOFT's modules, `boft_s`'s length from the headers.
fn boft_summaries(ad: &HfAdapter, lens: &std::collections::BTreeMap<String, usize>) -> Vec<BoftSummary> {
    let n_out = |name: &str| lens.get(&format!("{name}.boft_s")).copied().unwrap_or(0);
    ad.boft.iter().map(|m| BoftSummary { name: m.name.clone(), shape: m.shape, n_out: n_out(&m.name) }).collect()
}

/// RandLoRA's modules.
fn randlora_summaries(ad: &HfAdapter) -> Vec<RandLoraSummary> {
    let one = |m: &super::RandLoraModule| RandLoraSummary {
        name: m.name.clone(),
        lambda: m.lambda_shape,
        gamma: m.gamma_shape,
    };
    ad.randlora.iter().map(one).collect()
}

/// VB-LoRA's modules.
fn vblora_summaries(ad: &HfAdapter) -> Vec<VbLoraSummary> {
    let topk = |m: &super::VbLoraModule| matches!(m.stored, super::VbLoraStored::TopK(_));
    ad.vblora.iter().map(|m| VbLoraSummary { name: m.name.clone(), shapes: m.shapes, topk_form: topk(m) }).collect()
}

/// An LN tuning module's saved parameters, named without the module.
fn ln_tuning_summary(m: &super::LnTuningModule) -> LnTuningSummary {
    let param = |t: &super::HfTensor| {
        let name = t.name.strip_prefix(m.name.as_str()).unwrap_or(&t.name);
        name.trim_start_matches('.').to_string()
    };
    LnTuningSummary { name: m.name.clone(), params: m.params.iter().map(|t| (param(t), t.shape.clone())).collect() }
}

/// An embedding's trainable tokens.
fn tokens_summary(m: &super::TrainableTokensModule) -> TrainableTokensSummary {
    TrainableTokensSummary { name: m.name.clone(), indices: m.indices.clone(), dim: m.dim }
}
