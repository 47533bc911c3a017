//! BOFT in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves `boft_R` `[F, N, b, b]` (full matrices) and `boft_s` `[out,
//! 1]` per module. The factor count `F` is the tensor's, not the config's:
//! PEFT without its CUDA extension (any CPU run) silently keeps one factor
//! while `adapter_config.json` still says `boft_n_butterfly_factor`. The
//! block size or count the config gives must be the tensor's.

use peft_core::boft::Boft;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{BoftConfig, HfAdapter, HfError};

/// One BOFT-adapted module: `boft_R` and `boft_s`.
#[derive(Clone, Debug, PartialEq)]
pub struct BoftModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `boft_R`, widened to f32.
    pub r: Vec<f32>,
    /// `boft_s`, widened to f32.
    pub s: Vec<f32>,
    /// `boft_R`'s shape `[F, N, b, b]`.
    pub shape: [usize; 4],
    /// The element types of `boft_R` and `boft_s`.
    pub dtypes: [Dtype; 2],
}

impl BoftModule {
    /// `peft-core`'s BOFT of this module over a base weight `[n_out,
    /// n_in]`.
    ///
    /// # Errors
    /// [`HfError::TensorShape`] when `N b` is not `n_in` or `boft_s` not
    /// `n_out` long; `peft-core`'s validation.
    pub fn layer(&self, n_in: usize, n_out: usize) -> Result<Boft<f32, &[f32]>, HfError> {
        let [f, n, b, _] = self.shape;
        if n.checked_mul(b) != Some(n_in) {
            let want = format!("N b = {n_in} (the weight's input)");
            return Err(HfError::shape(format!("{}.boft_R", self.name), &self.shape, want));
        }
        if self.s.len() != n_out {
            let want = format!("[{n_out}, 1] (the weight's output)");
            return Err(HfError::shape(format!("{}.boft_s", self.name), &[self.s.len(), 1], want));
        }
        Ok(Boft::new(f, b, n_in, n_out, &self.r[..], &self.s[..])?)
    }
}

impl HfAdapter {
    /// BOFT: per module `boft_R [F, N, b, b]` and `boft_s [out, 1]`.
    pub(super) fn read_boft(&mut self, c: &BoftConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".boft_R", 0), (".boft_s", 1)];
        let groups: Groups<'_, 2> =
            group(file, file.entries.iter(), &suffixes, "BOFT", &replaces, &mut self.replacements, read)?;
        for (name, slots) in groups {
            let [Some(r), Some(s)] = slots else {
                let tensor = if slots[0].is_none() { "boft_R" } else { "boft_s" };
                return Err(HfError::MissingTensor { module: name, tensor: tensor.into() });
            };
            let shape = match r.shape.as_slice() {
                &[f, n, b, b2] if f > 0 && n > 0 && b > 0 && b == b2 => [f, n, b, b],
                sh => return Err(HfError::shape(&r.name, sh, "[F, N, b, b]")),
            };
            let fits = match (c.boft_block_size, c.boft_block_num) {
                (b, 0) => shape[2] == b,
                (_, n) => shape[1] == n,
            };
            if !fits {
                let want = match (c.boft_block_size, c.boft_block_num) {
                    (b, 0) => format!("[F, N, {b}, {b}] (boft_block_size = {b})"),
                    (_, n) => format!("[F, {n}, b, b] (boft_block_num = {n})"),
                };
                return Err(HfError::shape(&r.name, &r.shape, want));
            }
            if !matches!(s.shape.as_slice(), &[_, 1]) {
                return Err(HfError::shape(&s.name, &s.shape, "[out, 1]"));
            }
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "BOFT" });
            }
            let (rv, sv) = (read(file, r)?, read(file, s)?);
            self.boft.push(BoftModule { r: rv, s: sv, shape, dtypes: [r.dtype, s.dtype], name });
        }
        if self.boft.is_empty() {
            return Err(HfError::NoTensors { keys: "boft_R, boft_s" });
        }
        Ok(())
    }
}
