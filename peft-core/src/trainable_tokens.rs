//! Trainable tokens: chosen rows of an embedding table trained in place of
//! the frozen ones, as PEFT's `TrainableTokensLayer` runs them.
//!
//! ```text
//! indices [k] (distinct token ids, in the order given), rows [k, dim]
//! E'[indices[i]] = rows[i];  E'[v] = E[v] for every other v
//! embedding:        y[t] = E'[ids[t]]
//! tied output layer: logits = x E'^T      (logits[:, indices[i]] = x rows[i]^T)
//! merged: E <- E' (the rows replaced, PEFT's index_copy); unmerged: the originals back
//! ```
//!
//! PEFT saves `trainable_tokens_delta [k, dim]`, which despite its name
//! holds the new rows themselves (initialized to a copy of the base's, so
//! a fresh adapter is the base exactly: [`TrainableTokens::init_from_table`]).
//! Row `i` belongs to token `indices[i]`; PEFT keeps the indices in the
//! order the config gives them, unsorted. Repeated indices are refused:
//! PEFT's `index_copy` leaves the winner unspecified.
//!
//! On a model whose output layer shares the embedding table (tied
//! embeddings), PEFT wraps the output layer too, over the same rows
//! ([`head_forward`](TrainableTokens::head_forward),
//! [`head_backward`](TrainableTokens::head_backward)).
//!
//! The backward, with `G = dL/dy`: `drows[i] += sum_{t: ids[t] = indices[i]}
//! G[t]`; through a tied output layer, `drows[i] += sum_t dlogits[t,
//! indices[i]] x[t]`. The ids have no gradient.
//!
//! Merging is replacement ([`UpdateKind::Replacement`]): the table's rows
//! are kept at the front of the merge's scratch, and the unmerge puts them
//! back bit for bit. Finding a token's row is a scan of the `k` indices
//! (no heap in this crate): `O(k)` per id.
use core::marker::PhantomData;

use crate::backend::{Backend, Outcome};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, check_shape};
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{Direction, UpdateBlock, UpdateKind, WeightUpdate};

/// Trainable tokens of an embedding table `[vocab, dim]`: the rows `[k,
/// dim]` of the tokens `indices [k]`.
#[derive(Clone, Debug)]
pub struct TrainableTokens<E, S, I> {
    rows: S,
    indices: I,
    vocab: usize,
    dim: usize,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> TrainableTokens<E, S, I> {
    /// Trainable tokens of a table `[vocab, dim]`: `rows [k, dim]` for the
    /// tokens `indices [k]`, which keep their values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`token_indices`) for an index outside
    /// the vocabulary or one given twice, a zero width;
    /// [`Error::ShapeMismatch`] (`Parameter`) for rows of another length;
    /// [`Error::Overflow`].
    pub fn new(vocab: usize, dim: usize, indices: I, rows: S) -> Result<Self> {
        if dim == 0 {
            return Err(Error::InvalidParameter { name: "embedding width", rule: "must be positive" });
        }
        let ix = indices.as_ref();
        if ix.iter().any(|&i| i as usize >= vocab) {
            return Err(Error::InvalidParameter { name: "token_indices", rule: "every index below the vocabulary" });
        }
        if ix.iter().enumerate().any(|(n, i)| ix.get(..n).is_some_and(|before| before.contains(i))) {
            return Err(Error::InvalidParameter { name: "token_indices", rule: "each token once" });
        }
        check_len(Operand::Parameter, checked_len(ix.len(), dim)?, rows.as_ref().len())?;
        Ok(Self { rows, indices, vocab, dim, _element: PhantomData })
    }

    /// The tokens' rows `[k, dim]`.
    pub fn rows(&self) -> &[E] {
        self.rows.as_ref()
    }

    /// The tokens, in the rows' order.
    pub fn indices(&self) -> &[u32] {
        self.indices.as_ref()
    }

    /// `(vocab, dim)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.vocab, self.dim)
    }

    /// The row of token `id`, if it is trained.
    pub fn row_of(&self, id: usize) -> Option<&[E]> {
        let i = self.indices.as_ref().iter().position(|&v| v as usize == id)?;
        self.rows.as_ref().get(i * self.dim..(i + 1) * self.dim)
    }

    fn check_ids(&self, ids: &[usize]) -> Result<()> {
        match ids.iter().find(|&&id| id >= self.vocab) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// `y[t] = E'[ids[t]]` over the frozen `table [vocab, dim]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`EmbeddingTable`, `Output`),
    /// [`Error::TokenOutOfRange`], before anything is written.
    pub fn forward(&self, table: &[E], ids: &[usize], mut y: MatMut<'_, E>) -> Result<()> {
        check_len(Operand::EmbeddingTable, checked_len(self.vocab, self.dim)?, table.len())?;
        check_shape(Operand::Output, y.rows(), y.cols(), ids.len(), self.dim)?;
        self.check_ids(ids)?;
        for (row, &id) in y.row_iter_mut().zip(ids) {
            let src = self.row_of(id).or_else(|| table.get(id * self.dim..(id + 1) * self.dim));
            if let Some(src) = src {
                row.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Overwrites the rows of `y [ids.len(), dim]` whose token is trained
    /// with its row: the forward for a caller that looked the table up
    /// itself (a table stored quantized, a host with its own embedding).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Output`), [`Error::TokenOutOfRange`],
    /// before anything is written.
    pub fn replace_rows(&self, ids: &[usize], mut y: MatMut<'_, E>) -> Result<()> {
        check_shape(Operand::Output, y.rows(), y.cols(), ids.len(), self.dim)?;
        self.check_ids(ids)?;
        for (row, &id) in y.row_iter_mut().zip(ids) {
            if let Some(src) = self.row_of(id) {
                row.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Accumulates `dL/drows` from `grad_y = dL/dy [ids.len(), dim]`:
    /// `grad_rows[i] += G[t]` for each `t` with `ids[t] = indices[i]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`GradOutput`, `Gradient`),
    /// [`Error::TokenOutOfRange`], before anything is written.
    pub fn backward(&self, ids: &[usize], grad_y: MatRef<'_, E>, grad_rows: &mut [E]) -> Result<()> {
        check_shape(Operand::GradOutput, grad_y.rows(), grad_y.cols(), ids.len(), self.dim)?;
        check_len(Operand::Gradient, self.rows.as_ref().len(), grad_rows.len())?;
        self.check_ids(ids)?;
        for (t, &id) in ids.iter().enumerate() {
            let Some(i) = self.indices.as_ref().iter().position(|&v| v as usize == id) else { continue };
            let dst = grad_rows.get_mut(i * self.dim..(i + 1) * self.dim).unwrap_or(&mut []);
            for (g, v) in dst.iter_mut().zip(grad_y.row(t)) {
                *g = E::from_accum(g.to_accum() + v.to_accum());
            }
        }
        Ok(())
    }

    /// An output layer tied to the table: overwrites the trained tokens'
    /// columns of `logits [t, vocab]` (computed over the frozen table) with
    /// `x rows[i]^T`, `x [t, dim]`, each dot product in the accumulation
    /// type and rounded once.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Input`, `Output`), before anything is
    /// written.
    pub fn head_forward(&self, x: MatRef<'_, E>, mut logits: MatMut<'_, E>) -> Result<()> {
        check_shape(Operand::Input, x.rows(), x.cols(), x.rows(), self.dim)?;
        check_shape(Operand::Output, logits.rows(), logits.cols(), x.rows(), self.vocab)?;
        for (t, out) in logits.row_iter_mut().enumerate() {
            let xr = x.row(t);
            for (&id, row) in self.indices.as_ref().iter().zip(self.rows.as_ref().chunks_exact(self.dim)) {
                let dot = xr.iter().zip(row).fold(E::Accum::ZERO, |a, (u, v)| a + u.to_accum() * v.to_accum());
                if let Some(o) = out.get_mut(id as usize) {
                    *o = E::from_accum(dot);
                }
            }
        }
        Ok(())
    }

    /// The tied output layer's backward: `grad_rows[i] += sum_t
    /// grad_logits[t, indices[i]] x[t]` from `x [t, dim]` and `grad_logits
    /// [t, vocab]`. With `input`, `(frozen, grad_x)`: `frozen [k, dim]` the
    /// table's own rows of the tokens (`E[indices[i]]`) and `grad_x [t,
    /// dim]` the caller's `grad_logits E` over the frozen table, corrected
    /// to `grad_logits E'`: `grad_x[t] += sum_i grad_logits[t, indices[i]]
    /// (rows[i] - frozen[i])`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Input`, `GradOutput`, `Gradient`,
    /// `EmbeddingTable` for `frozen`, `GradInput`), before anything is
    /// written.
    pub fn head_backward(
        &self,
        x: MatRef<'_, E>,
        grad_logits: MatRef<'_, E>,
        grad_rows: &mut [E],
        input: Option<(MatRef<'_, E>, MatMut<'_, E>)>,
    ) -> Result<()> {
        let t = x.rows();
        check_shape(Operand::Input, t, x.cols(), t, self.dim)?;
        check_shape(Operand::GradOutput, grad_logits.rows(), grad_logits.cols(), t, self.vocab)?;
        check_len(Operand::Gradient, self.rows.as_ref().len(), grad_rows.len())?;
        if let Some((frozen, mut gx)) = input {
            let k = self.indices.as_ref().len();
            check_shape(Operand::EmbeddingTable, frozen.rows(), frozen.cols(), k, self.dim)?;
            check_shape(Operand::GradInput, gx.rows(), gx.cols(), t, self.dim)?;
            for (s, out) in gx.row_iter_mut().enumerate() {
                for (i, (&id, own)) in
                    self.indices.as_ref().iter().zip(self.rows.as_ref().chunks_exact(self.dim)).enumerate()
                {
                    let gl = grad_logits.get(s, id as usize).map_or(E::Accum::ZERO, |v| v.to_accum());
                    for ((o, a), b) in out.iter_mut().zip(own).zip(frozen.row(i)) {
                        *o = E::from_accum(o.to_accum() + gl * (a.to_accum() - b.to_accum()));
                    }
                }
            }
        }
        for (&id, dst) in self.indices.as_ref().iter().zip(grad_rows.chunks_exact_mut(self.dim)) {
            for (j, g) in dst.iter_mut().enumerate() {
                let sum = (0..x.rows()).fold(g.to_accum(), |a, t| {
                    let gl = grad_logits.get(t, id as usize).map_or(E::Accum::ZERO, |v| v.to_accum());
                    a + gl * x.get(t, j).map_or(E::Accum::ZERO, |v| v.to_accum())
                });
                *g = E::from_accum(sum);
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> WeightUpdate<E> for TrainableTokens<E, S, I> {
    /// `(vocab, dim)`: the table's shape.
    fn weight_dims(&self) -> (usize, usize) {
        (self.vocab, self.dim)
    }

    /// [`UpdateKind::Replacement`]: the trained tokens' rows are the
    /// adapter's.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Replacement
    }

    /// `min(k, rows) dim`: the originals of the trained rows in a block of
    /// `rows`, kept by the merge for the unmerge (saturating).
    fn update_scratch_len(&self, rows: usize) -> usize {
        rows.min(self.indices.as_ref().len()).saturating_mul(self.dim)
    }

    /// Merge: each trained row of the block goes to the scratch (in the
    /// order of `indices`) and the adapter's takes its place. Unmerge: the
    /// scratch's rows are put back, bit for bit (the scratch must be the
    /// merge's, handed back unchanged).
    fn run_update<B: Backend<E> + ?Sized>(&self, _backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { start, mut block, direction, scratch, .. } = block;
        let n = block.rows();
        let mut kept = scratch.chunks_exact_mut(self.dim);
        for (&id, own) in self.indices.as_ref().iter().zip(self.rows.as_ref().chunks_exact(self.dim)) {
            let Some(r) = (id as usize).checked_sub(start).filter(|&r| r < n) else { continue };
            let (Some(slot), row) = (kept.next(), block.row_mut(r)) else { break };
            match direction {
                Direction::Merge => {
                    slot.copy_from_slice(row);
                    row.copy_from_slice(own);
                }
                Direction::Unmerge => row.copy_from_slice(slot),
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>, I: AsRef<[u32]>> TrainableTokens<E, S, I> {
    /// Initializes as PEFT does (`init_weights = True`): each row a copy of
    /// its token's row of `table [vocab, dim]`, so the adapted table is the
    /// base exactly.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`EmbeddingTable`), before anything is
    /// written.
    pub fn init_from_table(&mut self, table: &[E]) -> Result<()> {
        check_len(Operand::EmbeddingTable, checked_len(self.vocab, self.dim)?, table.len())?;
        let dim = self.dim;
        for (&id, row) in self.indices.as_ref().iter().zip(self.rows.as_mut().chunks_exact_mut(dim)) {
            if let Some(src) = table.get(id as usize * dim..(id as usize + 1) * dim) {
                row.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// The rows mutably, for an optimizer step or a load.
    pub fn rows_mut(&mut self) -> &mut [E] {
        self.rows.as_mut()
    }
}
