//! `W' = W + s B A` for every adapted weight of a base checkpoint (or
//! `W + sum_i m_i s_i B_i A_i` for several adapters, [`merge_many`]),
//! streamed tensor by tensor (and row block by row block), computed in f32
//! with faer and rounded once to the output type.
//!
//! Peak memory is one row block (at most [`CHUNK_BYTES`] of f32) plus the
//! adapter, not the model: tensors are read with positioned reads and
//! written through a buffered writer. Everything is checked (every adapted
//! module's base weight present with the right shape, every replaced tensor
//! present with its shape) before the first byte of output is written, and
//! the output appears atomically (a temporary file or folder, renamed;
//! see [`crate::files`]: never over an input, never over an existing
//! output without `force`).
//!
//! **Non-finite values are refused by default.** A scale that overflows
//! f32, or a NaN or infinity in `A`, `B`, a `lora_B` bias or a replaced
//! tensor, is an error before anything is written; a merged element that
//! becomes NaN or infinite while its base element was finite (an overflow
//! of `W + s B A`) is an error naming the tensor and the first such index.
//! Base values that were already non-finite are copied as they are.
//! [`MergeOptions::allow_nonfinite`] writes everything anyway.
//!
//! **Quantized bases and outputs.** A base may hold int8, Q8_0 or Q4_0
//! matrices (see [`st`](super::st#quantized-tensors)): they are
//! dequantized row block by row block, merged in f32 and, unless
//! [`MergeOptions::dtype`] says otherwise, quantized again (once) to their
//! own format. [`MergeOptions::dtype`] may name a quantized format: every
//! matrix it fits is then written in it. Every tensor written quantized
//! from computed values gets a [`QuantError`] in the report: the largest
//! `|deq(quant(v)) - v|` against the f32 merge `v`. A merged value that is
//! not finite cannot be quantized and is always refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use peft_core::delta::DeltaRows;
use peft_core::method::{Direction, WeightUpdate};
use peft_core::storage::Format;
use peft_core::{Accum, Backend, MatMut, MatRef, Op};

use super::base::{Base, INDEX_FILE};
use super::st::{self, Entry, OutEntry};
use super::{
    AdaLoraModule, BoftModule, C3aModule, FourierFtModule, HfAdapter, HfError, HfLoraConfig, HfTensor, HraModule,
    Ia3Config, Ia3Module, LohaModule, LokrModule, LoraModule, MissModule, OftModule, PeftConfig, RandLoraModule,
    RandLoraShared, RoadModule, ShiraModule, TrainableTokensModule, VbLoraBank, VbLoraModule, VeraModule,
    VeraProjections,
};
use crate::files::{Staging, check_output};

/// Row blocks of adapted weights, and copy chunks, hold at most this many
/// bytes of f32.
pub const CHUNK_BYTES: usize = 8 << 20;

/// One adapter module's change to a weight. A weight several adapters
/// change takes each change in the adapters' order, as PEFT's
/// `merge_and_unload` merges them: sums for the additive methods, products
/// of scalings for (IA)^3, and for DoRA `(m / ||W0 + s B A||) (W + s B A)`:
/// the norm of the base weight `W0` plus the adapter's own delta (PEFT
/// 0.21.2's `_unmerged_base_weight`, so the norm is the one its forward
/// uses), the factor applied to the weight merged so far `W`.
enum Update<'a> {
    /// LoRA (DoRA when the module has a magnitude), `W += f B A` with `f`
    /// the multiplier times the scale; `true`: `W` is `[in, out]`
    /// (`fan_in_fan_out`, or an embedding's `[vocab, dim]`).
    Lora(&'a LoraModule, f32, bool),
    /// (IA)^3: `W` scaled by rows (`l [out]`) or columns (feedforward);
    /// `true`: `W` is a `Conv1D`'s `[in, out]`, the roles swapped.
    Ia3(&'a Ia3Module, bool),
    /// LoHa: `W += m dW` (`m` the multiplier).
    Loha(&'a LohaModule, f64),
    /// LoKr: `W += m dW`.
    Lokr(&'a LokrModule, f64),
    /// VeRA: `W += m dW` over the shared projections.
    Vera(&'a VeraModule, &'a VeraProjections, f64),
    /// AdaLoRA: `W += m dW`.
    AdaLora(&'a AdaLoraModule, f64),
    /// MiSS on a weight `[out, in]`: `W += m dW` (balance, mini), or bat's
    /// block update (multiplier 1).
    Miss(&'a MissModule, [usize; 2], f64),
    /// OFT on a weight `[out, in]`: each row's blocks `w_k -> w_k R_k^T`;
    /// on an embedding `[vocab, dim]`, `e_k -> e_k R_k` (multiplier 1).
    Oft(&'a OftModule, [usize; 2]),
    /// VB-LoRA on a weight `[out, in]` over the bank: `W += m B A`.
    VbLora(&'a VbLoraModule, &'a VbLoraBank, [usize; 2], f64),
    /// RandLoRA on a weight `[out, in]` over the shared bases: `W += m dW`.
    RandLora(&'a RandLoraModule, &'a RandLoraShared, [usize; 2], f64),
    /// FourierFT on a weight `[out, in]`: `W += m dW`.
    FourierFt(&'a FourierFtModule, [usize; 2], f64),
    /// BOFT on a weight `[out, in]`: each row `w_o -> (w_o M^T) s_o`
    /// (multiplier 1).
    Boft(&'a BoftModule, [usize; 2]),
    /// HRA: each row `w -> w H` (multiplier 1).
    Hra(&'a HraModule, usize),
    /// RoAd on a weight of `in` columns: pairs of rows rotated (multiplier 1).
    Road(&'a RoadModule, usize),
    /// C3A: `W += m dW`.
    C3a(&'a C3aModule, f64),
    /// SHiRA on a weight `[out, in]`: `W += m dW`.
    Shira(&'a ShiraModule, [usize; 2], f64),
    /// Trainable tokens on an embedding of `vocab` rows: the tokens' rows
    /// replaced (multiplier 1).
    Tokens(&'a TrainableTokensModule, usize),
}

/// One adapter module's change to a bias, in the adapters' order.
enum BiasUpdate<'a> {
    /// `b += f lora_B.bias` (`lora_bias`).
    Lora(&'a LoraModule, f32),
    /// (IA)^3 on the output: `b *= l`.
    Ia3(&'a Ia3Module),
    /// RoAd: `b <- R b`.
    Road(&'a RoadModule),
}

/// What happens to one base tensor.
enum Action<'a> {
    Copy,
    /// The weight's changes, in order, applied to the adapter's saved copy
    /// of the weight when it has one (PEFT's `save_embedding_layers`: the
    /// copy is loaded into the base layer, then the LoRA merges on top).
    Weight(Option<&'a HfTensor>, Vec<Update<'a>>),
    Bias(Vec<BiasUpdate<'a>>),
    Replace(&'a HfTensor),
}

/// What a merge did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// Weights that received `s B A`.
    pub merged: usize,
    /// Tensors replaced whole (trained biases, `modules_to_save`).
    pub replaced: usize,
    /// Tensors copied.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Tensors written in a quantized format from computed values, in
    /// storage order, with their rounding error.
    pub quantized: Vec<QuantError>,
    /// Matrices [`MergeOptions::dtype`] does not fit (Q8_0 or Q4_0 asked
    /// of rows not a multiple of 32 long): written in their own format.
    /// Vectors and other non-matrices never take a quantized format (they
    /// keep their own, unreported).
    pub kept: Vec<String>,
}

/// The rounding error of one tensor written quantized.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantError {
    /// The tensor.
    pub tensor: String,
    /// Its format in the output.
    pub format: Format,
    /// The largest `|deq(quant(v)) - v|` over its elements, `v` the f32
    /// values (the f32 merge) before quantization.
    pub max_error: f32,
    /// The largest `|v|`: [`peft_core::storage::error_bound`] of it bounds
    /// `max_error`.
    pub max_abs: f32,
}

impl QuantError {
    fn new(tensor: &str, format: Format) -> Self {
        Self { tensor: tensor.to_string(), format, max_error: 0.0, max_abs: 0.0 }
    }

    /// Takes in the values `v` and their dequantized round trip `back`.
    fn update(&mut self, v: &[f32], back: &[f32]) {
        for (x, y) in v.iter().zip(back) {
            self.max_error = self.max_error.max((x - y).abs());
            self.max_abs = self.max_abs.max(x.abs());
        }
    }
}

/// How [`merge`] writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeOptions {
    /// Storage of the output's float and quantized tensors (`None`: each
    /// keeps its own). A quantized format applies to the matrices it fits
    /// (see [`MergeReport::kept`]).
    pub dtype: Option<Format>,
    /// Replace an existing output (once the new one is complete).
    pub force: bool,
    /// Write NaN or infinite merged values instead of refusing them.
    pub allow_nonfinite: bool,
}

/// The least common multiple of `a` and `b` (both at least 1).
fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x.max(1) * b
}

/// The first non-finite value of `v`: its index and value.
fn first_nonfinite(v: &[f32]) -> Option<(usize, f32)> {
    v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))
}

/// Why a non-finite value the adapter holds is refused (`bad`'s cause).
const HELD: &str = "the adapter holds it; --allow-nonfinite merges it anyway";

/// Refuses non-finite adapter values before anything is written.
fn check_finite(adapter: &HfAdapter, multiplier: f64) -> Result<(), HfError> {
    let bad = |tensor: String, (index, value): (usize, f32), cause| HfError::NonFinite { tensor, index, value, cause };
    for m in &adapter.modules {
        let s = (m.scale * multiplier) as f32;
        if !s.is_finite() {
            let cause = if multiplier == 1.0 {
                "the scale alpha / r overflows f32; --allow-nonfinite merges it anyway"
            } else {
                "the scale alpha / r times the adapter's multiplier overflows f32; --allow-nonfinite merges it anyway"
            };
            return Err(bad(format!("{}.weight", m.name), (0, s), cause));
        }
        for (t, v) in [("lora_A.weight", &m.a), ("lora_B.weight", &m.b)] {
            if let Some(x) = first_nonfinite(v) {
                return Err(bad(format!("{}.{t}", m.name), x, HELD));
            }
        }
        if let Some(x) = m.lora_bias.as_deref().and_then(first_nonfinite) {
            return Err(bad(format!("{}.lora_B.bias", m.name), x, HELD));
        }
        if let Some(x) = m.magnitude.as_deref().and_then(first_nonfinite) {
            return Err(bad(format!("{}.lora_magnitude_vector", m.name), x, HELD));
        }
    }
    // Every other tensor the adapter holds, under its key (training-only state aside: it is not merged).
    let training = |name: &str| adapter.training_state.iter().any(|t| name == format!("base_model.model.{}", t.name));
    for (name, _, _, v) in adapter.tensors() {
        let key = name.strip_prefix("base_model.model.").unwrap_or(&name);
        let lora = adapter.modules.iter().any(|m| key.starts_with(&format!("{}.lora_", m.name)));
        if lora || training(&name) {
            continue;
        }
        if let Some(x) = first_nonfinite(v) {
            return Err(bad(key.to_string(), x, HELD));
        }
    }
    Ok(())
}

/// The merge's plan: every base tensor an adapter changes, and how.
struct Plan<'a, 'b> {
    base: &'b Base,
    actions: BTreeMap<String, Action<'a>>,
    /// The base model's `model_type` (from the `config.json` beside it),
    /// read when first needed: `None` not yet read, `Some(None)` no config.
    model_type: Option<Option<String>>,
}

/// transformers' models whose projections are GPT-2's `Conv1D`, weights
/// `[in, out]` (the `model_type` of every model that imports it).
const CONV1D_MODELS: [&str; 7] =
    ["gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_encoder", "clvp_decoder"];

impl<'a> Plan<'a, '_> {
    /// The shape of float tensor `name` of the base when it `fits` (`want`
    /// says what the adapter needs).
    fn check(&self, name: &str, fits: &dyn Fn(&[usize]) -> bool, want: &str) -> Result<&[usize], HfError> {
        let (_, e) =
            self.base.find(name).ok_or_else(|| HfError::Base(format!("{name}, adapted by the adapter, is missing")))?;
        if !fits(&e.shape) {
            return Err(HfError::Base(format!("{name} has shape {:?}, the adapter needs {want}", e.shape)));
        }
        e.format().ok_or_else(|| HfError::Unsupported(format!("{name}: element type {:?}", e.dtype)))?;
        Ok(&e.shape)
    }

    /// `[out, in]` of the base's float matrix `name` when `fits(out, in)`
    /// ([`check`](Self::check)'s refusals otherwise): for the methods whose
    /// files hold one side of the shape, or none.
    fn matrix(&self, name: &str, fits: &dyn Fn(usize, usize) -> bool, want: &str) -> Result<[usize; 2], HfError> {
        let fits_matrix = |s: &[usize]| matches!(*s, [o, i] if fits(o, i));
        match *self.check(name, &fits_matrix, want)? {
            [o, i] => Ok([o, i]),
            _ => Err(HfError::Base(format!("{name}: the adapter needs {want}"))),
        }
    }

    /// Adds `update(shape)` to `<module>.weight` when its shape `fits`
    /// (the methods whose files do not hold the whole shape; `want` says
    /// what they need).
    fn fitted(
        &mut self,
        module: &str,
        want: &str,
        fits: &dyn Fn(usize, usize) -> bool,
        update: impl FnOnce([usize; 2]) -> Update<'a>,
    ) -> Result<(), HfError> {
        let name = format!("{module}.weight");
        let shape = self.matrix(&name, fits, want)?;
        self.push_weight(name, update(shape))
    }

    /// Adds `update` to `<module>.weight`, of shape `[rows, cols]`.
    fn weight(&mut self, module: &str, shape: [usize; 2], update: Update<'a>) -> Result<(), HfError> {
        let name = format!("{module}.weight");
        self.check(&name, &|s| s == shape, &format!("{shape:?}"))?;
        self.push_weight(name, update)
    }

    fn push_weight(&mut self, name: String, update: Update<'a>) -> Result<(), HfError> {
        match self.actions.entry(name.clone()).or_insert_with(|| Action::Weight(None, Vec::new())) {
            Action::Weight(_, list) => {
                list.push(update);
                Ok(())
            }
            _ => Err(HfError::conflict(name, "is both adapted and replaced")),
        }
    }

    /// Adds `update` to the bias `name`.
    fn bias(&mut self, name: String, update: BiasUpdate<'a>) -> Result<(), HfError> {
        match self.actions.entry(name.clone()).or_insert_with(|| Action::Bias(Vec::new())) {
            Action::Bias(list) => {
                list.push(update);
                Ok(())
            }
            _ => Err(HfError::conflict(name, "is both adapted and replaced")),
        }
    }

    /// Whether the LoRA module `m`'s base weight is `[in, out]` (GPT-2's
    /// `Conv1D`), so that its update is `s (B A)^T` ([`Plan::layout`]).
    ///
    /// # Errors
    /// As [`Plan::layout`].
    fn conv1d(&mut self, lc: &HfLoraConfig, m: &LoraModule) -> Result<bool, HfError> {
        let shape = self.base.find(&format!("{}.weight", m.name)).map(|(_, e)| e.shape.clone());
        let Some(&[rows, cols]) = shape.as_deref() else { return Ok(lc.fan_in_fan_out) };
        let (linear, conv1d) = ([rows, cols] == [m.n_out, m.n_in], [rows, cols] == [m.n_in, m.n_out]);
        self.layout(&m.name, linear, conv1d, lc.fan_in_fan_out)
    }

    /// Whether module `name`'s weight is a GPT-2 `Conv1D`'s, `[in, out]`,
    /// given whether its shape fits `nn.Linear`'s layout and `Conv1D`'s.
    /// PEFT decides by the layer, not by the config: it sets
    /// `fan_in_fan_out` to false for an `nn.Linear` and to true for a
    /// `Conv1D`, with a warning. Here the shape decides when only one
    /// layout fits; when both do (a square weight), the weight is a
    /// `Conv1D` exactly when the base's `config.json` names a model built
    /// on it ([`CONV1D_MODELS`]). When neither fits, the config's field is
    /// taken and the shape check names the mismatch.
    ///
    /// # Errors
    /// [`HfError::Config`] (`fan_in_fan_out`) for a weight both layouts
    /// fit, the field true, and no `config.json` beside the base to tell
    /// the layer.
    fn layout(&mut self, name: &str, linear: bool, conv1d: bool, fan_in_fan_out: bool) -> Result<bool, HfError> {
        match (linear, conv1d) {
            (true, false) => return Ok(false),
            (false, true) => return Ok(true),
            (false, false) => return Ok(fan_in_fan_out),
            (true, true) => {}
        }
        match self.model_type()? {
            Some(t) => Ok(CONV1D_MODELS.contains(&t.as_str())),
            None if fan_in_fan_out => Err(HfError::config(
                "fan_in_fan_out",
                &format!(
                    "is true and {name}.weight is square: PEFT transposes only a GPT-2 Conv1D (and ignores the field \
                     for nn.Linear), and without the base's config.json beside it the layer cannot be told"
                ),
            )),
            None => Ok(false),
        }
    }

    /// The base's `model_type`, from the `config.json` in its folder (or
    /// beside its file), read once; `None` when there is none.
    fn model_type(&mut self) -> Result<Option<String>, HfError> {
        if let Some(t) = &self.model_type {
            return Ok(t.clone());
        }
        let path = self.base.path();
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        let config = dir.join("config.json");
        let t = match config.is_file() {
            true => {
                let bytes = crate::files::read_bounded(&config, super::MAX_CONFIG_BYTES)?;
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| HfError::Json(format!("{}: {e}", config.display())))?;
                v.get("model_type").and_then(|t| t.as_str()).map(str::to_string)
            }
            false => None,
        };
        self.model_type = Some(t.clone());
        Ok(t)
    }

    fn lora(&mut self, lc: &HfLoraConfig, m: &'a LoraModule, multiplier: f64) -> Result<(), HfError> {
        // An embedding's weight is `[vocab, dim]` = `[in, out]`: its update
        // `s (B A)^T` is the fan_in_fan_out one.
        let transposed = m.embedding || self.conv1d(lc, m)?;
        let shape = if transposed { [m.n_in, m.n_out] } else { [m.n_out, m.n_in] };
        let factor = (m.scale * multiplier) as f32;
        self.weight(&m.name, shape, Update::Lora(m, factor, transposed))?;
        if m.lora_bias.is_some() {
            let bias = format!("{}.bias", m.name);
            let (_, e) = self
                .base
                .find(&bias)
                .ok_or_else(|| HfError::Base(format!("{bias} is missing (lora_bias needs it)")))?;
            if e.shape != [m.n_out] {
                return Err(HfError::Base(format!("{bias} has shape {:?}, expected [{}]", e.shape, m.n_out)));
            }
            self.bias(bias, BiasUpdate::Lora(m, factor))?;
        }
        Ok(())
    }

    /// An (IA)^3 module: its weight scaled, and for the output kind its
    /// bias (when the base has one). A GPT-2 `Conv1D` weight is `[in,
    /// out]`: PEFT scales its rows for the feedforward kind and its columns
    /// otherwise, the transpose of `nn.Linear`'s; which layout a weight
    /// has is told as for LoRA ([`Plan::layout`]).
    fn ia3(&mut self, ic: &Ia3Config, m: &'a Ia3Module) -> Result<(), HfError> {
        let name = format!("{}.weight", m.name);
        let n = m.l.len();
        let shape = self.base.find(&name).map(|(_, e)| e.shape.clone()).unwrap_or_default();
        let fits = |s: &[usize], transposed: bool| matches!(s, &[rows, cols] if (if m.feedforward != transposed { cols } else { rows }) == n);
        let transposed = self.layout(&m.name, fits(&shape, false), fits(&shape, true), ic.fan_in_fan_out)?;
        self.check(
            &name,
            &|s| fits(s, transposed),
            &format!("{:?} for ia3_l {:?}", if m.feedforward { "[out, l]" } else { "[l, in]" }, m.shape()),
        )?;
        self.push_weight(name, Update::Ia3(m, transposed))?;
        let bias = format!("{}.bias", m.name);
        if !m.feedforward && self.base.find(&bias).is_some() {
            self.bias(bias, BiasUpdate::Ia3(m))?;
        }
        Ok(())
    }

    fn vera(&mut self, m: &'a VeraModule, proj: &'a VeraProjections, multiplier: f64) -> Result<(), HfError> {
        let name = format!("{}.weight", m.name);
        let fits = |s: &[usize]| matches!(s, &[o, i] if o == m.n_out && i <= proj.max_in);
        let want = format!("[{}, in] with in <= vera_A's {} columns", m.n_out, proj.max_in);
        self.check(&name, &fits, &want)?;
        self.push_weight(name, Update::Vera(m, proj, multiplier))
    }

    /// MiSS on `<module>.weight`, whose input width only the base gives:
    /// the block must fit the base's shape (`peft-core` checks it).
    fn miss(&mut self, m: &'a MissModule, multiplier: f64) -> Result<(), HfError> {
        let name = format!("{}.weight", m.name);
        let want = format!("a matrix miss_block {:?} fits", m.shape);
        let [n_out, n_in] = self.matrix(&name, &|o, i| m.layer(i, o).is_ok(), &want)?;
        if m.variant == peft_core::miss::MissVariant::Bat && multiplier != 1.0 {
            return Err(HfError::Unsupported("a multiplier other than 1 for a MiSS bat adapter".into()));
        }
        self.push_weight(name, Update::Miss(m, [n_out, n_in], multiplier))
    }

    /// RoAd on `<module>.weight` `[out, in]` (`out` from the vectors), and
    /// on its bias when the base has one: PEFT rotates the bias too.
    fn road(&mut self, m: &'a RoadModule) -> Result<(), HfError> {
        let name = format!("{}.weight", m.name);
        let [_, n_in] = self.matrix(&name, &|o, _| o == m.n_out, &format!("[{}, in]", m.n_out))?;
        self.push_weight(name, Update::Road(m, n_in))?;
        let bias = format!("{}.bias", m.name);
        if self.base.find(&bias).is_some() {
            self.bias(bias, BiasUpdate::Road(m))?;
        }
        Ok(())
    }

    /// SHiRA on `<module>.weight`: every position inside its shape.
    fn shira(&mut self, m: &'a ShiraModule, multiplier: f64) -> Result<(), HfError> {
        let want = format!("a matrix holding its {} positions", m.rows.len());
        self.fitted(&m.name, &want, &|o, i| m.layer(i, o).is_ok(), |d| Update::Shira(m, d, multiplier))
    }

    /// OFT on `<module>.weight` `[out, in]`: the blocks must be the ones
    /// PEFT gives `in`.
    fn oft(&mut self, m: &'a OftModule) -> Result<(), HfError> {
        let want = format!("a matrix whose input takes {} blocks of {}", m.rows, m.spec.block);
        self.fitted(&m.name, &want, &|o, i| m.layer(i, o).is_ok(), |d| Update::Oft(m, d))
    }

    /// VB-LoRA on `<module>.weight`: the logits' blocks times the vector
    /// length give its shape.
    fn vblora(&mut self, m: &'a VbLoraModule, bank: &'a VbLoraBank, multiplier: f64) -> Result<(), HfError> {
        let l = bank.shape[1];
        let want = format!("[{}, {}]", m.shapes[1][0] * l, m.shapes[0][1] * l);
        self.fitted(&m.name, &want, &|o, i| m.layer(bank, i, o).is_ok(), |d| Update::VbLora(m, bank, d, multiplier))
    }

    /// RandLoRA on `<module>.weight`: `gamma`'s width is `min(in, out)`,
    /// the bases cover the shape.
    fn randlora(&mut self, m: &'a RandLoraModule, p: &'a RandLoraShared, multiplier: f64) -> Result<(), HfError> {
        let bases = p.bases()?;
        let want = format!("a matrix of min(out, in) = {} that the bases cover", m.gamma_shape[1]);
        self.fitted(&m.name, &want, &|o, i| m.layer(&bases, i, o).is_ok(), |d| Update::RandLora(m, p, d, multiplier))
    }

    /// FourierFT on `<module>.weight`: its frequencies drawn for the
    /// weight's shape.
    fn fourierft(&mut self, m: &'a FourierFtModule, multiplier: f64) -> Result<(), HfError> {
        let want = format!("a matrix of at least {} weights", m.spectrum.len());
        self.fitted(&m.name, &want, &|o, i| m.layer(i, o).is_ok(), |d| Update::FourierFt(m, d, multiplier))
    }

    /// BOFT on `<module>.weight` `[out, in]`: `N b = in`, `boft_s` `out`
    /// long.
    fn boft(&mut self, m: &'a BoftModule) -> Result<(), HfError> {
        let [_, n, b, _] = m.shape;
        let want = format!("[{}, {}]", m.s.len(), n * b);
        self.fitted(&m.name, &want, &|o, i| m.layer(i, o).is_ok(), |d| Update::Boft(m, d))
    }

    /// HRA on `<module>.weight` `[out, in]`: `in` must be `hra_u`'s rows.
    fn hra(&mut self, m: &'a HraModule) -> Result<(), HfError> {
        let name = format!("{}.weight", m.name);
        let [n_out, _] = self.matrix(&name, &|_, i| i == m.n_in, &format!("[out, {}]", m.n_in))?;
        self.push_weight(name, Update::Hra(m, n_out))
    }

    /// LN tuning: each module's saved parameters replace the base's (PEFT's
    /// merge swaps the trained copy in).
    fn ln_tuning(&mut self, adapter: &'a HfAdapter) -> Result<(), HfError> {
        adapter.ln_tuning.iter().flat_map(|m| &m.params).try_for_each(|t| self.replace(t))
    }

    /// Trainable tokens: `<module>.weight` `[vocab, dim]` with the tokens'
    /// rows replaced.
    fn tokens(&mut self, m: &'a TrainableTokensModule) -> Result<(), HfError> {
        let want = format!("an embedding [vocab, {}] holding every token of `token_indices` {:?}", m.dim, m.indices);
        self.fitted(&m.name, &want, &|v, d| d == m.dim && m.layer(v).is_ok(), |[v, _]| Update::Tokens(m, v))
    }

    /// Every tensor an adapter replaces whole, once.
    fn replacements(&mut self, adapter: &'a HfAdapter) -> Result<(), HfError> {
        adapter.replacements.iter().try_for_each(|r| self.replace(r))
    }

    /// `r` written in place of the base's tensor of its name (which must
    /// exist, of `r`'s shape, and not be replaced or adapted by another).
    fn replace(&mut self, r: &'a HfTensor) -> Result<(), HfError> {
        let (_, e) = self
            .base
            .find(&r.name)
            .ok_or_else(|| HfError::Base(format!("{}, saved by the adapter, is missing", r.name)))?;
        if e.shape != r.shape {
            return Err(HfError::Base(format!("{} has shape {:?}, the adapter's has {:?}", r.name, e.shape, r.shape)));
        }
        match self.actions.get_mut(&r.name) {
            None => {
                self.actions.insert(r.name.clone(), Action::Replace(r));
            }
            // The saved copy of an adapted weight: the changes apply to it.
            Some(Action::Weight(start @ None, _)) => *start = Some(r),
            Some(Action::Replace(_) | Action::Weight(Some(_), _)) => {
                return Err(HfError::conflict(&r.name, "is replaced by two adapters"));
            }
            Some(_) => return Err(HfError::conflict(&r.name, "is both adapted and replaced")),
        }
        Ok(())
    }
}

/// What the merge of `adapters` into `base` does to each tensor.
fn plan<'a>(base: &Base, adapters: &[(&'a HfAdapter, f64)]) -> Result<BTreeMap<String, Action<'a>>, HfError> {
    let mut plan = Plan { base, actions: BTreeMap::new(), model_type: None };
    for &(adapter, multiplier) in adapters {
        // The multiplicative methods have no scale for a multiplier to act on.
        let c = &adapter.config;
        let unscaled = matches!(c, PeftConfig::Ia3(_) | PeftConfig::Road(_) | PeftConfig::Boft(_))
            || matches!(c, PeftConfig::Oft(_) | PeftConfig::Hra(_) | PeftConfig::LnTuning(_))
            || matches!(c, PeftConfig::TrainableTokens(_));
        if unscaled && multiplier != 1.0 {
            let method = c.method_name();
            return Err(HfError::Unsupported(format!("a multiplier other than 1 for a {method} adapter")));
        }
        plan.adapter(adapter, multiplier)?;
    }
    for &(adapter, _) in adapters {
        plan.replacements(adapter)?;
    }
    Ok(plan.actions)
}

impl<'a> Plan<'a, '_> {
    /// Every change `adapter` makes, scaled by `multiplier` where the
    /// method has a scale.
    fn adapter(&mut self, adapter: &'a HfAdapter, multiplier: f64) -> Result<(), HfError> {
        let plan = self;
        match &adapter.config {
            PeftConfig::Lora(lc) => {
                for m in &adapter.modules {
                    plan.lora(lc, m, multiplier)?;
                }
            }
            PeftConfig::Ia3(ic) => {
                for m in &adapter.ia3 {
                    plan.ia3(ic, m)?;
                }
            }
            PeftConfig::Loha(_) => {
                for m in &adapter.loha {
                    plan.weight(&m.name, [m.n_out, m.n_in], Update::Loha(m, multiplier))?;
                }
            }
            PeftConfig::Lokr(_) => {
                for m in &adapter.lokr {
                    let (n_out, n_in) = m.dims();
                    plan.weight(&m.name, [n_out, n_in], Update::Lokr(m, multiplier))?;
                }
            }
            PeftConfig::Shira(_) => {
                for m in &adapter.shira {
                    plan.shira(m, multiplier)?;
                }
            }
            // PEFT's merge swaps the trained copy in: its parameters replace the base's.
            // Trainable tokens: below, for this method and for LoRA's `trainable_token_indices`.
            PeftConfig::LnTuning(_) | PeftConfig::TrainableTokens(_) => plan.ln_tuning(adapter)?,
            PeftConfig::C3a(_) => {
                for m in &adapter.c3a {
                    plan.weight(&m.name, [m.n_out, m.n_in], Update::C3a(m, multiplier))?;
                }
            }
            PeftConfig::Road(_) => {
                for m in &adapter.road {
                    plan.road(m)?;
                }
            }
            PeftConfig::VbLora(_) => {
                let bank = adapter.vblora_bank.as_ref().ok_or_else(|| HfError::missing(crate::hf::VBLORA_BANK_KEY))?;
                for m in &adapter.vblora {
                    plan.vblora(m, bank, multiplier)?;
                }
            }
            PeftConfig::RandLora(_) => {
                let p = adapter.randlora_bases.as_ref().ok_or_else(|| HfError::missing(crate::hf::RANDLORA_A_KEY))?;
                for m in &adapter.randlora {
                    plan.randlora(m, p, multiplier)?;
                }
            }
            PeftConfig::FourierFt(_) => {
                for m in &adapter.fourierft {
                    plan.fourierft(m, multiplier)?;
                }
            }
            PeftConfig::Boft(_) => {
                for m in &adapter.boft {
                    plan.boft(m)?;
                }
            }
            PeftConfig::Oft(_) => {
                for m in &adapter.oft {
                    plan.oft(m)?;
                }
            }
            PeftConfig::Hra(_) => {
                for m in &adapter.hra {
                    plan.hra(m)?;
                }
            }
            PeftConfig::Miss(_) => {
                for m in &adapter.miss {
                    plan.miss(m, multiplier)?;
                }
            }
            PeftConfig::AdaLora(_) => {
                for m in &adapter.adalora {
                    plan.weight(&m.name, [m.n_out, m.n_in], Update::AdaLora(m, multiplier))?;
                }
            }
            PeftConfig::Vera(_) => {
                let proj = adapter.vera_projections.as_ref().ok_or_else(|| HfError::missing(crate::hf::VERA_A_KEY))?;
                for m in &adapter.vera {
                    plan.vera(m, proj, multiplier)?;
                }
            }
            PeftConfig::Prompt(_) => {
                return Err(HfError::Unsupported(
                    "merging prompt or prefix tuning (they have no weights to merge into)".into(),
                ));
            }
        }
        adapter.trainable_tokens.iter().try_for_each(|m| plan.tokens(m))
    }
}

/// Merges `adapter` into `base`, writing `out` (a `.safetensors` file for a
/// single-file base, a folder with the same shard names and an index for a
/// sharded one). Every tensor keeps its name and storage order; float
/// tensors take `options.dtype` if given, others keep theirs. `progress` is
/// called with the bytes of each tensor written.
///
/// # Errors
/// [`HfError::OutputIsInput`] if `out` is one of the base's or adapter's
/// files (or a folder holding one); [`HfError::OutputExists`] if it
/// exists and not `options.force`; [`HfError::NonFinite`] (see the module
/// docs); the other [`HfError`]s from the checks, before any output
/// exists; I/O errors while writing (the temporary output is removed).
pub fn merge<B: Backend<f32> + ?Sized>(
    base: &Base,
    adapter: &HfAdapter,
    out: &Path,
    options: &MergeOptions,
    backend: &B,
    progress: impl FnMut(u64),
) -> Result<MergeReport, HfError> {
    merge_many(base, &[(adapter, 1.0)], out, options, backend, progress)
}

/// Merges several adapters into `base` in one streaming pass, each with a
/// multiplier `m` (llama.cpp's `--lora-scaled`):
///
/// ```text
/// W' = W + sum_i m_i s_i B_i A_i        (added in the order given, in f32)
/// b' = b + sum_i m_i s_i lora_B.bias_i  (lora_bias adapters)
/// ```
///
/// as PEFT's `merge_and_unload` with several active adapters does for
/// `m_i = 1`. Every method's change to a weight is applied in the order
/// the adapters are given, a block of rows at a time, through `peft-core`'s
/// merge of that method: several LoHa, LoKr or VeRA adapters on one weight
/// add their deltas, several (IA)^3 vectors multiply, and DoRA scales the
/// weight merged so far plus its delta by `m / ||W0 + s B A||`, the norm
/// taken over the unmerged base `W0` as PEFT 0.21.2 does (checked against
/// its `merge_and_unload` in `tests/llama_cases.rs`). A whole-tensor replacement (a trained bias,
/// `modules_to_save`) is written as saved, whatever the multiplier; a
/// tensor replaced by two adapters, or replaced by one and adapted by
/// another, is refused. Otherwise as [`merge`].
///
/// # Errors
/// As [`merge`]; [`HfError::NonFinite`] also for a multiplier that makes a
/// scale non-finite.
pub fn merge_many<B: Backend<f32> + ?Sized>(
    base: &Base,
    adapters: &[(&HfAdapter, f64)],
    out: &Path,
    options: &MergeOptions,
    backend: &B,
    mut progress: impl FnMut(u64),
) -> Result<MergeReport, HfError> {
    let inputs: Vec<std::path::PathBuf> =
        base.input_files().into_iter().chain(adapters.iter().flat_map(|(a, _)| a.source_files())).collect();
    let input_refs: Vec<&Path> = inputs.iter().map(|p| p.as_path()).collect();
    check_output(out, &input_refs, options.force)?;
    let actions = plan(base, adapters).map_err(|e| e.in_file(base.path()))?;
    if !options.allow_nonfinite {
        for &(adapter, multiplier) in adapters {
            check_finite(adapter, multiplier)?;
        }
    }
    let dtype = options.dtype;
    let staging = if base.index.is_some() { Staging::dir(out)? } else { Staging::file(out)? };
    let tmp = staging.path().to_path_buf();
    let result = (|| {
        let mut report = MergeReport::default();
        let mut weight_map = serde_json::Map::new();
        for shard in &base.shards {
            let shard_name = shard.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let (target, shown) = match base.index {
                Some(_) => {
                    let name = shard.path.file_name().unwrap_or_default();
                    (tmp.join(name), out.join(name))
                }
                None => (tmp.clone(), out.to_path_buf()),
            };
            let entries: Vec<OutEntry> = shard
                .entries
                .iter()
                .map(|e| match (e.format(), dtype) {
                    (Some(_), Some(want)) if st::fits(want, &e.shape) => {
                        OutEntry::stored(&e.name, want, e.shape.clone())
                    }
                    (Some(f), want) => {
                        if want.is_some() && e.shape.len() == 2 {
                            report.kept.push(e.name.clone());
                        }
                        OutEntry::stored(&e.name, f, e.shape.clone())
                    }
                    (None, _) => OutEntry::plain(&e.name, e.dtype, e.shape.clone()),
                })
                .collect();
            let mut metadata = shard.metadata.clone();
            metadata.entry("format".into()).or_insert_with(|| "pt".into());
            // Errors name the output, not the temporary they remove.
            let file = File::create(&target).map_err(|e| HfError::Io(shown.clone(), e))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let io = |e| HfError::Io(shown.clone(), e);
            w.write_all(&st::header(&entries, &metadata)?).map_err(io)?;
            for (e, oe) in shard.entries.iter().zip(&entries) {
                let action = actions.get(&e.name).unwrap_or(&Action::Copy);
                let check = !options.allow_nonfinite;
                let out_format = oe.quant.or_else(|| st::float_format(oe.dtype));
                let error =
                    write_tensor(shard, e, out_format, action, backend, check, &mut w).map_err(|err| match err {
                        WriteError::Io(x) => HfError::Io(shown.clone(), x),
                        WriteError::Hf(h) => h,
                    })?;
                report.quantized.extend(error);
                match action {
                    Action::Copy => report.copied += 1,
                    Action::Weight(..) => report.merged += 1,
                    Action::Bias(_) | Action::Replace(_) => report.replaced += 1,
                }
                report.bytes += oe.bytes();
                progress(oe.bytes());
                weight_map.insert(e.name.clone(), serde_json::Value::String(shard_name.clone()));
            }
            let file = w.into_inner().map_err(|e| HfError::Io(shown.clone(), e.into_error()))?;
            file.sync_all().map_err(|e| HfError::Io(shown.clone(), e))?;
        }
        if let Some((_, extra)) = &base.index {
            let mut index = extra.clone();
            let meta = index.entry("metadata").or_insert_with(|| serde_json::json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.insert("total_size".into(), report.bytes.into());
            }
            index.insert("weight_map".into(), serde_json::Value::Object(weight_map));
            let path = tmp.join(INDEX_FILE);
            let text = serde_json::to_vec_pretty(&index).map_err(HfError::json)?;
            let shown = out.join(INDEX_FILE);
            let io = |e| HfError::Io(shown.clone(), e);
            let mut f = File::create(&path).map_err(io)?;
            f.write_all(&text).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        Ok::<_, HfError>(report)
    })()?;
    // Dropping `staging` on an error above removed the temporary.
    staging.commit(options.force)?;
    Ok(result)
}

enum WriteError {
    Io(std::io::Error),
    Hf(HfError),
}

impl From<HfError> for WriteError {
    fn from(e: HfError) -> Self {
        WriteError::Hf(e)
    }
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        WriteError::Io(e)
    }
}

impl From<peft_core::Error> for WriteError {
    fn from(e: peft_core::Error) -> Self {
        WriteError::Hf(HfError::Core(e))
    }
}

/// Writes one tensor in `out_format` (`None`: a non-float tensor, copied
/// as stored); returns the rounding error if it was quantized from
/// computed values.
fn write_tensor<B: Backend<f32> + ?Sized>(
    shard: &st::StFile,
    e: &Entry,
    out_format: Option<Format>,
    action: &Action<'_>,
    backend: &B,
    check_finite: bool,
    w: &mut impl Write,
) -> Result<Option<QuantError>, WriteError> {
    let out_f = match out_format {
        Some(f) if e.format() != Some(f) || !matches!(action, Action::Copy) => f,
        // Unchanged: the stored bytes, whatever they are.
        _ => {
            let mut buf = vec![0u8; CHUNK_BYTES.min(e.len as usize)];
            let mut at = 0u64;
            while at < e.len {
                let n = buf.len().min((e.len - at) as usize);
                shard.read_at(e, at, &mut buf[..n])?;
                w.write_all(&buf[..n])?;
                at += n as u64;
            }
            return Ok(None);
        }
    };
    // Vectors and other non-matrices: whole (biases) or chunked (a copy).
    let cols = match e.shape.as_slice() {
        &[_, c] => c,
        _ => e.numel().max(1),
    };
    let mut out = Vec::new();
    let mut error = out_f.is_quantized().then(|| QuantError::new(&e.name, out_f));
    let mut put = |vals: &[f32], offset: usize, w: &mut dyn Write| -> Result<(), WriteError> {
        out.clear();
        encode((&e.name, offset, check_finite), out_f, vals, cols, &mut out, error.as_mut())?;
        w.write_all(&out)?;
        Ok(())
    };
    match action {
        Action::Copy if e.shape.len() == 2 => {
            return map_rows(shard, e, out_f, check_finite, 1, w, |_, _, _, _| Ok(()));
        }
        Action::Copy => {
            // A dtype change of a float tensor that is not a matrix.
            shard.scan_f32(e, CHUNK_BYTES / 4, |start, vals| {
                put(vals, start, w)?;
                Ok::<_, WriteError>(None::<()>)
            })?;
        }
        Action::Replace(r) => put(&r.data, 0, w)?,
        Action::Bias(list) => {
            let base = shard.read_f32(e)?;
            let mut bias = base.clone();
            for u in list {
                match u {
                    BiasUpdate::Lora(m, f) => {
                        bias.iter_mut().zip(m.lora_bias.iter().flatten()).for_each(|(b, l)| *b += f * l);
                    }
                    BiasUpdate::Ia3(m) => bias.iter_mut().zip(&m.l).for_each(|(b, l)| *b *= l),
                    BiasUpdate::Road(m) => m.layer(0)?.update_bias(0, &mut bias, Direction::Merge)?,
                }
            }
            if check_finite {
                refuse_new_nonfinite(&e.name, 0, &bias, |i| base.get(i).copied())?;
            }
            put(&bias, 0, w)?;
        }
        Action::Weight(start, list) => {
            let mut scratch = Vec::new();
            // A DoRA update after another needs the unmerged base rows for its norm.
            let keep_base = list.iter().skip(1).any(Update::is_dora);
            let mut base = Vec::new();
            // MiSS bat updates whole blocks of r rows: blocks of a multiple of every such r.
            let align = list.iter().fold(1, |a, u| lcm(a, u.row_align()));
            return map_rows(shard, e, out_f, check_finite, align, w, |i0, n, cols, vals| {
                if let Some(r) = start {
                    let rows = r.data.get(i0 * cols..(i0 + n) * cols).ok_or(peft_core::Error::Overflow)?;
                    vals.copy_from_slice(rows);
                }
                if keep_base {
                    base.clear();
                    base.extend_from_slice(vals);
                }
                for (k, u) in list.iter().enumerate() {
                    let unmerged = (k > 0 && keep_base).then_some(&base[..]);
                    u.apply(backend, i0, MatMut::new(&mut *vals, n, cols)?, unmerged, &mut scratch)?;
                }
                Ok(())
            });
        }
    }
    Ok(error)
}

impl Update<'_> {
    /// Whether this is a DoRA update.
    fn is_dora(&self) -> bool {
        matches!(self, Update::Lora(m, _, false) if m.magnitude.is_some())
    }

    /// Applies the change to rows `i0..i0 + n` of the weight, held in
    /// `block [n, cols]`, through `peft-core`'s [`WeightUpdate`] or
    /// [`DeltaRows`] of the method (`scratch` grows as they need).
    /// `unmerged`: the base's rows before any adapter, when others were
    /// merged into `block` first (DoRA's norm is taken over them).
    /// The rows the update needs whole blocks of: MiSS bat's `r`, else 1.
    fn row_align(&self) -> usize {
        match self {
            Update::Miss(m, ..) if m.variant == peft_core::miss::MissVariant::Bat => m.r,
            Update::Road(m, _) => m.group,
            _ => 1,
        }
    }

    fn apply<B: Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        i0: usize,
        block: MatMut<'_, f32>,
        unmerged: Option<&[f32]>,
        scratch: &mut Vec<f32>,
    ) -> Result<(), HfError> {
        let be = HfError::backend;
        let (n, cols) = (block.rows(), block.cols());
        match *self {
            Update::Lora(m, s, true) => {
                // W [in, out]: rows i0.. += s A^T[i0.., :] B^T.
                let (a, b) = (MatRef::new(&m.a, m.r, m.n_in)?, MatRef::new(&m.b, m.n_out, m.r)?);
                let at = a.cols_range(i0, n).ok_or(peft_core::Error::Overflow)?;
                backend.gemm(block, Accum::Add, at, Op::T, b, Op::T, s).map_err(be)
            }
            Update::Lora(m, s, false) => match (&m.magnitude, unmerged) {
                // DoRA (the reader refused fan_in_fan_out) on the base alone:
                // V = W + s B A, then (m / ||V||) V, each row. A merge forms
                // its own norms: the cache is not read.
                (Some(mag), None) => {
                    let dora = m.dora(&mag[..])?.with_scale(f64::from(s))?;
                    dora.update_rows(backend, i0, block, None, Direction::Merge, grow(scratch, n)).map_err(be)
                }
                // After other adapters: (m / ||W0 + s B A||) (W + s B A).
                (Some(mag), Some(w0)) => dora_after_others(backend, m, mag, s, i0, block, w0, scratch),
                (None, _) => {
                    let lora = m.lora()?.with_scale(f64::from(s))?;
                    lora.update_rows(backend, i0, block, None, Direction::Merge, &mut []).map_err(be)
                }
            },
            Update::Ia3(m, transposed) => {
                // A Conv1D's `[in, out]` weight: the input kind scales its rows, the output kind its columns.
                let columns = m.feedforward != transposed;
                let n_out = if columns { i0 + n } else { m.l.len() };
                let layer = peft_core::ia3::Ia3::new(cols, n_out, columns, &m.l[..])?;
                layer.update_rows(backend, i0, block, None, Direction::Merge, &mut []).map_err(be)
            }
            Update::Loha(m, factor) => add_rows(backend, &m.layer()?, i0, block, factor, scratch),
            Update::Lokr(m, factor) => add_rows(backend, &m.layer()?, i0, block, factor, scratch),
            Update::Vera(m, p, factor) => {
                let (proj, vera) = (p.projection()?, m.layer(cols)?);
                let layer = vera.bound(&proj);
                let sc = grow(scratch, layer.delta_scratch_len(n));
                layer.delta_rows(backend, i0, block, Accum::Add, factor, sc).map_err(be)
            }
            Update::Miss(m, [n_out, n_in], factor) => {
                let layer = m.layer(n_in, n_out)?;
                if m.variant == peft_core::miss::MissVariant::Bat {
                    layer.bat_update_rows(backend, i0, block, grow(scratch, m.r * n_in)).map_err(be)
                } else {
                    layer.delta_rows(backend, i0, block, Accum::Add, factor, &mut []).map_err(be)
                }
            }
            Update::Shira(m, [n_out, n_in], factor) => {
                m.layer(n_in, n_out)?.delta_rows(backend, i0, block, Accum::Add, factor, &mut []).map_err(be)
            }
            Update::C3a(m, factor) => {
                m.layer()?.delta_rows(backend, i0, block, Accum::Add, factor, &mut []).map_err(be)
            }
            Update::VbLora(m, bank, [n_out, n_in], f) => {
                add_rows(backend, &m.layer(bank, n_in, n_out)?, i0, block, f, scratch)
            }
            Update::RandLora(m, p, [n_out, n_in], factor) => {
                let bases = p.bases()?;
                let layer = m.layer(&bases, n_in, n_out)?;
                let sc = grow(scratch, layer.delta_scratch_len(n));
                layer.delta_rows(backend, i0, block, Accum::Add, factor, sc).map_err(be)
            }
            Update::FourierFt(m, [n_out, n_in], f) => add_rows(backend, &m.layer(n_in, n_out)?, i0, block, f, scratch),
            Update::Road(m, n_in) => merge_rows(backend, &m.layer(n_in)?, i0, block, scratch),
            Update::Boft(m, [n_out, n_in]) => merge_rows(backend, &m.layer(n_in, n_out)?, i0, block, scratch),
            Update::Oft(m, [n_out, n_in]) if m.embedding => {
                let layer = m.layer(n_in, n_out)?;
                let sc = grow(scratch, layer.update_scratch_len(n));
                layer.embedding_rows(backend, block, Direction::Merge, sc).map_err(be)
            }
            Update::Oft(m, [n_out, n_in]) => merge_rows(backend, &m.layer(n_in, n_out)?, i0, block, scratch),
            Update::Hra(m, n_out) => merge_rows(backend, &m.layer(n_out)?, i0, block, scratch),
            Update::Tokens(m, vocab) => merge_rows(backend, &m.layer(vocab)?, i0, block, scratch),
            Update::AdaLora(m, factor) => add_rows(backend, &m.layer()?, i0, block, factor, scratch),
        }
    }
}

/// `v`'s first `len` elements, grown (zeros) to that length first.
fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// An additive method's `block += factor dW` over the rows `i0..`, its
/// scratch grown to what it needs.
fn add_rows<B: Backend<f32> + ?Sized, D: DeltaRows<f32>>(
    backend: &B,
    layer: &D,
    i0: usize,
    block: MatMut<'_, f32>,
    factor: f64,
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let sc = grow(scratch, layer.delta_scratch_len(block.rows()));
    layer.delta_rows(backend, i0, block, Accum::Add, factor, sc).map_err(HfError::backend)
}

/// A multiplicative method's merge of the rows `i0..` in `block`, its
/// scratch grown to what it needs.
fn merge_rows<B: Backend<f32> + ?Sized, U: WeightUpdate<f32>>(
    backend: &B,
    layer: &U,
    i0: usize,
    block: MatMut<'_, f32>,
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let sc = grow(scratch, layer.update_scratch_len(block.rows()));
    layer.update_rows(backend, i0, block, None, Direction::Merge, sc).map_err(HfError::backend)
}

/// A DoRA merge after other adapters, as PEFT 0.21.2 does it: row `j` of
/// `block` (the weight merged so far, rows `i0..`) becomes `(m_j / n_j) (W
/// + s B A)_j`, with `n_j = ||W0_j + s (B A)_j||` over the unmerged base
/// rows `w0` (summed in f64, as `peft-core`'s DoRA merge does).
#[allow(clippy::too_many_arguments)]
fn dora_after_others<B: Backend<f32> + ?Sized>(
    backend: &B,
    m: &LoraModule,
    mag: &[f32],
    s: f32,
    i0: usize,
    mut block: MatMut<'_, f32>,
    w0: &[f32],
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let (n, cols) = (block.rows(), block.cols());
    let lora = m.lora()?.with_scale(f64::from(s))?;
    scratch.clear();
    scratch.extend_from_slice(w0);
    lora.delta_rows(backend, i0, MatMut::new(&mut scratch[..], n, cols)?, Accum::Add, 1.0, &mut [])
        .map_err(HfError::backend)?;
    lora.delta_rows(backend, i0, block.rb_mut(), Accum::Add, 1.0, &mut []).map_err(HfError::backend)?;
    for (k, (row, v)) in block.row_iter_mut().zip(scratch.chunks_exact(cols.max(1))).enumerate() {
        let norm = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        let ratio = (f64::from(mag.get(i0 + k).copied().unwrap_or(0.0)) / norm) as f32;
        row.iter_mut().for_each(|x| *x *= ratio);
    }
    Ok(())
}

/// Writes the matrix `e` (`[rows, cols]`, any float or quantized format)
/// transformed row block by row block: each block of at most
/// [`CHUNK_BYTES`] of f32 is read, widened, handed to `f(first_row, rows,
/// cols, values)`, checked (when `check_finite`, an element that became
/// non-finite where the base's was finite is refused) and written in
/// `out`. Blocks start at multiples of `align` rows and hold a multiple of
/// it (the last block included, when `rows` is one). The one streaming loop of every merge that changes a weight;
/// returns the rounding error when `out` is quantized.
fn map_rows(
    shard: &st::StFile,
    e: &Entry,
    out: Format,
    check_finite: bool,
    align: usize,
    w: &mut impl Write,
    mut f: impl FnMut(usize, usize, usize, &mut [f32]) -> Result<(), WriteError>,
) -> Result<Option<QuantError>, WriteError> {
    let (Some(own), &[rows, cols]) = (e.format(), e.shape.as_slice()) else {
        return Err(HfError::Base(format!("{}: an adapted weight must be a float matrix", e.name)).into());
    };
    let rb = st::row_bytes(own, cols).unwrap_or(0);
    let align = align.max(1);
    let block = ((CHUNK_BYTES / 4 / cols.max(1)) / align).max(1) * align;
    let block = block.min(rows.max(1));
    let mut bytes = Vec::new();
    let mut vals = vec![0.0f32; block * cols];
    let mut error = out.is_quantized().then(|| QuantError::new(&e.name, out));
    let mut encoded = Vec::new();
    let mut i0 = 0;
    while i0 < rows {
        let n = block.min(rows - i0);
        let vals = &mut vals[..n * cols];
        shard.read_rows(e, i0, vals, &mut bytes)?;
        f(i0, n, cols, vals)?;
        if check_finite {
            // The base's value, its row decoded again (only at a non-finite
            // merged value).
            let base = |i: usize| {
                let mut row = vec![0.0f32; cols];
                let stored = bytes.get(i / cols.max(1) * rb..)?.get(..rb)?;
                st::decode_rows(own, stored, cols, &mut row).ok()?;
                row.get(i % cols.max(1)).copied()
            };
            refuse_new_nonfinite(&e.name, i0 * cols, vals, base)?;
        }
        encoded.clear();
        encode((&e.name, i0 * cols, check_finite), out, vals, cols, &mut encoded, error.as_mut())?;
        w.write_all(&encoded)?;
        i0 += n;
    }
    Ok(error)
}

/// Encodes `vals` (whole rows of `cols`; element 0 is element `offset` of
/// tensor `name`) in format `f` onto `out`, and when `error` is given,
/// takes the round trip's error into it. With `check`, a finite value that
/// the format cannot hold (above 65504 in f16, above bf16's largest value)
/// is refused rather than written as an infinity.
fn encode(
    (name, offset, check): (&str, usize, bool),
    f: Format,
    vals: &[f32],
    cols: usize,
    out: &mut Vec<u8>,
    error: Option<&mut QuantError>,
) -> Result<(), HfError> {
    let start = out.len();
    st::encode_rows(f, vals, cols, out).map_err(|e| match e {
        HfError::Core(peft_core::Error::NonFinite { index, .. }) => HfError::NonFinite {
            tensor: name.to_string(),
            index: offset + index,
            value: vals.get(index).copied().unwrap_or(f32::NAN),
            cause: "a quantized format cannot store a non-finite value",
        },
        HfError::Core(peft_core::Error::OutOfRange { operand, index }) => HfError::InModule {
            module: name.to_string(),
            error: peft_core::Error::OutOfRange { operand, index: offset + index },
        },
        other => other,
    })?;
    if check {
        refuse_overflow(name, f, vals, &out[start..], offset)?;
    }
    if let Some(error) = error {
        let mut back = vec![0.0f32; vals.len()];
        st::decode_rows(f, &out[start..], cols, &mut back)?;
        error.update(vals, &back);
    }
    Ok(())
}

/// Refuses the first finite value of `vals` that `encoded` (their f16 or
/// bf16 encoding; other formats are not checked here) holds as an
/// infinity: the value is beyond the format's range.
fn refuse_overflow(name: &str, f: Format, vals: &[f32], encoded: &[u8], offset: usize) -> Result<(), HfError> {
    let (inf, cause) = match f {
        Format::F16 => (0x7c00u16, "beyond f16's largest finite value, 65504; --allow-nonfinite writes an infinity"),
        Format::Bf16 => (0x7f80u16, "beyond bf16's largest finite value; --allow-nonfinite writes an infinity"),
        _ => return Ok(()),
    };
    let overflow = encoded.chunks_exact(2).zip(vals).position(|(c, v)| {
        let bits = u16::from_le_bytes([c[0], c[1]]) & 0x7fff;
        bits == inf && v.is_finite()
    });
    match overflow {
        Some(i) => {
            let value = vals.get(i).copied().unwrap_or(f32::INFINITY);
            Err(HfError::NonFinite { tensor: name.to_string(), index: offset + i, value, cause })
        }
        None => Ok(()),
    }
}

/// Refuses the first element of `merged` (which starts at element `offset`
/// of tensor `name`) that is NaN or infinite while its base value (from
/// `base`) was finite.
fn refuse_new_nonfinite(
    name: &str,
    offset: usize,
    merged: &[f32],
    base: impl Fn(usize) -> Option<f32>,
) -> Result<(), HfError> {
    let mut rest = merged;
    let mut at = 0;
    while let Some((i, value)) = first_nonfinite(rest) {
        if base(at + i).is_some_and(f32::is_finite) {
            let cause = "W + s B A overflows or is undefined there; --allow-nonfinite writes it anyway";
            return Err(HfError::NonFinite { tensor: name.to_string(), index: offset + at + i, value, cause });
        }
        at += i + 1;
        rest = rest.get(i + 1..).unwrap_or(&[]);
    }
    Ok(())
}
