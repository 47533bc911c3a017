//! RandLoRA in PEFT's files: the shared bases and the modules as read, and
//! the reader.
//!
//! With `save_projection = true` (PEFT's default) the file holds the
//! shared bases under `base_model.randlora_A` `[r, 1, min_dim]` and
//! `base_model.randlora_B` `[max_dim, n_b, r]`, and a full copy of both
//! under every module; the copies must equal the shared ones (they are
//! written back as read). Per module, `randlora_lambda` `[r, nb]` and
//! `randlora_gamma` `[nb, mn]`. Without the bases (`save_projection =
//! false`) PEFT draws them again from `projection_prng_key` with torch's
//! generator on bf16, which is not reproduced here: such files are refused
//! naming the field.

use peft_core::randlora::{RandLora, RandLoraBases};
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, RandLoraConfig};

/// RandLoRA's key for the shared `randlora_A` (not under
/// `base_model.model.`).
pub const RANDLORA_A_KEY: &str = "base_model.randlora_A";
/// RandLoRA's key for the shared `randlora_B`.
pub const RANDLORA_B_KEY: &str = "base_model.randlora_B";

/// RandLoRA's shared frozen bases.
#[derive(Clone, Debug, PartialEq)]
pub struct RandLoraShared {
    /// `randlora_A`, widened to f32.
    pub a: Vec<f32>,
    /// `randlora_B`.
    pub b: Vec<f32>,
    /// `[r, 1, min_dim]`.
    pub a_shape: [usize; 3],
    /// `[max_dim, n_b, r]`.
    pub b_shape: [usize; 3],
    /// Their element types.
    pub dtypes: [Dtype; 2],
}

impl RandLoraShared {
    /// `peft-core`'s bases over these tensors.
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn bases(&self) -> Result<RandLoraBases<f32, &[f32]>, HfError> {
        let ([r, _, min_dim], [max_dim, n_b, _]) = (self.a_shape, self.b_shape);
        Ok(RandLoraBases::new(r, min_dim, max_dim, n_b, &self.a[..], &self.b[..])?)
    }
}

/// One RandLoRA-adapted module: `randlora_lambda [r, nb]`, `randlora_gamma
/// [nb, mn]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RandLoraModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `randlora_lambda`, widened to f32.
    pub lambda: Vec<f32>,
    /// `randlora_gamma`.
    pub gamma: Vec<f32>,
    /// `[r, nb]`.
    pub lambda_shape: [usize; 2],
    /// `[nb, mn]`.
    pub gamma_shape: [usize; 2],
    /// `randlora_alpha / r`.
    pub scaling: f64,
    /// Whether the file holds the module's copies of the bases.
    pub copies: bool,
    /// `lambda`'s and `gamma`'s element types.
    pub dtypes: [Dtype; 2],
}

impl RandLoraModule {
    /// `peft-core`'s RandLoRA of this module over `bases` on a weight
    /// `[n_out, n_in]`.
    ///
    /// # Errors
    /// [`HfError::TensorShape`] when `gamma`'s width is not `min(in, out)`;
    /// `peft-core`'s validation.
    pub fn layer<'p>(
        &'p self,
        bases: &'p RandLoraBases<f32, &'p [f32]>,
        n_in: usize,
        n_out: usize,
    ) -> Result<RandLora<'p, f32, &'p [f32], &'p [f32]>, HfError> {
        let mn = n_in.min(n_out);
        if self.gamma_shape[1] != mn {
            let want = format!("[nb, {mn}] (min(in, out) of [{n_out}, {n_in}])");
            return Err(HfError::shape(format!("{}.randlora_gamma", self.name), &self.gamma_shape, want));
        }
        Ok(RandLora::new(bases, n_in, n_out, self.scaling, &self.lambda[..], &self.gamma[..])?)
    }
}

impl HfAdapter {
    /// RandLoRA: the shared bases, then per module `randlora_lambda [r,
    /// nb]`, `randlora_gamma [nb, mn]` and the bases' copies.
    pub(super) fn read_randlora(&mut self, c: &RandLoraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let find = |k: &str| file.entries.iter().find(|e| e.name == k);
        let (Some(a), Some(b)) = (find(RANDLORA_A_KEY), find(RANDLORA_B_KEY)) else {
            return Err(HfError::missing(if find(RANDLORA_A_KEY).is_none() { RANDLORA_A_KEY } else { RANDLORA_B_KEY }));
        };
        let (a_shape, b_shape) = match (a.shape.as_slice(), b.shape.as_slice()) {
            (&[ra, 1, min_dim], &[max_dim, n_b, rb]) if ra == c.r && rb == c.r => {
                ([ra, 1, min_dim], [max_dim, n_b, rb])
            }
            _ => {
                return Err(HfError::shape(
                    &a.name,
                    &a.shape,
                    format!("[{}, 1, min_dim] beside randlora_B [max_dim, n_b, {}]", c.r, c.r),
                ));
            }
        };
        let shared =
            RandLoraShared { a: read(file, a)?, b: read(file, b)?, a_shape, b_shape, dtypes: [a.dtype, b.dtype] };
        let suffixes = [(".randlora_lambda", 0), (".randlora_gamma", 1), (".randlora_A", 2), (".randlora_B", 3)];
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let own = file.entries.iter().filter(|e| e.name != RANDLORA_A_KEY && e.name != RANDLORA_B_KEY);
        let groups: Groups<'_, 4> = group(file, own, &suffixes, "RandLoRA", &replaces, &mut self.replacements, read)?;
        for (name, [l, g, ca, cb]) in groups {
            let (Some(l), Some(g)) = (l, g) else {
                let tensor = if l.is_none() { "randlora_lambda" } else { "randlora_gamma" };
                return Err(HfError::MissingTensor { module: name, tensor: tensor.into() });
            };
            let (lambda_shape, gamma_shape) = match (l.shape.as_slice(), g.shape.as_slice()) {
                (&[r, nb], &[nb2, mn]) if r == c.r && nb == nb2 && nb == mn.div_ceil(c.r) && mn > 0 => {
                    ([r, nb], [nb, mn])
                }
                _ => {
                    return Err(HfError::shape(
                        &l.name,
                        &l.shape,
                        format!("[{}, ceil(mn / r)] beside gamma [nb, mn]", c.r),
                    ));
                }
            };
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "RandLoRA" });
            }
            // The module's copies of the bases, when saved, are the shared ones.
            for (copy, want, shape) in [(ca, &shared.a, &a.shape), (cb, &shared.b, &b.shape)] {
                let Some(e) = copy else { continue };
                if e.shape != *shape || read(file, e)? != *want {
                    return Err(HfError::shape(&e.name, &e.shape, "a copy of the shared base, equal to it"));
                }
            }
            self.randlora.push(RandLoraModule {
                lambda: read(file, l)?,
                gamma: read(file, g)?,
                lambda_shape,
                gamma_shape,
                scaling: c.randlora_alpha / c.r as f64,
                copies: ca.is_some() && cb.is_some(),
                dtypes: [l.dtype, g.dtype],
                name,
            });
        }
        if self.randlora.is_empty() {
            return Err(HfError::NoTensors { keys: "randlora_lambda / randlora_gamma" });
        }
        self.randlora_bases = Some(shared);
        Ok(())
    }
}
