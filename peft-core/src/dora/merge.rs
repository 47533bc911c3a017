//! Merging a DoRA adapter into its base weight: DoRA's (its docs are in the [parent module](super))
use super::Dora;
use crate::backend::{Accum, Backend, Outcome};
use crate::delta::DeltaRows;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::method::{Direction, UpdateBlock, UpdateKind, WeightUpdate};

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]>> WeightUpdate<E> for Dora<E, S, C> {
    /// `(out, in)`.
    fn weight_dims(&self) -> (usize, usize) {
        (self.lora.out_features(), self.lora.in_features())
    }

    /// [`UpdateKind::Multiplicative`]: the rows of `W + s B A` are rescaled.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Multiplicative
    }

    /// `rows`: each row's norm `n`, kept from the merge for the unmerge.
    fn update_scratch_len(&self, rows: usize) -> usize {
        rows
    }

    /// Refused when some `m_j = 0`: the unmerge divides by `m`.
    fn check_invertible(&self) -> Result<()> {
        if self.magnitude.as_ref().iter().any(|m| m.to_f64() == 0.0) {
            return Err(Error::InvalidParameter {
                name: "magnitude",
                rule: "has a zero: merging without a backup could not be undone",
            });
        }
        Ok(())
    }

    /// Merge: `V = W + s B A` rows, `n_j = ||V_j||` (summed in f64, rounded
    /// once, kept in `scratch[k]`), `W_j = (m_j / n_j) V_j`. Unmerge: `W_j
    /// = (n_j / m_j) W_j - s (B A)_j` with `n_j` from `scratch[k]`.
    fn run_update<B: Backend<E> + ?Sized>(&self, backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { start, mut block, direction, scratch, .. } = block;
        let mag = |k: usize| self.magnitude.as_ref().get(start + k).map_or(0.0, |v| v.to_f64());
        match direction {
            Direction::Merge => {
                self.lora.delta_rows(backend, start, block.rb_mut(), Accum::Add, 1.0, &mut [])?;
                for ((k, row), dst) in block.row_iter_mut().enumerate().zip(scratch.iter_mut()) {
                    let sq: f64 = row.iter().map(|v| v.to_f64() * v.to_f64()).sum();
                    *dst = E::from_f64(libm::sqrt(sq));
                    let ratio = <E::Accum as Element>::from_f64(mag(k) / dst.to_f64());
                    row.iter_mut().for_each(|v| *v = E::from_accum(v.to_accum() * ratio));
                }
                Ok(())
            }
            Direction::Unmerge => {
                for ((k, row), norm) in block.row_iter_mut().enumerate().zip(scratch.iter()) {
                    let back = <E::Accum as Element>::from_f64(norm.to_f64() / mag(k));
                    row.iter_mut().for_each(|v| *v = E::from_accum(v.to_accum() * back));
                }
                self.lora.delta_rows(backend, start, block, Accum::Add, -1.0, &mut [])
            }
        }
    }
}
