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
use crate::element::Element;
use crate::error::{Operand, check_len};
use crate::matrix::MatMut;
use crate::method::Direction;
#[cfg(doc)]
use crate::method::WeightUpdate;

/// A method whose update is a dense `dW [rows, cols]` added to a weight of
/// that shape (`[out, in]` for a linear layer, `[vocab, dim]` for an
/// embedding table), formed a block of rows at a time.
pub trait DeltaRows<E: Element> {
    /// `(rows, cols)` of `dW` and of the weight it merges into.
    fn delta_dims(&self) -> (usize, usize);

    /// Scratch (elements) [`delta_rows`](Self::delta_rows) needs for a
    /// block of `rows` rows.
    fn delta_scratch_len(&self, rows: usize) -> usize;

    /// Rows `start..start + n` of `factor * dW` into `dst [n, cols]`
    /// (`Accum::Replace`) or added to it (`Accum::Add`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch): `Weight` for
    /// rows past the end, `Dst` for a `dst` of another width;
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall); all
    /// before anything is written; the backend's own errors.
    fn delta_rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        start: usize,
        dst: MatMut<'_, E>,
        accum: Accum,
        factor: f64,
        scratch: &mut [E],
    ) -> Outcome<E, B>;

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

/// [`WeightUpdate::update_rows`] of an additive method: `block += dW`
/// rows (merge) or `block -= dW` rows (unmerge), and the bias likewise when
/// the method has a bias delta.
///
/// # Errors
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Bias`) and
/// [`DeltaRows::delta_rows`]' errors, before anything is written; the
/// backend's own errors.
pub fn update_additive<E: Element, D: DeltaRows<E> + ?Sized, B: Backend<E> + ?Sized>(
    delta: &D,
    backend: &B,
    start: usize,
    block: MatMut<'_, E>,
    bias: Option<&mut [E]>,
    direction: Direction,
    scratch: &mut [E],
) -> Outcome<E, B> {
    let factor = match direction {
        Direction::Merge => 1.0,
        Direction::Unmerge => -1.0,
    };
    if let Some(b) = &bias {
        check_len(Operand::Bias, block.rows(), b.len())?;
    }
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
            fn update_rows<B: $crate::backend::Backend<E> + ?Sized>(
                &self,
                backend: &B,
                start: usize,
                block: $crate::matrix::MatMut<'_, E>,
                bias: Option<&mut [E]>,
                direction: $crate::method::Direction,
                scratch: &mut [E],
            ) -> Outcome<E, B> {
                $crate::delta::update_additive(self, backend, start, block, bias, direction, scratch)
            }
        }
    };
}
pub(crate) use additive_update;
