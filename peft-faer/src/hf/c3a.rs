//! C3A in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves `c3a_kernel` `[out/b, in/b, b]` per module (always f32), so
//! the file gives the layer's whole shape; `b` must be the block size the
//! config gives the module (`block_size_pattern`, else `block_size`).

use peft_core::c3a::C3a;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{C3aConfig, HfAdapter, HfError};

/// One C3A-adapted module: `c3a_kernel` `[out/b, in/b, b]`.
#[derive(Clone, Debug, PartialEq)]
pub struct C3aModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `c3a_kernel`, widened to f32.
    pub kernel: Vec<f32>,
    /// The block size `b`.
    pub block: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Its element type.
    pub dtype: Dtype,
}

impl C3aModule {
    /// `peft-core`'s C3A over this module's kernel.
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn layer(&self) -> Result<C3a<f32, &[f32]>, HfError> {
        Ok(C3a::new(self.block, self.n_in, self.n_out, &self.kernel[..])?)
    }
}

impl HfAdapter {
    /// C3A: per module `c3a_kernel [out/b, in/b, b]`, `b` the config's for
    /// the module.
    pub(super) fn read_c3a(&mut self, c: &C3aConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".c3a_kernel", 0)];
        let groups: Groups<'_, 1> =
            group(file, file.entries.iter(), &suffixes, "C3A", &replaces, &mut self.replacements, read)?;
        for (name, [slot]) in groups {
            let e = slot.ok_or_else(|| HfError::MissingTensor { module: name.clone(), tensor: "c3a_kernel".into() })?;
            let want = c.block_size_for(&name);
            let (ob, ib) = match e.shape.as_slice() {
                &[ob, ib, b] if b == want && ob > 0 && ib > 0 => (ob, ib),
                s => {
                    return Err(HfError::shape(
                        &e.name,
                        s,
                        format!("[out/{want}, in/{want}, {want}] (block size {want})"),
                    ));
                }
            };
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "C3A" });
            }
            let (n_in, n_out) = (ib * want, ob * want);
            let kernel = read(file, e)?;
            self.c3a.push(C3aModule { kernel, block: want, n_in, n_out, dtype: e.dtype, name });
        }
        if self.c3a.is_empty() {
            return Err(HfError::NoTensors { keys: "c3a_kernel" });
        }
        Ok(())
    }
}
