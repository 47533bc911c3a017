//! Mixed-adapter batches: each sequence of a batch names its adapter (or (its docs are in the [parent module](super))
use super::{AdapterSet, AdapterSlot, SlotStore};
use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_io, check_len, check_scratch};
use crate::lora::LoraGrads;
use crate::matrix::{MatMut, MatRef};
use crate::method::check_backward_io;

/// One sequence of a mixed batch: its number of rows and the slot index of
/// its adapter (`None`: the base alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Rows (tokens) of the sequence.
    pub rows: usize,
    /// The adapter's slot index ([`AdapterSet::index_of`]), or `None`.
    pub adapter: Option<usize>,
}

impl Route {
    /// `rows` rows through adapter slot `index`.
    pub const fn adapter(rows: usize, index: usize) -> Self {
        Self { rows, adapter: Some(index) }
    }

    /// `rows` rows through the base alone.
    pub const fn base(rows: usize) -> Self {
        Self { rows, adapter: None }
    }
}

impl<K: AsRef<str>, E: Element, S: AsRef<[E]>, C: SlotStore<AdapterSlot<K, E, S>>> AdapterSet<K, E, S, C> {
    /// Scratch [`forward_mixed`](Self::forward_mixed) needs: the largest
    /// `rows * r` over the routes that name an adapter (0 for an unknown
    /// one, which the pass refuses).
    pub fn mixed_forward_scratch_len(&self, routes: &[Route]) -> usize {
        routes.iter().filter_map(|r| Some(r.rows.saturating_mul(self.slot(r.adapter?)?.lora.rank()))).max().unwrap_or(0)
    }

    /// Scratch [`backward_mixed`](Self::backward_mixed) needs: twice
    /// [`mixed_forward_scratch_len`](Self::mixed_forward_scratch_len).
    pub fn mixed_backward_scratch_len(&self, routes: &[Route]) -> usize {
        self.mixed_forward_scratch_len(routes).saturating_mul(2)
    }

    /// The forward of a mixed batch (see the [module docs](super)).
    ///
    /// Shapes: `x [tokens, in]`, `y [tokens, out]` (overwritten), the
    /// routes' rows summing to `tokens`; scratch at least
    /// [`mixed_forward_scratch_len`](Self::mixed_forward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Input`, `Output`, `Routes`),
    /// [`Error::UnknownAdapter`] for a route naming a free slot,
    /// [`Error::ScratchTooSmall`], before anything is written; the
    /// backend's own errors.
    pub fn forward_mixed<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        mut y: MatMut<'_, E>,
        routes: &[Route],
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        self.check_base(base)?;
        check_io(x.rows(), x.cols(), self.in_features, Operand::Output, y.rows(), y.cols(), self.out_features)?;
        self.check_routes(routes, x.rows())?;
        check_scratch(self.mixed_forward_scratch_len(routes), scratch.len())?;
        base.forward(backend, x, y.rb_mut())?;
        let mut start = 0;
        for route in routes {
            if let Some(slot) = route.adapter.and_then(|i| self.slot(i)) {
                let (xs, ys) = rows_of(x, y.rb_mut(), start, route.rows)?;
                slot.lora.add_low_rank(backend, xs, ys, slot.multiplier, scratch)?;
            }
            start += route.rows;
        }
        Ok(())
    }

    /// The backward of [`forward_mixed`](Self::forward_mixed): accumulates
    /// (`+=`) the gradients of each routed adapter whose entry in `grads`
    /// is `Some` (`grads[i]` belongs to slot `i`), over that adapter's
    /// rows only, and writes `dL/dx` into `grad_x` if given.
    ///
    /// Shapes: as [`forward_mixed`](Self::forward_mixed), `grad_y [tokens,
    /// out]`, `grad_x [tokens, in]`, `grads.len()` equal to
    /// [`slot_count`](Self::slot_count); scratch at least
    /// [`mixed_backward_scratch_len`](Self::mixed_backward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (as [`backward`](Self::backward), and
    /// `Routes`), [`Error::UnknownAdapter`], [`Error::ScratchTooSmall`],
    /// before anything is written; the backend's own errors.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_mixed<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        grad_x: Option<MatMut<'_, E>>,
        grads: &mut [Option<LoraGrads<'_, E>>],
        routes: &[Route],
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let tokens = x.rows();
        self.check_base(base)?;
        check_backward_io((self.in_features, self.out_features), &x, &grad_y, grad_x.as_ref())?;
        self.check_routes(routes, tokens)?;
        self.check_grads(grads, |i| routes.iter().any(|r| r.adapter == Some(i)))?;
        let need = self.mixed_backward_scratch_len(routes);
        check_scratch(need, scratch.len())?;
        let mut grad_x = grad_x;
        if let Some(gx) = grad_x.as_mut() {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
        }
        let mut start = 0;
        for route in routes {
            if let Some((i, slot)) = route.adapter.and_then(|i| Some((i, self.slot(i)?))) {
                let n = route.rows;
                let xs = x.rows_range(start, n).ok_or(Error::Overflow)?;
                let gs = grad_y.rows_range(start, n).ok_or(Error::Overflow)?;
                let gx = match grad_x.as_mut() {
                    Some(gx) => Some(gx.rb_mut().into_rows_range(start, n).ok_or(Error::Overflow)?),
                    None => None,
                };
                let g = grads.get_mut(i).and_then(Option::as_mut).map(|g| LoraGrads::new(&mut *g.a, &mut *g.b));
                slot.lora.low_rank_backward(backend, xs, gs, gx, g, slot.multiplier, scratch)?;
            }
            start += route.rows;
        }
        Ok(())
    }

    /// `Ok` if the routes' rows sum to `tokens` and each names a held
    /// adapter or none.
    fn check_routes(&self, routes: &[Route], tokens: usize) -> Result<()> {
        let mut total = 0usize;
        for r in routes {
            total = total.checked_add(r.rows).ok_or(Error::Overflow)?;
            if r.adapter.is_some_and(|i| self.slot(i).is_none()) {
                return Err(Error::UnknownAdapter);
            }
        }
        check_len(Operand::Routes, tokens, total)
    }
}

/// Rows `start..start + n` of `x` and of `y`.
fn rows_of<'x, 'y, E: Element>(
    x: MatRef<'x, E>,
    y: MatMut<'y, E>,
    start: usize,
    n: usize,
) -> Result<(MatRef<'x, E>, MatMut<'y, E>)> {
    let xs = x.rows_range(start, n).ok_or(Error::Overflow)?;
    let ys = y.into_rows_range(start, n).ok_or(Error::Overflow)?;
    Ok((xs, ys))
}
