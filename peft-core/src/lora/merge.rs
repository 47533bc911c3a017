//! Merging the adapter into a base weight, as a typed step.
//!
//! ```text
//! merge:    W <- W + s B A     (one gemm with Accum::Add, alpha = s)
//! unmerge:  W <- backup        (bit-exact), or W <- W - s B A
//! ```
//!
//! [`Lora::merge_into`] takes the weight by `&mut` and returns a
//! [`Merged`] guard that owns that borrow, and a shared borrow of the
//! adapter, until it is unmerged. While it lives:
//!
//! * the only forward on offer is the merged base's own (one matmul, mistake
//!   6 in `peft_verify::mistakes`): the weight cannot be handed to an
//!   adapter's forward, which would add `s B A` a second time;
//! * the weight cannot be merged again, and the adapter cannot be changed
//!   (its product is baked into `W`).
//!
//! Misuse does not compile:
//!
//! ```compile_fail
//! use peft_core::base::Dense;
//! use peft_core::lora::{Lora, LoraConfig};
//! use peft_core::Reference;
//! let mut w = [0.5f32; 4];
//! let lora = Lora::new(&LoraConfig::new(1, 1.0), 2, 2, [1.0f32; 2], [1.0f32; 2]).unwrap();
//! let merged = lora.merge_into(&Reference, &mut w, None).unwrap();
//! // The weight is merged: reading it as a base for the adapter's forward
//! // would add s B A twice. `w` is borrowed by the guard.
//! let base = Dense::new(&w, 2, 2).unwrap();
//! drop(merged);
//! ```
//!
//! ```compile_fail
//! use peft_core::lora::{Lora, LoraConfig};
//! use peft_core::Reference;
//! let mut w = [0.5f32; 4];
//! let lora = Lora::new(&LoraConfig::new(1, 1.0), 2, 2, [1.0f32; 2], [1.0f32; 2]).unwrap();
//! let first = lora.merge_into(&Reference, &mut w, None).unwrap();
//! let second = lora.merge_into(&Reference, &mut w, None).unwrap(); // merged twice
//! drop((first, second));
//! ```
//!
//! ```compile_fail
//! use peft_core::lora::{Lora, LoraConfig};
//! use peft_core::Reference;
//! let mut w = [0.5f32; 4];
//! let mut lora = Lora::new(&LoraConfig::new(1, 1.0), 2, 2, [1.0f32; 2], [1.0f32; 2]).unwrap();
//! let merged = lora.merge_into(&Reference, &mut w, None).unwrap();
//! lora.adapter_mut().0[0] = 2.0; // the unmerge would subtract another product
//! drop(merged);
//! ```
//!
//! Dropping the guard unmerges, as a `MutexGuard` unlocks;
//! [`Merged::keep`] leaves the weight merged for good (PEFT's
//! `merge_and_unload`) and gives it back.
//!
//! ## Drift without a backup
//!
//! The reference and faer backends compute the product `p = s (B A)_ij` with
//! the same bits on merge and unmerge (the same operands, and the sign of
//! `alpha` only flips the sign of the rounded product). So one cycle is two
//! roundings, `W1 = fl(W + p)`, `W2 = fl(W1 - p)`, and in the element's unit
//! roundoff `u` (`2^-24` f32, `2^-53` f64, `2^-11` f16, `2^-8` bf16):
//!
//! ```text
//! |W2 - W| <= u |W + p| + u |W1 - p|  <=  u (2 |W| + |p|) (1 + u)
//! ```
//!
//! and `n` cycles drift by at most `n` times that (each cycle starts from
//! the previous one's result). Often the error is exactly zero (Sterbenz).
//! A caller who needs `W` back bit for bit passes a backup buffer.

use super::layer::Lora;
use crate::backend::{Accum, Backend, Op};
use crate::base::{Dense, FrozenLinear};
use crate::element::Element;
use crate::error::{Operand, check_len};
use crate::matrix::{MatMut, MatRef, checked_len};

impl<E: Element, S: AsRef<[E]>> Lora<E, S> {
    /// `W += factor * s B A` for a weight `W [out, in]` given as a view:
    /// the product a merge adds (`factor = 1`) or an unmerge subtracts
    /// (`factor = -1`). Several adapters merge into one weight by calling
    /// it once each, a weighted combination with their weights.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Dst`) for a
    /// weight of another shape, before anything is written; the backend's
    /// own errors.
    pub fn add_delta<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        weight: MatMut<'_, E>,
        factor: f64,
    ) -> core::result::Result<(), B::Error> {
        let alpha = <E::Accum as Element>::from_f64(factor * self.scale);
        let (a, b) = self.views()?;
        backend.gemm(weight, Accum::Add, b, Op::N, a, Op::N, alpha)
    }

    /// Merges `s B A` into `weight` (`[out, in]`, row-major) and returns the
    /// guard that owns it until [`Merged::unmerge`] (or the guard's drop)
    /// restores it.
    ///
    /// With `backup` (`[out, in]`), `W` is first copied into it and the
    /// restore is bit for bit. Without, the restore subtracts `s B A` (drift
    /// bound in the [module docs](self)).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight`,
    /// `Backup`), before anything is written; the backend's own errors
    /// (then `W` is restored from the backup if one was given).
    pub fn merge_into<'w, B: Backend<E> + ?Sized>(
        &'w self,
        backend: &'w B,
        weight: &'w mut [E],
        backup: Option<&'w mut [E]>,
    ) -> core::result::Result<Merged<'w, E, S, B>, B::Error> {
        let n = checked_len(self.out_features, self.in_features)?;
        check_len(Operand::Weight, n, weight.len())?;
        if let Some(bk) = &backup {
            check_len(Operand::Backup, n, bk.len())?;
        }
        let mut backup = backup;
        if let Some(bk) = backup.as_deref_mut() {
            bk.copy_from_slice(weight);
        }
        let view = MatMut::new(&mut *weight, self.out_features, self.in_features)?;
        if let Err(e) = self.add_delta(backend, view, 1.0) {
            if let Some(bk) = backup.as_deref() {
                weight.copy_from_slice(bk);
            }
            return Err(e);
        }
        Ok(Merged { lora: self, backend, weight, backup, active: true })
    }
}

/// A base weight with a LoRA adapter merged into it: `W' = W + s B A`.
///
/// It owns the `&mut W` borrow and a shared borrow of the adapter, so
/// neither can be used another way until it is restored. Its one forward
/// is the merged base's, `y = x W'^T` (one matmul). Dropping it restores
/// `W` as [`unmerge`](Self::unmerge) does, ignoring a backend error (the
/// reference and faer backends have none once shapes are checked); call
/// `unmerge` to see it, or [`keep`](Self::keep) to stay merged.
#[must_use = "dropping the guard unmerges at once"]
pub struct Merged<'w, E: Element, S: AsRef<[E]>, B: Backend<E> + ?Sized> {
    lora: &'w Lora<E, S>,
    backend: &'w B,
    weight: &'w mut [E],
    backup: Option<&'w mut [E]>,
    active: bool,
}

impl<'w, E: Element, S: AsRef<[E]>, B: Backend<E> + ?Sized> Merged<'w, E, S, B> {
    /// The merged weight `W' [out, in]`.
    pub fn weight(&self) -> &[E] {
        self.weight
    }

    /// The merged weight as a read-only base (no bias; add one with
    /// [`Dense::with_bias`]).
    pub fn base(&self) -> Dense<'_, E> {
        // The length was checked by `merge_into`; `Dense::new` cannot fail,
        // and an empty base would be refused by any forward.
        Dense::new(self.weight, self.lora.out_features, self.lora.in_features).unwrap_or_else(|_| Dense::empty())
    }

    /// `y = x W'^T`: the merged layer's forward, one matmul.
    ///
    /// # Errors
    /// As [`FrozenLinear::forward`].
    pub fn forward(&self, x: MatRef<'_, E>, y: MatMut<'_, E>) -> core::result::Result<(), B::Error> {
        self.base().forward(self.backend, x, y)
    }

    /// Restores `W`: from the backup bit for bit, or by subtracting `s B A`
    /// (drift bound in the [module docs](self)).
    ///
    /// # Errors
    /// The backend's own errors when there is no backup (then `W` is
    /// unspecified).
    pub fn unmerge(mut self) -> core::result::Result<(), B::Error> {
        self.restore()
    }

    /// Leaves `W` merged for good (PEFT's `merge_and_unload`) and gives the
    /// weight back.
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
                // Same length as W: checked by `merge_into`.
                self.weight.copy_from_slice(bk);
                Ok(())
            }
            None => {
                let view = MatMut::new(&mut *self.weight, self.lora.out_features, self.lora.in_features)?;
                self.lora.add_delta(self.backend, view, -1.0)
            }
        }
    }
}

impl<E: Element, S: AsRef<[E]>, B: Backend<E> + ?Sized> Drop for Merged<'_, E, S, B> {
    fn drop(&mut self) {
        // A backend error cannot be reported from a drop; `unmerge` reports it.
        let _ = self.restore();
    }
}

impl<E: Element, S: AsRef<[E]>, B: Backend<E> + ?Sized> core::fmt::Debug for Merged<'_, E, S, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Merged")
            .field("out_features", &self.lora.out_features)
            .field("in_features", &self.lora.in_features)
            .field("backup", &self.backup.is_some())
            .finish()
    }
}
