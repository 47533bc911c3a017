//! HRA in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves one tensor per module, `hra_u` `[in, r]`; the output width is
//! the base weight's (the file does not hold it).

use peft_core::hra::Hra;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, HraConfig};

/// One HRA-adapted module: `hra_u` `[in, r]`.
#[derive(Clone, Debug, PartialEq)]
pub struct HraModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `hra_u`, widened to f32.
    pub u: Vec<f32>,
    /// The number of reflections `r`.
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// PEFT's `apply_GS`.
    pub gram_schmidt: bool,
    /// Its element type.
    pub dtype: Dtype,
}

impl HraModule {
    /// `peft-core`'s HRA of this module over a base weight of `n_out` rows.
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn layer(&self, n_out: usize) -> Result<Hra<f32, &[f32]>, HfError> {
        Ok(Hra::new(self.r, self.n_in, n_out, self.gram_schmidt, &self.u[..])?)
    }
}

impl HfAdapter {
    /// HRA: per module `hra_u [in, r]` with `r` from the config.
    pub(super) fn read_hra(&mut self, c: &HraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".hra_u", 0)];
        let groups: Groups<'_, 1> =
            group(file, file.entries.iter(), &suffixes, "HRA", &replaces, &mut self.replacements, read)?;
        for (name, [slot]) in groups {
            let e = slot.ok_or_else(|| HfError::MissingTensor { module: name.clone(), tensor: "hra_u".into() })?;
            let n_in = match e.shape.as_slice() {
                &[n_in, r] if r == c.r && n_in > 0 => n_in,
                &[_, r] => return Err(HfError::RankMismatch { module: name, config: c.r, tensors: r }),
                s => return Err(HfError::shape(&e.name, s, format!("[in, {}] (r = {})", c.r, c.r))),
            };
            if c.apply_gs && c.r > n_in {
                return Err(HfError::shape(&e.name, &e.shape, format!("r <= in ({n_in}) with apply_GS")));
            }
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "HRA" });
            }
            let u = read(file, e)?;
            self.hra.push(HraModule { u, r: c.r, n_in, gram_schmidt: c.apply_gs, dtype: e.dtype, name });
        }
        if self.hra.is_empty() {
            return Err(HfError::NoTensors { keys: "hra_u" });
        }
        Ok(())
    }
}
