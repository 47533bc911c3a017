//! The compute backend: one gemm, in faer's sense.
//!
//! Every method in this crate is written against [`Backend`] alone, so a
//! backend that implements it (the portable [`Reference`] here, the SIMD faer
//! backend in `peft-faer`, or a user's DSP or GPU backend) runs all of them.
//!
//! ```text
//! Accum::Replace:  C  = alpha * op(A) * op(B)     (C is never read)
//! Accum::Add:      C += alpha * op(A) * op(B)
//! ```
//!
//! `op(X)` is `X` or `X^T` as [`Op`] says; `op(A)` is `m x k`, `op(B)` is
//! `k x n`, `C` is `m x n`. Products and sums run in the element's
//! accumulation type and each element of `C` is rounded once.

mod reference;

pub use reference::Reference;

use crate::element::Element;
use crate::error::{Error, Operand, Result};
use crate::matrix::{MatMut, MatRef};

/// Whether a gemm overwrites or accumulates into its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accum {
    /// `C = alpha * op(A) * op(B)`; the old contents of `C` are never read
    /// (they may be NaN).
    Replace,
    /// `C += alpha * op(A) * op(B)`.
    Add,
}

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

impl Op {
    /// `(rows, cols)` of `op(m)`.
    #[inline]
    pub fn dims<E: Element>(self, m: &MatRef<'_, E>) -> (usize, usize) {
        match self {
            Op::N => (m.rows(), m.cols()),
            Op::T => (m.cols(), m.rows()),
        }
    }
}

/// A matrix-multiply engine over element type `E`.
pub trait Backend<E: Element> {
    /// `dst (=|+=) alpha * op(lhs) * op(rhs)`.
    ///
    /// Shapes: `op(lhs)` is `m x k`, `op(rhs)` is `k x n`, `dst` is `m x n`;
    /// `k = 0` is allowed (the product is zero).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (checked with [`check_gemm`] before anything
    /// is written).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        dst: MatMut<'_, E>,
        accum: Accum,
        lhs: MatRef<'_, E>,
        lhs_op: Op,
        rhs: MatRef<'_, E>,
        rhs_op: Op,
        alpha: E::Accum,
    ) -> Result<()>;
}

impl<E: Element, B: Backend<E> + ?Sized> Backend<E> for &B {
    #[inline]
    fn gemm(
        &self,
        dst: MatMut<'_, E>,
        accum: Accum,
        lhs: MatRef<'_, E>,
        lhs_op: Op,
        rhs: MatRef<'_, E>,
        rhs_op: Op,
        alpha: E::Accum,
    ) -> Result<()> {
        (**self).gemm(dst, accum, lhs, lhs_op, rhs, rhs_op, alpha)
    }
}

/// Checks the shapes of a gemm and returns `(m, n, k)`.
///
/// Backends call this before touching `dst` so that a shape error is the
/// same typed error on every backend.
///
/// # Errors
/// [`Error::ShapeMismatch`] naming the first operand whose dimension
/// disagrees: `Rhs` for the inner dimension, `Dst` for the outer ones.
pub fn check_gemm<E: Element>(
    dst: &MatMut<'_, E>,
    lhs: &MatRef<'_, E>,
    lhs_op: Op,
    rhs: &MatRef<'_, E>,
    rhs_op: Op,
) -> Result<(usize, usize, usize)> {
    let (m, k) = lhs_op.dims(lhs);
    let (k2, n) = rhs_op.dims(rhs);
    if k2 != k {
        return Err(Error::ShapeMismatch { operand: Operand::Rhs, expected: k, found: k2 });
    }
    if dst.rows() != m {
        return Err(Error::ShapeMismatch { operand: Operand::Dst, expected: m, found: dst.rows() });
    }
    if dst.cols() != n {
        return Err(Error::ShapeMismatch { operand: Operand::Dst, expected: n, found: dst.cols() });
    }
    Ok((m, n, k))
}
