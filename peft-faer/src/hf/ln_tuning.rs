//! LN tuning in PEFT's files: the module as read, and its reader.
//!
//! PEFT deep-copies each targeted module into `ln_tuning_layers` and saves
//! the copy's whole state: `<module>.ln_tuning_layers.<param>` for each of
//! its parameters (`weight` and `bias` of a LayerNorm; any module can be a
//! target, PEFT's own tests take a `Linear`). Each replaces the base's
//! `<module>.<param>` on merge, nothing added; the norm's `eps` is the base
//! model's, not saved.

use peft_core::ln_tuning::{LnTuning, Norm};

use super::keys::{Reader, normalize_key, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, HfTensor, LnTuningConfig};

/// The tensor key's infix for an LN tuning module's copy.
const COPY: &str = ".ln_tuning_layers.";

/// One module tuned whole: its saved parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LnTuningModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// The copy's parameters, each named as the base tensor it replaces
    /// (`<module>.weight`, `<module>.bias`), widened to f32 (the stored
    /// element type kept).
    pub params: Vec<HfTensor>,
}

impl LnTuningModule {
    /// The saved parameter `param` (`"weight"`, `"bias"`).
    pub fn param(&self, param: &str) -> Option<&HfTensor> {
        self.params.iter().find(|t| t.name.strip_prefix(&self.name).and_then(|r| r.strip_prefix('.')) == Some(param))
    }

    /// `peft-core`'s LN tuning of this module as a `norm` of the base's
    /// `eps`: a `weight [d]` and, for a LayerNorm, an optional `bias [d]`.
    ///
    /// # Errors
    /// [`HfError::MissingTensor`] without a weight; [`HfError::Unsupported`]
    /// for a module whose parameters are not a norm's (other names, or not
    /// vectors); `peft-core`'s validation (a bias on an RMSNorm, lengths).
    pub fn layer(&self, norm: Norm, eps: f64) -> Result<LnTuning<f32, &[f32]>, HfError> {
        let w = self.param("weight").ok_or_else(|| HfError::MissingTensor {
            module: self.name.clone(),
            tensor: "ln_tuning_layers.weight".into(),
        })?;
        let not_norm =
            || HfError::Unsupported(format!("{}: LN tuning of a module that is not a norm layer", self.name));
        let &[d] = w.shape.as_slice() else { return Err(not_norm()) };
        if self.params.iter().any(|t| t.shape.len() != 1 || !(t.name.ends_with(".weight") || t.name.ends_with(".bias")))
        {
            return Err(not_norm());
        }
        let bias = self.param("bias").map(|b| &b.data[..]);
        Ok(LnTuning::new(norm, d, eps, &w.data[..], bias)?)
    }
}

impl HfAdapter {
    /// LN tuning: per module, `ln_tuning_layers.<param>` for each saved
    /// parameter of the module's copy; any other key must be a
    /// `modules_to_save` tensor.
    pub(super) fn read_ln_tuning(
        &mut self,
        c: &LnTuningConfig,
        file: &StFile,
        read: Reader<'_>,
    ) -> Result<(), HfError> {
        for e in &file.entries {
            let key = normalize_key(&e.name);
            let Some((module, param)) = key.split_once(COPY) else {
                if !saved(&c.modules_to_save, &key) {
                    return Err(HfError::UnexpectedKey { key: e.name.clone(), method: "LN tuning" });
                }
                let data = read(file, e)?;
                self.replacements.push(HfTensor { name: key, dtype: e.dtype, shape: e.shape.clone(), data });
                continue;
            };
            if param.is_empty() {
                return Err(HfError::UnexpectedKey { key: e.name.clone(), method: "LN tuning" });
            }
            if !c.target_modules.matches(module) {
                return Err(HfError::Untargeted { module: module.into(), method: "LN tuning" });
            }
            let name = format!("{module}.{param}");
            let at = match self.ln_tuning.iter().position(|m| m.name == module) {
                Some(at) => at,
                None => {
                    self.ln_tuning.push(LnTuningModule { name: module.into(), params: Vec::new() });
                    self.ln_tuning.len() - 1
                }
            };
            let m = &mut self.ln_tuning[at];
            if m.params.iter().any(|t| t.name == name) {
                return Err(HfError::DuplicateTensor {
                    module: module.into(),
                    tensor: format!("ln_tuning_layers.{param}"),
                });
            }
            let data = read(file, e)?;
            m.params.push(HfTensor { name, dtype: e.dtype, shape: e.shape.clone(), data });
        }
        if self.ln_tuning.is_empty() {
            return Err(HfError::NoTensors { keys: "ln_tuning_layers.*" });
        }
        Ok(())
    }
}
