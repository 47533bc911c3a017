//! SHiRA in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves `shira_indices` `[2, n]` (I32: rows, then columns, in
//! row-major order) and `shira_weight` `[n]` per module; neither gives the
//! layer's shape, which is the base weight's. The indices are saved, never
//! regenerated from `random_seed` at load, so they are read as written.

use peft_core::shira::Shira;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, ShiraConfig};

/// One SHiRA-adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct ShiraModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `shira_weight`, widened to f32.
    pub weight: Vec<f32>,
    /// The rows of `shira_indices`.
    pub rows: Vec<u32>,
    /// Its columns.
    pub cols: Vec<u32>,
    /// `shira_indices` `[2, n]` as the writer stores them (I32), held in
    /// f32: exact, every index being below 2^24 (checked when read).
    pub indices: Vec<f32>,
    /// `shira_weight`'s element type.
    pub dtype: Dtype,
}

impl ShiraModule {
    /// `peft-core`'s SHiRA of this module over a base weight `[n_out,
    /// n_in]` (PEFT's scale, 1).
    ///
    /// # Errors
    /// `peft-core`'s validation (a position outside the weight).
    pub fn layer(&self, n_in: usize, n_out: usize) -> Result<Shira<f32, &[f32], &[u32]>, HfError> {
        Ok(Shira::new(n_in, n_out, 1.0, &self.weight[..], &self.rows[..], &self.cols[..])?)
    }

    /// A module over `rows`, `cols` and `weight` (its stored indices
    /// derived), `weight` in f32.
    pub fn new(name: String, weight: Vec<f32>, rows: Vec<u32>, cols: Vec<u32>) -> Self {
        let indices = rows.iter().chain(&cols).map(|&i| i as f32).collect();
        ShiraModule { name, weight, rows, cols, indices, dtype: Dtype::F32 }
    }
}

impl HfAdapter {
    /// SHiRA: per module `shira_indices [2, n]` (I32, non-negative, below
    /// 2^24) and `shira_weight [n]`.
    pub(super) fn read_shira(&mut self, c: &ShiraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".shira_weight", 0), (".shira_indices", 1)];
        let groups: Groups<'_, 2> =
            group(file, file.entries.iter(), &suffixes, "SHiRA", &replaces, &mut self.replacements, read)?;
        for (name, slots) in groups {
            let [Some(w), Some(ix)] = slots else {
                let tensor = if slots[0].is_none() { "shira_weight" } else { "shira_indices" };
                return Err(HfError::MissingTensor { module: name, tensor: tensor.into() });
            };
            let n = match w.shape.as_slice() {
                &[n] => n,
                s => return Err(HfError::shape(&w.name, s, "a vector")),
            };
            if ix.shape != [2, n] {
                return Err(HfError::shape(&ix.name, &ix.shape, format!("[2, {n}] (shira_weight's length)")));
            }
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "SHiRA" });
            }
            let idx = file.read_i32(ix)?;
            if let Some(bad) = idx.iter().find(|&&i| !(0..1 << 24).contains(&i)) {
                return Err(HfError::shape(&ix.name, &ix.shape, format!("indices in 0..2^24, found {bad}")));
            }
            let (rows, cols) = idx.split_at(n);
            let to_u32 = |v: &[i32]| v.iter().map(|&i| i as u32).collect::<Vec<u32>>();
            let (rows, cols) = (to_u32(rows), to_u32(cols));
            let module = ShiraModule { dtype: w.dtype, ..ShiraModule::new(name, read(file, w)?, rows, cols) };
            self.shira.push(module);
        }
        if self.shira.is_empty() {
            return Err(HfError::NoTensors { keys: "shira_weight / shira_indices" });
        }
        Ok(())
    }
}
