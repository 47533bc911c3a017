//! Bottleneck adapter backward pass. (its docs are in the [parent module](super))

use super::BottleneckAdapter;
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::Element;
use crate::error::{Operand, check_len, check_scratch, scratch_pair};
use crate::matrix::{MatMut, MatRef};

/// Gradient buffers of an adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct AdapterGrads<'g, E> {
    /// `dL/dW_down [m, d]`.
    pub w_down: &'g mut [E],
    /// `dL/db_down [m]`.
    pub b_down: &'g mut [E],
    /// `dL/dW_up [d, m]`.
    pub w_up: &'g mut [E],
    /// `dL/db_up [d]`.
    pub b_up: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> BottleneckAdapter<E, S> {
    /// Scratch [`backward`](Self::backward) needs: `2 * tokens * m`.
    pub fn backward_scratch_len(&self, tokens: usize) -> usize {
        super::backward_scratch_len(tokens, self.width)
    }

    /// Accumulates the four parameter gradients into `grads` and, if given,
    /// writes `dL/dx` into `grad_x` (overwriting).
    ///
    /// Shapes: `x [tokens, d]` (the forward input), `grad_h [tokens, d]`,
    /// `grad_x [tokens, d]`, `grads` as the parameters.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Input`, `GradOutput`, `GradInput`,
    /// `AdapterDown`, `AdapterUp`, `AdapterBias`), [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall),
    /// before anything is written.
    pub fn backward<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        grad_h: MatRef<'_, E>,
        grad_x: Option<MatMut<'_, E>>,
        grads: AdapterGrads<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (d, m, tokens) = (self.dim, self.width, x.rows());
        self.check_rows(&x, grad_h.rows(), grad_h.cols(), Operand::GradOutput)?;
        if let Some(gx) = &grad_x {
            self.check_rows(&x, gx.rows(), gx.cols(), Operand::GradInput)?;
        }
        check_len(Operand::AdapterDown, self.w_down.as_ref().len(), grads.w_down.len())?;
        check_len(Operand::AdapterBias, m, grads.b_down.len())?;
        check_len(Operand::AdapterUp, self.w_up.as_ref().len(), grads.w_up.len())?;
        check_len(Operand::AdapterBias, d, grads.b_up.len())?;
        let need = self.backward_scratch_len(tokens);
        check_scratch(need, scratch.len())?;

        let one = <E::Accum as Element>::from_f64(1.0);
        let s = <E::Accum as Element>::from_f64(self.scale);
        let (z_buf, a_buf) = scratch_pair(scratch, need / 2)?;
        let mut z = MatMut::new(z_buf, tokens, m)?;
        let mut a = MatMut::new(a_buf, tokens, m)?;
        // z = pre-activation; a = act(z).
        self.bottleneck(backend, x, &mut z, false)?;
        for (a_row, z_row) in a.row_iter_mut().zip(z.as_ref().row_iter()) {
            for (av, &zv) in a_row.iter_mut().zip(z_row) {
                *av = E::from_accum(self.activation.apply(zv.to_accum()));
            }
        }
        // db_up += s colsum(G); dW_up += s G^T a.
        add_colsum(grads.b_up, &grad_h, s);
        backend.gemm(MatMut::new(grads.w_up, d, m)?, Accum::Add, grad_h, Op::T, a.as_ref(), Op::N, s)?;
        // da = s G W_up (into a's buffer: a is no longer needed).
        let w_up = MatRef::new(self.w_up.as_ref(), d, m)?;
        backend.gemm(a.rb_mut(), Accum::Replace, grad_h, Op::N, w_up, Op::N, s)?;
        // dz = da * act'(z) (into z's buffer).
        for (z_row, da_row) in z.row_iter_mut().zip(a.as_ref().row_iter()) {
            for (zv, &dav) in z_row.iter_mut().zip(da_row) {
                *zv = E::from_accum(dav.to_accum() * self.activation.derivative(zv.to_accum()));
            }
        }
        let dz = z.as_ref();
        // db_down += colsum(dz); dW_down += dz^T x.
        add_colsum(grads.b_down, &dz, one);
        backend.gemm(MatMut::new(grads.w_down, m, d)?, Accum::Add, dz, Op::T, x, Op::N, one)?;
        // dx = G + dz W_down.
        if let Some(mut gx) = grad_x {
            for (gx_row, g_row) in gx.row_iter_mut().zip(grad_h.row_iter()) {
                for (o, &v) in gx_row.iter_mut().zip(g_row) {
                    *o = v;
                }
            }
            let w_down = MatRef::new(self.w_down.as_ref(), m, d)?;
            backend.gemm(gx, Accum::Add, dz, Op::N, w_down, Op::N, one)?;
        }
        Ok(())
    }
}

/// `acc[j] += s * sum_i g[i, j]`, summed in the accumulation type and
/// rounded once.
pub(crate) fn add_colsum<E: Element>(acc: &mut [E], g: &MatRef<'_, E>, s: E::Accum) {
    for (j, out) in acc.iter_mut().enumerate() {
        let mut sum = E::Accum::ZERO;
        for row in g.row_iter() {
            if let Some(v) = row.get(j) {
                sum += v.to_accum();
            }
        }
        *out = E::from_accum(out.to_accum() + s * sum);
    }
}
