//! MiSS in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves one tensor per module, `miss_block`: `[r, out]` (balance),
//! `[r, mini_r]` (mini) or `[out / r, r, r]` (bat). Its input width is the
//! base weight's (the file does not hold it), so a module's layer is built
//! over the base's shape ([`MissModule::layer`]).

use peft_core::miss::{Miss, MissVariant};
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, MissConfig};

/// One MiSS-adapted module: `miss_block`.
#[derive(Clone, Debug, PartialEq)]
pub struct MissModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `miss_block`, widened to f32.
    pub d: Vec<f32>,
    /// Its shape as stored.
    pub shape: Vec<usize>,
    /// The variant (from the config's `init_weights`).
    pub variant: MissVariant,
    /// The shard size `r`.
    pub r: usize,
    /// Its element type.
    pub dtype: Dtype,
}

impl MissModule {
    /// `peft-core`'s MiSS of this module over a base weight `[n_out,
    /// n_in]`.
    ///
    /// # Errors
    /// `peft-core`'s validation (a block that does not fit the shape).
    pub fn layer(&self, n_in: usize, n_out: usize) -> Result<Miss<f32, &[f32]>, HfError> {
        Ok(Miss::new(self.variant, self.r, n_in, n_out, &self.d[..])?)
    }
}

impl HfAdapter {
    /// MiSS: per module `miss_block`, its shape checked against the
    /// variant's (`[r, out]`, `[r, mini_r]`, `[out / r, r, r]`).
    pub(super) fn read_miss(&mut self, c: &MissConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".miss_block", 0)];
        let groups: Groups<'_, 1> =
            group(file, file.entries.iter(), &suffixes, "MiSS", &replaces, &mut self.replacements, read)?;
        let r = c.r;
        for (name, [slot]) in groups {
            let e = slot.ok_or_else(|| HfError::MissingTensor { module: name.clone(), tensor: "miss_block".into() })?;
            let fits = match (c.variant, e.shape.as_slice()) {
                (MissVariant::Balance, &[rr, out]) => rr == r && out > 0,
                (MissVariant::Mini { mini_r }, &[rr, m]) => rr == r && m == mini_r,
                (MissVariant::Bat, &[blocks, r1, r2]) => blocks > 0 && r1 == r && r2 == r,
                _ => false,
            };
            if !fits {
                let want = match c.variant {
                    MissVariant::Balance => format!("[{r}, out] (r = {r})"),
                    MissVariant::Mini { mini_r } => format!("[{r}, {mini_r}] (r, mini_r)"),
                    MissVariant::Bat => format!("[out / {r}, {r}, {r}] (bat, r = {r})"),
                };
                return Err(HfError::shape(&e.name, &e.shape, want));
            }
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "MiSS" });
            }
            self.miss.push(MissModule {
                d: read(file, e)?,
                shape: e.shape.clone(),
                variant: c.variant,
                r,
                dtype: e.dtype,
                name,
            });
        }
        if self.miss.is_empty() {
            return Err(HfError::NoTensors { keys: "miss_block" });
        }
        Ok(())
    }
}
