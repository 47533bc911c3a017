//! Merging a DoRA adapter into its base weight, as a typed step.
//!
//! ```text
//! merge:    V = W + s B A;  n = ||V||_row;  W <- (m / n)[:, None] * V
//! unmerge:  W <- backup                                  (bit-exact)
//!       or  W <- (n / m)[:, None] * W - s B A             (needs m != 0)
//! ```
//!
//! The norms are those of the weight being merged (computed here, and kept
//! in the adapter's cache, which becomes fresh for this base), not an older
//! cache. As [`Lora::merge_into`](crate::lora::Lora::merge_into), the guard owns the weight until it
//! is restored, and the adapter cannot change meanwhile. Without a backup
//! the restore rounds three times per weight (the scale back, then `- s B
//! A`), so it drifts by a few units in the last place; a zero magnitude
//! would make it impossible, so a merge without a backup refuses one.

use super::Dora;
use crate::backend::{Accum, Backend, Op};
use crate::base::{Dense, FrozenLinear};
use crate::element::Element;
use crate::error::{Error, Operand, check_len};
use crate::matrix::{MatMut, MatRef, checked_len};

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]> + AsMut<[E]>> Dora<E, S, C> {
    /// Merges the adapter into `weight` (`[out, in]`, row-major): `W <- (m
    /// / ||W + s B A||_row) (W + s B A)`, and returns the guard that owns it
    /// until [`DoraMerged::unmerge`] (or its drop) restores it. The norm
    /// cache is set to the merged weight's norms.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Backup`); without a backup,
    /// [`Error::InvalidParameter`] (`"magnitude"`) when some `m_j = 0`
    /// (the unmerge would divide by it); all before anything is written.
    /// The backend's own errors (then `W` is restored from the backup if
    /// one was given).
    pub fn merge_into<'w, B: Backend<E> + ?Sized>(
        &'w mut self,
        backend: &'w B,
        weight: &'w mut [E],
        backup: Option<&'w mut [E]>,
    ) -> core::result::Result<DoraMerged<'w, E, S, C, B>, B::Error> {
        let (n_in, n_out) = (self.lora.in_features(), self.lora.out_features());
        let n = checked_len(n_out, n_in)?;
        check_len(Operand::Weight, n, weight.len())?;
        if let Some(bk) = &backup {
            check_len(Operand::Backup, n, bk.len())?;
        } else if self.magnitude.as_ref().iter().any(|m| m.to_f64() == 0.0) {
            return Err(Error::InvalidParameter {
                name: "magnitude",
                rule: "has a zero: merging without a backup could not be undone",
            }
            .into());
        }
        let mut backup = backup;
        if let Some(bk) = backup.as_deref_mut() {
            bk.copy_from_slice(weight);
        }
        let view = MatMut::new(&mut *weight, n_out, n_in)?;
        if let Err(e) = self.lora.add_delta(backend, view, 1.0) {
            if let Some(bk) = backup.as_deref() {
                weight.copy_from_slice(bk);
            }
            return Err(e);
        }
        // n_j = ||V_j||, then V_j *= m_j / n_j.
        self.fresh = false;
        for (j, row) in weight.chunks_exact_mut(n_in.max(1)).take(n_out).enumerate() {
            let sq: f64 = row.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            if let Some(dst) = self.norms.as_mut().get_mut(j) {
                *dst = E::from_f64(libm::sqrt(sq));
            }
            let ratio = self.ratio(j);
            for v in row.iter_mut() {
                *v = E::from_accum(v.to_accum() * ratio);
            }
        }
        self.fresh = true;
        Ok(DoraMerged { dora: self, backend, weight, backup, active: true })
    }
}

/// A base weight with a DoRA adapter merged into it: `W' = (m / n) (W + s
/// B A)`. It owns the `&mut W` borrow and the adapter's, so neither can be
/// used another way until it is restored. Dropping it restores `W` as
/// [`unmerge`](Self::unmerge) does (ignoring a backend error);
/// [`keep`](Self::keep) stays merged (PEFT's `merge_and_unload`).
#[must_use = "dropping the guard unmerges at once"]
pub struct DoraMerged<'w, E: Element, S: AsRef<[E]>, C: AsRef<[E]> + AsMut<[E]>, B: Backend<E> + ?Sized> {
    dora: &'w mut Dora<E, S, C>,
    backend: &'w B,
    weight: &'w mut [E],
    backup: Option<&'w mut [E]>,
    active: bool,
}

impl<'w, E: Element, S: AsRef<[E]>, C: AsRef<[E]> + AsMut<[E]>, B: Backend<E> + ?Sized> DoraMerged<'w, E, S, C, B> {
    /// The merged weight `W' [out, in]`.
    pub fn weight(&self) -> &[E] {
        self.weight
    }

    /// The merged weight as a read-only base (no bias; DoRA leaves the bias
    /// as it is: add it with [`Dense::with_bias`]).
    pub fn base(&self) -> Dense<'_, E> {
        let (n_out, n_in) = (self.dora.lora.out_features(), self.dora.lora.in_features());
        Dense::new(self.weight, n_out, n_in).unwrap_or_else(|_| Dense::empty())
    }

    /// `y = x W'^T`: the merged layer's forward, one matmul.
    ///
    /// # Errors
    /// As [`FrozenLinear::forward`].
    pub fn forward(&self, x: MatRef<'_, E>, y: MatMut<'_, E>) -> core::result::Result<(), B::Error> {
        self.base().forward(self.backend, x, y)
    }

    /// Restores `W`: from the backup bit for bit, or by `(n / m) W' - s B A`.
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
        if let Some(bk) = self.backup.as_deref() {
            self.weight.copy_from_slice(bk);
            return Ok(());
        }
        let (n_out, n_in) = (self.dora.lora.out_features(), self.dora.lora.in_features());
        for (j, row) in self.weight.chunks_exact_mut(n_in.max(1)).take(n_out).enumerate() {
            let m = self.dora.magnitude.as_ref().get(j).map_or(0.0, |v| v.to_f64());
            let n = self.dora.norms.as_ref().get(j).map_or(0.0, |v| v.to_f64());
            let back = <E::Accum as Element>::from_f64(n / m);
            for v in row.iter_mut() {
                *v = E::from_accum(v.to_accum() * back);
            }
        }
        let (a, b) = self.dora.lora.views()?;
        let minus_s = self.dora.lora.scale_times(-1.0);
        let view = MatMut::new(&mut *self.weight, n_out, n_in)?;
        self.backend.gemm(view, Accum::Add, b, Op::N, a, Op::N, minus_s)
    }
}

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]> + AsMut<[E]>, B: Backend<E> + ?Sized> Drop
    for DoraMerged<'_, E, S, C, B>
{
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]> + AsMut<[E]>, B: Backend<E> + ?Sized> core::fmt::Debug
    for DoraMerged<'_, E, S, C, B>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DoraMerged")
            .field("out_features", &self.dora.lora.out_features())
            .field("in_features", &self.dora.lora.in_features())
            .field("backup", &self.backup.is_some())
            .finish()
    }
}
