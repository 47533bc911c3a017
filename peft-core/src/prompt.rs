//! Prompt tuning (Lester et al., 2021): `n_virtual` trainable embeddings
//! prepended to every sequence's input embeddings.
//!
//! ```text
//! embeds [batch, seq, d]  ->  [P; embeds_b] for each b  ->  [batch, n_virtual + seq, d]
//! P [n_virtual, d]
//! ```
//!
//! The prompt goes before the input embeddings, never after the model's
//! output (mistake 7 in `peft_verify::mistakes`): the frozen model must process it.
//!
//! ## Mask and positions, as Hugging Face PEFT defines them
//!
//! PEFT (`PeftModelForCausalLM.forward`) concatenates a row of ones for the
//! virtual tokens in front of the attention mask, so the virtual tokens are
//! always attendable and sit at the very start of every row, also in
//! left-padded batches (`[P.. pad pad tok tok]`: the padding stays between
//! the prompt and the real tokens and remains masked). PEFT then drops any
//! given position ids and lets the model derive them from the mask the way
//! Hugging Face models do: `cumsum(mask) - 1`, with masked positions set to
//! one. [`PromptTuning::extend_mask`] produces exactly that, so the virtual
//! tokens take positions `0..n_virtual` and the real tokens' positions follow
//! them, skipping padding.

use core::marker::PhantomData;

use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::{MatRef, checked_len};
use crate::rng::Rng;

/// A soft prompt `P [n_virtual, d]` in storage `S`: `&[E]` to apply a
/// prompt held in flash, `&mut [E]` (or `&mut Vec<E>`) to train one, `Vec<E>`
/// to own it. `Send` and `Sync` whenever `S` is.
#[derive(Clone, Debug)]
pub struct PromptTuning<E, S> {
    prompt: S,
    n_virtual: usize,
    dim: usize,
    // A type tag only: `Send`/`Sync` follow `S`.
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>> PromptTuning<E, S> {
    /// Wraps `prompt [n_virtual, dim]`, keeping its values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`"n_virtual"`, `"model width"`) for a
    /// zero count (a zero-length prompt is no prompt tuning at all);
    /// [`Error::ShapeMismatch`] (`Prompt`); [`Error::Overflow`].
    pub fn new(prompt: S, n_virtual: usize, dim: usize) -> Result<Self> {
        if n_virtual == 0 {
            return Err(Error::InvalidParameter { name: "n_virtual", rule: "must be positive" });
        }
        if dim == 0 {
            return Err(Error::InvalidParameter { name: "model width", rule: "must be positive" });
        }
        check_len(Operand::Prompt, checked_len(n_virtual, dim)?, prompt.as_ref().len())?;
        Ok(Self { prompt, n_virtual, dim, _element: PhantomData })
    }

    /// Number of virtual tokens.
    pub fn n_virtual(&self) -> usize {
        self.n_virtual
    }

    /// Embedding width `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `P`.
    pub fn prompt(&self) -> &[E] {
        self.prompt.as_ref()
    }

    /// Length of an extended sequence: `n_virtual + seq`.
    pub fn extended_len(&self, seq: usize) -> usize {
        self.n_virtual.saturating_add(seq)
    }

    /// `out[b] = [P; embeds[b]]`.
    ///
    /// Shapes: `embeds [batch, seq, d]`, `out [batch, n_virtual + seq, d]`
    /// (overwritten), both dense.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Embeddings`, `Output`), [`Error::Overflow`];
    /// nothing is written.
    pub fn prepend(&self, embeds: &[E], batch: usize, seq: usize, out: &mut [E]) -> Result<()> {
        let (in_len, out_len) = self.lens(batch, seq)?;
        check_len(Operand::Embeddings, in_len, embeds.len())?;
        check_len(Operand::Output, out_len, out.len())?;
        let ext = self.extended_len(seq) * self.dim;
        let row = seq * self.dim;
        for (o, e) in
            out.chunks_exact_mut(ext.max(1)).zip(embeds.chunks_exact(row.max(1)).chain(core::iter::repeat(&[][..])))
        {
            let (head, tail) = o.split_at_mut(self.prompt().len());
            head.copy_from_slice(self.prompt());
            for (d, &s) in tail.iter_mut().zip(e) {
                *d = s;
            }
        }
        Ok(())
    }

    /// Extends an attention mask and derives position ids, as PEFT does
    /// (see the [module docs](self)).
    ///
    /// `mask [batch, seq]` (0 = padding, anything else = attend) becomes
    /// `ext_mask [batch, n_virtual + seq]` with `n_virtual` ones in front;
    /// `positions [batch, n_virtual + seq]` is `cumsum(ext_mask) - 1`, and
    /// 1 where the mask is 0.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Mask`, `Positions`), [`Error::Overflow`];
    /// nothing is written.
    pub fn extend_mask(
        &self,
        mask: &[u8],
        batch: usize,
        seq: usize,
        ext_mask: &mut [u8],
        positions: &mut [usize],
    ) -> Result<()> {
        let in_len = checked_len(batch, seq)?;
        let ext = seq.checked_add(self.n_virtual).ok_or(Error::Overflow)?;
        let out_len = checked_len(batch, ext)?;
        check_len(Operand::Mask, in_len, mask.len())?;
        check_len(Operand::Mask, out_len, ext_mask.len())?;
        check_len(Operand::Positions, out_len, positions.len())?;
        if ext == 0 {
            return Ok(());
        }
        for ((m_out, p_out), m_in) in
            ext_mask.chunks_exact_mut(ext).zip(positions.chunks_exact_mut(ext)).zip(mask.chunks(seq.max(1)))
        {
            let (head, tail) = m_out.split_at_mut(self.n_virtual);
            head.fill(1);
            for (d, &s) in tail.iter_mut().zip(m_in) {
                *d = u8::from(s != 0);
            }
            let mut count = 0usize;
            for (p, &m) in p_out.iter_mut().zip(m_out.iter()) {
                count += usize::from(m);
                *p = if m == 0 { 1 } else { count - 1 };
            }
        }
        Ok(())
    }

    /// Backward through [`prepend`](Self::prepend): `grad_prompt +=
    /// sum_b grad_out[b, ..n_virtual]`, and, if given,
    /// `grad_embeds[b] = grad_out[b, n_virtual..]` (overwriting).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`GradOutput`, `Prompt`, `Embeddings`),
    /// [`Error::Overflow`]; nothing is written.
    pub fn backward(
        &self,
        grad_out: &[E],
        batch: usize,
        seq: usize,
        grad_prompt: &mut [E],
        grad_embeds: Option<&mut [E]>,
    ) -> Result<()> {
        let (in_len, out_len) = self.lens(batch, seq)?;
        check_len(Operand::GradOutput, out_len, grad_out.len())?;
        check_len(Operand::Prompt, self.prompt().len(), grad_prompt.len())?;
        if let Some(ge) = &grad_embeds {
            check_len(Operand::Embeddings, in_len, ge.len())?;
        }
        let ext = self.extended_len(seq) * self.dim;
        // Sum over the batch in the accumulation type, rounding once.
        for (k, gp) in grad_prompt.iter_mut().enumerate() {
            let mut sum = gp.to_accum();
            for g in grad_out.chunks_exact(ext.max(1)) {
                if let Some(v) = g.get(k) {
                    sum += v.to_accum();
                }
            }
            *gp = E::from_accum(sum);
        }
        if let Some(ge) = grad_embeds {
            let row = seq * self.dim;
            for (d, g) in ge.chunks_exact_mut(row.max(1)).zip(grad_out.chunks_exact(ext.max(1))) {
                for (o, &v) in d.iter_mut().zip(g.iter().skip(self.prompt().len())) {
                    *o = v;
                }
            }
        }
        Ok(())
    }

    /// `(batch * seq * d, batch * (n_virtual + seq) * d)`.
    fn lens(&self, batch: usize, seq: usize) -> Result<(usize, usize)> {
        let in_len = checked_len(checked_len(batch, seq)?, self.dim)?;
        let ext = seq.checked_add(self.n_virtual).ok_or(Error::Overflow)?;
        let out_len = checked_len(checked_len(batch, ext)?, self.dim)?;
        Ok((in_len, out_len))
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> PromptTuning<E, S> {
    /// `P`, mutably (for an optimizer step or a load).
    pub fn prompt_mut(&mut self) -> &mut [E] {
        self.prompt.as_mut()
    }

    /// PEFT's `RANDOM` init: `P ~ N(0, 1)` (the default of `nn.Embedding`).
    pub fn init_normal(&mut self, rng: &mut Rng) {
        rng.fill_normal(self.prompt.as_mut(), 1.0);
    }

    /// PEFT's `TEXT` init: row `k` of `P` is row `ids[k % ids.len()]` of the
    /// model's embedding table (the ids are repeated, then truncated, to
    /// `n_virtual`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`EmbeddingTable`) if the table is not
    /// `d` wide; [`Error::InvalidParameter`] (`"token ids"`) for no ids;
    /// [`Error::TokenOutOfRange`]. Nothing is written on error.
    pub fn init_from_vocab(&mut self, table: MatRef<'_, E>, ids: &[usize]) -> Result<()> {
        if table.cols() != self.dim {
            return Err(Error::ShapeMismatch {
                operand: Operand::EmbeddingTable,
                expected: self.dim,
                found: table.cols(),
            });
        }
        if ids.is_empty() {
            return Err(Error::InvalidParameter { name: "token ids", rule: "must not be empty" });
        }
        if let Some(&id) = ids.iter().find(|&&id| id >= table.rows()) {
            return Err(Error::TokenOutOfRange { id, vocab: table.rows() });
        }
        for (row, &id) in self.prompt.as_mut().chunks_exact_mut(self.dim).zip(ids.iter().cycle()) {
            for (d, &s) in row.iter_mut().zip(table.row(id)) {
                *d = s;
            }
        }
        Ok(())
    }

    /// PEFT's `SAMPLE_VOCAB` init: each row of `P` copies a row of the
    /// embedding table chosen uniformly at random.
    ///
    /// # Errors
    /// As [`init_from_vocab`](Self::init_from_vocab), and
    /// [`Error::InvalidParameter`] (`"vocabulary"`) for an empty table.
    pub fn init_sample_vocab(&mut self, table: MatRef<'_, E>, rng: &mut Rng) -> Result<()> {
        if table.rows() == 0 {
            return Err(Error::InvalidParameter { name: "vocabulary", rule: "must not be empty" });
        }
        if table.cols() != self.dim {
            return Err(Error::ShapeMismatch {
                operand: Operand::EmbeddingTable,
                expected: self.dim,
                found: table.cols(),
            });
        }
        let vocab = table.rows() as u64;
        for row in self.prompt.as_mut().chunks_exact_mut(self.dim) {
            // Rejection-free multiply-shift: (x * vocab) >> 64 is uniform
            // enough for init (bias < vocab / 2^64).
            let id = ((u128::from(rng.next_u64()) * u128::from(vocab)) >> 64) as usize;
            for (d, &s) in row.iter_mut().zip(table.row(id)) {
                *d = s;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn mistake7_prompt_goes_first_hand_checked() {
        // d = 1, one virtual token P = [5], two sequences [1, 2] and [3, 4].
        let mut p = [5.0f32];
        let pt = PromptTuning::new(&mut p, 1, 1).unwrap();
        let mut out = [0.0f32; 6];
        pt.prepend(&[1.0, 2.0, 3.0, 4.0], 2, 2, &mut out).unwrap();
        assert_eq!(out, [5.0, 1.0, 2.0, 5.0, 3.0, 4.0]);
        // A causal "model" that reads the running sum at the last position
        // sees the prompt: 5 + 1 + 2 = 8 (appended at the wrong end the
        // prompt would be the last token; after the output, never seen).
        let last_state: f32 = out[..3].iter().sum();
        assert_eq!(last_state, 8.0);
        // And the first position is the prompt: a model attending to
        // position 0 only (a hand-checked 1-token receptive field) gets 5.
        assert_eq!(out[0], 5.0);
    }

    #[test]
    fn mask_and_positions_follow_peft_with_left_padding() {
        let mut p = [0.0f64; 4];
        let pt = PromptTuning::new(&mut p, 2, 2).unwrap();
        // Row 0 left-padded: [pad, pad, a, b]; row 1 full.
        let mask = [0u8, 0, 1, 1, 1, 1, 1, 1];
        let (mut ext, mut pos) = ([9u8; 12], [99usize; 12]);
        pt.extend_mask(&mask, 2, 4, &mut ext, &mut pos).unwrap();
        // Hand values from PEFT's cat(ones, mask) and HF's
        // cumsum(mask) - 1, masked_fill(mask == 0, 1).
        assert_eq!(ext, [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(pos, [0, 1, 1, 1, 2, 3, 0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn backward_sums_over_batch_and_matches_finite_differences() {
        let mut rng = Rng::new(4);
        let (n, d, batch, seq) = (3, 4, 2, 5);
        let mut p: Vec<f64> = (0..n * d).map(|_| rng.normal_f64()).collect();
        let emb: Vec<f64> = (0..batch * seq * d).map(|_| rng.normal_f64()).collect();
        let g: Vec<f64> = (0..batch * (n + seq) * d).map(|_| rng.normal_f64()).collect();
        // L = sum(tanh(out) * g): dL/dout = g (1 - tanh(out)^2).
        let loss = |p: &mut [f64], emb: &[f64]| -> f64 {
            let pt = PromptTuning::new(p, n, d).unwrap();
            let mut out = vec![0.0; batch * (n + seq) * d];
            pt.prepend(emb, batch, seq, &mut out).unwrap();
            out.iter().zip(&g).map(|(o, g)| libm::tanh(*o) * g).sum()
        };
        let mut out = vec![0.0; batch * (n + seq) * d];
        let (mut gp, mut ge) = (vec![0.0; n * d], vec![0.0; batch * seq * d]);
        {
            let pt = PromptTuning::new(&mut p, n, d).unwrap();
            pt.prepend(&emb, batch, seq, &mut out).unwrap();
            let gout: Vec<f64> = out.iter().zip(&g).map(|(o, g)| g * (1.0 - libm::tanh(*o).powi(2))).collect();
            pt.backward(&gout, batch, seq, &mut gp, Some(&mut ge)).unwrap();
        }
        let h = 1e-6;
        for k in 0..n * d {
            let orig = p[k];
            p[k] = orig + h;
            let up = loss(&mut p, &emb);
            p[k] = orig - h;
            let down = loss(&mut p, &emb);
            p[k] = orig;
            let fd = (up - down) / (2.0 * h);
            assert!((fd - gp[k]).abs() / gp[k].abs().max(1.0) < 1e-6, "dP[{k}] {fd} vs {}", gp[k]);
        }
        let mut e2 = emb.clone();
        for k in 0..e2.len() {
            let orig = e2[k];
            e2[k] = orig + h;
            let up = loss(&mut p, &e2);
            e2[k] = orig - h;
            let down = loss(&mut p, &e2);
            e2[k] = orig;
            let fd = (up - down) / (2.0 * h);
            assert!((fd - ge[k]).abs() / ge[k].abs().max(1.0) < 1e-6, "dE[{k}]");
        }
    }

    #[test]
    fn init_from_vocab_repeats_ids() {
        let table = [0.0f32, 0.5, 1.0, 1.5, 2.0, 2.5]; // vocab 3, d 2
        let t = MatRef::new(&table, 3, 2).unwrap();
        let mut p = [9.0f32; 6];
        let mut pt = PromptTuning::new(&mut p, 3, 2).unwrap();
        pt.init_from_vocab(t, &[2, 0]).unwrap();
        assert_eq!(pt.prompt(), &[2.0, 2.5, 0.0, 0.5, 2.0, 2.5]);
        assert_eq!(pt.init_from_vocab(t, &[3]), Err(Error::TokenOutOfRange { id: 3, vocab: 3 }));
        assert_eq!(
            pt.init_from_vocab(t, &[]),
            Err(Error::InvalidParameter { name: "token ids", rule: "must not be empty" })
        );
        assert_eq!(pt.prompt(), &[2.0, 2.5, 0.0, 0.5, 2.0, 2.5]);
        let mut rng = Rng::new(1);
        pt.init_sample_vocab(t, &mut rng).unwrap();
        for row in pt.prompt().chunks(2) {
            assert!(table.chunks(2).any(|r| r == row));
        }
        pt.init_normal(&mut rng);
        assert!(pt.prompt().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn errors() {
        let mut p = [0.0f32; 4];
        assert_eq!(
            PromptTuning::new(&mut p, 0, 4).unwrap_err(),
            Error::InvalidParameter { name: "n_virtual", rule: "must be positive" }
        );
        assert_eq!(
            PromptTuning::new(&mut p, 2, 3).unwrap_err(),
            Error::ShapeMismatch { operand: Operand::Prompt, expected: 6, found: 4 }
        );
        let pt = PromptTuning::new(&mut p, 2, 2).unwrap();
        let mut out = [7.0f32; 8];
        assert_eq!(
            pt.prepend(&[1.0; 3], 1, 2, &mut out),
            Err(Error::ShapeMismatch { operand: Operand::Embeddings, expected: 4, found: 3 })
        );
        assert_eq!(
            pt.prepend(&[1.0; 4], 1, 2, &mut out[..7]),
            Err(Error::ShapeMismatch { operand: Operand::Output, expected: 8, found: 7 })
        );
        assert_eq!(out, [7.0; 8]);
        let (mut m, mut pos) = ([7u8; 4], [7usize; 4]);
        assert_eq!(
            pt.extend_mask(&[1; 3], 1, 2, &mut m, &mut pos),
            Err(Error::ShapeMismatch { operand: Operand::Mask, expected: 2, found: 3 })
        );
        assert_eq!((m, pos), ([7; 4], [7; 4]));
        let mut gp = [3.0f32; 4];
        assert_eq!(
            pt.backward(&[1.0; 7], 1, 2, &mut gp, None),
            Err(Error::ShapeMismatch { operand: Operand::GradOutput, expected: 8, found: 7 })
        );
        assert_eq!(gp, [3.0; 4]);
        // seq = 0 is valid: the output is the prompt alone.
        let mut out = [0.0f32; 4];
        pt.prepend(&[], 1, 0, &mut out).unwrap();
        assert_eq!(out, [0.0; 4]);
    }
}
