//! The set's forward and backward over its active adapters. (its docs are in the [parent module](super))
use super::{AdapterSet, AdapterSlot, SlotStore};
use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Operand, check_io, check_len, check_scratch};
use crate::lora::LoraGrads;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::check_backward_io;

impl<K: AsRef<str>, E: Element, S: AsRef<[E]>, C: SlotStore<AdapterSlot<K, E, S>>> AdapterSet<K, E, S, C> {
    /// `y = x W^T + b + sum_i m_i s_i (x A_i^T) B_i^T` over the active
    /// adapters; with none active, the base's own output.
    ///
    /// Shapes: `base` `in -> out` like the set, `x [tokens, in]`, `y
    /// [tokens, out]` (overwritten), `scratch` at least
    /// [`forward_scratch_len(tokens)`](Self::forward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight`,
    /// `Input`, `Output`), [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall), before anything is
    /// written; the backend's own errors.
    pub fn forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        mut y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        self.check_base(base)?;
        check_io(x.rows(), x.cols(), self.in_features, Operand::Output, y.rows(), y.cols(), self.out_features)?;
        check_scratch(self.forward_scratch_len(x.rows()), scratch.len())?;
        base.forward(backend, x, y.rb_mut())?;
        for (_, slot) in self.iter().filter(|(_, s)| s.active) {
            slot.lora.add_low_rank(backend, x, y.rb_mut(), slot.multiplier, scratch)?;
        }
        Ok(())
    }

    /// The backward of [`forward`](Self::forward): accumulates (`+=`) the
    /// gradients of every active adapter whose entry in `grads` is `Some`
    /// (`grads[i]` belongs to slot `i`; `None` keeps that adapter frozen),
    /// and writes `dL/dx = G W + sum_i m_i s_i (G B_i) A_i` over all
    /// active adapters into `grad_x` if given. Inactive adapters'
    /// gradients are not touched.
    ///
    /// Shapes: as [`LinearAdapter::backward`](crate::method::LinearAdapter::backward);
    /// `grads.len()` equals [`slot_count`](Self::slot_count); scratch at
    /// least [`backward_scratch_len(tokens)`](Self::backward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight`,
    /// `Input`, `GradOutput`, `GradInput`, `AdapterGrads`, `GradA`,
    /// `GradB`), [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall),
    /// before anything is written; the backend's own errors.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        grad_x: Option<MatMut<'_, E>>,
        grads: &mut [Option<LoraGrads<'_, E>>],
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let tokens = x.rows();
        self.check_base(base)?;
        check_backward_io((self.in_features, self.out_features), &x, &grad_y, grad_x.as_ref())?;
        self.check_grads(grads, |i| self.slot(i).is_some_and(|s| s.active))?;
        let need = self.backward_scratch_len(tokens);
        check_scratch(need, scratch.len())?;
        let mut grad_x = grad_x;
        if let Some(gx) = grad_x.as_mut() {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
        }
        for (i, slot) in self.iter().filter(|(_, s)| s.active) {
            let g = grads.get_mut(i).and_then(Option::as_mut).map(|g| LoraGrads::new(&mut *g.a, &mut *g.b));
            let gx = grad_x.as_mut().map(MatMut::rb_mut);
            slot.lora.low_rank_backward(backend, x, grad_y, gx, g, slot.multiplier, scratch)?;
        }
        Ok(())
    }

    /// `Ok` if `base` is an `in -> out` layer like the set.
    pub(super) fn check_base<L: FrozenLinear<E> + ?Sized>(&self, base: &L) -> crate::Result<()> {
        check_len(Operand::Weight, self.in_features, base.in_features())?;
        check_len(Operand::Weight, self.out_features, base.out_features())
    }

    /// Checks `grads` (one entry per slot) for the slots `used` says will
    /// be trained: the lengths of `dA [r, in]` and `dB [out, r]`.
    pub(super) fn check_grads(
        &self,
        grads: &[Option<LoraGrads<'_, E>>],
        used: impl Fn(usize) -> bool,
    ) -> crate::Result<()> {
        check_len(Operand::AdapterGrads, self.slot_count(), grads.len())?;
        for (i, slot) in self.iter() {
            if let (true, Some(Some(g))) = (used(i), grads.get(i)) {
                let (r, n_in, n_out) = (slot.lora.rank(), slot.lora.in_features(), slot.lora.out_features());
                check_len(Operand::GradA, checked_len(r, n_in)?, g.a.len())?;
                check_len(Operand::GradB, checked_len(n_out, r)?, g.b.len())?;
            }
        }
        Ok(())
    }
}
