//! The additive methods' update: rows of a dense `dW [rows, cols]` added to
//! a weight of that shape (LoRA, LoHa, LoKr, VeRA, LoRA on embeddings).
//!
//! ```text
//! merge:    W[start..start+n] += dW[start..start+n]      (DeltaRows::delta_rows, factor 1)
//! unmerge:  W[start..start+n] -= dW[start..start+n]      (factor -1)
//! ```
//!
//! A method implements [`DeltaRows`] and becomes a
//! [`WeightUpdate`] of
//! [`UpdateKind::Additive`](crate::method::UpdateKind::Additive) through
//! one line, `additive_update!`, so it gets the one merge guard
//! ([`Merged`](crate::method::Merged)) and the streaming merge's row
//! blocks without a line of its own.

use crate::backend::{Accum, Backend, Outcome};
use crate::base::check_rows;
use crate::element::Element;
use crate::error::check_scratch;
use crate::matrix::MatMut;
#[cfg(doc)]
use crate::method::WeightUpdate;
use crate::method::{Direction, UpdateBlock};

/// One block of rows of `factor * dW`, checked by
/// [`DeltaRows::delta_rows`] and handed to [`DeltaRows::fill_delta_rows`]:
/// rows `start..start + n` into `dst [n, cols]`.
#[derive(Debug)]
pub struct DeltaBlock<'a, E> {
    /// The first row.
    pub start: usize,
    /// The block `[n, cols]`: overwritten (`Accum::Replace`) or added to.
    pub dst: MatMut<'a, E>,
    /// Whether `dst` is overwritten or added to.
    pub accum: Accum,
    /// `1` for a merge, `-1` for an unmerge (any factor scales `dW`).
    pub factor: f64,
    /// At least [`DeltaRows::delta_scratch_len`]`(n)` elements.
    pub scratch: &'a mut [E],
}

/// A method whose update is a dense `dW [rows, cols]` added to a weight of
/// that shape (`[out, in]` for a linear layer, `[vocab, dim]` for an
/// embedding table), formed a block of rows at a time.
pub trait DeltaRows<E: Element> {
    /// `(rows, cols)` of `dW` and of the weight it merges into.
    fn delta_dims(&self) -> (usize, usize);

    /// Scratch (elements) [`delta_rows`](Self::delta_rows) needs for a
    /// block of `rows` rows: none unless the method says so.
    fn delta_scratch_len(&self, rows: usize) -> usize {
        let _ = rows;
        0
    }

    /// Rows `start..start + n` of `factor * dW` into `dst [n, cols]`
    /// (`Accum::Replace`) or added to it (`Accum::Add`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch): `Weight` for
    /// rows past the end, `Dst` for a `dst` of another width;
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall); all
    /// before anything is written; the method's own refusals; the
    /// backend's own errors.
    fn delta_rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        start: usize,
        dst: MatMut<'_, E>,
        accum: Accum,
        factor: f64,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (rows, cols) = self.delta_dims();
        check_rows(start, dst.rows(), rows, cols, &dst)?;
        check_scratch(self.delta_scratch_len(dst.rows()), scratch.len())?;
        self.fill_delta_rows(backend, DeltaBlock { start, dst, accum, factor, scratch })
    }

    /// The method's [`delta_rows`](Self::delta_rows), called once the rows
    /// and the scratch length are checked (callers use `delta_rows`).
    ///
    /// # Errors
    /// The method's own refusals; the backend's own errors.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B>;

    /// Whether the merge also adds to the layer's bias (LoRA with PEFT's
    /// `lora_bias`); `false` unless a method says so.
    fn delta_touches_bias(&self) -> bool {
        false
    }

    /// `bias[k] += factor * db[start + k]` for the block's bias `bias [n]`,
    /// when [`delta_touches_bias`](Self::delta_touches_bias); a no-op
    /// otherwise.
    fn delta_bias(&self, start: usize, bias: &mut [E], factor: f64) {
        let _ = (start, bias, factor);
    }
}

/// [`WeightUpdate::run_update`]
/// of an additive method: `block += dW` rows (merge) or `block -= dW` rows
/// (unmerge), and the bias likewise when the method has a bias delta (the
/// bias length checked by
/// [`update_rows`](crate::method::WeightUpdate::update_rows)).
///
/// # Errors
/// [`DeltaRows::delta_rows`]' errors, before anything is written; the
/// backend's own errors.
pub fn update_additive<E: Element, D: DeltaRows<E> + ?Sized, B: Backend<E> + ?Sized>(
    delta: &D,
    backend: &B,
    block: UpdateBlock<'_, E>,
) -> Outcome<E, B> {
    let UpdateBlock { start, block, bias, direction, scratch } = block;
    let factor = match direction {
        Direction::Merge => 1.0,
        Direction::Unmerge => -1.0,
    };
    delta.delta_rows(backend, start, block, Accum::Add, factor, scratch)?;
    if let Some(b) = bias {
        delta.delta_bias(start, b, factor);
    }
    Ok(())
}

/// `impl WeightUpdate` for an additive method (a [`DeltaRows`]), written
/// once: `additive_update!([generics] Type)`. (A blanket impl over every
/// `DeltaRows` would overlap, for coherence, with the multiplicative
/// methods' own impls.)
macro_rules! additive_update {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> $crate::method::WeightUpdate<E> for $ty {
            /// [`DeltaRows::delta_dims`](crate::delta::DeltaRows::delta_dims).
            fn weight_dims(&self) -> (usize, usize) {
                $crate::delta::DeltaRows::delta_dims(self)
            }

            /// [`UpdateKind::Additive`](crate::method::UpdateKind::Additive).
            fn kind(&self) -> $crate::method::UpdateKind {
                $crate::method::UpdateKind::Additive
            }

            /// [`DeltaRows::delta_touches_bias`](crate::delta::DeltaRows::delta_touches_bias).
            fn touches_bias(&self) -> bool {
                $crate::delta::DeltaRows::delta_touches_bias(self)
            }

            /// [`DeltaRows::delta_scratch_len`](crate::delta::DeltaRows::delta_scratch_len).
            fn update_scratch_len(&self, rows: usize) -> usize {
                $crate::delta::DeltaRows::delta_scratch_len(self, rows)
            }

            /// [`update_additive`](crate::delta::update_additive).
            fn run_update<B: $crate::backend::Backend<E> + ?Sized>(
                &self,
                backend: &B,
                block: $crate::method::UpdateBlock<'_, E>,
            ) -> Outcome<E, B> {
                $crate::delta::update_additive(self, backend, block)
            }
        }
    };
}
pub(crate) use additive_update;
