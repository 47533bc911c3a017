//! C3A (Chen et al., 2024): a block-circulant update of a frozen weight, as
//! PEFT's `c3a.C3ALinear` computes it.
//!
//! ```text
//! w [out/b, in/b, b]   (PEFT's c3a_kernel; b divides in and out)
//! dW[m b + j, n b + t] = w[m, n, (t - j) mod b] / in                  [out, in]
//! y = x W^T + b + x dW^T,   merged: W' = W + dW, b' = b
//! ```
//!
//! PEFT evaluates `x dW^T` with FFTs (`z_m = Re FFT(sum_n IFFT(x_n) *
//! FFT(w[m, n]))`, divided by the *full* input width `in`); element-wise
//! that is the circular cross-correlation above, which this module forms a
//! block of `b` rows of `dW` at a time and multiplies with the backend's
//! gemm. That costs a second dense product (about twice the base's), where
//! PEFT's FFT costs `out in / b` per token: the reason this method's
//! forward misses the `1.3 x LoRA` speed target (see the README).
//!
//! The backward, with `G = dL/dy`: `dx = G (W + dW)`, and with `P_m =
//! G_m^T x` (`G_m` the columns of output block `m`, `[b, in]`):
//!
//! ```text
//! dw[m, n, s] = sum_j P_m[j, n b + (j + s) mod b] / in
//! ```
//!
//! PEFT's `init_weights = true` gives `w = 0` (the base exactly); its
//! default `"xavier_uniform"` draws `w` at random, so a fresh PEFT C3A
//! adapter already changes the layer.
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};
use crate::rng::Rng;

/// A C3A adapter for a linear layer `in -> out` with blocks of `b`.
#[derive(Clone, Debug)]
pub struct C3a<E, S> {
    kernel: S,
    block: usize,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>> C3a<E, S> {
    /// A C3A adapter over `kernel` (`[out/b, in/b, b]`), which keeps its
    /// values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a block size of 0 or one not
    /// dividing both `in` and `out`; [`Error::ShapeMismatch`]
    /// (`Parameter`) for a kernel of the wrong length; [`Error::Overflow`].
    pub fn new(block: usize, in_features: usize, out_features: usize, kernel: S) -> Result<Self> {
        if block == 0 || !in_features.is_multiple_of(block) || !out_features.is_multiple_of(block) {
            return Err(Error::InvalidParameter { name: "block_size", rule: "must divide in and out" });
        }
        let len = checked_len(out_features / block, in_features)?;
        check_len(Operand::Parameter, len, kernel.as_ref().len())?;
        Ok(Self { kernel, block, in_features, out_features, _element: PhantomData })
    }

    /// The kernel `[out/b, in/b, b]`.
    pub fn kernel(&self) -> &[E] {
        self.kernel.as_ref()
    }

    /// The block size `b`.
    pub fn block_size(&self) -> usize {
        self.block
    }

    /// Trainable (`out in / b`) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::over_base(self.kernel.as_ref().len(), self.in_features, self.out_features, bias)
    }

    /// Row `m b + j` of `factor dW` into `row [in]` (replaced or added to,
    /// each entry rounded once): in column block `n` it is `w[m, n, :]`
    /// rotated right by `j`, `row[n b + t] = w[m, n, (t - j) mod b] / in`.
    fn fill_row(&self, m: usize, j: usize, row: &mut [E], accum: Accum, factor: f64) {
        let (b, nb) = (self.block, self.in_features / self.block);
        let scale = factor / self.in_features as f64;
        let kernel = self.kernel.as_ref();
        for (n, seg) in row.chunks_exact_mut(b).enumerate() {
            let w = kernel.get((m * nb + n) * b..(m * nb + n + 1) * b).unwrap_or(&[]);
            // seg[j..] = w[..b - j], seg[..j] = w[b - j..].
            let (head, tail) = seg.split_at_mut(j % b);
            let (w_hi, w_lo) = w.split_at(b - j % b);
            for (v, wv) in tail.iter_mut().zip(w_hi).chain(head.iter_mut().zip(w_lo)) {
                accum.store_f64(v, scale * wv.to_f64());
            }
        }
    }

    /// Rows `m b .. (m + 1) b` of `dW` into `dst [b, in]` (replaced).
    fn block_rows(&self, m: usize, dst: &mut MatMut<'_, E>) {
        for (j, row) in dst.row_iter_mut().enumerate() {
            self.fill_row(m, j, row, Accum::Replace, 1.0);
        }
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for C3a<E, S> {
    /// `dL/dw`, as the kernel.
    type Grads<'g>
        = &'g mut [E]
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// `b in` (one block of rows of `dW`; saturating).
    fn forward_scratch_len(&self, _tokens: usize) -> usize {
        self.block.saturating_mul(self.in_features)
    }

    /// `2 b in` (a block of `dW`, `P_m`; saturating).
    fn backward_scratch_len(&self, _tokens: usize) -> usize {
        self.block.saturating_mul(self.in_features).saturating_mul(2)
    }

    /// The kernel's length (`Gradient`).
    fn check_grads(&self, grads: &&mut [E]) -> Result<()> {
        check_len(Operand::Gradient, self.kernel.as_ref().len(), grads.len())
    }

    /// `y = x W^T + b + x dW^T`, a block of `b` outputs at a time.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        base.forward(backend, x, y.rb_mut())?;
        let (b, n_in) = (self.block, self.in_features);
        let one = <E::Accum as Element>::from_f64(1.0);
        let d_buf = scratch.get_mut(..checked_len(b, n_in)?).unwrap_or(&mut []);
        for m in 0..self.out_features / b {
            let mut d = MatMut::new(&mut *d_buf, b, n_in)?;
            self.block_rows(m, &mut d);
            let ym = y.cols_range_mut(m * b, b).ok_or(Error::Overflow)?;
            backend.gemm(ym, Accum::Add, x, Op::N, d.as_ref(), Op::T, one)?;
        }
        Ok(())
    }

    /// Accumulates `dL/dw` into `grads` and, if `grad_x` is given, writes
    /// `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, mut grad_x, grads, scratch } = pass;
        let (b, n_in) = (self.block, self.in_features);
        let (nb, scale) = (n_in / b, 1.0 / n_in as f64);
        let one = <E::Accum as Element>::from_f64(1.0);
        if let Some(gx) = grad_x.as_mut() {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
        }
        let len = checked_len(b, n_in)?;
        let (d_buf, rest) = split_scratch(scratch, len)?;
        let p_buf = rest.get_mut(..len).unwrap_or(&mut []);
        for m in 0..self.out_features / b {
            let gm = grad_y.cols_range(m * b, b).ok_or(Error::Overflow)?;
            // P_m = G_m^T x; dw[m, n, s] += sum_j P_m[j, n b + (j + s) mod b] / in.
            let mut p = MatMut::new(&mut *p_buf, b, n_in)?;
            backend.gemm(p.rb_mut(), Accum::Replace, gm, Op::T, x, Op::N, one)?;
            for n in 0..nb {
                for s in 0..b {
                    let sum: f64 =
                        (0..b).map(|j| p.as_ref().get(j, n * b + (j + s) % b).map_or(0.0, |v| v.to_f64())).sum();
                    if let Some(g) = grads.get_mut((m * nb + n) * b + s) {
                        *g = E::from_f64(g.to_f64() + sum * scale);
                    }
                }
            }
            if let Some(gx) = grad_x.as_mut() {
                let mut d = MatMut::new(&mut *d_buf, b, n_in)?;
                self.block_rows(m, &mut d);
                backend.gemm(gx.rb_mut(), Accum::Add, gm, Op::N, d.as_ref(), Op::N, one)?;
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> DeltaRows<E> for C3a<E, S> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Rows `start..start + n` of `factor * dW`.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, _backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, mut dst, accum, factor, .. } = block;
        let b = self.block;
        for (k, row) in dst.row_iter_mut().enumerate() {
            self.fill_row((start + k) / b, (start + k) % b, row, accum, factor);
        }
        Ok(())
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>] C3a<E, S>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> C3a<E, S> {
    /// PEFT's `init_weights = true`: `w = 0` (the base exactly).
    pub fn init_adapter(&mut self) {
        self.kernel.as_mut().fill(E::ZERO);
    }

    /// PEFT's default `init_weights = "xavier_uniform"`: `U(-a, a)`, `a =
    /// sqrt(6 / (in + out))`, drawn from `rng` rather than torch's
    /// generator.
    pub fn init_xavier(&mut self, rng: &mut Rng) {
        let a = libm::sqrt(6.0 / (self.in_features + self.out_features).max(1) as f64);
        rng.fill_uniform(self.kernel.as_mut(), -a, a);
    }

    /// The kernel mutably, for an optimizer step or a load.
    pub fn kernel_mut(&mut self) -> &mut [E] {
        self.kernel.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;
    use crate::matrix::MatRef;

    #[test]
    fn circulant_by_hand() {
        // in = out = b = 2, w = [1, 2]: dW[j, t] = w[(t - j) mod 2] / 2 = [[0.5, 1], [1, 0.5]].
        let c3a = C3a::new(2, 2, 2, [1.0f64, 2.0]).unwrap();
        let mut dw = [0.0; 4];
        c3a.delta_rows(&Reference, 0, MatMut::new(&mut dw, 2, 2).unwrap(), Accum::Replace, 1.0, &mut []).unwrap();
        assert_eq!(dw, [0.5, 1.0, 1.0, 0.5]);
        // W = 0, x = [1, 3]: y = x dW^T = [0.5 + 3, 1 + 1.5] = [3.5, 2.5].
        let w = [0.0; 4];
        let base = Dense::new(&w, 2, 2).unwrap();
        let mut y = [0.0; 2];
        let mut sc = [0.0; 4];
        let x = MatRef::new(&[1.0, 3.0], 1, 2).unwrap();
        c3a.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [3.5, 2.5]);
        assert!(C3a::new(3, 2, 2, [0.0f64; 2]).is_err());
    }
}
