//! LoRA configuration and validation.

use crate::error::{Error, Result};

/// How `A` is initialized. `B` is always zero at init, so a fresh adapter
/// leaves the base model's output unchanged (`B A = 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// `A ~ U(-1/sqrt(in), 1/sqrt(in))`: PyTorch's
    /// `kaiming_uniform_(A, a=sqrt(5))`, which Hugging Face PEFT and loralib
    /// use (gain `sqrt(2 / (1 + 5))`, bound `gain * sqrt(3 / in)`).
    #[default]
    KaimingUniform,
    /// `A ~ N(0, 1/r^2)`: PEFT's `init_lora_weights="gaussian"`.
    Gaussian,
}

/// LoRA hyper-parameters.
///
/// ```
/// use peft_core::lora::LoraConfig;
/// let cfg = LoraConfig::new(8, 16.0).with_rslora(true);
/// assert_eq!(cfg.scale(), Ok(16.0 / 8f64.sqrt()));
/// assert!(cfg.targets("model.layers.3.self_attn.q_proj"));
/// assert!(!cfg.targets("model.layers.3.self_attn.o_proj"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraConfig<'a> {
    /// The rank `r` of `B A`.
    pub rank: usize,
    /// The numerator `alpha` of the scale.
    pub alpha: f64,
    /// rsLoRA (Kalajdzievski, 2023): `s = alpha / sqrt(r)` instead of
    /// `alpha / r`.
    pub use_rslora: bool,
    /// How `A` is initialized.
    pub init: LoraInit,
    /// Names of the modules that receive an adapter (see
    /// [`LoraConfig::targets`]).
    pub target_modules: &'a [&'a str],
}

/// The query and value projections: the default targets, after the LoRA
/// paper (Hu et al., 2021, section 7.1) and mistake 4 in `peft_verify::mistakes`.
/// Add `"k_proj"` and `"o_proj"` for harder tasks.
pub const DEFAULT_TARGET_MODULES: &[&str] = &["q_proj", "v_proj"];

/// A rank whose adapter holds at least this fraction of the base layer's
/// parameters is reported as saving little (mistake 5 in `peft_verify::mistakes`: `r = 256`
/// on a 512x512 layer trains as many parameters as the layer itself).
pub const LOW_SAVINGS_RATIO: f64 = 0.25;

impl<'a> LoraConfig<'a> {
    /// Rank `r`, `alpha`, standard scaling, Kaiming-uniform `A`, targets
    /// [`DEFAULT_TARGET_MODULES`].
    pub const fn new(rank: usize, alpha: f64) -> Self {
        Self { rank, alpha, use_rslora: false, init: LoraInit::KaimingUniform, target_modules: DEFAULT_TARGET_MODULES }
    }

    /// Switches rsLoRA scaling on or off.
    pub const fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// Sets the initialization of `A`.
    pub const fn with_init(mut self, init: LoraInit) -> Self {
        self.init = init;
        self
    }

    /// Sets the target modules.
    pub const fn with_targets(mut self, names: &'a [&'a str]) -> Self {
        self.target_modules = names;
        self
    }

    /// The scale `s` applied to the low-rank path: `alpha / r`, or
    /// `alpha / sqrt(r)` with rsLoRA, computed in f64.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for `r = 0` (with `max` 0, as no layer is
    /// known); [`Error::InvalidAlpha`] for a zero or non-finite `alpha`.
    pub fn scale(&self) -> Result<f64> {
        if self.rank == 0 {
            return Err(Error::InvalidRank { rank: 0, max: 0 });
        }
        if !self.alpha.is_finite() || self.alpha == 0.0 {
            return Err(Error::InvalidAlpha);
        }
        let r = self.rank as f64;
        Ok(if self.use_rslora { self.alpha / libm::sqrt(r) } else { self.alpha / r })
    }

    /// Checks the configuration against a layer of `in_features` inputs and
    /// `out_features` outputs and returns the scale.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for `r = 0`; [`Error::InvalidAlpha`]. A rank
    /// above `min(in, out)` is accepted, as PEFT accepts it (PEFT's own
    /// tests hold `r = 8` on a `20 -> 2` layer): it adds no expressiveness
    /// (`B A` still has rank at most `min(in, out)`) and saves nothing, but
    /// the math is the same and files with it exist.
    pub fn validate(&self, _in_features: usize, _out_features: usize) -> Result<f64> {
        self.scale()
    }

    /// Whether the module named `name` receives an adapter, by Hugging Face
    /// PEFT's rule for a list of names: `name` equals a target, or ends with
    /// `"." + target` (so `"q_proj"` matches `"model.layers.0.self_attn.q_proj"`
    /// but not `"model.layers.0.self_attn.q_proj_extra"`).
    pub fn targets(&self, name: &str) -> bool {
        self.target_modules.iter().any(|t| module_matches(name, t))
    }
}

/// Hugging Face PEFT's rule for one entry of a list of module names: the
/// module `name` equals `target` or ends with `"." + target`. PEFT uses it
/// for `target_modules` given as a list and for `modules_to_save`.
pub fn module_matches(name: &str, target: &str) -> bool {
    name == target
        || (name.len() > target.len()
            && name.ends_with(target)
            && name.as_bytes().get(name.len() - target.len() - 1) == Some(&b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_alpha_over_r_or_sqrt_r() {
        // Hand values: 16/8 = 2; 16/sqrt(4) = 8.
        assert_eq!(LoraConfig::new(8, 16.0).scale(), Ok(2.0));
        assert_eq!(LoraConfig::new(4, 16.0).with_rslora(true).scale(), Ok(8.0));
    }

    #[test]
    fn validation_errors() {
        assert_eq!(LoraConfig::new(0, 8.0).validate(4, 4), Err(Error::InvalidRank { rank: 0, max: 0 }));
        // Above min(in, out), as PEFT allows: alpha / r = 8 / 5.
        assert_eq!(LoraConfig::new(5, 8.0).validate(4, 6), Ok(1.6));
        assert_eq!(LoraConfig::new(4, 8.0).validate(4, 6), Ok(2.0));
        for bad in [0.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(LoraConfig::new(2, bad).validate(4, 4), Err(Error::InvalidAlpha));
        }
        // A negative alpha is unusual but well defined (PEFT accepts it).
        assert_eq!(LoraConfig::new(2, -4.0).validate(4, 4), Ok(-2.0));
    }

    #[test]
    fn target_matching_follows_peft() {
        let cfg = LoraConfig::new(1, 1.0);
        assert!(cfg.targets("q_proj"));
        assert!(cfg.targets("layers.0.v_proj"));
        assert!(!cfg.targets("layers.0.k_proj"));
        assert!(!cfg.targets("layers.0.xq_proj"));
        assert!(!cfg.targets("layers.0.q_proj.lora_A"));
        let custom = cfg.with_targets(&["o_proj", "up_proj"]);
        assert!(custom.targets("mlp.up_proj"));
        assert!(!custom.targets("q_proj"));
    }
}
