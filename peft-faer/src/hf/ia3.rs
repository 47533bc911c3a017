//! (IA)^3 in PEFT's files: the module as read, and its reader.

use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, Ia3Config};

/// One (IA)^3-adapted module: its vector `ia3_l`, `[out, 1]` (the output
/// is scaled) or `[1, in]` (feedforward: the input is).
#[derive(Clone, Debug, PartialEq)]
pub struct Ia3Module {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// The vector's values, widened to f32.
    pub l: Vec<f32>,
    /// Whether it scales the input (PEFT's `feedforward_modules`).
    pub feedforward: bool,
    /// The element type it is stored in.
    pub dtype: Dtype,
}

impl Ia3Module {
    /// The shape PEFT stores: `[1, in]` or `[out, 1]`.
    pub fn shape(&self) -> [usize; 2] {
        if self.feedforward { [1, self.l.len()] } else { [self.l.len(), 1] }
    }
}

impl HfAdapter {
    pub(super) fn read_ia3(&mut self, ic: &Ia3Config, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&ic.modules_to_save, key);
        let groups: Groups<'_, 1> =
            group(file, file.entries.iter(), &[(".ia3_l", 0)], "(IA)^3", &replaces, &mut self.replacements, read)?;
        for (module, [e]) in groups {
            let Some(e) = e else { continue };
            if !ic.target_modules.matches(&module) {
                return Err(HfError::Untargeted { module, method: "(IA)^3" });
            }
            let feedforward = ic.is_feedforward(&module);
            let ok = match (feedforward, e.shape.as_slice()) {
                (true, &[1, n]) | (false, &[n, 1]) => n > 0,
                _ => false,
            };
            if !ok {
                let want = if feedforward { "[1, in] (feedforward)" } else { "[out, 1]" };
                return Err(HfError::shape(&e.name, &e.shape, want));
            }
            self.ia3.push(Ia3Module { name: module, l: read(file, e)?, feedforward, dtype: e.dtype });
        }
        if self.ia3.is_empty() {
            return Err(HfError::NoTensors { keys: "ia3_l" });
        }
        Ok(())
    }
}
