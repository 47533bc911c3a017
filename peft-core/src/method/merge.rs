//! [`Merged`]: the one merge guard, for every [`WeightUpdate`]. (its docs are in the [parent module](super))

use super::WeightUpdate;
use crate::backend::{Backend, Outcome};
use crate::base::Dense;
use crate::element::Element;
use crate::error::{Operand, check_len, check_scratch};
use crate::matrix::{MatMut, MatRef, checked_len};

use super::Direction;

/// The weight (and bias, and backup) a merge writes: `weight [rows,
/// cols]` row-major, `bias [rows]` (merged only by an update that
/// [touches the bias](WeightUpdate::touches_bias)), `backup` (the weight's
/// length, plus the bias's when the bias is merged) filled by the merge
/// and used to restore bit for bit.
#[derive(Debug)]
pub struct MergeTarget<'w, E> {
    weight: &'w mut [E],
    bias: Option<&'w mut [E]>,
    backup: Option<&'w mut [E]>,
}

impl<'w, E: Element> MergeTarget<'w, E> {
    /// A weight alone (no bias, no backup).
    pub fn new(weight: &'w mut [E]) -> Self {
        Self { weight, bias: None, backup: None }
    }

    /// With the layer's bias, which an update that touches it scales too.
    pub fn with_bias(mut self, bias: &'w mut [E]) -> Self {
        self.bias = Some(bias);
        self
    }

    /// With a backup buffer, which makes the restore bit-exact.
    pub fn with_backup(mut self, backup: &'w mut [E]) -> Self {
        self.backup = Some(backup);
        self
    }

    /// With the layer's bias when one is given.
    pub fn with_bias_opt(mut self, bias: Option<&'w mut [E]>) -> Self {
        self.bias = bias;
        self
    }

    /// With a backup when one is given.
    pub fn with_backup_opt(mut self, backup: Option<&'w mut [E]>) -> Self {
        self.backup = backup;
        self
    }
}

/// A weight with a [`WeightUpdate`] merged in: owns the borrows until
/// restored; dropping it restores (as [`unmerge`](Self::unmerge));
/// [`keep`](Self::keep) stays merged.
#[must_use = "dropping the guard unmerges at once"]
pub struct Merged<'w, E: Element, U: WeightUpdate<E> + ?Sized, B: Backend<E> + ?Sized> {
    update: &'w U,
    backend: &'w B,
    weight: &'w mut [E],
    bias: Option<&'w mut [E]>,
    backup: Option<&'w mut [E]>,
    scratch: &'w mut [E],
    active: bool,
}

impl<'w, E: Element, U: WeightUpdate<E> + ?Sized, B: Backend<E> + ?Sized> Merged<'w, E, U, B> {
    /// Checks every length, fills the backup, merges (see
    /// [`WeightUpdate::merge_into`], whose errors these are).
    pub(super) fn new(
        update: &'w U,
        backend: &'w B,
        target: MergeTarget<'w, E>,
        scratch: &'w mut [E],
    ) -> core::result::Result<Self, B::Error> {
        let MergeTarget { weight, bias, mut backup } = target;
        let (rows, cols) = update.weight_dims();
        let n = checked_len(rows, cols)?;
        check_len(Operand::Weight, n, weight.len())?;
        let mut bias = if update.touches_bias() { bias } else { None };
        if let Some(b) = &bias {
            check_len(Operand::Bias, rows, b.len())?;
        }
        let bias_len = bias.as_ref().map_or(0, |b| b.len());
        match &backup {
            Some(bk) => check_len(Operand::Backup, n.saturating_add(bias_len), bk.len())?,
            None => update.check_invertible()?,
        }
        check_scratch(update.update_scratch_len(rows), scratch.len())?;
        if let Some(bk) = backup.as_deref_mut() {
            let (bw, bb) = bk.split_at_mut(n);
            bw.copy_from_slice(weight);
            if let Some(b) = bias.as_deref() {
                bb.copy_from_slice(b);
            }
        }
        let view = MatMut::new(&mut *weight, rows, cols)?;
        if let Err(e) = update.update_rows(backend, 0, view, bias.as_deref_mut(), Direction::Merge, scratch) {
            if let Some(bk) = backup.as_deref() {
                let (bw, bb) = bk.split_at(n);
                weight.copy_from_slice(bw);
                if let Some(b) = bias.as_deref_mut() {
                    b.copy_from_slice(bb);
                }
            }
            return Err(e);
        }
        Ok(Self { update, backend, weight, bias, backup, scratch, active: true })
    }

    /// The merged weight `W'`.
    pub fn weight(&self) -> &[E] {
        self.weight
    }

    /// The merged bias, when one was merged.
    pub fn bias(&self) -> Option<&[E]> {
        self.bias.as_deref()
    }

    /// The merged weight as a read-only base, with the merged bias when
    /// one was merged (any other bias is the caller's, unchanged).
    pub fn base(&self) -> Dense<'_, E> {
        let (rows, cols) = self.update.weight_dims();
        // The lengths were checked when the guard was made.
        let base = Dense::new(self.weight, rows, cols).unwrap_or_else(|_| Dense::empty());
        match self.bias.as_deref() {
            Some(b) => base.with_bias(b).unwrap_or(base),
            None => base,
        }
    }

    /// `y = x W'^T (+ b')`: the merged layer's forward, one matmul.
    ///
    /// # Errors
    /// As [`FrozenLinear::forward`](crate::base::FrozenLinear::forward).
    pub fn forward(&self, x: MatRef<'_, E>, y: MatMut<'_, E>) -> Outcome<E, B> {
        crate::base::FrozenLinear::forward(&self.base(), self.backend, x, y)
    }

    /// Restores `W` (and `b`): from the backup bit for bit, or by the
    /// inverse update.
    ///
    /// # Errors
    /// The backend's own errors when there is no backup (then `W` is
    /// unspecified).
    pub fn unmerge(mut self) -> Outcome<E, B> {
        self.restore()
    }

    /// Leaves the weight merged for good and gives it back.
    pub fn keep(mut self) -> &'w mut [E] {
        self.active = false;
        core::mem::take(&mut self.weight)
    }

    fn restore(&mut self) -> Outcome<E, B> {
        if !core::mem::replace(&mut self.active, false) {
            return Ok(());
        }
        match self.backup.as_deref() {
            Some(bk) => {
                let (bw, bb) = bk.split_at(self.weight.len().min(bk.len()));
                self.weight.copy_from_slice(bw);
                if let Some(b) = self.bias.as_deref_mut() {
                    // Same length: checked when the guard was made.
                    b.iter_mut().zip(bb).for_each(|(v, s)| *v = *s);
                }
                Ok(())
            }
            None => {
                let (rows, cols) = self.update.weight_dims();
                let view = MatMut::new(&mut *self.weight, rows, cols)?;
                let bias = self.bias.as_deref_mut();
                self.update.update_rows(self.backend, 0, view, bias, Direction::Unmerge, self.scratch)
            }
        }
    }
}

impl<E: Element, U: WeightUpdate<E> + ?Sized, B: Backend<E> + ?Sized> Drop for Merged<'_, E, U, B> {
    fn drop(&mut self) {
        // A backend error cannot be reported from a drop; `unmerge` reports it.
        let _ = self.restore();
    }
}

impl<E: Element, U: WeightUpdate<E> + ?Sized, B: Backend<E> + ?Sized> core::fmt::Debug for Merged<'_, E, U, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Merged")
            .field("dims", &self.update.weight_dims())
            .field("kind", &self.update.kind())
            .field("bias", &self.bias.is_some())
            .field("backup", &self.backup.is_some())
            .finish()
    }
}
