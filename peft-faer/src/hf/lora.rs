//! LoRA (with DoRA, `lora_bias` and LoRA on embeddings) in PEFT's files:
//! the module as read, and its reader.

use peft_core::dora::Dora;
use peft_core::lora::module_matches;
use peft_core::lora::{Lora, LoraConfig};
use safetensors::Dtype;

use super::keys::normalize_key;
use super::keys::{Groups, Reader, group, saved};
use super::st::{Entry, StFile};
use super::{BiasMode, HfAdapter, HfError, HfLoraConfig, HfTensor};

/// One LoRA-adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// Module name without `base_model.model.` (`layers.0.q_proj`); its
    /// base weight is `<name>.weight`.
    pub name: String,
    /// `A [r, in]`, widened to f32 (exactly).
    pub a: Vec<f32>,
    /// `B [out, r]`.
    pub b: Vec<f32>,
    /// `lora_B.bias [out]` when `lora_bias`.
    pub lora_bias: Option<Vec<f32>>,
    /// Rank.
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Alpha (from `alpha_pattern` or `lora_alpha`).
    pub alpha: f64,
    /// The scale applied to `B A`.
    pub scale: f64,
    /// DoRA's `lora_magnitude_vector [out]` (`use_dora`).
    pub magnitude: Option<Vec<f32>>,
    /// LoRA on an `nn.Embedding` (`lora_embedding_A [r, vocab]`,
    /// `lora_embedding_B [dim, r]`): `in` is the vocabulary, `out` the
    /// embedding width, the weight is `[vocab, dim]` and its update
    /// `s (B A)^T`.
    pub embedding: bool,
    /// The element types `A`, `B`, the `lora_B` bias and the magnitude are
    /// stored in (an absent tensor's slot repeats `B`'s): each tensor is
    /// written back in its own type.
    pub dtypes: [Dtype; 4],
}

impl LoraModule {
    /// `peft-core`'s LoRA over this module's tensors, with its resolved
    /// scale and its `lora_bias`: what the host runs and the merge adds.
    ///
    /// # Errors
    /// `peft-core`'s validation (a rank above `min(in, out)`, factors of
    /// the wrong length).
    pub fn lora(&self) -> Result<Lora<f32, &[f32]>, HfError> {
        let layer = Lora::new(&LoraConfig::new(self.r, self.alpha), self.n_in, self.n_out, &self.a[..], &self.b[..])?
            .with_scale(self.scale)?;
        Ok(match &self.lora_bias {
            Some(lb) => layer.with_lora_bias(&lb[..])?,
            None => layer,
        })
    }

    /// `peft-core`'s DoRA over this module's tensors (its magnitude, or an
    /// empty one, which `Dora::new` refuses), with its resolved scale and
    /// the norm cache `norms [out]` (stale until refreshed).
    ///
    /// # Errors
    /// As [`LoraModule::lora`]; a magnitude or cache of the wrong length.
    pub fn dora<C: AsRef<[f32]>>(&self, norms: C) -> Result<Dora<f32, &[f32], C>, HfError> {
        let mag = self.magnitude.as_deref().unwrap_or(&[]);
        let cfg = LoraConfig::new(self.r, self.alpha);
        Ok(Dora::new(&cfg, self.n_in, self.n_out, &self.a[..], &self.b[..], mag, norms)?.with_scale(self.scale)?)
    }
}

impl HfAdapter {
    pub(super) fn read_lora(&mut self, lc: &HfLoraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        // PEFT saves the magnitude without `.weight`; accept both.
        let suffixes = [
            (".lora_A.weight", 0),
            (".lora_B.weight", 1),
            (".lora_B.bias", 2),
            (".lora_magnitude_vector", 3),
            (".lora_magnitude_vector.weight", 3),
            (".lora_embedding_A", 4),
            (".lora_embedding_B", 5),
        ];
        let replaces = |key: &str| replaces(lc, key);
        let entries = self.read_lora_tokens(lc.trainable_token_indices.as_ref(), file, read)?;
        let (state, own): (Vec<&Entry>, Vec<&Entry>) =
            entries.into_iter().partition(|e| training_state(lc, &normalize_key(&e.name)).is_some());
        let groups: Groups<'_, 6> =
            group(file, own.into_iter(), &suffixes, "LoRA", &replaces, &mut self.replacements, read)?;
        for e in state {
            let name = normalize_key(&e.name);
            let module = training_state(lc, &name).unwrap_or_default();
            if !groups.iter().any(|(m, _)| m == module) {
                return Err(HfError::MissingTensor { module: module.into(), tensor: "lora_A.weight".into() });
            }
            self.training_state.push(HfTensor { data: read(file, e)?, dtype: e.dtype, shape: e.shape.clone(), name });
        }
        for (_, slots) in &groups {
            if let (Some(e), false) = (slots[2], lc.lora_bias) {
                return Err(HfError::FieldTensor { field: "lora_bias", tensor: e.name.clone(), present: true });
            }
            if let (Some(e), false) = (slots[3], lc.use_dora) {
                return Err(HfError::FieldTensor { field: "use_dora", tensor: e.name.clone(), present: true });
            }
        }
        if lc.use_dora && (lc.fan_in_fan_out || lc.lora_bias) {
            let field = if lc.fan_in_fan_out { "fan_in_fan_out" } else { "lora_bias" };
            return Err(HfError::Unsupported(format!("`use_dora` with `{field}`")));
        }
        for (name, [a, b, bias, magnitude, ea, eb]) in groups {
            // LoRA on an nn.Embedding: `lora_embedding_A [r, vocab]`,
            // `lora_embedding_B [dim, r]`, the same layout as A and B with
            // in = vocab and out = dim (its weight is `[vocab, dim]`).
            let embedding = ea.is_some() || eb.is_some();
            if embedding && (a.is_some() || b.is_some()) {
                return Err(HfError::conflict(name, "has both lora_A/lora_B and lora_embedding_A/_B"));
            }
            if embedding && (lc.use_dora || bias.is_some()) {
                let field = if lc.use_dora { "use_dora" } else { "lora_bias" };
                return Err(HfError::Unsupported(format!(
                    "{name}: `{field}` on an embedding (DoRA and lora_bias are implemented for linear layers only)"
                )));
            }
            let (a, b) = if embedding { (ea, eb) } else { (a, b) };
            let (Some(a), Some(b)) = (a, b) else {
                let missing = match (embedding, a.is_none()) {
                    (false, true) => "lora_A.weight",
                    (false, false) => "lora_B.weight",
                    (true, true) => "lora_embedding_A",
                    (true, false) => "lora_embedding_B",
                };
                return Err(HfError::MissingTensor { module: name, tensor: missing.into() });
            };
            let (&[r, n_in], &[n_out, r2]) = (a.shape.as_slice(), b.shape.as_slice()) else {
                let bad = if a.shape.len() == 2 { b } else { a };
                return Err(HfError::shape(bad.name.clone(), &bad.shape, "a matrix"));
            };
            if r != r2 {
                return Err(HfError::shape(b.name.clone(), &b.shape, format!("[{n_out}, {r}]: lora_A has rank {r}")));
            }
            let want = lc.rank_for(&name);
            if want != r {
                return Err(HfError::RankMismatch { module: name, config: want, tensors: r });
            }
            if !lc.adapts(&name) {
                return Err(HfError::Untargeted { module: name, method: "LoRA" });
            }
            check_vector(("lora_bias", lc.lora_bias), &name, "lora_B.bias", bias, n_out)?;
            check_vector(("use_dora", lc.use_dora), &name, "lora_magnitude_vector", magnitude, n_out)?;
            let lora_bias = bias.map(|e| read(file, e)).transpose()?;
            let magnitude_values = magnitude.map(|e| read(file, e)).transpose()?;
            self.modules.push(LoraModule {
                alpha: lc.alpha_for(&name),
                scale: lc.scale_for(&name)?,
                a: read(file, a)?,
                b: read(file, b)?,
                dtypes: [a.dtype, b.dtype, bias.map_or(b.dtype, |e| e.dtype), magnitude.map_or(b.dtype, |e| e.dtype)],
                lora_bias,
                magnitude: magnitude_values,
                embedding,
                r,
                n_in,
                n_out,
                name,
            });
        }
        if self.modules.is_empty() {
            return Err(HfError::NoTensors { keys: "lora_A / lora_B" });
        }
        Ok(())
    }
}

/// Whether the LoRA adapter of `lc` may replace the whole tensor `key`
/// (normalized): a `modules_to_save` copy, a trained bias, or an
/// embedding layer's weight PEFT saves beside a LoRA on it
/// (`save_embedding_layers`, keyed `<module>.base_layer.weight`).
fn replaces(lc: &HfLoraConfig, key: &str) -> bool {
    let embedding_layer = key
        .strip_suffix(".weight")
        .is_some_and(|owner| ["embed_tokens", "lm_head"].iter().any(|n| module_matches(owner, n)) && lc.adapts(owner));
    saved(&lc.modules_to_save, key) || (key.ends_with(".bias") && lc.bias != BiasMode::None) || embedding_layer
}

/// `Ok` when the per-row vector `module.tensor` (PEFT's `lora_B.bias` or
/// `lora_magnitude_vector`) is present exactly when its config `field` is
/// true, with shape `[out]`.
///
/// # Errors
/// [`HfError::FieldTensor`] for a vector missing while its field is true;
/// [`HfError::TensorShape`] for another shape.
fn check_vector(
    (field, on): (&'static str, bool),
    module: &str,
    tensor: &str,
    entry: Option<&Entry>,
    out: usize,
) -> Result<(), HfError> {
    match entry {
        None if on => Err(HfError::FieldTensor { field, tensor: format!("{module}.{tensor}"), present: false }),
        Some(e) if e.shape != [out] => Err(HfError::shape(e.name.clone(), &e.shape, format!("[{out}]"))),
        _ => Ok(()),
    }
}

/// The module whose training-only tensor `key` is (VeLoRA's
/// `<module>.lora_velora_embed`, MonteCLoRA's
/// `<module>.lora_monteclora_sampler.<buffer>`), when the config enables
/// that variant; `None` otherwise (the key is then one of LoRA's own, or
/// unexpected).
pub(super) fn training_state<'k>(lc: &HfLoraConfig, key: &'k str) -> Option<&'k str> {
    let velora = key.strip_suffix(".lora_velora_embed").filter(|_| lc.velora);
    velora.or_else(|| key.split_once(".lora_monteclora_sampler.").map(|(m, _)| m).filter(|_| lc.monteclora))
}
