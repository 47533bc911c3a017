//! RoAd in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves `road_theta` and `road_alpha` per module, `out / 2`, `out`
//! or `2 out` long (road_1, road_2, road_4); the input width is the base
//! weight's.

use peft_core::road::{Road, RoadVariant};
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, RoadConfig};

/// One RoAd-adapted module: `road_theta`, `road_alpha`.
#[derive(Clone, Debug, PartialEq)]
pub struct RoadModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `road_theta`, widened to f32.
    pub theta: Vec<f32>,
    /// `road_alpha`.
    pub alpha: Vec<f32>,
    /// The variant.
    pub variant: RoadVariant,
    /// The group size `g`.
    pub group: usize,
    /// Output features (from the vectors' length and the variant).
    pub n_out: usize,
    /// `theta`'s and `alpha`'s element types.
    pub dtypes: [Dtype; 2],
}

impl RoadModule {
    /// `peft-core`'s RoAd of this module over a base weight of `n_in`
    /// columns.
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn layer(&self, n_in: usize) -> Result<Road<f32, &[f32]>, HfError> {
        Ok(Road::new(self.variant, self.group, n_in, self.n_out, &self.theta[..], &self.alpha[..])?)
    }
}

impl HfAdapter {
    /// RoAd: per module `road_theta` and `road_alpha`, equal lengths, whose
    /// output width (`2 len`, `len`, `len / 2`) `group_size` divides.
    pub(super) fn read_road(&mut self, c: &RoadConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".road_theta", 0), (".road_alpha", 1)];
        let groups: Groups<'_, 2> =
            group(file, file.entries.iter(), &suffixes, "RoAd", &replaces, &mut self.replacements, read)?;
        for (name, slots) in groups {
            let [Some(th), Some(al)] = slots else {
                let tensor = if slots[0].is_none() { "road_theta" } else { "road_alpha" };
                return Err(HfError::MissingTensor { module: name, tensor: tensor.into() });
            };
            let len = match th.shape.as_slice() {
                &[len] if len > 0 => len,
                s => return Err(HfError::shape(&th.name, s, "a vector")),
            };
            if al.shape != th.shape {
                return Err(HfError::shape(&al.name, &al.shape, format!("[{len}] (road_theta's length)")));
            }
            let n_out = match c.variant {
                RoadVariant::Road1 => len * 2,
                RoadVariant::Road2 => len,
                RoadVariant::Road4 => len / 2,
            };
            if c.variant.len(n_out) != len || n_out % c.group_size != 0 {
                let want = format!("a length giving outputs that group_size {} divides", c.group_size);
                return Err(HfError::shape(&th.name, &th.shape, want));
            }
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "RoAd" });
            }
            self.road.push(RoadModule {
                theta: read(file, th)?,
                alpha: read(file, al)?,
                variant: c.variant,
                group: c.group_size,
                n_out,
                dtypes: [th.dtype, al.dtype],
                name,
            });
        }
        if self.road.is_empty() {
            return Err(HfError::NoTensors { keys: "road_theta / road_alpha" });
        }
        Ok(())
    }
}
