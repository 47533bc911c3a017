use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::Element;
use crate::error::{Operand, Result, check_io, check_len, check_shape};
use crate::matrix::{MatMut, MatRef, checked_len};

/// The operands of one product with a frozen `W`, checked by
/// [`FrozenLinear::apply`] (`dst (=|+=) src W^T`, `src [tokens, in]`,
/// `dst [tokens, out]`) or [`FrozenLinear::apply_transpose`] (`dst (=|+=)
/// src W`, `src [tokens, out]`, `dst [tokens, in]`).
#[derive(Debug)]
pub struct Product<'a, E> {
    /// The left operand.
    pub src: MatRef<'a, E>,
    /// The destination; with [`Accum::Replace`] never read.
    pub dst: MatMut<'a, E>,
    /// Overwrite or add.
    pub accum: Accum,
}

/// A frozen linear layer `y = x W^T + b`, `W [out, in]`, read only.
///
/// Implementors compute the two products with `W` that forward and
/// backward passes need; they check shapes first and write nothing on a
/// shape error.
///
/// The frozen base: a linear layer that adapters only ever read.
///
/// ```text
/// y = x W^T + b        x [tokens, in]   W [out, in]   b [out]   y [tokens, out]
/// ```
///
/// Every method of this crate takes its base through [`FrozenLinear`], a
/// shared borrow: forward and backward read `W`, never write it, and compute
/// no gradient for it. So one base serves any number of adapters and threads
/// at once, and a base can live in flash (`static W: [f32; N]`).
///
/// The trait names the products the methods need, not the storage: [`Dense`]
/// is `W` as a row-major slice of the element type; bases stored in another
/// type (half precision, int8 rows, quantized blocks) implement the same
/// products with their own kernels and every method runs over them
/// unchanged.
///
/// The one step that writes `W` is a merge, and it changes the type: see
/// [`method::Merged`](crate::method::Merged).
pub trait FrozenLinear<E: Element> {
    /// Input features `in`.
    fn in_features(&self) -> usize;

    /// Output features `out`.
    fn out_features(&self) -> usize;

    /// The bias `b [out]`, if the layer has one.
    fn bias(&self) -> Option<&[E]>;

    /// `y (=|+=) x W^T`, without the bias.
    ///
    /// Shapes: `x [tokens, in]`, `y [tokens, out]`; with
    /// [`Accum::Replace`] `y` is never read.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Input`,
    /// `Output`) before anything is written; the backend's own errors.
    fn apply<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        y: MatMut<'_, E>,
        accum: Accum,
    ) -> Outcome<E, B> {
        check_io(x.rows(), x.cols(), self.in_features(), Operand::Output, y.rows(), y.cols(), self.out_features())?;
        self.run_apply(backend, Product { src: x, dst: y, accum })
    }

    /// `grad_x (=|+=) grad_y W`: the input gradient of `x W^T`.
    ///
    /// Shapes: `grad_y [tokens, out]`, `grad_x [tokens, in]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`GradOutput`,
    /// `GradInput`) before anything is written; the backend's own errors.
    fn apply_transpose<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        grad_y: MatRef<'_, E>,
        grad_x: MatMut<'_, E>,
        accum: Accum,
    ) -> Outcome<E, B> {
        let t = grad_y.rows();
        check_shape(Operand::GradOutput, t, grad_y.cols(), t, self.out_features())?;
        check_shape(Operand::GradInput, grad_x.rows(), grad_x.cols(), t, self.in_features())?;
        self.run_apply_transpose(backend, Product { src: grad_y, dst: grad_x, accum })
    }

    /// The storage's `dst (=|+=) src W^T`, called by
    /// [`apply`](Self::apply) once the shapes are checked.
    ///
    /// # Errors
    /// The backend's own errors.
    fn run_apply<B: Backend<E> + ?Sized>(&self, backend: &B, product: Product<'_, E>) -> Outcome<E, B>;

    /// The storage's `dst (=|+=) src W`, called by
    /// [`apply_transpose`](Self::apply_transpose) once the shapes are
    /// checked.
    ///
    /// # Errors
    /// The backend's own errors.
    fn run_apply_transpose<B: Backend<E> + ?Sized>(&self, backend: &B, product: Product<'_, E>) -> Outcome<E, B>;

    /// Scratch [`rows`](Self::rows) needs for `n` rows: `n * out` for the
    /// provided version (the unit rows it multiplies), 0 for [`Dense`].
    fn rows_scratch_len(&self, n: usize) -> usize {
        n.saturating_mul(self.out_features())
    }

    /// Rows `start..start + n` of `W` into `dst [n, in]` (overwritten), in
    /// the element type: what DoRA reads to form the row norms of
    /// `W + s B A`.
    ///
    /// The provided version computes them as `U W` through
    /// [`apply_transpose`](Self::apply_transpose), `U [n, out]` the unit
    /// rows `e_start..e_start+n` (in `scratch`): exact (each element is
    /// `1 * w` plus zeros), for any storage, at the cost of a product. A
    /// storage that holds its rows (as [`Dense`]) copies or dequantizes them
    /// instead.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight` for
    /// rows past `out`, `Dst` for `dst`), [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall), before
    /// anything is written; the backend's own errors.
    fn rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        start: usize,
        dst: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (n, n_out) = (dst.rows(), self.out_features());
        check_rows(start, n, n_out, self.in_features(), &dst)?;
        let need = self.rows_scratch_len(n);
        let len = scratch.len();
        let u = scratch.get_mut(..need).ok_or(crate::Error::ScratchTooSmall { needed: need, len })?;
        u.fill(E::ZERO);
        let one = <E as Element>::from_f64(1.0);
        for (k, row) in u.chunks_exact_mut(n_out.max(1)).enumerate() {
            if let Some(v) = row.get_mut(start + k) {
                *v = one;
            }
        }
        self.apply_transpose(backend, MatRef::new(u, n, n_out)?, dst, Accum::Replace)
    }

    /// `y = x W^T + b`: the base layer's own forward.
    ///
    /// # Errors
    /// As [`apply`](Self::apply).
    fn forward<B: Backend<E> + ?Sized>(&self, backend: &B, x: MatRef<'_, E>, mut y: MatMut<'_, E>) -> Outcome<E, B> {
        self.apply(backend, x, y.rb_mut(), Accum::Replace)?;
        if let Some(bias) = self.bias() {
            add_bias(&mut y, bias);
        }
        Ok(())
    }
}

/// A dense base: `W [out, in]` as a row-major slice of the element type,
/// and an optional bias, both borrowed (from the heap, the stack or a
/// `static` in flash).
///
/// ```
/// use peft_core::{Dense, FrozenLinear};
/// use peft_core::{MatMut, MatRef, Reference};
///
/// static W: [f32; 6] = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // [3, 2], read-only
/// let base = Dense::new(&W, 3, 2)?;
/// let mut y = [0.0f32; 3];
/// base.forward(&Reference, MatRef::new(&[2.0, 3.0], 1, 2)?, MatMut::new(&mut y, 1, 3)?)?;
/// assert_eq!(y, [2.0, 3.0, 5.0]);
/// # Ok::<(), peft_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Dense<'a, E> {
    weight: MatRef<'a, E>,
    bias: Option<&'a [E]>,
}

impl<'a, E: Element> Dense<'a, E> {
    /// `W [out, in]` from a dense row-major slice of exactly `out * in`
    /// elements, without a bias.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight`);
    /// [`Error::Overflow`](crate::Error::Overflow).
    pub fn new(weight: &'a [E], out_features: usize, in_features: usize) -> Result<Self> {
        check_len(Operand::Weight, checked_len(out_features, in_features)?, weight.len())?;
        Ok(Self { weight: MatRef::new(weight, out_features, in_features)?, bias: None })
    }

    /// The same base with the bias `b [out]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Bias`).
    pub fn with_bias(mut self, bias: &'a [E]) -> Result<Self> {
        check_len(Operand::Bias, self.weight.rows(), bias.len())?;
        self.bias = Some(bias);
        Ok(self)
    }

    /// The `0 -> 0` layer (every forward over it is a shape error unless
    /// its input is empty too).
    pub const fn empty() -> Self {
        Self { weight: MatRef::empty(), bias: None }
    }

    /// `W [out, in]`, row-major.
    pub fn weight(&self) -> &'a [E] {
        self.weight.as_slice()
    }

    /// `W` as a view.
    pub fn as_mat(&self) -> MatRef<'a, E> {
        self.weight
    }
}

impl<E: Element> FrozenLinear<E> for Dense<'_, E> {
    fn in_features(&self) -> usize {
        self.weight.cols()
    }

    fn out_features(&self) -> usize {
        self.weight.rows()
    }

    fn bias(&self) -> Option<&[E]> {
        self.bias
    }

    fn run_apply<B: Backend<E> + ?Sized>(&self, backend: &B, p: Product<'_, E>) -> Outcome<E, B> {
        backend.gemm(p.dst, p.accum, p.src, Op::N, self.weight, Op::T, <E::Accum as Element>::from_f64(1.0))
    }

    fn run_apply_transpose<B: Backend<E> + ?Sized>(&self, backend: &B, p: Product<'_, E>) -> Outcome<E, B> {
        backend.gemm(p.dst, p.accum, p.src, Op::N, self.weight, Op::N, <E::Accum as Element>::from_f64(1.0))
    }

    fn rows_scratch_len(&self, _n: usize) -> usize {
        0
    }

    /// Copies the rows.
    fn rows<B: Backend<E> + ?Sized>(
        &self,
        _backend: &B,
        start: usize,
        mut dst: MatMut<'_, E>,
        _scratch: &mut [E],
    ) -> Outcome<E, B> {
        check_rows(start, dst.rows(), self.weight.rows(), self.weight.cols(), &dst)?;
        for (k, row) in dst.row_iter_mut().enumerate() {
            row.copy_from_slice(self.weight.row(start + k));
        }
        Ok(())
    }
}

/// `Ok` if rows `start..start + n` exist in an `out`-row weight and `dst`
/// is `[n, in]`.
pub(crate) fn check_rows<E: Element>(
    start: usize,
    n: usize,
    n_out: usize,
    n_in: usize,
    dst: &MatMut<'_, E>,
) -> Result<()> {
    let end = start.checked_add(n).ok_or(crate::Error::Overflow)?;
    if end > n_out {
        return Err(crate::Error::ShapeMismatch { operand: Operand::Weight, expected: n_out, found: end });
    }
    check_len(Operand::Dst, n_in, dst.cols())
}

/// `y[i, :] += bias` for every row, rounding once per element.
pub(crate) fn add_bias<E: Element>(y: &mut MatMut<'_, E>, bias: &[E]) {
    for row in y.row_iter_mut() {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = E::from_accum(v.to_accum() + b.to_accum());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::backend::Reference;

    #[test]
    fn dense_forward_and_transpose_by_hand() {
        // W = [[1, 2], [3, 4], [5, 6]] (out 3, in 2), b = [1, 0, -1].
        let w = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, -1.0];
        let base = Dense::new(&w, 3, 2).unwrap().with_bias(&b).unwrap();
        let mut y = [0.0; 3];
        base.forward(&Reference, MatRef::new(&[1.0, 1.0], 1, 2).unwrap(), MatMut::new(&mut y, 1, 3).unwrap()).unwrap();
        // x W^T + b = [3, 7, 11] + [1, 0, -1].
        assert_eq!(y, [4.0, 7.0, 10.0]);
        let mut gx = [0.0; 2];
        let g = [1.0, 0.0, 1.0];
        base.apply_transpose(
            &Reference,
            MatRef::new(&g, 1, 3).unwrap(),
            MatMut::new(&mut gx, 1, 2).unwrap(),
            Accum::Replace,
        )
        .unwrap();
        // g W = row0 + row2 = [6, 8].
        assert_eq!(gx, [6.0, 8.0]);
    }

    #[test]
    fn dense_shape_errors_write_nothing() {
        let w = [0.0f32; 6];
        assert_eq!(
            Dense::new(&w, 2, 2).unwrap_err(),
            Error::ShapeMismatch { operand: Operand::Weight, expected: 4, found: 6 }
        );
        let base = Dense::new(&w, 3, 2).unwrap();
        assert_eq!(
            base.with_bias(&[0.0; 2]).unwrap_err(),
            Error::ShapeMismatch { operand: Operand::Bias, expected: 3, found: 2 }
        );
        let mut y = [7.0f32; 3];
        let x = [1.0f32; 3];
        let err = base
            .apply(&Reference, MatRef::new(&x, 1, 3).unwrap(), MatMut::new(&mut y, 1, 3).unwrap(), Accum::Replace)
            .unwrap_err();
        assert_eq!(err, Error::ShapeMismatch { operand: Operand::Input, expected: 2, found: 3 });
        let err = base
            .apply_transpose(
                &Reference,
                MatRef::new(&x[..2], 1, 2).unwrap(),
                MatMut::new(&mut y[..2], 1, 2).unwrap(),
                Accum::Replace,
            )
            .unwrap_err();
        assert_eq!(err, Error::ShapeMismatch { operand: Operand::GradOutput, expected: 3, found: 2 });
        assert_eq!(y, [7.0; 3]);
    }
}
