//! A typed merge for every method whose update is a matrix added to the
//! weight: LoHa, LoKr, VeRA and LoRA on embeddings. (LoRA, DoRA and (IA)^3
//! have their own guards: LoRA's skips scratch, DoRA's rescales rows, and
//! (IA)^3's scales instead of adding.)
//!
//! ```text
//! merge:    W <- W + dW        (DenseDelta::add_delta, factor 1)
//! unmerge:  W <- backup        (bit-exact), or W <- W - dW  (factor -1)
//! ```
//!
//! [`DenseDelta::merge_into`] takes the weight by `&mut` and returns a
//! [`DeltaMerged`] guard holding it, the adapter (shared) and the scratch
//! the unmerge needs, so that, as with LoRA's guard, the weight cannot be
//! merged twice or handed to the adapter's own forward, and the adapter
//! cannot change under it:
//!
//! ```compile_fail
//! use peft_core::delta::DenseDelta;
//! use peft_core::loha::Loha;
//! use peft_core::lora::LoraConfig;
//! use peft_core::Reference;
//! let mut w = [0.5f32; 4];
//! let mut sc = [0.0f32; 8];
//! let loha = Loha::new(&LoraConfig::new(1, 1.0), 2, 2, [[1.0f32; 2]; 4]).unwrap();
//! let first = loha.merge_into(&Reference, &mut w, None, &mut sc).unwrap();
//! let second = loha.merge_into(&Reference, &mut w, None, &mut sc).unwrap(); // merged twice
//! drop((first, second));
//! ```
//!
//! Dropping the guard unmerges; [`DeltaMerged::keep`] leaves the weight
//! merged (PEFT's `merge_and_unload`). Without a backup, one cycle rounds
//! twice: `|W2 - W| <= u (2 |W| + |dW|) (1 + u)` in the element's unit
//! roundoff `u`, when the backend forms `dW` with the same bits for both
//! signs (the reference and faer backends do; LoHa and LoKr form it in f64
//! and round only the sum).

use crate::backend::Backend;
use crate::base::{Dense, FrozenLinear};
use crate::element::Element;
use crate::error::{Operand, check_len, check_scratch};
use crate::matrix::{MatMut, MatRef, checked_len};

/// A method whose update is a dense `dW [rows, cols]` added to a weight of
/// that shape (`[out, in]` for a linear layer, `[vocab, dim]` for an
/// embedding table).
pub trait DenseDelta<E: Element> {
    /// `(rows, cols)` of `dW` and of the weight it merges into.
    fn delta_dims(&self) -> (usize, usize);

    /// Scratch (elements) [`add_delta`](Self::add_delta) needs.
    fn delta_scratch_len(&self) -> usize;

    /// `weight += factor * dW`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Dst`),
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall), before
    /// anything is written; the backend's own errors.
    fn add_delta<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        weight: MatMut<'_, E>,
        factor: f64,
        scratch: &mut [E],
    ) -> core::result::Result<(), B::Error>;

    /// Merges `dW` into `weight` (row-major `[rows, cols]`) and returns the
    /// guard that owns it (and `scratch`, at least
    /// [`delta_scratch_len`](Self::delta_scratch_len)) until
    /// [`DeltaMerged::unmerge`] or the guard's drop restores it: from
    /// `backup` (`[rows, cols]`, filled here) bit for bit, else by
    /// subtracting `dW`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight`,
    /// `Backup`), [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall),
    /// before anything is written; the backend's own errors (then `W` is
    /// restored from the backup if one was given).
    fn merge_into<'w, B: Backend<E> + ?Sized>(
        &'w self,
        backend: &'w B,
        weight: &'w mut [E],
        backup: Option<&'w mut [E]>,
        scratch: &'w mut [E],
    ) -> core::result::Result<DeltaMerged<'w, E, Self, B>, B::Error>
    where
        Self: Sized,
    {
        let (rows, cols) = self.delta_dims();
        let n = checked_len(rows, cols)?;
        check_len(Operand::Weight, n, weight.len())?;
        if let Some(bk) = &backup {
            check_len(Operand::Backup, n, bk.len())?;
        }
        check_scratch(self.delta_scratch_len(), scratch.len())?;
        let mut backup = backup;
        if let Some(bk) = backup.as_deref_mut() {
            bk.copy_from_slice(weight);
        }
        if let Err(e) = self.add_delta(backend, MatMut::new(&mut *weight, rows, cols)?, 1.0, scratch) {
            if let Some(bk) = backup.as_deref() {
                weight.copy_from_slice(bk);
            }
            return Err(e);
        }
        Ok(DeltaMerged { delta: self, backend, weight, backup, scratch, active: true })
    }
}

/// A weight with a [`DenseDelta`] merged in: owns the borrows until
/// restored; dropping it restores (as [`unmerge`](Self::unmerge));
/// [`keep`](Self::keep) stays merged.
#[must_use = "dropping the guard unmerges at once"]
pub struct DeltaMerged<'w, E: Element, D: DenseDelta<E>, B: Backend<E> + ?Sized> {
    delta: &'w D,
    backend: &'w B,
    weight: &'w mut [E],
    backup: Option<&'w mut [E]>,
    scratch: &'w mut [E],
    active: bool,
}

impl<'w, E: Element, D: DenseDelta<E>, B: Backend<E> + ?Sized> DeltaMerged<'w, E, D, B> {
    /// The merged weight `W' = W + dW`.
    pub fn weight(&self) -> &[E] {
        self.weight
    }

    /// The merged weight as a read-only base (no bias).
    pub fn base(&self) -> Dense<'_, E> {
        let (rows, cols) = self.delta.delta_dims();
        // The length was checked by `merge_into`.
        Dense::new(self.weight, rows, cols).unwrap_or_else(|_| Dense::empty())
    }

    /// `y = x W'^T`: the merged layer's forward, one matmul.
    ///
    /// # Errors
    /// As [`FrozenLinear::forward`].
    pub fn forward(&self, x: MatRef<'_, E>, y: MatMut<'_, E>) -> core::result::Result<(), B::Error> {
        self.base().forward(self.backend, x, y)
    }

    /// Restores `W`: from the backup bit for bit, or by subtracting `dW`.
    ///
    /// # Errors
    /// The backend's own errors when there is no backup (then `W` is
    /// unspecified).
    pub fn unmerge(mut self) -> core::result::Result<(), B::Error> {
        self.restore()
    }

    /// Leaves `W` merged for good and gives the weight back.
    pub fn keep(mut self) -> &'w mut [E] {
        self.active = false;
        core::mem::take(&mut self.weight)
    }

    fn restore(&mut self) -> core::result::Result<(), B::Error> {
        if !core::mem::replace(&mut self.active, false) {
            return Ok(());
        }
        match self.backup.as_deref() {
            Some(bk) => {
                self.weight.copy_from_slice(bk);
                Ok(())
            }
            None => {
                let (rows, cols) = self.delta.delta_dims();
                let view = MatMut::new(&mut *self.weight, rows, cols)?;
                self.delta.add_delta(self.backend, view, -1.0, self.scratch)
            }
        }
    }
}

impl<E: Element, D: DenseDelta<E>, B: Backend<E> + ?Sized> Drop for DeltaMerged<'_, E, D, B> {
    fn drop(&mut self) {
        // A backend error cannot be reported from a drop; `unmerge` reports it.
        let _ = self.restore();
    }
}

impl<E: Element, D: DenseDelta<E>, B: Backend<E> + ?Sized> core::fmt::Debug for DeltaMerged<'_, E, D, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeltaMerged")
            .field("dims", &self.delta.delta_dims())
            .field("backup", &self.backup.is_some())
            .finish()
    }
}
