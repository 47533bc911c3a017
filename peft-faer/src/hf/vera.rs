//! VeRA in PEFT's files: the shared projections and the modules as read,
//! and the reader.

use peft_core::vera::{Vera, VeraProjection};
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, VeraConfig};

/// VeRA's shared frozen projections, stored once per adapter under
/// `base_model.vera_A` `[r, max_in]` and `base_model.vera_B` `[max_out, r]`
/// (PEFT's `save_projection = true`).
#[derive(Clone, Debug, PartialEq)]
pub struct VeraProjections {
    /// `vera_A`, widened to f32.
    pub a: Vec<f32>,
    /// `vera_B`.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `vera_A`'s columns: the widest input served.
    pub max_in: usize,
    /// `vera_B`'s rows: the widest output served.
    pub max_out: usize,
    /// `vera_A`'s and `vera_B`'s element types.
    pub dtypes: [Dtype; 2],
}

/// VeRA's key for `vera_A` (not under `base_model.model.`).
pub const VERA_A_KEY: &str = "base_model.vera_A";
/// VeRA's key for `vera_B`.
pub const VERA_B_KEY: &str = "base_model.vera_B";

/// One VeRA-adapted module: `vera_lambda_d [r]`, `vera_lambda_b [out]`. Its
/// input width is the base weight's (the adapter does not store it).
#[derive(Clone, Debug, PartialEq)]
pub struct VeraModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `lambda_d`, widened to f32.
    pub lambda_d: Vec<f32>,
    /// `lambda_b`.
    pub lambda_b: Vec<f32>,
    /// Rank (`lambda_d`'s length).
    pub r: usize,
    /// Output features (`lambda_b`'s length).
    pub n_out: usize,
    /// `lambda_d`'s and `lambda_b`'s element types.
    pub dtypes: [Dtype; 2],
}

impl VeraProjections {
    /// `peft-core`'s shared projections over these tensors.
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn projection(&self) -> Result<VeraProjection<f32, &[f32]>, HfError> {
        Ok(VeraProjection::new(self.r, self.max_in, self.max_out, &self.a[..], &self.b[..])?)
    }
}

impl VeraModule {
    /// `peft-core`'s VeRA vectors of this module on a layer of `n_in`
    /// inputs (the base's: the adapter does not store it).
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn layer(&self, n_in: usize) -> Result<Vera<f32, &[f32]>, HfError> {
        Ok(Vera::new(self.r, n_in, self.n_out, &self.lambda_d[..], &self.lambda_b[..])?)
    }
}

impl HfAdapter {
    /// VeRA: the shared `base_model.vera_A` / `vera_B` (rank `r` from the
    /// config), then per module `vera_lambda_d [r]` and `vera_lambda_b
    /// [out]` with `out <= max_out` (a module's input width is checked
    /// against `max_in` at merge, where the base gives it).
    pub(super) fn read_vera(&mut self, vc: &VeraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let find = |k: &str| file.entries.iter().find(|e| e.name == k);
        let (Some(a), Some(b)) = (find(VERA_A_KEY), find(VERA_B_KEY)) else {
            // PEFT writes them with save_projection=True (its default).
            return Err(HfError::missing(if find(VERA_A_KEY).is_none() { VERA_A_KEY } else { VERA_B_KEY }));
        };
        let r = vc.r;
        let (&[ra, max_in], &[max_out, rb]) = (a.shape.as_slice(), b.shape.as_slice()) else {
            let bad = if a.shape.len() == 2 { b } else { a };
            return Err(HfError::shape(&bad.name, &bad.shape, "a matrix"));
        };
        if ra != r || rb != r {
            return Err(HfError::RankMismatch { module: "vera_A / vera_B".into(), config: r, tensors: ra });
        }
        let suffixes = [(".vera_lambda_d", 0), (".vera_lambda_b", 1)];
        let replaces = |key: &str| saved(&vc.modules_to_save, key);
        let own = file.entries.iter().filter(|e| e.name != VERA_A_KEY && e.name != VERA_B_KEY);
        let groups: Groups<'_, 2> = group(file, own, &suffixes, "VeRA", &replaces, &mut self.replacements, read)?;
        for (name, slots) in groups {
            let [Some(d), Some(bv)] = slots else {
                let tensor = if slots[0].is_none() { "vera_lambda_d" } else { "vera_lambda_b" };
                return Err(HfError::MissingTensor { module: name, tensor: tensor.into() });
            };
            if !vc.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "VeRA" });
            }
            if d.shape != [r] {
                return Err(HfError::RankMismatch {
                    module: name,
                    config: r,
                    tensors: d.shape.first().copied().unwrap_or(0),
                });
            }
            let n_out = match bv.shape.as_slice() {
                &[n_out] if n_out > 0 && n_out <= max_out => n_out,
                s => return Err(HfError::shape(&bv.name, s, format!("[out] with out <= vera_B's {max_out} rows"))),
            };
            self.vera.push(VeraModule {
                lambda_d: read(file, d)?,
                lambda_b: read(file, bv)?,
                r,
                n_out,
                dtypes: [d.dtype, bv.dtype],
                name,
            });
        }
        if self.vera.is_empty() {
            return Err(HfError::NoTensors { keys: "vera_lambda_d / vera_lambda_b" });
        }
        self.vera_projections = Some(VeraProjections {
            a: read(file, a)?,
            b: read(file, b)?,
            r,
            max_in,
            max_out,
            dtypes: [a.dtype, b.dtype],
        });
        Ok(())
    }
}
