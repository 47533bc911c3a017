//! AdaLoRA in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves `lora_A [k, in]`, `lora_E [k, 1]` and `lora_B [out, k]` per
//! module (no `.weight` suffix) and not `ranknum`, which is `init_r` for
//! every module. After its budget allocation, `rank_pattern` lists per
//! module (`<module>.lora_E`) which of the `init_r` triplets were kept, and
//! only those are saved, so `k` is the count of `true` entries (see
//! `peft_core::adalora`).

use peft_core::adalora::AdaLora;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved, suffixes};
use super::st::StFile;
use super::{AdaLoraConfig, HfAdapter, HfError};

/// AdaLoRA's tensor names, in [`AdaLoraModule`]'s order.
pub const ADALORA_KEYS: [&str; 3] = ["lora_A", "lora_E", "lora_B"];

/// One AdaLoRA-adapted module: `lora_A [k, in]`, `lora_E [k, 1]`, `lora_B
/// [out, k]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `A`, widened to f32.
    pub a: Vec<f32>,
    /// `E` (PEFT's `[k, 1]`, held as `[k]`).
    pub e: Vec<f32>,
    /// `B`.
    pub b: Vec<f32>,
    /// The kept rank `k` (`init_r`, or the triplets `rank_pattern` kept).
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// The factor `s = scaling / (init_r + 1e-5)` (`peft_core::adalora::scale`).
    pub scale: f64,
    /// `A`'s, `E`'s and `B`'s element types.
    pub dtypes: [Dtype; 3],
}

impl AdaLoraModule {
    /// `peft-core`'s AdaLoRA over this module's tensors.
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn layer(&self) -> Result<AdaLora<f32, &[f32]>, HfError> {
        Ok(AdaLora::new(self.r, self.n_in, self.n_out, self.scale, &self.a[..], &self.e[..], &self.b[..])?)
    }

    /// The tensors as PEFT stores them: key, shape, values.
    pub fn stored(&self) -> [(&'static str, Vec<usize>, &[f32]); 3] {
        [
            ("lora_A", vec![self.r, self.n_in], &self.a),
            ("lora_E", vec![self.r, 1], &self.e),
            ("lora_B", vec![self.n_out, self.r], &self.b),
        ]
    }
}

impl HfAdapter {
    /// AdaLoRA: per module `lora_A [k, in]`, `lora_E [k, 1]`, `lora_B
    /// [out, k]` with `k` the rank the config gives the module
    /// ([`AdaLoraConfig::rank_for`]).
    pub(super) fn read_adalora(&mut self, c: &AdaLoraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let owned = suffixes(&ADALORA_KEYS);
        let suffixes: Vec<(&str, usize)> = owned.iter().map(|(s, i)| (s.as_str(), *i)).collect();
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let groups: Groups<'_, 3> =
            group(file, file.entries.iter(), &suffixes, "AdaLoRA", &replaces, &mut self.replacements, read)?;
        let scale = c.scale()?;
        for (name, slots) in groups {
            let mut es = Vec::with_capacity(3);
            for (e, key) in slots.iter().zip(ADALORA_KEYS) {
                es.push(e.ok_or_else(|| HfError::MissingTensor { module: name.clone(), tensor: key.into() })?);
            }
            let (&[k, n_in], &[n_out, k2]) = (es[0].shape.as_slice(), es[2].shape.as_slice()) else {
                let bad = if es[0].shape.len() == 2 { es[2] } else { es[0] };
                return Err(HfError::shape(&bad.name, &bad.shape, "a matrix"));
            };
            if k2 != k || es[1].shape != [k, 1] {
                let (bad, want) = if k2 != k { (es[2], [n_out, k]) } else { (es[1], [k, 1]) };
                return Err(HfError::shape(&bad.name, &bad.shape, format!("{want:?} (lora_A is [{k}, {n_in}])")));
            }
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "AdaLoRA" });
            }
            let want = c.rank_for(&name);
            if want != k {
                return Err(HfError::RankMismatch { module: name, config: want, tensors: k });
            }
            self.adalora.push(AdaLoraModule {
                a: read(file, es[0])?,
                e: read(file, es[1])?,
                b: read(file, es[2])?,
                dtypes: [es[0].dtype, es[1].dtype, es[2].dtype],
                r: k,
                n_in,
                n_out,
                scale,
                name,
            });
        }
        if self.adalora.is_empty() {
            return Err(HfError::NoTensors { keys: "lora_A / lora_E / lora_B" });
        }
        if let Some((key, _)) = c.rank_pattern.iter().find(|(k, _)| {
            let module = k.strip_suffix(".lora_E").unwrap_or(k);
            !self.adalora.iter().any(|m| m.name == module)
        }) {
            return Err(HfError::config("rank_pattern", &format!("{key:?} names no module of the adapter")));
        }
        Ok(())
    }
}
