//! VB-LoRA in PEFT's files: the shared vector bank and the modules as read,
//! and the reader.
//!
//! The bank is saved once, `base_model.vblora_vector_bank` `[nv, L]`. Per
//! module PEFT saves the logits, `vblora_logits_A` `[r, in / L, nv]` and
//! `vblora_logits_B` `[out / L, r, nv]`, or with `save_only_topk_weights`
//! their top-k form: `<logits>_topk_indices` (U8, I16, I32 or I64, `[..,
//! k]`) and `<logits>_topk_weights` (`[.., k - 1]`, the last weight being
//! one minus their sum). The top-k form is read as PEFT loads it, logits
//! `log w` at the indices and `-inf` elsewhere, and written back as saved.

use peft_core::vblora::VbLora;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::{Entry, StFile};
use super::{HfAdapter, HfError, VbLoraConfig};

/// VB-LoRA's key for the shared vector bank (not under
/// `base_model.model.`).
pub const VBLORA_BANK_KEY: &str = "base_model.vblora_vector_bank";

/// VB-LoRA's shared vector bank `[nv, L]`.
#[derive(Clone, Debug, PartialEq)]
pub struct VbLoraBank {
    /// The vectors, widened to f32.
    pub v: Vec<f32>,
    /// `[nv, L]`.
    pub shape: [usize; 2],
    /// Its element type.
    pub dtype: Dtype,
}

/// One tensor as saved: element type, shape, values (integers as f32,
/// exact).
#[derive(Clone, Debug, PartialEq)]
pub struct SavedTensor {
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values.
    pub data: Vec<f32>,
}

/// A module's logits as the file holds them: whole, or the top-k form
/// (indices and the first `k - 1` weights, as saved, for writing back).
#[derive(Clone, Debug, PartialEq)]
pub enum VbLoraStored {
    /// `vblora_logits_A` and `_B` themselves.
    Logits,
    /// `[[indices A, weights A], [indices B, weights B]]`.
    TopK(Box<[[SavedTensor; 2]; 2]>),
}

/// One VB-LoRA-adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct VbLoraModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `vblora_logits_A` `[r, in / L, nv]` (from the top-k form: `log w`
    /// and `-inf`).
    pub logits_a: Vec<f32>,
    /// `vblora_logits_B` `[out / L, r, nv]`.
    pub logits_b: Vec<f32>,
    /// `logits_A`'s and `logits_B`'s shapes.
    pub shapes: [[usize; 3]; 2],
    /// The top-k count.
    pub topk: usize,
    /// How the file holds them.
    pub stored: VbLoraStored,
    /// The logits' element types.
    pub dtypes: [Dtype; 2],
}

impl VbLoraModule {
    /// `peft-core`'s VB-LoRA of this module over `bank` on a weight
    /// `[n_out, n_in]`.
    ///
    /// # Errors
    /// [`HfError::TensorShape`] when the logits' shapes do not fit the
    /// weight; `peft-core`'s validation.
    pub fn layer<'p>(
        &'p self,
        bank: &'p VbLoraBank,
        n_in: usize,
        n_out: usize,
    ) -> Result<VbLora<f32, &'p [f32], &'p [f32]>, HfError> {
        let [[r, a_blocks, nv], [b_blocks, _, _]] = self.shapes;
        let l = bank.shape[1];
        if a_blocks * l != n_in || b_blocks * l != n_out || nv != bank.shape[0] {
            let want = format!(
                "[r, {}, {}] for a weight [{n_out}, {n_in}] and the bank {:?}",
                n_in / l.max(1),
                bank.shape[0],
                bank.shape
            );
            return Err(HfError::shape(format!("{}.vblora_logits_A", self.name), &self.shapes[0], want));
        }
        Ok(VbLora::new(r, l, self.topk, n_in, n_out, &bank.v[..], &self.logits_a[..], &self.logits_b[..])?)
    }
}

/// Logits `[.., nv]` from the top-k form: `log w` at the indices, `-inf`
/// elsewhere, the last weight `1 - sum` of the saved ones.
fn logits_of(idx: &Entry, w: &Entry, idxv: &[i64], wv: &[f32], nv: usize, k: usize) -> Result<Vec<f32>, HfError> {
    let rows = idxv.len() / k.max(1);
    if w.shape.last() != Some(&(k - 1)) || wv.len() != rows * (k - 1) && !wv.is_empty() {
        return Err(HfError::shape(&w.name, &w.shape, format!("[.., {}] beside the indices", k - 1)));
    }
    let mut out = vec![f32::NEG_INFINITY; rows * nv];
    if wv.is_empty() {
        // Values not held (a summary): shapes only.
        return Ok(out);
    }
    for (row, ix) in idxv.chunks_exact(k).enumerate() {
        let ws = wv.get(row * (k - 1)..(row + 1) * (k - 1)).unwrap_or(&[]);
        let last = 1.0 - ws.iter().map(|&v| f64::from(v)).sum::<f64>();
        for (t, &i) in ix.iter().enumerate() {
            let wt = ws.get(t).map_or(last, |&v| f64::from(v));
            let slot = usize::try_from(i).ok().filter(|&i| i < nv).and_then(|i| out.get_mut(row * nv + i));
            match slot {
                Some(s) if wt > 0.0 => *s = wt.ln() as f32,
                Some(_) => return Err(HfError::shape(&w.name, &w.shape, "weights summing to less than 1")),
                None => return Err(HfError::shape(&idx.name, &idx.shape, format!("indices below {nv}"))),
            }
        }
    }
    Ok(out)
}

impl HfAdapter {
    /// VB-LoRA: the bank, then per module the logits or their top-k form.
    pub(super) fn read_vblora(&mut self, c: &VbLoraConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let bank =
            file.entries.iter().find(|e| e.name == VBLORA_BANK_KEY).ok_or_else(|| HfError::missing(VBLORA_BANK_KEY))?;
        let (nv, l) = match bank.shape.as_slice() {
            &[nv, l] if nv == c.num_vectors && l == c.vector_length => (nv, l),
            s => {
                return Err(HfError::shape(
                    &bank.name,
                    s,
                    format!("[{}, {}] (num_vectors, vector_length)", c.num_vectors, c.vector_length),
                ));
            }
        };
        let k = c.topk;
        let suffixes = [
            (".vblora_logits_A", 0),
            (".vblora_logits_B", 1),
            (".vblora_logits_A_topk_indices", 2),
            (".vblora_logits_A_topk_weights", 3),
            (".vblora_logits_B_topk_indices", 4),
            (".vblora_logits_B_topk_weights", 5),
        ];
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let own = file.entries.iter().filter(|e| e.name != VBLORA_BANK_KEY);
        let groups: Groups<'_, 6> = group(file, own, &suffixes, "VB-LoRA", &replaces, &mut self.replacements, read)?;
        for (name, slots) in groups {
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "VB-LoRA" });
            }
            let shape3 = |e: &Entry, rows: usize| match e.shape.as_slice() {
                &[a, b, z] if z == rows => Ok([a, b, z]),
                s => Err(HfError::shape(&e.name, s, format!("[.., .., {rows}]"))),
            };
            let m = match slots {
                [Some(a), Some(b), None, None, None, None] => {
                    let shapes = [shape3(a, nv)?, shape3(b, nv)?];
                    let (logits_a, logits_b) = (read(file, a)?, read(file, b)?);
                    let (stored, dtypes) = (VbLoraStored::Logits, [a.dtype, b.dtype]);
                    VbLoraModule { name, logits_a, logits_b, shapes, topk: k, stored, dtypes }
                }
                [None, None, Some(ia), Some(wa), Some(ib), Some(wb)] => {
                    let mut shapes = [shape3(ia, k)?, shape3(ib, k)?];
                    shapes[0][2] = nv;
                    shapes[1][2] = nv;
                    let (iav, ibv) = (file.read_index(ia)?, file.read_index(ib)?);
                    let (wav, wbv) = (read(file, wa)?, read(file, wb)?);
                    let logits_a = logits_of(ia, wa, &iav, &wav, nv, k)?;
                    let logits_b = logits_of(ib, wb, &ibv, &wbv, nv, k)?;
                    let keep = |e: &Entry, data: Vec<f32>| SavedTensor { dtype: e.dtype, shape: e.shape.clone(), data };
                    let as_f32 = |v: &[i64]| v.iter().map(|&i| i as f32).collect::<Vec<f32>>();
                    let stored = VbLoraStored::TopK(Box::new([
                        [keep(ia, as_f32(&iav)), keep(wa, wav)],
                        [keep(ib, as_f32(&ibv)), keep(wb, wbv)],
                    ]));
                    VbLoraModule { name, logits_a, logits_b, shapes, topk: k, stored, dtypes: [Dtype::F32; 2] }
                }
                _ => {
                    return Err(HfError::MissingTensor {
                        module: name,
                        tensor: "vblora_logits_A and _B, or their _topk_indices and _topk_weights".into(),
                    });
                }
            };
            self.vblora.push(m);
        }
        if self.vblora.is_empty() {
            return Err(HfError::NoTensors { keys: "vblora_logits_A / vblora_logits_B" });
        }
        self.vblora_bank = Some(VbLoraBank { v: read(file, bank)?, shape: [nv, l], dtype: bank.dtype });
        Ok(())
    }
}
