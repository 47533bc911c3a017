//! LoRA on an embedding table (PEFT's `lora.Embedding`). (its docs are in the [parent module](super))
use core::marker::PhantomData;

use super::config::LoraConfig;
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, check_scratch, check_shape};
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::rng::Rng;

/// A LoRA adapter of an embedding table `[vocab, dim]`: `A [r, vocab]`,
/// `B [dim, r]`, the scale.
#[derive(Clone, Debug)]
pub struct LoraEmbedding<E, S> {
    a: S,
    b: S,
    vocab: usize,
    dim: usize,
    rank: usize,
    scale: f64,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of an embedding LoRA, accumulated into (`+=`).
#[derive(Debug)]
pub struct LoraEmbeddingGrads<'g, E> {
    /// `dL/dA`, `[r, vocab]`.
    pub a: &'g mut [E],
    /// `dL/dB`, `[dim, r]`.
    pub b: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> LoraEmbedding<E, S> {
    /// An adapter over `a [r, vocab]` and `b [dim, r]`, which keep their
    /// values.
    ///
    /// # Errors
    /// As [`Lora::new`](super::Lora::new) with `in = vocab`, `out = dim`.
    pub fn new(config: &LoraConfig<'_>, vocab: usize, dim: usize, a: S, b: S) -> Result<Self> {
        let scale = config.validate(vocab, dim)?;
        let rank = config.rank;
        check_len(Operand::LoraA, checked_len(rank, vocab)?, a.as_ref().len())?;
        check_len(Operand::LoraB, checked_len(dim, rank)?, b.as_ref().len())?;
        Ok(Self { a, b, vocab, dim, rank, scale, _element: PhantomData })
    }

    /// The adapter with the scale `s` given as resolved (see
    /// [`Lora::with_scale`](super::Lora::with_scale)).
    ///
    /// # Errors
    /// [`Error::InvalidAlpha`] for a non-finite scale.
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        if !scale.is_finite() {
            return Err(Error::InvalidAlpha);
        }
        self.scale = scale;
        Ok(self)
    }

    /// The scale `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `A [r, vocab]`.
    pub fn lora_a(&self) -> &[E] {
        self.a.as_ref()
    }

    /// `B [dim, r]`.
    pub fn lora_b(&self) -> &[E] {
        self.b.as_ref()
    }

    /// Scratch [`forward`](Self::forward) needs: `n r` (the looked-up
    /// rows of `A^T`); [`backward`](Self::backward) needs twice that.
    pub fn scratch_len(&self, n: usize) -> usize {
        n.saturating_mul(self.rank)
    }

    /// `T [n, r]`, `T[t, k] = A[k, id_t]`, into `t_buf`.
    fn gather(&self, ids: &[usize], t_buf: &mut [E]) -> Result<()> {
        for (row, &id) in t_buf.chunks_exact_mut(self.rank.max(1)).zip(ids) {
            for (k, v) in row.iter_mut().enumerate() {
                *v = self.a.as_ref().get(k * self.vocab + id).copied().unwrap_or(E::ZERO);
            }
        }
        Ok(())
    }

    fn check_ids(&self, ids: &[usize]) -> Result<()> {
        match ids.iter().find(|&&id| id >= self.vocab) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// `y_t = E[id_t] + s B A[:, id_t]` for the frozen `table [vocab, dim]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`EmbeddingTable`, `Output`),
    /// [`Error::TokenOutOfRange`], [`Error::ScratchTooSmall`], before
    /// anything is written; the backend's own errors.
    pub fn forward<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        table: &[E],
        ids: &[usize],
        mut y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let n = ids.len();
        check_len(Operand::EmbeddingTable, checked_len(self.vocab, self.dim)?, table.len())?;
        check_shape(Operand::Output, y.rows(), y.cols(), n, self.dim)?;
        self.check_ids(ids)?;
        let need = self.scratch_len(n);
        check_scratch(need, scratch.len())?;
        for (row, &id) in y.row_iter_mut().zip(ids) {
            let start = id * self.dim;
            if let Some(src) = table.get(start..start + self.dim) {
                row.copy_from_slice(src);
            }
        }
        self.add_low_rank(backend, ids, y, scratch)
    }

    /// `y[t, :] += s (B A)^T[id_t, :]`: the low-rank part alone, for a
    /// caller that looked the rows up itself (a table stored quantized, a
    /// host with its own embedding).
    ///
    /// Shapes: `y [ids.len(), dim]`; scratch at least
    /// [`scratch_len(ids.len())`](Self::scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Output`), [`Error::TokenOutOfRange`],
    /// [`Error::ScratchTooSmall`], before anything is written; the
    /// backend's own errors.
    pub fn add_low_rank<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        ids: &[usize],
        y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let n = ids.len();
        check_shape(Operand::Output, y.rows(), y.cols(), n, self.dim)?;
        self.check_ids(ids)?;
        let need = self.scratch_len(n);
        check_scratch(need, scratch.len())?;
        let (t_buf, _) = scratch.split_at_mut(need);
        self.gather(ids, t_buf)?;
        let t = MatRef::new(t_buf, n, self.rank)?;
        let b = MatRef::new(self.b.as_ref(), self.dim, self.rank)?;
        backend.gemm(y, Accum::Add, t, Op::N, b, Op::T, <E::Accum as Element>::from_f64(self.scale))
    }

    /// Accumulates `dL/dA` (scattered to the looked-up columns) and
    /// `dL/dB`. There is no input gradient: the inputs are ids.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`GradOutput`, `GradA`, `GradB`),
    /// [`Error::TokenOutOfRange`], [`Error::ScratchTooSmall`] (`2 n r`),
    /// before anything is written; the backend's own errors.
    pub fn backward<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        ids: &[usize],
        grad_y: MatRef<'_, E>,
        grads: LoraEmbeddingGrads<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (n, r) = (ids.len(), self.rank);
        check_shape(Operand::GradOutput, grad_y.rows(), grad_y.cols(), n, self.dim)?;
        check_len(Operand::GradA, checked_len(r, self.vocab)?, grads.a.len())?;
        check_len(Operand::GradB, checked_len(self.dim, r)?, grads.b.len())?;
        self.check_ids(ids)?;
        let need = self.scratch_len(n);
        check_scratch(need.saturating_mul(2), scratch.len())?;
        let s = <E::Accum as Element>::from_f64(self.scale);
        let one = <E::Accum as Element>::from_f64(1.0);
        let (t_buf, rest) = scratch.split_at_mut(need);
        let (u_buf, _) = rest.split_at_mut(need);
        self.gather(ids, t_buf)?;
        let b = MatRef::new(self.b.as_ref(), self.dim, r)?;
        // dB += s G^T T
        backend.gemm(
            MatMut::new(grads.b, self.dim, r)?,
            Accum::Add,
            grad_y,
            Op::T,
            MatRef::new(t_buf, n, r)?,
            Op::N,
            s,
        )?;
        // U = G B; dA[k, id_t] += s U[t, k]
        backend.gemm(MatMut::new(u_buf, n, r)?, Accum::Replace, grad_y, Op::N, b, Op::N, one)?;
        for (row, &id) in u_buf.chunks_exact(r.max(1)).zip(ids) {
            for (k, u) in row.iter().enumerate() {
                if let Some(g) = grads.a.get_mut(k * self.vocab + id) {
                    *g = E::from_accum(g.to_accum() + s * u.to_accum());
                }
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> DeltaRows<E> for LoraEmbedding<E, S> {
    /// `(vocab, dim)`: the table's shape.
    fn delta_dims(&self) -> (usize, usize) {
        (self.vocab, self.dim)
    }

    /// Rows `start..start + n` of `factor * s (B A)^T`: `factor s A[:,
    /// start..start + n]^T B^T`, one gemm (a merge adds it, `factor = 1`;
    /// an unmerge subtracts it, `-1`).
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, dst, accum, factor, scratch: _ } = block;
        let a = MatRef::new(self.a.as_ref(), self.rank, self.vocab)?;
        let a = a.cols_range(start, dst.rows()).ok_or(Error::Overflow)?;
        let b = MatRef::new(self.b.as_ref(), self.dim, self.rank)?;
        backend.gemm(dst, accum, a, Op::T, b, Op::T, <E::Accum as Element>::from_f64(factor * self.scale))
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>] LoraEmbedding<E, S>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> LoraEmbedding<E, S> {
    /// Initializes as PEFT does for embeddings: `A = 0`, `B ~ N(0, 1)`.
    pub fn init_adapter(&mut self, rng: &mut Rng) {
        self.a.as_mut().fill(E::ZERO);
        rng.fill_normal(self.b.as_mut(), 1.0);
    }

    /// `(A, B)` mutably.
    pub fn adapter_mut(&mut self) -> (&mut [E], &mut [E]) {
        (self.a.as_mut(), self.b.as_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::delta::DeltaRows;

    #[test]
    fn lookup_merge_and_gradients_by_hand() {
        // vocab 3, dim 2, r 1, s 2: A = [1, 0, -1], B = [[1], [2]].
        // ids [2, 0]: y_0 = E[2] + 2 * (-1) * [1, 2] = E[2] - [2, 4]; y_1 = E[0] + [2, 4].
        let table = [0.0f64, 1.0, 2.0, 3.0, 4.0, 5.0];
        let lora = LoraEmbedding::new(&LoraConfig::new(1, 2.0), 3, 2, &[1.0, 0.0, -1.0][..], &[1.0, 2.0][..]).unwrap();
        let mut y = [0.0; 4];
        let mut scratch = [0.0; 4];
        lora.forward(&Reference, &table, &[2, 0], MatMut::new(&mut y, 2, 2).unwrap(), &mut scratch).unwrap();
        assert_eq!(y, [2.0, 1.0, 2.0, 5.0]);
        // Merged table gives the same rows.
        let mut merged = table;
        lora.delta_rows(&Reference, 0, MatMut::new(&mut merged, 3, 2).unwrap(), Accum::Add, 1.0, &mut []).unwrap();
        assert_eq!([merged[4], merged[5], merged[0], merged[1]], y);
        // G = [[1, 0], [0, 1]]: dB = s G^T T = 2 [[-1], [1]]... T = [[-1], [1]]:
        // dB[0] = 2 (1 * -1 + 0 * 1) = -2, dB[1] = 2 (0 * -1 + 1 * 1) = 2.
        // U = G B = [[1], [2]]: dA[0, 2] += 2, dA[0, 0] += 4.
        let (mut ga, mut gb) = ([0.0; 3], [0.0; 2]);
        let g = [1.0, 0.0, 0.0, 1.0];
        lora.backward(
            &Reference,
            &[2, 0],
            MatRef::new(&g, 2, 2).unwrap(),
            LoraEmbeddingGrads { a: &mut ga, b: &mut gb },
            &mut scratch,
        )
        .unwrap();
        assert_eq!((ga, gb), ([4.0, 0.0, 2.0], [-2.0, 2.0]));
        let e = lora.forward(&Reference, &table, &[3], MatMut::new(&mut y[..2], 1, 2).unwrap(), &mut scratch);
        assert_eq!(e, Err(Error::TokenOutOfRange { id: 3, vocab: 3 }));
    }
}
