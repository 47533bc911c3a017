//! LoHa in PEFT's files: the module as read, and its reader.

use peft_core::loha::Loha;
use peft_core::lora::LoraConfig;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved, suffixes};
use super::st::StFile;
use super::{HfAdapter, HfError, LohaConfig};

/// One LoHa-adapted module: `hada_w1_a`, `hada_w2_a` `[out, r]`,
/// `hada_w1_b`, `hada_w2_b` `[r, in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LohaModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `[w1_a, w1_b, w2_a, w2_b]`, widened to f32.
    pub factors: [Vec<f32>; 4],
    /// Rank.
    pub r: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Alpha (`s = alpha / r`).
    pub alpha: f64,
    /// Each factor's element type.
    pub dtypes: [Dtype; 4],
}

/// LoHa's tensor names, in [`LohaModule::factors`]' order.
pub const LOHA_KEYS: [&str; 4] = peft_core::loha::KEYS;

impl LohaModule {
    /// `peft-core`'s LoHa over this module's factors.
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn layer(&self) -> Result<Loha<f32, &[f32]>, HfError> {
        let [f0, f1, f2, f3] = &self.factors;
        let cfg = LoraConfig::new(self.r, self.alpha);
        Ok(Loha::new(&cfg, self.n_in, self.n_out, [&f0[..], &f1[..], &f2[..], &f3[..]])?)
    }
}

impl HfAdapter {
    pub(super) fn read_loha(&mut self, lc: &LohaConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let owned = suffixes(&LOHA_KEYS);
        let suffixes: Vec<(&str, usize)> = owned.iter().map(|(s, i)| (s.as_str(), *i)).collect();
        let replaces = |key: &str| saved(&lc.modules_to_save, key);
        let groups: Groups<'_, 4> =
            group(file, file.entries.iter(), &suffixes, "LoHa", &replaces, &mut self.replacements, read)?;
        for (name, slots) in groups {
            let mut es = Vec::with_capacity(4);
            for (e, key) in slots.iter().zip(LOHA_KEYS) {
                es.push(e.ok_or_else(|| HfError::MissingTensor { module: name.clone(), tensor: key.into() })?);
            }
            let (&[n_out, r], &[r2, n_in]) = (es[0].shape.as_slice(), es[1].shape.as_slice()) else {
                let bad = if es[0].shape.len() == 2 { es[1] } else { es[0] };
                return Err(HfError::shape(&bad.name, &bad.shape, "a matrix"));
            };
            if r != r2 || es[2].shape != [n_out, r] || es[3].shape != [r, n_in] {
                let want = [[n_out, r], [r, n_in], [n_out, r], [r, n_in]];
                let (bad, want) = es.iter().zip(want).find(|(e, w)| e.shape != w).unwrap_or((&es[1], [r, n_in]));
                return Err(HfError::shape(&bad.name, &bad.shape, format!("{want:?} (hada_w1_a is [{n_out}, {r}])")));
            }
            if !lc.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "LoHa" });
            }
            let want = lc.rank_for(&name);
            if want != r {
                return Err(HfError::RankMismatch { module: name, config: want, tensors: r });
            }
            self.loha.push(LohaModule {
                factors: [read(file, es[0])?, read(file, es[1])?, read(file, es[2])?, read(file, es[3])?],
                dtypes: [es[0].dtype, es[1].dtype, es[2].dtype, es[3].dtype],
                alpha: lc.alpha_for(&name),
                r,
                n_in,
                n_out,
                name,
            });
        }
        if self.loha.is_empty() {
            return Err(HfError::NoTensors { keys: "hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b" });
        }
        Ok(())
    }
}
