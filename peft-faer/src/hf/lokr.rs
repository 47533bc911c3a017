//! LoKr in PEFT's files: the module as read (each factor full or low
//! rank), and its reader.

use peft_core::lokr::{Factor, Lokr};
use peft_core::lora::LoraConfig;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved, suffixes};
use super::st::{self, StFile};
use super::{HfAdapter, HfError, LokrConfig};

/// One LoKr-adapted module: `W1 [a, c]` and `W2 [b, d]`, each stored
/// full (`lokr_w1`) or low rank (`lokr_w1_a`, `lokr_w1_b`).
#[derive(Clone, Debug, PartialEq)]
pub struct LokrModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `W1`'s stored tensors (one, or `_a` and `_b`), widened to f32.
    pub w1: Vec<Vec<f32>>,
    /// `W2`'s.
    pub w2: Vec<Vec<f32>>,
    /// `(a, c)`.
    pub d1: (usize, usize),
    /// `(b, d)`.
    pub d2: (usize, usize),
    /// The module's rank (`rank_pattern` or `r`; `s = alpha / r`).
    pub r: usize,
    /// Its alpha.
    pub alpha: f64,
    /// Each stored tensor's element type, `W1`'s then `W2`'s.
    pub dtypes: Vec<Dtype>,
}

impl LokrModule {
    /// `peft-core`'s LoKr over this module's factors (each full or low
    /// rank, as stored).
    ///
    /// # Errors
    /// `peft-core`'s validation.
    pub fn layer(&self) -> Result<Lokr<f32, &[f32]>, HfError> {
        fn factor(f: &[Vec<f32>]) -> Factor<&[f32]> {
            match f {
                [a, b] => Factor::LowRank(&a[..], &b[..]),
                [full, ..] => Factor::Full(&full[..]),
                [] => Factor::Full(&[][..]),
            }
        }
        let cfg = LoraConfig::new(self.r, self.alpha);
        Ok(Lokr::new(&cfg, self.d1, self.d2, factor(&self.w1), factor(&self.w2))?)
    }

    /// `(out, in) = (a b, c d)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d1.0 * self.d2.0, self.d1.1 * self.d2.1)
    }

    /// The stored tensors: PEFT's key suffix, shape, values.
    pub fn stored(&self) -> Vec<(&'static str, Vec<usize>, &[f32])> {
        let mut out = Vec::new();
        for (which, f, (rows, cols)) in [("w1", &self.w1, self.d1), ("w2", &self.w2, self.d2)] {
            match f.as_slice() {
                [m] => out.push((if which == "w1" { "lokr_w1" } else { "lokr_w2" }, vec![rows, cols], &m[..])),
                [a, b] => {
                    let (ka, kb) = if which == "w1" { ("lokr_w1_a", "lokr_w1_b") } else { ("lokr_w2_a", "lokr_w2_b") };
                    out.push((ka, vec![rows, self.r], &a[..]));
                    out.push((kb, vec![self.r, cols], &b[..]));
                }
                _ => {}
            }
        }
        out
    }
}

impl HfAdapter {
    pub(super) fn read_lokr(&mut self, kc: &LokrConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        const KEYS: [&str; 6] = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"];
        let lc = &kc.common;
        let owned = suffixes(&KEYS);
        let suffixes: Vec<(&str, usize)> = owned.iter().map(|(s, i)| (s.as_str(), *i)).collect();
        let replaces = |key: &str| saved(&lc.modules_to_save, key);
        let groups: Groups<'_, 6> =
            group(file, file.entries.iter(), &suffixes, "LoKr", &replaces, &mut self.replacements, read)?;
        for (name, s) in groups {
            if !lc.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "LoKr" });
            }
            let r = lc.rank_for(&name);
            let mut dtypes = Vec::new();
            // One factor: full, or low rank of rank r; its (rows, cols).
            let mut factor = |full: Option<&st::Entry>, a: Option<&st::Entry>, b: Option<&st::Entry>, which: &str| {
                match (full, a, b) {
                    (Some(m), None, None) => match m.shape.as_slice() {
                        &[rows, cols] => {
                            dtypes.push(m.dtype);
                            Ok((vec![read(file, m)?], (rows, cols)))
                        }
                        _ => Err(HfError::shape(&m.name, &m.shape, "a matrix")),
                    },
                    (None, Some(a), Some(b)) => match (a.shape.as_slice(), b.shape.as_slice()) {
                        (&[rows, ra], &[rb, cols]) if ra == r && rb == r => {
                            dtypes.extend([a.dtype, b.dtype]);
                            Ok((vec![read(file, a)?, read(file, b)?], (rows, cols)))
                        }
                        _ => Err(HfError::RankMismatch {
                            module: name.clone(),
                            config: r,
                            tensors: a.shape.get(1).copied().unwrap_or(0),
                        }),
                    },
                    _ => {
                        let tensor = format!("lokr_{which} (or lokr_{which}_a and lokr_{which}_b)");
                        Err(HfError::MissingTensor { module: name.clone(), tensor })
                    }
                }
            };
            let (w1, d1) = factor(s[0], s[1], s[2], "w1")?;
            let (w2, d2) = factor(s[3], s[4], s[5], "w2")?;
            // PEFT's factorization must give these dimensions.
            let (n_out, n_in) = (d1.0 * d2.0, d1.1 * d2.1);
            let f = kc.decompose_factor;
            let (fo, fi) = (peft_core::lokr::factorization(n_out, f), peft_core::lokr::factorization(n_in, f));
            if fo != (d1.0, d2.0) || fi != (d1.1, d2.1) {
                let expected = format!(
                    "[{}, {}] with lokr_w2 [{}, {}]: PEFT's factorization of {n_out} x {n_in} (decompose_factor {f})",
                    fo.0, fi.0, fo.1, fi.1
                );
                return Err(HfError::shape(format!("{name}.lokr_w1"), &[d1.0, d1.1], expected));
            }
            self.lokr.push(LokrModule { name: name.clone(), w1, w2, d1, d2, r, alpha: lc.alpha_for(&name), dtypes });
        }
        if self.lokr.is_empty() {
            return Err(HfError::NoTensors { keys: "lokr_w1 / lokr_w2" });
        }
        Ok(())
    }
}
